//! Postgres wire protocol: psql, drivers and BI tools talk SQL to Sundial on port 5433.
//!
//! Built on `datafusion-postgres` (pgwire + arrow-pg type encoding + datafusion-pg-catalog's
//! `pg_catalog` and functions). What Sundial adds: the connection's database name selects a
//! Sundial database (each has its own DataFusion session from `query`), a connection to a
//! database that does not exist fails with 3D000, and every error carries a real SQLSTATE —
//! this module is the only place that knows SQLSTATEs ([`sqlstate_of_kind`] maps error kinds
//! exhaustively; [`sqlstate_of`] refines DataFusion errors).

mod copy;
mod functions;
mod rewrite;
mod session;
#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::fmt::Debug;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use datafusion::error::DataFusionError;
use datafusion::prelude::SessionContext;
use datafusion_postgres::pgwire;
use datafusion_postgres::{DfSessionService, Parser};
use futures::{Sink, SinkExt};
use pgwire::api::auth::StartupHandler;
use pgwire::api::copy::CopyHandler;
use pgwire::api::portal::{Format, Portal};
use pgwire::api::query::{ExtendedQueryHandler, SimpleQueryHandler};
use pgwire::api::results::{FieldInfo, Response};
use pgwire::api::stmt::QueryParser;
use pgwire::api::store::PortalStore;
use pgwire::api::{
    ClientInfo, ClientPortalStore, ConnectionManager, PgWireServerHandlers, Type, METADATA_DATABASE,
};
use pgwire::error::{ErrorInfo, PgWireError, PgWireResult};
use pgwire::messages::copy::{CopyData, CopyDone, CopyFail};
use pgwire::messages::PgWireBackendMessage;
use tokio_util::sync::CancellationToken;

use crate::query::QueryEngine;
use crate::ErrorKind;

/// The exhaustive map from error kinds to SQLSTATE classes.
pub fn sqlstate_of_kind(kind: ErrorKind) -> &'static str {
    match kind {
        ErrorKind::InvalidInput => "22023",
        ErrorKind::NotFound => "42P01",
        ErrorKind::AlreadyExists => "42P07",
        ErrorKind::ObjectInUse => "55006",
        ErrorKind::Unsupported => "0A000",
        ErrorKind::ResourceExhausted => "53200",
        ErrorKind::Unavailable => "57P03",
        ErrorKind::Internal => "XX000",
    }
}

/// The SQLSTATE of a DataFusion error, as precise as its variant and message allow.
pub fn sqlstate_of(error: &DataFusionError) -> &'static str {
    use datafusion::common::SchemaError;
    let root = error.find_root();
    match root {
        DataFusionError::SQL(..) => "42601",
        DataFusionError::SchemaError(e, _) if matches!(**e, SchemaError::FieldNotFound { .. }) => {
            "42703"
        }
        DataFusionError::SchemaError(..) => "42P01",
        DataFusionError::NotImplemented(_) => "0A000",
        DataFusionError::ResourcesExhausted(_) => "53200",
        DataFusionError::ArrowError(e, _)
            if matches!(**e, arrow::error::ArrowError::DivideByZero) =>
        {
            "22012"
        }
        DataFusionError::ArrowError(e, _)
            if matches!(
                **e,
                arrow::error::ArrowError::CastError(_) | arrow::error::ArrowError::ParseError(_)
            ) =>
        {
            "22P02"
        }
        DataFusionError::Plan(message) => {
            let message = message.to_ascii_lowercase();
            if message.contains("table") && message.contains("not found") {
                "42P01"
            } else if message.contains("no field named")
                || message.contains("column") && message.contains("not found")
            {
                "42703"
            } else if message.contains("coerce")
                || message.contains("type")
                || message.contains("signature")
            {
                "42804"
            } else if message.contains("function")
                && (message.contains("invalid") || message.contains("not found"))
            {
                "42883"
            } else {
                "42601"
            }
        }
        DataFusionError::Execution(message) => {
            let message = message.to_ascii_lowercase();
            if message.contains("divide by zero") || message.contains("division by zero") {
                "22012"
            } else if message.contains("cast") || message.contains("parse") {
                "22P02"
            } else {
                "22023"
            }
        }
        _ => "XX000",
    }
}

