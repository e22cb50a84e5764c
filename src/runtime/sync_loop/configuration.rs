//! Tables that come and go while the daemon runs: a reload (SIGHUP) hands the loop a new table
//! list. A table removed stops being applied at once (its capture stays until `rowsync teardown`);
//! a table added is set up in the background, as `rowsync setup` would (capture, then a copy
//! merged into the target), while the others keep streaming, and joins the loop once that is
//! done. A table whose setup fails is logged, and tried again at the next reload.
//!
//! The same goes for the tables whose locks this process holds (see `runtime::leader`): a table
//! it takes over joins the loop, one it hands over leaves it, and the loop says what it applies
//! (`Ownership::applying`) once it has stopped applying it, so the lock goes only then.

use tokio::sync::watch;
use tracing::{error, info};

use super::{SyncLoop, Table};
use crate::commands::setup;

impl SyncLoop {
    /// Applies a new table list, and takes in the tables whose setup finished.
    pub(super) async fn follow_configuration(&mut self) {
        let reconfigured = self.configured.has_changed().unwrap_or(false);
        let reowned = self.ownership.owned.has_changed().unwrap_or(false);
        let first_turn = std::mem::take(&mut self.first_turn);
        if reconfigured || reowned || first_turn {
            let configured = self.configured.borrow_and_update().clone();
            self.ownership.owned.borrow_and_update();
            // New in the configuration: set up before it is synced (whenever this process
            // comes to hold it).
            for table in &configured {
                if !self.configured_before.contains(table) && !self.to_set_up.contains(table) {
                    self.to_set_up.push(table.clone());
                }
            }
            self.to_set_up.retain(|t| configured.contains(t));
            let (version, wanted) = self.ownership.applicable(&configured);
            let telemetry = &self.context.telemetry;
            self.tables.retain(|table| {
                let keep = wanted.contains(&table.reference);
                if !keep {
                    if configured.contains(&table.reference) {
                        info!(table = %table.name, "handed over: another rowsync process applies it now");
                    } else {
                        info!(table = %table.name, "removed from the configuration: no longer applied (its capture stays until `rowsync teardown`)");
                    }
                    telemetry.forget_table(&table.name);
                }
                keep
            });
            self.adding.retain(|(reference, setup)| {
                let keep = wanted.contains(reference);
                if keep {
                    return true;
                }
                if configured.contains(reference) {
                    // Handed over: the setup finishes in the background (its copy moves the
                    // table's progress under the progress row's lock, as batches do), and the
                    // process that holds the table now loads it once it is set up.
                    info!(table = %reference, "handed over while being set up: the setup finishes here, the other process applies the table");
                } else {
                    setup.abort();
                }
                false
            });
            for reference in wanted {
                let known = self.tables.iter().any(|t| t.reference == reference)
                    || self.adding.iter().any(|(r, _)| *r == reference);
                if known {
                    continue;
                }
                if !self.to_set_up.contains(&reference) {
                    // Set up already (or reported as not set up, as at start): taken over.
                    info!(table = %reference, "taken over: this process applies it now");
                    self.tables.push(Table::new(reference, &self.context));
                    continue;
                }
                self.to_set_up.retain(|t| *t != reference);
                info!(table = %reference, "added to the configuration: setting it up (capture, copy) while the other tables keep streaming");
                let (settings, pools) = (self.context.settings.clone(), self.context.pools.clone());
                let tables = vec![reference.clone()];
                let task = tokio::spawn(async move {
                    setup::setup_tables(&settings, &pools, &tables, false)
                        .await
                        .map(|_| ())
                });
                self.adding.push((reference, task));
            }
            self.configured_before = configured;
            // Stopped between batches: the locks of the tables left out may go now.
            let applying = self
                .tables
                .iter()
                .map(|t| t.reference.clone())
                .chain(self.adding.iter().map(|(r, _)| r.clone()))
                .collect();
            self.ownership.applying(version, applying);
        }
        let mut index = 0;
        while index < self.adding.len() {
            if !self.adding[index].1.is_finished() {
                index += 1;
                continue;
            }
            let (reference, task) = self.adding.remove(index);
            match task.await {
                Ok(Ok(())) => {
                    info!(table = %reference, "set up: syncing it from now on");
                    self.tables.push(Table::new(reference, &self.context));
                }
                Ok(Err(err)) => {
                    error!(table = %reference, error = %crate::error::chain(&err), "could not set up the table added to the configuration; it is not synced (run `rowsync setup`, then reload again)");
                }
                Err(err) => {
                    error!(table = %reference, error = %err, "setting up the table added to the configuration stopped");
                }
            }
        }
    }
}

/// Resolves when the configured table list (or the list of held tables) changes; never, once
/// nobody can change it. Takes a clone: the loop's own receiver must still see the change as new.
pub(super) async fn configuration_changed<T>(mut configured: watch::Receiver<T>) {
    if configured.changed().await.is_err() {
        std::future::pending::<()>().await;
    }
}
