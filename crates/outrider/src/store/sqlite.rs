//! The SQLite engine: one file, WAL journal, every commit fsynced.
//!
//! SQLite allows one writer at a time, so writes go through a pool of one
//! connection and reads through a separate pool. New sessions, the hot path,
//! are batched: a single task gathers the sessions waiting to be created and
//! commits them in one transaction, so one fsync covers many accepts. No
//! caller is answered before its batch is committed.

use super::ApiKey;
use super::{
    AttemptRecord, CancelResult, Created, Delivery, DeliveryState, DynStore, Finish, NewOrg,
    NewSession, NextStep, Outcome, Renewal, Result, Store, StoreError,
};
use crate::domain::{
    now_ms, Agent, AgentSpec, Event, EventKind, Millis, Session, SessionError, SessionStatus,
};
use async_trait::async_trait;
use serde_json::Value;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteRow,
    SqliteSynchronous,
};
use sqlx::{Row, Sqlite, Transaction};
use std::str::FromStr;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};

/// How many new sessions one commit may carry.
const MAX_BATCH: usize = 512;

/// How often the WAL is checkpointed.
const CHECKPOINT_EVERY: Duration = Duration::from_secs(1);

type CreateRequest = (NewSession, oneshot::Sender<Result<Created>>);

/// The SQLite implementation of [`Store`].
pub struct SqliteStore {
    writer: SqlitePool,
    reader: SqlitePool,
    creates: mpsc::Sender<CreateRequest>,
}

impl SqliteStore {
    /// Opens (creating if missing) the database at `url` and migrates it.
    pub async fn open(url: &str) -> Result<Self> {
        let options = SqliteConnectOptions::from_str(url)?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(Duration::from_secs(10))
            .foreign_keys(true);
        let writer = SqlitePoolOptions::new()
            .max_connections(1)
            .connect_with(options.clone())
            .await?;
        sqlx::migrate!("./migrations/sqlite").run(&writer).await?;
        let reader = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(options)
            .await?;

        let (creates, queue) = mpsc::channel(4 * MAX_BATCH);
        tokio::spawn(commit_batches(writer.clone(), queue));
        tokio::spawn(checkpoint_periodically(reader.clone()));
        Ok(Self {
            writer,
            reader,
            creates,
        })
    }

    /// A shared handle, as the rest of the server holds it.
    pub fn into_dyn(self) -> DynStore {
        std::sync::Arc::new(self)
    }
}

/// Copies the WAL into the database file every second.
///
/// A passive checkpoint never blocks writers. SQLite still checkpoints from
/// the writer once the WAL passes 1,000 pages (which is what lets the WAL
/// start over), but by then most pages have been copied here, so commits
/// (and the `202`s waiting on them) stall less.
async fn checkpoint_periodically(pool: SqlitePool) {
    let mut tick = tokio::time::interval(CHECKPOINT_EVERY);
    loop {
        tick.tick().await;
        if let Err(error) = sqlx::query("PRAGMA wal_checkpoint(PASSIVE)")
            .execute(&pool)
            .await
        {
            tracing::warn!(error = %error, "WAL checkpoint failed");
        }
    }
}

/// Commits queued session creations, as many per transaction as are waiting.
async fn commit_batches(writer: SqlitePool, mut queue: mpsc::Receiver<CreateRequest>) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    while queue.recv_many(&mut batch, MAX_BATCH).await > 0 {
        let results = insert_sessions(&writer, &batch).await;
        match results {
            Ok(created) => {
                for ((_, reply), created) in batch.drain(..).zip(created) {
                    let _ = reply.send(Ok(created));
                }
            }
            Err(error) => {
                tracing::error!(error = %error, size = batch.len(), "session batch failed");
                let message = error.to_string();
                for (_, reply) in batch.drain(..) {
                    let _ = reply.send(Err(StoreError::Corrupt(message.clone())));
                }
            }
        }
    }
}

async fn insert_sessions(writer: &SqlitePool, batch: &[CreateRequest]) -> Result<Vec<Created>> {
    let mut tx = writer.begin().await?;
    let mut created = Vec::with_capacity(batch.len());
    for (new, _) in batch {
        created.push(insert_session(&mut tx, new).await?);
    }
    tx.commit().await?;
    Ok(created)
}