fn user_error(code: &str, message: String) -> PgWireError {
    PgWireError::UserError(Box::new(ErrorInfo::new("ERROR".to_string(), code.to_string(), message)))
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
                Ok(q) => user_error(sqlstate_of_query(&q), q.to_string()),
                Err(other) => {
                    match other.downcast::<datafusion::sql::sqlparser::parser::ParserError>() {
                        Ok(parse) => user_error("42601", parse.to_string()),
                        Err(other) => user_error("XX000", other.to_string()),
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

fn sqlstate_of_ddl(error: &crate::query::ddl::Error) -> &'static str {
    match error {
        crate::query::ddl::Error::NotFound { what: "database", .. } => "3D000",
        crate::query::ddl::Error::DatabaseExists(_) => "42P04",
        other => sqlstate_of_kind(other.kind()),
    }
}

fn sqlstate_of_query(error: &crate::query::Error) -> &'static str {
    match error {
        crate::query::Error::DatabaseNotFound(_) => "3D000",
        crate::query::Error::DataFusion(e) => sqlstate_of(e),
        crate::query::Error::Unsupported(_) => "0A000",
    }
}

/// Session commands answered here rather than planned: `DEALLOCATE` of protocol-level
/// prepared statements (psycopg sends it when its statement cache turns over; pgwire owns those
/// statements), `DISCARD ALL` (connection pools send it on check-in), and savepoints, which
/// SQLAlchemy and psycopg use for nested transactions. Writes are committed as they happen and
/// reads see snapshots, so like `BEGIN`/`COMMIT` these change nothing.
fn session_command(query: &str) -> Option<&'static str> {
    let statement = query.trim().trim_end_matches(';').trim().to_ascii_uppercase();
    let words: Vec<&str> = statement.split_whitespace().collect();
    match words.as_slice() {
        ["DEALLOCATE", ..] => Some("DEALLOCATE"),
        ["DISCARD", "ALL"] => Some("DISCARD ALL"),
        ["SAVEPOINT", _] => Some("SAVEPOINT"),
        ["RELEASE", ..] => Some("RELEASE"),
        ["ROLLBACK", "TO", ..] => Some("ROLLBACK"),
        _ => None,
    }
}

/// One DataFusion-backed session service per database, with `pg_catalog` installed.
struct Databases {
    query: Arc<QueryEngine>,
    services: Mutex<HashMap<String, Arc<DfSessionService>>>,
    /// Describes statements; that needs only the plan, never a database.
    describer: Arc<Parser>,
}

impl Databases {
    fn service(&self, db: &str) -> PgWireResult<Arc<DfSessionService>> {
        if !self.query.engine().catalog().has_database(db) {
            return Err(user_error("3D000", format!("database \"{db}\" does not exist")));
        }
        if let Some(service) = self.services.lock().expect("pg services lock").get(db) {
            return Ok(service.clone());
        }
        let ctx =
            self.query.context(db).map_err(|e| user_error(sqlstate_of_query(&e), e.to_string()))?;
        datafusion_postgres::datafusion_pg_catalog::pg_catalog::setup_pg_catalog(
            &ctx,
            db,
            datafusion_postgres::datafusion_pg_catalog::pg_catalog::context::EmptyContextProvider,
        )
        .map_err(|e| user_error("XX000", format!("setting up pg_catalog: {e}")))?;
        functions::register(&ctx);
        let service = Arc::new(DfSessionService::new(Arc::new(ctx)));
        self.services
            .lock()
            .expect("pg services lock")
            .entry(db.to_string())
            .or_insert(service.clone());
        Ok(service)
    }

    fn for_client<C: ClientInfo>(&self, client: &C) -> PgWireResult<Arc<DfSessionService>> {
        let db = client.metadata().get(METADATA_DATABASE).cloned().unwrap_or_default();
        self.service(&db)
    }
}

type Statement = <DfSessionService as ExtendedQueryHandler>::Statement;

