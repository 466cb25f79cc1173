//! Postgres wire protocol: psql, drivers and BI tools talk SQL to Sundial on port 5433.
//!
//! Built on `datafusion-postgres` (pgwire + arrow-pg type encoding + datafusion-pg-catalog's
//! `pg_catalog` and functions). What Sundial adds: the connection's database name selects a
//! Sundial database (each has its own DataFusion session from `query`), a connection to a
//! database that does not exist fails with 3D000, every statement goes through the statement
//! pipeline (`crate::statement`) on both protocols alike, and every error carries a real
//! SQLSTATE — this module is the only place that knows SQLSTATEs ([`sqlstate`] names them,
//! [`sqlstate_of_kind`] maps error kinds exhaustively, [`sqlstate_of`] DataFusion's errors by
//! variant).
//!
//! Queries are planned here (simple protocol) or at Parse (extended protocol) by
//! `QueryEngine::plan`; datafusion-postgres then binds parameters, runs and encodes them. Its
//! hooks handle cursors and transaction status only: `SET` and `SHOW` are Sundial's
//! (`session`), so no connection can change a setting of the shared DataFusion session.

mod copy;
mod functions;
mod session;
pub mod sqlstate;
#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::fmt::Debug;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use datafusion::error::DataFusionError;
use datafusion::logical_expr::LogicalPlan;
use datafusion::prelude::SessionContext;
use datafusion::sql::sqlparser::ast::Statement as SqlStatement;
use datafusion_postgres::hooks::cursor::CursorStatementHook;
use datafusion_postgres::hooks::transactions::TransactionStatementHook;
use datafusion_postgres::hooks::HookClient;
use datafusion_postgres::pgwire;
use datafusion_postgres::{DfSessionService, Parser, QueryHook};
use futures::{Sink, SinkExt};
use pgwire::api::auth::StartupHandler;
use pgwire::api::copy::CopyHandler;
use pgwire::api::portal::{Format, Portal};
use pgwire::api::query::{ExtendedQueryHandler, SimpleQueryHandler};
use pgwire::api::results::{FieldInfo, Response, Tag};
use pgwire::api::stmt::{QueryParser, StoredStatement};
use pgwire::api::store::PortalStore;
use pgwire::api::{
    ClientInfo, ClientPortalStore, ConnectionManager, PgWireServerHandlers, Type, METADATA_DATABASE,
};
use pgwire::error::{ErrorInfo, PgWireError, PgWireResult};
use pgwire::messages::copy::{CopyData, CopyDone, CopyFail};
use pgwire::messages::response::TransactionStatus;
use pgwire::messages::PgWireBackendMessage;
use pgwire::types::format::FormatOptions;
use tokio_util::sync::CancellationToken;

use crate::query::QueryEngine;
use crate::statement::{self, Command};
use crate::ErrorKind;
use sqlstate::SqlState;

/// The exhaustive map from error kinds to SQLSTATE classes.
pub fn sqlstate_of_kind(kind: ErrorKind) -> SqlState {
    match kind {
        ErrorKind::InvalidInput => SqlState::InvalidParameterValue,
        ErrorKind::NotFound => SqlState::UndefinedTable,
        ErrorKind::AlreadyExists => SqlState::DuplicateTable,
        ErrorKind::ObjectInUse => SqlState::ObjectInUse,
        ErrorKind::Unsupported => SqlState::FeatureNotSupported,
        ErrorKind::ResourceExhausted => SqlState::OutOfMemory,
        ErrorKind::Unavailable => SqlState::CannotConnectNow,
        ErrorKind::Internal => SqlState::InternalError,
    }
}

/// The SQLSTATE of a DataFusion error, by its variant and structured fields. Missing tables
/// and functions are found by the statement pipeline before DataFusion words them
/// (`query::Error::UndefinedTable`, `UndefinedFunction`).
pub fn sqlstate_of(error: &DataFusionError) -> SqlState {
    use arrow::error::ArrowError;
    use datafusion::common::SchemaError;
    match error.find_root() {
        DataFusionError::SQL(..) => SqlState::SyntaxError,
        DataFusionError::SchemaError(e, _) => match **e {
            SchemaError::FieldNotFound { .. } => SqlState::UndefinedColumn,
            SchemaError::AmbiguousReference { .. } => SqlState::UndefinedColumn,
            _ => SqlState::SyntaxError,
        },
        DataFusionError::NotImplemented(_) => SqlState::FeatureNotSupported,
        DataFusionError::ResourcesExhausted(_) => SqlState::OutOfMemory,
        DataFusionError::ArrowError(e, _) => match **e {
            ArrowError::DivideByZero => SqlState::DivisionByZero,
            ArrowError::CastError(_) | ArrowError::ParseError(_) => {
                SqlState::InvalidTextRepresentation
            }
            ArrowError::ComputeError(_) | ArrowError::InvalidArgumentError(_) => {
                SqlState::InvalidParameterValue
            }
            _ => SqlState::InternalError,
        },
        // A plan DataFusion refuses for its types (no coercion, no function signature): the
        // only plan errors left once the pipeline has checked tables and functions.
        DataFusionError::Plan(_) => SqlState::DatatypeMismatch,
        // Sundial's own errors raised inside DataFusion (a table function's missing table).
        DataFusionError::External(e) => match e.downcast_ref::<crate::query::Error>() {
            Some(crate::query::Error::UndefinedTable(_)) => SqlState::UndefinedTable,
            Some(crate::query::Error::UndefinedFunction(_)) => SqlState::UndefinedFunction,
            _ => match e.downcast_ref::<crate::views::Error>() {
                Some(view) => crate::views::sqlstate_of(view),
                None => SqlState::InternalError,
            },
        },
        DataFusionError::Execution(_) => SqlState::InvalidParameterValue,
        _ => SqlState::InternalError,
    }
}

