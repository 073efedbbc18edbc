//! The SQLite engine: one file, WAL journal, every commit fsynced.
//!
//! SQLite allows one writer at a time, so the hot writes go through one
//! queue that commits whatever is waiting in one transaction ([`writes`]),
//! and reads use a separate pool. No caller is answered before the commit
//! that holds its write.

mod rows;
mod writes;

use async_trait::async_trait;
use serde_json::Value;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use sqlx::{Row, Sqlite};
use std::str::FromStr;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};

use super::{
    ApiKey, AttemptRecord, AttemptState, CancelResult, Created, Delivery, DeliveryClaim,
    DeliveryState, Finish, NewOrg, NewSession, NextStep, OrgSettings, Redelivery, Renewal, Result,
    Signing, Store, StoreError, StoredSecret,
};
use crate::domain::{now_ms, Agent, Event, EventKind, Millis, Session, SessionStatus};
use rows::{
    agent_from_row, attempt_from_row, delivery_state_from_row, event_from_row, parse_status,
    session_from_row, to_json,
};
pub use writes::CLAIM_DELIVERIES_SQL;
use writes::{AttemptWrite, Write, WriteRequest, Written, MAX_BATCH};

/// When the next pending delivery falls due (the dispatcher's look-ahead).
pub const NEXT_DELIVERY_DUE_SQL: &str =
    "SELECT MIN(next_attempt_at) FROM deliveries WHERE status = 'pending'";

/// How often the WAL is checkpointed.
const CHECKPOINT_EVERY: Duration = Duration::from_millis(100);

/// The SQLite implementation of [`Store`].
pub struct SqliteStore {
    writer: SqlitePool,
    reader: SqlitePool,
    writes: mpsc::Sender<WriteRequest>,
}

impl SqliteStore {
    /// Opens (creating if missing) the database at `url` and migrates it.
    pub async fn open(url: &str) -> Result<Self> {
        if let Some(file) = super::database_file(url) {
            create_private(&file)?;
        }
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

        let (writes, queue) = mpsc::channel(4 * MAX_BATCH);
        tokio::spawn(writes::commit_batches(writer.clone(), queue));
        tokio::spawn(checkpoint_periodically(reader.clone()));
        Ok(Self {
            writer,
            reader,
            writes,
        })
    }

    /// Queues a write and waits for the commit that carries it.
    async fn write(&self, write: Write) -> Result<Written> {
        let (reply, answer) = oneshot::channel();
        self.writes
            .send((write, reply))
            .await
            .map_err(|_| StoreError::Closed)?;
        answer.await.map_err(|_| StoreError::Closed)?
    }
}

/// Creates an empty database file readable and writable by its owner only,
/// unless it exists. It holds signing secrets (in the clear without an
/// encryption key); SQLite gives the WAL and shared-memory files beside it
/// the same permissions.
fn create_private(file: &std::path::Path) -> Result<()> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    match options.open(file) {
        Ok(_) => Ok(()),
        Err(error) if error.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(error) => Err(StoreError::Database(sqlx::Error::Io(error))),
    }
}

/// An organisation, its signing secret and its first API key.
async fn insert_org(tx: &mut sqlx::Transaction<'_, Sqlite>, org: &NewOrg) -> Result<()> {
    let now = now_ms();
    sqlx::query("INSERT INTO orgs (id, name, created_at) VALUES (?, ?, ?)")
        .bind(&org.id)
        .bind(&org.name)
        .bind(now)
        .execute(&mut **tx)
        .await?;
    sqlx::query("INSERT INTO signing_secrets (org_id, secret, created_at) VALUES (?, ?, ?)")
        .bind(&org.id)
        .bind(&org.signing_secret)
        .bind(now)
        .execute(&mut **tx)
        .await?;
    sqlx::query("INSERT INTO api_keys (id, org_id, key_hash, created_at) VALUES (?, ?, ?, ?)")
        .bind(&org.key_id)
        .bind(&org.id)
        .bind(&org.key_hash)
        .bind(now)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

async fn insert_agent<'e>(executor: impl sqlx::SqliteExecutor<'e>, agent: &Agent) -> Result<()> {
    sqlx::query(
        "INSERT INTO agents (id, org_id, spec, created_at, updated_at) VALUES (?, ?, ?, ?, ?)",
    )
    .bind(&agent.id)
    .bind(&agent.org_id)
    .bind(to_json(&agent.spec))
    .bind(agent.created_at)
    .bind(agent.updated_at)
    .execute(executor)
    .await?;
    Ok(())
}

