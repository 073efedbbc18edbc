//! Callback delivery: the outbox dispatcher, retry policy, URL guard and
//! signed attempts.
//!
//! A finished session leaves a delivery row (the outbox). The dispatcher
//! claims due rows with a lease, makes one attempt each, and records the
//! attempt together with the delivery's next step in one transaction. A
//! dispatcher killed mid-attempt leaves its lease to lapse; the delivery is
//! then attempted again, so receivers see each callback at least once and
//! deduplicate on `callback_event_id`.

pub mod breaker;
pub mod client;
pub mod guard;
pub mod policy;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{watch, Notify, Semaphore};
use tracing::Instrument;

use crate::domain::{now_ms, Millis};
use crate::secrets::SecretBox;
use crate::store::{AttemptRecord, Delivery, DynStore, NextStep, Signing};
use breaker::{Admission, Breakers};
use client::{AttemptResult, CallbackClient};
use policy::{RetryPolicy, Verdict};

/// The longest the dispatcher sleeps without looking at the store.
const MAX_IDLE: Duration = Duration::from_secs(1);

/// Claims due deliveries and attempts them.
pub struct Dispatcher {
    pub store: DynStore,
    pub client: CallbackClient,
    pub policy: RetryPolicy,
    pub owner: String,
    /// How many attempts run at once in this process.
    pub concurrency: usize,
    /// Attempts in flight at once to one `host:port`.
    pub per_destination: usize,
    /// A claim outlives the attempt budget by a margin.
    pub lease: Duration,
    pub ready: Arc<Notify>,
    pub in_flight: InFlight,
    pub breakers: Breakers,
    pub secrets: SecretBox,
}

/// Attempts in flight per destination, so that a receiver that hangs holds
/// at most its own share of the dispatcher's slots.
#[derive(Debug, Default, Clone)]
pub struct InFlight(Arc<Mutex<HashMap<String, usize>>>);

/// One attempt's place in its destination's count, given back when dropped.
pub struct Slot {
    in_flight: InFlight,
    destination: String,
}

impl InFlight {
    /// Takes a slot for `destination` if fewer than `limit` are in flight.
    fn take(&self, destination: &str, limit: usize) -> Option<Slot> {
        let mut counts = self.0.lock().expect("in-flight counts");
        let count = counts.entry(destination.to_owned()).or_default();
        if *count >= limit {
            return None;
        }
        *count += 1;
        Some(Slot {
            in_flight: self.clone(),
            destination: destination.to_owned(),
        })
    }

    /// The destinations with no slot free.
    fn saturated(&self, limit: usize) -> Vec<String> {
        let counts = self.0.lock().expect("in-flight counts");
        counts
            .iter()
            .filter(|(_, count)| **count >= limit)
            .map(|(destination, _)| destination.clone())
            .collect()
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut counts = self.in_flight.0.lock().expect("in-flight counts");
        if let Some(count) = counts.get_mut(&self.destination) {
            *count -= 1;
            if *count == 0 {
                counts.remove(&self.destination);
            }
        }
    }
}

impl Dispatcher {
    pub async fn run(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        let permits = Arc::new(Semaphore::new(self.concurrency));
        while !*shutdown.borrow() {
            let free = permits.available_permits().min(256) as u32;
            let claimed = self.claim(free).await;
            let full = claimed.len() as u32 == free && free > 0;

            let mut over_limit = Vec::new();
            let mut deferred: HashMap<Millis, Vec<String>> = HashMap::new();
            for delivery in claimed {
                match self.breakers.admit(&delivery.destination, now_ms()) {
                    Admission::Go | Admission::Probe => {}
                    Admission::Busy => {
                        over_limit.push(delivery.id);
                        continue;
                    }
                    Admission::Wait(until) => {
                        deferred.entry(until).or_default().push(delivery.id);
                        continue;
                    }
                }
                let Some(slot) = self
                    .in_flight
                    .take(&delivery.destination, self.per_destination)
                else {
                    // A probe that could not start frees its turn.
                    self.breakers.record(&delivery.destination, None, now_ms());
                    over_limit.push(delivery.id);
                    continue;
                };
                let permit = permits.clone().acquire_owned().await.expect("never closed");
                let dispatcher = self.clone();
                let span = tracing::info_span!(
                    "delivery",
                    delivery.id = %delivery.id,
                    session.id = %delivery.session_id,
                );
                tokio::spawn(
                    async move {
                        let destination = delivery.destination.clone();
                        let healthy = dispatcher.attempt(delivery).await;
                        drop((slot, permit));
                        dispatcher.after_attempt(&destination, healthy).await;
                    }
                    .instrument(span),
                );
            }
            // Claimed past a destination's limit in the same batch: handed
            // back untouched, and skipped by the next claims until a slot frees.
            self.release(over_limit, None).await;
            // Claimed while their destination's circuit is open: deferred.
            for (until, ids) in deferred {
                self.release(ids, Some(until)).await;
            }
            if !full {
                self.idle(&permits, &mut shutdown).await;
            }
        }
    }

    async fn release(&self, ids: Vec<String>, not_before: Option<Millis>) {
        if ids.is_empty() {
            return;
        }
        let released = self
            .store
            .release_deliveries(&self.owner, ids, not_before)
            .await;
        if let Err(error) = released {
            tracing::error!(error = %error, "releasing deliveries failed");
        }
    }

