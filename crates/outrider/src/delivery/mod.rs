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
use crate::store::{AttemptRecord, Delivery, DeliveryClaim, DynStore, NextStep, Signing};
use breaker::{Admission, Breakers};
use client::{AttemptResult, CallbackClient};
use policy::{RetryPolicy, Verdict};

/// The longest the dispatcher sleeps without looking at the store.
const MAX_IDLE: Duration = Duration::from_secs(1);
/// How long the dispatcher waits, when everything due is busy, before
/// looking again if no attempt wakes it first.
const BUSY_POLL: Duration = Duration::from_millis(20);

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
    /// A claim outlives a wait for a turn and an attempt, by a margin.
    pub lease: Duration,
    pub ready: Arc<Notify>,
    pub held: Held,
    pub breakers: Breakers,
    pub secrets: SecretBox,
}

/// The deliveries this dispatcher holds, per destination: claimed and not
/// yet answered. At most `per_destination` of them are sent at once (their
/// turns), so a receiver that hangs holds only its own share of the
/// dispatcher's attempts; as many again may be claimed ahead and wait for a
/// turn, so the next one is ready the moment a turn frees instead of a
/// claim's commit later.
#[derive(Debug, Default, Clone)]
pub struct Held(Arc<Mutex<HashMap<String, Destination>>>);

#[derive(Debug)]
struct Destination {
    held: usize,
    turns: Arc<Semaphore>,
}

/// One held delivery's place at its destination, given back when dropped.
pub struct Hold {
    held: Held,
    destination: String,
    turns: Arc<Semaphore>,
}

impl Held {
    /// Holds one more delivery to `destination` if it holds fewer than
    /// twice `per_destination`.
    fn take(&self, destination: &str, per_destination: usize) -> Option<Hold> {
        let mut destinations = self.0.lock().expect("held deliveries");
        let entry = destinations
            .entry(destination.to_owned())
            .or_insert_with(|| Destination {
                held: 0,
                turns: Arc::new(Semaphore::new(per_destination)),
            });
        if entry.held >= 2 * per_destination {
            return None;
        }
        entry.held += 1;
        Some(Hold {
            held: self.clone(),
            destination: destination.to_owned(),
            turns: entry.turns.clone(),
        })
    }

    /// Every destination with deliveries held, and how many more a claim
    /// may take for it.
    fn room(&self, per_destination: usize) -> HashMap<String, u32> {
        let destinations = self.0.lock().expect("held deliveries");
        destinations
            .iter()
            .map(|(destination, entry)| {
                let room = (2 * per_destination).saturating_sub(entry.held) as u32;
                (destination.clone(), room)
            })
            .collect()
    }
}

impl Hold {
    /// Waits for a turn to send.
    async fn turn(&self) -> tokio::sync::SemaphorePermit<'_> {
        self.turns.acquire().await.expect("never closed")
    }
}

