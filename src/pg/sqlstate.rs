//! The SQLSTATEs Sundial sends, as one enum: the only place their codes are written. Every
//! error reaching a Postgres client carries one of these (PostgreSQL's Appendix A names).

/// A PostgreSQL error code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SqlState {
    ProtocolViolation,
    FeatureNotSupported,
    DivisionByZero,
    InvalidParameterValue,
    InvalidTextRepresentation,
    CharacterNotInRepertoire,
    BadCopyFileFormat,
    DatatypeMismatch,
    SyntaxError,
    UndefinedColumn,
    DuplicateColumn,
    UndefinedTable,
    UndefinedFunction,
    UndefinedObject,
    DuplicateObject,
    DuplicateTable,
    DuplicateDatabase,
    InvalidCatalogName,
    ObjectInUse,
    ObjectNotInPrerequisiteState,
    DependentObjectsStillExist,
    CantChangeRuntimeParam,
    ProgramLimitExceeded,
    OutOfMemory,
    QueryCanceled,
    InFailedSqlTransaction,
    CannotConnectNow,
    InsufficientPrivilege,
    InvalidAuthorizationSpecification,
    InternalError,
}

impl SqlState {
    /// The five-character code.
    pub fn code(self) -> &'static str {
        match self {
            SqlState::ProtocolViolation => "08P01",
            SqlState::FeatureNotSupported => "0A000",
            SqlState::DivisionByZero => "22012",
            SqlState::InvalidParameterValue => "22023",
            SqlState::InvalidTextRepresentation => "22P02",
            SqlState::CharacterNotInRepertoire => "22021",
            SqlState::BadCopyFileFormat => "22P04",
            SqlState::DatatypeMismatch => "42804",
            SqlState::SyntaxError => "42601",
            SqlState::UndefinedColumn => "42703",
            SqlState::DuplicateColumn => "42701",
            SqlState::UndefinedTable => "42P01",
            SqlState::UndefinedFunction => "42883",
            SqlState::UndefinedObject => "42704",
            SqlState::DuplicateObject => "42710",
            SqlState::DuplicateTable => "42P07",
            SqlState::DuplicateDatabase => "42P04",
            SqlState::InvalidCatalogName => "3D000",
            SqlState::ObjectInUse => "55006",
            SqlState::ObjectNotInPrerequisiteState => "55000",
            SqlState::DependentObjectsStillExist => "2BP01",
            SqlState::CantChangeRuntimeParam => "55P02",
            SqlState::ProgramLimitExceeded => "54000",
            SqlState::OutOfMemory => "53200",
            SqlState::QueryCanceled => "57014",
            SqlState::InFailedSqlTransaction => "25P02",
            SqlState::CannotConnectNow => "57P03",
            SqlState::InsufficientPrivilege => "42501",
            SqlState::InvalidAuthorizationSpecification => "28000",
            SqlState::InternalError => "XX000",
        }
    }
}

impl std::fmt::Display for SqlState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.code())
    }
}