async fn insert_session(tx: &mut Transaction<'_, Sqlite>, new: &NewSession) -> Result<Created> {
    // The idempotency key is claimed first; a key seen before names the
    // session that was created for it.
    if let Some(key) = &new.idempotency_key {
        let claimed = sqlx::query(
            "INSERT INTO idempotency_keys (org_id, key, session_id, created_at)
             VALUES (?, ?, ?, ?) ON CONFLICT DO NOTHING",
        )
        .bind(&new.org_id)
        .bind(key)
        .bind(&new.id)
        .bind(new.created_at)
        .execute(&mut **tx)
        .await?;
        if claimed.rows_affected() == 0 {
            let existing: String = sqlx::query_scalar(
                "SELECT session_id FROM idempotency_keys WHERE org_id = ? AND key = ?",
            )
            .bind(&new.org_id)
            .bind(key)
            .fetch_one(&mut **tx)
            .await?;
            return Ok(Created::Existing(existing));
        }
    }

    sqlx::query(
        "INSERT INTO sessions (id, org_id, agent_id, agent, status, input, metadata,
                               callback_url, created_at)
         VALUES (?, ?, ?, ?, 'queued', ?, ?, ?, ?)",
    )
    .bind(&new.id)
    .bind(&new.org_id)
    .bind(&new.agent.id)
    .bind(to_json(&new.agent.spec))
    .bind(to_json(&new.input))
    .bind(new.metadata.as_ref().map(to_json))
    .bind(&new.callback_url)
    .bind(new.created_at)
    .execute(&mut **tx)
    .await?;

    let start = serde_json::json!({
        "agent_id": new.agent.id,
        "input": new.input,
        "metadata": new.metadata,
    });
    insert_event(tx, &new.id, EventKind::SessionStart, &start, new.created_at).await?;
    Ok(Created::New(new.id.clone()))
}

async fn insert_event(
    tx: &mut Transaction<'_, Sqlite>,
    session_id: &str,
    kind: EventKind,
    data: &Value,
    at: Millis,
) -> Result<Event> {
    let seq: i64 = sqlx::query_scalar(
        "INSERT INTO events (session_id, seq, kind, data, created_at)
         VALUES (?1, (SELECT COALESCE(MAX(seq), 0) + 1 FROM events WHERE session_id = ?1),
                 ?2, ?3, ?4)
         RETURNING seq",
    )
    .bind(session_id)
    .bind(kind.as_str())
    .bind(to_json(data))
    .bind(at)
    .fetch_one(&mut **tx)
    .await?;
    Ok(Event {
        seq,
        kind,
        data: data.clone(),
        created_at: at,
    })
}

/// True if `owner` holds the session's lease, read inside the transaction.
async fn holds_session(tx: &mut Transaction<'_, Sqlite>, id: &str, owner: &str) -> Result<bool> {
    let held: Option<i64> = sqlx::query_scalar(
        "SELECT 1 FROM sessions WHERE id = ? AND lease_owner = ? AND status = 'running'",
    )
    .bind(id)
    .bind(owner)
    .fetch_optional(&mut **tx)
    .await?;
    Ok(held.is_some())
}

async fn write_finish(tx: &mut Transaction<'_, Sqlite>, finish: &Finish) -> Result<()> {
    let (status, output, error) = match &finish.outcome {
        Outcome::Succeeded { output } => (SessionStatus::Succeeded, Some(output), None),
        Outcome::Failed(error) => (SessionStatus::Failed, None, Some(error)),
        Outcome::Cancelled => (SessionStatus::Cancelled, None, None),
    };
    sqlx::query(
        "UPDATE sessions SET status = ?, output = ?, error_code = ?, error_message = ?,
                completed_at = ?, lease_owner = NULL, lease_until = NULL
         WHERE id = ?",
    )
    .bind(status.as_str())
    .bind(output)
    .bind(error.map(|e| &e.code))
    .bind(error.map(|e| &e.message))
    .bind(finish.completed_at)
    .bind(&finish.session_id)
    .execute(&mut **tx)
    .await?;

    let end = &finish.end_event;
    insert_event(
        tx,
        &finish.session_id,
        EventKind::SessionEnd,
        end,
        finish.completed_at,
    )
    .await?;

    if let Some(delivery) = &finish.delivery {
        sqlx::query(
            "INSERT INTO deliveries (id, session_id, org_id, url, body, status,
                                     next_attempt_at, deadline_at, created_at)
             SELECT ?, id, org_id, ?, ?, 'pending', ?, ?, ? FROM sessions WHERE id = ?",
        )
        .bind(&delivery.id)
        .bind(&delivery.url)
        .bind(&delivery.body)
        .bind(finish.completed_at)
        .bind(delivery.deadline_at)
        .bind(finish.completed_at)
        .bind(&finish.session_id)
        .execute(&mut **tx)
        .await?;
    }
    Ok(())
}

