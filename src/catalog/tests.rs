//! Schema-on-write rules: new columns are reported, conflicts are reasons.

use super::*;
use crate::line_protocol::{parse_line, Line};

fn check(existing: &[(&str, ColumnKind)], line: &str, expected: &str) {
    let columns = existing.iter().map(|(n, k)| Column { name: n.to_string(), kind: *k }).collect();
    let schema = TableSchema::new("cpu", columns);
    let mut parsed = Line::default();
    parse_line(1, line.as_bytes(), &mut parsed).expect("test lines are well formed");
    let actual = match schema.check_line(&parsed, &[]) {
        Ok(added) => {
            added.iter().map(|c| format!("{}:{:?}", c.name, c.kind)).collect::<Vec<_>>().join(" ")
        }
        Err(e) => format!("error: {e}"),
    };
    assert_eq!(actual, expected, "line {line:?}");
}

#[test]
fn schema_on_write() {
    use ColumnKind::*;
    let f = |t| Field(t);
    check(&[], "cpu,host=a usage=1,n=2i,u=3u,s=\"x\",b=t", "host:Tag usage:Field(Float) n:Field(Integer) u:Field(UInteger) s:Field(String) b:Field(Boolean)");
    check(&[("host", Tag), ("usage", f(FieldType::Float))], "cpu,host=a usage=1", "");
    check(
        &[("usage", f(FieldType::Float))],
        "cpu usage=1i",
        "error: field \"usage\" is float in table \"cpu\", got integer",
    );
    check(&[("host", Tag)], "cpu host=1", "error: \"host\" is a tag in table \"cpu\", not a field");
    check(
        &[("usage", f(FieldType::Float))],
        "cpu,usage=x v=1",
        "error: \"usage\" is a float field in table \"cpu\", not a tag",
    );
    check(&[], "cpu,a=x a=1", "error: \"a\" is used as both a tag and a field");
    check(&[], "cpu _seq=1", "error: field key \"_seq\" is reserved");
    // The last occurrence of a repeated field decides its type.
    check(&[("v", f(FieldType::Integer))], "cpu v=1,v=2i", "");
}

#[test]
fn arrow_schema_orders_tags_fields_time() {
    let schema = TableSchema::new(
        "cpu",
        vec![
            Column { name: "usage".into(), kind: ColumnKind::Field(FieldType::Float) },
            Column { name: "host".into(), kind: ColumnKind::Tag },
        ],
    );
    let names: Vec<_> =
        schema.arrow_schema_with_seq().fields().iter().map(|f| f.name().clone()).collect();
    assert_eq!(names, ["host", "usage", "time", "_seq"]);
    let grown = schema.with_columns(&[Column { name: "region".into(), kind: ColumnKind::Tag }]);
    let names: Vec<_> = grown.arrow_schema().fields().iter().map(|f| f.name().clone()).collect();
    assert_eq!(names, ["host", "region", "usage", "time"]);
    assert!(grown.conflicts_with(&[Column {
        name: "host".into(),
        kind: ColumnKind::Field(FieldType::Float)
    }]));
}

#[test]
fn object_names() {
    assert!(check_object_name("database", "telegraf").is_ok());
    assert!(check_object_name("database", "").is_err());
    assert!(check_object_name("database", "a\nb").is_err());
    assert!(check_object_name("table", &"x".repeat(NAME_BYTES_MAX + 1)).is_err());
    for name in ["my-table.v1/x", "a\\b", "..", "cpu#1", "température", "a%b", "q?x", "%25"] {
        assert!(check_object_name("table", name).is_ok(), "{name}");
    }
}