/// The query handlers: find the connection's database, delegate, attach SQLSTATEs.
pub struct Handler {
    databases: Arc<Databases>,
    parser: Arc<DatabaseParser>,
    running: Arc<session::RunningQueries>,
}

pub struct DatabaseParser {
    databases: Arc<Databases>,
}

#[async_trait]
impl QueryParser for DatabaseParser {
    type Statement = Statement;

    async fn parse_sql<C>(
        &self,
        client: &C,
        sql: &str,
        types: &[Option<Type>],
    ) -> PgWireResult<Option<Self::Statement>>
    where
        C: ClientInfo + Unpin + Send + Sync,
    {
        if answered_here(sql) {
            // No plan: `Handler::do_query` answers it when the portal runs.
            return Ok(Some((sql.to_string(), None)));
        }
        let service = self.databases.for_client(client)?;
        let sql = rewritten(&self.databases.query, client, sql)?;
        service.query_parser().parse_sql(client, &sql, types).await.map_err(with_sqlstate)
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

/// The SQL to plan: Sundial's own rewrites (gap filling, last values), then client catalog
/// queries.
fn rewritten<'a, C: ClientInfo>(
    query: &QueryEngine,
    client: &C,
    sql: &'a str,
) -> PgWireResult<std::borrow::Cow<'a, str>> {
    let db = client.metadata().get(METADATA_DATABASE).cloned().unwrap_or_default();
    let sql =
        query.rewrite(&db, sql).map_err(|e| user_error(sqlstate_of_query(&e), e.to_string()))?;
    Ok(match rewrite::catalog_query(&sql) {
        Some(catalog) => std::borrow::Cow::Owned(catalog),
        None => sql,
    })
}

/// Whether `sql` is a statement this module answers itself (see [`Handler::answer_here`]).
fn answered_here(sql: &str) -> bool {
    session_command(sql).is_some() || crate::query::ddl::is_ddl(sql) || copy::parse(sql).is_some()
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
                        sqlstate: "54000",
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
                "08P01",
                "CopyDone without a COPY FROM STDIN in progress".into(),
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
        user_error("57014", format!("COPY from stdin failed: {}", fail.message))
    }
}

impl Handler {
    /// Session commands and DDL, on either protocol; `None` for everything DataFusion plans.
    async fn answer_here<C: ClientInfo>(
        &self,
        client: &C,
        sql: &str,
    ) -> Option<PgWireResult<Response>> {
        if let Some(tag) = session_command(sql) {
            return Some(Ok(Response::Execution(pgwire::api::results::Tag::new(tag))));
        }
        let db = client.metadata().get(METADATA_DATABASE).cloned().unwrap_or_default();
        let result = crate::query::ddl::execute(self.databases.query.engine(), &db, sql).await?;
        Some(
            result
                .map(|tag| Response::Execution(pgwire::api::results::Tag::new(tag)))
                .map_err(|e| user_error(sqlstate_of_ddl(&e), e.to_string())),
        )
    }

    /// Answers a `COPY` statement on either protocol.
    async fn copy<C: ClientInfo>(
        &self,
        client: &C,
        copy: Result<copy::Copy, String>,
    ) -> PgWireResult<Response> {
        match copy.map_err(|message| user_error("0A000", message))? {
            copy::Copy::Out(out) => self.copy_out(client, out).await,
            copy::Copy::In(copy_in) => self.copy_in(client, copy_in),
        }
    }

