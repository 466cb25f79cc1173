//! HTTP API: the InfluxDB write endpoints (v1 `/write`, v2 `/api/v2/write`, v3
//! `/api/v3/write_lp`), `/ping`, `/health`, Telegraf's `/query?q=CREATE DATABASE`, and SQL
//! queries at `/api/v3/query_sql` in json, jsonl, csv, pretty, parquet and Arrow IPC.
//!
//! The only place that knows HTTP status codes: [`status_of`] maps error kinds exhaustively.

mod auth;
mod changes;
mod configure;
#[cfg(test)]
mod tests;

use std::io::Read;
use std::sync::Arc;

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;
use axum::extract::{DefaultBodyLimit, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use bytes::Bytes;
use serde::Deserialize;
use serde_json::json;

use crate::engine::{self, RejectedLine, WriteOptions};
use crate::line_protocol::Precision;
use datafusion::sql::sqlparser::ast::{ObjectName, ObjectType, Statement};

use crate::auth::{Access, Need, Principal};
use crate::catalog::Retention;
use crate::query::QueryEngine;
use crate::statement::Command;
use crate::ErrorKind;

const VERSION: &str = env!("CARGO_PKG_VERSION");

#[derive(Clone)]
struct AppState {
    query: Arc<QueryEngine>,
    request_bytes_max: usize,
    /// `None`: authentication is off.
    tokens: Option<Arc<crate::auth::Tokens>>,
}

pub fn router(
    query: Arc<QueryEngine>,
    request_bytes_max: usize,
    tokens: Option<Arc<crate::auth::Tokens>>,
) -> Router {
    let state = AppState { query, request_bytes_max, tokens };
    Router::new()
        .route("/write", post(write_v1))
        .route("/api/v2/write", post(write_v2))
        .route("/api/v3/write_lp", post(write_v3))
        .route("/ping", get(ping).head(ping))
        .route("/health", get(health))
        .route("/query", get(influxql).post(influxql))
        .route("/api/v3/query_sql", get(query_get).post(query_post))
        .route("/api/v3/views/{name}/changes", get(changes::view_changes))
        .route(
            "/api/v3/configure/database",
            post(configure::create_database).put(configure::update_database),
        )
        .route("/api/v3/configure/table", axum::routing::put(configure::update_table))
        .route("/api/v3/tokens", get(auth::list_tokens).post(auth::create_token))
        .route("/api/v3/tokens/{name}", axum::routing::delete(auth::revoke_token))
        .layer(DefaultBodyLimit::max(request_bytes_max))
        .layer(axum::middleware::from_fn_with_state(state.clone(), auth::authenticate))
        .layer(axum::middleware::from_fn(refuse_cross_origin))
        .with_state(state)
}

/// Refuses what a web page could make a browser send here: a request from another origin or
/// site (a page's `fetch`, form post or `<img>` carries `Origin` or `Sec-Fetch-Site`), and one
/// whose `Host` is a name other than `localhost` while it comes from a browser (DNS
/// rebinding: evil.example resolving to 127.0.0.1 is the same origin to the browser). Clients
/// that are not browsers (curl, Telegraf, influx clients, drivers) send neither header and are
/// not affected; an address typed into the browser (`Sec-Fetch-Site: none`) is not refused.
async fn refuse_cross_origin(
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    match cross_origin(request.headers()) {
        Some(reason) => error_response(StatusCode::FORBIDDEN, &reason, None),
        None => next.run(request).await,
    }
}

fn cross_origin(headers: &HeaderMap) -> Option<String> {
    // Browsers mark what they send: `Origin` on cross-origin requests and on every POST,
    // `Sec-Fetch-Site` on all of them (`none` for an address typed by the user).
    let fetch_site = headers.get("sec-fetch-site").map(|v| v.to_str().unwrap_or("invalid"));
    let origin = headers.get(header::ORIGIN);
    if origin.is_none() && fetch_site.is_none_or(|site| site == "none") {
        return None;
    }
    let refused = || Some("requests from web pages are refused (Origin header)".to_string());
    if fetch_site.is_some_and(|site| site != "same-origin" && site != "none") {
        return refused();
    }
    let origin = match origin {
        Some(origin) => match origin.to_str().ok().and_then(|o| url::Url::parse(o).ok()) {
            Some(origin) => Some(origin),
            None => return refused(),
        },
        None => None,
    };
    let scheme = origin.as_ref().map_or("http", |o| o.scheme());
    let host = headers.get(header::HOST).and_then(|h| h.to_str().ok()).unwrap_or("");
    let Ok(own) = url::Url::parse(&format!("{scheme}://{host}")) else {
        return refused();
    };
    let local_name = match own.host() {
        Some(url::Host::Ipv4(_) | url::Host::Ipv6(_)) => true,
        Some(url::Host::Domain(name)) => name.eq_ignore_ascii_case("localhost"),
        None => false,
    };
    let same = origin.as_ref().is_none_or(|origin| {
        origin.host() == own.host() && origin.port_or_known_default() == own.port_or_known_default()
    });
    if same && local_name {
        None
    } else {
        refused()
    }
}

fn use_post() -> Response {
    let mut response = error_response(
        StatusCode::METHOD_NOT_ALLOWED,
        "this statement changes data: send it with POST",
        None,
    );
    response.headers_mut().insert(header::ALLOW, HeaderValue::from_static("POST"));
    response
}

/// The single mapping from error kinds to HTTP status codes.
pub fn status_of(kind: ErrorKind) -> StatusCode {
    match kind {
        ErrorKind::InvalidInput | ErrorKind::Unsupported => StatusCode::BAD_REQUEST,
        ErrorKind::NotFound => StatusCode::NOT_FOUND,
        ErrorKind::AlreadyExists | ErrorKind::ObjectInUse => StatusCode::CONFLICT,
        ErrorKind::ResourceExhausted | ErrorKind::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        ErrorKind::Internal => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

fn code_name(status: StatusCode) -> &'static str {
    match status.as_u16() {
        400 => "invalid",
        401 => "unauthorized",
        403 => "forbidden",
        404 => "not found",
        405 => "method not allowed",
        413 => "request too large",
        503 => "unavailable",
        _ => "internal error",
    }
}

/// `{"error": …}` for v1 clients, `code`/`message` for v2 clients, `data` for rejected lines.
fn error_response(status: StatusCode, message: &str, data: Option<&[RejectedLine]>) -> Response {
    let mut body = json!({ "error": message, "code": code_name(status), "message": message });
    if let Some(lines) = data {
        body["data"] = json!(lines);
        if let Some(first) = lines.first() {
            body["line"] = json!(first.line_number);
        }
    }
    let mut response = (status, Json(body)).into_response();
    if status == StatusCode::SERVICE_UNAVAILABLE {
        response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    }
    response
}

fn body_too_large(limit: usize) -> Response {
    error_response(
        StatusCode::PAYLOAD_TOO_LARGE,
        &format!("request body exceeds the limit of {limit} bytes"),
        None,
    )
}

/// Decompresses a gzip body (bounded by the request limit) or returns it as is.
// The error is the response to send as it is; it is built once per failed request.
#[allow(clippy::result_large_err)]
fn decode_body(headers: &HeaderMap, body: Bytes, limit: usize) -> Result<Bytes, Response> {
    let encoding = headers
        .get(header::CONTENT_ENCODING)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    match encoding.as_str() {
        "" | "identity" => Ok(body),
        "gzip" | "x-gzip" => {
            let mut out = Vec::with_capacity(body.len().saturating_mul(4).min(limit));
            let mut decoder = flate2::read::MultiGzDecoder::new(&body[..]).take(limit as u64 + 1);
            decoder.read_to_end(&mut out).map_err(|e| {
                error_response(StatusCode::BAD_REQUEST, &format!("invalid gzip body: {e}"), None)
            })?;
            if out.len() > limit {
                return Err(body_too_large(limit));
            }
            Ok(Bytes::from(out))
        }
        other => Err(error_response(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            &format!("unsupported Content-Encoding \"{other}\""),
            None,
        )),
    }
}

#[allow(clippy::too_many_arguments)]
async fn write(
    state: &AppState,
    principal: &Principal,
    headers: &HeaderMap,
    db: Option<&str>,
    missing: &str,
    options: WriteOptions,
    body: Bytes,
) -> Response {
    let Some(db) = db.filter(|d| !d.is_empty()) else {
        return error_response(
            StatusCode::BAD_REQUEST,
            &format!("missing required query parameter \"{missing}\""),
            None,
        );
    };
    if let Some(refused) = auth::forbidden(principal, &Need::Database(Access::Write, db.into())) {
        return refused;
    }
    let body = match decode_body(headers, body, state.request_bytes_max) {
        Ok(body) => body,
        Err(response) => return response,
    };
    // As InfluxDB 3: a body that is not UTF-8 is refused whole, and one without a point too.
    if let Err(e) = std::str::from_utf8(&body) {
        let at = e.valid_up_to();
        let line = body[..at].iter().filter(|&&b| b == b'\n').count() + 1;
        return error_response(
            StatusCode::BAD_REQUEST,
            &format!("the body is not valid UTF-8: line {line}, byte {} of the body", at + 1),
            None,
        );
    }
    if crate::line_protocol::lines(&body).next().is_none() {
        return error_response(
            StatusCode::BAD_REQUEST,
            "empty write: the body has no lines (only blank lines and comments)",
            None,
        );
    }
    match state.query.engine().write_lp(db, &body, options).await {
        Ok(outcome) if outcome.rejected.is_empty() => StatusCode::NO_CONTENT.into_response(),
        Ok(outcome) => error_response(
            StatusCode::BAD_REQUEST,
            &format!(
                "partial write of line protocol occurred: {} lines stored, {}",
                outcome.lines_stored,
                outcome.rejected.summary()
            ),
            Some(&outcome.rejected.lines),
        ),
        Err(engine::Error::Rejected(rejected)) => error_response(
            StatusCode::BAD_REQUEST,
            &format!(
                "parsing failed for write_lp endpoint: {}, nothing stored",
                rejected.summary()
            ),
            Some(&rejected.lines),
        ),
        Err(engine::Error::Wal(e)) if matches!(*e, crate::wal::Error::RecordTooLarge { .. }) => {
            body_too_large(state.request_bytes_max)
        }
        Err(e) => {
            let status = status_of(e.kind());
            if status.is_server_error() && status != StatusCode::SERVICE_UNAVAILABLE {
                tracing::error!(error = %e, db, "write failed");
            }
            error_response(status, &e.to_string(), None)
        }
    }
}

/// The time of a point written without a timestamp: now, in the request's precision.
fn receipt_time(state: &AppState, precision: Precision) -> i64 {
    precision.truncate(state.query.engine().clock().now_ns())
}

#[allow(clippy::result_large_err)]
fn precision_or_error(name: Option<&str>, default: Precision) -> Result<Precision, Response> {
    match name {
        None => Ok(default),
        Some(p) => Precision::parse(p).ok_or_else(|| {
            error_response(StatusCode::BAD_REQUEST, &format!("invalid precision \"{p}\""), None)
        }),
    }
}

#[derive(Deserialize)]
struct V1Params {
    db: Option<String>,
    precision: Option<String>,
    #[allow(dead_code)]
    rp: Option<String>,
    #[allow(dead_code)]
    u: Option<String>,
    #[allow(dead_code)]
    p: Option<String>,
}

async fn write_v1(
    State(state): State<AppState>,
    Query(params): Query<V1Params>,
    Extension(principal): Extension<Principal>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let precision = match precision_or_error(params.precision.as_deref(), Precision::Nanosecond) {
        Ok(p) => p,
        Err(r) => return r,
    };
    let options = WriteOptions {
        precision,
        accept_partial: true,
        no_sync: false,
        default_time_ns: receipt_time(&state, precision),
    };
    write(&state, &principal, &headers, params.db.as_deref(), "db", options, body).await
}

#[derive(Deserialize)]
struct V2Params {
    bucket: Option<String>,
    #[allow(dead_code)]
    org: Option<String>,
    precision: Option<String>,
}

async fn write_v2(
    State(state): State<AppState>,
    Query(params): Query<V2Params>,
    Extension(principal): Extension<Principal>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let precision = match precision_or_error(params.precision.as_deref(), Precision::Nanosecond) {
        Ok(p) => p,
        Err(r) => return r,
    };
    let options = WriteOptions {
        precision,
        accept_partial: true,
        no_sync: false,
        default_time_ns: receipt_time(&state, precision),
    };
    write(&state, &principal, &headers, params.bucket.as_deref(), "bucket", options, body).await
}

#[derive(Deserialize)]
struct V3Params {
    db: Option<String>,
    precision: Option<String>,
    accept_partial: Option<bool>,
    no_sync: Option<bool>,
}

async fn write_v3(
    State(state): State<AppState>,
    Query(params): Query<V3Params>,
    Extension(principal): Extension<Principal>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let precision = match precision_or_error(params.precision.as_deref(), Precision::Auto) {
        Ok(p) => p,
        Err(r) => return r,
    };
    let options = WriteOptions {
        precision,
        accept_partial: params.accept_partial.unwrap_or(true),
        no_sync: params.no_sync.unwrap_or(false),
        default_time_ns: receipt_time(&state, precision),
    };
    write(&state, &principal, &headers, params.db.as_deref(), "db", options, body).await
}

async fn ping() -> Response {
    let mut response = StatusCode::NO_CONTENT.into_response();
    let headers = response.headers_mut();
    headers.insert("X-Influxdb-Version", HeaderValue::from_static(VERSION));
    headers.insert("X-Influxdb-Build", HeaderValue::from_static("sundial"));
    response
}

/// `pass` while writes can be made durable; `fail` (503) while the WAL cannot write, e.g. on
/// a full disk, with the reason. Queries are answered either way.
async fn health(State(state): State<AppState>) -> Response {
    match state.query.engine().write_failure() {
        None => Json(json!({ "name": "sundial", "message": "ready for queries and writes", "status": "pass", "version": VERSION })).into_response(),
        Some(reason) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({ "name": "sundial", "message": format!("writes are refused: {reason}"), "status": "fail", "version": VERSION })),
        )
            .into_response(),
    }
}