#[async_trait]
impl Store for SqliteStore {
    async fn create_org(&self, org: NewOrg) -> Result<()> {
        let now = now_ms();
        let mut tx = self.writer.begin().await?;
        sqlx::query("INSERT INTO orgs (id, name, created_at) VALUES (?, ?, ?)")
            .bind(&org.id)
            .bind(&org.name)
            .bind(now)
            .execute(&mut *tx)
            .await?;
        sqlx::query("INSERT INTO signing_secrets (org_id, secret, created_at) VALUES (?, ?, ?)")
            .bind(&org.id)
            .bind(&org.signing_secret)
            .bind(now)
            .execute(&mut *tx)
            .await?;
        sqlx::query("INSERT INTO api_keys (id, org_id, key_hash, created_at) VALUES (?, ?, ?, ?)")
            .bind(&org.key_id)
            .bind(&org.id)
            .bind(&org.key_hash)
            .bind(now)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn api_key(&self, key_id: &str) -> Result<Option<ApiKey>> {
        let row = sqlx::query("SELECT org_id, key_hash FROM api_keys WHERE id = ?")
            .bind(key_id)
            .fetch_optional(&self.reader)
            .await?;
        row.map(|row| {
            Ok(ApiKey {
                org_id: row.try_get("org_id")?,
                key_hash: row.try_get("key_hash")?,
            })
        })
        .transpose()
    }

    async fn signing_secrets(&self, org_id: &str) -> Result<Vec<String>> {
        let secrets = sqlx::query_scalar(
            "SELECT secret FROM signing_secrets
             WHERE org_id = ? AND (retires_at IS NULL OR retires_at > ?)
             ORDER BY created_at",
        )
        .bind(org_id)
        .bind(now_ms())
        .fetch_all(&self.reader)
        .await?;
        Ok(secrets)
    }

    async fn insert_agent(&self, agent: &Agent) -> Result<()> {
        sqlx::query(
            "INSERT INTO agents (id, org_id, spec, created_at, updated_at) VALUES (?, ?, ?, ?, ?)",
        )
        .bind(&agent.id)
        .bind(&agent.org_id)
        .bind(to_json(&agent.spec))
        .bind(agent.created_at)
        .bind(agent.updated_at)
        .execute(&self.writer)
        .await?;
        Ok(())
    }

    async fn agent(&self, org_id: &str, id: &str) -> Result<Option<Agent>> {
        let row = sqlx::query("SELECT * FROM agents WHERE org_id = ? AND id = ?")
            .bind(org_id)
            .bind(id)
            .fetch_optional(&self.reader)
            .await?;
        row.as_ref().map(agent_from_row).transpose()
    }

    async fn agents(&self, org_id: &str, after: Option<&str>, limit: u32) -> Result<Vec<Agent>> {
        let rows =
            sqlx::query("SELECT * FROM agents WHERE org_id = ? AND id > ? ORDER BY id LIMIT ?")
                .bind(org_id)
                .bind(after.unwrap_or(""))
                .bind(limit)
                .fetch_all(&self.reader)
                .await?;
        rows.iter().map(agent_from_row).collect()
    }

    async fn update_agent(&self, agent: &Agent) -> Result<bool> {
        let done =
            sqlx::query("UPDATE agents SET spec = ?, updated_at = ? WHERE org_id = ? AND id = ?")
                .bind(to_json(&agent.spec))
                .bind(agent.updated_at)
                .bind(&agent.org_id)
                .bind(&agent.id)
                .execute(&self.writer)
                .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn delete_agent(&self, org_id: &str, id: &str) -> Result<bool> {
        let done = sqlx::query("DELETE FROM agents WHERE org_id = ? AND id = ?")
            .bind(org_id)
            .bind(id)
            .execute(&self.writer)
            .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn create_session(&self, new: NewSession) -> Result<Created> {
        let (reply, answer) = oneshot::channel();
        self.creates
            .send((new, reply))
            .await
            .map_err(|_| StoreError::Closed)?;
        answer.await.map_err(|_| StoreError::Closed)?
    }

    async fn session(&self, org_id: &str, id: &str) -> Result<Option<Session>> {
        let row = sqlx::query("SELECT * FROM sessions WHERE org_id = ? AND id = ?")
            .bind(org_id)
            .bind(id)
            .fetch_optional(&self.reader)
            .await?;
        row.as_ref().map(session_from_row).transpose()
    }

    async fn events(&self, session_id: &str, after: i64, limit: u32) -> Result<Vec<Event>> {
        let rows = sqlx::query(
            "SELECT seq, kind, data, created_at FROM events
             WHERE session_id = ? AND seq > ? ORDER BY seq LIMIT ?",
        )
        .bind(session_id)
        .bind(after)
        .bind(limit)
        .fetch_all(&self.reader)
        .await?;
        rows.iter().map(event_from_row).collect()
    }

    async fn cancel_session(&self, org_id: &str, id: &str, finish: Finish) -> Result<CancelResult> {
        let mut tx = self.writer.begin().await?;
        let status: Option<String> =
            sqlx::query_scalar("SELECT status FROM sessions WHERE org_id = ? AND id = ?")
                .bind(org_id)
                .bind(id)
                .fetch_optional(&mut *tx)
                .await?;
        let status = match status.as_deref().map(parse_status).transpose()? {
            None => return Ok(CancelResult::NotFound),
            Some(status) => status,
        };
        let result = match status {
            SessionStatus::Queued => {
                write_finish(&mut tx, &finish).await?;
                CancelResult::Cancelled
            }
            SessionStatus::Running => {
                sqlx::query("UPDATE sessions SET cancel_requested = 1 WHERE id = ?")
                    .bind(id)
                    .execute(&mut *tx)
                    .await?;
                CancelResult::Requested
            }
            _ => CancelResult::AlreadyEnded,
        };
        tx.commit().await?;
        Ok(result)
    }

    async fn claim_session(&self, owner: &str, lease_ms: i64) -> Result<Option<Session>> {
        let now = now_ms();
        let row = sqlx::query(
            "UPDATE sessions
             SET status = 'running', lease_owner = ?1, lease_until = ?2,
                 started_at = COALESCE(started_at, ?3), claims = claims + 1
             WHERE id = (SELECT id FROM sessions
                         WHERE status = 'queued'
                            OR (status = 'running' AND lease_until < ?3)
                         ORDER BY created_at LIMIT 1)
             RETURNING *",
        )
        .bind(owner)
        .bind(now + lease_ms)
        .bind(now)
        .fetch_optional(&self.writer)
        .await?;
        row.as_ref().map(session_from_row).transpose()
    }

    async fn renew_session(&self, id: &str, owner: &str, lease_ms: i64) -> Result<Renewal> {
        let cancel: Option<i64> = sqlx::query_scalar(
            "UPDATE sessions SET lease_until = ?
             WHERE id = ? AND lease_owner = ? AND status = 'running'
             RETURNING cancel_requested",
        )
        .bind(now_ms() + lease_ms)
        .bind(id)
        .bind(owner)
        .fetch_optional(&self.writer)
        .await?;
        Ok(match cancel {
            None => Renewal::Lost,
            Some(0) => Renewal::Held,
            Some(_) => Renewal::CancelRequested,
        })
    }

    async fn append_event(
        &self,
        session_id: &str,
        owner: &str,
        kind: EventKind,
        data: Value,
    ) -> Result<Event> {
        let mut tx = self.writer.begin().await?;
        if !holds_session(&mut tx, session_id, owner).await? {
            return Err(StoreError::LeaseLost);
        }
        let event = insert_event(&mut tx, session_id, kind, &data, now_ms()).await?;
        tx.commit().await?;
        Ok(event)
    }

    async fn finish_session(&self, owner: &str, finish: Finish) -> Result<()> {
        let mut tx = self.writer.begin().await?;
        if !holds_session(&mut tx, &finish.session_id, owner).await? {
            return Err(StoreError::LeaseLost);
        }
        write_finish(&mut tx, &finish).await?;
        tx.commit().await?;
        Ok(())
    }

    async fn claim_deliveries(
        &self,
        owner: &str,
        lease_ms: i64,
        limit: u32,
    ) -> Result<Vec<Delivery>> {
        let now = now_ms();
        let rows = sqlx::query(
            "UPDATE deliveries SET lease_owner = ?1, lease_until = ?2
             WHERE id IN (SELECT id FROM deliveries
                          WHERE status = 'pending' AND next_attempt_at <= ?3
                            AND (lease_until IS NULL OR lease_until < ?3)
                          ORDER BY next_attempt_at LIMIT ?4)
             RETURNING id, session_id, org_id, url, body, attempts, created_at, deadline_at",
        )
        .bind(owner)
        .bind(now + lease_ms)
        .bind(now)
        .bind(limit)
        .fetch_all(&self.writer)
        .await?;
        rows.iter().map(delivery_from_row).collect()
    }

    async fn next_delivery_due(&self) -> Result<Option<Millis>> {
        let due = sqlx::query_scalar(
            "SELECT MIN(next_attempt_at) FROM deliveries WHERE status = 'pending'",
        )
        .fetch_one(&self.reader)
        .await?;
        Ok(due)
    }

    async fn record_attempt(
        &self,
        delivery_id: &str,
        owner: &str,
        attempt: AttemptRecord,
        next: NextStep,
    ) -> Result<()> {
        let mut tx = self.writer.begin().await?;
        let n: Option<i64> = sqlx::query_scalar(
            "UPDATE deliveries SET attempts = attempts + 1
             WHERE id = ? AND lease_owner = ? AND status = 'pending'
             RETURNING attempts",
        )
        .bind(delivery_id)
        .bind(owner)
        .fetch_optional(&mut *tx)
        .await?;
        let n = n.ok_or(StoreError::LeaseLost)?;

        sqlx::query(
            "INSERT INTO delivery_attempts (delivery_id, n, started_at, duration_ms,
                                            status_code, error_kind, error_message)
             VALUES (?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(delivery_id)
        .bind(n)
        .bind(attempt.started_at)
        .bind(attempt.duration_ms)
        .bind(attempt.status_code)
        .bind(&attempt.error_kind)
        .bind(&attempt.error_message)
        .execute(&mut *tx)
        .await?;

        let (status, next_at, completed_at) = match next {
            NextStep::Succeeded => ("succeeded", None, Some(now_ms())),
            NextStep::Failed => ("failed", None, Some(now_ms())),
            NextStep::RetryAt(at) => ("pending", Some(at), None),
        };
        let last_error = attempt
            .error_message
            .as_ref()
            .or(attempt.error_kind.as_ref());
        sqlx::query(
            "UPDATE deliveries
             SET status = ?, next_attempt_at = ?, completed_at = ?, last_status_code = ?,
                 last_error = ?, lease_owner = NULL, lease_until = NULL
             WHERE id = ?",
        )
        .bind(status)
        .bind(next_at)
        .bind(completed_at)
        .bind(attempt.status_code)
        .bind(last_error)
        .bind(delivery_id)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn delivery_for_session(&self, session_id: &str) -> Result<Option<DeliveryState>> {
        let row = sqlx::query("SELECT * FROM deliveries WHERE session_id = ?")
            .bind(session_id)
            .fetch_optional(&self.reader)
            .await?;
        row.as_ref().map(delivery_state_from_row).transpose()
    }
}

fn to_json<T: serde::Serialize + ?Sized>(value: &T) -> String {
    serde_json::to_string(value).expect("domain values always serialise")
}

fn from_json<T: serde::de::DeserializeOwned>(column: &str, text: &str) -> Result<T> {
    serde_json::from_str(text).map_err(|e| StoreError::Corrupt(format!("{column}: {e}")))
}

fn parse_status(text: &str) -> Result<SessionStatus> {
    SessionStatus::parse(text).ok_or_else(|| StoreError::Corrupt(format!("status {text}")))
}

fn agent_from_row(row: &SqliteRow) -> Result<Agent> {
    let spec: String = row.try_get("spec")?;
    Ok(Agent {
        id: row.try_get("id")?,
        org_id: row.try_get("org_id")?,
        spec: from_json::<AgentSpec>("spec", &spec)?,
        created_at: row.try_get("created_at")?,
        updated_at: row.try_get("updated_at")?,
    })
}

fn session_from_row(row: &SqliteRow) -> Result<Session> {
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

fn event_from_row(row: &SqliteRow) -> Result<Event> {
    let kind: String = row.try_get("kind")?;
    let data: String = row.try_get("data")?;
    Ok(Event {
        seq: row.try_get("seq")?,
        kind: EventKind::parse(&kind).ok_or_else(|| StoreError::Corrupt(format!("kind {kind}")))?,
        data: from_json("data", &data)?,
        created_at: row.try_get("created_at")?,
    })
}

fn delivery_from_row(row: &SqliteRow) -> Result<Delivery> {
    Ok(Delivery {
        id: row.try_get("id")?,
        session_id: row.try_get("session_id")?,
        org_id: row.try_get("org_id")?,
        url: row.try_get("url")?,
        body: row.try_get("body")?,
        attempts: row.try_get("attempts")?,
        created_at: row.try_get("created_at")?,
        deadline_at: row.try_get("deadline_at")?,
    })
}

fn delivery_state_from_row(row: &SqliteRow) -> Result<DeliveryState> {
    Ok(DeliveryState {
        id: row.try_get("id")?,
        url: row.try_get("url")?,
        status: row.try_get("status")?,
        attempts: row.try_get("attempts")?,
        next_attempt_at: row.try_get("next_attempt_at")?,
        last_status_code: row.try_get("last_status_code")?,
        last_error: row.try_get("last_error")?,
        created_at: row.try_get("created_at")?,
        completed_at: row.try_get("completed_at")?,
    })
}
