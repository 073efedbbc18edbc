//! Workers: claim queued sessions, keep their leases, run them, finish them.
//!
//! A claim is a lease with an expiry, renewed while the session runs. A
//! worker killed mid-session stops renewing; once the lease lapses another
//! worker (here or in another process) claims the session and the runtime
//! resumes it from its events. Finishing writes the terminal status, the
//! final event and the callback delivery row in one transaction.

use serde::Serialize;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{broadcast, watch, Notify, Semaphore};
use tracing::Instrument;

use crate::domain::{new_id, now_ms, rfc3339, Event, Session, SessionError};
use crate::runtime::{Control, Recorder, Runtime};
use crate::store::{DynStore, Finish, NewDelivery, Outcome, Renewal, StoreError};

/// A session claimed more often than this has crashed its workers
/// repeatedly; it fails instead of taking down the next one.
const MAX_CLAIMS: u32 = 5;

/// Events read per query when a session's history is loaded.
const HISTORY_PAGE: u32 = 1_000;

/// Worker settings.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// How many sessions run at once in this process.
    pub concurrency: usize,
    pub lease: Duration,
    /// How often the store is polled when nothing wakes the workers.
    pub poll: Duration,
    pub public_url: String,
    pub callback_deadline: Duration,
}

/// Claims and runs sessions until shut down.
pub struct Workers {
    pub store: DynStore,
    pub runtime: Arc<Runtime>,
    pub config: WorkerConfig,
    pub owner: String,
    pub work_ready: Arc<Notify>,
    pub delivery_ready: Arc<Notify>,
    pub finished: broadcast::Sender<String>,
    pub running: Running,
}

/// The sessions running in this process, so a cancel request made here
/// reaches its session at once.
#[derive(Debug, Default, Clone)]
pub struct Running(Arc<Mutex<HashMap<String, Arc<Control>>>>);

impl Running {
    fn insert(&self, session_id: &str, control: Arc<Control>) {
        let mut running = self.0.lock().expect("running sessions");
        running.insert(session_id.to_owned(), control);
    }

    fn remove(&self, session_id: &str) {
        self.0.lock().expect("running sessions").remove(session_id);
    }

    /// Cancels the session if it runs here.
    pub fn cancel(&self, session_id: &str) {
        if let Some(control) = self.0.lock().expect("running sessions").get(session_id) {
            control.cancel();
        }
    }
}

impl Workers {
    /// The claim loop: one permit per running session.
    pub async fn run(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        let permits = Arc::new(Semaphore::new(self.config.concurrency));
        while !*shutdown.borrow() {
            let permit = tokio::select! {
                permit = permits.clone().acquire_owned() => permit.expect("semaphore is never closed"),
                _ = shutdown.changed() => break,
            };
            let lease_ms = self.config.lease.as_millis() as i64;
            match self.store.claim_session(&self.owner, lease_ms).await {
                Ok(Some(session)) => {
                    let workers = self.clone();
                    let span = tracing::info_span!("session", session.id = %session.id);
                    tokio::spawn(
                        async move {
                            workers.process(session).await;
                            drop(permit);
                        }
                        .instrument(span),
                    );
                }
                Ok(None) => {
                    drop(permit);
                    self.idle(&mut shutdown).await;
                }
                Err(error) => {
                    drop(permit);
                    tracing::error!(error = %error, "claiming a session failed");
                    self.idle(&mut shutdown).await;
                }
            }
        }
    }

    async fn idle(&self, shutdown: &mut watch::Receiver<bool>) {
        tokio::select! {
            _ = self.work_ready.notified() => {}
            _ = tokio::time::sleep(self.config.poll) => {}
            _ = shutdown.changed() => {}
        }
    }

    /// Runs one claimed session to its end, keeping its lease meanwhile.
    async fn process(&self, session: Session) {
        tracing::debug!(claims = session.claims, "session started");
        let control = Arc::new(Control::default());
        self.running.insert(&session.id, control.clone());
        let keeper = tokio::spawn(self.keep_lease(session.id.clone(), control.clone()));

        let outcome = self.outcome(&session, &control).await;
        keeper.abort();
        self.running.remove(&session.id);
        let outcome = match outcome {
            Ok(outcome) => outcome,
            Err(StoreError::LeaseLost) => {
                tracing::warn!("lease lost; another worker has the session");
                return;
            }
            Err(error) => {
                tracing::error!(error = %error, "session interrupted by a store error");
                return;
            }
        };

        let events_url = format!(
            "{}/v1/agent-sessions/{}/events",
            self.config.public_url, session.id
        );
        let finish = finish(&session, outcome, events_url, self.config.callback_deadline);
        let status = finish.end_event["status"].clone();
        match self.store.finish_session(&self.owner, finish).await {
            Ok(()) => {
                tracing::info!(status = %status, "session ended");
                let _ = self.finished.send(session.id.clone());
                self.delivery_ready.notify_one();
            }
            Err(error) => tracing::error!(error = %error, "finishing the session failed"),
        }
    }

