//! What clients send that sqlparser cannot parse, recognised by its text: the only place where
//! SQL is matched as text. Each shape names the client that sends it. Only consulted after the
//! parser has failed, so a statement that parses never comes here.

use super::Command;

/// A session command in a form sqlparser's PostgreSQL dialect does not accept.
pub fn command(sql: &str) -> Option<Command> {
    let statement = sql.trim().trim_end_matches(';').trim().to_ascii_uppercase();
    let words: Vec<&str> = statement.split_whitespace().collect();
    // Session commands that change nothing here (see `Command::NoOp`), in any spelling the
    // parser rejects: psycopg and asyncpg send `DEALLOCATE` when their statement caches turn
    // over, connection pools `DISCARD ALL` on check-in, SQLAlchemy and psycopg savepoints for
    // nested transactions.
    let tag = match words.as_slice() {
        ["DEALLOCATE", ..] => "DEALLOCATE",
        ["DISCARD", "ALL"] => "DISCARD ALL",
        ["SAVEPOINT", _] => "SAVEPOINT",
        ["RELEASE", ..] => "RELEASE",
        ["ROLLBACK", "TO", ..] => "ROLLBACK",
        _ => return None,
    };
    Some(Command::NoOp { tag })
}
