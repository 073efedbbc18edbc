//! Durable state: organisations, keys, agents, sessions, events and callback
//! deliveries, behind one [`Store`] trait.
//!
//! Every transition the server answers for is a committed row, so a killed
//! process loses nothing. Work is claimed with leases: a claim records an owner
//! and an expiry, and a lease that lapses lets another worker take over.
//! SQLite is the embedded engine; a second engine implements the same trait.

mod sqlite;

pub use sqlite::{SqliteStore, CLAIM_DELIVERIES_SQL, NEXT_DELIVERY_DUE_SQL};

use crate::domain::{Agent, Event, EventKind, InputMessage, Millis, Session, SessionError};
use async_trait::async_trait;
use serde_json::Value;
use std::sync::Arc;

/// What the store can fail with.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The worker's lease on a session or delivery is gone: another took over.
    #[error("lease lost")]
    LeaseLost,
    #[error("unsupported database url: {0}")]
    UnsupportedUrl(String),
    #[error("there is no database at {}", .0.display())]
    Missing(std::path::PathBuf),
    #[error(transparent)]
    Database(#[from] sqlx::Error),
    #[error(transparent)]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("corrupt row: {0}")]
    Corrupt(String),
    #[error("store is shutting down")]
    Closed,
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// A shared handle to whichever engine is configured.
pub type DynStore = Arc<dyn Store>;

/// Opens the store named by a database URL and applies migrations.
pub async fn open(url: &str) -> Result<DynStore> {
    if url.starts_with("sqlite:") {
        Ok(Arc::new(SqliteStore::open(url).await?))
    } else {
        Err(StoreError::UnsupportedUrl(url.to_owned()))
    }
}

/// Like [`open`], for a database that must exist already: commands that
/// read or change what is there should not make a new, empty one of a
/// mistyped path.
pub async fn open_existing(url: &str) -> Result<DynStore> {
    match database_file(url) {
        Some(file) if !file.exists() => Err(StoreError::Missing(file)),
        _ => open(url).await,
    }
}

/// The file a SQLite database URL names, if it names one.
pub fn database_file(url: &str) -> Option<std::path::PathBuf> {
    use std::str::FromStr;
    let options = sqlx::sqlite::SqliteConnectOptions::from_str(url).ok()?;
    let file = options.get_filename();
    (!file.as_os_str().is_empty() && file != std::path::Path::new(":memory:"))
        .then(|| file.to_owned())
}

/// What one claim of due deliveries may take.
#[derive(Debug, Clone)]
pub struct DeliveryClaim {
    pub owner: String,
    pub lease_ms: i64,
    /// Deliveries in all.
    pub limit: u32,
    /// Deliveries to one destination, unless `room` says otherwise.
    pub per_destination: u32,
    /// Destinations with less room than `per_destination` (0: none at all),
    /// each listed once.
    pub room: Vec<(String, u32)>,
}

/// A new organisation with its first API key.
#[derive(Debug, Clone)]
pub struct NewOrg {
    pub id: String,
    pub name: String,
    pub signing_secret: String,
    pub key_id: String,
    pub key_hash: Vec<u8>,
}

/// An organisation's settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OrgSettings {
    pub id: String,
    pub name: String,
    /// Callbacks also carry the Standard Webhooks headers.
    pub standard_webhooks: bool,
    pub created_at: Millis,
}

/// A signing secret as stored (possibly sealed).
#[derive(Debug, Clone)]
pub struct StoredSecret {
    pub org_id: String,
    pub secret: String,
}

/// What signing a callback to an organisation needs.
#[derive(Debug, Clone, Default)]
pub struct Signing {
    /// The active secrets, oldest first.
    pub secrets: Vec<String>,
    pub standard_webhooks: bool,
}

/// A stored API key: which organisation it belongs to and its hash.
#[derive(Debug, Clone)]
pub struct ApiKey {
    pub org_id: String,
    pub key_hash: Vec<u8>,
}

