//! The daemon behind `rowsync run`: leadership, then the listener and the sync loop.
//!
//! A process first takes the leader lock ([`crate::runtime::leader`]); until it has it, it stands
//! by. As the active instance it migrates the target, loads its tables, and runs the listener and
//! the sync loop ([`crate::runtime::sync_loop`]). If it loses the lock it stops applying at once
//! (the batch in flight is rolled back) and stands by again.

use std::sync::Arc;

use deadpool_postgres::Object;
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::DatabaseRole;
use crate::config::Settings;
use crate::config::TableSpec;
use crate::connection::{Pools, SessionLimits, Within};
use crate::error::policy;
use crate::error::{Error, Result};
use crate::ops::telemetry::{Role, Telemetry};
use crate::runtime::leader;
use crate::runtime::requests::SweepRequests;
use crate::runtime::retry::{Attempts, until_ok};
use crate::runtime::sync_loop::{SyncLoop, Table};
use crate::runtime::verifier;
use crate::source::listener;
use crate::target::{migrate, runs};

/// What the daemon's parts share.
#[derive(Clone)]
pub(crate) struct Context {
    pub(crate) settings: Arc<Settings>,
    pub(crate) pools: Pools,
    pub(crate) telemetry: Arc<Telemetry>,
    pub(crate) requests: Arc<SweepRequests>,
    /// The tables to sync, as the configuration says now (a reload may change them).
    pub(crate) tables: watch::Receiver<Vec<TableSpec>>,
}

/// Runs the daemon until `shutdown` is cancelled: standing by, or active, as the leader lock says.
pub(crate) async fn run(context: Context, shutdown: CancellationToken) -> Result<()> {
    let mut abandoned = None;
    loop {
        let Some(leadership) = leader::acquire(
            &context.settings,
            &context.telemetry,
            &context.tables,
            &shutdown,
            abandoned.take(),
        )
        .await?
        else {
            return Ok(());
        };
        context.telemetry.set_role(Role::Active);
        let lost = leadership.lost();
        let stop = shutdown.child_token();
        let mut active = Box::pin(run_active(
            context.clone(),
            Ownership {
                owned: leadership.owned(),
                applied: leadership.applied(),
            },
            stop.clone(),
        ));
        let outcome = tokio::select! {
            // Cancel-safe: losing the lock means stopping at once; the batch in flight is dropped
            // and its transactions roll back with their sessions.
            _ = lost.cancelled() => None,
            result = &mut active => Some(result),
        };
        stop.cancel();
        // The sessions the work had in hand go back to the pool now, before the idle ones are
        // dropped below (a session of a dead path must not be handed to the next start).
        drop(active);
        let session = leadership.session();
        drop(leadership);
        match outcome {
            Some(result) => return result,
            None => {
                abandoned = Some(session);
                warn!("lost the leader lock: stopped applying, standing by");
                context.telemetry.set_role(Role::Standby);
                context.pools.evict_idle();
            }
        }
    }
}

/// The tables this process holds the locks of (see [`leader`]), and where the sync loop says it
/// stopped applying one.
pub(crate) struct Ownership {
    pub(crate) owned: watch::Receiver<leader::Tables>,
    pub(crate) applied: watch::Sender<leader::Tables>,
}

impl Ownership {
    /// The configured tables this process may apply now, in the configuration's order, and the
    /// version of the list of held tables that says so.
    pub(crate) fn applicable(&self, configured: &[TableSpec]) -> (u64, Vec<TableSpec>) {
        let owned = self.owned.borrow();
        let tables = configured
            .iter()
            .filter(|t| owned.tables.contains(t))
            .cloned()
            .collect();
        (owned.version, tables)
    }

    /// Tells the lock session which tables the sync loop applies now, having seen `version`:
    /// the locks of tables handed back go once they are not among them.
    pub(crate) fn applying(&self, version: u64, tables: Vec<TableSpec>) {
        self.applied
            .send_replace(leader::Tables { version, tables });
    }
}

/// The active instance's work, until `stop`.
async fn run_active(context: Context, ownership: Ownership, stop: CancellationToken) -> Result<()> {
    let Some(started) = start(&context, &ownership, &stop).await? else {
        return Ok(());
    };
    let wake = Arc::new(Notify::new());
    let listener = tokio::spawn(listener::run(
        context.settings.clone(),
        context.pools.clone(),
        wake.clone(),
        context.telemetry.clone(),
        stop.clone(),
    ));
    let verifier = tokio::spawn(verifier::run(context.clone(), stop.clone()));
    SyncLoop::new(context, ownership, started, wake, stop)
        .run()
        .await;
    let _ = listener.await;
    let _ = verifier.await;
    Ok(())
}

