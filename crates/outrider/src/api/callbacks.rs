//! Operator control over callbacks: a session's delivery with every
//! attempt, deliveries by status, and redelivery.

use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::Json;
use serde_json::{json, Value};
use std::collections::HashMap;

use super::auth::{generate_signing_secret, Org};
use super::{page, page_after, page_limit, ApiError, ApiResult, AppState, Id, JsonResponse};
use crate::domain::{now_ms, rfc3339};
use crate::store::{AttemptState, DeliveryState, Redelivery};

/// The statuses a delivery can have.
const STATUSES: [&str; 3] = ["pending", "succeeded", "failed"];

/// A delivery's state, as every endpoint shows it.
pub fn delivery_json(delivery: &DeliveryState) -> Value {
    // Claimed for an attempt: were the claiming process to die, the next
    // attempt would come when this passes, whatever `next_attempt_at` says.
    let claimed_until = delivery
        .lease_until
        .filter(|until| delivery.status == "pending" && *until > now_ms());
    json!({
        "callback_event_id": delivery.id,
        "session_id": delivery.session_id,
        "url": delivery.url,
        "status": delivery.status,
        "attempts": delivery.attempts,
        "next_attempt_at": delivery.next_attempt_at.map(rfc3339),
        "claimed_until": claimed_until.map(rfc3339),
        "last_status_code": delivery.last_status_code,
        "last_error": delivery.last_error,
        "created_at": rfc3339(delivery.created_at),
        "completed_at": delivery.completed_at.map(rfc3339),
    })
}

/// One attempt, as every endpoint shows it.
pub fn attempt_json(attempt: &AttemptState) -> Value {
    let record = &attempt.record;
    json!({
        "n": attempt.n,
        "started_at": rfc3339(record.started_at),
        "duration_ms": record.duration_ms,
        "status_code": record.status_code,
        "error_kind": record.error_kind,
        "error_message": record.error_message,
    })
}

/// `GET /v1/agent-sessions/{id}/callback`: the delivery and every attempt.
pub async fn for_session(
    State(state): State<AppState>,
    org: Org,
    Id(session_id): Id,
) -> ApiResult<Json<Value>> {
    if state.store.session(&org.id, &session_id).await?.is_none() {
        return Err(ApiError::NotFound("session"));
    }
    let delivery = state.store.delivery_for_session(&session_id).await?;
    let delivery = delivery.ok_or(ApiError::NotFound("callback"))?;
    let attempts = state.store.attempts(&delivery.id).await?;

    let mut body = delivery_json(&delivery);
    body["attempt_log"] = attempts.iter().map(attempt_json).collect();
    Ok(Json(body))
}

/// `GET /v1/callbacks?status=&limit=&after=`: deliveries by id.
pub async fn list(
    State(state): State<AppState>,
    org: Org,
    Query(query): Query<HashMap<String, String>>,
) -> ApiResult<Json<Value>> {
    let limit = page_limit(query.get("limit").map(String::as_str), 100, 1000)?;
    let status = query.get("status").map(String::as_str);
    if let Some(status) = status.filter(|s| !STATUSES.contains(s)) {
        let message = format!("{status:?} is not one of pending, succeeded, failed");
        return Err(ApiError::field("status", message));
    }
    let after = page_after(query.get("after").map(String::as_str))?;

    let org_id = Some(org.id.as_str());
    let rows = state
        .store
        .deliveries(org_id, status, after, limit + 1)
        .await?;
    let (callbacks, next_cursor) = page(rows, limit, |d| d.id.clone(), delivery_json);
    Ok(Json(
        json!({ "callbacks": callbacks, "next_cursor": next_cursor }),
    ))
}

/// `POST /v1/callbacks/{id}/redeliver`: the same id and body, sent again.
pub async fn redeliver(
    State(state): State<AppState>,
    org: Org,
    Id(id): Id,
) -> ApiResult<JsonResponse> {
    let deadline_at = now_ms() + state.callback_deadline.as_millis() as i64;
    match state
        .store
        .redeliver(Some(&org.id), &id, deadline_at)
        .await?
    {
        Redelivery::Queued(delivery) => {
            state.delivery_ready.notify_one();
            tracing::info!(delivery.id = %id, "callback queued for redelivery");
            Ok((StatusCode::ACCEPTED, Json(delivery_json(&delivery))))
        }
        Redelivery::StillPending => Err(ApiError::Conflict(
            "the callback is still being delivered".into(),
        )),
        Redelivery::NotFound => Err(ApiError::NotFound("callback")),
    }
}

/// The longest grace period a rotation may give the old secrets.
const MAX_GRACE_SECONDS: u64 = 30 * 24 * 3600;

/// `POST /v1/signing-secrets/rotate?grace_seconds=`: a new signing secret.
///
/// Until the grace period ends (default 24 h) callbacks carry one `sig=`
/// for the old secrets and one for the new; then the old ones retire.
pub async fn rotate_secret(
    State(state): State<AppState>,
    org: Org,
    Query(query): Query<HashMap<String, String>>,
) -> ApiResult<JsonResponse> {
    let grace = match query.get("grace_seconds") {
        None => 24 * 3600,
        Some(raw) => raw
            .parse::<u64>()
            .ok()
            .filter(|grace| *grace <= MAX_GRACE_SECONDS)
            .ok_or_else(|| {
                let message = format!("must be an integer from 0 to {MAX_GRACE_SECONDS}");
                ApiError::field("grace_seconds", message)
            })?,
    };
    let secret = generate_signing_secret();
    let retire_at = now_ms() + (grace * 1000) as i64;
    let stored = state.secrets.seal(&org.id, &secret);
    if !state
        .store
        .rotate_secret(&org.id, &stored, retire_at)
        .await?
    {
        return Err(ApiError::NotFound("organisation"));
    }
    tracing::info!(org.id = %org.id, grace, "signing secret rotated");
    let body = json!({ "signing_secret": secret, "previous_retire_at": rfc3339(retire_at) });
    Ok((StatusCode::CREATED, Json(body)))
}