#[derive(Deserialize, Default)]
struct InfluxQlParams {
    q: Option<String>,
}

/// The InfluxQL endpoint, for what v1 clients send before writing: `CREATE DATABASE`,
/// `DROP DATABASE` (InfluxDB 1.x answers success when it does not exist) and `SHOW DATABASES`. SQL goes to `/api/v3/query_sql`.
async fn influxql(
    method: axum::http::Method,
    State(state): State<AppState>,
    Query(params): Query<InfluxQlParams>,
    Extension(principal): Extension<Principal>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let form_q = || {
        let is_form = headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("application/x-www-form-urlencoded"));
        if !is_form {
            return None;
        }
        url::form_urlencoded::parse(&body).find(|(k, _)| k == "q").map(|(_, v)| v.into_owned())
    };
    let Some(q) = params.q.or_else(form_q) else {
        return error_response(StatusCode::BAD_REQUEST, "missing required parameter \"q\"", None);
    };
    let only = || {
        error_response(
            StatusCode::BAD_REQUEST,
            "only CREATE DATABASE, DROP DATABASE and SHOW DATABASES are supported on /query; send SQL to /api/v3/query_sql",
            None,
        )
    };
    // InfluxQL's database statements read as SQL; the pipeline parses them like any other.
    let ok = || Json(json!({ "results": [{ "statement_id": 0 }] })).into_response();
    // InfluxDB 1.x too takes CREATE and DROP only by POST.
    let read_only = method != axum::http::Method::POST;
    let statement = match crate::statement::parse(&q) {
        Ok(mut statements) if statements.len() == 1 => statements.remove(0),
        _ => {
            let engine = state.query.engine();
            let quirk = crate::statement::quirks::influxql_database(&q);
            if read_only && quirk.is_some() {
                return use_post();
            }
            use crate::statement::quirks::InfluxQlDatabase;
            let need = match &quirk {
                Some(InfluxQlDatabase::Create { name, .. }) => {
                    Need::Database(Access::Write, name.clone())
                }
                Some(InfluxQlDatabase::Drop { .. }) => Need::Admin,
                None => return only(),
            };
            if let Some(refused) = auth::forbidden(&principal, &need) {
                return refused;
            }
            let done = match quirk {
                Some(InfluxQlDatabase::Create { name, duration }) => {
                    let retention = match duration.as_deref().map(Retention::parse).transpose() {
                        Ok(retention) => retention,
                        Err(reason) => {
                            return error_response(StatusCode::BAD_REQUEST, &reason, None)
                        }
                    };
                    engine.create_database_with(&name, retention).await.map(|_| ())
                }
                Some(InfluxQlDatabase::Drop { name }) => {
                    engine.drop_database(&name).await.map(|_| ())
                }
                None => return only(),
            };
            return match done {
                Ok(()) => ok(),
                Err(e) => error_response(status_of(e.kind()), &e.to_string(), None),
            };
        }
    };
    let last_name = |name: &ObjectName| {
        name.0.last().and_then(|p| p.as_ident()).map(|i| i.value.clone()).unwrap_or_default()
    };
    if read_only && !matches!(statement, Statement::ShowDatabases { .. }) {
        return use_post();
    }
    let need = match &statement {
        Statement::CreateDatabase { db_name, .. } => {
            Some(Need::Database(Access::Write, last_name(db_name)))
        }
        Statement::Drop { object_type: ObjectType::Database, .. } => Some(Need::Admin),
        _ => None,
    };
    if let Some(refused) = need.and_then(|need| auth::forbidden(&principal, &need)) {
        return refused;
    }
    match statement {
        Statement::CreateDatabase { db_name, .. } => {
            match state.query.engine().create_database(&last_name(&db_name)).await {
                Ok(_) => ok(),
                Err(e) => error_response(status_of(e.kind()), &e.to_string(), None),
            }
        }
        Statement::Drop { object_type: ObjectType::Database, names, .. } if names.len() == 1 => {
            match state.query.engine().drop_database(&last_name(&names[0])).await {
                Ok(_) => ok(),
                Err(e) => error_response(status_of(e.kind()), &e.to_string(), None),
            }
        }
        Statement::ShowDatabases { .. } => {
            // Only the databases the token may read or write.
            let catalog = state.query.engine().catalog();
            let names: Vec<_> = catalog
                .database_names()
                .filter(|n| principal.may(Access::Read, n) || principal.may(Access::Write, n))
                .map(|n| json!([n]))
                .collect();
            Json(json!({ "results": [{ "statement_id": 0, "series": [{ "name": "databases", "columns": ["name"], "values": names }] }] })).into_response()
        }
        _ => only(),
    }
}

