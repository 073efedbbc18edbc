//! Per-destination circuit breakers.
//!
//! After `threshold` attempts in a row to one `host:port` fail (no answer, a
//! timeout, `429` or `5xx`), its circuit opens: its pending deliveries are
//! deferred to the end of a cool-down without using an attempt. When the
//! cool-down ends one delivery goes first as a probe while the others wait;
//! a healthy answer closes the circuit and the rest follow, a failure opens
//! it again for twice as long (at most [`MAX_DOUBLINGS`] times doubled).
//! Deliveries are only ever deferred, never dropped.
//!
//! The state is per process; the deferral itself is written to the store, so
//! other processes see it in each delivery's `next_attempt_at`.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use crate::domain::Millis;

/// How many times a re-opened circuit's cool-down doubles.
const MAX_DOUBLINGS: u32 = 4;

/// Whether an attempt to a destination may start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// The circuit is closed.
    Go,
    /// The cool-down is over and this attempt is the probe.
    Probe,
    /// The circuit is open until then.
    Wait(Millis),
    /// A probe is in flight; wait for its outcome.
    Busy,
}

impl Admission {
    /// `None` if the attempt may start; otherwise when the delivery may be
    /// tried again (`Some(None)`: as soon as it is claimed again).
    pub fn held_back(self) -> Option<Option<Millis>> {
        match self {
            Admission::Go | Admission::Probe => None,
            Admission::Busy => Some(None),
            Admission::Wait(until) => Some(Some(until)),
        }
    }
}

#[derive(Debug, Default)]
struct Circuit {
    /// Failures in a row.
    failures: u32,
    /// Times opened since it was last closed; 0 while closed.
    trips: u32,
    open_until: Millis,
    probing: bool,
}

/// The circuits of every destination with recent failures.
#[derive(Debug)]
pub struct Breakers {
    circuits: Mutex<HashMap<String, Circuit>>,
    /// Failures in a row that open a circuit; 0 turns breakers off.
    threshold: u32,
    cooldown: Duration,
}

impl Breakers {
    pub fn new(threshold: u32, cooldown: Duration) -> Self {
        Self {
            circuits: Mutex::default(),
            threshold,
            cooldown,
        }
    }

    /// Whether an attempt to `destination` may start at `now`.
    pub fn admit(&self, destination: &str, now: Millis) -> Admission {
        let mut circuits = self.circuits.lock().expect("circuits");
        let Some(circuit) = circuits.get_mut(destination) else {
            return Admission::Go;
        };
        if circuit.trips == 0 {
            Admission::Go
        } else if now < circuit.open_until {
            Admission::Wait(circuit.open_until)
        } else if circuit.probing {
            Admission::Busy
        } else {
            circuit.probing = true;
            Admission::Probe
        }
    }

    /// Records how an attempt went: `Some(true)` for a receiver that
    /// answered, `Some(false)` for one that failed, `None` when the attempt
    /// said nothing about the receiver. Returns the end of the cool-down
    /// when this opens the circuit.
    pub fn record(&self, destination: &str, healthy: Option<bool>, now: Millis) -> Option<Millis> {
        if self.threshold == 0 {
            return None;
        }
        let mut circuits = self.circuits.lock().expect("circuits");
        match healthy {
            Some(true) => {
                circuits.remove(destination);
                None
            }
            None => {
                if let Some(circuit) = circuits.get_mut(destination) {
                    circuit.probing = false;
                }
                None
            }
            Some(false) => {
                let circuit = circuits.entry(destination.to_owned()).or_default();
                circuit.failures += 1;
                let probe_failed = std::mem::take(&mut circuit.probing);
                let trips = circuit.trips == 0 && circuit.failures >= self.threshold;
                if !(probe_failed || trips) {
                    return None;
                }
                let doublings = circuit.trips.min(MAX_DOUBLINGS);
                circuit.trips += 1;
                let cooldown = self.cooldown.as_millis() as Millis * (1 << doublings);
                circuit.open_until = now + cooldown;
                Some(circuit.open_until)
            }
        }
    }

