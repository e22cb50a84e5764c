//! The synced tables as the loop holds them, each on its own: a table whose load or batch fails
//! backs off alone (its failures counted, recorded and reported) while the others go on.

use std::time::{Duration, Instant};

use tracing::{debug, info, warn};

use crate::catalog::mapping::TableMapping;
use crate::config::DatabaseRole;
use crate::config::TableSpec;
use crate::connection::{SessionLimits, Within};
use crate::error::Result;
use crate::pipeline::batch::TableSync;
use crate::runtime::daemon::Context;
use crate::runtime::retry::Retrying;
use crate::source::capture;

/// One table of the configuration.
pub(crate) struct Table {
    pub(crate) reference: TableSpec,
    /// Its name in figures, records and logs (the configured name until it is loaded).
    pub(crate) name: String,
    /// Loaded: its batches run. None until a load succeeds (setup not run, a schema problem, a
    /// database away): the load is tried again when due.
    pub(crate) sync: Option<TableSync>,
    /// The name failures were recorded under before the load told the real one.
    pub(super) earlier_name: Option<String>,
    /// The mapping before the table's columns changed, until it is read again.
    pub(super) changed_from: Option<TableMapping>,
    /// A reload added it and its setup failed: the setup (not a load) is tried again when due.
    pub(super) setup_failed: bool,
    /// Unloaded after a schema failure, and no batch has gone through since: the next schema
    /// failure backs off instead of reading the mapping again (which would load it, count as a
    /// success, and start over every second).
    pub(super) reloaded_for_schema: bool,
    retrying: Retrying,
    next_attempt: Instant,
}

impl Table {
    pub(crate) fn new(reference: TableSpec, context: &Context) -> Self {
        Self {
            name: reference.to_string(),
            reference,
            sync: None,
            earlier_name: None,
            changed_from: None,
            setup_failed: false,
            reloaded_for_schema: false,
            retrying: Retrying::new(&context.settings.retry),
            next_attempt: Instant::now(),
        }
    }

    /// Whether the table's next attempt is due (it is not backing off).
    pub(super) fn due(&self, now: Instant) -> bool {
        now >= self.next_attempt
    }

    /// Loads the table if it is not loaded yet. True when it was loaded now.
    pub(crate) async fn load(&mut self, context: &Context) -> Result<bool> {
        if self.sync.is_some() {
            return Ok(false);
        }
        let Context {
            settings,
            pools,
            telemetry,
            ..
        } = context;
        // Before the mapping is read: a journal not yet adapted to the key would fail every batch.
        adapt_capture(context, &self.reference).await;
        let mut sync = TableSync::load(pools, &self.reference, settings, telemetry.clone()).await?;
        // Rows left over are skipped by every batch anyway: failing to delete them (a role without
        // DELETE on the journal) must not keep the table from syncing. The `journal` health check
        // shows what stays.
        match sync.clean_journal(pools).await {
            Ok(0) => {}
            Ok(cleaned) => {
                debug!(table = %sync.name(), rows = cleaned, "deleted journal rows applied before a restart");
            }
            Err(err) => {
                warn!(table = %sync.name(), error = %crate::error::chain(&err), "could not delete journal rows applied before a restart");
            }
        }
        sync.mapping_changed(pools).await?;
        if let Some(before) = &self.changed_from {
            sync.columns_changed(pools, before).await?;
            self.changed_from = None;
        }
        if !sync.mapping.source_only.is_empty() {
            info!(
                table = %sync.name(),
                columns = ?sync.mapping.source_only,
                "source columns missing in the target are not synced"
            );
        }
        if self.name != sync.name() {
            // The figures knew it by its configured name while it could not be loaded.
            telemetry.forget_table(&self.name);
            self.earlier_name = Some(std::mem::replace(&mut self.name, sync.name()));
        }
        self.sync = Some(sync);
        Ok(true)
    }

    /// One more failure: how many in a row, and when the table is tried again.
    pub(super) fn failed(&mut self) -> (u32, Duration) {
        let (failures, delay) = self.retrying.failed();
        self.next_attempt = Instant::now() + delay;
        (failures, delay)
    }

    /// The attempt succeeded. Returns the failures in a row it ends (0: none).
    pub(super) fn succeeded(&mut self) -> u32 {
        let failures = self.retrying.failures();
        if failures > 0 {
            self.retrying.succeeded();
        }
        failures
    }

    pub(super) fn failures(&self) -> u32 {
        self.retrying.failures()
    }
}

/// Adapts the table's capture to what migrations did to it (renamed or retyped key columns, a
/// renamed table) where the event trigger has not already, so that writes are journaled by the
/// capture function's static SQL again rather than its dynamic fallback. Best effort: without
/// EXECUTE on `rowsync.adapt_capture` writes stay on the fallback, slower but captured.
async fn adapt_capture(context: &Context, table: &TableSpec) {
    let limit = SessionLimits::from_settings(&context.settings).client_timeout();
    let adapted = async {
        let mut source = context.pools.source().await?;
        capture::adapt(&mut source, &table.source).await
    }
    .within(limit, DatabaseRole::Source, || {
        format!("adapting the capture of {table}")
    })
    .await;
    match adapted {
        Ok(done) => {
            for line in done {
                info!(table = %table, "capture adapted: {line}");
            }
        }
        Err(err) => {
            warn!(table = %table, error = %crate::error::chain(&err), "could not adapt capture to the table's new columns: writes are journaled by the slower fallback until it is (rowsync's source role needs EXECUTE on rowsync.adapt_capture, or run rowsync setup)");
        }
    }
}