    async fn outcome(&self, session: &Session, control: &Control) -> Result<Outcome, StoreError> {
        if session.claims > MAX_CLAIMS {
            let message = "the session was interrupted too many times";
            return Ok(Outcome::Failed(SessionError::new(
                "EXECUTION_ERROR",
                message,
            )));
        }
        let history = self.history(&session.id).await?;
        let recorder = Recorder {
            store: self.store.clone(),
            session_id: session.id.clone(),
            owner: self.owner.clone(),
        };
        self.runtime
            .run(session, &history, &recorder, control)
            .await
    }

    /// Every event the session has recorded so far, for the runtime to
    /// resume from.
    async fn history(&self, session_id: &str) -> Result<Vec<Event>, StoreError> {
        let mut history = Vec::new();
        loop {
            let after = history.last().map_or(0, |event: &Event| event.seq);
            let page = self.store.events(session_id, after, HISTORY_PAGE).await?;
            let done = page.len() < HISTORY_PAGE as usize;
            history.extend(page);
            if done {
                return Ok(history);
            }
        }
    }

    /// Renews the lease every third of its length until aborted, and passes
    /// on a cancel request.
    fn keep_lease(
        &self,
        session_id: String,
        control: Arc<Control>,
    ) -> impl std::future::Future<Output = ()> + Send + 'static {
        let store = self.store.clone();
        let owner = self.owner.clone();
        let lease = self.config.lease;
        async move {
            let lease_ms = lease.as_millis() as i64;
            loop {
                tokio::time::sleep(lease / 3).await;
                match store.renew_session(&session_id, &owner, lease_ms).await {
                    Ok(Renewal::Held) => {}
                    Ok(Renewal::CancelRequested) => control.cancel(),
                    Ok(Renewal::Lost) => return,
                    Err(error) => tracing::warn!(error = %error, "renewing the lease failed"),
                }
            }
        }
    }
}

/// `host:port` of a callback URL: what per-destination limits count by.
fn destination(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(url) => format!(
            "{}:{}",
            url.host_str().unwrap_or_default(),
            url.port_or_known_default().unwrap_or(443)
        ),
        Err(_) => String::new(),
    }
}

/// The callback body, in Scout's field order; fields are only ever added.
#[derive(Serialize)]
struct CallbackBody<'a> {
    callback_event_id: &'a str,
    session_id: &'a str,
    agent_id: &'a str,
    status: &'a str,
    completed_at: String,
    events_url: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    output: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<&'a SessionError>,
    #[serde(skip_serializing_if = "Option::is_none")]
    metadata: Option<&'a Value>,
}

/// Everything a session's end writes: status, final event, and the
/// callback with its body fixed once.
pub fn finish(
    session: &Session,
    outcome: Outcome,
    events_url: String,
    callback_deadline: Duration,
) -> Finish {
    let completed_at = now_ms();
    let (status, output, error) = match &outcome {
        Outcome::Succeeded { output } => ("succeeded", Some(output.as_str()), None),
        Outcome::Failed(error) => ("failed", None, Some(error)),
        Outcome::Cancelled => ("cancelled", None, None),
    };
    let end_event = json!({ "status": status, "output": output, "error": error });

    let delivery = session.callback_url.as_ref().map(|url| {
        let id = new_id();
        let body = CallbackBody {
            callback_event_id: &id,
            session_id: &session.id,
            agent_id: &session.agent_id,
            status,
            completed_at: rfc3339(completed_at),
            events_url: &events_url,
            output,
            error,
            metadata: session.metadata.as_ref(),
        };
        NewDelivery {
            body: serde_json::to_vec(&body).expect("callback bodies serialise"),
            id,
            url: url.clone(),
            destination: destination(url),
            deadline_at: completed_at + callback_deadline.as_millis() as i64,
        }
    });
    Finish {
        session_id: session.id.clone(),
        outcome,
        completed_at,
        end_event,
        delivery,
    }
}
