//! A connection's life around its queries: startup (the parameters PostgreSQL reports, the
//! database check), the settings `SHOW` answers here, and stopping a query that runs too long
//! (`statement_timeout`) or that the client cancels (CancelRequest) — also while its rows are
//! being computed and sent, which is where DataFusion does the work.

use std::collections::HashMap;
use std::fmt::Debug;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use datafusion_postgres::pgwire;
use futures::{Sink, SinkExt, StreamExt};
use pgwire::api::auth::sasl::scram::ScramAuth;
use pgwire::api::auth::sasl::{SASLState, SCRAM_SHA_256_METHOD, SCRAM_SHA_256_PLUS_METHOD};
use pgwire::api::auth::{
    AuthSource, DefaultServerParameterProvider, LoginInfo, Password, StartupHandler,
};
use pgwire::api::cancel::CancelHandler;
use pgwire::api::results::{DataRowEncoder, FieldFormat, FieldInfo, QueryResponse, Response};
use pgwire::api::{
    ClientInfo, ConnectionGuard, ConnectionHandle, ConnectionManager, PgWireConnectionState,
    PidSecretKeyGenerator, RandomPidSecretKeyGenerator, Type, METADATA_DATABASE,
};
use pgwire::error::{ErrorInfo, PgWireError, PgWireResult};
use pgwire::messages::cancel::CancelRequest;
use pgwire::messages::startup::SecretKey;
use pgwire::messages::startup::{Authentication, PasswordMessageFamily};
use pgwire::messages::{PgWireBackendMessage, PgWireFrontendMessage};
use tokio_util::sync::CancellationToken;

use datafusion::sql::sqlparser::ast::{Expr, Set, Statement, Value};
use pgwire::messages::startup::ParameterStatus;

use super::sqlstate::SqlState;
use crate::query::functions::{PG_VERSION, PG_VERSION_NUM};
use crate::query::QueryEngine;

/// Where datafusion-postgres keeps a session's `SET statement_timeout` (milliseconds).
const METADATA_STATEMENT_TIMEOUT: &str = "statement_timeout_ms";

fn query_canceled(reason: &str) -> PgWireError {
    PgWireError::UserError(Box::new(ErrorInfo::new(
        "ERROR".into(),
        SqlState::QueryCanceled.code().into(),
        format!("canceling statement due to {reason}"),
    )))
}

/// What every connection's startup shares.
pub struct Shared {
    pub connections: Arc<ConnectionManager>,
    pub query: Arc<QueryEngine>,
    pub pids: RandomPidSecretKeyGenerator,
    /// `None`: authentication is off.
    pub auth: Option<Auth>,
    /// Refuse connections that did not negotiate TLS (TLS is configured).
    pub require_tls: bool,
}

/// Password authentication: the user is a token's name, the password the token, checked
/// with SCRAM-SHA-256 against the salted password the token store keeps.
pub struct Auth {
    pub tokens: Arc<crate::auth::Tokens>,
    pub scram: ScramAuth,
}

impl Auth {
    pub fn new(tokens: Arc<crate::auth::Tokens>, cert_pem: Option<&[u8]>) -> Auth {
        let mut scram = ScramAuth::new(Arc::new(TokenSource(tokens.clone())));
        scram.set_iterations(crate::auth::SCRAM_ITERATIONS);
        if let Some(pem) = cert_pem {
            // SCRAM-SHA-256-PLUS (channel binding) needs the server's certificate.
            if let Err(error) = scram.configure_certificate(pem) {
                tracing::warn!(%error, "no SCRAM channel binding: the certificate was not read");
            }
        }
        Auth { tokens, scram }
    }
}

/// The token store as pgwire's password source.
#[derive(Debug)]
struct TokenSource(Arc<crate::auth::Tokens>);

#[async_trait]
impl AuthSource for TokenSource {
    async fn get_password(&self, login: &LoginInfo) -> PgWireResult<Password> {
        let user = login.user().unwrap_or_default().to_string();
        let tokens = self.0.clone();
        let name = user.clone();
        match tokio::task::spawn_blocking(move || tokens.scram(&name)).await {
            Ok(Ok(Some(scram))) => Ok(Password::new(Some(scram.salt), scram.salted_password)),
            Ok(Err(error)) => {
                tracing::error!(%error, "reading the token store failed");
                Err(PgWireError::InvalidPassword(user))
            }
            _ => Err(PgWireError::InvalidPassword(user)),
        }
    }
}