fn user_error(state: SqlState, message: impl Into<String>) -> PgWireError {
    PgWireError::UserError(Box::new(ErrorInfo::new(
        "ERROR".to_string(),
        state.code().to_string(),
        message.into(),
    )))
}

/// Gives errors from datafusion-postgres a proper SQLSTATE; pgwire would send XX000.
fn with_sqlstate(error: PgWireError) -> PgWireError {
    match error {
        PgWireError::ApiError(inner) => match inner.downcast::<DataFusionError>() {
            Ok(df) => {
                let df = *df;
                user_error(sqlstate_of(&df), df.to_string())
            }
            Err(other) => match other.downcast::<crate::query::Error>() {
                Ok(q) => query_error(&q),
                Err(other) => {
                    match other.downcast::<datafusion::sql::sqlparser::parser::ParserError>() {
                        Ok(parse) => user_error(SqlState::SyntaxError, parse.to_string()),
                        Err(other) => user_error(SqlState::InternalError, other.to_string()),
                    }
                }
            },
        },
        other => other,
    }
}

/// Errors can also surface while rows stream out (division by zero, a failed cast): give
/// those their SQLSTATE too.
fn with_sqlstate_in_rows(response: Response) -> Response {
    use futures::StreamExt;
    match response {
        Response::Query(mut query) => {
            let rows = std::mem::replace(&mut query.data_rows, Box::pin(futures::stream::empty()));
            query.data_rows = Box::pin(rows.map(|row| row.map_err(with_sqlstate)));
            Response::Query(query)
        }
        other => other,
    }
}

fn sqlstate_of_ddl(error: &crate::query::ddl::Error) -> SqlState {
    match error {
        crate::query::ddl::Error::NotFound { what: "database", .. }
        | crate::query::ddl::Error::Engine(crate::engine::Error::DatabaseNotFound(_)) => {
            SqlState::InvalidCatalogName
        }
        crate::query::ddl::Error::DatabaseExists(_) => SqlState::DuplicateDatabase,
        crate::query::ddl::Error::Dependent { .. } => SqlState::DependentObjectsStillExist,
        crate::query::ddl::Error::Query(e) => sqlstate_of_query(e),
        other => sqlstate_of_kind(other.kind()),
    }
}

fn sqlstate_of_statement(error: &statement::Error) -> SqlState {
    match error {
        statement::Error::Syntax(_) => SqlState::SyntaxError,
        statement::Error::Unsupported(_) => SqlState::FeatureNotSupported,
    }
}

fn statement_error(error: statement::Error) -> PgWireError {
    user_error(sqlstate_of_statement(&error), error.to_string())
}

fn query_error(error: &crate::query::Error) -> PgWireError {
    user_error(sqlstate_of_query(error), error.to_string())
}

pub(crate) fn sqlstate_of_query(error: &crate::query::Error) -> SqlState {
    match error {
        crate::query::Error::DatabaseNotFound(_) => SqlState::InvalidCatalogName,
        crate::query::Error::DataFusion(e) => sqlstate_of(e),
        crate::query::Error::Unsupported(_) => SqlState::FeatureNotSupported,
        crate::query::Error::Statement(e) => sqlstate_of_statement(e),
        crate::query::Error::UndefinedTable(_) => SqlState::UndefinedTable,
        crate::query::Error::UndefinedFunction(_) => SqlState::UndefinedFunction,
    }
}

/// Whether `command` is refused because an earlier statement of the transaction failed (as
/// PostgreSQL does until `COMMIT` or `ROLLBACK`). Savepoint commands and session settings go
/// through: pgwire keeps the failed status until the transaction ends (it has no way back
/// for `ROLLBACK TO SAVEPOINT`), and psycopg's and SQLAlchemy's nested transactions send
/// `ROLLBACK TO …; RELEASE …` in that state.
fn in_failed_transaction<C: ClientInfo>(client: &C, command: &Command) -> bool {
    client.transaction_status() == TransactionStatus::Error
        && matches!(
            command,
            Command::Query(_)
                | Command::Ddl(_)
                | Command::Retention(_)
                | Command::Refresh { .. }
                | Command::Alert(_)
                | Command::Subscribe { .. }
                | Command::Copy(_)
                | Command::Declare { .. }
                | Command::Cursor(_)
        )
}

fn failed_transaction() -> PgWireError {
    user_error(
        SqlState::InFailedSqlTransaction,
        "current transaction is aborted, commands ignored until end of transaction block",
    )
}

/// The hooks of datafusion-postgres that Sundial keeps: cursors (FETCH, CLOSE) and
/// transaction status.
fn hooks() -> Vec<Arc<dyn QueryHook>> {
    vec![Arc::new(CursorStatementHook), Arc::new(TransactionStatementHook)]
}

