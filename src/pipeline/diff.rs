//! Which rows differ between a source table and its target: found by hash, in about the time it
//! takes to read both tables once, with memory bounded whatever their size.
//!
//! Every row is hashed (64 bits over its synced columns: see [`Hasher`]), and put in a bucket by a
//! hash of its key alone, so a row lands in the same bucket on both sides whatever its contents.
//! 1. Each side sends `(bucket, rows, xor of row hashes)` for every bucket it has: one sequential
//!    scan, aggregated by the server; rowsync balances the two in an array and marks the buckets
//!    that differ in a bitmap. A table that matches is done here, read once.
//! 2. Each side sends `(key hash, row hash, key)` of the rows in the marked buckets, ordered by the
//!    key hash (a scan that hashes only keys, and rows only where their bucket is marked). Merging
//!    the streams by key hash names every key that is missing in the target, extra in it, or
//!    different. Ordering by a hash, not by the key, means no collation has to be reproduced here.
//!
//! With about 64 rows per bucket, a table where 0.1% of the rows differ sends ~6% of its rows in
//! the second step. Both steps stream through portals in chunks, a side per task, so each side is
//! read while the other is, and rowsync holds a few chunks at a time.
//!
//! The two sides are never read at the same instant: under writes a row may be in flight. So the
//! differences found are checked again by key (a primary-key lookup on each side): at once, where
//! a row that neither side changed since the scan and whose key has no change waiting in the
//! journal stands; the others again after the scans, a pause apart, up to `attempts` checks in
//! all. A key that matches at any check was in flight and is not reported.

use std::collections::HashSet;
use std::future::Future;
use std::time::{Duration, Instant};

use deadpool_postgres::Object;
use postgres_types::ToSql;
use serde::Serialize;
use tokio::sync::mpsc;
use tokio_postgres::{IsolationLevel, Row};

use crate::catalog::mapping::{Column, TableMapping, Transfer, join, key_record};
use crate::config::DatabaseRole;
use crate::connection::Pools;
use crate::error::{Error, Result, SqlContext};
use crate::pipeline::copy::progress_line::estimate_rows;

/// Rows per fetch from a side's portal.
const FETCH_ROWS: i32 = 10_000;

/// Differences re-checked together (and handed on together).
const WINDOW: usize = 5_000;

/// Rows per bucket aimed at, from the planner's estimate of the larger side. Fewer buckets make
/// step 1 cheaper (a smaller hash table), more make step 2 read fewer rows; at 64, step 1 costs
/// about a COPY of the table on the server and step 2, where 0.1% of the rows differ, a quarter
/// of that.
const ROWS_PER_BUCKET: u64 = 64;

/// Bounds of the bucket count (a power of two): step 1 holds 32 bytes per bucket (8 MiB at most),
/// and past 16M rows buckets hold more rows.
const MIN_BUCKETS: u64 = 1 << 10;
const MAX_BUCKETS: u64 = 1 << 18;

/// The settings of every session that reads for a diff: both servers render values alike (ISO
/// dates in UTC, exact floats, hex bytea); a scan may take longer than any statement timeout, and
/// a side's transaction waits while the other side or a re-check catches up.
const PRELUDE: &str = "SET LOCAL DateStyle = 'ISO, YMD'; SET LOCAL IntervalStyle = 'postgres'; \
     SET LOCAL TimeZone = 'UTC'; SET LOCAL extra_float_digits = 1; SET LOCAL bytea_output = 'hex'; \
     SET LOCAL statement_timeout = 0; SET LOCAL idle_in_transaction_session_timeout = 0; \
     SET LOCAL work_mem = '64MB'; SET LOCAL application_name = 'rowsync-verify'; \
     SET LOCAL standard_conforming_strings = on; SET LOCAL lc_monetary = 'C'";

/// How a row differs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Kind {
    /// In the source, not in the target.
    Missing,
    /// In the target, not in the source.
    Extra,
    /// In both, with other contents.
    Different,
}

impl Kind {
    /// Its name in reports (as serde writes it).
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::Missing => "missing",
            Self::Extra => "extra",
            Self::Different => "different",
        }
    }

    /// The kind [`Kind::as_str`] names.
    pub(crate) fn from_name(name: &str) -> Option<Self> {
        [Self::Missing, Self::Extra, Self::Different]
            .into_iter()
            .find(|kind| kind.as_str() == name)
    }
}

/// One differing row: how, and its key as a JSON object (`{"id": 7}`), as jsonb renders it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Difference {
    pub(crate) kind: Kind,
    pub(crate) key: String,
}

/// What a diff found in one table.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Summary {
    pub(crate) source_rows: i64,
    pub(crate) target_rows: i64,
    pub(crate) missing: u64,
    pub(crate) extra: u64,
    pub(crate) different: u64,
}

