//! The caller's organisation: `GET /v1/organization` shows its settings,
//! `PATCH /v1/organization` changes them.

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

use super::auth::Org;
use super::{ApiError, ApiResult, AppState, JsonBody, JsonResponse};
use crate::domain::rfc3339;
use crate::store::OrgSettings;

/// The settings a `PATCH` may change; absent ones stay as they are.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OrgPatch {
    standard_webhooks: Option<bool>,
}

pub async fn show(State(state): State<AppState>, org: Org) -> ApiResult<JsonResponse> {
    let settings = settings(&state, &org.id).await?;
    Ok((StatusCode::OK, Json(settings_json(&settings))))
}

pub async fn update(
    State(state): State<AppState>,
    org: Org,
    JsonBody(patch): JsonBody<OrgPatch>,
) -> ApiResult<JsonResponse> {
    if let Some(on) = patch.standard_webhooks {
        if !state.store.set_standard_webhooks(&org.id, on).await? {
            return Err(ApiError::NotFound("organisation"));
        }
        tracing::info!(org.id = %org.id, standard_webhooks = on, "organisation updated");
    }
    let settings = settings(&state, &org.id).await?;
    Ok((StatusCode::OK, Json(settings_json(&settings))))
}

async fn settings(state: &AppState, org_id: &str) -> ApiResult<OrgSettings> {
    state
        .store
        .org_settings(org_id)
        .await?
        .ok_or(ApiError::NotFound("organisation"))
}

pub fn settings_json(settings: &OrgSettings) -> Value {
    json!({
        "id": settings.id,
        "name": settings.name,
        "standard_webhooks": settings.standard_webhooks,
        "created_at": rfc3339(settings.created_at),
    })
}