/// Who a connection logged in as (`Principal::anyone()` with authentication off; no one
/// before it logged in). With authentication on, the token's permissions as they are now: a
/// revoked token's open sessions can do nothing more.
pub fn principal<C: ClientInfo>(
    client: &C,
    tokens: Option<&crate::auth::Tokens>,
) -> crate::auth::Principal {
    let Some(logged_in) = client.session_extensions().get::<crate::auth::Principal>() else {
        return crate::auth::Principal::nobody();
    };
    match tokens {
        None => (*logged_in).clone(),
        Some(tokens) => match tokens.scram(&logged_in.name) {
            // The same secret it logged in with, still there: a revoked token recreated under
            // the same name does not carry old sessions over.
            Ok(Some(now)) if now.principal.token == logged_in.token => now.principal,
            _ => crate::auth::Principal::nobody(),
        },
    }
}

/// One connection's startup: the parameters PostgreSQL reports, SCRAM-SHA-256 when
/// authentication is on (its state is the connection's own), a database that does not exist
/// refused with 3D000, one the user may not use with 42501.
pub struct Startup {
    pub shared: Arc<Shared>,
    pub sasl: tokio::sync::Mutex<SASLState>,
}

fn server_parameters() -> DefaultServerParameterProvider {
    let mut parameters = DefaultServerParameterProvider::default();
    parameters.server_version = PG_VERSION.to_string();
    parameters.time_zone = "UTC".to_string();
    parameters.date_style = "ISO, MDY".to_string();
    parameters.search_path = "\"$user\", public".to_string();
    parameters
}

async fn refuse<C>(client: &mut C, code: SqlState, message: String) -> PgWireResult<()>
where
    C: ClientInfo + Sink<PgWireBackendMessage> + Unpin + Send,
    C::Error: Debug,
    PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
{
    let error = ErrorInfo::new("FATAL".into(), code.code().into(), message);
    client.send(PgWireBackendMessage::ErrorResponse(error.into())).await?;
    client.close().await?;
    Ok(())
}

impl Startup {
    /// After authentication (or without it): the database check, then ready for queries.
    async fn admit<C>(&self, client: &mut C, who: crate::auth::Principal) -> PgWireResult<()>
    where
        C: ClientInfo + Sink<PgWireBackendMessage> + Unpin + Send,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        use crate::auth::Access;
        let db = client.metadata().get(METADATA_DATABASE).cloned().unwrap_or_default();
        if !who.may(Access::Read, &db) && !who.may(Access::Write, &db) {
            let message = format!("permission denied for database \"{db}\"");
            return refuse(client, SqlState::InsufficientPrivilege, message).await;
        }
        if !self.shared.query.engine().catalog().has_database(&db) {
            let message = format!("database \"{db}\" does not exist");
            return refuse(client, SqlState::InvalidCatalogName, message).await;
        }
        client.session_extensions().insert::<crate::auth::Principal>(who);
        let (pid, secret_key) = self.shared.pids.generate(&*client);
        client.set_pid_and_secret_key(pid, secret_key.clone());
        let (handle, guard) = self.shared.connections.register(pid, secret_key);
        client.session_extensions().insert::<Arc<ConnectionHandle>>(handle);
        client.session_extensions().insert::<ConnectionGuard>(guard);
        pgwire::api::auth::finish_authentication(client, &server_parameters()).await?;
        debug_assert!(matches!(client.state(), PgWireConnectionState::ReadyForQuery));
        Ok(())
    }
}

