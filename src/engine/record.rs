//! The WAL payload of a line-protocol write (layout in `storage-format/wal.md`): precision code,
//! default timestamp, database name and the accepted lines. `write` encodes it, startup replay
//! (`open`) decodes it.

use crate::line_protocol::Precision;

/// Why a WAL payload is not a line-protocol record.
#[derive(Debug, thiserror::Error)]
pub(super) enum RecordError {
    #[error("line protocol record shorter than its header")]
    TooShort,
    #[error("unknown precision code")]
    UnknownPrecision,
    #[error("database name runs past the record")]
    DatabaseOverrun,
    #[error("database name is not UTF-8")]
    DatabaseNotUtf8,
}

/// The WAL payload of a line-protocol write (layout in `storage-format/wal.md`).
pub(super) struct LpRecord<'a> {
    pub(super) precision: Precision,
    pub(super) default_time_ns: i64,
    pub(super) database: &'a str,
    pub(super) lines: &'a [u8],
}

impl<'a> LpRecord<'a> {
    pub(super) fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(11 + self.database.len() + self.lines.len());
        out.push(self.precision.code());
        out.extend_from_slice(&self.default_time_ns.to_le_bytes());
        let db_len =
            u16::try_from(self.database.len()).expect("database names are at most NAME_BYTES_MAX");
        out.extend_from_slice(&db_len.to_le_bytes());
        out.extend_from_slice(self.database.as_bytes());
        out.extend_from_slice(self.lines);
        out
    }

    pub(super) fn decode(payload: &'a [u8]) -> Result<LpRecord<'a>, RecordError> {
        if payload.len() < 11 {
            return Err(RecordError::TooShort);
        }
        let precision = Precision::from_code(payload[0]).ok_or(RecordError::UnknownPrecision)?;
        let default_time_ns = i64::from_le_bytes(payload[1..9].try_into().expect("8 bytes"));
        let db_len = u16::from_le_bytes(payload[9..11].try_into().expect("2 bytes")) as usize;
        let database = payload.get(11..11 + db_len).ok_or(RecordError::DatabaseOverrun)?;
        let database = std::str::from_utf8(database).map_err(|_| RecordError::DatabaseNotUtf8)?;
        Ok(LpRecord { precision, default_time_ns, database, lines: &payload[11 + db_len..] })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_malformed_payloads() {
        let record = LpRecord {
            precision: Precision::Millisecond,
            default_time_ns: -7,
            database: "db",
            lines: b"cpu u=1 1\n",
        };
        let payload = record.encode();
        let decoded = LpRecord::decode(&payload).expect("decodes");
        assert_eq!(decoded.precision, Precision::Millisecond);
        assert_eq!((decoded.default_time_ns, decoded.database), (-7, "db"));
        assert_eq!(decoded.lines, b"cpu u=1 1\n");

        assert!(matches!(LpRecord::decode(&payload[..10]), Err(RecordError::TooShort)));
        let mut bad = payload.clone();
        bad[0] = 255;
        assert!(matches!(LpRecord::decode(&bad), Err(RecordError::UnknownPrecision)));
        assert!(matches!(LpRecord::decode(&payload[..12]), Err(RecordError::DatabaseOverrun)));
        let mut bad = payload;
        bad[11] = 0xff;
        let error = LpRecord::decode(&bad).err().expect("not UTF-8");
        assert_eq!(error.to_string(), "database name is not UTF-8");
    }
}
