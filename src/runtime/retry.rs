//! Backoff between attempts: from `RETRY_INITIAL_DELAY`, times `RETRY_BACKOFF_MULTIPLIER` per
//! attempt, capped at `RETRY_MAX_DELAY`, with jitter so that many clients do not retry in step.

use std::hash::{BuildHasher, Hasher};
use std::time::Duration;

use crate::config::RetrySettings;

/// An endless sequence of delays; use `.take(n)` to bound it.
#[derive(Debug, Clone)]
pub(crate) struct Backoff {
    next: Duration,
    max: Duration,
    multiplier: f64,
}

impl Backoff {
    pub(crate) fn new(settings: &RetrySettings) -> Self {
        Self {
            next: settings.initial_delay,
            max: settings.max_delay,
            multiplier: settings.multiplier,
        }
    }
}

impl Backoff {
    /// The nominal delay before attempt `n + 1` (no jitter): initial × multiplier^n, capped.
    pub(crate) fn nth(settings: &RetrySettings, n: u32) -> Duration {
        let seconds =
            settings.initial_delay.as_secs_f64() * settings.multiplier.powi(n.min(1000) as i32);
        Duration::from_secs_f64(seconds.min(settings.max_delay.as_secs_f64()))
    }
}

impl Iterator for Backoff {
    type Item = Duration;

    /// The nominal delay with "equal jitter": between half of it and all of it.
    fn next(&mut self) -> Option<Duration> {
        let nominal = self.next;
        self.next = self.next.mul_f64(self.multiplier).min(self.max);
        Some(nominal.mul_f64(0.5 + 0.5 * random_unit()))
    }
}

/// A number in [0, 1), random enough for jitter (std's per-instance randomised hasher keys).
fn random_unit() -> f64 {
    let bits = std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish();
    (bits >> 11) as f64 / (1u64 << 53) as f64
}

/// Runs `operation` until it succeeds, fails for good, or `MAX_RETRIES` retries of transient
/// failures (see [`crate::error::policy`]) are used up, with [`Backoff`] between attempts.
pub(crate) async fn transient<T, F, Fut>(
    settings: &RetrySettings,
    what: &str,
    operation: F,
) -> crate::error::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = crate::error::Result<T>>,
{
    let strategy = Backoff::new(settings).take(settings.max_retries as usize);
    tokio_retry::RetryIf::start(strategy, operation, |error: &crate::error::Error| {
        let transient = crate::error::policy::is_transient(error);
        if transient {
            tracing::warn!(action = what, error = %crate::error::chain(error), "transient failure; retrying");
        }
        transient
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_grow_by_the_multiplier_up_to_the_cap_with_jitter() {
        let settings = RetrySettings {
            max_retries: 3,
            initial_delay: Duration::from_millis(1000),
            max_delay: Duration::from_millis(5000),
            multiplier: 2.0,
        };
        let delays: Vec<Duration> = Backoff::new(&settings).take(6).collect();
        let nominal = [1000, 2000, 4000, 5000, 5000, 5000];
        for (delay, nominal) in delays.iter().zip(nominal) {
            let ms = delay.as_millis() as u64;
            assert!(
                ms >= nominal / 2 && ms <= nominal,
                "{ms} not within jitter of {nominal}"
            );
        }
    }

    #[test]
    fn nth_delay_is_deterministic_and_capped() {
        let settings = RetrySettings {
            max_retries: 3,
            initial_delay: Duration::from_millis(1000),
            max_delay: Duration::from_millis(30_000),
            multiplier: 2.0,
        };
        let delays: Vec<u64> = (0..7)
            .map(|n| Backoff::nth(&settings, n).as_millis() as u64)
            .collect();
        assert_eq!(delays, [1000, 2000, 4000, 8000, 16000, 30000, 30000]);
        assert_eq!(
            Backoff::nth(&settings, u32::MAX),
            Duration::from_millis(30_000)
        );
    }

    #[test]
    fn jitter_varies() {
        let settings = RetrySettings {
            max_retries: 3,
            initial_delay: Duration::from_secs(10),
            max_delay: Duration::from_secs(10),
            multiplier: 1.0,
        };
        let delays: std::collections::HashSet<Duration> =
            Backoff::new(&settings).take(20).collect();
        assert!(delays.len() > 1, "all delays identical: {delays:?}");
    }
}