#[async_trait]
impl StartupHandler for Startup {
    async fn on_startup<C>(
        &self,
        client: &mut C,
        message: PgWireFrontendMessage,
    ) -> PgWireResult<()>
    where
        C: ClientInfo + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        match message {
            PgWireFrontendMessage::Startup(startup) => {
                pgwire::api::auth::protocol_negotiation(client, &startup).await?;
                pgwire::api::auth::save_startup_parameters_to_metadata(client, &startup);
                if self.shared.require_tls && !client.is_secure() {
                    let message = "this server takes only TLS connections (sslmode=require)";
                    return refuse(
                        client,
                        SqlState::InvalidAuthorizationSpecification,
                        message.into(),
                    )
                    .await;
                }
                let Some(auth) = &self.shared.auth else {
                    return self.admit(client, crate::auth::Principal::anyone()).await;
                };
                client.set_state(PgWireConnectionState::AuthenticationInProgress);
                let mut mechanisms = vec![SCRAM_SHA_256_METHOD.to_string()];
                if client.is_secure() && auth.scram.supports_channel_binding() {
                    mechanisms.push(SCRAM_SHA_256_PLUS_METHOD.to_string());
                }
                client
                    .send(PgWireBackendMessage::Authentication(Authentication::SASL(mechanisms)))
                    .await?;
            }
            PgWireFrontendMessage::PasswordMessageFamily(message) => {
                let Some(auth) = &self.shared.auth else { return Ok(()) };
                let mut state = self.sasl.lock().await;
                let message = if matches!(*state, SASLState::Initial) {
                    let initial = message.into_sasl_initial_response()?;
                    if ![SCRAM_SHA_256_METHOD, SCRAM_SHA_256_PLUS_METHOD]
                        .contains(&initial.auth_method.as_str())
                    {
                        return Err(PgWireError::UnsupportedSASLAuthMethod(initial.auth_method));
                    }
                    *state = SASLState::ScramClientFirstReceived;
                    PasswordMessageFamily::SASLInitialResponse(initial)
                } else {
                    PasswordMessageFamily::SASLResponse(message.into_sasl_response()?)
                };
                let (answer, next) =
                    auth.scram.process_scram_message(client, message, &state).await?;
                client.send(PgWireBackendMessage::Authentication(answer)).await?;
                *state = next;
                if matches!(*state, SASLState::Finished) {
                    drop(state);
                    let user = client.metadata().get(pgwire::api::METADATA_USER).cloned();
                    let tokens = auth.tokens.clone();
                    let found = tokio::task::spawn_blocking(move || {
                        tokens.scram(&user.unwrap_or_default()).ok().flatten()
                    })
                    .await
                    .ok()
                    .flatten();
                    let Some(crate::auth::Scram { principal: who, .. }) = found else {
                        return Err(PgWireError::InvalidPassword("revoked".into()));
                    };
                    return self.admit(client, who).await;
                }
            }
            _ => {}
        }
        Ok(())
    }
}

/// A one-row, one-column text result, as `SHOW name` gives.
pub fn show_response(name: &str, value: &str) -> PgWireResult<Response> {
    let fields =
        Arc::new(vec![FieldInfo::new(name.to_string(), None, None, Type::TEXT, FieldFormat::Text)]);
    let mut encoder = DataRowEncoder::new(fields.clone());
    encoder.encode_field(&Some(value))?;
    let row = encoder.take_row();
    Ok(Response::Query(QueryResponse::new(fields, futures::stream::iter([Ok(row)]))))
}

/// Settings a client may set that PostgreSQL reports back with a `ParameterStatus`, by their
/// lowercase name, with the name it reports.
const REPORTED: &[(&str, &str)] = &[
    ("application_name", "application_name"),
    ("client_encoding", "client_encoding"),
    ("datestyle", "DateStyle"),
    ("intervalstyle", "IntervalStyle"),
    ("timezone", "TimeZone"),
    ("extra_float_digits", "extra_float_digits"),
    ("search_path", "search_path"),
    ("bytea_output", "bytea_output"),
];

/// Connection metadata that is the protocol's, not a setting: `SET`/`RESET` of these names is
/// refused, so a client cannot move its connection to another database by `SET database`.
const PROTECTED: &[&str] =
    &["database", "user", "options", "replication", METADATA_STATEMENT_TIMEOUT];

fn protected(name: &str) -> PgWireError {
    PgWireError::UserError(Box::new(ErrorInfo::new(
        "ERROR".into(),
        SqlState::CantChangeRuntimeParam.code().into(),
        format!("parameter \"{name}\" cannot be changed"),
    )))
}

/// The column a `SHOW name` answers in.
pub fn show_column(name: &str) -> String {
    if name == "timezone" || name == "time zone" {
        "TimeZone".to_string()
    } else {
        name.to_string()
    }
}

