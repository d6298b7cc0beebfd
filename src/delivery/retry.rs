//! Whether and when to try a failed delivery again — decided in one place, from the error's
//! kind and status, never from message text (hyper documents its messages as unspecified).
//!
//! A failed request (non-2xx, timeout, reset, TLS error) is retried until `max_attempts`
//! (default 3: the first try and two retries, as the HTTP API destination does), with full
//! jitter exponential backoff, honouring the receiver's `Retry-After`. Kinds that no retry can
//! fix (mTLS not requested, invalid request) and, when configured, 4xx answers other than
//! 408/429 are final at once.

use std::time::{Duration, SystemTime};

use super::error::{DeliveryError, ErrorKind};

/// The longest `Retry-After` honoured; a receiver cannot park a delivery for days.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(600);

/// Retry settings of one dataflow.
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    pub max_attempts: u32,
    pub no_retry_on_4xx: bool,
    pub base: Duration,
    pub cap: Duration,
    /// A fixed wait before each retry (`retry_schedule`), instead of the jittered backoff;
    /// then `max_attempts` is its length plus one.
    pub schedule: Option<std::sync::Arc<[Duration]>>,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 3,
            no_retry_on_4xx: false,
            base: Duration::from_millis(500),
            cap: Duration::from_secs(60),
            schedule: None,
        }
    }
}

/// What to do after a failed attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    RetryAfter(Duration),
    GiveUp,
}

impl RetryPolicy {
    /// `attempt` is the 1-based number of the attempt that just failed; `jitter` in [0, 1).
    pub fn decide(&self, attempt: u32, err: &DeliveryError, jitter: f64) -> Verdict {
        if attempt >= self.max_attempts || !self.is_retriable(err) {
            return Verdict::GiveUp;
        }
        let asked = err.retry_after().map(|a| a.min(MAX_RETRY_AFTER));
        if let Some(step) = self.schedule.as_ref().and_then(|s| s.get(attempt as usize - 1)) {
            // Within ±10 % of the step, so a receiver's backlog is not all retried at once;
            // never sooner than the receiver asked.
            let wait = step.mul_f64(0.9 + 0.2 * jitter.clamp(0.0, 1.0));
            return Verdict::RetryAfter(asked.map_or(wait, |a| a.max(wait)));
        }
        if let Some(after) = asked {
            return Verdict::RetryAfter(after);
        }
        let exp = self
            .base
            .saturating_mul(1u32 << (attempt - 1).min(16))
            .min(self.cap);
        // Full jitter, with a floor so two retries never fire back to back.
        let floor = exp / 4;
        Verdict::RetryAfter(floor + (exp - floor).mul_f64(jitter.clamp(0.0, 1.0)))
    }

    fn is_retriable(&self, err: &DeliveryError) -> bool {
        if !err.retryable() {
            return false;
        }
        match (err.kind(), err.status()) {
            (ErrorKind::HttpStatus, Some(s)) if (400..500).contains(&s) && s != 408 && s != 429 => {
                !self.no_retry_on_4xx
            }
            _ => true,
        }
    }
}

/// A uniform value in [0, 1) for backoff jitter (no need for a cryptographic source).
pub fn jitter() -> f64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_i64(crate::store::now_ms());
    (h.finish() >> 11) as f64 / (1u64 << 53) as f64
}

/// Parse a `Retry-After` value: delay-seconds (digits only) or an HTTP date (RFC 9110
/// §10.2.3). At most [`MAX_RETRY_AFTER`]: a longer wait, or a number of seconds too large to
/// hold, is cut to it, as the retry policy would.
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let v = value.trim();
    if !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()) {
        let secs = v.parse::<u64>().unwrap_or(u64::MAX);
        return Some(Duration::from_secs(secs).min(MAX_RETRY_AFTER));
    }
    let fmt = time::macros::format_description!(
        "[weekday repr:short], [day] [month repr:short] [year] [hour]:[minute]:[second] GMT"
    );
    let at = time::PrimitiveDateTime::parse(v, &fmt).ok()?.assume_utc();
    let at =
        SystemTime::UNIX_EPOCH.checked_add(Duration::from_secs(u64::try_from(at.unix_timestamp()).ok()?))?;
    Some(
        at.duration_since(now)
            .unwrap_or(Duration::ZERO)
            .min(MAX_RETRY_AFTER),
    )
}

