//! Interactions and sessions: start one, read it, page its events, cancel it.

use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::time::Duration;

use super::auth::Org;
use super::callbacks::delivery_json;
use super::stream;
use super::{page, page_limit, ApiError, ApiResult, AppState, Id, JsonBody, JsonResponse};
use crate::domain::{new_id, now_ms, rfc3339, Event, InputMessage, Role, Session, SessionStatus};
use crate::store::{CancelResult, Created, NewSession, Outcome};
use crate::worker;

/// Bounds on an interaction request.
pub const MAX_MESSAGE_CHARS: usize = 100_000;
pub const MAX_MESSAGES: usize = 100;
pub const MAX_METADATA_BYTES: usize = 16 * 1024;
pub const MAX_CALLBACK_URL_CHARS: usize = 2048;
pub const MAX_IDEMPOTENCY_KEY_CHARS: usize = 255;

/// `POST /v1/agents/{id}/interact` as clients send it.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InteractRequest {
    message: Option<String>,
    messages: Option<Vec<RawMessage>>,
    callback_url: Option<String>,
    metadata: Option<Value>,
}

#[derive(Debug, Deserialize)]
#[serde(expecting = "a message: an object with \"role\" and \"content\"")]
struct RawMessage {
    role: Role,
    content: Content,
}

/// Message content: a string, or a list of text parts as chat APIs send it.
#[derive(Debug, Deserialize)]
#[serde(
    untagged,
    expecting = "a string, or a list of {\"type\": \"text\", \"text\"} parts"
)]
enum Content {
    Text(String),
    Parts(Vec<TextPart>),
}

#[derive(Debug, Deserialize)]
#[serde(expecting = "a text part: {\"type\": \"text\", \"text\": ...}")]
struct TextPart {
    #[serde(rename = "type")]
    kind: String,
    text: String,
}

impl Content {
    fn into_text(self, field: &str) -> ApiResult<String> {
        match self {
            Content::Text(text) => Ok(text),
            Content::Parts(parts) => {
                if let Some(part) = parts.iter().find(|part| part.kind != "text") {
                    let message = format!("only text parts are supported, not {:?}", part.kind);
                    return Err(ApiError::field(field, message));
                }
                Ok(parts
                    .into_iter()
                    .map(|part| part.text)
                    .collect::<Vec<_>>()
                    .join("\n"))
            }
        }
    }
}

/// An interaction request after every check.
struct Interaction {
    input: Vec<InputMessage>,
    callback_url: Option<String>,
    metadata: Option<Value>,
}

impl InteractRequest {
    fn parse(self, state: &AppState) -> ApiResult<Interaction> {
        let input = match (self.message, self.messages) {
            (Some(_), Some(_)) => {
                return Err(ApiError::field(
                    "messages",
                    "send either message or messages",
                ))
            }
            (None, None) => {
                let message = "is required: send message (a string) or messages (a list)";
                return Err(ApiError::field("message", message));
            }
            (Some(text), None) => {
                check_content("message", &text)?;
                vec![InputMessage {
                    role: Role::User,
                    content: text,
                }]
            }
            (None, Some(list)) => parse_messages(list)?,
        };

        let callback_url = self
            .callback_url
            .map(|raw| check_callback(state, &raw))
            .transpose()?;
        if let Some(metadata) = &self.metadata {
            check_metadata(metadata)?;
        }
        Ok(Interaction {
            input,
            callback_url,
            metadata: self.metadata,
        })
    }
}

fn check_content(field: &str, text: &str) -> ApiResult<()> {
    if text.trim().is_empty() {
        return Err(ApiError::field(field, "must not be empty"));
    }
    if text.chars().count() > MAX_MESSAGE_CHARS {
        let message = format!("must be at most {MAX_MESSAGE_CHARS} characters");
        return Err(ApiError::field(field, message));
    }
    Ok(())
}

fn parse_messages(list: Vec<RawMessage>) -> ApiResult<Vec<InputMessage>> {
    if list.is_empty() {
        return Err(ApiError::field("messages", "must not be empty"));
    }
    if list.len() > MAX_MESSAGES {
        let message = format!("must hold at most {MAX_MESSAGES} messages");
        return Err(ApiError::field("messages", message));
    }
    if !list.iter().any(|raw| raw.role == Role::User) {
        return Err(ApiError::field("messages", "must hold a user message"));
    }
    list.into_iter()
        .enumerate()
        .map(|(i, raw)| {
            let field = format!("messages[{i}].content");
            let content = raw.content.into_text(&field)?;
            check_content(&field, &content)?;
            Ok(InputMessage {
                role: raw.role,
                content,
            })
        })
        .collect()
}

