//! rowsync keeps tables in one PostgreSQL database (the source) in sync with another (the target).
//!
//! # How it works
//! * **Capture** (`sql/capture.sql`, [`capture`]): statement-level triggers on each source table write
//!   the changed keys to a journal, in the same transaction as the change, with the writing
//!   transaction's id. A NOTIFY is sent only when the consumer has armed a doorbell, so writers do
//!   not serialise on NOTIFY's commit lock.
//! * **Batches** ([`batch`], [`changes`]): a batch is every journaled key of transactions visible in
//!   the current snapshot but not in the previous one. Each committed transaction becomes visible in
//!   exactly one snapshot, so however long it ran it lands in exactly one batch.
//! * **Apply** ([`apply`]): for each key the current source row is read in the batch's snapshot and
//!   upserted into the target, or deleted there if it is gone. Identical rows are not rewritten.
//!   Rows the target rejects are isolated, recorded in `sync_errors` and retried by later sweeps.
//! * **Progress** ([`progress`]): the batch's snapshot is recorded in the target in the same
//!   transaction as its rows.
//! * **Yielding** ([`yielding`]): while the source has many active sessions, rowsync defers its
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
//! # Limits
//! See the README: the target table mirrors the source (rows not in the source are removed at the
//! initial copy), tables are synced independently (no cross-table transaction order), and tables
//! that are themselves logical-replication subscribers are not captured (their apply worker fires
//! no statement triggers).

pub mod apply;
pub mod batch;
pub mod capture;
pub mod changes;
pub mod commands;
pub mod config;
pub mod connection;
pub mod daemon;
pub mod error;
pub mod error_policy;
pub mod health;
pub mod http;
pub mod ident;
pub mod journal;
pub mod leader;
pub mod logging;
pub mod metrics;
pub mod migrate;
pub mod progress;
pub mod retry;
pub mod runs;
pub mod schema;
pub mod shutdown;
pub mod snapshot;
pub mod sync_errors;
pub mod systemd;
pub mod telemetry;
pub mod yielding;