/// One DataFusion-backed session service per database, with `pg_catalog` installed.
struct Databases {
    query: Arc<QueryEngine>,
    services: Mutex<HashMap<String, (SessionContext, Arc<DfSessionService>)>>,
    /// Describes statements; that needs only the plan, never a database.
    describer: Arc<Parser>,
}

impl Databases {
    fn service(&self, db: &str) -> PgWireResult<(SessionContext, Arc<DfSessionService>)> {
        if !self.query.engine().catalog().has_database(db) {
            return Err(user_error(
                SqlState::InvalidCatalogName,
                format!("database \"{db}\" does not exist"),
            ));
        }
        if let Some(service) = self.services.lock().expect("pg services lock").get(db) {
            return Ok(service.clone());
        }
        let ctx = self.query.context(db).map_err(|e| query_error(&e))?;
        datafusion_postgres::datafusion_pg_catalog::pg_catalog::setup_pg_catalog(
            &ctx,
            db,
            datafusion_postgres::datafusion_pg_catalog::pg_catalog::context::EmptyContextProvider,
        )
        .map_err(|e| user_error(SqlState::InternalError, format!("setting up pg_catalog: {e}")))?;
        functions::register(&ctx);
        let service = Arc::new(DfSessionService::new_with_hooks(Arc::new(ctx.clone()), hooks()));
        let entry = (ctx, service);
        self.services
            .lock()
            .expect("pg services lock")
            .entry(db.to_string())
            .or_insert(entry.clone());
        Ok(entry)
    }

    fn for_client<C: ClientInfo>(
        &self,
        client: &C,
    ) -> PgWireResult<(SessionContext, Arc<DfSessionService>)> {
        self.service(&database(client))
    }
}

/// The database the connection is to.
fn database<C: ClientInfo + ?Sized>(client: &C) -> String {
    client.metadata().get(METADATA_DATABASE).cloned().unwrap_or_default()
}

type Statement = <DfSessionService as ExtendedQueryHandler>::Statement;

/// The query handlers: find the connection's database, run the statement pipeline, attach
/// SQLSTATEs.
pub struct Handler {
    databases: Arc<Databases>,
    parser: Arc<DatabaseParser>,
    running: Arc<session::RunningQueries>,
    /// `None`: authentication is off.
    tokens: Option<Arc<crate::auth::Tokens>>,
}

pub struct DatabaseParser {
    databases: Arc<Databases>,
}

/// The plan a statement that Sundial answers itself is described with: no columns, or the one
/// column of a `SHOW`.
fn described_plan(command: &Command) -> PgWireResult<LogicalPlan> {
    use datafusion::arrow::datatypes::{DataType, Field, Schema};
    use datafusion::common::ToDFSchema;
    let fields = match command {
        Command::Show { name } => {
            vec![Field::new(session::show_column(name), DataType::Utf8, false)]
        }
        _ => Vec::new(),
    };
    let schema =
        Schema::new(fields).to_dfschema().map_err(|e| PgWireError::ApiError(Box::new(e)))?;
    Ok(LogicalPlan::EmptyRelation(datafusion::logical_expr::EmptyRelation {
        produce_one_row: matches!(command, Command::Show { .. }),
        schema: Arc::new(schema),
    }))
}

#[async_trait]
impl QueryParser for DatabaseParser {
    type Statement = Statement;

    async fn parse_sql<C>(
        &self,
        client: &C,
        sql: &str,
        _types: &[Option<Type>],
    ) -> PgWireResult<Option<Self::Statement>>
    where
        C: ClientInfo + Unpin + Send + Sync,
    {
        let mut statements = match statement::parse(sql) {
            Ok(statements) => statements,
            // Answered when the portal runs (`Handler::run_portal`).
            // Sundial's own statements sqlparser does not know (alerts) and client quirks.
            Err(_) if crate::alerts::sql::parse(sql).is_some_and(|a| a.is_ok()) => {
                return Ok(Some((sql.to_string(), None)))
            }
            Err(_) if crate::alerts::sql::parse(sql).is_some() => {
                return Err(statement_error(statement::command(sql).err().unwrap_or_else(|| {
                    statement::Error::Unsupported("not an alert statement".into())
                })))
            }
            Err(_) if statement::quirks::command(sql).is_some() => {
                return Ok(Some((sql.to_string(), None)))
            }
            Err(error) => return Err(statement_error(error)),
        };
        let parsed = match statements.len() {
            0 => return Ok(None),
            1 => statements.remove(0),
            n => {
                return Err(user_error(
                    SqlState::SyntaxError,
                    format!("cannot insert {n} commands into a prepared statement"),
                ))
            }
        };
        let command = statement::classify(parsed.clone()).map_err(statement_error)?;
        let plan = match command {
            Command::Query(query) => {
                let (ctx, _) = self.databases.for_client(client)?;
                self.databases
                    .query
                    .plan(&ctx, &database(client), *query)
                    .await
                    .map_err(|e| query_error(&e))?
            }
            Command::Cursor(_) | Command::Transaction(_) => {
                let (ctx, _) = self.databases.for_client(client)?;
                let mut planned = None;
                for hook in hooks() {
                    planned = hook.handle_extended_parse_query(&parsed, &ctx, client).await;
                    if planned.is_some() {
                        break;
                    }
                }
                match planned {
                    Some(plan) => plan.map_err(with_sqlstate)?,
                    None => described_plan(&command)?,
                }
            }
            other => described_plan(&other)?,
        };
        Ok(Some((sql.to_string(), Some((parsed, plan)))))
    }

