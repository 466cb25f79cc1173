//! InfluxDB 3's configuration API for databases and tables, as far as Sundial keeps settings:
//!
//! - `POST /api/v3/configure/database` `{"db": "x", "retention_period": "30d"}` creates a
//!   database (409 if it exists), with a retention if one is given;
//! - `PUT /api/v3/configure/database` `{"db": "x", "retention_period": "7d"}` changes it
//!   (`"none"` keeps rows forever; `null` or absent clears it);
//! - `PUT /api/v3/configure/table` `{"db": "x", "table": "t", "retention_period": "1d"}` gives
//!   one table its own (`null` or absent: it follows its database again).
//!
//! Each is the SQL statement of the same meaning (`statement::retention`), run and authorised
//! as that statement is over `query_sql`.

use axum::extract::rejection::JsonRejection;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use serde::Deserialize;

use super::{auth, error_response, status_of, AppState};
use crate::auth::Principal;
use crate::statement::retention::{Statement, Target};
use crate::statement::Command;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatabaseSettings {
    db: String,
    #[serde(default)]
    retention_period: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TableSettings {
    db: String,
    table: String,
    #[serde(default)]
    retention_period: Option<String>,
}

pub async fn create_database(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    body: Result<Json<DatabaseSettings>, JsonRejection>,
) -> Response {
    let settings = match body {
        Ok(Json(settings)) => settings,
        Err(rejection) => return bad_body(rejection),
    };
    let statement = Statement::CreateDatabase {
        name: settings.db.clone(),
        if_not_exists: false,
        retention: settings.retention_period.unwrap_or_else(|| "none".into()),
    };
    run(&state, &principal, &settings.db, statement, StatusCode::CREATED).await
}

pub async fn update_database(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    body: Result<Json<DatabaseSettings>, JsonRejection>,
) -> Response {
    let settings = match body {
        Ok(Json(settings)) => settings,
        Err(rejection) => return bad_body(rejection),
    };
    let statement = Statement::Alter {
        target: Target::Database(settings.db.clone()),
        retention: settings.retention_period,
    };
    run(&state, &principal, &settings.db, statement, StatusCode::OK).await
}

pub async fn update_table(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    body: Result<Json<TableSettings>, JsonRejection>,
) -> Response {
    let settings = match body {
        Ok(Json(settings)) => settings,
        Err(rejection) => return bad_body(rejection),
    };
    let statement = Statement::Alter {
        target: Target::Table(settings.table),
        retention: settings.retention_period,
    };
    run(&state, &principal, &settings.db, statement, StatusCode::OK).await
}

fn bad_body(rejection: JsonRejection) -> Response {
    let status = match rejection.status() {
        StatusCode::PAYLOAD_TOO_LARGE => StatusCode::PAYLOAD_TOO_LARGE,
        _ => StatusCode::BAD_REQUEST,
    };
    error_response(status, &rejection.body_text(), None)
}

async fn run(
    state: &AppState,
    principal: &Principal,
    db: &str,
    statement: Statement,
    done: StatusCode,
) -> Response {
    let needs = crate::auth::need(&Command::Retention(statement.clone()), db);
    if let Some(refused) = principal.lacks(&needs).and_then(|need| auth::forbidden(principal, need))
    {
        return refused;
    }
    match crate::query::ddl::retention(&state.query, db, statement).await {
        Ok(_) => done.into_response(),
        Err(e) => error_response(status_of(e.kind()), &e.to_string(), None),
    }
}
