//! Noticing when capture may have been bypassed, and so when a sweep must look back.
//!
//! The journal sees every change made through the capture triggers. What it can miss are changes
//! made while a trigger was off (`ALTER TABLE … DISABLE TRIGGER`, `pg_restore
//! --disable-triggers`) and those of a logical-replication apply worker (it fires no statement
//! triggers). Any disable, enable, drop or re-creation of a trigger writes a new catalog row, so a
//! changed fingerprint of the triggers' catalog rows between two sweeps means capture may have been
//! off in between, even if it is on again now.

use crate::config::LookbackMode;
use crate::source::capture::CaptureState;

/// What the previous sweep saw of a table's capture triggers.
#[derive(Debug)]
pub(crate) struct CaptureWatch {
    mode: LookbackMode,
    /// The fingerprint at the previous sweep; None before the first.
    seen: Option<String>,
    /// A look-back was wanted and no sweep's batch has gone through since: the next sweep looks
    /// back too (the fingerprint that asked for it is already seen).
    owed: bool,
}

impl CaptureWatch {
    pub(crate) fn new(mode: LookbackMode) -> Self {
        Self {
            mode,
            seen: None,
            owed: false,
        }
    }

    /// Whether this sweep looks back over `updated_at`, given capture's state now (see
    /// [`LookbackMode`]). Warns when capture is off or was altered.
    pub(crate) fn look_back(&mut self, table: &str, state: CaptureState) -> bool {
        if !state.intact {
            tracing::warn!(
                table = %table,
                "capture triggers are disabled or missing: changes are not captured; run `rowsync setup` to repair"
            );
        }
        if let Some(lost) = &state.lost {
            tracing::warn!(
                table = %table,
                lost = %lost,
                "writes to the table could not be journaled after a migration; run `rowsync resync {table}` to copy it again"
            );
        }
        let changed = self
            .seen
            .as_ref()
            .is_some_and(|seen| *seen != state.fingerprint);
        if changed {
            tracing::warn!(table = %table, "capture triggers were altered since the last sweep; looking back for changes they missed");
        }
        let first = self.seen.is_none();
        self.seen = Some(state.fingerprint);
        let wanted = match self.mode {
            LookbackMode::Always => true,
            LookbackMode::Never => false,
            LookbackMode::Auto => {
                first || changed || state.subscriber || !state.intact || state.lost.is_some()
            }
        };
        self.owed |= wanted;
        self.owed
    }

    /// The sweep's batch went through (with its look-back, if it had one).
    pub(crate) fn looked_back(&mut self) {
        self.owed = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(fingerprint: &str) -> CaptureState {
        CaptureState {
            fingerprint: fingerprint.to_string(),
            intact: true,
            subscriber: false,
            partitioned: false,
            lost: None,
        }
    }

    #[test]
    fn a_look_back_not_gone_through_is_owed_to_the_next_sweep() {
        let mut watch = CaptureWatch::new(LookbackMode::Auto);
        assert!(
            watch.look_back("t", state("a")),
            "the first sweep looks back"
        );
        watch.looked_back();
        assert!(!watch.look_back("t", state("a")));
        watch.looked_back();
        // The triggers changed, and the sweep's batch failed: the next sweep sees no change but
        // still owes the look-back.
        assert!(watch.look_back("t", state("b")));
        assert!(watch.look_back("t", state("b")));
        watch.looked_back();
        assert!(!watch.look_back("t", state("b")));
    }
}
