//! The write queue: every hot write goes through one task that commits
//! whatever is waiting in one transaction.
//!
//! SQLite allows one writer, and each durable commit costs an fsync. Sending
//! accepts, event appends, claims and attempt records through one queue lets
//! a single commit (and a single fsync) carry many of them. Each write runs in
//! the same transaction; should one fail, the batch is rolled back and applied
//! again with each write in its own savepoint, so a failing write does not
//! undo the others. No caller hears back before the commit that holds its
//! write.

use serde_json::{json, Value};
use sqlx::{SqliteConnection, SqlitePool};
use tokio::sync::{mpsc, oneshot};

use super::rows::{delivery_from_row, session_from_row, to_json};
use crate::domain::{now_ms, Event, EventKind, Millis, Session, SessionStatus};
use crate::store::{
    AttemptRecord, Created, Delivery, DeliveryClaim, Finish, NewSession, NextStep, Outcome,
    Renewal, Result, StoreError,
};

/// How many writes one commit may carry.
pub const MAX_BATCH: usize = 512;

/// A commit slower than this is logged: every waiting caller felt it.
const SLOW_BATCH: std::time::Duration = std::time::Duration::from_millis(100);

/// A write waiting for the next commit.
#[derive(Debug)]
pub enum Write {
    CreateSession(NewSession),
    ClaimSession {
        owner: String,
        lease_ms: i64,
    },
    RenewSession {
        id: String,
        owner: String,
        lease_ms: i64,
    },
    AppendEvent {
        session_id: String,
        owner: String,
        kind: EventKind,
        data: Value,
    },
    FinishSession {
        owner: String,
        finish: Finish,
    },
    ClaimDeliveries {
        claim: DeliveryClaim,
        /// `claim.room` as a JSON array of `[destination, room]` pairs.
        room: String,
    },
    ReleaseDeliveries {
        owner: String,
        /// Delivery ids, as a JSON array.
        ids: String,
        not_before: Option<Millis>,
    },
    DeferDestination {
        destination: String,
        until: Millis,
    },
    RecordAttempt(AttemptWrite),
}

/// An attempt to record, with its delivery's next step.
#[derive(Debug)]
pub struct AttemptWrite {
    pub delivery_id: String,
    pub owner: String,
    pub attempt: AttemptRecord,
    pub next: NextStep,
}

/// What a write produced, once committed.
#[derive(Debug)]
pub enum Written {
    Created(Created),
    Claimed(Option<Box<Session>>),
    Renewed(Renewal),
    Appended(Event),
    Deliveries(Vec<Delivery>),
    Count(u64),
    Done,
}

pub type WriteRequest = (Write, oneshot::Sender<Result<Written>>);

/// Commits queued writes, as many per transaction as are waiting.
pub async fn commit_batches(writer: SqlitePool, mut queue: mpsc::Receiver<WriteRequest>) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    while queue.recv_many(&mut batch, MAX_BATCH).await > 0 {
        let started = std::time::Instant::now();
        let applied = apply_batch(&writer, &batch).await;
        let took = started.elapsed();
        if took > SLOW_BATCH {
            tracing::warn!(
                size = batch.len(),
                took_ms = took.as_millis() as u64,
                "slow commit"
            );
        }
        match applied {
            Ok(results) => {
                for ((_, reply), result) in batch.drain(..).zip(results) {
                    let _ = reply.send(result);
                }
            }
            Err(error) => {
                tracing::error!(error = %error, size = batch.len(), "write batch failed");
                let message = error.to_string();
                for (_, reply) in batch.drain(..) {
                    let _ = reply.send(Err(StoreError::Corrupt(message.clone())));
                }
            }
        }
    }
}

async fn apply_batch(writer: &SqlitePool, batch: &[WriteRequest]) -> Result<Vec<Result<Written>>> {
    // Almost every batch succeeds whole: apply it as it is, and only when a
    // write fails start again with a savepoint around each write.
    if let Some(results) = apply_all_or_none(writer, batch).await? {
        return Ok(results);
    }
    apply_each(writer, batch).await
}