/// Copies the WAL into the database file ten times a second.
///
/// A passive checkpoint never blocks writers. SQLite still checkpoints from
/// the writer once the WAL passes 1,000 pages (which is what lets the WAL
/// start over), but by then most pages have been copied here. Small,
/// frequent checkpoints keep each fsync of the database file short, so the
/// WAL fsyncs that commits (and the `202`s waiting on them) need stall less.
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

#[async_trait]
impl Store for SqliteStore {
    async fn create_org(&self, org: NewOrg) -> Result<()> {
        let mut tx = self.writer.begin_with("BEGIN IMMEDIATE").await?;
        insert_org(&mut tx, &org).await?;
        tx.commit().await?;
        Ok(())
    }

    async fn create_first_org(&self, org: NewOrg, agent: &Agent) -> Result<bool> {
        let mut tx = self.writer.begin_with("BEGIN IMMEDIATE").await?;
        let existing: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM orgs")
            .fetch_one(&mut *tx)
            .await?;
        if existing > 0 {
            return Ok(false);
        }
        insert_org(&mut tx, &org).await?;
        insert_agent(&mut *tx, agent).await?;
        tx.commit().await?;
        Ok(true)
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

    async fn signing(&self, org_id: &str) -> Result<Signing> {
        let secrets = sqlx::query_scalar(
            "SELECT secret FROM signing_secrets
             WHERE org_id = ? AND (retires_at IS NULL OR retires_at > ?)
             ORDER BY created_at, rowid",
        )
        .bind(org_id)
        .bind(now_ms())
        .fetch_all(&self.reader)
        .await?;
        let standard_webhooks: Option<bool> =
            sqlx::query_scalar("SELECT standard_webhooks FROM orgs WHERE id = ?")
                .bind(org_id)
                .fetch_optional(&self.reader)
                .await?;
        Ok(Signing {
            secrets,
            standard_webhooks: standard_webhooks.unwrap_or(false),
        })
    }

    async fn stored_secrets(&self) -> Result<Vec<StoredSecret>> {
        let rows: Vec<(String, String)> =
            sqlx::query_as("SELECT org_id, secret FROM signing_secrets ORDER BY rowid")
                .fetch_all(&self.reader)
                .await?;
        Ok(rows
            .into_iter()
            .map(|(org_id, secret)| StoredSecret { org_id, secret })
            .collect())
    }

    async fn replace_stored_secret(&self, org_id: &str, old: &str, new: &str) -> Result<bool> {
        let mut tx = self.writer.begin_with("BEGIN IMMEDIATE").await?;
        let replaced =
            sqlx::query("UPDATE signing_secrets SET secret = ? WHERE org_id = ? AND secret = ?")
                .bind(new)
                .bind(org_id)
                .bind(old)
                .execute(&mut *tx)
                .await?
                .rows_affected();
        tx.commit().await?;
        Ok(replaced > 0)
    }

    async fn org_settings(&self, org_id: &str) -> Result<Option<OrgSettings>> {
        let row =
            sqlx::query("SELECT id, name, standard_webhooks, created_at FROM orgs WHERE id = ?")
                .bind(org_id)
                .fetch_optional(&self.reader)
                .await?;
        row.map(|row| {
            Ok(OrgSettings {
                id: row.try_get("id")?,
                name: row.try_get("name")?,
                standard_webhooks: row.try_get("standard_webhooks")?,
                created_at: row.try_get("created_at")?,
            })
        })
        .transpose()
    }

    async fn set_standard_webhooks(&self, org_id: &str, on: bool) -> Result<bool> {
        let mut tx = self.writer.begin_with("BEGIN IMMEDIATE").await?;
        let updated = sqlx::query("UPDATE orgs SET standard_webhooks = ? WHERE id = ?")
            .bind(on)
            .bind(org_id)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        tx.commit().await?;
        Ok(updated == 1)
    }

    async fn rotate_secret(&self, org_id: &str, secret: &str, retire_at: Millis) -> Result<bool> {
        let now = now_ms();
        let mut tx = self.writer.begin_with("BEGIN IMMEDIATE").await?;
        let exists: Option<i64> = sqlx::query_scalar("SELECT 1 FROM orgs WHERE id = ?")
            .bind(org_id)
            .fetch_optional(&mut *tx)
            .await?;
        if exists.is_none() {
            return Ok(false);
        }
        sqlx::query(
            "UPDATE signing_secrets SET retires_at = ?1
             WHERE org_id = ?2 AND (retires_at IS NULL OR retires_at > ?1)",
        )
        .bind(retire_at)
        .bind(org_id)
        .execute(&mut *tx)
        .await?;
        sqlx::query("INSERT INTO signing_secrets (org_id, secret, created_at) VALUES (?, ?, ?)")
            .bind(org_id)
            .bind(secret)
            .bind(now)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(true)
    }

    async fn insert_agent(&self, agent: &Agent) -> Result<()> {
        insert_agent(&self.writer, agent).await
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
        match self.write(Write::CreateSession(new)).await? {
            Written::Created(created) => Ok(created),
            other => Err(unexpected(other)),
        }
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
        let mut tx = self.writer.begin_with("BEGIN IMMEDIATE").await?;
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
                writes::write_finish(&mut tx, &finish).await?;
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
        let owner = owner.to_owned();
        match self.write(Write::ClaimSession { owner, lease_ms }).await? {
            Written::Claimed(session) => Ok(session.map(|s| *s)),
            other => Err(unexpected(other)),
        }
    }

    async fn renew_session(&self, id: &str, owner: &str, lease_ms: i64) -> Result<Renewal> {
        let (id, owner) = (id.to_owned(), owner.to_owned());
        match self
            .write(Write::RenewSession {
                id,
                owner,
                lease_ms,
            })
            .await?
        {
            Written::Renewed(renewal) => Ok(renewal),
            other => Err(unexpected(other)),
        }
    }

    async fn append_event(
        &self,
        session_id: &str,
        owner: &str,
        kind: EventKind,
        data: Value,
    ) -> Result<Event> {
        let (session_id, owner) = (session_id.to_owned(), owner.to_owned());
        match self
            .write(Write::AppendEvent {
                session_id,
                owner,
                kind,
                data,
            })
            .await?
        {
            Written::Appended(event) => Ok(event),
            other => Err(unexpected(other)),
        }
    }

    async fn finish_session(&self, owner: &str, finish: Finish) -> Result<()> {
        let owner = owner.to_owned();
        match self.write(Write::FinishSession { owner, finish }).await? {
            Written::Done => Ok(()),
            other => Err(unexpected(other)),
        }
    }

    async fn claim_deliveries(&self, claim: DeliveryClaim) -> Result<Vec<Delivery>> {
        let write = Write::ClaimDeliveries {
            room: to_json(&claim.room),
            claim,
        };
        match self.write(write).await? {
            Written::Deliveries(deliveries) => Ok(deliveries),
            other => Err(unexpected(other)),
        }
    }

    async fn release_deliveries(
        &self,
        owner: &str,
        ids: Vec<String>,
        not_before: Option<Millis>,
    ) -> Result<()> {
        let write = Write::ReleaseDeliveries {
            owner: owner.to_owned(),
            ids: to_json(&ids),
            not_before,
        };
        match self.write(write).await? {
            Written::Done => Ok(()),
            other => Err(unexpected(other)),
        }
    }

    async fn defer_destination(&self, destination: &str, until: Millis) -> Result<u64> {
        let write = Write::DeferDestination {
            destination: destination.to_owned(),
            until,
        };
        match self.write(write).await? {
            Written::Count(count) => Ok(count),
            other => Err(unexpected(other)),
        }
    }

    async fn next_delivery_due(&self) -> Result<Option<Millis>> {
        let due = sqlx::query_scalar(NEXT_DELIVERY_DUE_SQL)
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
        let (delivery_id, owner) = (delivery_id.to_owned(), owner.to_owned());
        match self
            .write(Write::RecordAttempt(AttemptWrite {
                delivery_id,
                owner,
                attempt,
                next,
            }))
            .await?
        {
            Written::Done => Ok(()),
            other => Err(unexpected(other)),
        }
    }

    async fn delivery_for_session(&self, session_id: &str) -> Result<Option<DeliveryState>> {
        let row = sqlx::query("SELECT * FROM deliveries WHERE session_id = ?")
            .bind(session_id)
            .fetch_optional(&self.reader)
            .await?;
        row.as_ref().map(delivery_state_from_row).transpose()
    }

    async fn delivery(&self, org_id: Option<&str>, id: &str) -> Result<Option<DeliveryState>> {
        let row =
            sqlx::query("SELECT * FROM deliveries WHERE id = ?1 AND (?2 IS NULL OR org_id = ?2)")
                .bind(id)
                .bind(org_id)
                .fetch_optional(&self.reader)
                .await?;
        row.as_ref().map(delivery_state_from_row).transpose()
    }

    async fn attempts(&self, delivery_id: &str) -> Result<Vec<AttemptState>> {
        let rows = sqlx::query("SELECT * FROM delivery_attempts WHERE delivery_id = ? ORDER BY n")
            .bind(delivery_id)
            .fetch_all(&self.reader)
            .await?;
        rows.iter().map(attempt_from_row).collect()
    }

    async fn deliveries(
        &self,
        org_id: Option<&str>,
        status: Option<&str>,
        after: Option<&str>,
        limit: u32,
    ) -> Result<Vec<DeliveryState>> {
        let rows = sqlx::query(
            "SELECT * FROM deliveries
             WHERE (?1 IS NULL OR org_id = ?1) AND (?2 IS NULL OR status = ?2) AND id > ?3
             ORDER BY id LIMIT ?4",
        )
        .bind(org_id)
        .bind(status)
        .bind(after.unwrap_or(""))
        .bind(limit)
        .fetch_all(&self.reader)
        .await?;
        rows.iter().map(delivery_state_from_row).collect()
    }

    async fn redeliver(
        &self,
        org_id: Option<&str>,
        id: &str,
        deadline_at: Millis,
    ) -> Result<Redelivery> {
        let mut tx = self.writer.begin_with("BEGIN IMMEDIATE").await?;
        let row = sqlx::query(
            "UPDATE deliveries
             SET status = 'pending', next_attempt_at = ?1, deadline_at = ?2,
                 round_start = attempts, completed_at = NULL,
                 lease_owner = NULL, lease_until = NULL
             WHERE id = ?3 AND (?4 IS NULL OR org_id = ?4) AND status != 'pending'
             RETURNING *",
        )
        .bind(now_ms())
        .bind(deadline_at)
        .bind(id)
        .bind(org_id)
        .fetch_optional(&mut *tx)
        .await?;
        let result = match row {
            Some(row) => Redelivery::Queued(delivery_state_from_row(&row)?),
            None if self.delivery(org_id, id).await?.is_some() => Redelivery::StillPending,
            None => Redelivery::NotFound,
        };
        tx.commit().await?;
        Ok(result)
    }
}

/// A write answered with the wrong kind of result: a bug, reported as such.
fn unexpected(written: Written) -> StoreError {
    StoreError::Corrupt(format!("unexpected write result {written:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{new_id, AgentSpec, InputMessage, ModelProvider, Role, ToolChoice};
    use crate::store::{NewDelivery, Outcome};
    use futures_util::future::join_all;
    use serde_json::json;

    async fn store_with_org(dir: &std::path::Path) -> (SqliteStore, Agent) {
        let url = format!("sqlite://{}", dir.join("t.db").display());
        let store = SqliteStore::open(&url).await.unwrap();
        let org = NewOrg {
            id: new_id(),
            name: "acme".into(),
            signing_secret: "whsec_test".into(),
            key_id: new_id(),
            key_hash: vec![0; 32],
        };
        let agent = Agent {
            id: new_id(),
            org_id: org.id.clone(),
            spec: AgentSpec {
                name: "a".into(),
                model_provider: ModelProvider::Scripted,
                model: "scripted".into(),
                system: None,
                max_steps: 3,
                temperature: None,
                max_tokens: None,
                tools: Vec::new(),
                tool_choice: ToolChoice::Auto,
                script: Vec::new(),
            },
            created_at: now_ms(),
            updated_at: now_ms(),
        };
        store.create_first_org(org, &agent).await.unwrap();
        (store, agent)
    }

    fn new_session(agent: &Agent) -> NewSession {
        NewSession {
            id: new_id(),
            org_id: agent.org_id.clone(),
            agent: agent.clone(),
            input: vec![InputMessage {
                role: Role::User,
                content: "hi".into(),
            }],
            metadata: None,
            callback_url: Some("https://example.com/hook".into()),
            idempotency_key: None,
            fingerprint: Vec::new(),
            created_at: now_ms(),
        }
    }

    /// Runs a session to its end, leaving a pending delivery; returns its id.
    async fn finished_with_callback(store: &SqliteStore, agent: &Agent) -> String {
        store.create_session(new_session(agent)).await.unwrap();
        let session = store
            .claim_session("worker", 60_000)
            .await
            .unwrap()
            .unwrap();
        let delivery = NewDelivery {
            id: new_id(),
            url: "https://example.com/hook".into(),
            destination: "example.com:443".into(),
            body: b"{}".to_vec(),
            deadline_at: now_ms() + 60_000,
        };
        let finish = Finish {
            session_id: session.id.clone(),
            outcome: Outcome::Succeeded {
                output: "ok".into(),
            },
            completed_at: now_ms(),
            end_event: json!({}),
            delivery: Some(delivery.clone()),
        };
        store.finish_session("worker", finish).await.unwrap();
        delivery.id
    }

    fn answered(status: u16) -> AttemptRecord {
        AttemptRecord {
            started_at: now_ms(),
            duration_ms: 3,
            status_code: Some(status),
            error_kind: None,
            error_message: None,
        }
    }

    #[tokio::test]
    async fn a_failing_write_among_concurrent_ones_fails_alone() {
        let dir = tempfile::tempdir().unwrap();
        let (store, agent) = store_with_org(dir.path()).await;
        let stranger = store.create_session(new_session(&agent)).await.unwrap();
        let Created::New(stranger) = stranger else {
            panic!("a new session");
        };

        // Sent together, these share commits; the append is refused (the
        // session is not leased to "nobody"), the sessions are created.
        let creates = join_all((0..20).map(|_| store.create_session(new_session(&agent))));
        let append = store.append_event(&stranger, "nobody", EventKind::Message, json!({}));
        let (created, appended) = tokio::join!(creates, append);

        assert!(
            matches!(appended, Err(StoreError::LeaseLost)),
            "{appended:?}"
        );
        for created in created {
            let Created::New(id) = created.unwrap() else {
                panic!("a new session");
            };
            assert!(store.session(&agent.org_id, &id).await.unwrap().is_some());
        }
    }

    #[tokio::test]
    async fn attempts_recorded_together_each_count_once_and_a_lost_lease_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (store, agent) = store_with_org(dir.path()).await;
        let mut ids = Vec::new();
        for _ in 0..5 {
            ids.push(finished_with_callback(&store, &agent).await);
        }
        let claim = DeliveryClaim {
            owner: "dispatcher".into(),
            lease_ms: 60_000,
            limit: 10,
            per_destination: 10,
            room: Vec::new(),
        };
        assert_eq!(store.claim_deliveries(claim).await.unwrap().len(), 5);

        // Four answered 200 and one 503 by the lease holder; one more
        // record for the first delivery from a dispatcher without its lease.
        let records = ids.iter().enumerate().map(|(i, id)| {
            let (status, next) = match i {
                4 => (503, NextStep::RetryAt(now_ms() + 5_000)),
                _ => (200, NextStep::Succeeded),
            };
            store.record_attempt(id, "dispatcher", answered(status), next)
        });
        let intruder = store.record_attempt(&ids[0], "other", answered(200), NextStep::Succeeded);
        let (recorded, intruded) = tokio::join!(join_all(records), intruder);

        assert!(recorded.iter().all(Result::is_ok), "{recorded:?}");
        assert!(
            matches!(intruded, Err(StoreError::LeaseLost)),
            "{intruded:?}"
        );
        for (i, id) in ids.iter().enumerate() {
            let state = store.delivery(None, id).await.unwrap().unwrap();
            let attempts = store.attempts(id).await.unwrap();
            assert_eq!(state.attempts, 1, "{state:?}");
            assert_eq!(attempts.len(), 1);
            assert_eq!(attempts[0].n, 1);
            let (status, code) = if i == 4 {
                ("pending", 503)
            } else {
                ("succeeded", 200)
            };
            assert_eq!(state.status, status);
            assert_eq!(state.last_status_code, Some(code));
            assert_eq!(attempts[0].record.status_code, Some(code));
        }
    }

    #[tokio::test]
    async fn a_claim_takes_no_more_than_each_destination_has_room_for() {
        let dir = tempfile::tempdir().unwrap();
        let (store, agent) = store_with_org(dir.path()).await;
        for _ in 0..6 {
            finished_with_callback(&store, &agent).await;
        }
        let claim = |room: Vec<(String, u32)>| DeliveryClaim {
            owner: "dispatcher".into(),
            lease_ms: 60_000,
            limit: 10,
            per_destination: 4,
            room,
        };
        let full = vec![("example.com:443".to_owned(), 0)];
        assert!(store
            .claim_deliveries(claim(full))
            .await
            .unwrap()
            .is_empty());
        let some = vec![("example.com:443".to_owned(), 1)];
        assert_eq!(store.claim_deliveries(claim(some)).await.unwrap().len(), 1);
        assert_eq!(
            store.claim_deliveries(claim(vec![])).await.unwrap().len(),
            4
        );
        assert_eq!(
            store.claim_deliveries(claim(vec![])).await.unwrap().len(),
            1
        );
    }
}