/// The callback URL as it will be stored and requested. The length limit
/// applies to that form, in which non-ASCII characters are percent-encoded.
fn check_callback(state: &AppState, raw: &str) -> ApiResult<String> {
    let too_long = |how: &str| {
        let message = format!("must be at most {MAX_CALLBACK_URL_CHARS} characters{how}");
        Err(ApiError::field("callback_url", message))
    };
    if raw.chars().count() > MAX_CALLBACK_URL_CHARS {
        return too_long("");
    }
    let url = match state.guard.check_url(raw) {
        Ok(url) => url.as_str().to_owned(),
        Err(error) => return Err(ApiError::field("callback_url", error.to_string())),
    };
    if url.len() > MAX_CALLBACK_URL_CHARS {
        return too_long(" once percent-encoded");
    }
    Ok(url)
}

fn check_metadata(metadata: &Value) -> ApiResult<()> {
    if !metadata.is_object() {
        return Err(ApiError::field("metadata", "must be a JSON object"));
    }
    let size = serde_json::to_vec(metadata).map_or(usize::MAX, |bytes| bytes.len());
    if size > MAX_METADATA_BYTES {
        let message = format!("must be at most {MAX_METADATA_BYTES} bytes as JSON");
        return Err(ApiError::field("metadata", message));
    }
    Ok(())
}

fn idempotency_key(headers: &HeaderMap) -> ApiResult<Option<String>> {
    let mut values = headers.get_all("idempotency-key").iter();
    let Some(value) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err(ApiError::field("Idempotency-Key", "must be sent once"));
    }
    let key = value.to_str().unwrap_or_default();
    let printable = key.bytes().all(|b| b.is_ascii_graphic() || b == b' ');
    if key.is_empty() || key.len() > MAX_IDEMPOTENCY_KEY_CHARS || !printable {
        let message =
            format!("must be 1 to {MAX_IDEMPOTENCY_KEY_CHARS} printable ASCII characters");
        return Err(ApiError::field("Idempotency-Key", message));
    }
    Ok(Some(key.to_owned()))
}

pub async fn interact(
    State(state): State<AppState>,
    org: Org,
    Id(agent_id): Id,
    headers: HeaderMap,
    JsonBody(request): JsonBody<InteractRequest>,
) -> ApiResult<JsonResponse> {
    let interaction = request.parse(&state)?;
    let idempotency_key = idempotency_key(&headers)?;
    let agent = state.store.agent(&org.id, &agent_id).await?;
    let agent = agent.ok_or(ApiError::NotFound("agent"))?;

    let is_async = interaction.callback_url.is_some();
    let fingerprint = fingerprint(&agent_id, &interaction);
    let new = NewSession {
        id: new_id(),
        org_id: org.id.clone(),
        agent,
        input: interaction.input,
        metadata: interaction.metadata,
        callback_url: interaction.callback_url,
        idempotency_key,
        fingerprint,
        created_at: now_ms(),
    };
    let (session_id, status) = match state.store.create_session(new).await? {
        Created::New(id) => {
            state.work_ready.notify_one();
            tracing::debug!(session.id = %id, agent.id = %agent_id, "session queued");
            (id, SessionStatus::Queued)
        }
        Created::Existing(id) => {
            // A repeated key answers with the session as it now stands.
            let session = state.store.session(&org.id, &id).await?;
            let status = session.map_or(SessionStatus::Queued, |session| session.status);
            (id, status)
        }
        Created::KeyReused => return Err(ApiError::IdempotencyKeyReused),
    };

    if is_async {
        let body = json!({
            "session_id": session_id,
            "events_url": state.events_url(&session_id),
            "status": status.as_str(),
        });
        return Ok((StatusCode::ACCEPTED, Json(body)));
    }
    let session = wait_for_end(&state, &org.id, &session_id).await?;
    Ok((StatusCode::OK, Json(result_json(&state, &session))))
}

/// SHA-256 of the agent and everything the interaction asked for.
fn fingerprint(agent_id: &str, interaction: &Interaction) -> Vec<u8> {
    let asked = json!([
        agent_id,
        interaction.input,
        interaction.callback_url,
        interaction.metadata
    ]);
    Sha256::digest(asked.to_string().as_bytes()).to_vec()
}

