//! Tables that come and go while the daemon runs: a reload (SIGHUP) hands the loop a new table
//! list. A table removed stops being applied at once (its capture stays until `rowsync teardown`);
//! a table added is set up in the background, as `rowsync setup` would (capture, then a copy
//! merged into the target), while the others keep streaming, and joins the loop once that is
//! done. A table whose setup fails is failing like any other (logged, backed off, recorded in
//! `sync_errors` once its retries are used up, shown in the figures), and set up again when its
//! backoff is over: fixing what stopped it (a missing target table, a privilege) is enough.
//!
//! The same goes for the tables whose locks this process holds (see `runtime::leader`): a table
//! it takes over joins the loop, one it hands over leaves it, and the loop says what it applies
//! (`Ownership::applying`) once it has stopped applying it, so the lock goes only then.

use std::time::Instant;

use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{error, info};

use super::{SyncLoop, Table};
use crate::commands::setup;
use crate::error::{Error, Result};

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
            let to_set_up = &mut self.to_set_up;
            self.tables.retain(|table| {
                let keep = wanted.contains(&table.reference);
                if !keep {
                    if configured.contains(&table.reference) {
                        if table.setup_failed {
                            // Not set up yet: set up, not only loaded, if it comes back.
                            to_set_up.push(table.reference.clone());
                        }
                        info!(table = %table.name, "handed over: another rowsync process applies it now");
                    } else {
                        info!(table = %table.name, "removed from the configuration: no longer applied (its capture stays until `rowsync teardown`)");
                    }
                    telemetry.forget_table(&table.name);
                }
                keep
            });
            for (table, setup) in
                take_where(&mut self.adding, |(t, _)| !wanted.contains(&t.reference))
            {
                telemetry.forget_table(&table.name);
                if configured.contains(&table.reference) {
                    // Handed over: the setup finishes here (its copy moves the table's progress
                    // under the progress row's lock, as batches do), and the process that holds
                    // the table now loads it once it is set up.
                    info!(table = %table.reference, "handed over while being set up: the setup finishes here, the other process applies the table");
                    self.finishing.push((table.reference, setup));
                } else {
                    setup.abort();
                }
            }
            // A setup finishing for another process stops when its table leaves the
            // configuration, and is this process's again when the table comes back to it.
            for (reference, setup) in take_where(&mut self.finishing, |(r, _)| {
                !configured.contains(r) || wanted.contains(r)
            }) {
                if configured.contains(&reference) {
                    info!(table = %reference, "taken back while its setup finishes: this process applies it once set up");
                    self.adding
                        .push((Table::new(reference, &self.context), setup));
                } else {
                    setup.abort();
                }
            }
            for reference in wanted {
                let known = self.tables.iter().any(|t| t.reference == reference)
                    || self.adding.iter().any(|(t, _)| t.reference == reference);
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
                let table = Table::new(reference, &self.context);
                self.set_up(table);
            }
            self.configured_before = configured;
            // Stopped between batches: the locks of the tables left out may go now.
            let applying = self
                .tables
                .iter()
                .map(|t| t.reference.clone())
                .chain(self.adding.iter().map(|(t, _)| t.reference.clone()))
                .collect();
            self.ownership.applying(version, applying);
        }
        self.finished_for_others().await;
        let now = Instant::now();
        for table in take_where(&mut self.tables, |t| t.setup_failed && t.due(now)) {
            info!(table = %table.reference, "setting up the table added to the configuration again");
            self.set_up(table);
        }
        for (mut table, task) in take_where(&mut self.adding, |(_, task)| task.is_finished()) {
            let outcome = ended(task).await;
            table.setup_failed = outcome.is_err();
            self.tables.push(table);
            let index = self.tables.len() - 1;
            match outcome {
                Ok(()) => {
                    info!(table = %self.tables[index].reference, "set up: syncing it from now on");
                    self.table_succeeded(index).await;
                }
                Err(err) => self.table_failed(index, err).await,
            }
        }
    }

    /// Says how the setups of tables handed over while being set up ended.
    async fn finished_for_others(&mut self) {
        for (reference, task) in take_where(&mut self.finishing, |(_, task)| task.is_finished()) {
            match ended(task).await {
                Ok(()) => {
                    info!(table = %reference, "set up for the process that applies it now");
                }
                Err(err) => {
                    error!(table = %reference, error = %crate::error::chain(&err), "the setup of the table handed over failed: the process that holds it reports it (run `rowsync setup`)");
                }
            }
        }
    }

    /// Sets `table` up (capture, copy) in the background; it joins the loop when that ends.
    fn set_up(&mut self, table: Table) {
        let (settings, pools) = (self.context.settings.clone(), self.context.pools.clone());
        let tables = vec![table.reference.clone()];
        let task = tokio::spawn(async move {
            setup::setup_tables(&settings, &pools, &tables, false)
                .await
                .map(|_| ())
        });
        self.adding.push((table, task));
    }
}

/// Removes the items of `items` for which `taken` holds, and returns them, both in order.
fn take_where<T>(items: &mut Vec<T>, mut taken: impl FnMut(&T) -> bool) -> Vec<T> {
    let (out, kept) = std::mem::take(items)
        .into_iter()
        .partition(|item| taken(item));
    *items = kept;
    out
}

/// How a setup task ended (a panic or an abort is an error too).
async fn ended(task: JoinHandle<Result<()>>) -> Result<()> {
    task.await.map_err(Error::Task).and_then(|outcome| outcome)
}

/// Resolves when the configured table list (or the list of held tables) changes; never, once
/// nobody can change it. Takes a clone: the loop's own receiver must still see the change as new.
pub(super) async fn configuration_changed<T>(mut configured: watch::Receiver<T>) {
    if configured.changed().await.is_err() {
        std::future::pending::<()>().await;
    }
}