/// A session to create, with the first event and an optional idempotency key.
#[derive(Debug, Clone)]
pub struct NewSession {
    pub id: String,
    pub org_id: String,
    pub agent: Agent,
    pub input: Vec<InputMessage>,
    pub metadata: Option<Value>,
    pub callback_url: Option<String>,
    pub idempotency_key: Option<String>,
    /// What the request asked for, hashed, to tell a true repeat of an
    /// idempotency key from a reuse.
    pub fingerprint: Vec<u8>,
    pub created_at: Millis,
}

/// The answer to [`Store::create_session`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Created {
    /// A new session was committed.
    New(String),
    /// The idempotency key was seen before: this is the first session.
    Existing(String),
    /// The idempotency key was seen before with a different request.
    KeyReused,
}

/// How a session ended.
#[derive(Debug, Clone)]
pub struct Finish {
    pub session_id: String,
    pub outcome: Outcome,
    pub completed_at: Millis,
    /// The `session_end` event's data.
    pub end_event: Value,
    /// The callback to send, if the session has a callback URL.
    pub delivery: Option<NewDelivery>,
}

/// The terminal state a session reaches.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Succeeded { output: String },
    Failed(SessionError),
    Cancelled,
}

/// A callback to deliver: the body bytes are fixed here, once.
#[derive(Debug, Clone)]
pub struct NewDelivery {
    pub id: String,
    pub url: String,
    /// `host:port` of the URL.
    pub destination: String,
    pub body: Vec<u8>,
    pub deadline_at: Millis,
}

/// A delivery claimed by a dispatcher.
#[derive(Debug, Clone)]
pub struct Delivery {
    pub id: String,
    pub session_id: String,
    pub org_id: String,
    pub url: String,
    pub destination: String,
    pub body: Vec<u8>,
    /// Attempts made before this one.
    pub attempts: u32,
    /// Attempts made before the current round (a redelivery starts one).
    pub round_start: u32,
    pub created_at: Millis,
    pub deadline_at: Millis,
}

/// What a delivery attempt came to, as recorded.
#[derive(Debug, Clone)]
pub struct AttemptRecord {
    pub started_at: Millis,
    pub duration_ms: i64,
    pub status_code: Option<u16>,
    pub error_kind: Option<String>,
    pub error_message: Option<String>,
}

/// Where a delivery goes after an attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NextStep {
    Succeeded,
    Failed,
    RetryAt(Millis),
}

/// Delivery state as clients read it.
#[derive(Debug, Clone)]
pub struct DeliveryState {
    pub id: String,
    pub session_id: String,
    pub url: String,
    pub status: String,
    pub attempts: u32,
    pub next_attempt_at: Option<Millis>,
    /// While an attempt is being made: when its claim lapses.
    pub lease_until: Option<Millis>,
    pub last_status_code: Option<u16>,
    pub last_error: Option<String>,
    pub created_at: Millis,
    pub completed_at: Option<Millis>,
}

/// One recorded delivery attempt, as operators read it.
#[derive(Debug, Clone)]
pub struct AttemptState {
    pub n: u32,
    pub record: AttemptRecord,
}

/// The answer to a redelivery request.
#[derive(Debug, Clone)]
pub enum Redelivery {
    /// The delivery is pending again, due now.
    Queued(DeliveryState),
    /// It is still being delivered: nothing to do.
    StillPending,
    NotFound,
}

/// What a lease renewal learned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Renewal {
    Held,
    CancelRequested,
    Lost,
}

/// The answer to a cancel request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CancelResult {
    /// The session was queued and is now cancelled.
    Cancelled,
    /// The session is running; its worker will stop at the next step.
    Requested,
    /// The session had already ended.
    AlreadyEnded,
    NotFound,
}

