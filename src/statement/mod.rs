//! The statement pipeline: every SQL text from every front end — the Postgres simple and
//! extended protocols, the query inside `COPY (…) TO STDOUT`, HTTP `/api/v3/query_sql` and the
//! v1 `/query` endpoint — is parsed here once (sqlparser's PostgreSQL dialect, with
//! datafusion-pg-catalog's compatibility rules) into [`Command`]s. Queries are then rewritten on
//! the AST in one ordered pass ([`rewrite`]: gap filling, the last-value cache, client catalog
//! shapes) and planned by `query::QueryEngine::plan`, which lets DataFusion plan nothing but
//! reads and `INSERT`.
//!
//! This is also the server's allowlist: only Sundial's own statements change anything. DataFusion's
//! DDL (`CREATE EXTERNAL TABLE`, `CREATE VIEW`, `CREATE SCHEMA`…), `COPY … TO 'file'`, `SET`
//! of engine options, `PREPARE`, `UPDATE`/`DELETE` and every statement not named below are
//! refused with [`Error::Unsupported`] before anything is planned.
//!
//! Text matching on SQL lives only in [`quirks`], for what clients send that sqlparser cannot
//! parse.

pub mod catalog_shapes;
pub mod quirks;
pub mod retention;

use std::sync::OnceLock;

use datafusion::sql::sqlparser::ast::{DeclareType, ObjectType, Reset, Set, SetExpr, Statement};
use datafusion::sql::sqlparser::parser::ParserError;
use datafusion_postgres::datafusion_pg_catalog::sql::PostgresCompatibilityParser;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("SQL error: {0}")]
    Syntax(#[from] ParserError),
    #[error("{0}")]
    Unsupported(String),
}

impl Error {
    pub fn kind(&self) -> crate::ErrorKind {
        match self {
            Error::Syntax(_) => crate::ErrorKind::InvalidInput,
            Error::Unsupported(_) => crate::ErrorKind::Unsupported,
        }
    }
}

/// What one statement asks Sundial to do.
#[derive(Debug, Clone)]
pub enum Command {
    /// Planned and run by DataFusion (`query::QueryEngine::plan`): `SELECT`, `VALUES`,
    /// `EXPLAIN`, `INSERT` (through the table's sink into the engine's write path), `SHOW
    /// TABLES`/`SHOW COLUMNS` and `SHOW` of DataFusion's own settings.
    Query(Box<Statement>),
    /// `CREATE DATABASE`, `CREATE TABLE`, `DROP TABLE`, `DROP DATABASE`, `CREATE
    /// MATERIALIZED VIEW`, `DROP MATERIALIZED VIEW` (`query::ddl`).
    Ddl(Box<Statement>),
    /// `CREATE DATABASE … WITH (retention = …)`, `ALTER DATABASE | TABLE … SET | RESET
    /// retention` (`query::ddl::retention`).
    Retention(retention::Statement),
    /// `CREATE ALERT`, `DROP ALERT`, `ALTER ALERT … PAUSE | RESUME` (`alerts::ddl`).
    Alert(Box<crate::alerts::sql::Statement>),
    /// `REFRESH MATERIALIZED VIEW name`: materialize the view's dirty buckets now (never
    /// needed for a right answer).
    Refresh { view: String },
    /// `COPY (SUBSCRIBE name [WITH (SNAPSHOT)]) TO STDOUT` (Postgres protocol only): a view's
    /// changes as an endless COPY.
    Subscribe { view: String, snapshot: bool },
    /// `COPY … TO STDOUT` / `COPY … FROM STDIN` (Postgres protocol only).
    Copy(Box<Statement>),
    /// `SHOW name` of a session setting.
    Show { name: String },
    /// `SET name = value`, `SET TIME ZONE …` (a connection's own settings).
    Set(Box<Statement>),
    /// `RESET name` / `RESET ALL` (`name` is `all`).
    Reset { name: String },
    /// `BEGIN`, `START TRANSACTION`, `COMMIT`, `ROLLBACK`: writes are committed as they happen
    /// and reads see snapshots, so these only move the protocol's transaction status.
    Transaction(Box<Statement>),
    /// `DECLARE name CURSOR FOR <query>` (Postgres protocol only): the query goes through
    /// `QueryEngine::plan` like any other.
    Declare { cursor: String, query: Box<Statement> },
    /// `FETCH`, `CLOSE` of a declared cursor (Postgres protocol only).
    Cursor(Box<Statement>),
    /// Statements that change nothing here and are answered with their tag: `DEALLOCATE`
    /// (psycopg's statement cache; pgwire owns prepared statements), `DISCARD ALL` (pools on
    /// check-in), savepoints (SQLAlchemy and psycopg nest transactions with them).
    NoOp { tag: &'static str },
}

/// Whether a command changes data (DDL, `INSERT`, `EXPLAIN ANALYZE INSERT`, `COPY … FROM`):
/// what a `GET` must not run and what needs write permission.
pub fn changes_data(command: &Command) -> bool {
    match command {
        Command::Ddl(_) | Command::Alert(_) | Command::Retention(_) => true,
        Command::Copy(statement) => matches!(statement.as_ref(), Statement::Copy { to: false, .. }),
        Command::Query(statement) => match statement.as_ref() {
            Statement::Insert(_) => true,
            Statement::Explain { analyze, statement, .. } => {
                *analyze && matches!(statement.as_ref(), Statement::Insert(_))
            }
            _ => false,
        },
        _ => false,
    }
}

fn parser() -> &'static PostgresCompatibilityParser {
    static PARSER: OnceLock<PostgresCompatibilityParser> = OnceLock::new();
    PARSER.get_or_init(PostgresCompatibilityParser::new)
}

