//! High availability and splitting tables between instances: each table is applied by exactly
//! one process at a time, whatever table lists the processes have.
//!
//! Every process holds a dedicated session on the target (`application_name` `rowsync-leader
//! <instance>`), and on it one session-level advisory lock per table it applies, keyed by the
//! table (its oid in the target, which every process sees alike; its name while the target does
//! not have it). Every second ([`POLL`]) the session looks at which of its tables are held and by
//! whom, and claims more:
//! - up to a fair share: its tables divided by the rowsync processes connected to the target;
//! - any table nobody has held for [`GRACE`] polls in a row (a process that does not list it, or
//!   one that died: the server releases a dead session's locks at once), whatever the share;
//! - and it hands back, at most every [`REBALANCE_EVERY`], a table when it holds two or more
//!   tables more than another process (one started later, say): the sync loop stops applying it
//!   first, then the lock is released, and the other process claims it. A table handed back that
//!   nobody takes returns to it after the grace and is then kept for good.
//!
//! A process holding no table stands by. A process whose lock session breaks (or stops answering)
//! stops applying at once and stands by. The lock session asks the server for tight TCP
//! keepalives, so a client that vanished without a reset is noticed by the server (and its locks
//! released) within about 15 seconds. When the path still acknowledges packets but never delivers
//! them, the server cannot notice; then the process that gave up on its session ends it itself
//! once it can reach the server again.
//!
//! The locks are what keep a second process idle; they are not what keeps data correct. Every
//! batch moves the table's progress row under `FOR UPDATE` with compare-and-set, so even two
//! processes applying at once could never apply a batch twice or out of order.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tokio_postgres::{Client, GenericClient};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::TableSpec;
use crate::config::{DatabaseRole, Settings};
use crate::connection::{
    Connector, SessionLimits, Within, instance, session_config, with_server_keepalives,
};
use crate::error::{Error, Result};
use crate::ops::telemetry::{Role, Telemetry};
use crate::runtime::retry::{Attempts, Retrying, pause, until_ok};

/// `application_name` of the lock sessions (followed by the instance).
pub(crate) const APP_LEADER: &str = "rowsync-leader";

/// How often the lock session looks at the tables' locks (and claims more).
const POLL: Duration = Duration::from_secs(1);

/// Polls a table must have been held by nobody before a process claims it beyond its share.
const GRACE: u32 = 3;

/// How often a process may hand a table back to even out the split.
const REBALANCE_EVERY: Duration = Duration::from_secs(10);

/// The first half of every table lock's key (the second is the table's).
const LOCK_SPACE: &str = "rowsync.table";

/// Held while this process applies some tables. Dropping it releases every lock.
pub(crate) struct Leadership {
    lost: CancellationToken,
    watcher: tokio::task::JoinHandle<()>,
    session: Backend,
    owned: watch::Receiver<Tables>,
    applied: watch::Sender<Tables>,
}

/// A table list and the version of the lock session's list it is (or was computed from): the
/// session publishes what the sync loop may apply, the loop answers with what it applies.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Tables {
    pub(crate) version: u64,
    pub(crate) tables: Vec<TableSpec>,
}

/// A server session: its pid and start time (together they never name another session).
#[derive(Debug, Clone)]
pub(crate) struct Backend {
    pid: i32,
    started: String,
}

impl Leadership {
    /// Cancelled when the lock session breaks: stop applying at once.
    pub(crate) fn lost(&self) -> CancellationToken {
        self.lost.clone()
    }

    /// The lock session, to end it should it outlive this process's interest in it.
    pub(crate) fn session(&self) -> Backend {
        self.session.clone()
    }

    /// The tables this process holds the locks of and may apply, as they change.
    pub(crate) fn owned(&self) -> watch::Receiver<Tables> {
        self.owned.clone()
    }

    /// Where the sync loop says which tables it applies, having seen which version of
    /// [`Leadership::owned`]: a table handed back keeps its lock until the loop has stopped it.
    pub(crate) fn applied(&self) -> watch::Sender<Tables> {
        self.applied.clone()
    }
}

impl Drop for Leadership {
    fn drop(&mut self) {
        self.watcher.abort();
    }
}