#[derive(Deserialize, Default)]
struct SqlParams {
    db: Option<String>,
    q: Option<String>,
    format: Option<String>,
}

async fn query_get(
    State(state): State<AppState>,
    Query(params): Query<SqlParams>,
    Extension(principal): Extension<Principal>,
    headers: HeaderMap,
) -> Response {
    run_sql(&state, &principal, params, &headers, true).await
}

async fn query_post(
    State(state): State<AppState>,
    Query(params): Query<SqlParams>,
    Extension(principal): Extension<Principal>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let mut merged = params;
    if !body.is_empty() {
        match serde_json::from_slice::<SqlParams>(&body) {
            Ok(from_body) => {
                merged.db = from_body.db.or(merged.db);
                merged.q = from_body.q.or(merged.q);
                merged.format = from_body.format.or(merged.format);
            }
            Err(e) => {
                return error_response(
                    StatusCode::BAD_REQUEST,
                    &format!("request body is not valid JSON: {e}"),
                    None,
                )
            }
        }
    }
    run_sql(&state, &principal, merged, &headers, false).await
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Format {
    Json,
    JsonLines,
    Csv,
    Pretty,
    Parquet,
    Arrow,
}

impl Format {
    fn parse(name: &str) -> Option<Format> {
        Some(match name {
            "json" => Format::Json,
            "jsonl" => Format::JsonLines,
            "csv" => Format::Csv,
            "pretty" => Format::Pretty,
            "parquet" => Format::Parquet,
            "arrow" => Format::Arrow,
            _ => return None,
        })
    }

    fn from_accept(accept: &str) -> Option<Format> {
        accept.split(',').map(|a| a.split(';').next().unwrap_or("").trim()).find_map(|mime| {
            Some(match mime {
                "application/json" => Format::Json,
                "application/jsonl" | "application/x-ndjson" => Format::JsonLines,
                "text/csv" => Format::Csv,
                "text/plain" => Format::Pretty,
                "application/vnd.apache.parquet" => Format::Parquet,
                "application/vnd.apache.arrow.stream" => Format::Arrow,
                _ => return None,
            })
        })
    }

    fn content_type(self) -> &'static str {
        match self {
            Format::Json => "application/json",
            Format::JsonLines => "application/jsonl",
            Format::Csv => "text/csv; charset=utf-8",
            Format::Pretty => "text/plain; charset=utf-8",
            Format::Parquet => "application/vnd.apache.parquet",
            Format::Arrow => "application/vnd.apache.arrow.stream",
        }
    }
}