    fn get_parameter_types(&self, stmt: &Self::Statement) -> PgWireResult<Vec<Type>> {
        self.databases.describer.get_parameter_types(stmt).map_err(with_sqlstate)
    }

    fn get_result_schema(
        &self,
        stmt: &Self::Statement,
        column_format: Option<&Format>,
    ) -> PgWireResult<Vec<FieldInfo>> {
        self.databases.describer.get_result_schema(stmt, column_format).map_err(with_sqlstate)
    }
}

/// COPY FROM data is rendered this many rows at a time…
const COPY_ROWS_PER_RENDER: usize = 8192;
/// …and written in WAL records of about this many bytes of line protocol.
const COPY_RECORD_BYTES: usize = 8 << 20;

/// A connection's `COPY … FROM STDIN` in progress (a session extension).
#[derive(Default)]
struct CopyInProgress(Mutex<Option<CopyInState>>);

struct CopyInState {
    db: String,
    copy: copy::CopyIn,
    data: Vec<u8>,
    /// The first error; later data is ignored and the error is reported at CopyDone, since the
    /// client keeps sending until then.
    error: Option<copy::InputError>,
}

#[async_trait]
impl CopyHandler for Handler {
    async fn on_copy_data<C>(&self, client: &mut C, copy_data: CopyData) -> PgWireResult<()>
    where
        C: ClientInfo + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        let bytes_max = self.databases.query.engine().config().wal_record_bytes_max;
        let progress = client.session_extensions().get_or_insert_with(CopyInProgress::default);
        let mut guard = progress.0.lock().expect("copy state lock");
        if let Some(state) = guard.as_mut() {
            if state.error.is_none() {
                if state.data.len() + copy_data.data.len() > bytes_max {
                    state.error = Some(copy::InputError {
                        sqlstate: SqlState::ProgramLimitExceeded,
                        message: format!("COPY data exceeds {bytes_max} bytes; split it into several COPY statements"),
                    });
                    state.data = Vec::new();
                } else {
                    state.data.extend_from_slice(&copy_data.data);
                }
            }
        }
        Ok(())
    }

    async fn on_copy_done<C>(&self, client: &mut C, _done: CopyDone) -> PgWireResult<()>
    where
        C: ClientInfo + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        let progress = client.session_extensions().get_or_insert_with(CopyInProgress::default);
        let state = progress.0.lock().expect("copy state lock").take();
        let Some(state) = state else {
            return Err(user_error(
                SqlState::ProtocolViolation,
                "CopyDone without a COPY FROM STDIN in progress",
            ));
        };
        let rows = self.finish_copy_in(state).await?;
        let tag = pgwire::api::results::Tag::new("COPY").with_rows(rows);
        client.send(PgWireBackendMessage::CommandComplete(tag.into())).await?;
        Ok(())
    }

    async fn on_copy_fail<C>(&self, client: &mut C, fail: CopyFail) -> PgWireError
    where
        C: ClientInfo + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        let progress = client.session_extensions().get_or_insert_with(CopyInProgress::default);
        progress.0.lock().expect("copy state lock").take();
        user_error(SqlState::QueryCanceled, format!("COPY from stdin failed: {}", fail.message))
    }
}

/// 42501 unless the connection's user may run `command` in its database.
fn permitted<C: ClientInfo>(
    client: &C,
    tokens: Option<&crate::auth::Tokens>,
    command: &Command,
) -> PgWireResult<()> {
    let who = session::principal(client, tokens);
    let needs = crate::auth::need(command, &database(client));
    match who.lacks(&needs) {
        None => Ok(()),
        Some(need) => Err(user_error(
            SqlState::InsufficientPrivilege,
            format!("user \"{}\" lacks {need}", who.name),
        )),
    }
}