/// Waits until this process holds the lock of at least one configured table (standing by
/// meanwhile). None on shutdown.
///
/// `abandoned` is this process's previous lock session, given up on after it stopped answering.
/// The server may still keep it (and its locks) alive, waiting on a dead path; if it still holds
/// a lock, it is ended so that this process, or another, can take over.
pub(crate) async fn acquire(
    settings: &Settings,
    telemetry: &std::sync::Arc<Telemetry>,
    configured: &watch::Receiver<Vec<TableSpec>>,
    shutdown: &CancellationToken,
    mut abandoned: Option<Backend>,
) -> Result<Option<Leadership>> {
    let limits = SessionLimits::from_settings(settings);
    let name = format!("{APP_LEADER} {}", instance());
    let config = with_server_keepalives(session_config(&settings.target, limits, &name));
    let connector = Connector::new(&settings.target);
    let source = (
        Connector::new(&settings.source),
        session_config(&settings.source, limits, APP_LEADER),
    );
    let mut said_standby = false;
    loop {
        // A process that cannot read the source would be counted in the share-out, take its
        // share of the tables and apply none of them, while the others handed them over.
        let mut retrying = Retrying::new(&settings.retry);
        loop {
            let reached = tokio::select! {
                _ = shutdown.cancelled() => return Ok(None),
                reached = reach(&source.0, &source.1, limits) => reached,
            };
            let Err(err) = reached else { break };
            let (_, delay) = retrying.failed();
            let error = crate::error::chain(&err);
            warn!(error = %error, retry_in_ms = delay.as_millis() as u64, "cannot reach the source: taking no table until it can");
            telemetry.lock_session(Some(format!("the source is out of reach: {error}")));
            if !pause(delay, shutdown).await {
                return Ok(None);
            }
        }
        let session = until_ok(
            &settings.retry,
            Attempts::Unlimited,
            shutdown,
            || open_lock_session(&connector, &config, limits),
            |error, _, delay| {
                let error = crate::error::chain(error);
                warn!(error = %error, retry_in_ms = delay.as_millis() as u64, "cannot reach the target for the leader lock");
                telemetry.lock_session(Some(format!("the target is out of reach: {error}")));
            },
        )
        .await?;
        let Some(session) = session else {
            return Ok(None);
        };
        telemetry.lock_session(None);
        let mut claims = Claims::default();
        loop {
            telemetry.beat();
            let tables = configured.borrow().clone();
            let polled = claims
                .poll(
                    &session.client,
                    &tables,
                    session.backend.pid,
                    &mut abandoned,
                )
                .within(limits.client_timeout(), DatabaseRole::Target, || {
                    "taking the table locks".into()
                })
                .await;
            match polled {
                Ok(()) if !claims.owned.is_empty() => {
                    info!(tables = %claims.owned_list(), "holding the leader lock: this is the active instance for these tables");
                    telemetry.set_owners(claims.owners.clone());
                    return Ok(Some(session.lead(
                        claims,
                        configured.clone(),
                        telemetry.clone(),
                        limits,
                    )));
                }
                Ok(()) => {
                    if !said_standby {
                        info!(
                            "other rowsync processes hold the locks of every table; standing by to take over"
                        );
                        said_standby = true;
                    }
                    telemetry.set_role(Role::Standby);
                    telemetry.set_owners(claims.owners.clone());
                    if !pause(POLL, shutdown).await {
                        return Ok(None);
                    }
                }
                Err(err) => {
                    let error = crate::error::chain(&err);
                    warn!(error = %error, "the leader lock session failed; reconnecting");
                    telemetry.lock_session(Some(format!("the lock session failed: {error}")));
                    break;
                }
            }
        }
    }
}