/// Waits until the session ends or the sync timeout passes, whichever first.
async fn wait_for_end(state: &AppState, org_id: &str, session_id: &str) -> ApiResult<Session> {
    let mut finished = state.finished.subscribe();
    let deadline = tokio::time::Instant::now() + state.sync_timeout;
    loop {
        let session = state.store.session(org_id, session_id).await?;
        let session = session.ok_or(ApiError::NotFound("session"))?;
        let stopping = *state.stopping.borrow();
        if session.status.is_terminal() || stopping || tokio::time::Instant::now() >= deadline {
            return Ok(session);
        }

        // Another process may run the session, so the store is asked again
        // at least every second even without a local announcement.
        let wake = tokio::time::Instant::now() + Duration::from_secs(1);
        let until = wake.min(deadline);
        let mut stopping = state.stopping.clone();
        let _ = tokio::time::timeout_at(until, async {
            loop {
                tokio::select! {
                    id = finished.recv() => match id {
                        Ok(id) if id == session_id => break,
                        Ok(_) => {}
                        Err(_) => break,
                    },
                    // At shutdown, answer with the session as it stands.
                    Ok(()) = stopping.changed() => break,
                }
            }
        })
        .await;
    }
}

fn result_json(state: &AppState, session: &Session) -> Value {
    json!({
        "session_id": session.id,
        "status": session.status,
        "output": session.output,
        "error": session.error,
        "events_url": state.events_url(&session.id),
    })
}

pub async fn show(
    State(state): State<AppState>,
    org: Org,
    Id(session_id): Id,
) -> ApiResult<Json<Value>> {
    let session = state.store.session(&org.id, &session_id).await?;
    let session = session.ok_or(ApiError::NotFound("session"))?;
    let delivery = state.store.delivery_for_session(&session.id).await?;

    let mut body = result_json(&state, &session);
    body["id"] = json!(session.id);
    body["agent_id"] = json!(session.agent_id);
    body["metadata"] = json!(session.metadata);
    body["created_at"] = json!(rfc3339(session.created_at));
    body["started_at"] = json!(session.started_at.map(rfc3339));
    body["completed_at"] = json!(session.completed_at.map(rfc3339));
    body["callback_url"] = json!(session.callback_url);
    body["callback"] = delivery.as_ref().map_or(Value::Null, delivery_json);
    Ok(Json(body))
}

pub async fn events(
    State(state): State<AppState>,
    org: Org,
    Id(session_id): Id,
    headers: HeaderMap,
    Query(query): Query<HashMap<String, String>>,
) -> ApiResult<Response> {
    let limit = page_limit(query.get("limit").map(String::as_str), 100, 1000)?;
    let resume = headers
        .get("last-event-id")
        .map(|v| v.to_str().unwrap_or("?"));
    let (field, raw) = match resume {
        Some(raw) => ("Last-Event-ID", Some(raw)),
        None => ("after", query.get("after").map(String::as_str)),
    };
    let after = match raw {
        None => 0,
        Some(raw) => raw
            .trim()
            .parse::<i64>()
            .ok()
            .filter(|after| *after >= 0)
            .ok_or_else(|| ApiError::field(field, "must be a non-negative integer"))?,
    };
    if state.store.session(&org.id, &session_id).await?.is_none() {
        return Err(ApiError::NotFound("session"));
    }
    if wants_stream(&headers) {
        return Ok(stream::events(&state, org.id, session_id, after).into_response());
    }

    let rows = state.store.events(&session_id, after, limit + 1).await?;
    let (events, next_cursor) = page(rows, limit, |e| e.seq, event_json);
    let body = json!({ "events": events, "next_cursor": next_cursor });
    Ok(Json(body).into_response())
}

fn wants_stream(headers: &HeaderMap) -> bool {
    headers
        .get_all(axum::http::header::ACCEPT)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .any(|value| value.contains("text/event-stream"))
}

/// An event as both the paged and the streamed endpoint send it.
pub fn event_json(event: &Event) -> Value {
    json!({
        "seq": event.seq,
        "type": event.kind,
        "created_at": rfc3339(event.created_at),
        "data": event.data,
    })
}

pub async fn cancel(
    State(state): State<AppState>,
    org: Org,
    Id(session_id): Id,
) -> ApiResult<JsonResponse> {
    let session = state.store.session(&org.id, &session_id).await?;
    let session = session.ok_or(ApiError::NotFound("session"))?;
    let events_url = state.events_url(&session.id);
    let finish = worker::finish(
        &session,
        Outcome::Cancelled,
        events_url,
        state.callback_deadline,
    );

    let result = state
        .store
        .cancel_session(&org.id, &session_id, finish)
        .await?;
    let status = match result {
        CancelResult::NotFound => return Err(ApiError::NotFound("session")),
        CancelResult::AlreadyEnded => {
            return Err(ApiError::Conflict(format!(
                "session already {}",
                session.status.as_str()
            )))
        }
        CancelResult::Cancelled => {
            let _ = state.finished.send(session.id.clone());
            SessionStatus::Cancelled
        }
        CancelResult::Requested => {
            state.running.cancel(&session.id);
            SessionStatus::Running
        }
    };
    let body = json!({ "session_id": session.id, "status": status, "cancel_requested": true });
    Ok((StatusCode::ACCEPTED, Json(body)))
}
