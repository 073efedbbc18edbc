//! The HTTP API: routes, authentication, request parsing and JSON errors.
//!
//! Handlers parse requests into domain types, call the store, and shape the
//! response; they never touch SQL.

mod agents;
mod auth;
mod callbacks;
mod error;
mod organization;
mod sessions;
mod stream;

pub use agents::DEFAULT_STEPS;
pub use auth::{generate_signing_secret, hash_key_secret, ApiKeyParts};
pub use callbacks::{attempt_json, delivery_json};
pub use error::{ApiError, ApiResult};
pub use organization::settings_json as org_settings_json;

use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, FromRequest, Request};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::de::DeserializeOwned;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{broadcast, Notify};

use crate::delivery::guard::Guard;
use crate::store::DynStore;

/// The largest request body accepted, in bytes.
pub const MAX_BODY_BYTES: usize = 1024 * 1024;

/// What every handler can reach.
#[derive(Clone)]
pub struct AppState {
    pub store: DynStore,
    pub guard: Guard,
    /// Base of every `events_url`, without a trailing slash.
    pub public_url: String,
    /// How long a call without `callback_url` waits for the result.
    pub sync_timeout: Duration,
    /// Wakes the workers when a session is queued.
    pub work_ready: Arc<Notify>,
    /// Wakes the dispatcher when a delivery is due at once.
    pub delivery_ready: Arc<Notify>,
    /// Announces sessions that reached a terminal state in this process.
    pub finished: broadcast::Sender<String>,
    /// Sessions running in this process, for cancel requests.
    pub running: crate::worker::Running,
    /// Seals new signing secrets at rest.
    pub secrets: crate::secrets::SecretBox,
    /// How long a request body may take to arrive once its head has (the
    /// same bound as `--header-timeout` puts on the head).
    pub body_timeout: Duration,
    /// Turns `true` when the server begins to shut down, so that long
    /// waits (event streams, synchronous calls) answer at once.
    pub stopping: tokio::sync::watch::Receiver<bool>,
    /// Callback deadline, used when a queued session is cancelled.
    pub callback_deadline: Duration,
}

impl AppState {
    /// The URL a client reads a session's events from.
    pub fn events_url(&self, session_id: &str) -> String {
        format!("{}/v1/agent-sessions/{session_id}/events", self.public_url)
    }
}

/// All routes, with the body limit and JSON fallbacks.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/v1/agents", post(agents::create).get(agents::list))
        .route(
            "/v1/agents/{agent_id}",
            get(agents::show)
                .put(agents::replace)
                .delete(agents::delete),
        )
        .route("/v1/agents/{agent_id}/interact", post(sessions::interact))
        .route("/v1/agent-sessions/{session_id}", get(sessions::show))
        .route(
            "/v1/agent-sessions/{session_id}/events",
            get(sessions::events),
        )
        .route(
            "/v1/agent-sessions/{session_id}/cancel",
            post(sessions::cancel),
        )
        .route(
            "/v1/agent-sessions/{session_id}/callback",
            get(callbacks::for_session),
        )
        .route("/v1/callbacks", get(callbacks::list))
        .route("/v1/signing-secrets/rotate", post(callbacks::rotate_secret))
        .route(
            "/v1/organization",
            get(organization::show).patch(organization::update),
        )
        .route(
            "/v1/callbacks/{callback_id}/redeliver",
            post(callbacks::redeliver),
        )
        .fallback(|| async { ApiError::NotFound("route") })
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(state)
}

/// A JSON request body, parsed with errors that name the offending field.
///
/// The `Content-Type` is not insisted on: a body that parses is accepted.
pub struct JsonBody<T>(pub T);