/// Runs one statement of `/api/v3/query_sql`; `read_only` (a `GET`) refuses what changes data.
async fn run_sql(
    state: &AppState,
    principal: &Principal,
    params: SqlParams,
    headers: &HeaderMap,
    read_only: bool,
) -> Response {
    let Some(db) = params.db.filter(|d| !d.is_empty()) else {
        return error_response(StatusCode::BAD_REQUEST, "missing required parameter \"db\"", None);
    };
    let Some(q) = params.q.filter(|q| !q.trim().is_empty()) else {
        return error_response(StatusCode::BAD_REQUEST, "missing required parameter \"q\"", None);
    };
    let format = match params.format.as_deref() {
        Some(name) => match Format::parse(name) {
            Some(f) => f,
            None => {
                return error_response(
                    StatusCode::BAD_REQUEST,
                    &format!(
                        "unknown format \"{name}\"; use json, jsonl, csv, pretty, parquet or arrow"
                    ),
                    None,
                )
            }
        },
        None => headers
            .get(header::ACCEPT)
            .and_then(|v| v.to_str().ok())
            .and_then(Format::from_accept)
            .unwrap_or(Format::Json),
    };
    let command = match crate::statement::command(&q) {
        Ok(Some(command)) => command,
        Ok(None) => {
            return error_response(StatusCode::BAD_REQUEST, "the query has no statement", None)
        }
        Err(e) => return error_response(status_of(e.kind()), &e.to_string(), None),
    };
    if read_only && crate::statement::changes_data(&command) {
        return use_post();
    }
    let needs = crate::auth::need(&command, &db);
    if let Some(refused) = principal.lacks(&needs).and_then(|need| auth::forbidden(principal, need))
    {
        return refused;
    }
    let statement = match command {
        Command::Query(statement) => statement,
        Command::Ddl(statement) => {
            return match crate::query::ddl::execute(&state.query, &db, *statement).await {
                Ok(_) => Json(json!([])).into_response(),
                Err(e) => error_response(status_of(e.kind()), &e.to_string(), None),
            };
        }
        Command::Retention(statement) => {
            return match crate::query::ddl::retention(&state.query, &db, statement).await {
                Ok(_) => Json(json!([])).into_response(),
                Err(e) => error_response(status_of(e.kind()), &e.to_string(), None),
            };
        }
        Command::Subscribe { view, .. } => {
            return error_response(
                StatusCode::BAD_REQUEST,
                &format!(
                    "COPY (SUBSCRIBE …) needs a Postgres connection; over HTTP, read \
                     GET /api/v3/views/{view}/changes?db={db} (Server-Sent Events)"
                ),
                None,
            )
        }
        Command::Alert(statement) => {
            return match crate::alerts::ddl::execute(&state.query, &db, *statement).await {
                Ok(_) => Json(json!([])).into_response(),
                Err(e) => error_response(status_of(e.kind()), &e.to_string(), None),
            };
        }
        Command::Refresh { view } => {
            return match state.query.views().refresh_now(&state.query, &db, &view).await {
                Ok(()) => Json(json!([])).into_response(),
                Err(e) => error_response(status_of(e.kind()), &e.to_string(), None),
            };
        }
        // Writes are committed as they happen; there is nothing to begin or end.
        Command::Transaction(_) | Command::NoOp { .. } => return Json(json!([])).into_response(),
        Command::Copy(_)
        | Command::Cursor(_)
        | Command::Declare { .. }
        | Command::Show { .. }
        | Command::Set(_)
        | Command::Reset { .. } => {
            return error_response(
                StatusCode::BAD_REQUEST,
                "COPY, cursors and session settings (SHOW, SET, RESET) need a Postgres \
                 connection; HTTP queries have no session",
                None,
            )
        }
    };
    let collected = match state.query.run(&db, *statement).await {
        Ok(result) => result,
        Err(e) => {
            // A query over the memory limit is the query's problem (too large), not the
            // server's state: 400, as 53200 on Postgres.
            let status = match e.kind() {
                ErrorKind::ResourceExhausted => StatusCode::BAD_REQUEST,
                kind => status_of(kind),
            };
            if status == StatusCode::INTERNAL_SERVER_ERROR {
                tracing::error!(error = %e, db, "query failed");
            }
            return error_response(status, &e.to_string(), None);
        }
    };
    let encoded = tokio::task::spawn_blocking(move || {
        let collected = collected;
        let body = encode(format, &collected.schema, &collected.batches)?;
        // The encoded body counts too, while it exists beside the rows.
        match collected.reservation.try_grow(body.len()) {
            Ok(()) => Ok::<_, Box<dyn std::error::Error + Send + Sync>>(Ok(body)),
            Err(e) => Ok(Err(e.to_string())),
        }
    })
    .await;
    match encoded {
        Ok(Ok(Ok(body))) => ([(header::CONTENT_TYPE, format.content_type())], body).into_response(),
        Ok(Ok(Err(too_large))) => error_response(
            StatusCode::BAD_REQUEST,
            &format!("the result is larger than the query memory limit: {too_large}"),
            None,
        ),
        Ok(Err(e)) => error_response(
            StatusCode::INTERNAL_SERVER_ERROR,
            &format!("encoding the result: {e}"),
            None,
        ),
        Err(e) => error_response(
            StatusCode::INTERNAL_SERVER_ERROR,
            &format!("encoding task failed: {e}"),
            None,
        ),
    }
}