    /// Starts a `COPY … FROM STDIN`: the data arrives through [`CopyHandler`].
    fn copy_in<C: ClientInfo>(&self, client: &C, copy: copy::CopyIn) -> PgWireResult<Response> {
        let db = client.metadata().get(METADATA_DATABASE).cloned().unwrap_or_default();
        let Some(table) = self.databases.query.engine().catalog().table(&db, &copy.table).cloned()
        else {
            return Err(user_error("42P01", format!("relation \"{}\" does not exist", copy.table)));
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
                "42P01",
                format!("relation \"{}\" does not exist", state.copy.table),
            ));
        };
        let batch = copy::to_batch(&state.copy, &table, &state.data)
            .map_err(|e| user_error(e.sqlstate, e.message))?;
        drop(state.data);
        let now =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        let default_time_ns = i64::try_from(now.as_nanos()).unwrap_or(i64::MAX);
        // Render everything first, so a bad row stores nothing; then write in bounded records.
        let mut chunks = Vec::new();
        let mut text = String::new();
        for offset in (0..batch.num_rows()).step_by(COPY_ROWS_PER_RENDER) {
            let rows = batch.slice(offset, COPY_ROWS_PER_RENDER.min(batch.num_rows() - offset));
            crate::query::insert::render(&table, &rows, default_time_ns, &mut text)
                .map_err(|e| user_error("22023", e.to_string()))?;
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
                    crate::engine::Error::Rejected(lines) => {
                        let reasons: Vec<_> =
                            lines.iter().map(|l| l.error_message.clone()).collect();
                        user_error("22023", format!("COPY rejected: {}", reasons.join("; ")))
                    }
                    other => user_error(sqlstate_of_kind(other.kind()), other.to_string()),
                },
            )?;
            stored += outcome.lines_stored;
        }
        Ok(stored)
    }

    /// Runs the query of a `COPY … TO STDOUT` and streams its rows, one `CopyData` per line.
    async fn copy_out<C: ClientInfo>(
        &self,
        client: &C,
        copy: copy::CopyOut,
    ) -> PgWireResult<Response> {
        let db = client.metadata().get(METADATA_DATABASE).cloned().unwrap_or_default();
        let ctx = self
            .databases
            .query
            .context(&db)
            .map_err(|e| user_error(sqlstate_of_query(&e), e.to_string()))?;
        let df =
            ctx.sql(&copy.query).await.map_err(|e| user_error(sqlstate_of(&e), e.to_string()))?;
        let schema = df.schema().inner().clone();
        let batches = df.collect().await.map_err(|e| user_error(sqlstate_of(&e), e.to_string()))?;
        let text = copy::render(&copy.format, &schema, &batches)
            .map_err(|e| user_error("XX000", e.to_string()))?;
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
        if let Some(copy) = copy::parse(query) {
            return Ok(vec![self.copy(client, copy).await?]);
        }
        if let Some(response) = self.answer_here(client, query).await {
            return Ok(vec![response?]);
        }
        if let Some(response) = session::show(client, query) {
            return Ok(vec![response?]);
        }
        if let Some(response) = session::reset(client, query) {
            return Ok(vec![response]);
        }
        let service = self.databases.for_client(client)?;
        let query = rewritten(&self.databases.query, client, query)?;
        let running = self.running.start(client);
        let responses = running
            .guard(SimpleQueryHandler::do_query(service.as_ref(), client, &query))
            .await
            .map_err(with_sqlstate)?;
        Ok(responses.into_iter().map(|r| running.guard_rows(with_sqlstate_in_rows(r))).collect())
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
        if let (sql, None) = &portal.statement.statement {
            if let Some(copy) = copy::parse(sql) {
                return self.copy(client, copy).await;
            }
            if let Some(response) = self.answer_here(client, sql).await {
                return response;
            }
        }
        let service = self.databases.for_client(client)?;
        let running = self.running.start(client);
        let response = running
            .guard(ExtendedQueryHandler::do_query(service.as_ref(), client, portal, max_rows))
            .await
            .map_err(with_sqlstate)?;
        Ok(running.guard_rows(with_sqlstate_in_rows(response)))
    }
}

pub struct Handlers {
    handler: Arc<Handler>,
    startup: Arc<session::Startup>,
    cancel: Arc<session::Cancel>,
}

impl Handlers {
    pub fn new(query: Arc<QueryEngine>) -> Handlers {
        let describer = DfSessionService::new(Arc::new(SessionContext::new())).query_parser();
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
            }),
            startup: Arc::new(session::Startup {
                connections: connections.clone(),
                query,
                pids: Default::default(),
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

    fn startup_handler(&self) -> Arc<impl StartupHandler> {
        self.startup.clone()
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
    shutdown: CancellationToken,
) {
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((socket, addr)) => {
                let handlers = handlers.clone();
                tokio::spawn(async move {
                    if let Err(error) = pgwire::tokio::process_socket(socket, None, handlers).await
                    {
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