impl Summary {
    pub(crate) fn differing(&self) -> u64 {
        self.missing + self.extra + self.different
    }

    fn count(&mut self, kind: Kind) {
        match kind {
            Kind::Missing => self.missing += 1,
            Kind::Extra => self.extra += 1,
            Kind::Different => self.different += 1,
        }
    }
}

/// Where a diff's confirmed differences go, a window at a time (so none has to hold them all).
pub(crate) trait Sink {
    fn found(&mut self, differences: Vec<Difference>) -> impl Future<Output = Result<()>> + Send;
}

/// How a diff re-checks what it finds.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Checks {
    /// Checks of each difference in all (1: report what the scans found, unchecked).
    pub(crate) attempts: u32,
    /// Time between them.
    pub(crate) pause: Duration,
    /// In the background: no parallel workers (a scan takes one core per side, no more).
    pub(crate) background: bool,
}

/// Finds the rows of `mapping` that differ, handing them to `sink` once confirmed.
pub(crate) async fn diff(
    pools: &Pools,
    mapping: &TableMapping,
    checks: Checks,
    sink: &mut impl Sink,
) -> Result<Summary> {
    let started = Instant::now();
    let buckets = bucket_count(pools, mapping).await?;
    let hasher = Hasher::common(pools).await?;
    let source = SideSql::new(mapping, SOURCE, buckets, hasher);
    let target = SideSql::new(mapping, TARGET, buckets, hasher);

    // Step 1: buckets. Each side's rows and hash digests (xor, or sum), the target's taken from
    // the source's: a bucket matches when both come to zero. (The server aggregates before it
    // sends a row, so the order the sides are drained in does not matter: both scan at once.)
    let mut balance = vec![(0i64, 0i128); buckets as usize];
    let mut summary = Summary::default();
    let sides = [
        (
            SOURCE,
            read(pools, SOURCE, &source.buckets, vec![], checks.background).await?,
            1,
        ),
        (
            TARGET,
            read(pools, TARGET, &target.buckets, vec![], checks.background).await?,
            -1,
        ),
    ];
    for (role, chunks, sign) in sides {
        let mut rows = Cursor::new(chunks, Bucket::from_row);
        while let Some(bucket) = rows.next().await? {
            let entry = &mut balance[bucket.bucket as usize];
            entry.0 += sign * bucket.rows;
            entry.1 = match hasher {
                Hasher::Native => entry.1 ^ bucket.digest,
                Hasher::Md5 => entry.1 + i128::from(sign) * bucket.digest,
            };
            match role {
                DatabaseRole::Source => summary.source_rows += bucket.rows,
                DatabaseRole::Target => summary.target_rows += bucket.rows,
            }
        }
    }
    let mut bitmap = vec![0u8; (buckets / 8) as usize];
    let mut marked = 0u64;
    for (bucket, entry) in balance.iter().enumerate() {
        if *entry != (0, 0) {
            bitmap[bucket / 8] |= 1 << (bucket % 8);
            marked += 1;
        }
    }
    drop(balance);
    tracing::debug!(
        table = %mapping.name(),
        buckets,
        differing_buckets = marked,
        duration_ms = started.elapsed().as_millis() as u64,
        "diff: buckets compared"
    );
    if marked == 0 {
        return Ok(summary);
    }

    // Step 2: the rows of the marked buckets.
    let mut src = Cursor::new(
        read(
            pools,
            SOURCE,
            &source.rows,
            vec![Box::new(bitmap.clone())],
            checks.background,
        )
        .await?,
        Keyed::from_row,
    );
    let mut tgt = Cursor::new(
        read(
            pools,
            TARGET,
            &target.rows,
            vec![Box::new(bitmap)],
            checks.background,
        )
        .await?,
        Keyed::from_row,
    );
    let mut recheck = Recheck {
        pools,
        source: &source,
        target: &target,
        checks,
        window: Vec::new(),
        deferred: Vec::new(),
    };
    loop {
        let s = src.peek().await?.map(|k| k.key_hash);
        let t = tgt.peek().await?.map(|k| k.key_hash);
        let hash = match (s, t) {
            (None, None) => break,
            (Some(s), Some(t)) => s.min(t),
            (Some(h), None) | (None, Some(h)) => h,
        };
        let (ours, theirs) = (src.take_while(hash).await?, tgt.take_while(hash).await?);
        for candidate in compare(ours, theirs) {
            recheck.push(candidate);
        }
        if recheck.window.len() >= WINDOW {
            recheck.flush(&mut summary, sink).await?;
        }
    }
    recheck.flush(&mut summary, sink).await?;
    drop((src, tgt));
    recheck.finish(&mut summary, sink).await?;
    tracing::debug!(
        table = %mapping.name(),
        differing = summary.differing(),
        duration_ms = started.elapsed().as_millis() as u64,
        "diff: rows compared"
    );
    Ok(summary)
}

