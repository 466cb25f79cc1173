//! SQLSTATE mapping.

use super::*;

#[test]
fn every_kind_has_a_sqlstate() {
    let cases = [
        (ErrorKind::InvalidInput, "22023"),
        (ErrorKind::NotFound, "42P01"),
        (ErrorKind::AlreadyExists, "42P07"),
        (ErrorKind::Unsupported, "0A000"),
        (ErrorKind::ResourceExhausted, "53200"),
        (ErrorKind::Unavailable, "57P03"),
        (ErrorKind::Internal, "XX000"),
    ];
    for (kind, code) in cases {
        assert_eq!(sqlstate_of_kind(kind).code(), code, "{kind:?}");
    }
}

#[test]
fn datafusion_errors_get_precise_sqlstates_by_variant() {
    use datafusion::common::{Column, SchemaError};
    let cases = [
        (DataFusionError::NotImplemented("x".into()), "0A000"),
        (DataFusionError::ResourcesExhausted("pool".into()), "53200"),
        (
            DataFusionError::ArrowError(Box::new(arrow::error::ArrowError::DivideByZero), None),
            "22012",
        ),
        (
            DataFusionError::ArrowError(
                Box::new(arrow::error::ArrowError::CastError("'abc' to Int64".into())),
                None,
            ),
            "22P02",
        ),
        (
            DataFusionError::SchemaError(
                Box::new(SchemaError::FieldNotFound {
                    field: Box::new(Column::from_name("nosuch")),
                    valid_fields: vec![],
                }),
                Box::new(None),
            ),
            "42703",
        ),
        (DataFusionError::Plan("Cannot coerce arguments for function".into()), "42804"),
        (DataFusionError::Execution("date_trunc: unsupported unit".into()), "22023"),
    ];
    for (error, code) in cases {
        assert_eq!(sqlstate_of(&error).code(), code, "{error}");
    }
}

#[test]
fn pipeline_errors_are_typed() {
    let undefined = crate::query::Error::UndefinedTable("nope".into());
    let PgWireError::UserError(info) = query_error(&undefined) else { panic!("a user error") };
    assert_eq!(info.code, "42P01");
    let refused = statement::command("CREATE EXTERNAL TABLE p (a INT) STORED AS CSV LOCATION '/'")
        .expect_err("refused");
    let PgWireError::UserError(info) = statement_error(refused) else { panic!("a user error") };
    assert!(info.code == "0A000" || info.code == "42601", "{}", info.code);
}
