//! Running the pipeline as a daemon: leadership between instances, the sync loop and its timers,
//! yielding to a busy source, retries with backoff, and turning signals into cancellation.

pub(crate) mod daemon;
pub(crate) mod leader;
pub(crate) mod requests;
pub(crate) mod retry;
pub(crate) mod shutdown;
pub(crate) mod sync_loop;
pub(crate) mod verifier;
pub(crate) mod yielding;