const SOURCE: DatabaseRole = DatabaseRole::Source;
const TARGET: DatabaseRole = DatabaseRole::Target;

/// Buckets for a table of the larger side's estimated size.
async fn bucket_count(pools: &Pools, mapping: &TableMapping) -> Result<u64> {
    let source = estimate_rows(&**pools.source().await?, &mapping.source).await;
    let target = estimate_rows(&**pools.target().await?, &mapping.target).await;
    let rows = source.unwrap_or(0).max(target.unwrap_or(0));
    Ok((rows / ROWS_PER_BUCKET)
        .clamp(MIN_BUCKETS, MAX_BUCKETS)
        .next_power_of_two())
}

/// How rows are hashed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Hasher {
    /// `hash_record_extended` over the columns (PostgreSQL 14 and later): each value hashed by its
    /// type's own hash function where that compares exactly what rowsync copies ([`EXACT_HASH`]),
    /// else as its text. Three to four times cheaper than rendering whole rows as text. Stable
    /// across versions (hash partitioning depends on that), not across byte orders: chosen only
    /// when both servers hash alike.
    Native,
    /// md5 over the row as text: the same on every server.
    Md5,
}

/// Built-in types whose hash function tells apart exactly the values that differ as rowsync
/// copies them (not numeric, whose hash makes 1.0 and 1.00 alike, nor floats, -0 and 0, nor
/// intervals, '1 day' and '24 hours'). Text types are hashed under "C", byte by byte.
const EXACT_HASH: &[&str] = &[
    "pg_catalog.bool",
    "pg_catalog.int2",
    "pg_catalog.int4",
    "pg_catalog.int8",
    "pg_catalog.oid",
    "pg_catalog.text",
    "pg_catalog.varchar",
    "pg_catalog.bpchar",
    "pg_catalog.name",
    "pg_catalog.uuid",
    "pg_catalog.date",
    "pg_catalog.time",
    "pg_catalog.timestamp",
    "pg_catalog.timestamptz",
    "pg_catalog.bytea",
];

const COLLATABLE: &[&str] = &[
    "pg_catalog.text",
    "pg_catalog.varchar",
    "pg_catalog.bpchar",
    "pg_catalog.name",
];

/// Pairs of (source type, target type) whose values the target holds as the source's text cast
/// to its type, where that cast never fails and changes the text (`json` → `jsonb` reorders keys,
/// `timestamp` → `timestamptz` adds the zone): the source's side is hashed as that cast, so such
/// columns compare equal when the target holds what rowsync wrote. Other differing types compare
/// by their text as it stands.
const CAST_ON_SOURCE: &[(&str, &str)] = &[
    ("pg_catalog.json", "pg_catalog.jsonb"),
    ("pg_catalog.timestamp", "pg_catalog.timestamptz"),
    ("pg_catalog.date", "pg_catalog.timestamp"),
    ("pg_catalog.date", "pg_catalog.timestamptz"),
    ("pg_catalog.float4", "pg_catalog.float8"),
    ("pg_catalog.text", "pg_catalog.bpchar"),
    ("pg_catalog.varchar", "pg_catalog.bpchar"),
];

impl Hasher {
    /// The native hash when both servers have it and compute it alike, else md5.
    async fn common(pools: &Pools) -> Result<Self> {
        const PROBE: &str = "SELECT pg_catalog.hash_record_extended(\
                                 ROW('rowsync'::text, 1::int8, '2026-12-02'::date), 0)";
        let source = pools.source().await?.query_one(PROBE, &[]).await;
        let target = pools.target().await?.query_one(PROBE, &[]).await;
        Ok(match (source, target) {
            (Ok(s), Ok(t)) if s.get::<_, i64>(0) == t.get::<_, i64>(0) => Self::Native,
            _ => Self::Md5,
        })
    }