/// Commits the batch if every write succeeds; `None` (nothing written) if
/// one fails.
async fn apply_all_or_none(
    writer: &SqlitePool,
    batch: &[WriteRequest],
) -> Result<Option<Vec<Result<Written>>>> {
    let mut tx = writer.begin_with("BEGIN IMMEDIATE").await?;
    let mut results = Vec::with_capacity(batch.len());
    // Attempt records, the bulk of a busy dispatcher's writes, go in last
    // and together: two statements for all of them.
    let mut attempts = Vec::new();
    for (write, _) in batch {
        if let Write::RecordAttempt(attempt) = write {
            attempts.push(attempt.row());
            results.push(Ok(Written::Done));
            continue;
        }
        match apply(&mut tx, write).await {
            Ok(written) => results.push(Ok(written)),
            Err(_) => {
                tx.rollback().await?;
                return Ok(None);
            }
        }
    }
    let expected = attempts.len() as u64;
    if expected > 0 && record_attempts(&mut tx, attempts).await? != expected {
        tx.rollback().await?;
        return Ok(None);
    }
    tx.commit().await?;
    Ok(Some(results))
}

/// Commits the batch with each write in its own savepoint, so a failing
/// write leaves nothing behind and the others stand.
async fn apply_each(writer: &SqlitePool, batch: &[WriteRequest]) -> Result<Vec<Result<Written>>> {
    let mut tx = writer.begin_with("BEGIN IMMEDIATE").await?;
    let mut results = Vec::with_capacity(batch.len());
    for (write, _) in batch {
        sqlx::query("SAVEPOINT write").execute(&mut *tx).await?;
        let result = apply(&mut tx, write).await;
        if result.is_err() {
            sqlx::query("ROLLBACK TO write").execute(&mut *tx).await?;
        }
        sqlx::query("RELEASE write").execute(&mut *tx).await?;
        results.push(result);
    }
    tx.commit().await?;
    Ok(results)
}

async fn apply(tx: &mut SqliteConnection, write: &Write) -> Result<Written> {
    match write {
        Write::CreateSession(new) => insert_session(tx, new).await.map(Written::Created),
        Write::ClaimSession { owner, lease_ms } => {
            let claimed = claim_session(tx, owner, *lease_ms).await?;
            Ok(Written::Claimed(claimed.map(Box::new)))
        }
        Write::RenewSession {
            id,
            owner,
            lease_ms,
        } => renew_session(tx, id, owner, *lease_ms)
            .await
            .map(Written::Renewed),
        Write::AppendEvent {
            session_id,
            owner,
            kind,
            data,
        } => {
            if !holds_session(tx, session_id, owner).await? {
                return Err(StoreError::LeaseLost);
            }
            let event = insert_event(tx, session_id, *kind, data, now_ms()).await?;
            Ok(Written::Appended(event))
        }
        Write::FinishSession { owner, finish } => {
            if !holds_session(tx, &finish.session_id, owner).await? {
                return Err(StoreError::LeaseLost);
            }
            write_finish(tx, finish).await.map(|()| Written::Done)
        }
        Write::ClaimDeliveries { claim, room } => claim_deliveries(tx, claim, room)
            .await
            .map(Written::Deliveries),
        Write::ReleaseDeliveries {
            owner,
            ids,
            not_before,
        } => {
            sqlx::query(
                "UPDATE deliveries SET lease_owner = NULL, lease_until = NULL,
                        next_attempt_at = MAX(next_attempt_at, COALESCE(?3, 0))
                 WHERE id IN (SELECT value FROM json_each(?1)) AND lease_owner = ?2",
            )
            .bind(ids)
            .bind(owner)
            .bind(not_before)
            .execute(&mut *tx)
            .await?;
            Ok(Written::Done)
        }
        Write::DeferDestination { destination, until } => {
            let deferred = sqlx::query(
                "UPDATE deliveries SET next_attempt_at = ?2
                 WHERE destination = ?1 AND status = 'pending' AND next_attempt_at < ?2
                   AND (lease_until IS NULL OR lease_until < ?3)",
            )
            .bind(destination)
            .bind(until)
            .bind(now_ms())
            .execute(&mut *tx)
            .await?;
            Ok(Written::Count(deferred.rows_affected()))
        }
        Write::RecordAttempt(attempt) => match record_attempts(tx, vec![attempt.row()]).await? {
            0 => Err(StoreError::LeaseLost),
            _ => Ok(Written::Done),
        },
    }
}

