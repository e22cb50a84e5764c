//! Trying again: the backoff between attempts, and the one loop that every retrying or
//! reconnecting part of rowsync runs (setup's steps, the daemon's start, the leader lock, the
//! listener, the sync loop's failed passes).
//!
//! Delays start at `RETRY_INITIAL_DELAY`, grow by `RETRY_BACKOFF_MULTIPLIER` per attempt up to
//! `RETRY_MAX_DELAY`, and are jittered ("equal jitter": between half of the delay and all of it)
//! so that many clients do not retry in step. Whether an error is worth another attempt is the
//! error policy's call ([`policy::decide`]), never the loop's.

use std::future::Future;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::config::RetrySettings;
use crate::error::{Error, Result, policy};

/// An endless sequence of jittered delays.
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
        Some(nominal.mul_f64(0.5 + 0.5 * rand::random::<f64>()))
    }
}

/// The failures in a row of one retrying loop, and the delay before its next attempt.
#[derive(Debug)]
pub(crate) struct Retrying {
    settings: RetrySettings,
    backoff: Backoff,
    failures: u32,
}

impl Retrying {
    pub(crate) fn new(settings: &RetrySettings) -> Self {
        Self {
            settings: *settings,
            backoff: Backoff::new(settings),
            failures: 0,
        }
    }

    /// One more failure: how many in a row now, and how long to wait before the next attempt.
    pub(crate) fn failed(&mut self) -> (u32, Duration) {
        self.failures = self.failures.saturating_add(1);
        let delay = self.backoff.next().unwrap_or(self.settings.max_delay);
        (self.failures, delay)
    }

    /// An attempt succeeded: the next failure starts from the first delay again.
    pub(crate) fn succeeded(&mut self) {
        self.failures = 0;
        self.backoff = Backoff::new(&self.settings);
    }

    pub(crate) fn failures(&self) -> u32 {
        self.failures
    }
}

/// Sleeps for `delay` unless `stop` comes first. Returns false when stopped.
pub(crate) async fn pause(delay: Duration, stop: &CancellationToken) -> bool {
    tokio::select! {
        biased;
        // Cancel-safe: both arms only wait.
        _ = stop.cancelled() => false,
        _ = tokio::time::sleep(delay) => true,
    }
}

/// How many attempts [`until_ok`] makes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Attempts {
    /// Until an attempt succeeds or fails for good (a daemon waits out any outage).
    Unlimited,
    /// At most this many retries after the first attempt (`MAX_RETRIES`, for one-shot commands).
    Retries(u32),
}

/// Runs `attempt` until it succeeds, fails with an error the policy does not retry, the attempts
/// are used up, or `stop` is cancelled (then `Ok(None)`). Between attempts it waits with backoff,
/// after telling `on_retry` what failed, how many times in a row, and how long it waits.
pub(crate) async fn until_ok<T, F, Fut>(
    settings: &RetrySettings,
    attempts: Attempts,
    stop: &CancellationToken,
    mut attempt: F,
    mut on_retry: impl FnMut(&Error, u32, Duration),
) -> Result<Option<T>>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T>>,
{
    let mut retrying = Retrying::new(settings);
    loop {
        let error = match attempt().await {
            Ok(value) => return Ok(Some(value)),
            Err(error) => error,
        };
        let exhausted = match attempts {
            Attempts::Unlimited => false,
            Attempts::Retries(retries) => retrying.failures() >= retries,
        };
        if exhausted || !policy::decide(&error).retry() {
            return Err(error);
        }
        let (failures, delay) = retrying.failed();
        on_retry(&error, failures, delay);
        if !pause(delay, stop).await {
            return Ok(None);
        }
    }
}

/// [`until_ok`] for a one-shot step of a command: at most `MAX_RETRIES` retries, each logged.
pub(crate) async fn transient<T, F, Fut>(
    settings: &RetrySettings,
    what: &str,
    attempt: F,
) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T>>,
{
    let never = CancellationToken::new();
    let outcome = until_ok(
        settings,
        Attempts::Retries(settings.max_retries),
        &never,
        attempt,
        |error, attempt, delay| {
            tracing::warn!(
                action = what,
                attempt,
                retry_in_ms = delay.as_millis() as u64,
                error = %crate::error::chain(error),
                "transient failure; retrying"
            );
        },
    )
    .await?;
    match outcome {
        Some(value) => Ok(value),
        None => unreachable!("until_ok stops early only when its token is cancelled"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(initial_ms: u64, max_ms: u64, multiplier: f64) -> RetrySettings {
        RetrySettings {
            max_retries: 3,
            initial_delay: Duration::from_millis(initial_ms),
            max_delay: Duration::from_millis(max_ms),
            multiplier,
        }
    }

    #[test]
    fn delays_grow_by_the_multiplier_up_to_the_cap_with_jitter() {
        let delays: Vec<Duration> = Backoff::new(&settings(1000, 5000, 2.0)).take(6).collect();
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
        let settings = settings(1000, 30_000, 2.0);
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
        let delays: std::collections::HashSet<Duration> =
            Backoff::new(&settings(10_000, 10_000, 1.0))
                .take(20)
                .collect();
        assert!(delays.len() > 1, "all delays identical: {delays:?}");
    }

    #[test]
    fn a_success_starts_the_delays_afresh() {
        let mut retrying = Retrying::new(&settings(1000, 60_000, 10.0));
        retrying.failed();
        retrying.failed();
        let (failures, delay) = retrying.failed();
        assert_eq!(failures, 3);
        assert!(delay >= Duration::from_millis(30_000), "{delay:?}");
        retrying.succeeded();
        let (failures, delay) = retrying.failed();
        assert_eq!(failures, 1);
        assert!(delay <= Duration::from_millis(1000), "{delay:?}");
    }

    #[tokio::test]
    async fn until_ok_retries_transient_failures_only_and_stops_after_the_retries() {
        let settings = settings(1, 2, 1.0);
        let never = CancellationToken::new();
        let transient = || Error::Timeout {
            role: crate::config::DatabaseRole::Source,
            action: "a call".into(),
        };
        let mut calls = 0;
        let outcome = until_ok(
            &settings,
            Attempts::Retries(2),
            &never,
            || {
                calls += 1;
                let result = if calls < 3 {
                    Err(transient())
                } else {
                    Ok(calls)
                };
                async move { result }
            },
            |_, _, _| {},
        )
        .await;
        assert_eq!(outcome.unwrap(), Some(3));

        let mut calls = 0;
        let outcome: Result<Option<()>> = until_ok(
            &settings,
            Attempts::Retries(2),
            &never,
            || {
                calls += 1;
                async { Err(transient()) }
            },
            |_, _, _| {},
        )
        .await;
        assert!(outcome.is_err());
        assert_eq!(calls, 3, "the first attempt and two retries");

        let mut calls = 0;
        let outcome: Result<Option<()>> = until_ok(
            &settings,
            Attempts::Unlimited,
            &never,
            || {
                calls += 1;
                async { Err(Error::NotSetUp { table: "t".into() }) }
            },
            |_, _, _| {},
        )
        .await;
        assert!(outcome.is_err());
        assert_eq!(calls, 1, "a permanent failure is not retried");
    }
}