/// `SHOW name`: Sundial's values for what the server is, the connection's own settings, and
/// PostgreSQL's defaults for the rest that clients ask about.
pub fn show<C: ClientInfo>(client: &C, name: &str) -> PgWireResult<Response> {
    let metadata = |key: &str, default: &str| {
        client.metadata().get(key).cloned().unwrap_or_else(|| default.to_string())
    };
    let value = match name {
        "server_version" => PG_VERSION.to_string(),
        "server_version_num" => PG_VERSION_NUM.to_string(),
        "server_encoding" => "UTF8".to_string(),
        "client_encoding" => metadata("client_encoding", "UTF8"),
        "timezone" | "time zone" => metadata("timezone", "UTC"),
        "datestyle" => metadata("datestyle", "ISO, MDY"),
        "search_path" => metadata("search_path", "\"$user\", public"),
        "standard_conforming_strings" => "on".to_string(),
        "integer_datetimes" => "on".to_string(),
        "max_identifier_length" => "63".to_string(),
        "transaction_isolation"
        | "transaction isolation level"
        | "default_transaction_isolation" => "read committed".to_string(),
        "is_superuser" => "on".to_string(),
        // What pgwire reports at startup and drivers ask again (pgjdbc's targetServerType,
        // SQLAlchemy's get_readonly), with PostgreSQL's defaults.
        "transaction_read_only" | "default_transaction_read_only" | "in_hot_standby" => {
            "off".to_string()
        }
        "intervalstyle" => metadata("intervalstyle", "postgres"),
        "bytea_output" => metadata("bytea_output", "hex"),
        "extra_float_digits" => metadata("extra_float_digits", "1"),
        "application_name" => metadata("application_name", ""),
        "session_authorization" => metadata("user", "sundial"),
        "lc_collate" | "lc_ctype" | "lc_messages" | "lc_monetary" | "lc_numeric" | "lc_time" => {
            "C".to_string()
        }
        "statement_timeout" => match client.metadata().get(METADATA_STATEMENT_TIMEOUT) {
            Some(ms) => format!("{ms}ms"),
            None => "0".to_string(),
        },
        other => match client.metadata().get(other) {
            Some(value) => value.clone(),
            None => {
                return Err(PgWireError::UserError(Box::new(ErrorInfo::new(
                    "ERROR".into(),
                    SqlState::UndefinedObject.code().into(),
                    format!("unrecognized configuration parameter \"{other}\""),
                ))))
            }
        },
    };
    show_response(&show_column(name), &value)
}

/// A setting's value as text: `'ISO'`, `ISO`, `300`, `'5s'`.
fn value_text(expr: &Expr) -> String {
    match expr {
        Expr::Value(v) => match &v.value {
            Value::SingleQuotedString(s) | Value::DoubleQuotedString(s) => s.clone(),
            other => other.to_string(),
        },
        Expr::Identifier(i) => i.value.clone(),
        other => other.to_string(),
    }
}

/// `statement_timeout` in milliseconds: a number is milliseconds; `ms`, `s`, `min`, `h`
/// units as PostgreSQL reads them. `None` when it is not a duration.
fn timeout_ms(text: &str) -> Option<u64> {
    let text = text.trim();
    if text.eq_ignore_ascii_case("default") {
        return Some(0);
    }
    let split = text.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: f64 = number.parse().ok()?;
    let factor = match unit.trim() {
        "" | "ms" => 1.0,
        "s" => 1_000.0,
        "min" => 60_000.0,
        "h" => 3_600_000.0,
        "d" => 86_400_000.0,
        _ => return None,
    };
    let ms = (number * factor).round();
    // At most a year: beyond it a deadline is as good as none.
    (ms.is_finite() && (0.0..=31_536_000_000.0).contains(&ms)).then_some(ms as u64)
}