async fn insert_session(tx: &mut SqliteConnection, new: &NewSession) -> Result<Created> {
    // The idempotency key is claimed first; a key seen before names the
    // session that was created for it.
    if let Some(key) = &new.idempotency_key {
        let claimed = sqlx::query(
            "INSERT INTO idempotency_keys (org_id, key, session_id, fingerprint, created_at)
             VALUES (?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
        )
        .bind(&new.org_id)
        .bind(key)
        .bind(&new.id)
        .bind(&new.fingerprint)
        .bind(new.created_at)
        .execute(&mut *tx)
        .await?;
        if claimed.rows_affected() == 0 {
            let (existing, fingerprint): (String, Option<Vec<u8>>) = sqlx::query_as(
                "SELECT session_id, fingerprint FROM idempotency_keys
                 WHERE org_id = ? AND key = ?",
            )
            .bind(&new.org_id)
            .bind(key)
            .fetch_one(&mut *tx)
            .await?;
            // Keys stored before fingerprints existed match any request.
            if fingerprint.is_some_and(|f| f != new.fingerprint) {
                return Ok(Created::KeyReused);
            }
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
    .execute(&mut *tx)
    .await?;

    let start = json!({
        "agent_id": new.agent.id,
        "input": new.input,
        "metadata": new.metadata,
    });
    insert_event(tx, &new.id, EventKind::SessionStart, &start, new.created_at).await?;
    Ok(Created::New(new.id.clone()))
}

/// Takes over a lapsed lease first, else the oldest queued session. Two
/// indexed look-ups: one `OR` query would sort every queued row per claim.
async fn claim_session(
    tx: &mut SqliteConnection,
    owner: &str,
    lease_ms: i64,
) -> Result<Option<Session>> {
    let now = now_ms();
    let row = sqlx::query(
        "UPDATE sessions
         SET status = 'running', lease_owner = ?1, lease_until = ?2,
             started_at = COALESCE(started_at, ?3), claims = claims + 1
         WHERE id = COALESCE(
             (SELECT id FROM sessions
              WHERE status = 'running' AND lease_until < ?3 LIMIT 1),
             (SELECT id FROM sessions
              WHERE status = 'queued' ORDER BY created_at LIMIT 1))
         RETURNING *",
    )
    .bind(owner)
    .bind(now + lease_ms)
    .bind(now)
    .fetch_optional(&mut *tx)
    .await?;
    row.as_ref().map(session_from_row).transpose()
}

async fn renew_session(
    tx: &mut SqliteConnection,
    id: &str,
    owner: &str,
    lease_ms: i64,
) -> Result<Renewal> {
    let cancel: Option<i64> = sqlx::query_scalar(
        "UPDATE sessions SET lease_until = ?
         WHERE id = ? AND lease_owner = ? AND status = 'running'
         RETURNING cancel_requested",
    )
    .bind(now_ms() + lease_ms)
    .bind(id)
    .bind(owner)
    .fetch_optional(&mut *tx)
    .await?;
    Ok(match cancel {
        None => Renewal::Lost,
        Some(0) => Renewal::Held,
        Some(_) => Renewal::CancelRequested,
    })
}

pub async fn insert_event(
    tx: &mut SqliteConnection,
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
    .fetch_one(&mut *tx)
    .await?;
    Ok(Event {
        seq,
        kind,
        data: data.clone(),
        created_at: at,
    })
}

/// True if `owner` holds the session's lease, read inside the transaction.
async fn holds_session(tx: &mut SqliteConnection, id: &str, owner: &str) -> Result<bool> {
    let held: Option<i64> = sqlx::query_scalar(
        "SELECT 1 FROM sessions WHERE id = ? AND lease_owner = ? AND status = 'running'",
    )
    .bind(id)
    .bind(owner)
    .fetch_optional(&mut *tx)
    .await?;
    Ok(held.is_some())
}

/// The terminal status, the `session_end` event and the delivery row.
pub async fn write_finish(tx: &mut SqliteConnection, finish: &Finish) -> Result<()> {
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
    .execute(&mut *tx)
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
            "INSERT INTO deliveries (id, session_id, org_id, url, destination, body, status,
                                     next_attempt_at, deadline_at, created_at)
             SELECT ?, id, org_id, ?, ?, ?, 'pending', ?, ?, ? FROM sessions WHERE id = ?",
        )
        .bind(&delivery.id)
        .bind(&delivery.url)
        .bind(&delivery.destination)
        .bind(&delivery.body)
        .bind(finish.completed_at)
        .bind(delivery.deadline_at)
        .bind(finish.completed_at)
        .bind(&finish.session_id)
        .execute(&mut *tx)
        .await?;
    }
    Ok(())
}

