//! Continuous verification (`VERIFY_INTERVAL_MINUTES`): the active process compares the tables
//! it applies with their targets in the background, as `rowsync verify` does, and reports what it
//! finds (`/status`, `rowsync_divergent_rows{table}`, the `divergence` health check); with
//! `REPAIR_AUTOMATICALLY=true` it also journals the differing keys, so that its own sync loop
//! applies them like any change.
//!
//! It stays out of the way: its own two sessions per database (never the batches' pool), no
//! parallel workers, one table at a time, and nothing while rowsync yields to a busy source.

use std::time::{Duration, SystemTime};

use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::catalog::mapping::load_mapping_pooled;
use crate::commands::repair::Journaler;
use crate::commands::verify::{Listing, checks};
use crate::config::TableSpec;
use crate::connection::Pools;
use crate::error::Result;
use crate::ops::telemetry::Verification;
use crate::pipeline::diff::{self, Checks};
use crate::runtime::daemon::Context;

/// How often a verification waiting for a busy source looks again.
const WAIT_WHILE_BUSY: Duration = Duration::from_secs(1);

/// Verifies every table this process applies, each interval, until `stop`.
pub(crate) async fn run(context: Context, stop: CancellationToken) {
    let Some(interval) = context.settings.verify_interval else {
        return;
    };
    let mut settings = (*context.settings).clone();
    settings.source.pool_size = 2;
    settings.target.pool_size = 2;
    let pools = match Pools::new(&settings) {
        Ok(pools) => pools,
        Err(error) => {
            warn!(error = %crate::error::chain(&error), "cannot verify: no connection pool");
            return;
        }
    };
    'rounds: loop {
        tokio::select! {
            () = stop.cancelled() => break,
            () = tokio::time::sleep(interval) => {}
        }
        let tables = context.tables.borrow().clone();
        for table in tables {
            while context.telemetry.figures().yielding.is_some() {
                tokio::select! {
                    () = stop.cancelled() => break 'rounds,
                    () = tokio::time::sleep(WAIT_WHILE_BUSY) => {}
                }
            }
            tokio::select! {
                () = stop.cancelled() => break 'rounds,
                result = verify_table(&context, &pools, &table) => if let Err(error) = result {
                    warn!(table = %table, error = %crate::error::chain(&error), "verification failed; trying again next time");
                }
            }
        }
    }
    pools.close();
}

async fn verify_table(context: &Context, pools: &Pools, table: &TableSpec) -> Result<()> {
    let mapping = load_mapping_pooled(pools, table).await?;
    let name = mapping.name();
    if !context.telemetry.figures().tables.contains_key(&name) {
        debug!(table = %name, "not verified: another process applies it");
        return Ok(());
    }
    let checks = Checks {
        background: true,
        ..checks(3)
    };
    let repair = context.settings.repair_automatically;
    let summary = if repair {
        let mut journaler = Journaler::new(pools, &mapping, Listing::new(0, false)?)?;
        diff::diff(pools, &mapping, checks, &mut journaler).await?
    } else {
        diff::diff(pools, &mapping, checks, &mut Listing::new(0, false)?).await?
    };
    let divergent = summary.differing();
    if divergent > 0 {
        warn!(
            table = %name,
            missing = summary.missing,
            extra = summary.extra,
            different = summary.different,
            repaired = repair,
            "verification found rows that differ between source and target{}",
            if repair { "; they are journaled and will be applied" } else { "; `rowsync repair` fixes them" }
        );
    } else {
        info!(table = %name, rows = summary.source_rows, "verified: no row differs");
    }
    context.telemetry.verified(
        &name,
        Verification {
            at: SystemTime::now(),
            divergent_rows: divergent,
            missing: summary.missing,
            extra: summary.extra,
            different: summary.different,
            repaired: repair && divergent > 0,
        },
    );
    Ok(())
}
