//! What rowsync keeps in, and reads from, the source database: the capture objects (triggers,
//! journals, the doorbell; defined in `sql/capture.sql`), the listener that hears the doorbell, and
//! the upkeep that keeps journals small on disk.

pub(crate) mod capture;
pub(crate) mod journal;
pub(crate) mod listener;
pub(crate) mod snapshot;
