//! Classification: what each statement becomes, and what is refused before any planning.

use super::*;

fn one(sql: &str) -> Result<Command, Error> {
    command(sql).map(|c| c.expect("one statement"))
}

fn kind(sql: &str) -> &'static str {
    match one(sql) {
        Ok(Command::Query(_)) => "query",
        Ok(Command::Ddl(_)) => "ddl",
        Ok(Command::Copy(_)) => "copy",
        Ok(Command::Show { .. }) => "show",
        Ok(Command::Set(_)) => "set",
        Ok(Command::Reset { .. }) => "reset",
        Ok(Command::Transaction(_)) => "transaction",
        Ok(Command::Cursor(_)) => "cursor",
        Ok(Command::Declare { .. }) => "declare",
        Ok(Command::NoOp { .. }) => "noop",
        Ok(Command::Refresh { .. }) => "refresh",
        Ok(Command::Subscribe { .. }) => "subscribe",
        Ok(Command::Alert(_)) => "alert",
        Ok(Command::Retention(_)) => "retention",
        Err(Error::Syntax(_)) => "syntax",
        Err(Error::Unsupported(_)) => "unsupported",
    }
}

#[test]
fn each_statement_has_one_command() {
    let cases = [
        ("SELECT 1", "query"),
        ("CREATE MATERIALIZED VIEW v AS SELECT date_bin(INTERVAL '1m', time) AS b, count(*) FROM t GROUP BY b", "ddl"),
        ("DROP MATERIALIZED VIEW IF EXISTS v", "ddl"),
        ("REFRESH MATERIALIZED VIEW \"My View\";", "refresh"),
        ("SHOW MATERIALIZED VIEWS", "query"),
        ("CREATE ALERT a ON (SELECT 1 AS x) EVERY '1s' NOTIFY (WEBHOOK 'http://h/x')", "alert"),
        ("drop alert a", "alert"),
        ("ALTER ALERT a PAUSE", "alert"),
        ("SHOW ALERTS", "query"),
        ("CREATE ALERT a ON (SELECT 1) EVERY '1s'", "syntax"),
        ("CREATE VIEW v AS SELECT 1", "unsupported"),
        ("select * from cpu where host = 'a'", "query"),
        ("VALUES (1), (2)", "query"),
        ("WITH t AS (SELECT 1) SELECT * FROM t", "query"),
        ("EXPLAIN ANALYZE SELECT 1", "query"),
        ("INSERT INTO cpu (host, usage) VALUES ('a', 1)", "query"),
        ("SHOW TABLES", "query"),
        ("SHOW COLUMNS FROM cpu", "query"),
        ("SHOW datafusion.execution.batch_size", "query"),
        ("SHOW server_version", "show"),
        ("SHOW TIME ZONE", "show"),
        ("SHOW transaction isolation level", "show"),
        ("SET statement_timeout = 300", "set"),
        ("SET TIME ZONE 'UTC'", "set"),
        ("SET extra_float_digits = 3", "set"),
        ("RESET ALL", "reset"),
        ("RESET statement_timeout", "reset"),
        ("CREATE DATABASE x", "ddl"),
        ("CREATE DATABASE x WITH (retention = '30d')", "retention"),
        ("ALTER DATABASE x SET retention = '7d'", "retention"),
        ("ALTER TABLE cpu RESET retention", "retention"),
        ("CREATE TABLE t (host TEXT, v DOUBLE PRECISION, PRIMARY KEY (host))", "ddl"),
        ("DROP TABLE t", "ddl"),
        ("DROP DATABASE x", "ddl"),
        ("COPY cpu TO STDOUT", "copy"),
        ("COPY (SELECT 1) TO STDOUT", "copy"),
        ("COPY cpu FROM STDIN", "copy"),
        ("BEGIN", "transaction"),
        ("START TRANSACTION", "transaction"),
        ("COMMIT", "transaction"),
        ("ROLLBACK", "transaction"),
        ("ROLLBACK TO SAVEPOINT s", "noop"),
        ("SAVEPOINT s", "noop"),
        ("RELEASE SAVEPOINT s", "noop"),
        ("DEALLOCATE p", "noop"),
        ("DISCARD ALL", "noop"),
        ("DECLARE c CURSOR FOR SELECT 1", "declare"),
        ("SET ROLE admin", "noop"),
        (r#"SHOW "datafusion.runtime.'; SELECT 1; --""#, "show"),
        ("FETCH 10 FROM c", "cursor"),
        ("CLOSE c", "cursor"),
        ("SELEC 1", "syntax"),
    ];
    for (sql, expected) in cases {
        assert_eq!(kind(sql), expected, "{sql}");
    }
}

#[test]
fn nothing_else_reaches_datafusion() {
    // Each of these would read or write server files, change the shared session, or change
    // data outside Sundial's write path if DataFusion planned it.
    let refused = [
        "CREATE SCHEMA s",
        "CREATE VIEW v AS SELECT 1",
        "CREATE EXTERNAL TABLE p (line VARCHAR) STORED AS CSV LOCATION '/etc/hostname'",
        "CREATE TABLE t AS SELECT 1",
        "CREATE TABLE t (LIKE cpu)",
        "SET datafusion.runtime.memory_limit = '100G'",
        "SET datafusion.execution.target_partitions = 64",
        "UPDATE cpu SET usage = 1",
        "DELETE FROM cpu",
        "PREPARE p AS SELECT 1",
        "EXECUTE p",
        "TRUNCATE cpu",
        "ALTER TABLE cpu ADD COLUMN x INT",
        "DROP VIEW v",
        "DROP SCHEMA public",
        "EXPLAIN CREATE VIEW v AS SELECT 1",
        "CREATE FUNCTION f() RETURNS INT AS 'select 1' LANGUAGE SQL",
        "GRANT ALL ON cpu TO public",
        "DECLARE c CURSOR FOR DELETE FROM cpu",
        "DECLARE c CURSOR FOR UPDATE cpu SET usage = 1",
    ];
    for sql in refused {
        let kind = kind(sql);
        assert!(kind == "unsupported" || kind == "syntax", "{sql}: {kind}");
    }
}

#[test]
fn several_statements_are_each_classified() {
    let parsed = commands("BEGIN; SELECT 1; COMMIT").expect("parses");
    assert_eq!(parsed.len(), 3);
    assert!(matches!(parsed[1], Command::Query(_)));
    assert!(commands("SELECT 1; CREATE SCHEMA s").is_err(), "one refused statement refuses all");
    assert!(command("SELECT 1; SELECT 2").is_err(), "one statement where one is expected");
    assert!(commands("").expect("empty").is_empty());
}
