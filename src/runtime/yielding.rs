//! Yielding to a busy source: while the source is saturated, rowsync defers its work and applies
//! the burst once it is over.
//!
//! Every change rowsync applies costs the source a key lookup and a share of a journal read and
//! delete, and where the target shares the host, the target's write too. On a saturated source that
//! CPU comes out of the application's writes. Like autovacuum's cost delay, or gh-ost and
//! pt-online-schema-change throttling on `Threads_running`, rowsync lets its lag grow instead,
//! for at most `YIELD_MAX_SECONDS` in one go. Nothing is lost: the capture triggers keep
//! journaling, and the first batch after the yield takes everything journaled meanwhile.
//!
//! The signal is the number of active sessions on the source other than rowsync's own
//! (`pg_stat_activity`, PostgreSQL's counterpart of `Threads_running`). rowsync looks only while it
//! has work (after a batch that applied rows), at most every [`LOOK_EVERY`]. The source is busy when
//! the mean of the last [`WINDOW`] looks reaches `YIELD_ACTIVE_SESSIONS`, and quiet again when it
//! falls below half of that: one idle moment in a burst does not end the yield. A yield that ran its
//! full length is followed by a catch-up: no new yield until a batch finds nothing left to apply.
//!
//! Seeing the state of other roles' sessions takes `pg_read_all_stats`; without it only the sessions
//! of rowsync's own role are counted, and rowsync yields only to those.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use tokio_postgres::GenericClient;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

use crate::config::{DatabaseRole, Settings, YieldSettings};
use crate::connection::{APP_POOL, SessionLimits, Within};
use crate::error::{Result, SqlContext};
use crate::runtime::daemon::Context;

/// Least time between two looks at the source's sessions.
pub(crate) const LOOK_EVERY: Duration = Duration::from_millis(200);
/// Looks averaged into the signal.
pub(crate) const WINDOW: usize = 3;
/// A look older than this says nothing about now.
const STALE: Duration = Duration::from_secs(1);

/// What rowsync has seen of the source's load, and whether it may yield to it.
#[derive(Debug)]
struct SourceLoad {
    settings: YieldSettings,
    looks: VecDeque<(Instant, u32)>,
    /// A yield ran its full length: none again until rowsync has caught up.
    must_catch_up: bool,
}

impl SourceLoad {
    pub(crate) fn new(settings: YieldSettings) -> Self {
        Self {
            settings,
            looks: VecDeque::with_capacity(WINDOW),
            must_catch_up: false,
        }
    }

    pub(crate) fn max(&self) -> Duration {
        self.settings.max
    }

    pub(crate) fn threshold(&self) -> u32 {
        self.settings.active_sessions
    }

    /// Whether to look at the source now, at `now`, with a view to yielding.
    pub(crate) fn due(&self, now: Instant) -> bool {
        self.settings.active_sessions > 0
            && !self.must_catch_up
            && self
                .looks
                .back()
                .is_none_or(|(at, _)| now.duration_since(*at) >= LOOK_EVERY)
    }

    pub(crate) fn record(&mut self, now: Instant, active_sessions: u32) {
        self.looks.retain(|(at, _)| now.duration_since(*at) < STALE);
        if self.looks.len() == WINDOW {
            self.looks.pop_front();
        }
        self.looks.push_back((now, active_sessions));
    }

    /// Mean active sessions over the recent looks (None without any).
    pub(crate) fn mean(&self) -> Option<f64> {
        (!self.looks.is_empty()).then(|| {
            self.looks.iter().map(|(_, n)| f64::from(*n)).sum::<f64>() / self.looks.len() as f64
        })
    }

    pub(crate) fn busy(&self) -> bool {
        self.settings.active_sessions > 0
            && self
                .mean()
                .is_some_and(|mean| mean >= f64::from(self.settings.active_sessions))
    }

    pub(crate) fn quiet(&self) -> bool {
        self.mean()
            .is_none_or(|mean| mean < f64::from(self.settings.active_sessions) / 2.0)
    }

    /// A yield lasted `YIELD_MAX_SECONDS`: the backlog is applied before the next one.
    pub(crate) fn ran_full_length(&mut self) {
        self.must_catch_up = true;
    }

    /// A batch found nothing to apply.
    pub(crate) fn caught_up(&mut self) {
        self.must_catch_up = false;
    }
}

/// How a yield to a busy source ended.
pub(crate) enum Yield {
    /// Go on applying.
    Go,
    /// `POST /sync` asked for a sweep.
    SweepRequested,
    Shutdown,
}

/// The sync loop's side of yielding: looks at the source, and waits while it is busy.
pub(crate) struct Yielder {
    load: SourceLoad,
    /// Client-side bound of each look.
    limit: Duration,
}

impl Yielder {
    pub(crate) fn new(settings: &Settings) -> Self {
        Self {
            load: SourceLoad::new(settings.yielding),
            limit: SessionLimits::from_settings(settings).client_timeout(),
        }
    }

    /// A batch found nothing to apply.
    pub(crate) fn caught_up(&mut self) {
        self.load.caught_up();
    }

