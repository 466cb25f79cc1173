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
    // `REFRESH MATERIALIZED VIEW name` (PostgreSQL's statement; sqlparser has no REFRESH).
    if let ["REFRESH", "MATERIALIZED", "VIEW", _, ..] = words.as_slice() {
        let original = sql.trim().trim_end_matches(';').trim();
        let name = original.splitn(4, char::is_whitespace).nth(3)?.trim();
        let view = match name.strip_prefix('"').and_then(|n| n.strip_suffix('"')) {
            Some(quoted) => quoted.replace("\"\"", "\""),
            None if !name.contains(char::is_whitespace) => name.to_lowercase(),
            None => return None,
        };
        return Some(Command::Refresh { view });
    }
    if let Some(command) = subscribe(sql) {
        return Some(command);
    }
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

/// `COPY (SUBSCRIBE [TO] name [WITH (SNAPSHOT)]) TO STDOUT` (Materialize's shape, for a view's
/// change feed; sqlparser has no SUBSCRIBE).
fn subscribe(sql: &str) -> Option<Command> {
    let text = sql.trim().trim_end_matches(';').trim();
    let rest = strip_word(text, "COPY")?.trim_start().strip_prefix('(')?;
    let close = rest.rfind(')')?;
    let (inner, after) = (&rest[..close], &rest[close + 1..]);
    let after: Vec<String> = after.split_whitespace().map(|w| w.to_ascii_uppercase()).collect();
    if after != ["TO", "STDOUT"] {
        return None;
    }
    let inner = strip_word(inner.trim(), "SUBSCRIBE")?.trim_start();
    let inner = strip_word(inner, "TO").map(str::trim_start).unwrap_or(inner);
    let (name, options) = if let Some(quoted) = inner.strip_prefix('"') {
        let end = quoted.find('"')?;
        (quoted[..end].to_string(), quoted[end + 1..].trim())
    } else {
        let end = inner.find(char::is_whitespace).unwrap_or(inner.len());
        (inner[..end].to_lowercase(), inner[end..].trim())
    };
    let options: String =
        options.split_whitespace().collect::<Vec<_>>().join(" ").to_ascii_uppercase();
    let snapshot = match options.as_str() {
        "" => false,
        "WITH (SNAPSHOT)" | "WITH (SNAPSHOT = TRUE)" | "WITH (SNAPSHOT TRUE)" => true,
        "WITH (SNAPSHOT = FALSE)" | "WITH (SNAPSHOT FALSE)" => false,
        _ => return None,
    };
    (!name.is_empty()).then_some(Command::Subscribe { view: name, snapshot })
}

/// `text` without its first word if that is `word` (any case).
fn strip_word<'a>(text: &'a str, word: &str) -> Option<&'a str> {
    let head = text.get(..word.len())?;
    let rest = &text[word.len()..];
    (head.eq_ignore_ascii_case(word) && rest.starts_with(|c: char| c.is_whitespace() || c == '('))
        .then_some(rest)
}

/// A database statement of InfluxQL on the v1 `/query` endpoint that SQL does not parse:
/// Telegraf and the influx 1.x CLI send `CREATE DATABASE name WITH DURATION 30d …` (the
/// duration becomes the database's retention; replication, shard duration and policy names
/// mean nothing here). The name, and for CREATE the duration if one was given.
pub fn influxql_database(q: &str) -> Option<InfluxQlDatabase> {
    let words: Vec<&str> = q.split_whitespace().collect();
    let upper: Vec<String> = words.iter().map(|w| w.to_ascii_uppercase()).collect();
    let create = match upper.iter().take(2).map(String::as_str).collect::<Vec<_>>().as_slice() {
        ["CREATE", "DATABASE"] => true,
        ["DROP", "DATABASE"] => false,
        _ => return None,
    };
    let name = words.get(2)?.trim_end_matches(';').trim_matches('"').to_string();
    if name.is_empty() {
        return None;
    }
    if !create {
        return Some(InfluxQlDatabase::Drop { name });
    }
    // `WITH [DURATION d] [REPLICATION n] [SHARD DURATION d] [NAME rp]`: only a DURATION after
    // the name's WITH and not after SHARD; InfluxQL's `0s` and `INF` mean forever.
    let with = upper.iter().skip(3).position(|w| w == "WITH").map(|at| at + 3);
    let duration = with.and_then(|with| {
        (with + 1..upper.len())
            .find(|&at| upper[at] == "DURATION" && upper[at - 1] != "SHARD")
            .and_then(|at| words.get(at + 1))
            .map(|d| d.trim_end_matches(';'))
            .map(|d| match d.trim_start_matches('0') {
                "" | "s" | "m" | "h" | "d" | "w" => "none".to_string(),
                _ => d.to_string(),
            })
    });
    Some(InfluxQlDatabase::Create { name, duration })
}

#[derive(Debug, PartialEq, Eq)]
pub enum InfluxQlDatabase {
    Create { name: String, duration: Option<String> },
    Drop { name: String },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn influxql_database_statements_with_retention_clauses() {
        assert_eq!(
            influxql_database("CREATE DATABASE \"telegraf\" WITH DURATION 30d REPLICATION 1"),
            Some(InfluxQlDatabase::Create {
                name: "telegraf".to_string(),
                duration: Some("30d".to_string())
            })
        );
        let duration = |q: &str| match influxql_database(q) {
            Some(InfluxQlDatabase::Create { duration, .. }) => duration,
            other => panic!("{q}: {other:?}"),
        };
        assert_eq!(duration("CREATE DATABASE t WITH SHARD DURATION 1h"), None);
        assert_eq!(
            duration("CREATE DATABASE t WITH REPLICATION 1 SHARD DURATION 1d DURATION 7d"),
            Some("7d".to_string())
        );
        assert_eq!(duration("CREATE DATABASE duration WITH DURATION 2d"), Some("2d".to_string()));
        assert_eq!(duration("CREATE DATABASE t WITH DURATION 0s"), Some("none".to_string()));
        assert_eq!(duration("CREATE DATABASE t WITH DURATION INF"), Some("INF".to_string()));
        assert_eq!(
            influxql_database("CREATE DATABASE t"),
            Some(InfluxQlDatabase::Create { name: "t".to_string(), duration: None })
        );
        assert_eq!(
            influxql_database("drop database x;"),
            Some(InfluxQlDatabase::Drop { name: "x".to_string() })
        );
        assert_eq!(influxql_database("CREATE DATABASE"), None);
        assert_eq!(influxql_database("SELECT 1"), None);
        assert!(matches!(command("DISCARD ALL"), Some(Command::NoOp { tag: "DISCARD ALL" })));
        assert!(command("SELECT 1").is_none());
        assert!(matches!(
            command("copy (subscribe cpu_1m with (snapshot)) to stdout;"),
            Some(Command::Subscribe { view, snapshot: true }) if view == "cpu_1m"
        ));
        assert!(matches!(
            command("COPY (SUBSCRIBE TO \"My View\") TO STDOUT"),
            Some(Command::Subscribe { view, snapshot: false }) if view == "My View"
        ));
        assert!(command("COPY (SUBSCRIBE v) TO '/tmp/x'").is_none());
    }
}