/// Everything the server keeps, whatever the engine.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    async fn create_org(&self, org: NewOrg) -> Result<()>;
    /// Creates `org` with `agent` only if the database has no organisation
    /// yet; `false` if it had one.
    async fn create_first_org(&self, org: NewOrg, agent: &Agent) -> Result<bool>;
    async fn api_key(&self, key_id: &str) -> Result<Option<ApiKey>>;
    /// The organisation's active signing secrets and signing settings.
    async fn signing(&self, org_id: &str) -> Result<Signing>;
    /// Every signing secret, active or retired, as stored.
    async fn stored_secrets(&self) -> Result<Vec<StoredSecret>>;
    /// Replaces one stored secret by another form of it; false if gone.
    async fn replace_stored_secret(&self, org_id: &str, old: &str, new: &str) -> Result<bool>;
    async fn org_settings(&self, org_id: &str) -> Result<Option<OrgSettings>>;
    /// Turns the Standard Webhooks headers on or off; false if there is no
    /// such organisation.
    async fn set_standard_webhooks(&self, org_id: &str, on: bool) -> Result<bool>;
    /// Adds a signing secret; the ones active now retire at `retire_at`.
    /// False if there is no such organisation.
    async fn rotate_secret(&self, org_id: &str, secret: &str, retire_at: Millis) -> Result<bool>;

    async fn insert_agent(&self, agent: &Agent) -> Result<()>;
    async fn agent(&self, org_id: &str, id: &str) -> Result<Option<Agent>>;
    async fn agents(&self, org_id: &str, after: Option<&str>, limit: u32) -> Result<Vec<Agent>>;
    /// Replaces the agent's spec; false if there is no such agent.
    async fn update_agent(&self, agent: &Agent) -> Result<bool>;
    async fn delete_agent(&self, org_id: &str, id: &str) -> Result<bool>;

    /// Commits the session and its `session_start` event durably before
    /// returning.
    async fn create_session(&self, new: NewSession) -> Result<Created>;
    async fn session(&self, org_id: &str, id: &str) -> Result<Option<Session>>;
    async fn events(&self, session_id: &str, after: i64, limit: u32) -> Result<Vec<Event>>;
    async fn cancel_session(&self, org_id: &str, id: &str, finish: Finish) -> Result<CancelResult>;

    /// Claims the oldest queued session, or a running one whose lease lapsed.
    async fn claim_session(&self, owner: &str, lease_ms: i64) -> Result<Option<Session>>;
    async fn renew_session(&self, id: &str, owner: &str, lease_ms: i64) -> Result<Renewal>;
    /// Appends an event if `owner` still holds the session's lease.
    async fn append_event(
        &self,
        session_id: &str,
        owner: &str,
        kind: EventKind,
        data: Value,
    ) -> Result<Event>;
    /// Writes the terminal status, the final event and the delivery row in
    /// one transaction, if `owner` still holds the lease.
    async fn finish_session(&self, owner: &str, finish: Finish) -> Result<()>;

    /// Claims due deliveries, the longest due first, within the claim's
    /// limits.
    async fn claim_deliveries(&self, claim: DeliveryClaim) -> Result<Vec<Delivery>>;
    /// Gives claimed deliveries back unattempted, to be claimed again, and
    /// not before `not_before` when given.
    async fn release_deliveries(
        &self,
        owner: &str,
        ids: Vec<String>,
        not_before: Option<Millis>,
    ) -> Result<()>;
    /// Moves every pending delivery to `destination` that is due earlier
    /// and not being attempted to `until`, without counting an attempt.
    async fn defer_destination(&self, destination: &str, until: Millis) -> Result<u64>;
    /// When the next pending delivery falls due, if any.
    async fn next_delivery_due(&self) -> Result<Option<Millis>>;
    /// Records an attempt and the delivery's next step in one transaction.
    async fn record_attempt(
        &self,
        delivery_id: &str,
        owner: &str,
        attempt: AttemptRecord,
        next: NextStep,
    ) -> Result<()>;
    async fn delivery_for_session(&self, session_id: &str) -> Result<Option<DeliveryState>>;
    async fn delivery(&self, org_id: Option<&str>, id: &str) -> Result<Option<DeliveryState>>;
    async fn attempts(&self, delivery_id: &str) -> Result<Vec<AttemptState>>;
    /// Deliveries by id, optionally of one organisation and one status.
    async fn deliveries(
        &self,
        org_id: Option<&str>,
        status: Option<&str>,
        after: Option<&str>,
        limit: u32,
    ) -> Result<Vec<DeliveryState>>;
    /// Makes an ended delivery due again, with the same id and body, a new
    /// round of the retry schedule and a new deadline.
    async fn redeliver(
        &self,
        org_id: Option<&str>,
        id: &str,
        deadline_at: Millis,
    ) -> Result<Redelivery>;
}