impl<T: DeserializeOwned> FromRequest<AppState> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &AppState) -> Result<Self, Self::Rejection> {
        // A declared length over the limit is refused before reading anything.
        let declared = request
            .headers()
            .get(axum::http::header::CONTENT_LENGTH)
            .and_then(|value| value.to_str().ok()?.parse::<u64>().ok());
        if declared.is_some_and(|length| length > MAX_BODY_BYTES as u64) {
            return Err(ApiError::PayloadTooLarge {
                limit: MAX_BODY_BYTES,
            });
        }
        let read = axum::body::Bytes::from_request(request, state);
        let bytes = tokio::time::timeout(state.body_timeout, read)
            .await
            .map_err(|_| ApiError::BodyTimeout {
                seconds: state.body_timeout.as_secs(),
            })?
            .map_err(body_error)?;
        if bytes.is_empty() {
            return Err(ApiError::InvalidJson("the body is empty".into()));
        }
        // serde would take a list for an object's fields in order.
        if bytes.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
            return Err(ApiError::InvalidJson(
                "the body must be a JSON object".into(),
            ));
        }
        let mut json = serde_json::Deserializer::from_slice(&bytes);
        let value: T = serde_path_to_error::deserialize(&mut json).map_err(|error| {
            let path = error.path().to_string();
            let inner = error.into_inner();
            let message = inner.to_string();
            if let Some(field) = unknown_field(&message) {
                // The path already ends at the unknown field, where there is one.
                let field = if path == "." { field } else { path };
                ApiError::field(field, "is not a known field")
            } else if inner.is_syntax() || inner.is_eof() || path == "." {
                ApiError::InvalidJson(message)
            } else {
                ApiError::field(path, message)
            }
        })?;
        json.end().map_err(|e| {
            ApiError::InvalidJson(format!("trailing data after the JSON value: {e}"))
        })?;
        Ok(Self(value))
    }
}

/// The name in serde's "unknown field `name`, expected ..." message.
fn unknown_field(message: &str) -> Option<String> {
    let rest = message.strip_prefix("unknown field `")?;
    Some(rest.split('`').next()?.to_owned())
}

/// A path's one identifier; a malformed one is a JSON 400, like any other
/// bad input.
pub struct Id(pub String);

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for Id {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &S,
    ) -> Result<Self, Self::Rejection> {
        match axum::extract::Path::<String>::from_request_parts(parts, state).await {
            Ok(axum::extract::Path(id)) => Ok(Self(id)),
            Err(rejection) => Err(ApiError::field("path", rejection.body_text())),
        }
    }
}

fn body_error(rejection: BytesRejection) -> ApiError {
    if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
        ApiError::PayloadTooLarge {
            limit: MAX_BODY_BYTES,
        }
    } else {
        ApiError::InvalidJson(rejection.body_text())
    }
}

/// Reads a `limit` query value: default when absent, 1..=max when present.
pub fn page_limit(raw: Option<&str>, default: u32, max: u32) -> ApiResult<u32> {
    let Some(raw) = raw else {
        return Ok(default);
    };
    match raw.parse::<u32>() {
        Ok(limit) if (1..=max).contains(&limit) => Ok(limit),
        _ => Err(ApiError::field(
            "limit",
            format!("must be an integer from 1 to {max}"),
        )),
    }
}

/// Reads an `after` query value of the lists ordered by id: absent, or an
/// id as `next_cursor` gives it.
pub fn page_after(raw: Option<&str>) -> ApiResult<Option<&str>> {
    match raw {
        Some(raw) if uuid::Uuid::try_parse(raw).is_err() => Err(ApiError::field(
            "after",
            "must be a next_cursor from an earlier page",
        )),
        raw => Ok(raw),
    }
}

/// Turns rows fetched with `limit + 1` into one page of JSON and the cursor
/// of the next page: the extra row, if it came, says another page follows.
pub fn page<T, C: serde::Serialize>(
    mut rows: Vec<T>,
    limit: u32,
    cursor: impl Fn(&T) -> C,
    to_json: impl Fn(&T) -> serde_json::Value,
) -> (Vec<serde_json::Value>, Option<C>) {
    let more = rows.len() > limit as usize;
    rows.truncate(limit as usize);
    let next_cursor = rows.last().filter(|_| more).map(cursor);
    (rows.iter().map(to_json).collect(), next_cursor)
}

/// A JSON response with a status.
pub type JsonResponse = (StatusCode, Json<serde_json::Value>);