/// Each table in `$1` (quoted names, in order): its lock key, the pid and application name of
/// the session holding its lock in space `$2`, its name as the target has it; and how many
/// sessions named `$3` (rowsync processes) there are. Both sides are MATERIALIZED and meet on a
/// plain `bigint` so that the join is hashed even in a generic plan: compared table by lock,
/// with the key computed in the join, it cost ~20 ms a second with 200 tables.
///
/// Locks and processes count in this database only: advisory locks are per database, and a
/// rowsync of another database on the same server (a staging copy made with `CREATE DATABASE …
/// TEMPLATE`, whose tables have the same oids and so the same keys) neither holds these tables
/// nor shares them out. One row per table however many sessions show a lock (the answer is zipped
/// with the tables).
const LOCKS: &str = "\
    WITH t AS MATERIALIZED ( \
        SELECT u.n, k.k, k.k::bigint & 4294967295 AS lock_key, u.o \
          FROM unnest($1::text[]) WITH ORDINALITY AS u(n, o), \
               LATERAL (SELECT coalesce(pg_catalog.hashtext(pg_catalog.to_regclass(u.n)::oid::text), \
                                        pg_catalog.hashtext(u.n)) AS k) AS k), \
    l AS MATERIALIZED ( \
        SELECT DISTINCT ON (l.objid) l.objid::bigint AS lock_key, l.pid, a.application_name::text AS holder \
          FROM pg_catalog.pg_locks l \
          LEFT JOIN pg_catalog.pg_stat_activity a ON a.pid = l.pid \
         WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 2 \
           AND l.database = (SELECT oid FROM pg_catalog.pg_database \
                              WHERE datname = pg_catalog.current_database()) \
           AND l.classid::bigint = pg_catalog.hashtext($2)::bigint & 4294967295 \
         ORDER BY l.objid, l.pid) \
    SELECT t.k, l.pid, l.holder, \
           (SELECT pg_catalog.format('%I.%I', ns.nspname, c.relname) \
              FROM pg_catalog.pg_class c \
              JOIN pg_catalog.pg_namespace ns ON ns.oid = c.relnamespace \
             WHERE c.oid = pg_catalog.to_regclass(t.n)), \
           (SELECT count(*) FROM pg_catalog.pg_stat_activity \
             WHERE application_name LIKE $3 AND datname = pg_catalog.current_database()) \
      FROM t LEFT JOIN l ON l.lock_key = t.lock_key \
     ORDER BY t.o";

/// The locks a session holds, and what it saw of the others'.
#[derive(Default)]
struct Claims {
    /// [`LOCKS`], prepared on this session.
    statement: Option<tokio_postgres::Statement>,
    /// Held: the table and the second half of its key.
    owned: Vec<(TableSpec, i32)>,
    /// Held, but handed back: the sync loop is stopping it; the lock goes when it has (from
    /// the version of the published list that first left it out, see [`Watched::publish`]).
    handing_back: HashMap<i32, Option<u64>>,
    /// Keys no process held, and for how many polls in a row.
    unheld: HashMap<i32, u32>,
    /// Claimed after nobody took them: never handed back again.
    kept: HashSet<i32>,
    last_handback: Option<Instant>,
    /// Every configured table's owner (instance), as last seen.
    owners: BTreeMap<String, String>,
}

/// One configured table as the lock session sees it.
struct Seen {
    table: TableSpec,
    key: i32,
    holder: Option<i32>,
    holder_name: Option<String>,
    /// Its name as the target has it (`schema.table`), or as configured.
    name: String,
}

impl Claims {
    fn owned_list(&self) -> String {
        let names: Vec<String> = self.owned.iter().map(|(t, _)| t.to_string()).collect();
        names.join(",")
    }

    /// The tables held and not being handed back: what the sync loop may apply.
    fn applying(&self) -> Vec<TableSpec> {
        self.owned
            .iter()
            .filter(|(_, key)| !self.handing_back.contains_key(key))
            .map(|(t, _)| t.clone())
            .collect()
    }