/// Parses `sql` into statements, once.
pub fn parse(sql: &str) -> Result<Vec<Statement>, Error> {
    Ok(parser().parse(sql)?)
}

/// Parses and classifies every statement of `sql`. A retention statement is Sundial's own
/// (`retention`); a text sqlparser cannot parse is tried as an alert statement (Sundial's own, which sqlparser does not know) and against the client
/// quirks before its syntax error is returned.
pub fn commands(sql: &str) -> Result<Vec<Command>, Error> {
    // First: sqlparser reads some of them as other statements (`ALTER TABLE … SET (…)`).
    if let Some(statement) = retention::parse(sql) {
        return Ok(vec![Command::Retention(statement?)]);
    }
    match parse(sql) {
        Ok(statements) => statements.into_iter().map(classify).collect(),
        Err(error) => match crate::alerts::sql::parse(sql) {
            Some(alert) => Ok(vec![Command::Alert(Box::new(alert?))]),
            None => match quirks::command(sql) {
                Some(command) => Ok(vec![command]),
                None => Err(error),
            },
        },
    }
}

/// Parses `sql` when it is exactly one statement (the extended protocol and HTTP take one).
pub fn command(sql: &str) -> Result<Option<Command>, Error> {
    let mut commands = commands(sql)?;
    match commands.len() {
        0 => Ok(None),
        1 => Ok(commands.pop()),
        n => Err(Error::Unsupported(format!(
            "{n} statements were sent where one is expected; send them one at a time"
        ))),
    }
}

fn unsupported(what: &str) -> Error {
    Error::Unsupported(format!(
        "{what} is not supported: Sundial runs SELECT, EXPLAIN, INSERT, COPY … TO STDOUT / FROM \
         STDIN, CREATE DATABASE, CREATE TABLE, DROP TABLE, DROP DATABASE, CREATE / DROP / \
         REFRESH MATERIALIZED VIEW, CREATE / DROP / ALTER ALERT, SHOW, SET and RESET"
    ))
}