impl Handler {
    /// Runs one command of the pipeline that Sundial answers itself or plans here, on either
    /// protocol (the extended protocol hands its queries, cursors and transactions to
    /// datafusion-postgres, which binds their parameters).
    async fn execute<C>(&self, client: &mut C, command: Command) -> PgWireResult<Response>
    where
        C: ClientInfo + ClientPortalStore + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::PortalStore: PortalStore,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        if in_failed_transaction(client, &command) {
            return Err(failed_transaction());
        }
        permitted(client, self.tokens.as_deref(), &command)?;
        match command {
            Command::Query(query) => self.run_query(client, *query).await,
            Command::Declare { cursor, query } => self.declare(client, cursor, *query).await,
            Command::Ddl(ddl) => {
                crate::query::ddl::execute(&self.databases.query, &database(client), *ddl)
                    .await
                    .map(|tag| Response::Execution(Tag::new(tag)))
                    .map_err(|e| user_error(sqlstate_of_ddl(&e), e.to_string()))
            }
            Command::Retention(statement) => {
                crate::query::ddl::retention(&self.databases.query, &database(client), statement)
                    .await
                    .map(|tag| Response::Execution(Tag::new(tag)))
                    .map_err(|e| user_error(sqlstate_of_ddl(&e), e.to_string()))
            }
            Command::Copy(copy) => self.copy(client, copy::from_statement(*copy)).await,
            Command::Show { name } => session::show(client, &name),
            Command::Set(set) => session::set(client, &set).await,
            Command::Reset { name } => session::reset(client, &name),
            Command::Transaction(statement) | Command::Cursor(statement) => {
                let (ctx, _) = self.databases.for_client(client)?;
                for hook in hooks() {
                    if let Some(response) = hook.handle_simple_query(&statement, &ctx, client).await
                    {
                        return response;
                    }
                }
                Err(user_error(SqlState::FeatureNotSupported, format!("{statement}")))
            }
            Command::NoOp { tag } => Ok(Response::Execution(Tag::new(tag))),
            Command::Subscribe { view, snapshot } => self.subscribe(client, &view, snapshot).await,
            Command::Alert(statement) => {
                crate::alerts::ddl::execute(&self.databases.query, &database(client), *statement)
                    .await
                    .map(|tag| Response::Execution(Tag::new(tag)))
                    .map_err(|e| user_error(crate::alerts::sqlstate_of(&e), e.to_string()))
            }
            Command::Refresh { view } => {
                let query = &self.databases.query;
                query
                    .views()
                    .refresh_now(query, &database(client), &view)
                    .await
                    .map(|()| Response::Execution(Tag::new("REFRESH MATERIALIZED VIEW")))
                    .map_err(|e| user_error(crate::views::sqlstate_of(&e), e.to_string()))
            }
        }
    }

    /// `DECLARE name CURSOR FOR <query>`: the query is planned like any other and its rows wait
    /// in a cursor portal for `FETCH` (datafusion-postgres's cursor hook answers FETCH/CLOSE).
    async fn declare<C>(
        &self,
        client: &mut C,
        cursor: String,
        query: SqlStatement,
    ) -> PgWireResult<Response>
    where
        C: ClientInfo + ClientPortalStore + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::PortalStore: PortalStore,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        let (ctx, _) = self.databases.for_client(client)?;
        let db = database(client);
        let text = query.to_string();
        let running = self.running.start(&*client);
        let engine = &self.databases.query;
        let df = running
            .guard(async {
                let plan = engine.plan(&ctx, &db, query).await.map_err(|e| query_error(&e))?;
                ctx.execute_logical_plan(plan)
                    .await
                    .map_err(|e| user_error(sqlstate_of(&e), e.to_string()))
            })
            .await?;
        let rows = datafusion_postgres::arrow_pg::datatypes::df::encode_dataframe(
            df,
            &Format::UnifiedText,
            None,
        )
        .await
        .map_err(with_sqlstate)?;
        let stored = Arc::new(StoredStatement::new(cursor.clone(), (text, None), vec![]));
        let portal = Portal::new_cursor(cursor, stored);
        portal.start(rows).await;
        HookClient::portal_store(client).put_portal(Arc::new(portal));
        Ok(Response::Execution(Tag::new("DECLARE CURSOR")))
    }

    /// Plans and runs a query of the simple protocol, guarded by the session's statement
    /// timeout and CancelRequest while it plans and while its rows stream.
    async fn run_query<C>(&self, client: &C, query: SqlStatement) -> PgWireResult<Response>
    where
        C: ClientInfo + Send + Sync,
    {
        let (ctx, _) = self.databases.for_client(client)?;
        let db = database(client);
        let is_insert = matches!(query, SqlStatement::Insert(_));
        let running = self.running.start(client);
        let engine = &self.databases.query;
        let planned = running.guard(async {
            let plan = engine.plan(&ctx, &db, query).await.map_err(|e| query_error(&e))?;
            ctx.execute_logical_plan(plan)
                .await
                .map_err(|e| user_error(sqlstate_of(&e), e.to_string()))
        });
        let df = planned.await?;
        let outcome = if is_insert {
            // Not cancelled or timed out once it writes: its answer says what was stored (a
            // 57014 after rows were written would be a lie; there is no rollback).
            let batches =
                df.collect().await.map_err(|e| user_error(sqlstate_of(&e), e.to_string()))?;
            let rows = batches
                .first()
                .and_then(|b| b.column_by_name("count"))
                .and_then(|c| c.as_any().downcast_ref::<arrow::array::UInt64Array>())
                .map_or(0, |counts| counts.value(0) as usize);
            Err(rows)
        } else {
            Ok(df)
        };
        match outcome {
            Ok(df) => {
                let options = Arc::new(FormatOptions::from_client_metadata(client.metadata()));
                let encoded = datafusion_postgres::arrow_pg::datatypes::df::encode_dataframe(
                    df,
                    &Format::UnifiedText,
                    Some(options),
                )
                .await
                .map_err(with_sqlstate)?;
                Ok(running.guard_rows(with_sqlstate_in_rows(Response::Query(encoded))))
            }
            Err(rows) => Ok(Response::Execution(Tag::new("INSERT").with_oid(0).with_rows(rows))),
        }
    }

    /// Answers a `COPY` statement on either protocol.
    async fn copy<C: ClientInfo + Send + Sync>(
        &self,
        client: &C,
        copy: Result<copy::Copy, String>,
    ) -> PgWireResult<Response> {
        match copy.map_err(|message| user_error(SqlState::FeatureNotSupported, message))? {
            copy::Copy::Out(out) => self.copy_out(client, out).await,
            copy::Copy::In(copy_in) => self.copy_in(client, copy_in),
        }
    }

    /// Starts a `COPY … FROM STDIN`: the data arrives through [`CopyHandler`].
    fn copy_in<C: ClientInfo>(&self, client: &C, copy: copy::CopyIn) -> PgWireResult<Response> {
        let db = client.metadata().get(METADATA_DATABASE).cloned().unwrap_or_default();
        let Some(table) = self.databases.query.engine().catalog().table(&db, &copy.table).cloned()
        else {
            return Err(user_error(
                SqlState::UndefinedTable,
                format!("relation \"{}\" does not exist", copy.table),
            ));
        };
        let columns = if copy.columns.is_empty() {
            table.arrow_schema().fields().len()
        } else {
            copy.columns.len()
        };
        let progress = client.session_extensions().get_or_insert_with(CopyInProgress::default);
        *progress.0.lock().expect("copy state lock") =
            Some(CopyInState { db, copy, data: Vec::new(), error: None });
        Ok(Response::CopyIn(pgwire::api::results::CopyResponse::new(
            0,
            columns,
            futures::stream::empty(),
        )))
    }

    /// Checks and stores the rows of a finished `COPY … FROM STDIN`; returns how many.
    async fn finish_copy_in(&self, state: CopyInState) -> PgWireResult<usize> {
        if let Some(error) = state.error {
            return Err(user_error(error.sqlstate, error.message));
        }
        let engine = self.databases.query.engine();
        let Some(table) = engine.catalog().table(&state.db, &state.copy.table).cloned() else {
            return Err(user_error(
                SqlState::UndefinedTable,
                format!("relation \"{}\" does not exist", state.copy.table),
            ));
        };
        let batch = copy::to_batch(&state.copy, &table, &state.data)
            .map_err(|e| user_error(e.sqlstate, e.message))?;
        drop(state.data);
        let default_time_ns = engine.clock().now_ns();
        // Render everything first, so a bad row stores nothing; then write in bounded records.
        let mut chunks = Vec::new();
        let mut text = String::new();
        for offset in (0..batch.num_rows()).step_by(COPY_ROWS_PER_RENDER) {
            let rows = batch.slice(offset, COPY_ROWS_PER_RENDER.min(batch.num_rows() - offset));
            crate::query::insert::render(&table, &rows, default_time_ns, &mut text)
                .map_err(|e| user_error(SqlState::InvalidParameterValue, e.to_string()))?;
            if text.len() >= COPY_RECORD_BYTES {
                chunks.push(std::mem::take(&mut text));
            }
        }
        chunks.push(text);
        let mut stored = 0;
        let options = crate::engine::WriteOptions {
            precision: crate::line_protocol::Precision::Nanosecond,
            accept_partial: false,
            no_sync: false,
            default_time_ns,
        };
        for chunk in chunks.iter().filter(|c| !c.is_empty()) {
            let outcome = engine.write_lp(&state.db, chunk.as_bytes(), options).await.map_err(
                |e| match e {
                    crate::engine::Error::Rejected(rejected) => {
                        let reasons: Vec<_> =
                            rejected.lines.iter().map(|l| l.error_message.clone()).collect();
                        user_error(
                            SqlState::InvalidParameterValue,
                            format!(
                                "COPY rejected, {}: {}",
                                rejected.summary(),
                                reasons.join("; ")
                            ),
                        )
                    }
                    other => user_error(sqlstate_of_kind(other.kind()), other.to_string()),
                },
            )?;
            stored += outcome.lines_stored;
        }
        Ok(stored)
    }

    /// Runs the query of a `COPY … TO STDOUT` through the statement pipeline (so gap filling
    /// and the last-value cache apply as anywhere) and streams its rows, one `CopyData` per
    /// line.
    /// `COPY (SUBSCRIBE view) TO STDOUT`: the view's change feed as COPY text rows — the change
    /// id, the kind (`snapshot`, `upsert`, `delete`) and the view's columns — until the client
    /// cancels or goes away; a rebuilt view or a client too slow ends it with an error.
    ///
    /// The messages are sent here, each flushed as it is ready (pgwire would buffer a COPY's
    /// rows until it ends): CopyOutResponse, CopyData per row, CopyDone, then the COPY tag.
    async fn subscribe<C>(
        &self,
        client: &mut C,
        view: &str,
        snapshot: bool,
    ) -> PgWireResult<Response>
    where
        C: ClientInfo + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        use crate::views::changes::{ChangeId, Event};
        use futures::StreamExt;
        let query = &self.databases.query;
        let db = database(client);
        let subscription = query
            .views()
            .subscribe(query, &db, view, None)
            .await
            .map_err(|e| user_error(crate::views::sqlstate_of(&e), e.to_string()))?;
        let schema = query
            .views()
            .get(&db, view)
            .and_then(|v| v.schema())
            .ok_or_else(|| user_error(SqlState::UndefinedTable, format!("no view {view}")))?;
        let columns: Vec<String> = schema.fields().iter().map(|f| f.name().clone()).collect();
        let line =
            move |id: ChangeId, kind: &str, row: &serde_json::Map<String, serde_json::Value>| {
                let mut fields = vec![id.to_string(), kind.to_string()];
                fields.extend(columns.iter().map(|c| copy::text_value(row.get(c))));
                let mut text = fields.join("\t");
                text.push('\n');
                Ok(pgwire::messages::copy::CopyData::new(bytes::Bytes::from(text)))
            };
        let crate::views::changes::Subscription { snapshot: rows, live, guard, .. } = subscription;
        let mut first = Vec::new();
        if let (true, Some((id, batches))) = (snapshot, rows) {
            for batch in &batches {
                for row in crate::views::changes::json_rows(batch).unwrap_or_default() {
                    first.push(line(id, "snapshot", &row));
                }
            }
        }
        let running = self.running.start(client);
        let changes = futures::stream::unfold(
            Some((live, guard, running, line.clone())),
            |state| async move {
                let (mut live, guard, running, line) = state?;
                let set = tokio::select! {
                    set = live.recv() => set,
                    error = running.stopped() => return Some((vec![Err(error)], None)),
                };
                let set = match set {
                    Ok(set) => set,
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                        let message = format!(
                            "subscriber too slow: {n} change sets were not read in time; \
                             subscribe again"
                        );
                        return Some((
                            vec![Err(user_error(SqlState::ProgramLimitExceeded, message))],
                            None,
                        ));
                    }
                    Err(_) => return None,
                };
                let mut lines = Vec::new();
                for event in &set.events {
                    match event {
                        Event::Upsert(row) => lines.push(line(set.id, "upsert", row)),
                        Event::Delete(row) => lines.push(line(set.id, "delete", row)),
                        Event::Reset => {
                            let message = "the view was rebuilt from scratch; subscribe again";
                            lines.push(Err(user_error(
                                SqlState::ObjectNotInPrerequisiteState,
                                message,
                            )));
                            return Some((lines, None));
                        }
                    }
                }
                Some((lines, Some((live, guard, running, line))))
            },
        )
        .flat_map(futures::stream::iter);
        use pgwire::messages::copy::{CopyDone, CopyOutResponse};
        let columns = schema.fields().len() + 2;
        let start = CopyOutResponse::new(0, columns as i16, vec![0; columns]);
        client.send(PgWireBackendMessage::CopyOutResponse(start)).await?;
        let mut rows = futures::stream::iter(first).chain(changes).boxed();
        let mut sent = 0usize;
        while let Some(row) = rows.next().await {
            client.send(PgWireBackendMessage::CopyData(row?)).await?;
            sent += 1;
        }
        client.send(PgWireBackendMessage::CopyDone(CopyDone::new())).await?;
        Ok(Response::Execution(Tag::new("COPY").with_rows(sent)))
    }

    async fn copy_out<C: ClientInfo + Send + Sync>(
        &self,
        client: &C,
        copy: copy::CopyOut,
    ) -> PgWireResult<Response> {
        let (ctx, _) = self.databases.for_client(client)?;
        let db = database(client);
        let running = self.running.start(client);
        let engine = &self.databases.query;
        let (schema, batches) = running
            .guard(async {
                let plan =
                    engine.plan(&ctx, &db, *copy.query).await.map_err(|e| query_error(&e))?;
                let df = ctx
                    .execute_logical_plan(plan)
                    .await
                    .map_err(|e| user_error(sqlstate_of(&e), e.to_string()))?;
                let schema = df.schema().inner().clone();
                let batches =
                    df.collect().await.map_err(|e| user_error(sqlstate_of(&e), e.to_string()))?;
                Ok((schema, batches))
            })
            .await?;
        let text = copy::render(&copy.format, &schema, &batches)
            .map_err(|e| user_error(SqlState::InternalError, e.to_string()))?;
        // The completion tag counts CopyData messages, so a header line rides with the first row.
        let mut lines: Vec<&[u8]> = text.split_inclusive(|&b| b == b'\n').collect();
        let header_and_first: Vec<u8>;
        if copy.format.header && lines.len() >= 2 {
            header_and_first = [lines[0], lines[1]].concat();
            lines.splice(0..2, [header_and_first.as_slice()]);
        }
        let lines: Vec<PgWireResult<pgwire::messages::copy::CopyData>> = lines
            .into_iter()
            .map(|line| {
                Ok(pgwire::messages::copy::CopyData::new(bytes::Bytes::copy_from_slice(line)))
            })
            .collect();
        Ok(Response::CopyOut(pgwire::api::results::CopyResponse::new(
            0,
            schema.fields().len(),
            futures::stream::iter(lines),
        )))
    }
}

