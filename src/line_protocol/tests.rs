//! Parser cases from the InfluxDB line protocol spec, good and bad, plus a no-panic property.

use super::*;

/// Renders a parsed line canonically so each case is one string comparison.
fn render(line: &Line<'_>) -> String {
    let mut s = format!("m={:?}", line.measurement.as_ref());
    for (k, v) in &line.tags {
        s.push_str(&format!(" tag:{:?}={:?}", k.as_ref(), v.as_ref()));
    }
    for (k, v) in &line.fields {
        let v = match v {
            FieldValue::Float(f) => format!("float:{f:?}"),
            FieldValue::Integer(i) => format!("int:{i}"),
            FieldValue::UInteger(u) => format!("uint:{u}"),
            FieldValue::String(s) => format!("str:{:?}", s.as_ref()),
            FieldValue::Boolean(b) => format!("bool:{b}"),
        };
        s.push_str(&format!(" field:{:?}={v}", k.as_ref()));
    }
    if let Some(ts) = line.timestamp {
        s.push_str(&format!(" ts={ts}"));
    }
    s
}

fn check(input: &str, expected: &str) {
    let mut line = Line::default();
    let actual = match parse_line(1, input.as_bytes(), &mut line) {
        Ok(()) => render(&line),
        Err(e) => format!("error: {e}"),
    };
    assert_eq!(actual, expected, "input: {input:?}");
}

