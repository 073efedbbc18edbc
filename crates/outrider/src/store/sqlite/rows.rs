//! Turning rows into domain values, and values into JSON columns.

use sqlx::sqlite::SqliteRow;
use sqlx::Row;

use crate::domain::{Agent, AgentSpec, Event, EventKind, Session, SessionError, SessionStatus};
use crate::store::{AttemptRecord, AttemptState, Delivery, DeliveryState, Result, StoreError};

pub fn to_json<T: serde::Serialize + ?Sized>(value: &T) -> String {
    serde_json::to_string(value).expect("domain values always serialise")
}

pub fn from_json<T: serde::de::DeserializeOwned>(column: &str, text: &str) -> Result<T> {
    serde_json::from_str(text).map_err(|e| StoreError::Corrupt(format!("{column}: {e}")))
}

pub fn parse_status(text: &str) -> Result<SessionStatus> {
    SessionStatus::parse(text).ok_or_else(|| StoreError::Corrupt(format!("status {text}")))
}

pub fn agent_from_row(row: &SqliteRow) -> Result<Agent> {
    let spec: String = row.try_get("spec")?;
    Ok(Agent {
        id: row.try_get("id")?,
        org_id: row.try_get("org_id")?,
        spec: from_json::<AgentSpec>("spec", &spec)?,
        created_at: row.try_get("created_at")?,
        updated_at: row.try_get("updated_at")?,
    })
}

pub fn session_from_row(row: &SqliteRow) -> Result<Session> {
    let agent: String = row.try_get("agent")?;
    let input: String = row.try_get("input")?;
    let metadata: Option<String> = row.try_get("metadata")?;
    let status: String = row.try_get("status")?;
    let error_code: Option<String> = row.try_get("error_code")?;
    let error_message: Option<String> = row.try_get("error_message")?;
    Ok(Session {
        id: row.try_get("id")?,
        org_id: row.try_get("org_id")?,
        agent_id: row.try_get("agent_id")?,
        agent: from_json("agent", &agent)?,
        status: parse_status(&status)?,
        input: from_json("input", &input)?,
        metadata: metadata.map(|m| from_json("metadata", &m)).transpose()?,
        callback_url: row.try_get("callback_url")?,
        output: row.try_get("output")?,
        error: error_code.map(|code| SessionError {
            code,
            message: error_message.unwrap_or_default(),
        }),
        created_at: row.try_get("created_at")?,
        started_at: row.try_get("started_at")?,
        completed_at: row.try_get("completed_at")?,
        claims: row.try_get("claims")?,
    })
}

pub fn event_from_row(row: &SqliteRow) -> Result<Event> {
    let kind: String = row.try_get("kind")?;
    let data: String = row.try_get("data")?;
    Ok(Event {
        seq: row.try_get("seq")?,
        kind: EventKind::parse(&kind).ok_or_else(|| StoreError::Corrupt(format!("kind {kind}")))?,
        data: from_json("data", &data)?,
        created_at: row.try_get("created_at")?,
    })
}

pub fn delivery_from_row(row: &SqliteRow) -> Result<Delivery> {
    Ok(Delivery {
        id: row.try_get("id")?,
        session_id: row.try_get("session_id")?,
        org_id: row.try_get("org_id")?,
        url: row.try_get("url")?,
        destination: row.try_get("destination")?,
        body: row.try_get("body")?,
        attempts: row.try_get("attempts")?,
        round_start: row.try_get("round_start")?,
        created_at: row.try_get("created_at")?,
        deadline_at: row.try_get("deadline_at")?,
    })
}

pub fn delivery_state_from_row(row: &SqliteRow) -> Result<DeliveryState> {
    Ok(DeliveryState {
        id: row.try_get("id")?,
        session_id: row.try_get("session_id")?,
        url: row.try_get("url")?,
        status: row.try_get("status")?,
        attempts: row.try_get("attempts")?,
        next_attempt_at: row.try_get("next_attempt_at")?,
        lease_until: row.try_get("lease_until")?,
        last_status_code: row.try_get("last_status_code")?,
        last_error: row.try_get("last_error")?,
        created_at: row.try_get("created_at")?,
        completed_at: row.try_get("completed_at")?,
    })
}

pub fn attempt_from_row(row: &SqliteRow) -> Result<AttemptState> {
    Ok(AttemptState {
        n: row.try_get("n")?,
        record: AttemptRecord {
            started_at: row.try_get("started_at")?,
            duration_ms: row.try_get("duration_ms")?,
            status_code: row.try_get("status_code")?,
            error_kind: row.try_get("error_kind")?,
            error_message: row.try_get("error_message")?,
        },
    })
}