/// `SET name = value` and `SET TIME ZONE`: the connection's own settings, kept in its metadata
/// (so no other connection sees them), reported back as PostgreSQL does.
pub async fn set<C>(client: &mut C, statement: &Statement) -> PgWireResult<Response>
where
    C: ClientInfo + Sink<PgWireBackendMessage> + Unpin + Send,
    C::Error: Debug,
    PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
{
    let (name, value) = match statement {
        Statement::Set(Set::SingleAssignment { variable, values, .. }) => {
            let name = variable.to_string().trim_matches('"').to_ascii_lowercase();
            let value = values.iter().map(value_text).collect::<Vec<_>>().join(", ");
            (name, value)
        }
        Statement::Set(Set::SetTimeZone { value, .. }) => {
            ("timezone".to_string(), value_text(value))
        }
        Statement::Set(Set::SetNames { charset_name, .. }) => {
            ("client_encoding".to_string(), charset_name.value.clone())
        }
        other => {
            return Err(PgWireError::UserError(Box::new(ErrorInfo::new(
                "ERROR".into(),
                SqlState::FeatureNotSupported.code().into(),
                format!("{other} is not supported"),
            ))))
        }
    };
    let name = if name == "time zone" { "timezone".to_string() } else { name };
    if PROTECTED.contains(&name.as_str()) {
        return Err(protected(&name));
    }
    if name == "statement_timeout" {
        let Some(ms) = timeout_ms(&value) else {
            return Err(PgWireError::UserError(Box::new(ErrorInfo::new(
                "ERROR".into(),
                SqlState::InvalidParameterValue.code().into(),
                format!("invalid value for parameter \"statement_timeout\": \"{value}\""),
            ))));
        };
        if ms == 0 {
            client.metadata_mut().remove(METADATA_STATEMENT_TIMEOUT);
        } else {
            client.metadata_mut().insert(METADATA_STATEMENT_TIMEOUT.to_string(), ms.to_string());
        }
        return Ok(Response::Execution(pgwire::api::results::Tag::new("SET")));
    }
    if value.eq_ignore_ascii_case("default") {
        client.metadata_mut().remove(&name);
        return Ok(Response::Execution(pgwire::api::results::Tag::new("SET")));
    }
    if name == "client_encoding"
        && !matches!(value.to_ascii_uppercase().as_str(), "UTF8" | "UTF-8" | "UNICODE")
    {
        return Err(PgWireError::UserError(Box::new(ErrorInfo::new(
            "ERROR".into(),
            SqlState::FeatureNotSupported.code().into(),
            format!("client_encoding \"{value}\" is not supported: Sundial speaks UTF8 only"),
        ))));
    }
    client.metadata_mut().insert(name.clone(), value.clone());
    if let Some((_, reported)) = REPORTED.iter().find(|(key, _)| *key == name) {
        let status = ParameterStatus::new(reported.to_string(), value);
        client.send(PgWireBackendMessage::ParameterStatus(status)).await?;
    }
    Ok(Response::Execution(pgwire::api::results::Tag::new("SET")))
}

/// `RESET name` and `RESET ALL`: the session's own value goes, the default is back.
pub fn reset<C: ClientInfo>(client: &mut C, name: &str) -> PgWireResult<Response> {
    if PROTECTED.contains(&name) {
        return Err(protected(name));
    }
    let metadata = client.metadata_mut();
    match name {
        "all" => {
            metadata.remove(METADATA_STATEMENT_TIMEOUT);
            for (key, _) in REPORTED {
                metadata.remove(*key);
            }
        }
        "statement_timeout" => {
            metadata.remove(METADATA_STATEMENT_TIMEOUT);
        }
        "time zone" => {
            metadata.remove("timezone");
        }
        other => {
            metadata.remove(other);
        }
    }
    Ok(Response::Execution(pgwire::api::results::Tag::new("RESET")))
}

/// Queries running now, by connection, so a CancelRequest (which arrives on a connection of
/// its own) can stop one.
#[derive(Default)]
pub struct RunningQueries {
    /// By backend pid: the connection's secret key, the query's number, its token.
    queries: Mutex<HashMap<i32, (SecretKey, u64, CancellationToken)>>,
    next_id: std::sync::atomic::AtomicU64,
}

/// Removes its query from [`RunningQueries`] when the query's rows are done or dropped.
pub struct Running {
    queries: Arc<RunningQueries>,
    pid: i32,
    id: u64,
    token: CancellationToken,
    deadline: Option<tokio::time::Instant>,
}