fn encode(
    format: Format,
    schema: &SchemaRef,
    batches: &[RecordBatch],
) -> Result<Vec<u8>, Box<dyn std::error::Error + Send + Sync>> {
    let mut out = Vec::new();
    match format {
        Format::Json => {
            let (_, batches) = crate::query::plain(schema, batches)?;
            let mut writer = arrow::json::ArrayWriter::new(&mut out);
            for b in &batches {
                writer.write(b)?;
            }
            writer.finish()?;
            if out.is_empty() {
                out.extend_from_slice(b"[]");
            }
        }
        Format::JsonLines => {
            let (_, batches) = crate::query::plain(schema, batches)?;
            let mut writer = arrow::json::LineDelimitedWriter::new(&mut out);
            for b in &batches {
                writer.write(b)?;
            }
            writer.finish()?;
        }
        Format::Csv => {
            let (schema, batches) = crate::query::plain(schema, batches)?;
            if batches.is_empty() {
                let names: Vec<_> = schema.fields().iter().map(|f| f.name().as_str()).collect();
                out.extend_from_slice(names.join(",").as_bytes());
                out.push(b'\n');
            }
            let mut writer = arrow::csv::WriterBuilder::new().with_header(true).build(&mut out);
            for b in &batches {
                writer.write(b)?;
            }
        }
        Format::Pretty => {
            let text = arrow::util::pretty::pretty_format_batches(batches)?.to_string();
            out.extend_from_slice(text.as_bytes());
            out.push(b'\n');
        }
        Format::Parquet => {
            let mut writer = parquet::arrow::ArrowWriter::try_new(&mut out, schema.clone(), None)?;
            for b in batches {
                writer.write(b)?;
            }
            writer.close()?;
        }
        Format::Arrow => {
            let mut writer = arrow::ipc::writer::StreamWriter::try_new(&mut out, schema)?;
            for b in batches {
                writer.write(b)?;
            }
            writer.finish()?;
        }
    }
    Ok(out)
}