    /// One look at the locks of `tables`; claims what this session should hold.
    async fn poll(
        &mut self,
        client: &Client,
        tables: &[TableSpec],
        me: i32,
        abandoned: &mut Option<Backend>,
    ) -> Result<()> {
        let names: Vec<String> = tables.iter().map(TableSpec::quoted).collect();
        // Prepared once per session: the poll runs every second.
        let statement = match &self.statement {
            Some(statement) => statement.clone(),
            None => {
                let statement = client
                    .prepare(LOCKS)
                    .await
                    .map_err(|source| sql("looking at the table locks", source))?;
                self.statement.insert(statement).clone()
            }
        };
        let rows = client
            .query(
                &statement,
                &[&names, &LOCK_SPACE, &format!("{APP_LEADER} %")],
            )
            .await
            .map_err(|source| sql("looking at the table locks", source))?;
        // The rowsync processes connected to the target (this one included).
        let sessions: i64 = rows.first().map_or(1, |row| row.get(4));
        let seen: Vec<Seen> = tables
            .iter()
            .zip(&rows)
            .map(|(table, row)| Seen {
                table: table.clone(),
                key: row.get(0),
                holder: row.get(1),
                holder_name: row.get(2),
                name: match (row.get::<_, Option<String>>(3), &table.target) {
                    // Named as the mapping names itself: `source → target` (the source as
                    // configured: this session sees only the target).
                    (Some(target), Some(_)) if table.to_string() != table.source.to_string() => {
                        format!("{} → {target}", table.source)
                    }
                    (Some(target), _) => target,
                    (None, _) => table.to_string(),
                },
            })
            .collect();
        // An abandoned session of this process that still holds a lock: end it.
        if let Some(old) = abandoned.take()
            && seen.iter().any(|s| s.holder == Some(old.pid))
        {
            end_abandoned_lock_session(client, &old).await;
        }

        let share = tables.len().div_ceil(sessions.max(1) as usize);
        for s in &seen {
            if s.holder.is_some() {
                self.unheld.remove(&s.key);
            } else {
                *self.unheld.entry(s.key).or_default() += 1;
            }
        }
        for s in &seen {
            if s.holder.is_some() || self.owned.iter().any(|(_, k)| *k == s.key) {
                continue;
            }
            let waited = self.unheld.get(&s.key).copied().unwrap_or(0) >= GRACE;
            if self.owned.len() >= share && !waited {
                continue;
            }
            let locked: bool = client
                .query_one(
                    "SELECT pg_catalog.pg_try_advisory_lock(pg_catalog.hashtext($1), $2)",
                    &[&LOCK_SPACE, &s.key],
                )
                .await
                .map_err(|source| sql("taking a table lock", source))?
                .get(0);
            if locked {
                if waited {
                    self.kept.insert(s.key);
                }
                self.owned.push((s.table.clone(), s.key));
            }
        }
        self.hand_back_one(&seen, me, sessions);

        let name = format!("{APP_LEADER} {}", instance());
        self.owners = seen
            .iter()
            .map(|s| {
                let owner = if self.owned.iter().any(|(_, k)| *k == s.key) {
                    Some(name.clone())
                } else {
                    s.holder_name.clone()
                };
                let owner = owner.map_or_else(
                    || "nobody".to_string(),
                    |o| o.trim_start_matches(APP_LEADER).trim().to_string(),
                );
                (s.name.clone(), owner)
            })
            .collect();
        Ok(())
    }

    /// Evens out the split: when this session holds two tables more than another rowsync process
    /// (one holding none counts, if it is connected), one table is handed back.
    fn hand_back_one(&mut self, seen: &[Seen], me: i32, sessions: i64) {
        if self
            .last_handback
            .is_some_and(|at| at.elapsed() < REBALANCE_EVERY)
            || !self.handing_back.is_empty()
        {
            return;
        }
        // Other rowsync processes' lock sessions (not a `rowsync repair` applying a table itself).
        let mut held: HashMap<i32, usize> = HashMap::new();
        for s in seen {
            let process = s
                .holder_name
                .as_deref()
                .is_some_and(|name| name.starts_with(APP_LEADER));
            if let Some(pid) = s.holder.filter(|pid| *pid != me && process) {
                *held.entry(pid).or_default() += 1;
            }
        }
        // Connected processes holding none of these tables hold zero.
        let fewest = if (held.len() as i64) < sessions - 1 {
            0
        } else {
            held.values().copied().min().unwrap_or(usize::MAX)
        };
        if self.owned.len() < fewest.saturating_add(2) {
            return;
        }
        if let Some((table, key)) = self
            .owned
            .iter()
            .rev()
            .find(|(_, key)| !self.kept.contains(key))
        {
            info!(table = %table, "handing the table over to a process that holds fewer");
            self.handing_back.entry(*key).or_insert(None);
            self.last_handback = Some(Instant::now());
        }
    }

    /// Releases the locks of tables handed back that the sync loop has stopped applying: it has
    /// seen a list without them, and does not apply them.
    async fn release(&mut self, client: &Client, applied: &Tables) -> Result<()> {
        let done: Vec<i32> = self
            .handing_back
            .iter()
            .filter(|(key, left_out)| {
                left_out.is_some_and(|version| applied.version >= version)
                    && !self
                        .owned
                        .iter()
                        .any(|(t, k)| k == *key && applied.tables.contains(t))
            })
            .map(|(key, _)| *key)
            .collect();
        for key in done {
            client
                .query_one(
                    "SELECT pg_catalog.pg_advisory_unlock(pg_catalog.hashtext($1), $2)",
                    &[&LOCK_SPACE, &key],
                )
                .await
                .map_err(|source| sql("releasing a table lock", source))?;
            self.owned.retain(|(_, k)| *k != key);
            self.handing_back.remove(&key);
            self.unheld.remove(&key);
        }
        Ok(())
    }

