//! Moving changes from the source to the target: the change query that reads a batch, the batch
//! itself (snapshot, read, apply under the progress lock, record, clean up), the apply statements,
//! and the initial copy.

pub(crate) mod apply;
pub(crate) mod batch;
pub(crate) mod changes;
pub(crate) mod chunks;
pub(crate) mod copy;
pub(crate) mod diff;
