//! The crate-wide error kind: each module's error says which kind it is, and the two edges map
//! kinds exhaustively (`http` to status codes, `pg` to SQLSTATEs), so a new kind cannot compile
//! without its mapping.

/// What a caller can do about an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The request is wrong: bad syntax, type conflict, unknown precision.
    InvalidInput,
    /// A database or table that does not exist.
    NotFound,
    /// Creating something that already exists.
    AlreadyExists,
    /// The object is in use by the caller's own session (dropping the connected database).
    ObjectInUse,
    /// A valid request we do not support.
    Unsupported,
    /// A limit was reached (buffer memory, request size); retry later or send less.
    ResourceExhausted,
    /// The server cannot serve this now (shutting down, WAL failed).
    Unavailable,
    /// A bug or an I/O failure on our side.
    Internal,
}