/// The name of a setting as sqlparser spells an object name, lowercased and unquoted.
fn setting_name(parts: impl IntoIterator<Item = String>) -> String {
    parts.into_iter().map(|p| p.to_ascii_lowercase()).collect::<Vec<_>>().join(".")
}

/// What `statement` is; anything not listed is refused.
pub fn classify(statement: Statement) -> Result<Command, Error> {
    let boxed = |s: Statement| Box::new(s);
    Ok(match statement {
        Statement::Query(_) | Statement::Insert(_) => Command::Query(boxed(statement)),
        Statement::Explain { statement: ref inner, .. } => {
            if !matches!(inner.as_ref(), Statement::Query(_) | Statement::Insert(_)) {
                return Err(unsupported(&format!("EXPLAIN of {}", statement_kind(inner))));
            }
            Command::Query(boxed(statement))
        }
        Statement::ShowTables { .. } | Statement::ShowColumns { .. } => {
            Command::Query(boxed(statement))
        }
        Statement::ShowVariable { ref variable } => {
            let name = variable.iter().map(|i| i.value.to_ascii_lowercase()).collect::<Vec<_>>();
            let name = name.join(" ");
            if name == "alerts" && variable.iter().all(|i| i.quote_style.is_none()) {
                let query = "SELECT name, paused, pending, firing, last_evaluation, last_error, \
                             definition FROM system.alert_rules ORDER BY name";
                return match parse(query)?.pop() {
                    Some(statement) => Ok(Command::Query(boxed(statement))),
                    None => Err(unsupported("SHOW ALERTS")),
                };
            }
            // DataFusion answers `SHOW datafusion.…` by building SQL from the name: only plain
            // names go there (a quoted one could carry SQL, or panic its planner).
            let plain = variable.iter().all(|i| {
                i.quote_style.is_none()
                    && i.value.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.')
            });
            let engine_setting = plain
                && variable.first().is_some_and(|i| {
                    let first = i.value.to_ascii_lowercase();
                    first == "datafusion" || first.starts_with("datafusion.")
                });
            if engine_setting || name == "all" {
                // DataFusion answers these from its settings table: a read.
                Command::Query(boxed(statement))
            } else {
                Command::Show { name }
            }
        }
        Statement::Set(ref set) => match set {
            Set::SingleAssignment { variable, .. } => {
                let name = setting_name(variable.0.iter().map(|p| p.to_string()));
                if name.starts_with("datafusion.") {
                    return Err(Error::Unsupported(format!(
                        "SET {name}: the query engine's settings are the server's, set by its \
                         flags, and one connection cannot change them for the others"
                    )));
                }
                Command::Set(boxed(statement))
            }
            Set::SetTimeZone { .. } | Set::SetNames { .. } => Command::Set(boxed(statement)),
            // One user, no roles yet (authentication comes with the security work).
            Set::SetTransaction { .. } | Set::SetRole { .. } | Set::SetSessionAuthorization(_) => {
                Command::NoOp { tag: "SET" }
            }
            _ => return Err(unsupported(&format!("{statement}"))),
        },
        Statement::Reset(reset) => Command::Reset {
            name: match reset.reset {
                Reset::ALL => "all".to_string(),
                Reset::ConfigurationParameter(name) => {
                    setting_name(name.0.iter().map(|p| p.to_string()))
                }
            },
        },
        Statement::CreateTable(ref create)
            if create.external
                || create.location.is_some()
                || create.query.is_some()
                || create.like.is_some()
                || create.clone.is_some() =>
        {
            return Err(Error::Unsupported(
                "CREATE TABLE declares a Sundial table by its columns only: no EXTERNAL, \
                 LOCATION, AS SELECT, LIKE or CLONE"
                    .into(),
            ))
        }
        Statement::CreateDatabase { .. } | Statement::CreateTable(_) => {
            Command::Ddl(boxed(statement))
        }
        Statement::Drop {
            object_type: ObjectType::Table | ObjectType::Database | ObjectType::MaterializedView,
            ..
        } => Command::Ddl(boxed(statement)),
        Statement::CreateView(ref create) if create.materialized => Command::Ddl(boxed(statement)),
        Statement::ShowViews { materialized: true, .. } => {
            let query = "SELECT name, status, definition FROM system.views ORDER BY name";
            match parse(query)?.pop() {
                Some(statement) => Command::Query(boxed(statement)),
                None => return Err(unsupported("SHOW MATERIALIZED VIEWS")),
            }
        }
        Statement::Copy { .. } => Command::Copy(boxed(statement)),
        Statement::StartTransaction { .. } | Statement::Commit { .. } => {
            Command::Transaction(boxed(statement))
        }
        Statement::Rollback { savepoint: Some(_), .. } => Command::NoOp { tag: "ROLLBACK" },
        Statement::Rollback { .. } => Command::Transaction(boxed(statement)),
        Statement::Savepoint { .. } => Command::NoOp { tag: "SAVEPOINT" },
        Statement::ReleaseSavepoint { .. } => Command::NoOp { tag: "RELEASE" },
        Statement::Deallocate { .. } => Command::NoOp { tag: "DEALLOCATE" },
        Statement::Discard { .. } => Command::NoOp { tag: "DISCARD ALL" },
        Statement::Declare { mut stmts } => {
            let declare = match stmts.pop() {
                Some(d) if stmts.is_empty() && d.declare_type == Some(DeclareType::Cursor) => d,
                _ => return Err(unsupported("DECLARE of anything but one cursor")),
            };
            match (declare.names.as_slice(), declare.for_query) {
                ([name], Some(query)) if !writes(&query.body) => Command::Declare {
                    cursor: name.value.clone(),
                    query: Box::new(Statement::Query(query)),
                },
                _ => return Err(unsupported("DECLARE without one name and a FOR query")),
            }
        }
        Statement::Fetch { .. } | Statement::Close { .. } => Command::Cursor(boxed(statement)),
        other => return Err(unsupported(&statement_kind(&other))),
    })
}

