//! Authentication of HTTP requests and the token API. With auth on, every request but `/ping`
//! and `/health` presents a token — `Authorization: Bearer <token>` or `Token <token>` (v2/v3
//! clients), Basic with the token as password, or v1's `p=<token>` (Telegraf, influx 1.x) —
//! and handlers check what the holder may do (`auth::need`). With auth off every request is
//! `Principal::anyone()`.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use base64::Engine as _;
use serde::Deserialize;
use serde_json::json;

use super::{error_response, status_of, AppState};
use crate::auth::{Need, Permission, Principal, Tokens};

/// The token a request presents, if any.
fn presented(headers: &HeaderMap, query: Option<&str>) -> Option<String> {
    if let Some(value) = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()) {
        let (scheme, rest) = value.split_once(' ').unwrap_or((value, ""));
        let rest = rest.trim();
        if scheme.eq_ignore_ascii_case("bearer") || scheme.eq_ignore_ascii_case("token") {
            return Some(rest.to_string());
        }
        if scheme.eq_ignore_ascii_case("basic") {
            let decoded = base64::engine::general_purpose::STANDARD.decode(rest).ok()?;
            let text = String::from_utf8(decoded).ok()?;
            let (_user, password) = text.split_once(':')?;
            return Some(password.to_string());
        }
    }
    let query = query?;
    url::form_urlencoded::parse(query.as_bytes())
        .find(|(k, _)| k == "p")
        .map(|(_, v)| v.into_owned())
}

fn unauthorized(message: &str) -> Response {
    let mut response = error_response(StatusCode::UNAUTHORIZED, message, None);
    response
        .headers_mut()
        .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer realm=\"sundial\""));
    response
}

/// Middleware: who the request is, as an extension for the handlers.
pub async fn authenticate(
    State(state): State<AppState>,
    mut request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let principal = match &state.tokens {
        None => Principal::anyone(),
        Some(_) if matches!(request.uri().path(), "/ping" | "/health") => Principal::anyone(),
        Some(tokens) => {
            let Some(secret) = presented(request.headers(), request.uri().query()) else {
                return unauthorized(
                    "authentication required: send a token (Authorization: Bearer <token>)",
                );
            };
            let tokens = tokens.clone();
            match tokio::task::spawn_blocking(move || tokens.verify(&secret)).await {
                Ok(Ok(Some(principal))) => principal,
                Ok(Ok(None)) => return unauthorized("the token is not valid (unknown or revoked)"),
                Ok(Err(e)) => {
                    tracing::error!(error = %e, "reading the token store failed");
                    return error_response(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        "token store unavailable",
                        None,
                    );
                }
                Err(_) => {
                    return error_response(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        "token check failed",
                        None,
                    )
                }
            }
        }
    };
    request.extensions_mut().insert(principal);
    next.run(request).await
}

/// `None` if `principal` may do what `need` says; otherwise the 403 to answer.
pub fn forbidden(principal: &Principal, need: &Need) -> Option<Response> {
    (!principal.allows(need)).then(|| {
        error_response(
            StatusCode::FORBIDDEN,
            &format!("token \"{}\" lacks {need}", principal.name),
            None,
        )
    })
}

/// The token store, for an admin while authentication is on; otherwise the answer to give.
#[allow(clippy::result_large_err)]
fn admin_tokens(state: &AppState, principal: &Principal) -> Result<Arc<Tokens>, Response> {
    if let Some(refused) = forbidden(principal, &Need::Admin) {
        return Err(refused);
    }
    state.tokens.clone().ok_or_else(|| {
        error_response(
            StatusCode::BAD_REQUEST,
            "authentication is off (--auth on enables tokens)",
            None,
        )
    })
}

/// Runs a token-store change off the async workers (PBKDF2 and fsync take long); an error
/// becomes its answer.
#[allow(clippy::result_large_err)]
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, crate::auth::Error> + Send + 'static,
) -> Result<T, Response> {
    match tokio::task::spawn_blocking(work).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(e)) => Err(error_response(status_of(e.kind()), &e.to_string(), None)),
        Err(e) => Err(error_response(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string(), None)),
    }
}

#[derive(Deserialize)]
pub struct NewToken {
    name: String,
    permissions: Vec<String>,
}

/// `POST /api/v3/tokens {"name", "permissions": ["read:db", …]}` (admin): the new token,
/// shown only in this answer.
pub async fn create_token(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    Json(new): Json<NewToken>,
) -> Response {
    let tokens = match admin_tokens(&state, &principal) {
        Ok(tokens) => tokens,
        Err(response) => return response,
    };
    let name = new.name.clone();
    let created = blocking(move || {
        let permissions: Vec<_> =
            new.permissions.iter().map(|p| Permission::parse(p)).collect::<Result<_, _>>()?;
        tokens.create(&new.name, &permissions)
    })
    .await;
    match created {
        Ok(secret) => {
            (StatusCode::CREATED, Json(json!({ "name": name, "token": secret }))).into_response()
        }
        Err(response) => response,
    }
}

/// `GET /api/v3/tokens` (admin): names and permissions, never secrets.
pub async fn list_tokens(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
) -> Response {
    let tokens = match admin_tokens(&state, &principal) {
        Ok(tokens) => tokens,
        Err(response) => return response,
    };
    match blocking(move || tokens.list()).await {
        Ok(list) => Json(
            list.iter()
                .map(|p| {
                    let permissions: Vec<_> =
                        p.permissions.iter().map(ToString::to_string).collect();
                    json!({ "name": p.name, "permissions": permissions })
                })
                .collect::<Vec<_>>(),
        )
        .into_response(),
        Err(response) => response,
    }
}

/// `DELETE /api/v3/tokens/{name}` (admin): revoked from the next request on.
pub async fn revoke_token(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    Path(name): Path<String>,
) -> Response {
    let tokens = match admin_tokens(&state, &principal) {
        Ok(tokens) => tokens,
        Err(response) => return response,
    };
    match blocking(move || tokens.revoke(&name)).await {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(response) => response,
    }
}