impl Drop for Hold {
    fn drop(&mut self) {
        let mut destinations = self.held.0.lock().expect("held deliveries");
        if let Some(entry) = destinations.get_mut(&self.destination) {
            entry.held -= 1;
            if entry.held == 0 {
                destinations.remove(&self.destination);
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

            // Deliveries handed back unattempted, by when they may be tried
            // again (`None`: at once).
            let mut held_back: HashMap<Option<Millis>, Vec<String>> = HashMap::new();
            let mut signings = HashMap::new();
            for delivery in claimed {
                // Read once per organisation and claim, not per attempt.
                if !signings.contains_key(&delivery.org_id) {
                    let signing = self.signing(&delivery.org_id).await;
                    signings.insert(delivery.org_id.clone(), signing);
                }
                let Some(signing) = signings[&delivery.org_id].clone() else {
                    // The lease lapses and the delivery is tried again later.
                    continue;
                };
                let admission = self.breakers.admit(&delivery.destination, now_ms());
                // A probe already out (busy) or a circuit open (wait).
                if let Some(not_before) = admission.held_back() {
                    held_back.entry(not_before).or_default().push(delivery.id);
                    continue;
                }
                let Some(hold) = self.held.take(&delivery.destination, self.per_destination) else {
                    // Past the destination's limit: handed back untouched. A
                    // probe that could not start frees its turn.
                    self.breakers.record(&delivery.destination, None, now_ms());
                    held_back.entry(None).or_default().push(delivery.id);
                    continue;
                };
                let permits = permits.clone();
                let dispatcher = self.clone();
                let span = tracing::info_span!(
                    "delivery",
                    delivery.id = %delivery.id,
                    session.id = %delivery.session_id,
                );
                tokio::spawn(
                    async move {
                        let destination = delivery.destination.clone();
                        let probe = admission == Admission::Probe;
                        let sent = dispatcher.attempt(delivery, &signing, probe, hold, &permits);
                        if let Some(until) = sent.await {
                            dispatcher.defer_destination(&destination, until).await;
                        }
                    }
                    .instrument(span),
                );
            }
            for (not_before, ids) in held_back {
                self.release(ids, not_before).await;
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

    /// The organisation's signing settings with its secrets opened, or
    /// `None` (logged) if they cannot be read.
    async fn signing(&self, org_id: &str) -> Option<Arc<Signing>> {
        let opened = async {
            let mut signing = self.store.signing(org_id).await?;
            for secret in &mut signing.secrets {
                *secret = self.secrets.open(org_id, secret)?;
            }
            anyhow::Ok(Arc::new(signing))
        };
        match opened.await {
            Ok(signing) => Some(signing),
            Err(error) => {
                let error = format!("{error:#}");
                tracing::error!(org.id = %org_id, error, "reading signing secrets failed");
                None
            }
        }
    }

    /// Defers a destination's pending deliveries to the end of the cool-down
    /// of its circuit, which has just opened.
    async fn defer_destination(&self, destination: &str, until: Millis) {
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
        let mut room = self.held.room(self.per_destination);
        // While a probe is out, nothing else goes to its destination.
        room.extend(self.breakers.probing().into_iter().map(|d| (d, 0)));
        let claim = DeliveryClaim {
            owner: self.owner.clone(),
            lease_ms: self.lease.as_millis() as i64,
            limit: free,
            per_destination: self.per_destination as u32,
            room: room.into_iter().collect(),
        };
        let claimed = self.store.claim_deliveries(claim).await;
        claimed.unwrap_or_else(|error| {
            tracing::error!(error = %error, "claiming deliveries failed");
            Vec::new()
        })
    }

    /// Sleeps until the next delivery falls due, a new one is ready, an
    /// attempt frees its destination's turn, or at most a second.
    async fn idle(&self, permits: &Semaphore, shutdown: &mut watch::Receiver<bool>) {
        let wait = if permits.available_permits() == 0 {
            BUSY_POLL
        } else {
            match self.store.next_delivery_due().await {
                Ok(Some(due)) => Duration::from_millis((due - now_ms()).clamp(0, 1000) as u64),
                _ => MAX_IDLE,
            }
        };
        // Due but not claimable: leased by a running attempt, or its
        // destination holds all it may. A finishing attempt wakes us.
        let wait = wait.max(BUSY_POLL);
        tokio::select! {
            _ = self.ready.notified() => {}
            _ = tokio::time::sleep(wait) => {}
            _ = shutdown.changed() => {}
        }
    }

    /// One attempt, recorded with the delivery's next step. Its outcome is
    /// fed to the destination's circuit before the next delivery there may
    /// start; returns the end of the cool-down if the circuit opened.
    ///
    /// The attempt waits for its destination's turn, then for one of the
    /// dispatcher's `permits` (a delivery waiting for its turn holds none,
    /// so a hanging receiver holds no more than its turns). Both are given
    /// back, and the dispatcher woken to claim more, as soon as the receiver
    /// has answered: they bound requests to receivers, not the commits that
    /// record them.
    ///
    /// The destination's circuit may have opened while this delivery waited
    /// for its turn; it is then handed back, deferred, without an attempt.
    async fn attempt(
        &self,
        delivery: Delivery,
        signing: &Signing,
        probe: bool,
        hold: Hold,
        permits: &Semaphore,
    ) -> Option<Millis> {
        let turn = hold.turn().await;
        if !probe {
            // (A `Probe` now means the cool-down ended while it waited.)
            let admission = self.breakers.admit(&delivery.destination, now_ms());
            if let Some(not_before) = admission.held_back() {
                drop(turn);
                drop(hold);
                self.release(vec![delivery.id], not_before).await;
                self.ready.notify_one();
                return None;
            }
        }
        let permit = permits.acquire().await.expect("never closed");
        let started_at = now_ms();
        let result = self
            .client
            .send(&delivery.url, &delivery.id, &delivery.body, signing)
            .await;
        let opened = self
            .breakers
            .record(&delivery.destination, health(&result), now_ms());
        drop((permit, turn));
        drop(hold);
        self.ready.notify_one();

        let attempts = delivery.attempts + 1;
        // A redelivery starts the schedule again.
        let in_round = attempts - delivery.round_start;
        let verdict = verdict(&result);
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
        opened
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