    /// Tables no longer configured are handed back like the others (stopped, then released).
    fn forget_unconfigured(&mut self, configured: &[TableSpec]) {
        for (table, key) in &self.owned {
            if !configured.contains(table) {
                self.handing_back.entry(*key).or_insert(None);
            }
        }
    }
}

/// Takes the lock by which a process says it applies `table`, if nobody holds it: a command that
/// applies a table itself (`rowsync repair` while no daemon does) holds it meanwhile, so that no
/// process starts applying the table under it. Session-level: [`unlock_table`] it before the
/// session serves anything else.
pub(crate) async fn try_lock_table(client: &impl GenericClient, table: &TableSpec) -> Result<bool> {
    Ok(client
        .query_one(
            &table_lock_call("pg_try_advisory_lock"),
            &[&LOCK_SPACE, &table.quoted()],
        )
        .await
        .map_err(|source| sql("taking a table lock", source))?
        .get(0))
}

/// Releases what [`try_lock_table`] took.
pub(crate) async fn unlock_table(client: &impl GenericClient, table: &TableSpec) -> Result<()> {
    client
        .execute(
            &table_lock_call("pg_advisory_unlock"),
            &[&LOCK_SPACE, &table.quoted()],
        )
        .await
        .map_err(|source| sql("releasing a table lock", source))?;
    Ok(())
}

/// `SELECT function(…)` on a table's lock, keyed as [`Claims::poll`] keys it: `$1` [`LOCK_SPACE`],
/// `$2` the table's name.
fn table_lock_call(function: &str) -> String {
    format!(
        "SELECT pg_catalog.{function}(pg_catalog.hashtext($1), \
                coalesce(pg_catalog.hashtext(pg_catalog.to_regclass($2)::oid::text), \
                         pg_catalog.hashtext($2)))"
    )
}

fn sql(action: &str, source: tokio_postgres::Error) -> Error {
    Error::Sql {
        role: DatabaseRole::Target,
        action: action.into(),
        source,
    }
}

/// A connected lock session, not yet holding the lock. Dropping it closes it.
struct LockSession {
    client: Client,
    driver: Driver,
    backend: Backend,
}

/// The task driving a session's connection, aborted when dropped (unless handed on).
struct Driver(Option<tokio::task::JoinHandle<Result<(), tokio_postgres::Error>>>);

impl Driver {
    fn hand_on(mut self) -> tokio::task::JoinHandle<Result<(), tokio_postgres::Error>> {
        self.0.take().expect("a driver is handed on once")
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        if let Some(driver) = &self.0 {
            driver.abort();
        }
    }
}

impl LockSession {
    /// This session holds some tables' locks now: watch it, and keep claiming.
    fn lead(
        self,
        claims: Claims,
        configured: watch::Receiver<Vec<TableSpec>>,
        telemetry: std::sync::Arc<Telemetry>,
        limits: SessionLimits,
    ) -> Leadership {
        let lost = CancellationToken::new();
        let (owned_tx, owned) = watch::channel(Tables::default());
        let (applied, applied_rx) = watch::channel(Tables::default());
        let mut watched = Watched {
            client: self.client,
            me: self.backend.pid,
            claims,
            configured,
            owned: owned_tx,
            applied: applied_rx,
            telemetry,
        };
        // The first list, before the sync loop starts.
        watched.publish();
        let watcher = tokio::spawn(watch(watched, self.driver.hand_on(), lost.clone(), limits));
        Leadership {
            lost,
            watcher,
            session: self.backend,
            owned,
            applied,
        }
    }
}

/// What the watcher of a lock session works with.
struct Watched {
    client: Client,
    me: i32,
    claims: Claims,
    configured: watch::Receiver<Vec<TableSpec>>,
    owned: watch::Sender<Tables>,
    applied: watch::Receiver<Tables>,
    telemetry: std::sync::Arc<Telemetry>,
}

impl Watched {
    /// One poll: claims, hand-backs, and the tables the sync loop may apply now.
    async fn poll(&mut self) -> Result<()> {
        let configured = self.configured.borrow().clone();
        self.claims.forget_unconfigured(&configured);
        let mut none = None;
        self.claims
            .poll(&self.client, &configured, self.me, &mut none)
            .await?;
        self.publish();
        self.release().await
    }

