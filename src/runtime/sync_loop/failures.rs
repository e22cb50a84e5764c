//! Failed passes: logged, and once `MAX_RETRIES` are used up recorded in `sync_errors` (once per
//! episode); when syncing works again, the episode's records are resolved.

use std::time::Duration;

use tracing::{error, warn};

use super::{PassError, SyncLoop};
use crate::config::DatabaseRole;
use crate::connection::Within;
use crate::error::policy::{self, ErrorType};
use crate::target::sync_errors;

/// The failures that are about a whole pass, not a row: resolved together when a pass succeeds.
const EPISODE: [ErrorType; 7] = [
    ErrorType::ConnectionError,
    ErrorType::Timeout,
    ErrorType::SyncError,
    ErrorType::SchemaMismatch,
    ErrorType::ConstraintViolation,
    ErrorType::DataError,
    ErrorType::PermissionDenied,
];

impl SyncLoop {
    /// Reports a failed pass (`failures` in a row); the next attempt comes after `delay`.
    pub(super) async fn fail(&self, failure: &PassError, failures: u32, delay: Duration) {
        let telemetry = &self.context.telemetry;
        telemetry.failure(failures);
        let message = crate::error::chain(&failure.error);
        let decision = policy::decide(&failure.error);
        if failures <= self.context.settings.retry.max_retries && decision.retry() {
            warn!(
                table = %failure.table,
                attempt = failures,
                retry_in_ms = delay.as_millis() as u64,
                error = %message,
                "sync failed; retrying"
            );
            return;
        }
        error!(
            table = %failure.table,
            attempt = failures,
            retry_in_ms = delay.as_millis() as u64,
            error = %message,
            "sync keeps failing; recorded in sync_errors, still retrying"
        );
        let record = sync_errors::Failure {
            error_type: decision.error_type,
            table: Some(failure.table.clone()),
            record_id: None,
            message,
            stack_trace: sync_errors::stack_trace(&failure.error),
            metadata: sync_errors::metadata(
                Some(&failure.table),
                "batch",
                failure.error.postgres(),
                failures,
            ),
            retry_in: None,
        };
        telemetry.recorded(decision.error_type.as_str());
        let recorded = async {
            let target = self.context.pools.target().await?;
            sync_errors::record(&**target, &record).await
        }
        .within(self.limit(), DatabaseRole::Target, || {
            "recording a failure".into()
        })
        .await;
        if let Err(err) = recorded {
            warn!(error = %crate::error::chain(&err), "could not record the failure in sync_errors");
        }
    }

    /// After a recovery, closes the open records of failures that were not about a row.
    pub(super) async fn resolve_failure_episode(&self) {
        let Ok(target) = self.context.pools.target().await else {
            return;
        };
        for table in &self.tables {
            let _ = sync_errors::resolve_episode(&**target, &EPISODE, Some(&table.name()))
                .within(self.limit(), DatabaseRole::Target, || {
                    "resolving sync_errors".into()
                })
                .await;
        }
    }
}
