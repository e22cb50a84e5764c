//! What rowsync keeps in the target database besides the synced rows: its migrations, the
//! replication progress of each table, `sync_errors` and `sync_runs`.

pub(crate) mod migrate;
pub(crate) mod progress;
pub(crate) mod queue;
pub(crate) mod runs;
pub(crate) mod sync_errors;
