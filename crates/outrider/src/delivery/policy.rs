//! When to try a callback again, and when to stop.

use rand::Rng;
use std::time::{Duration, SystemTime};

use crate::domain::Millis;
use crate::store::NextStep;

/// The default wait before each retry: about a day in all.
pub const DEFAULT_SCHEDULE: &str = "5s,30s,2m,10m,30m,1h,2h,4h,8h,8h";

/// Each wait is spread by up to this fraction either way.
const JITTER: f64 = 0.2;

/// What one attempt came to, as far as retrying is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// A 2xx: the receiver has it.
    Delivered,
    /// A network error, a timeout, a 5xx, a 408 or a 429; the receiver may
    /// have said how long to wait.
    Retry { after: Option<Duration> },
    /// Any other answer: retrying would not change it.
    GiveUp,
}

impl Verdict {
    /// What an HTTP status says, with the response's `Retry-After` value.
    pub fn from_status(status: u16, retry_after: Option<&str>) -> Self {
        match status {
            200..=299 => Self::Delivered,
            408 | 429 | 500..=599 => Self::Retry {
                after: retry_after.and_then(parse_retry_after),
            },
            _ => Self::GiveUp,
        }
    }
}

/// The retry schedule with its deadline.
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    schedule: Vec<Duration>,
}

impl RetryPolicy {
    pub fn new(schedule: Vec<Duration>) -> Self {
        assert!(
            !schedule.is_empty(),
            "a retry schedule needs at least one wait"
        );
        Self { schedule }
    }

    /// Where a delivery goes after its `attempts`-th attempt (1-based).
    pub fn next_step(
        &self,
        attempts: u32,
        verdict: Verdict,
        now: Millis,
        deadline: Millis,
    ) -> NextStep {
        let after = match verdict {
            Verdict::Delivered => return NextStep::Succeeded,
            Verdict::GiveUp => return NextStep::Failed,
            Verdict::Retry { after } => after,
        };
        let Some(wait) = self.schedule.get(attempts as usize - 1) else {
            return NextStep::Failed;
        };
        if now >= deadline {
            return NextStep::Failed;
        }
        // `Retry-After` can lengthen the wait, never shorten it: a receiver
        // answering `Retry-After: 0` must not spend the schedule in a second.
        let scheduled = jittered(*wait);
        let wait = after.map_or(scheduled, |after| after.max(scheduled));
        let wait_ms = Millis::try_from(wait.as_millis()).unwrap_or(Millis::MAX);
        let at = now.saturating_add(wait_ms);
        NextStep::RetryAt(at.min(deadline))
    }
}

fn jittered(wait: Duration) -> Duration {
    let factor = rand::rng().random_range(1.0 - JITTER..=1.0 + JITTER);
    wait.mul_f64(factor)
}

/// `Retry-After` as delay-seconds or an HTTP date; anything else is ignored.
pub fn parse_retry_after(value: &str) -> Option<Duration> {
    let value = value.trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(
        at.duration_since(SystemTime::now())
            .unwrap_or(Duration::ZERO),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> RetryPolicy {
        RetryPolicy::new(vec![Duration::from_secs(10), Duration::from_secs(100)])
    }

    const RETRY: Verdict = Verdict::Retry { after: None };

    #[test]
    fn statuses_map_to_verdicts() {
        assert_eq!(Verdict::from_status(204, None), Verdict::Delivered);
        assert_eq!(Verdict::from_status(503, None), RETRY);
        assert_eq!(Verdict::from_status(408, None), RETRY);
        assert_eq!(Verdict::from_status(302, None), Verdict::GiveUp);
        assert_eq!(Verdict::from_status(400, None), Verdict::GiveUp);
        assert_eq!(Verdict::from_status(410, None), Verdict::GiveUp);
        let after = Some(Duration::from_secs(7));
        assert_eq!(
            Verdict::from_status(429, Some("7")),
            Verdict::Retry { after }
        );
    }

    #[test]
    fn retries_follow_the_schedule_with_jitter() {
        for _ in 0..100 {
            let NextStep::RetryAt(at) = policy().next_step(1, RETRY, 0, 1_000_000) else {
                panic!("a first failure is retried");
            };
            assert!((8_000..=12_000).contains(&at), "{at}");
        }
    }

    #[test]
    fn the_schedule_running_out_fails_the_delivery() {
        assert_eq!(policy().next_step(3, RETRY, 0, 1_000_000), NextStep::Failed);
    }

    #[test]
    fn no_retry_is_scheduled_past_the_deadline() {
        assert_eq!(
            policy().next_step(2, RETRY, 0, 5_000),
            NextStep::RetryAt(5_000)
        );
        assert_eq!(policy().next_step(1, RETRY, 5_000, 5_000), NextStep::Failed);
    }

    #[test]
    fn retry_after_lengthens_the_scheduled_wait() {
        let verdict = Verdict::from_status(429, Some("42"));
        assert_eq!(
            policy().next_step(1, verdict, 0, 1_000_000),
            NextStep::RetryAt(42_000)
        );
    }

    #[test]
    fn retry_after_never_shortens_the_scheduled_wait() {
        for value in ["0", "1", "Thu, 01 Jan 1970 00:00:00 GMT"] {
            let verdict = Verdict::from_status(503, Some(value));
            let NextStep::RetryAt(at) = policy().next_step(1, verdict, 0, 1_000_000) else {
                panic!("retried");
            };
            assert!((8_000..=12_000).contains(&at), "{value}: {at}");
        }
    }

    #[test]
    fn a_huge_retry_after_waits_until_the_deadline() {
        let verdict = Verdict::from_status(429, Some("18446744073709551615"));
        assert_eq!(
            policy().next_step(1, verdict, 0, 1_000_000),
            NextStep::RetryAt(1_000_000)
        );
    }

    #[test]
    fn retry_after_reads_seconds_and_dates_and_ignores_garbage() {
        assert_eq!(parse_retry_after(" 120 "), Some(Duration::from_secs(120)));
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT"),
            Some(Duration::ZERO)
        );
        let later = httpdate::fmt_http_date(SystemTime::now() + Duration::from_secs(3600));
        let wait = parse_retry_after(&later).expect("a date parses");
        assert!(wait > Duration::from_secs(3500), "{wait:?}");
        assert_eq!(parse_retry_after("soon"), None);
        assert_eq!(parse_retry_after("-5"), None);
    }
}
