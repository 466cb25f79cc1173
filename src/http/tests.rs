//! Status mapping and content negotiation.

use super::*;

#[test]
fn every_kind_has_a_status() {
    let cases = [
        (ErrorKind::InvalidInput, 400),
        (ErrorKind::Unsupported, 400),
        (ErrorKind::NotFound, 404),
        (ErrorKind::AlreadyExists, 409),
        (ErrorKind::ResourceExhausted, 503),
        (ErrorKind::Unavailable, 503),
        (ErrorKind::Internal, 500),
    ];
    for (kind, status) in cases {
        assert_eq!(status_of(kind).as_u16(), status, "{kind:?}");
    }
}

#[test]
fn formats_by_name_and_accept_header() {
    assert_eq!(Format::parse("csv"), Some(Format::Csv));
    assert_eq!(Format::parse("xml"), None);
    assert_eq!(Format::from_accept("text/csv"), Some(Format::Csv));
    assert_eq!(
        Format::from_accept("*/*, application/vnd.apache.arrow.stream;q=0.9"),
        Some(Format::Arrow)
    );
    assert_eq!(Format::from_accept("*/*"), None);
}