/// Entry point for the `Retry-After` fuzz target: any header value gives `None` or a wait of
/// at most [`MAX_RETRY_AFTER`], whatever the clock says, and the retry policy given it waits
/// no longer either. Panics on a broken invariant.
pub fn fuzz_entry(data: &[u8]) {
    let Ok(s) = std::str::from_utf8(data) else { return };
    let epoch = SystemTime::UNIX_EPOCH;
    let policy = RetryPolicy::default();
    for now in [
        epoch,
        epoch + Duration::from_secs(1_445_412_480),
        epoch + Duration::from_secs(253_402_300_799), // 9999-12-31T23:59:59Z
    ] {
        let got = parse_retry_after(s, now);
        if let Some(d) = got {
            assert!(d <= MAX_RETRY_AFTER, "{s:?} at {now:?}: {d:?}");
        }
        let t = s.trim();
        if !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit()) {
            assert!(got.is_some(), "delay-seconds {s:?} not read");
        }
        let e = DeliveryError::new(ErrorKind::HttpStatus, "x")
            .with_status(503)
            .with_retry_after(got);
        for attempt in 1..=policy.max_attempts {
            match policy.decide(attempt, &e, 0.5) {
                Verdict::RetryAfter(d) => assert!(d <= MAX_RETRY_AFTER.max(policy.cap)),
                Verdict::GiveUp => assert_eq!(attempt, policy.max_attempts),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(s: u16) -> DeliveryError {
        DeliveryError::new(ErrorKind::HttpStatus, "x").with_status(s)
    }

    #[test]
    fn three_attempts_then_give_up() {
        let p = RetryPolicy::default();
        let e = status(500);
        assert!(matches!(p.decide(1, &e, 0.5), Verdict::RetryAfter(_)));
        assert!(matches!(p.decide(2, &e, 0.5), Verdict::RetryAfter(_)));
        assert_eq!(p.decide(3, &e, 0.5), Verdict::GiveUp);
    }

    #[test]
    fn backoff_grows_with_jitter_inside_bounds() {
        let p = RetryPolicy::default();
        let e = DeliveryError::new(ErrorKind::Timeout, "slow");
        let Verdict::RetryAfter(lo) = p.decide(1, &e, 0.0) else {
            panic!()
        };
        let Verdict::RetryAfter(hi) = p.decide(1, &e, 0.999) else {
            panic!()
        };
        let Verdict::RetryAfter(second) = p.decide(2, &e, 0.999) else {
            panic!()
        };
        assert_eq!(lo, Duration::from_millis(125));
        assert!(hi < Duration::from_millis(500) && hi > lo);
        assert!(second > hi);
    }

    #[test]
    fn final_kinds_and_optional_4xx() {
        let p = RetryPolicy::default();
        assert_eq!(
            p.decide(1, &DeliveryError::new(ErrorKind::MtlsNotRequested, "x"), 0.5),
            Verdict::GiveUp
        );
        assert!(matches!(p.decide(1, &status(404), 0.5), Verdict::RetryAfter(_)));
        let strict = RetryPolicy {
            no_retry_on_4xx: true,
            ..p.clone()
        };
        assert_eq!(strict.decide(1, &status(404), 0.5), Verdict::GiveUp);
        assert!(matches!(
            strict.decide(1, &status(429), 0.5),
            Verdict::RetryAfter(_)
        ));
        assert!(matches!(
            strict.decide(1, &status(408), 0.5),
            Verdict::RetryAfter(_)
        ));
    }

    #[test]
    fn a_schedule_sets_each_wait_and_the_number_of_attempts() {
        let steps = [
            Duration::from_secs(1),
            Duration::from_secs(10),
            Duration::from_secs(60),
        ];
        let p = RetryPolicy {
            max_attempts: 4,
            schedule: Some(steps.to_vec().into()),
            ..RetryPolicy::default()
        };
        let e = status(503);
        for (i, step) in steps.iter().enumerate() {
            let Verdict::RetryAfter(lo) = p.decide(i as u32 + 1, &e, 0.0) else {
                panic!("attempt {} retried", i + 1)
            };
            let Verdict::RetryAfter(hi) = p.decide(i as u32 + 1, &e, 0.999) else {
                panic!()
            };
            assert_eq!(lo, step.mul_f64(0.9));
            assert!(hi <= step.mul_f64(1.1) && hi > *step);
        }
        assert_eq!(p.decide(4, &e, 0.5), Verdict::GiveUp);
        // The receiver's Retry-After wins when it asks for longer.
        let asked = status(503).with_retry_after(Some(Duration::from_secs(30)));
        assert_eq!(
            p.decide(1, &asked, 0.5),
            Verdict::RetryAfter(Duration::from_secs(30))
        );
    }

    #[test]
    fn retry_after_seconds_and_http_date() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_445_412_480); // Wed, 21 Oct 2015 07:28:00 GMT
        assert_eq!(parse_retry_after("120", now), Some(Duration::from_secs(120)));
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:28:30 GMT", now),
            Some(Duration::from_secs(30))
        );
        assert_eq!(parse_retry_after("soon", now), None);
        assert_eq!(
            parse_retry_after("+120", now),
            None,
            "delay-seconds are digits only"
        );
        assert_eq!(parse_retry_after(" 86400 ", now), Some(MAX_RETRY_AFTER));
        assert_eq!(
            parse_retry_after("99999999999999999999999", now),
            Some(MAX_RETRY_AFTER)
        );
        assert_eq!(
            parse_retry_after("Fri, 31 Dec 9999 23:59:59 GMT", now),
            Some(MAX_RETRY_AFTER)
        );
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:27:00 GMT", now),
            Some(Duration::ZERO)
        );
        let e = status(503).with_retry_after(Some(Duration::from_secs(7200)));
        assert_eq!(
            RetryPolicy::default().decide(1, &e, 0.5),
            Verdict::RetryAfter(MAX_RETRY_AFTER)
        );
    }
}
