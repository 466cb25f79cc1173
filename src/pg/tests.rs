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
        assert_eq!(sqlstate_of_kind(kind), code, "{kind:?}");
    }
}

#[test]
fn datafusion_errors_get_precise_sqlstates() {
    let cases = [
        (DataFusionError::Plan("table 'db.public.nope' not found".into()), "42P01"),
        (DataFusionError::NotImplemented("x".into()), "0A000"),
        (DataFusionError::ResourcesExhausted("pool".into()), "53200"),
        (
            DataFusionError::ArrowError(Box::new(arrow::error::ArrowError::DivideByZero), None),
            "22012",
        ),
        (DataFusionError::Execution("Cast error: cannot cast 'abc' to Int64".into()), "22P02"),
        (DataFusionError::Plan("Cannot coerce arguments for function".into()), "42804"),
    ];
    for (error, code) in cases {
        assert_eq!(sqlstate_of(&error), code, "{error}");
    }
}
