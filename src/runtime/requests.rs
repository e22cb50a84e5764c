//! Requests for a sweep now (`POST /sync`, `rowsync sync-now`), from the HTTP listener to the sync
//! loop. At most one is queued: asking again while one waits changes nothing.

use std::sync::atomic::{AtomicBool, Ordering};

use futures_util::FutureExt;
use tokio::sync::Notify;

#[derive(Debug, Default)]
pub(crate) struct SweepRequests {
    queued: AtomicBool,
    wake: Notify,
}

impl SweepRequests {
    /// Queues a sweep. False when one is queued already.
    pub(crate) fn request(&self) -> bool {
        if self.queued.swap(true, Ordering::SeqCst) {
            return false;
        }
        self.wake.notify_one();
        true
    }

    /// Resolves when a sweep is requested (cancel-safe: a request made meanwhile is kept).
    pub(crate) async fn requested(&self) {
        self.wake.notified().await;
    }

    /// A sweep starts: it answers every request made so far, so later ones queue another.
    pub(crate) fn answered(&self) {
        self.queued.store(false, Ordering::SeqCst);
        // Consume a wake-up left by a request this sweep answers, so it does not start another.
        let _ = self.wake.notified().now_or_never();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_is_queued_once_until_a_sweep_answers_it() {
        let requests = SweepRequests::default();
        assert!(requests.request());
        assert!(!requests.request(), "second request while queued");
        requests.answered();
        assert!(
            requests.requested().now_or_never().is_none(),
            "the answered request does not wake the loop again"
        );
        assert!(requests.request());
        assert!(requests.requested().now_or_never().is_some());
    }
}
