//! `GET /api/v3/views/{name}/changes?db=…[&snapshot=true]`: a materialized view's changes as
//! Server-Sent Events. First (with `snapshot=true`) one `snapshot` event with every row, or a
//! `ready` event; then one `change` event per change set (`[{"op": "upsert"|"delete", "row":
//! {…}}]`), each with `id:` = the base sequence number it reflects. `Last-Event-ID` resumes
//! after that change while it is retained; otherwise, and for a view rebuilt from scratch or a
//! client that falls too far behind, an `error` event says to take a new snapshot and the
//! stream ends. Comments keep an idle stream alive.

use std::convert::Infallible;
use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Extension;
use futures::StreamExt;
use serde::Deserialize;
use tokio::sync::broadcast::error::RecvError;

use super::{auth, error_response, status_of, AppState};
use crate::auth::{Access, Need, Principal};
use crate::views::changes::{ChangeId, ChangeSet, Event, Subscription};

/// How often an idle stream gets a comment line.
const HEARTBEAT: Duration = Duration::from_secs(5);

#[derive(Debug, Deserialize)]
pub(super) struct ChangesParams {
    db: Option<String>,
    snapshot: Option<bool>,
}

fn error_event(message: &str) -> SseEvent {
    SseEvent::default().event("error").data(serde_json::json!({ "error": message }).to_string())
}

fn change_event(set: &ChangeSet) -> Result<SseEvent, SseEvent> {
    if set.events.iter().any(|e| matches!(e, Event::Reset)) {
        return Err(error_event("the view was rebuilt from scratch: take a new snapshot"));
    }
    Ok(SseEvent::default().event("change").id(set.id.to_string()).data(set.to_json().to_string()))
}

pub(super) async fn view_changes(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    Path(name): Path<String>,
    Query(params): Query<ChangesParams>,
    headers: HeaderMap,
) -> Response {
    let Some(db) = params.db.filter(|d| !d.is_empty()) else {
        return error_response(StatusCode::BAD_REQUEST, "missing required parameter \"db\"", None);
    };
    if let Some(refused) = auth::forbidden(&principal, &Need::Database(Access::Read, db.clone())) {
        return refused;
    }
    let since = match headers.get("last-event-id").map(|v| v.to_str().ok()) {
        None => None,
        Some(text) => match text.and_then(|t| t.parse::<ChangeId>().ok()) {
            Some(id) => Some(id),
            None => {
                return error_response(
                    StatusCode::BAD_REQUEST,
                    "Last-Event-ID is not a change id (a sequence number, or seq.n)",
                    None,
                )
            }
        },
    };
    let views = state.query.views().clone();
    let subscription = match views.subscribe(&state.query, &db, &name, since).await {
        Ok(s) => s,
        Err(e) => return error_response(status_of(e.kind()), &e.to_string(), None),
    };
    let Subscription { snapshot, backlog, live, guard } = subscription;
    let mut first = Vec::new();
    if let Some((id, batches)) = snapshot {
        let event = SseEvent::default().id(id.to_string());
        if params.snapshot.unwrap_or(false) {
            let rows: Vec<serde_json::Value> = batches
                .iter()
                .filter_map(crate::views::changes::json_rows)
                .flatten()
                .map(serde_json::Value::Object)
                .collect();
            first.push(event.event("snapshot").data(serde_json::Value::Array(rows).to_string()));
        } else {
            first.push(event.event("ready").data("{}"));
        }
    }
    if backlog.iter().any(|set| set.events.contains(&Event::Reset)) {
        // Refused before the stream starts: an EventSource stops on a status other than 200,
        // where an error event would have it reconnect with the same id again and again.
        return error_response(
            StatusCode::GONE,
            "the view was rebuilt from scratch since that change: take a new snapshot",
            None,
        );
    }
    let mut ended = false;
    for set in &backlog {
        match change_event(set) {
            Ok(event) => first.push(event),
            Err(error) => {
                first.push(error);
                ended = true;
                break;
            }
        }
    }
    let head = futures::stream::iter(first.into_iter().map(Ok::<_, Infallible>));
    let tail =
        futures::stream::unfold((live, guard, ended), |(mut live, guard, ended)| async move {
            if ended {
                return None;
            }
            let event = match live.recv().await {
                Ok(set) => match change_event(&set) {
                    Ok(event) => return Some((Ok(event), (live, guard, false))),
                    Err(error) => error,
                },
                Err(RecvError::Lagged(n)) => error_event(&format!(
                    "slow consumer: {n} change sets were not read in time; disconnected, take \
                     a new snapshot"
                )),
                Err(RecvError::Closed) => return None,
            };
            Some((Ok(event), (live, guard, true)))
        });
    Sse::new(head.chain(tail)).keep_alive(KeepAlive::new().interval(HEARTBEAT)).into_response()
}