/// Whether a query's body is an `INSERT`, `UPDATE`, `DELETE` or `MERGE` (sqlparser reads those
/// as queries after `WITH` or inside `DECLARE … CURSOR FOR`).
pub(crate) fn writes(body: &SetExpr) -> bool {
    match body {
        SetExpr::Insert(_) | SetExpr::Update(_) | SetExpr::Delete(_) | SetExpr::Merge(_) => true,
        SetExpr::Query(query) => writes(&query.body),
        SetExpr::SetOperation { left, right, .. } => writes(left) || writes(right),
        _ => false,
    }
}

/// A statement's leading words (`CREATE EXTERNAL TABLE`, `UPDATE`), for messages.
fn statement_kind(statement: &Statement) -> String {
    let text = statement.to_string();
    let words: Vec<&str> = text.split_whitespace().take(3).collect();
    let keep = words
        .iter()
        .take_while(|w| w.chars().all(|c| c.is_ascii_uppercase() || c == '_'))
        .count()
        .max(1);
    words[..keep.min(words.len())].join(" ")
}

/// What the rewrites need to know about the database a query runs in.
pub struct RewriteContext<'a> {
    pub catalog: &'a crate::catalog::Catalog,
    pub db: &'a str,
}

/// Sundial's rewrites of a query, in order, on the AST: gap filling (`date_bin_gapfill`), the
/// last-value cache for "last point per series" queries, then client catalog shapes that
/// DataFusion cannot plan as sent.
pub fn rewrite(statement: &mut Statement, context: &RewriteContext<'_>) -> Result<(), Error> {
    crate::query::gapfill::rewrite(statement).map_err(Error::Unsupported)?;
    crate::query::last_cache::rewrite(statement, context.catalog, context.db);
    catalog_shapes::rewrite(statement);
    Ok(())
}

#[cfg(test)]
mod tests;