    /// Publishes what the sync loop may apply (a new version when it changed); a table handed
    /// back is left out from this version on.
    fn publish(&mut self) {
        let applying = self.claims.applying();
        self.telemetry.set_role(if applying.is_empty() {
            Role::Standby
        } else {
            Role::Active
        });
        self.telemetry.set_owners(self.claims.owners.clone());
        self.owned.send_if_modified(|owned| {
            if owned.tables == applying && owned.version > 0 {
                return false;
            }
            owned.version += 1;
            owned.tables = applying;
            true
        });
        let version = self.owned.borrow().version;
        for left_out in self.claims.handing_back.values_mut() {
            left_out.get_or_insert(version);
        }
    }

    /// Releases what the sync loop has stopped applying.
    async fn release(&mut self) -> Result<()> {
        let applied = self.applied.borrow_and_update().clone();
        self.claims.release(&self.client, &applied).await?;
        self.publish();
        Ok(())
    }
}

/// Opens a session with `config` and ends it: the database answers.
async fn reach(
    connector: &Connector,
    config: &tokio_postgres::Config,
    limits: SessionLimits,
) -> Result<()> {
    let limit = limits.client_timeout();
    let (client, connection) = connector
        .connect(config)
        .within(limit, DatabaseRole::Source, || "connecting".into())
        .await?;
    // Without its client the connection says goodbye to the server and ends.
    drop(client);
    let _ = tokio::time::timeout(limit, connection).await;
    Ok(())
}

/// Connects the lock session and learns which server session it is.
async fn open_lock_session(
    connector: &Connector,
    config: &tokio_postgres::Config,
    limits: SessionLimits,
) -> Result<LockSession> {
    let limit = limits.client_timeout();
    let (client, connection) = connector
        .connect(config)
        .within(limit, DatabaseRole::Target, || {
            "connecting for the leader lock".into()
        })
        .await?;
    let driver = Driver(Some(tokio::spawn(connection)));
    let row = client
        .query_one(
            "SELECT pid, backend_start::text FROM pg_catalog.pg_stat_activity WHERE pid = pg_catalog.pg_backend_pid()",
            &[],
        )
        .within(limit, DatabaseRole::Target, || {
            "identifying the leader lock session".into()
        })
        .await;
    let row = row?;
    Ok(LockSession {
        client,
        driver,
        backend: Backend {
            pid: row.get(0),
            started: row.get(1),
        },
    })
}

/// Watches the lock session, claiming and handing back tables every [`POLL`]; cancels `lost` as
/// soon as the session breaks or stops answering.
async fn watch(
    mut watched: Watched,
    driver: tokio::task::JoinHandle<Result<(), tokio_postgres::Error>>,
    lost: CancellationToken,
    limits: SessionLimits,
) {
    let mut driver = driver;
    let mut tick = tokio::time::interval(POLL);
    let limit = limits.client_timeout().min(Duration::from_secs(5));
    loop {
        tokio::select! {
            // Cancel-safe: a JoinHandle can be polled again.
            _ = &mut driver => {
                warn!("the leader lock session closed; stepping down");
                lost.cancel();
                return;
            }
            // Cancel-safe: a change not seen stays marked.
            Ok(()) = watched.applied.changed() => {
                let released = tokio::time::timeout(limit, watched.release()).await;
                if !matches!(released, Ok(Ok(()))) {
                    warn!("the leader lock session does not answer; stepping down");
                    lost.cancel();
                    return;
                }
            }
            _ = tick.tick() => {
                let polled = tokio::time::timeout(limit, watched.poll()).await;
                if !matches!(polled, Ok(Ok(()))) {
                    warn!("the leader lock session does not answer; stepping down");
                    lost.cancel();
                    return;
                }
            }
        }
    }
}

/// Ends this process's own earlier lock session if it is still there (same pid, same start time).
async fn end_abandoned_lock_session(client: &Client, old: &Backend) {
    let ended = client
        .query_one(
            "SELECT count(pg_catalog.pg_terminate_backend(pid)) FROM pg_catalog.pg_stat_activity \
              WHERE pid = $1 AND backend_start::text = $2",
            &[&old.pid, &old.started],
        )
        .await;
    if let Ok(row) = ended
        && row.get::<_, i64>(0) > 0
    {
        warn!(
            pid = old.pid,
            "ended this process's abandoned leader-lock session, which still held the lock"
        );
    }
}