    /// A 64-bit hash of `columns` (with `alias.`) on `side`, the same on both sides for equal
    /// values.
    fn hash<'a>(
        self,
        side: DatabaseRole,
        alias: &str,
        columns: impl Iterator<Item = &'a Column>,
    ) -> String {
        let as_text = |c: &Column| {
            let value = side_ref(side, alias, c);
            let pair = (
                Column::plain_type(&c.source_type),
                Column::plain_type(&c.target_type),
            );
            let cast = side == SOURCE
                && c.transfer == Transfer::Text
                && CAST_ON_SOURCE
                    .iter()
                    .any(|(s, t)| pair.0 == *s && pair.1 == *t);
            let xml = |ty: &str| Column::plain_type(ty) == "pg_catalog.xml";
            if cast {
                format!("{value}::text::{}::text", c.target_type)
            } else if xml(&c.source_type) && xml(&c.target_type) {
                // xml's cast to text keeps an XML declaration that its output (and so what the
                // target receives in binary) drops: compare what both sides output. (Into another
                // type, xml travels as its cast to text, declaration and all.)
                format!("pg_catalog.textin(pg_catalog.xml_out({value}))")
            } else {
                format!("{value}::text")
            }
        };
        match self {
            Self::Native => {
                let values = join(columns.map(|c| {
                    let ty = Column::plain_type(&c.target_type);
                    let exact = c.transfer == Transfer::Binary && EXACT_HASH.contains(&ty.as_str());
                    match (exact, COLLATABLE.contains(&ty.as_str())) {
                        (true, false) => side_ref(side, alias, c),
                        (true, true) => {
                            format!("{} COLLATE pg_catalog.\"C\"", side_ref(side, alias, c))
                        }
                        (false, _) => format!("{} COLLATE pg_catalog.\"C\"", as_text(c)),
                    }
                }));
                format!("pg_catalog.hash_record_extended(ROW({values}), 0)")
            }
            Self::Md5 => {
                let values = join(columns.map(as_text));
                format!(
                    "('x' || pg_catalog.left(pg_catalog.md5(ROW({values})::text), 16))::bit(64)::int8"
                )
            }
        }
    }
}

/// A column's value in `side`'s table as `alias`: the source's column or computed expression, or
/// the target's column.
/// (A computed value of another built-in type than its column's is compared as the target holds
/// it: cast to the column's type.)
fn side_ref(side: DatabaseRole, alias: &str, column: &Column) -> String {
    match (side, &column.expression, &column.via) {
        (DatabaseRole::Source, Some(expression), Some(_)) => {
            format!("((\n{expression}\n)::{})", column.target_type)
        }
        (DatabaseRole::Source, _, _) => column.source_ref(alias),
        (DatabaseRole::Target, _, _) => column.target_ref(alias),
    }
}

/// The queries for one side.
struct SideSql {
    /// Step 1: `(bucket int4, rows int8, digest text)`.
    buckets: String,
    /// Step 2, `$1` the bitmap of buckets: `(key hash int8, row hash int8, key text)` by key hash.
    rows: String,
    /// Re-check, `$1` keys (jsonb as text[]): `(position int8, row hash int8)` of those present.
    lookup: String,
    /// On the source, `$1` keys as for `lookup`: `(position int8, 0)` of those in the journal.
    journaled: Option<String>,
}

impl SideSql {
    fn new(mapping: &TableMapping, side: DatabaseRole, buckets: u64, hasher: Hasher) -> Self {
        let table = match side {
            DatabaseRole::Source => &mapping.source,
            DatabaseRole::Target => &mapping.target,
        };
        let qualified = |alias: &str, columns: &mut dyn Iterator<Item = String>| {
            join(columns.map(|c| format!("{alias}.{c}")))
        };
        let keys = join(mapping.key_columns().map(|c| side_ref(side, "t", c)));
        // The source's rows are those the filter keeps.
        let filter = match side {
            DatabaseRole::Source => mapping.and_filter(),
            DatabaseRole::Target => String::new(),
        };
        // bit_xor (PostgreSQL 14, as the native hash) keeps a fixed-size state per bucket, which
        // makes the aggregate a third cheaper than sum's numeric one.
        let digest = match hasher {
            Hasher::Native => "pg_catalog.bit_xor",
            Hasher::Md5 => "pg_catalog.sum",
        };
        let key_hash = hasher.hash(side, "t", mapping.key_columns());
        let row_hash = hasher.hash(side, "t", mapping.columns.iter());
        let key_json = format!(
            "pg_catalog.jsonb_build_object({})::text",
            join(mapping.key_columns().map(|c| format!(
                "{}, {}",
                literal(&c.name),
                side_ref(side, "t", c)
            )))
        );
        let mask = buckets - 1;
        let table = table.quoted();
        let p_keys = qualified("p", &mut mapping.key_columns().map(|c| c.quoted()));
        let key_record = key_record(mapping, "r.key::jsonb", "p", side);
        Self {
            // OFFSET 0: the hashes are computed once per row, below the aggregate.
            buckets: format!(
                "SELECT b, count(*), {digest}(h)::text \
                   FROM (SELECT ({key_hash} & {mask})::int4 AS b, {row_hash} AS h \
                           FROM {table} t WHERE true{filter} OFFSET 0) s \
                  GROUP BY b"
            ),
            rows: format!(
                "SELECT {key_hash}, {row_hash}, {key_json} FROM {table} t \
                  WHERE pg_catalog.get_bit($1::bytea, ({key_hash} & {mask})::int4) = 1{filter} \
                  ORDER BY 1"
            ),
            lookup: format!(
                "SELECT r.o, x.h \
                   FROM unnest($1::text[]) WITH ORDINALITY AS r(key, o) \
                  CROSS JOIN LATERAL {key_record} \
                  CROSS JOIN LATERAL (SELECT {row_hash} AS h FROM {table} t \
                                       WHERE ({keys}) = ({p_keys}){filter} OFFSET 0) x"
            ),
            journaled: mapping
                .journal
                .as_ref()
                .filter(|_| side == SOURCE)
                .map(|journal| {
                    // The journal's keys compare as the source's columns do (a key `COLLATE "C"`).
                    let journal_keys = join(mapping.key_columns().map(|k| match &k.collation {
                        Some(collation) => format!("j.{} COLLATE {collation}", k.quoted()),
                        None => format!("j.{}", k.quoted()),
                    }));
                    format!(
                        "SELECT DISTINCT r.o, 0::int8 \
                       FROM unnest($1::text[]) WITH ORDINALITY AS r(key, o) \
                      CROSS JOIN LATERAL {key_record} \
                       JOIN {journal} j ON ({journal_keys}) = ({p_keys})",
                        journal = journal.quoted(),
                    )
                }),
        }
    }
}