/// What a start found.
pub(crate) struct Started {
    /// The tables loaded (or to load again).
    pub(crate) tables: Vec<Table>,
    /// Tables a reload added that are not set up: the sync loop sets them up first.
    pub(crate) to_set_up: Vec<TableSpec>,
    /// The configured table list as the start read it.
    pub(crate) configured: Vec<TableSpec>,
}

/// Migrates the target (retrying while it is unreachable) and loads every table it can. A table
/// that cannot be loaded is tried again by the sync loop (and reported meanwhile), unless no
/// table is set up at all and this process holds them all: then `rowsync run` before `rowsync
/// setup` is the error. A table that a reload added and that is not set up (the reload came
/// while this process was not applying anything: standing by, reconnecting, starting) is
/// returned apart, for the sync loop to set up first.
/// Returns None if stopped meanwhile.
async fn start(
    context: &Context,
    ownership: &Ownership,
    stop: &CancellationToken,
) -> Result<Option<Started>> {
    let migrated = until_ok(
        &context.settings.retry,
        Attempts::Unlimited,
        stop,
        || prepare_target(context),
        |error, _, delay| {
            warn!(
                error = %crate::error::chain(error),
                retry_in_ms = delay.as_millis() as u64,
                "cannot start yet; retrying"
            );
            context.telemetry.beat();
        },
    )
    .await?;
    if migrated.is_none() {
        return Ok(None);
    }
    let mut tables = Vec::new();
    let mut to_set_up = Vec::new();
    let mut not_set_up = None;
    // Read once: a table a reload adds from here on is new to the sync loop, which sets it up.
    let all = context.tables.borrow().clone();
    let (version, configured) = ownership.applicable(&all);
    ownership.applying(version, configured.clone());
    for reference in &configured {
        let mut table = Table::new(reference.clone(), context);
        match table.load(context).await {
            Ok(_) => {}
            Err(error) if policy::decide(&error).retry() => {
                warn!(table = %table.name, error = %crate::error::chain(&error), "cannot load the table yet; retrying");
            }
            Err(Error::NotSetUp { .. }) if !context.settings.tables.contains(reference) => {
                info!(table = %table.name, "added to the configuration and not set up yet: setting it up (capture, copy) while the other tables stream");
                to_set_up.push(reference.clone());
                continue;
            }
            Err(error @ Error::NotSetUp { .. }) => {
                warn!(table = %table.name, error = %crate::error::chain(&error), "the table is not set up; retrying it later");
                not_set_up.get_or_insert(error);
            }
            Err(error) => {
                warn!(table = %table.name, error = %crate::error::chain(&error), "cannot sync the table; retrying it later");
            }
        }
        tables.push(table);
    }
    // Only when this process holds every configured table: one that holds some has been handed
    // tables by another process, whose own (or its setup of these) is what sets them up.
    let holds_all = configured.len() == all.len();
    match not_set_up {
        Some(error)
            if holds_all && to_set_up.is_empty() && tables.iter().all(|t| t.sync.is_none()) =>
        {
            Err(error)
        }
        _ => Ok(Some(Started {
            tables,
            to_set_up,
            configured: all,
        })),
    }
}

/// Migrates the target and closes runs a previous process left open. Bounded like every call: a
/// session on a path that went silent must not hang the start, and is not used again.
async fn prepare_target(context: &Context) -> Result<()> {
    let limit = SessionLimits::from_settings(&context.settings).client_timeout();
    let mut target = context.pools.target().await?;
    let prepared = async {
        let applied = migrate::migrate(&mut target).await?;
        if !applied.is_empty() {
            info!(migrations = ?applied, "applied target migrations");
        }
        let closed = runs::close_interrupted(&**target).await?;
        if closed > 0 {
            info!(
                runs = closed,
                "marked runs cut short by a previous process as failed"
            );
        }
        Ok::<_, Error>(())
    }
    .within(limit, DatabaseRole::Target, || {
        "preparing the target".into()
    })
    .await;
    if prepared.is_err() {
        drop(Object::take(target));
    }
    prepared
}
