//! A table whose attempt failed: logged, backed off on its own, and once `MAX_RETRIES` are used up
//! (or at once, for a failure that retrying will not fix) recorded in `sync_errors`, once per
//! episode, and shown in the figures; when the table works again, the episode's records are
//! resolved.

use tracing::{error, info, warn};

use super::SyncLoop;
use crate::config::DatabaseRole;
use crate::connection::Within;
use crate::error::Error;
use crate::error::policy::{self, ErrorType};
use crate::target::sync_errors;

/// The failures that are about a whole table, not a row: resolved together when it works again.
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
    /// The attempt of table `index` failed with `error`.
    pub(super) async fn table_failed(&mut self, index: usize, error: Error) {
        let decision = policy::decide(&error);
        if decision.retry() {
            // A session that timed out or lost its server must not be handed out again.
            self.context.pools.evict_idle();
        }
        let table = &mut self.tables[index];
        if decision.error_type == ErrorType::SchemaMismatch
            && table.sync.is_some()
            && !table.reloaded_for_schema
        {
            // The table no longer fits the mapping its statements were built for (another
            // primary key and a capture made afresh by `rowsync resync`, say, which the sweep's
            // look at the columns does not see): the next attempt reads the mapping again.
            info!(table = %table.name, "the table no longer fits its column mapping; reading it again");
            table.changed_from = table.sync.take().map(|sync| sync.mapping);
            table.reloaded_for_schema = true;
            self.context.pools.evict_idle();
        }
        let (failures, delay) = table.failed();
        let name = table.name.clone();
        let telemetry = &self.context.telemetry;
        telemetry.failure(self.tables.iter().map(|t| t.failures()).max().unwrap_or(0));
        let message = crate::error::chain(&error);
        let recorded = !decision.retry() || failures > self.context.settings.retry.max_retries;
        telemetry.table_failing(&name, failures, &message, !decision.retry());
        if !recorded {
            warn!(
                table = %name,
                attempt = failures,
                retry_in_ms = delay.as_millis() as u64,
                error = %message,
                "sync failed; retrying"
            );
            return;
        }
        error!(
            table = %name,
            attempt = failures,
            retry_in_ms = delay.as_millis() as u64,
            error = %message,
            "sync keeps failing; recorded in sync_errors, still retrying"
        );
        self.record(&name, &error, message, failures).await;
    }

    async fn record(&self, table: &str, error: &Error, message: String, failures: u32) {
        let decision = policy::decide(error);
        let record = sync_errors::Failure {
            error_type: decision.error_type,
            table: Some(table.to_string()),
            record_id: None,
            message,
            stack_trace: sync_errors::stack_trace(error),
            metadata: sync_errors::metadata(Some(table), "batch", error.postgres(), failures),
            retry_in: None,
        };
        self.context
            .telemetry
            .recorded(decision.error_type.as_str());
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

    /// The attempt of table `index` went through: after failures, say so and close their records.
    pub(super) async fn table_succeeded(&mut self, index: usize) {
        let failures = self.tables[index].succeeded();
        if failures == 0 {
            return;
        }
        let name = self.tables[index].name.clone();
        info!(table = %name, failures, "sync recovered");
        let telemetry = &self.context.telemetry;
        telemetry.table_recovered(&name);
        let worst = self.tables.iter().map(|t| t.failures()).max().unwrap_or(0);
        if worst == 0 {
            telemetry.recovered();
        } else {
            telemetry.failure(worst);
        }
        let earlier = self.tables[index].earlier_name.take();
        let resolved = async {
            let target = self.context.pools.target().await?;
            for table in std::iter::once(&name).chain(&earlier) {
                sync_errors::resolve_episode(&**target, &EPISODE, Some(table)).await?;
            }
            Ok::<(), Error>(())
        }
        .within(self.limit(), DatabaseRole::Target, || {
            "resolving sync_errors".into()
        })
        .await;
        if let Err(err) = resolved {
            warn!(error = %crate::error::chain(&err), "could not resolve the table's sync_errors");
        }
    }
}
