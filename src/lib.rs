//! rowsync keeps tables in one PostgreSQL database (the source) in sync with another (the target).
//!
//! # How it works
//! * **Capture** (`sql/capture.sql`, `source::capture`): statement-level triggers on each source table write
//!   the changed keys to a journal, in the same transaction as the change, with the writing
//!   transaction's id. A NOTIFY is sent only when the consumer has armed a doorbell, so writers do
//!   not serialise on NOTIFY's commit lock.
//! * **Batches** (`pipeline::batch`, `pipeline::changes`): a batch is every journaled key of transactions visible in
//!   the current snapshot but not in the previous one. Each committed transaction becomes visible in
//!   exactly one snapshot, so however long it ran it lands in exactly one batch.
//! * **Apply** (`pipeline::apply`): for each key the current source row is read in the batch's snapshot and
//!   upserted into the target, or deleted there if it is gone. Identical rows are not rewritten.
//!   Rows the target rejects are isolated, recorded in `sync_errors` and retried by later sweeps.
//! * **Progress** (`target::progress`): the batch's snapshot is recorded in the target in the same
//!   transaction as its rows.
//! * **Yielding** (`runtime::yielding`): while the source has many active sessions, rowsync defers its
//!   batches (for a bounded time) and applies the burst once it is over.
//!
//! # Guarantees
//! * Every committed change reaches the target: while rowsync runs, while it is stopped (applied at
//!   the next start from the journal, deletes included), across lost notifications, long
//!   transactions, large rows and crashes.
//! * After a crash at any moment (kill -9 included), the next start re-applies exactly what was not
//!   recorded: no change is lost and none is applied twice in a way anyone can see.
//! * A source write never fails because of rowsync: the journal row is a few bytes, and NOTIFY
//!   payloads are empty.
//!
//! # Where things are
//! * `source/`: what rowsync keeps in and reads from the source (capture objects, listener,
//!   journal upkeep). `target/`: what it keeps in the target (migrations, progress,
//!   `sync_errors`, `sync_runs`).
//! * `pipeline/`: moving changes (the change query, the batch, apply, the initial copy).
//! * `runtime/`: running it as a daemon (the sync loop, leadership, yielding, retries, signals).
//! * `ops/`: what operators see (figures, health, metrics, HTTP, systemd, logs).
//! * `config`, `connection`, `error`, `catalog` (identifiers, table mappings) and `commands/` (one
//!   file per subcommand) at the root.
//!
//! # Limits
//! See the README: the target table mirrors the source (rows not in the source are removed at the
//! initial copy), tables are synced independently (no cross-table transaction order), and tables
//! that are themselves logical-replication subscribers are not captured (their apply worker fires
//! no statement triggers).

pub mod catalog;
pub mod commands;
pub mod config;
pub(crate) mod connection;
pub mod error;
pub mod failpoint;
pub mod ops;
pub(crate) mod pipeline;
pub(crate) mod runtime;
pub(crate) mod source;
pub(crate) mod target;