/// Leases due deliveries, the longest due first, at most `?4` in all and
/// at most each destination's room: `?5`, unless the `[destination, room]`
/// pairs in `?6` give less. Only the `?7` longest due are looked at, so a
/// claim costs the same however many deliveries wait.
pub const CLAIM_DELIVERIES_SQL: &str = "
    UPDATE deliveries SET lease_owner = ?1, lease_until = ?2
    WHERE id IN (
        SELECT id FROM (
            SELECT due.id, due.next_attempt_at, COALESCE(room.n, ?5) AS room,
                   ROW_NUMBER() OVER (PARTITION BY due.destination
                                      ORDER BY due.next_attempt_at, due.id) AS nth
            FROM (SELECT id, destination, next_attempt_at FROM deliveries
                  WHERE status = 'pending' AND next_attempt_at <= ?3
                    AND (lease_until IS NULL OR lease_until < ?3)
                    AND destination NOT IN (SELECT value ->> 0 FROM json_each(?6)
                                            WHERE value ->> 1 = 0)
                  ORDER BY next_attempt_at LIMIT ?7) AS due
            LEFT JOIN (SELECT value ->> 0 AS destination, value ->> 1 AS n
                       FROM json_each(?6)) AS room
                   ON room.destination = due.destination)
        WHERE nth <= room
        ORDER BY next_attempt_at LIMIT ?4)
    RETURNING id, session_id, org_id, url, destination, body, attempts, round_start,
              created_at, deadline_at";

async fn claim_deliveries(
    tx: &mut SqliteConnection,
    claim: &DeliveryClaim,
    room: &str,
) -> Result<Vec<Delivery>> {
    let now = now_ms();
    let looked_at = (claim.limit * 2).clamp(32, 512);
    let rows = sqlx::query(CLAIM_DELIVERIES_SQL)
        .bind(&claim.owner)
        .bind(now + claim.lease_ms)
        .bind(now)
        .bind(claim.limit)
        .bind(claim.per_destination)
        .bind(room)
        .bind(looked_at)
        .fetch_all(&mut *tx)
        .await?;
    rows.iter().map(delivery_from_row).collect()
}

impl AttemptWrite {
    /// One element of the JSON array that [`record_attempts`] reads.
    fn row(&self) -> Value {
        let (status, next_at, completed_at) = match self.next {
            NextStep::Succeeded => ("succeeded", None, Some(now_ms())),
            NextStep::Failed => ("failed", None, Some(now_ms())),
            NextStep::RetryAt(at) => ("pending", Some(at), None),
        };
        let attempt = &self.attempt;
        json!({
            "id": self.delivery_id,
            "owner": self.owner,
            "status": status,
            "next_at": next_at,
            "completed_at": completed_at,
            "started_at": attempt.started_at,
            "duration_ms": attempt.duration_ms,
            "status_code": attempt.status_code,
            "error_kind": attempt.error_kind,
            "error_message": attempt.error_message,
            "last_error": attempt.error_message.as_ref().or(attempt.error_kind.as_ref()),
        })
    }
}

/// Records attempts, each as the next attempt of its delivery, and moves
/// the deliveries to their next step, in two statements however many there
/// are. Only deliveries still leased by the attempt's owner and pending are
/// touched; returns how many were.
///
/// The `+` before `status` keeps SQLite from walking every pending delivery
/// through the status index: each row is found by its id instead.
async fn record_attempts(tx: &mut SqliteConnection, rows: Vec<Value>) -> Result<u64> {
    let rows = Value::Array(rows).to_string();
    let inserted = sqlx::query(
        "INSERT INTO delivery_attempts (delivery_id, n, started_at, duration_ms,
                                        status_code, error_kind, error_message)
         SELECT d.id, d.attempts + 1, a.value ->> 'started_at', a.value ->> 'duration_ms',
                a.value ->> 'status_code', a.value ->> 'error_kind', a.value ->> 'error_message'
         FROM json_each(?) AS a
         JOIN deliveries AS d ON d.id = a.value ->> 'id'
         WHERE d.lease_owner = a.value ->> 'owner' AND +d.status = 'pending'",
    )
    .bind(&rows)
    .execute(&mut *tx)
    .await?
    .rows_affected();
    let updated = sqlx::query(
        "UPDATE deliveries
         SET attempts = attempts + 1, status = a.value ->> 'status',
             next_attempt_at = a.value ->> 'next_at', completed_at = a.value ->> 'completed_at',
             last_status_code = a.value ->> 'status_code', last_error = a.value ->> 'last_error',
             lease_owner = NULL, lease_until = NULL
         FROM json_each(?) AS a
         WHERE deliveries.id = a.value ->> 'id'
           AND deliveries.lease_owner = a.value ->> 'owner' AND +deliveries.status = 'pending'",
    )
    .bind(&rows)
    .execute(&mut *tx)
    .await?
    .rows_affected();
    debug_assert_eq!(
        inserted, updated,
        "an attempt row for each delivery moved on"
    );
    Ok(updated)
}