/// A string literal for SQL text (column names inside jsonb_build_object).
fn literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

type Params = Vec<Box<dyn ToSql + Send + Sync>>;

/// A chunk of rows from a side, `None` once it has sent them all (a channel that closes without
/// it means the reader failed).
type Chunk = Result<Option<Vec<Row>>>;

/// Runs `sql` on a session of `role` in a read-only REPEATABLE READ transaction of its own, in a
/// task of its own, sending its rows in chunks. At most two chunks wait to be taken.
async fn read(
    pools: &Pools,
    role: DatabaseRole,
    sql: &str,
    params: Params,
    background: bool,
) -> Result<Reader> {
    let (sender, receiver) = mpsc::channel::<Chunk>(2);
    // Out of the pool for good: a reader given up on ends its session with it, and the server
    // stops the query within a second (client_connection_check_interval, PostgreSQL 14+) rather
    // than finish a scan nobody reads.
    let mut session = Object::take(session(pools, role).await?);
    let sql = sql.to_string();
    let task = tokio::spawn(async move {
        let result: Result<()> = async {
            let tx = session
                .build_transaction()
                .isolation_level(IsolationLevel::RepeatableRead)
                .read_only(true)
                .start()
                .await
                .context(role, || "starting to read for a diff".into())?;
            tx.batch_execute(PRELUDE)
                .await
                .context(role, || "preparing a diff session".into())?;
            tx.batch_execute(
                "SELECT pg_catalog.set_config('client_connection_check_interval', '1000', true) \
                  WHERE pg_catalog.current_setting('server_version_num')::int >= 140000",
            )
            .await
            .context(role, || "preparing a diff session".into())?;
            if background {
                tx.batch_execute("SET LOCAL max_parallel_workers_per_gather = 0")
                    .await
                    .context(role, || "preparing a diff session".into())?;
            }
            let refs: Vec<&(dyn ToSql + Sync)> = params
                .iter()
                .map(|p| p.as_ref() as &(dyn ToSql + Sync))
                .collect();
            let portal = tx
                .bind(sql.as_str(), &refs)
                .await
                .context(role, || "hashing rows".into())?;
            loop {
                let rows = tx
                    .query_portal(&portal, FETCH_ROWS)
                    .await
                    .context(role, || "hashing rows".into())?;
                let last = rows.len() < FETCH_ROWS as usize;
                if !rows.is_empty() && sender.send(Ok(Some(rows))).await.is_err() {
                    return Ok(()); // The diff gave up.
                }
                if last {
                    break;
                }
            }
            tx.commit()
                .await
                .context(role, || "ending a diff's read".into())?;
            let _ = sender.send(Ok(None)).await;
            Ok(())
        }
        .await;
        if let Err(err) = result {
            let _ = sender.send(Err(err)).await;
        }
    });
    Ok(Reader { receiver, task })
}

/// A pooled session of `role`'s database.
async fn session(pools: &Pools, role: DatabaseRole) -> Result<Object> {
    match role {
        DatabaseRole::Source => pools.source().await,
        DatabaseRole::Target => pools.target().await,
    }
}