#[test]
fn good_lines() {
    check("cpu value=1", r#"m="cpu" field:"value"=float:1.0"#);
    check(
        "cpu,host=a,region=eu usage=0.5 1700000000000000000",
        r#"m="cpu" tag:"host"="a" tag:"region"="eu" field:"usage"=float:0.5 ts=1700000000000000000"#,
    );
    check("m f=1.", r#"m="m" field:"f"=float:1.0"#);
    check("m f=-0.5e-3", r#"m="m" field:"f"=float:-0.0005"#);
    check("m f=1E10", r#"m="m" field:"f"=float:10000000000.0"#);
    check("m f=.5", r#"m="m" field:"f"=float:0.5"#);
    check("m f=12i", r#"m="m" field:"f"=int:12"#);
    check("m f=-9223372036854775808i", r#"m="m" field:"f"=int:-9223372036854775808"#);
    check("m f=18446744073709551615u", r#"m="m" field:"f"=uint:18446744073709551615"#);
    check(r#"m f="hello world, a=b""#, r#"m="m" field:"f"=str:"hello world, a=b""#);
    check(r#"m f="say \"hi\" \\ \n""#, r#"m="m" field:"f"=str:"say \"hi\" \\ \\n""#);
    check(r#"m f="""#, r#"m="m" field:"f"=str:"""#);
    for t in ["t", "T", "true", "True", "TRUE"] {
        check(&format!("m f={t}"), r#"m="m" field:"f"=bool:true"#);
    }
    for f in ["f", "F", "false", "False", "FALSE"] {
        check(&format!("m b={f}"), r#"m="m" field:"b"=bool:false"#);
    }
    check("m a=1,b=2i,a=3", r#"m="m" field:"a"=float:1.0 field:"b"=int:2 field:"a"=float:3.0"#);
    check("m f=1 -5", r#"m="m" field:"f"=float:1.0 ts=-5"#);
    check("m f=1 5   ", r#"m="m" field:"f"=float:1.0 ts=5"#);
    check("  m f=1", r#"m="m" field:"f"=float:1.0"#);
}

#[test]
fn escapes() {
    check(r"my\ meas\,ure f=1", r#"m="my meas,ure" field:"f"=float:1.0"#);
    check(
        r"m,ta\ g\,k\=ey=va\ l\,u\=e f=1",
        r#"m="m" tag:"ta g,k=ey"="va l,u=e" field:"f"=float:1.0"#,
    );
    check(r"m fi\ e\,l\=d=1", r#"m="m" field:"fi e,l=d"=float:1.0"#);
    check(r"m,t=a\b f=1", r#"m="m" tag:"t"="a\\b" field:"f"=float:1.0"#);
    check(r"m=x f=1", r#"m="m=x" field:"f"=float:1.0"#);
    check(r"m,t=héllo f=1", r#"m="m" tag:"t"="héllo" field:"f"=float:1.0"#);
    // A tag value may not end in a backslash (InfluxDB 3 refuses it too).
    check(r"m,t=a\\ f=1", "error: line 1, column 5: value of tag \"t\" ends in a backslash");
}

#[test]
fn bad_lines() {
    check("cpu", "error: line 1, column 4: missing field set");
    check("cpu ", "error: line 1, column 5: missing field set");
    check(",t=1 f=1", "error: line 1, column 1: missing measurement");
    check("m,=a f=1", "error: line 1, column 3: missing tag key");
    check("m,t f=1", "error: line 1, column 4: missing '=' after tag key \"t\"");
    check("m,t= f=1", "error: line 1, column 5: missing value for tag \"t\"");
    check("m,t=a,t=b f=1", "error: line 1, column 7: duplicate tag key \"t\"");
    check("m,time=a f=1", "error: line 1, column 3: \"time\" cannot be a tag key");
    check("m time=1", "error: line 1, column 3: \"time\" cannot be a field key");
    check("m f", "error: line 1, column 4: missing '=' after field key \"f\"");
    check("m f=", "error: line 1, column 5: missing value for field \"f\"");
    check("m f=,g=1", "error: line 1, column 5: missing value for field \"f\"");
    check("m =1", "error: line 1, column 3: missing field key");
    check("m f=abc", "error: line 1, column 5: invalid value \"abc\" for field \"f\"");
    check("m f=1.2.3", "error: line 1, column 5: invalid value \"1.2.3\" for field \"f\"");
    check("m f=inf", "error: line 1, column 5: invalid value \"inf\" for field \"f\"");
    check("m f=NaN", "error: line 1, column 5: invalid value \"NaN\" for field \"f\"");
    check("m f=1e999", "error: line 1, column 5: float out of range \"1e999\" for field \"f\"");
    check("m f=1.5i", "error: line 1, column 5: invalid value \"1.5i\" for field \"f\"");
    check("m f=-1u", "error: line 1, column 5: invalid value \"-1u\" for field \"f\"");
    check(
        "m f=9223372036854775808i",
        "error: line 1, column 5: integer out of range \"9223372036854775808i\" for field \"f\"",
    );
    check("m f=18446744073709551616u",
        "error: line 1, column 5: unsigned integer out of range \"18446744073709551616u\" for field \"f\"");
    check("m f=\"abc", "error: line 1, column 5: unterminated string for field \"f\"");
    check("m f=1 12x", "error: line 1, column 7: invalid timestamp \"12x\"");
    check("m f=1 1 2", "error: line 1, column 9: unexpected text after timestamp");
    check("m f=1x,g=2", "error: line 1, column 5: invalid value \"1x\" for field \"f\"");
    check("m f=\"a\"b", "error: line 1, column 8: expected ',' or ' ' after field value");
    check("m,t=a", "error: line 1, column 6: missing field set");
    // As InfluxDB 3: a leading double quote is part of a measurement or key.
    check("\"m f=1", r#"m="\"m" field:"f"=float:1.0"#);
    check("m \"f\"=1i", r#"m="m" field:"\"f\""=int:1"#);
    check("m,\"t=v f=1", r#"m="m" tag:"\"t"="v" field:"f"=float:1.0"#);
    check("m,t=a\\\\,u=b f=1", "error: line 1, column 5: value of tag \"t\" ends in a backslash");
    check("m,t=a\\b f=1", r#"m="m" tag:"t"="a\\b" field:"f"=float:1.0"#);
}

#[test]
fn strings_up_to_a_mebibyte() {
    let fits = format!("m f=\"{}\"", "x".repeat(STRING_BYTES_MAX));
    let mut line = Line::default();
    assert!(parse_line(1, fits.as_bytes(), &mut line).is_ok());
    let over = format!("m f=\"{}\"", "x".repeat(STRING_BYTES_MAX + 1));
    let err = parse_line(1, over.as_bytes(), &mut line).unwrap_err();
    assert_eq!(err.message, format!("string for field \"f\" longer than {STRING_BYTES_MAX} bytes"));
}

#[test]
fn newlines_inside_quoted_strings_do_not_end_the_line() {
    let body = "a f=\"one\ntwo\"\nb,t=x\\ y f=\"q\\\"\n\" 5\r\n# \"c\nc f=1i\nd,t=\"v f=1\n\"e\" \"g\"=\"h\ni\"";
    let got: Vec<(usize, String)> =
        lines(body.as_bytes()).map(|(n, b)| (n, String::from_utf8(b.to_vec()).unwrap())).collect();
    assert_eq!(
        got,
        vec![
            (1, "a f=\"one\ntwo\"".to_string()),
            (3, "b,t=x\\ y f=\"q\\\"\n\" 5".to_string()),
            (6, "c f=1i".to_string()),
            (7, "d,t=\"v f=1".to_string()),
            (8, "\"e\" \"g\"=\"h\ni\"".to_string()),
        ]
    );
    let mut line = Line::default();
    parse_line(3, got[1].1.as_bytes(), &mut line).expect("parses");
    assert_eq!(render(&line), r#"m="b" tag:"t"="x y" field:"f"=str:"q\"\n" ts=5"#);
    parse_line(8, got[4].1.as_bytes(), &mut line).expect("parses");
    assert_eq!(render(&line), r#"m="\"e\"" field:"\"g\""=str:"h\ni""#);
    // An unterminated string takes the rest of the body: one bad line, not many.
    let got: Vec<usize> = lines(b"a f=\"open\nb f=1\nc f=2").map(|(n, _)| n).collect();
    assert_eq!(got, vec![1]);
}

#[test]
fn receipt_time_in_the_request_precision() {
    let ns = 1_700_000_123_456_789_012;
    assert_eq!(Precision::Second.truncate(ns), 1_700_000_123_000_000_000);
    assert_eq!(Precision::Millisecond.truncate(ns), 1_700_000_123_456_000_000);
    assert_eq!(Precision::Microsecond.truncate(ns), 1_700_000_123_456_789_000);
    assert_eq!(Precision::Nanosecond.truncate(ns), ns);
    assert_eq!(Precision::Auto.truncate(ns), ns);
    assert_eq!(Precision::Second.truncate(-1), -1_000_000_000);
}

#[test]
fn invalid_utf8_is_a_line_error() {
    let mut line = Line::default();
    let err = parse_line(3, b"m,t=\xff f=1", &mut line).unwrap_err();
    assert_eq!(err.to_string(), "line 3, column 5: invalid UTF-8");
}

#[test]
fn lines_skip_comments_blank_and_crlf() {
    let body = b"# comment\r\n\r\ncpu f=1\r\n   \n  # indented comment\ncpu f=2";
    let got: Vec<(usize, &[u8])> = lines(body).collect();
    assert_eq!(got, vec![(3, &b"cpu f=1"[..]), (6, &b"cpu f=2"[..])]);
}

#[test]
fn precision_conversions() {
    let cases = [
        (Precision::Nanosecond, 5, Some(5)),
        (Precision::Microsecond, 5, Some(5_000)),
        (Precision::Millisecond, 5, Some(5_000_000)),
        (Precision::Second, 5, Some(5_000_000_000)),
        (Precision::Minute, 1, Some(60_000_000_000)),
        (Precision::Hour, 1, Some(3_600_000_000_000)),
        (Precision::Second, i64::MAX, None),
        (Precision::Auto, 1_700_000_000, Some(1_700_000_000_000_000_000)),
        (Precision::Auto, 1_700_000_000_000, Some(1_700_000_000_000_000_000)),
        (Precision::Auto, 1_700_000_000_000_000, Some(1_700_000_000_000_000_000)),
        (Precision::Auto, 1_700_000_000_000_000_000, Some(1_700_000_000_000_000_000)),
    ];
    for (precision, value, expected) in cases {
        assert_eq!(precision.to_nanos(value), expected, "{precision:?} {value}");
    }
    for name in ["ns", "n", "us", "u", "ms", "s", "m", "h", "auto", "second", "millisecond"] {
        let p = Precision::parse(name).expect(name);
        assert_eq!(Precision::from_code(p.code()), Some(p));
    }
    assert_eq!(Precision::parse("days"), None);
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(2000))]
    #[test]
    fn never_panics_on_any_bytes(body in proptest::collection::vec(proptest::num::u8::ANY, 0..200)) {
        let mut line = Line::default();
        for (n, bytes) in lines(&body) {
            let _ = parse_line(n, bytes, &mut line);
        }
    }

    #[test]
    fn never_panics_on_line_like_text(body in "[a-z ,=\\\\\"0-9.eiu\\-tTfF#\r\n]{0,80}") {
        let mut line = Line::default();
        for (n, bytes) in lines(body.as_bytes()) {
            let _ = parse_line(n, bytes, &mut line);
        }
    }
}

#[test]
fn a_line_names_at_most_as_many_keys_as_a_table_has_columns() {
    assert_eq!(KEYS_PER_LINE_MAX, crate::catalog::COLUMNS_PER_TABLE_MAX);
    let fields: Vec<String> = (0..200_000).map(|i| format!("f{i}=1")).collect();
    let line = format!("m {} 1", fields.join(","));
    let started = std::time::Instant::now();
    let mut out = Line::default();
    let error = parse_line(1, line.as_bytes(), &mut out).expect_err("too many fields");
    assert!(error.message.contains("more than 2000"), "{error}");
    let tags: Vec<String> = (0..200_000).map(|i| format!("t{i}=a")).collect();
    let line = format!("m,{} v=1 1", tags.join(","));
    let error = parse_line(1, line.as_bytes(), &mut out).expect_err("too many tags");
    assert!(error.message.contains("more than 2000"), "{error}");
    assert!(started.elapsed() < std::time::Duration::from_secs(5), "{:?}", started.elapsed());
    let fields: Vec<String> = (0..1_999).map(|i| format!("f{i}=1")).collect();
    let line = format!("m,t=a {} 1", fields.join(","));
    parse_line(1, line.as_bytes(), &mut out).expect("2000 keys are allowed");
}

#[test]
fn repeated_fields_are_found_in_linear_time_for_any_line_length() {
    let mut out = Line::default();
    parse_line(1, b"m a=1,b=2,a=3 1", &mut out).expect("parses");
    assert_eq!(out.superseded_fields(), Some(vec![true, false, false]));
    parse_line(1, b"m a=1,b=2 1", &mut out).expect("parses");
    assert_eq!(out.superseded_fields(), None);
    // The same past the scanned prefix, and a duplicate tag among many is still an error.
    let many: Vec<String> = (0..100).map(|i| format!("f{i}={i}")).collect();
    let line = format!("m {},f7=700,f99=990 1", many.join(","));
    parse_line(1, line.as_bytes(), &mut out).expect("parses");
    let superseded = out.superseded_fields().expect("repeats");
    assert_eq!(superseded.iter().filter(|&&s| s).count(), 2);
    assert!(superseded[7] && superseded[99] && !superseded[100] && !superseded[101]);
    let tags: Vec<String> = (0..100).map(|i| format!("t{i}=a")).collect();
    let line = format!("m,{},t50=b v=1 1", tags.join(","));
    let error = parse_line(1, line.as_bytes(), &mut out).expect_err("duplicate tag");
    assert!(error.message.contains("duplicate tag key \"t50\""), "{error}");
    // Linear time: 1,999 keys per line, many lines.
    let keys: Vec<String> = (0..1_999).map(|i| format!("k{i}=1")).collect();
    let line = format!("m {} 1", keys.join(","));
    let started = std::time::Instant::now();
    for _ in 0..200 {
        parse_line(1, line.as_bytes(), &mut out).expect("parses");
        assert!(out.superseded_fields().is_none());
    }
    assert!(started.elapsed() < std::time::Duration::from_secs(10), "{:?}", started.elapsed());
}

/// A point after leading blanks is scanned as the parser reads it: a quote in a tag value
/// opens no string, so the newline after it ends the line.
#[test]
fn leading_blanks_do_not_change_where_a_point_ends() {
    let got: Vec<usize> =
        lines(b"  m,t=\"x\nn f=1 1\n\tm,t=\"a f=1 1\nok f=1 2").map(|(n, _)| n).collect();
    assert_eq!(got, vec![1, 2, 3, 4]);
}