#[async_trait]
impl SimpleQueryHandler for Handler {
    async fn do_query<C>(&self, client: &mut C, query: &str) -> PgWireResult<Vec<Response>>
    where
        C: ClientInfo + ClientPortalStore + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::PortalStore: PortalStore,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        let commands = statement::commands(query).map_err(statement_error)?;
        if commands.is_empty() {
            return Ok(vec![Response::EmptyQuery]);
        }
        let mut responses = Vec::with_capacity(commands.len());
        for command in commands {
            responses.push(self.execute(client, command).await?);
        }
        Ok(responses)
    }
}

#[async_trait]
impl ExtendedQueryHandler for Handler {
    type Statement = Statement;
    type QueryParser = DatabaseParser;

    fn query_parser(&self) -> Arc<Self::QueryParser> {
        self.parser.clone()
    }

    async fn do_query<C>(
        &self,
        client: &mut C,
        portal: &Portal<Self::Statement>,
        max_rows: usize,
    ) -> PgWireResult<Response>
    where
        C: ClientInfo + ClientPortalStore + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::PortalStore: PortalStore<Statement = Self::Statement>,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        let parsed = match &portal.statement.statement {
            (sql, None) => {
                return match statement::command(sql) {
                    Ok(Some(command)) => self.execute(client, command).await,
                    Ok(None) => Ok(Response::EmptyQuery),
                    Err(e) => Err(statement_error(e)),
                }
            }
            (_, Some((parsed, _))) => parsed,
        };
        // Classifying the parsed statement again is a match on its AST, not a parse.
        let command = statement::classify(parsed.clone()).map_err(statement_error)?;
        if in_failed_transaction(client, &command) {
            return Err(failed_transaction());
        }
        permitted(client, self.tokens.as_deref(), &command)?;
        match command {
            Command::Query(query) if matches!(*query, SqlStatement::Insert(_)) => {
                // As on the simple protocol: an INSERT is not cancelled once it writes.
                let (_, service) = self.databases.for_client(client)?;
                ExtendedQueryHandler::do_query(service.as_ref(), client, portal, max_rows)
                    .await
                    .map_err(with_sqlstate)
            }
            Command::Query(_) | Command::Cursor(_) | Command::Transaction(_) => {
                let (_, service) = self.databases.for_client(client)?;
                let running = self.running.start(client);
                let response = running
                    .guard(ExtendedQueryHandler::do_query(
                        service.as_ref(),
                        client,
                        portal,
                        max_rows,
                    ))
                    .await
                    .map_err(with_sqlstate)?;
                Ok(running.guard_rows(with_sqlstate_in_rows(response)))
            }
            other => self.execute(client, other).await,
        }
    }
}