/// A side's reader: its chunks, and its task, stopped when the reader is dropped.
struct Reader {
    receiver: mpsc::Receiver<Chunk>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Reader {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// One side's rows, decoded as they arrive, with one of lookahead.
struct Cursor<T> {
    chunks: Reader,
    rows: std::vec::IntoIter<Row>,
    head: Option<T>,
    decode: fn(&Row) -> T,
    done: bool,
}

impl<T> Cursor<T> {
    fn new(chunks: Reader, decode: fn(&Row) -> T) -> Self {
        Self {
            chunks,
            rows: Vec::new().into_iter(),
            head: None,
            decode,
            done: false,
        }
    }

    async fn peek(&mut self) -> Result<Option<&T>> {
        if self.head.is_none() {
            self.head = self.fetch().await?;
        }
        Ok(self.head.as_ref())
    }

    async fn next(&mut self) -> Result<Option<T>> {
        match self.head.take() {
            Some(head) => Ok(Some(head)),
            None => self.fetch().await,
        }
    }

    /// The row [`Cursor::peek`] showed.
    fn take(&mut self) -> T {
        self.head
            .take()
            .expect("take follows a peek that found a row")
    }

    async fn fetch(&mut self) -> Result<Option<T>> {
        loop {
            if let Some(row) = self.rows.next() {
                return Ok(Some((self.decode)(&row)));
            }
            if self.done {
                return Ok(None);
            }
            match self.chunks.receiver.recv().await {
                Some(Ok(Some(rows))) => self.rows = rows.into_iter(),
                Some(Ok(None)) => self.done = true,
                Some(Err(err)) => return Err(err),
                None => {
                    return Err(Error::Io {
                        action: "reading rows for a diff".into(),
                        source: std::io::Error::other("the reader stopped before its last row"),
                    });
                }
            }
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
struct Bucket {
    bucket: i32,
    rows: i64,
    /// The xor or the sum of the rows' hashes (a sum of up to 2^63 of them fits).
    digest: i128,
}

impl Bucket {
    fn from_row(row: &Row) -> Self {
        Self {
            bucket: row.get(0),
            rows: row.get(1),
            // An aggregate of int8 always parses; were it not to, the bucket differs.
            digest: row.get::<_, &str>(2).parse().unwrap_or_else(|_| {
                tracing::warn!("a bucket's digest did not parse; it counts as differing");
                i128::MIN + i128::from(row.get::<_, i32>(0))
            }),
        }
    }
}

#[derive(Debug)]
struct Keyed {
    key_hash: i64,
    row_hash: i64,
    key: String,
}

impl Keyed {
    fn from_row(row: &Row) -> Self {
        Self {
            key_hash: row.get(0),
            row_hash: row.get(1),
            key: row.get(2),
        }
    }
}

impl Cursor<Keyed> {
    /// Every next row whose key hash is `hash` (almost always one, or none).
    async fn take_while(&mut self, hash: i64) -> Result<Vec<Keyed>> {
        let mut taken = Vec::new();
        while self.peek().await?.is_some_and(|k| k.key_hash == hash) {
            taken.push(self.take());
        }
        Ok(taken)
    }
}

/// A difference as last seen: the row hash on each side (None: no row).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Candidate {
    key: String,
    seen: (Option<i64>, Option<i64>),
}

impl Candidate {
    /// How the two sides differ (None: they do not).
    fn kind(&self) -> Option<Kind> {
        match self.seen {
            (Some(a), Some(b)) if a == b => None,
            (None, None) => None,
            (Some(_), Some(_)) => Some(Kind::Different),
            (Some(_), None) => Some(Kind::Missing),
            (None, Some(_)) => Some(Kind::Extra),
        }
    }

    fn difference(self) -> Option<Difference> {
        Some(Difference {
            kind: self.kind()?,
            key: self.key,
        })
    }
}

/// The rows of one key hash on each side that differ (matched by key).
fn compare(source: Vec<Keyed>, mut target: Vec<Keyed>) -> Vec<Candidate> {
    // One row each side (all but never otherwise): the same key, even where the sides' key types
    // render it differently as JSON (`timestamp` and `timestamptz`).
    if let ([ours], [theirs]) = (&source[..], &target[..]) {
        if ours.row_hash == theirs.row_hash {
            return Vec::new();
        }
        return vec![Candidate {
            key: ours.key.clone(),
            seen: (Some(ours.row_hash), Some(theirs.row_hash)),
        }];
    }
    let mut candidates = Vec::new();
    for ours in source {
        let theirs = target
            .iter()
            .position(|theirs| theirs.key == ours.key)
            .map(|i| target.swap_remove(i).row_hash);
        if theirs != Some(ours.row_hash) {
            candidates.push(Candidate {
                key: ours.key,
                seen: (Some(ours.row_hash), theirs),
            });
        }
    }
    candidates.extend(target.into_iter().map(|theirs| Candidate {
        key: theirs.key,
        seen: (None, Some(theirs.row_hash)),
    }));
    candidates
}

/// Differences found by the scans, waiting to be checked again.
struct Recheck<'a> {
    pools: &'a Pools,
    source: &'a SideSql,
    target: &'a SideSql,
    checks: Checks,
    window: Vec<Candidate>,
    /// Rows that moved or wait in the journal: checked again after the scans (which then hold
    /// no snapshot open), a pause apart.
    deferred: Vec<Candidate>,
}

impl Recheck<'_> {
    fn push(&mut self, candidate: Candidate) {
        self.window.push(candidate);
    }

    /// Checks the window's differences again, at once (most rows in flight during the scans have
    /// landed by then), and hands on those that stand: a row that still differs, that neither
    /// side changed since the scan, and whose key had no change waiting in the journal just
    /// before: nothing is on its way to fix it. The others wait for [`Recheck::finish`].
    async fn flush(&mut self, summary: &mut Summary, sink: &mut impl Sink) -> Result<()> {
        let window = std::mem::take(&mut self.window);
        if self.checks.attempts <= 1 {
            return hand_on(window, summary, sink).await;
        }
        let (standing, moving) = self.round(window).await?;
        self.deferred.extend(moving);
        hand_on(standing, summary, sink).await
    }

    /// Checks the deferred rows again a pause apart, up to `attempts` checks in all; what still
    /// differs then stands as it is.
    async fn finish(&mut self, summary: &mut Summary, sink: &mut impl Sink) -> Result<()> {
        for _ in 2..self.checks.attempts {
            if self.deferred.is_empty() {
                return Ok(());
            }
            tokio::time::sleep(self.checks.pause).await;
            let mut moving = Vec::new();
            for window in std::mem::take(&mut self.deferred).chunks(WINDOW) {
                let (standing, moved) = self.round(window.to_vec()).await?;
                moving.extend(moved);
                hand_on(standing, summary, sink).await?;
            }
            self.deferred = moving;
        }
        hand_on(std::mem::take(&mut self.deferred), summary, sink).await
    }

    /// One check of `candidates`: (those that stand, those to check again). The journal is read
    /// before the rows: a change whose journal row is gone by then is in the target already.
    async fn round(&self, candidates: Vec<Candidate>) -> Result<(Vec<Candidate>, Vec<Candidate>)> {
        let waiting: HashSet<String> = journaled(self.pools, self.source, &candidates)
            .await?
            .into_iter()
            .zip(&candidates)
            .filter(|(waiting, _)| *waiting)
            .map(|(_, c)| c.key.clone())
            .collect();
        let before: HashSet<Candidate> = candidates.iter().cloned().collect();
        let now = check(self.pools, self.source, self.target, candidates).await?;
        Ok(now
            .into_iter()
            .partition(|c| before.contains(c) && !waiting.contains(&c.key)))
    }
}

/// Counts `candidates` that differ and hands them to `sink`.
async fn hand_on(
    candidates: Vec<Candidate>,
    summary: &mut Summary,
    sink: &mut impl Sink,
) -> Result<()> {
    let differences: Vec<Difference> = candidates
        .into_iter()
        .filter_map(Candidate::difference)
        .collect();
    if differences.is_empty() {
        return Ok(());
    }
    for difference in &differences {
        summary.count(difference.kind);
    }
    sink.found(differences).await
}

/// The candidates that still differ, as they are now.
async fn check(
    pools: &Pools,
    source: &SideSql,
    target: &SideSql,
    candidates: Vec<Candidate>,
) -> Result<Vec<Candidate>> {
    let keys: Vec<&str> = candidates.iter().map(|c| c.key.as_str()).collect();
    let (ours, theirs) = tokio::try_join!(
        lookup(pools, SOURCE, &source.lookup, &keys),
        lookup(pools, TARGET, &target.lookup, &keys),
    )?;
    Ok(candidates
        .into_iter()
        .zip(ours.into_iter().zip(theirs))
        .map(|(candidate, seen)| Candidate { seen, ..candidate })
        .filter(|candidate| candidate.kind().is_some())
        .collect())
}

/// Which candidates' keys have rows in the source's journal: a change on its way.
async fn journaled(pools: &Pools, source: &SideSql, candidates: &[Candidate]) -> Result<Vec<bool>> {
    let (Some(sql), false) = (&source.journaled, candidates.is_empty()) else {
        return Ok(vec![false; candidates.len()]);
    };
    let keys: Vec<&str> = candidates.iter().map(|c| c.key.as_str()).collect();
    Ok(lookup(pools, SOURCE, sql, &keys)
        .await?
        .into_iter()
        .map(|found| found.is_some())
        .collect())
}

/// Checks differences of one table again by key: its lookups, prepared once for any number of
/// windows (`rowsync repair` checks every repaired row after applying them).
pub(crate) struct KeyCheck {
    source: SideSql,
    target: SideSql,
}

impl KeyCheck {
    pub(crate) async fn new(pools: &Pools, mapping: &TableMapping) -> Result<Self> {
        let hasher = Hasher::common(pools).await?;
        Ok(Self {
            source: SideSql::new(mapping, SOURCE, MIN_BUCKETS, hasher),
            target: SideSql::new(mapping, TARGET, MIN_BUCKETS, hasher),
        })
    }

    /// Which of `differences` still stand: checked at once, then again a pause apart while any
    /// do, up to `checks.attempts` times in all (writes may be in flight).
    pub(crate) async fn still_differing(
        &self,
        pools: &Pools,
        differences: Vec<Difference>,
        checks: Checks,
    ) -> Result<Vec<Difference>> {
        let mut candidates: Vec<Candidate> = differences
            .into_iter()
            .map(|d| Candidate {
                key: d.key,
                seen: (None, None),
            })
            .collect();
        for attempt in 0..checks.attempts.max(1) {
            if candidates.is_empty() {
                break;
            }
            if attempt > 0 {
                tokio::time::sleep(checks.pause).await;
            }
            candidates = check(pools, &self.source, &self.target, candidates).await?;
        }
        Ok(candidates
            .into_iter()
            .filter_map(Candidate::difference)
            .collect())
    }
}

/// The row hash of each key on one side (None where the key has no row), by `sql` (a query of
/// `(position, hash)` over `$1`, the keys). A key this side's type cannot hold (an extra target
/// row whose key the source's type cannot store) has no row here: when the keys together fail to
/// convert, they are looked up one by one.
async fn lookup(
    pools: &Pools,
    role: DatabaseRole,
    sql: &str,
    keys: &[&str],
) -> Result<Vec<Option<i64>>> {
    let mut session = session(pools, role).await?;
    let mut hashes = vec![None; keys.len()];
    match positions(&mut session, sql, keys).await {
        Ok(found) => {
            for (position, hash) in found {
                if let Some(slot) = usize::try_from(position - 1)
                    .ok()
                    .and_then(|i| hashes.get_mut(i))
                {
                    *slot = Some(hash);
                }
            }
        }
        Err(err) if is_data_error(&err) => {
            for (slot, key) in hashes.iter_mut().zip(keys) {
                match positions(&mut session, sql, &[key]).await {
                    Ok(found) => *slot = found.first().map(|(_, hash)| *hash),
                    Err(err) if is_data_error(&err) => {}
                    Err(err) => {
                        return Err(err).context(role, || "re-checking differing rows".into());
                    }
                }
            }
        }
        Err(err) => return Err(err).context(role, || "re-checking differing rows".into()),
    }
    Ok(hashes)
}

/// `sql`'s `(position, hash)` rows for `keys`, in a transaction of its own.
async fn positions(
    session: &mut Object,
    sql: &str,
    keys: &[&str],
) -> Result<Vec<(i64, i64)>, tokio_postgres::Error> {
    let tx = session.transaction().await?;
    tx.batch_execute(PRELUDE).await?;
    let rows = tx.query(sql, &[&keys]).await?;
    tx.commit().await?;
    Ok(rows.iter().map(|row| (row.get(0), row.get(1))).collect())
}

/// A value that does not fit a type (SQLSTATE class 22: out of range, invalid text, …).
pub(crate) fn is_data_error(err: &tokio_postgres::Error) -> bool {
    err.code().is_some_and(|code| code.code().starts_with("22"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keyed(key: &str, row_hash: i64) -> Keyed {
        Keyed {
            key_hash: 1,
            row_hash,
            key: key.into(),
        }
    }

    #[test]
    fn compare_matches_rows_by_key_within_a_hash() {
        let found: Vec<Difference> = compare(
            vec![keyed("a", 1), keyed("b", 2), keyed("c", 3)],
            vec![keyed("c", 3), keyed("b", 9), keyed("d", 4)],
        )
        .into_iter()
        .filter_map(Candidate::difference)
        .collect();
        assert_eq!(
            found,
            vec![
                Difference {
                    kind: Kind::Missing,
                    key: "a".into()
                },
                Difference {
                    kind: Kind::Different,
                    key: "b".into()
                },
                Difference {
                    kind: Kind::Extra,
                    key: "d".into()
                },
            ]
        );
    }

    #[test]
    fn literals_double_single_quotes() {
        assert_eq!(literal("it's"), "'it''s'");
    }
}