    /// While the source is busy, defers the next batches, for at most `YIELD_MAX_SECONDS`.
    pub(crate) async fn yield_if_busy(
        &mut self,
        context: &Context,
        shutdown: &CancellationToken,
    ) -> Yield {
        if !self.load.due(Instant::now()) || !self.look(context).await || !self.load.busy() {
            return Yield::Go;
        }
        let started = Instant::now();
        let mean = self.load.mean().unwrap_or_default();
        info!(
            active_sessions = format!("{mean:.1}"),
            threshold = self.load.threshold(),
            max_ms = self.load.max().as_millis() as u64,
            "the source is busy: deferring sync until it is not (changes wait in the journal)"
        );
        context.telemetry.yield_started(mean);
        let outcome = self.wait_until_quiet(context, shutdown, started).await;
        context.telemetry.yield_ended();
        info!(
            yielded_ms = started.elapsed().as_millis() as u64,
            "resuming sync after yielding to the source"
        );
        outcome
    }

    async fn wait_until_quiet(
        &mut self,
        context: &Context,
        shutdown: &CancellationToken,
        started: Instant,
    ) -> Yield {
        loop {
            tokio::select! {
                biased;
                // Cancel-safe: every arm only waits.
                _ = shutdown.cancelled() => return Yield::Shutdown,
                _ = context.requests.requested() => return Yield::SweepRequested,
                _ = tokio::time::sleep(LOOK_EVERY) => {}
            }
            context.telemetry.beat();
            if started.elapsed() >= self.load.max() {
                self.load.ran_full_length();
                info!(
                    max_ms = self.load.max().as_millis() as u64,
                    "the source is still busy after the longest yield: catching up now"
                );
                return Yield::Go;
            }
            // A source rowsync cannot look at is no reason to wait: the next batch will tell.
            if !self.look(context).await || self.load.quiet() {
                return Yield::Go;
            }
        }
    }

    /// Counts the source's active sessions into the load; false if it could not.
    async fn look(&mut self, context: &Context) -> bool {
        let counted = async {
            let source = context.pools.source().await?;
            active_sessions(&**source).await
        }
        .within(self.limit, DatabaseRole::Source, || {
            "counting the source's active sessions".into()
        })
        .await;
        match counted {
            Ok(active) => {
                self.load.record(Instant::now(), active);
                context.telemetry.source_load(active);
                true
            }
            Err(err) => {
                debug!(error = %crate::error::chain(&err), "could not count the source's active sessions");
                false
            }
        }
    }
}

/// Active sessions on the source, rowsync's own (every `application_name` starting with
/// `rowsync`) and the asking one not counted.
pub(crate) async fn active_sessions(client: &impl GenericClient) -> Result<u32> {
    let row = client
        .query_one(
            "SELECT count(*)::int4 FROM pg_catalog.pg_stat_activity \
              WHERE state = 'active' AND backend_type = 'client backend' \
                AND pid <> pg_catalog.pg_backend_pid() \
                AND application_name NOT LIKE $1",
            &[&format!("{APP_POOL}%")],
        )
        .await
        .context(DatabaseRole::Source, || {
            "counting the source's active sessions".into()
        })?;
    Ok(u32::try_from(row.get::<_, i32>(0)).unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(active_sessions: u32) -> SourceLoad {
        SourceLoad::new(YieldSettings {
            active_sessions,
            max: Duration::from_secs(30),
        })
    }

    #[test]
    fn busy_from_the_mean_of_recent_looks_and_quiet_only_below_half() {
        let mut load = load(8);
        let t = Instant::now();
        load.record(t, 12);
        assert!(
            load.busy(),
            "one look at or above the threshold is enough to start"
        );
        load.record(t + LOOK_EVERY, 2);
        load.record(t + 2 * LOOK_EVERY, 6);
        // Mean 6.7: no longer busy enough to start a yield, not quiet enough to end one.
        assert!(!load.busy());
        assert!(!load.quiet());
        load.record(t + 3 * LOOK_EVERY, 1);
        load.record(t + 4 * LOOK_EVERY, 1);
        // The 12 has left the window: mean (6 + 1 + 1) / 3.
        assert!(load.quiet());
    }

    #[test]
    fn stale_looks_are_forgotten() {
        let mut load = load(8);
        let t = Instant::now();
        load.record(t, 16);
        load.record(t + STALE + LOOK_EVERY, 0);
        assert_eq!(load.mean(), Some(0.0));
    }

    #[test]
    fn looks_are_spaced_and_stop_after_a_full_length_yield_until_caught_up() {
        let mut load = load(8);
        let t = Instant::now();
        assert!(load.due(t));
        load.record(t, 3);
        assert!(!load.due(t + LOOK_EVERY / 2));
        assert!(load.due(t + LOOK_EVERY));
        load.ran_full_length();
        assert!(!load.due(t + 10 * LOOK_EVERY));
        load.caught_up();
        assert!(load.due(t + 10 * LOOK_EVERY));
    }

    #[test]
    fn zero_never_yields() {
        let mut load = load(0);
        let t = Instant::now();
        assert!(!load.due(t));
        load.record(t, 100);
        assert!(!load.busy());
    }
}