    /// The organisation's signing settings with its secrets opened.
    async fn signing(&self, org_id: &str) -> anyhow::Result<Signing> {
        let mut signing = self.store.signing(org_id).await?;
        for secret in &mut signing.secrets {
            *secret = self.secrets.open(org_id, secret)?;
        }
        Ok(signing)
    }

    /// Feeds an attempt's outcome to its destination's circuit, deferring
    /// the destination's pending deliveries when the circuit opens.
    async fn after_attempt(&self, destination: &str, healthy: Option<bool>) {
        let Some(until) = self.breakers.record(destination, healthy, now_ms()) else {
            return;
        };
        match self.store.defer_destination(destination, until).await {
            Ok(deferred) => tracing::warn!(
                destination,
                deferred,
                open_for_ms = until - now_ms(),
                "circuit opened: deliveries to this destination wait for a probe"
            ),
            Err(error) => tracing::error!(error = %error, "deferring deliveries failed"),
        }
    }

    /// Claims up to `free` due deliveries whose destinations have room.
    async fn claim(&self, free: u32) -> Vec<Delivery> {
        if free == 0 {
            return Vec::new();
        }
        let lease_ms = self.lease.as_millis() as i64;
        let mut skip = self.in_flight.saturated(self.per_destination);
        skip.extend(self.breakers.probing());
        let claimed = self
            .store
            .claim_deliveries(&self.owner, lease_ms, free, &skip)
            .await;
        claimed.unwrap_or_else(|error| {
            tracing::error!(error = %error, "claiming deliveries failed");
            Vec::new()
        })
    }

    /// Sleeps until the next delivery falls due, a new one is ready, or at
    /// most a second.
    async fn idle(&self, permits: &Semaphore, shutdown: &mut watch::Receiver<bool>) {
        let wait = if permits.available_permits() == 0 {
            Duration::from_millis(20)
        } else {
            match self.store.next_delivery_due().await {
                Ok(Some(due)) => Duration::from_millis((due - now_ms()).clamp(0, 1000) as u64),
                _ => MAX_IDLE,
            }
        };
        if wait.is_zero() {
            // Due but not claimable: leased by an attempt still running.
            tokio::time::sleep(Duration::from_millis(20)).await;
            return;
        }
        tokio::select! {
            _ = self.ready.notified() => {}
            _ = tokio::time::sleep(wait) => {}
            _ = shutdown.changed() => {}
        }
    }

    /// One attempt, recorded with the delivery's next step. Returns whether
    /// the receiver proved healthy (`None`: the attempt says nothing of it).
    async fn attempt(&self, delivery: Delivery) -> Option<bool> {
        let started_at = now_ms();
        let signing = match self.signing(&delivery.org_id).await {
            Ok(signing) => signing,
            Err(error) => {
                // The lease lapses and the delivery is tried again later.
                tracing::error!(
                    error = format!("{error:#}"),
                    "reading signing secrets failed"
                );
                return None;
            }
        };
        let result = self
            .client
            .send(&delivery.url, &delivery.id, &delivery.body, &signing)
            .await;

        let attempts = delivery.attempts + 1;
        // A redelivery starts the schedule again.
        let in_round = attempts - delivery.round_start;
        let verdict = verdict(&result);
        let healthy = health(&result);
        let next = self
            .policy
            .next_step(in_round, verdict, now_ms(), delivery.deadline_at);
        log_attempt(&result, attempts, next);

        let record = AttemptRecord {
            started_at,
            duration_ms: result.duration.as_millis() as i64,
            status_code: result.status,
            error_kind: result.error_kind.map(str::to_owned),
            error_message: result.error_message,
        };
        if let Err(error) = self
            .store
            .record_attempt(&delivery.id, &self.owner, record, next)
            .await
        {
            tracing::error!(error = %error, "recording the attempt failed");
        }
        healthy
    }
}

/// What an attempt says about its receiver: an answer other than `429` or
/// `5xx` is healthy; no answer, `429` and `5xx` are not; a destination the
/// guard refused says nothing.
fn health(result: &AttemptResult) -> Option<bool> {
    match result.status {
        Some(status) => Some(status != 429 && status < 500),
        None if result.refused() => None,
        None => Some(false),
    }
}

fn verdict(result: &AttemptResult) -> Verdict {
    match result.status {
        Some(status) => Verdict::from_status(status, result.retry_after.as_deref()),
        None if result.refused() => Verdict::GiveUp,
        None => Verdict::Retry { after: None },
    }
}

fn log_attempt(result: &AttemptResult, attempt: u32, next: NextStep) {
    let status = result.status;
    let error = result.error_message.as_deref();
    match next {
        NextStep::Succeeded => tracing::info!(attempt, ?status, "callback delivered"),
        NextStep::RetryAt(at) => {
            let in_ms = at - now_ms();
            tracing::warn!(
                attempt,
                ?status,
                ?error,
                retry_in_ms = in_ms,
                "callback attempt failed"
            )
        }
        NextStep::Failed => tracing::error!(attempt, ?status, ?error, "callback delivery failed"),
    }
}