impl Drop for Running {
    fn drop(&mut self) {
        let mut queries = self.queries.queries.lock().expect("running queries lock");
        if queries.get(&self.pid).is_some_and(|(_, id, _)| *id == self.id) {
            queries.remove(&self.pid);
        }
    }
}

impl RunningQueries {
    /// Registers a query starting on `client`'s connection, with the session's statement
    /// timeout measured from now.
    pub fn start<C: ClientInfo>(self: &Arc<Self>, client: &C) -> Arc<Running> {
        let (pid, secret_key) = client.pid_and_secret_key();
        let token = CancellationToken::new();
        let id = self.next_id.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.queries
            .lock()
            .expect("running queries lock")
            .insert(pid, (secret_key, id, token.clone()));
        let timeout = client
            .metadata()
            .get(METADATA_STATEMENT_TIMEOUT)
            .and_then(|ms| ms.parse::<u64>().ok())
            .filter(|&ms| ms > 0);
        let deadline =
            timeout.map(|ms| tokio::time::Instant::now() + std::time::Duration::from_millis(ms));
        Arc::new(Running { queries: self.clone(), pid, id, token, deadline })
    }

    fn cancel(&self, pid: i32, secret_key: &SecretKey) {
        if let Some((key, _, token)) = self.queries.lock().expect("running queries lock").get(&pid)
        {
            if key.to_bytes() == secret_key.to_bytes() {
                token.cancel();
            }
        }
    }
}

impl Running {
    /// Resolves, with the error to send, once the query is canceled or times out.
    pub async fn stopped(&self) -> PgWireError {
        tokio::select! {
            _ = self.token.cancelled() => query_canceled("user request"),
            _ = sleep_until(self.deadline) => query_canceled("statement timeout"),
        }
    }

    /// Runs `work` (planning) unless the query is canceled or times out first.
    pub async fn guard<T>(
        &self,
        work: impl std::future::Future<Output = PgWireResult<T>>,
    ) -> PgWireResult<T> {
        let deadline = self.deadline;
        tokio::select! {
            result = work => result,
            _ = self.token.cancelled() => Err(query_canceled("user request")),
            _ = sleep_until(deadline) => Err(query_canceled("statement timeout")),
        }
    }

    /// Makes `response`'s rows stop with 57014 when the query is canceled or times out.
    pub fn guard_rows(self: &Arc<Self>, response: Response) -> Response {
        let Response::Query(mut query) = response else { return response };
        let rows = std::mem::replace(&mut query.data_rows, Box::pin(futures::stream::empty()));
        let guarded = futures::stream::unfold(Some((rows, self.clone())), |state| async move {
            let (mut rows, running) = state?;
            let deadline = running.deadline;
            tokio::select! {
                item = rows.next() => item.map(|item| (item, Some((rows, running)))),
                _ = running.token.cancelled() => Some((Err(query_canceled("user request")), None)),
                _ = sleep_until(deadline) => Some((Err(query_canceled("statement timeout")), None)),
            }
        });
        query.data_rows = Box::pin(guarded);
        Response::Query(query)
    }
}

async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

/// Cancels planning through pgwire's connection manager, and running rows through
/// [`RunningQueries`].
pub struct Cancel {
    pub connections: Arc<ConnectionManager>,
    pub running: Arc<RunningQueries>,
}

#[async_trait]
impl CancelHandler for Cancel {
    async fn on_cancel_request(&self, request: CancelRequest) {
        self.running.cancel(request.pid, &request.secret_key);
        self.connections.cancel(request.pid, &request.secret_key).await;
    }
}

#[cfg(test)]
mod tests {
    use super::timeout_ms;

    #[test]
    fn statement_timeout_values_read_as_postgresql_reads_them() {
        let cases = [
            ("300", Some(300)),
            ("2s", Some(2_000)),
            ("1.5s", Some(1_500)),
            ("1min", Some(60_000)),
            ("0", Some(0)),
            ("DEFAULT", Some(0)),
            ("", None),
            ("5 parsecs", None),
            ("-1", None),
            ("99999999999999999999d", None),
            ("1.2.3", None),
        ];
        for (text, expected) in cases {
            assert_eq!(timeout_ms(text), expected, "{text:?}");
        }
    }
}