pub struct Handlers {
    handler: Arc<Handler>,
    startup: Arc<session::Shared>,
    cancel: Arc<session::Cancel>,
}

impl Handlers {
    /// `tokens`: authentication on; `tls`: connections must negotiate TLS (and SCRAM may bind
    /// to the certificate).
    pub fn new(
        query: Arc<QueryEngine>,
        tokens: Option<Arc<crate::auth::Tokens>>,
        tls: Option<&crate::tls::Tls>,
    ) -> Handlers {
        let describer = DfSessionService::new_with_hooks(Arc::new(SessionContext::new()), vec![])
            .query_parser();
        let databases = Arc::new(Databases {
            query: query.clone(),
            services: Mutex::new(HashMap::new()),
            describer,
        });
        let connections = Arc::new(ConnectionManager::new());
        let running = Arc::new(session::RunningQueries::default());
        Handlers {
            handler: Arc::new(Handler {
                databases: databases.clone(),
                parser: Arc::new(DatabaseParser { databases }),
                running: running.clone(),
                tokens: tokens.clone(),
            }),
            startup: Arc::new(session::Shared {
                connections: connections.clone(),
                query,
                pids: Default::default(),
                auth: tokens
                    .map(|tokens| session::Auth::new(tokens, tls.map(|t| t.cert_pem.as_slice()))),
                require_tls: tls.is_some(),
            }),
            cancel: Arc::new(session::Cancel { connections, running }),
        }
    }
}