    /// Destinations with a probe in flight, whose deliveries are not claimed
    /// until it ends. (Deliveries claimed while a circuit is open are handed
    /// back deferred to the end of its cool-down instead.)
    pub fn probing(&self) -> Vec<String> {
        let circuits = self.circuits.lock().expect("circuits");
        circuits
            .iter()
            .filter(|(_, circuit)| circuit.probing)
            .map(|(destination, _)| destination.clone())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOST: &str = "hooks.example:443";

    fn breakers() -> Breakers {
        Breakers::new(3, Duration::from_secs(10))
    }

    #[test]
    fn a_circuit_opens_after_the_threshold_of_failures_in_a_row() {
        let b = breakers();
        assert_eq!(b.record(HOST, Some(false), 0), None);
        assert_eq!(b.record(HOST, Some(false), 0), None);
        assert_eq!(b.admit(HOST, 0), Admission::Go);
        assert_eq!(b.record(HOST, Some(false), 1_000), Some(11_000));
        assert_eq!(b.admit(HOST, 5_000), Admission::Wait(11_000));
        assert!(b.probing().is_empty());
        assert_eq!(b.admit("other:443", 5_000), Admission::Go);
    }

    #[test]
    fn a_success_resets_the_count() {
        let b = breakers();
        b.record(HOST, Some(false), 0);
        b.record(HOST, Some(false), 0);
        b.record(HOST, Some(true), 0);
        assert_eq!(b.record(HOST, Some(false), 0), None);
        assert_eq!(b.admit(HOST, 0), Admission::Go);
    }

    #[test]
    fn after_the_cooldown_one_probe_goes_and_its_outcome_decides() {
        let b = breakers();
        for _ in 0..3 {
            b.record(HOST, Some(false), 0);
        }
        assert_eq!(b.admit(HOST, 10_000), Admission::Probe);
        assert_eq!(b.admit(HOST, 10_000), Admission::Busy);
        assert_eq!(b.probing(), vec![HOST.to_owned()]);
        // A failed probe opens it again for twice as long.
        assert_eq!(b.record(HOST, Some(false), 10_000), Some(30_000));
        assert_eq!(b.admit(HOST, 29_999), Admission::Wait(30_000));
        assert_eq!(b.admit(HOST, 30_000), Admission::Probe);
        b.record(HOST, Some(true), 30_000);
        assert_eq!(b.admit(HOST, 30_000), Admission::Go);
        assert!(b.probing().is_empty());
    }

    #[test]
    fn an_attempt_that_says_nothing_frees_the_probe() {
        let b = breakers();
        for _ in 0..3 {
            b.record(HOST, Some(false), 0);
        }
        assert_eq!(b.admit(HOST, 10_000), Admission::Probe);
        b.record(HOST, None, 10_000);
        assert_eq!(b.admit(HOST, 10_000), Admission::Probe);
    }

    #[test]
    fn the_cooldown_stops_doubling() {
        let b = breakers();
        let mut now = 0;
        for _ in 0..3 {
            b.record(HOST, Some(false), now);
        }
        for _ in 0..10 {
            now = match b.admit(HOST, now) {
                Admission::Wait(until) => until,
                Admission::Probe => b.record(HOST, Some(false), now).expect("reopens"),
                other => panic!("{other:?}"),
            };
        }
        let Admission::Probe = b.admit(HOST, now) else {
            panic!()
        };
        let until = b.record(HOST, Some(false), now).expect("reopens");
        assert_eq!(until - now, 160_000, "10 s doubled at most 4 times");
    }

    #[test]
    fn a_threshold_of_zero_turns_breakers_off() {
        let b = Breakers::new(0, Duration::from_secs(10));
        for _ in 0..100 {
            assert_eq!(b.record(HOST, Some(false), 0), None);
        }
        assert_eq!(b.admit(HOST, 0), Admission::Go);
    }
}