impl PgWireServerHandlers for Handlers {
    fn simple_query_handler(&self) -> Arc<impl SimpleQueryHandler> {
        self.handler.clone()
    }

    fn extended_query_handler(&self) -> Arc<impl ExtendedQueryHandler> {
        self.handler.clone()
    }

    /// One per connection: the SCRAM exchange's state is the connection's own.
    fn startup_handler(&self) -> Arc<impl StartupHandler> {
        Arc::new(session::Startup {
            shared: self.startup.clone(),
            sasl: tokio::sync::Mutex::new(pgwire::api::auth::sasl::SASLState::Initial),
        })
    }

    fn copy_handler(&self) -> Arc<impl CopyHandler> {
        self.handler.clone()
    }

    fn cancel_handler(&self) -> Arc<impl pgwire::api::cancel::CancelHandler> {
        self.cancel.clone()
    }
}

/// Accepts Postgres connections until `shutdown`; each connection runs on its own task.
pub async fn serve(
    listener: tokio::net::TcpListener,
    handlers: Arc<Handlers>,
    tls: Option<pgwire::tokio::TlsAcceptor>,
    shutdown: CancellationToken,
) {
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((socket, addr)) => {
                let (handlers, tls) = (handlers.clone(), tls.clone());
                tokio::spawn(async move {
                    if let Err(error) = pgwire::tokio::process_socket(socket, tls, handlers).await {
                        tracing::debug!(%addr, %error, "postgres connection ended with an error");
                    }
                });
            }
            Err(error) => {
                tracing::warn!(%error, "accepting a postgres connection failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
}
