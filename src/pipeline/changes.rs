//! Reading a batch of changes from the source: which keys changed, and their rows now.
//!
//! A batch is every key journaled by a transaction that is visible in the current snapshot but was
//! not visible in the previous one (PgQ's rule): `txid >= xmax(prev)`, or `txid` listed in
//! `xip(prev)` (in progress then), and visible now. Every committed transaction becomes visible in
//! exactly one snapshot, so it lands in exactly one batch however long it ran; an aborted one never
//! appears. A sweep adds the keys of rows whose `updated_at` falls in the lookback window, and keys
//! whose earlier apply failed (to retry them).
//!
//! The query runs in the same REPEATABLE READ transaction that took the snapshot, and joins each key
//! to its current source row: present means upsert it, absent means delete it. Applying the current
//! state (not the journaled event) makes apply idempotent and independent of commit order, and
//! several changes of one key collapse into one write.

use crate::catalog::ident::quote;
use crate::catalog::mapping::{Column, Journal, TableMapping, join, key_record};
use crate::config::DatabaseRole;

/// Where things are in a row of the change query.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Layout {
    keys: usize,
}

impl Layout {
    /// `bool`: the key still exists in the source (upsert) or not (delete).
    pub(crate) const PRESENT: usize = 0;
    /// `jsonb`: the key as an object, `{"id": …}`, for error records and retries.
    pub(crate) const KEY_JSON: usize = 1;

    pub(crate) fn new(mapping: &TableMapping) -> Self {
        Self {
            keys: mapping.key.len(),
        }
    }

    /// Key column `i` (in primary-key order), taken from the journal, so it is there for deletes.
    pub(crate) fn key(&self, i: usize) -> usize {
        2 + i
    }

    /// Synced column `j` (in mapping order), from the current source row.
    pub(crate) fn column(&self, j: usize) -> usize {
        2 + self.keys + j
    }
}

/// A table's change queries, built once: with and without the rows' keys as JSON, and the cleanup
/// of consumed journal rows.
#[derive(Debug, Clone)]
pub(crate) struct ChangeQueries {
    plain: String,
    keyed: String,
    pub(crate) cleanup: String,
    /// Locks the table and its journal (ACCESS SHARE) before the batch takes its snapshot: a
    /// migration that rewrites either (`ALTER COLUMN … TYPE`, rowsync's own journal adaptation)
    /// must not commit between the snapshot and the read. A rewrite is not MVCC-safe: a snapshot
    /// older than it sees the table empty, and every journaled key would look deleted.
    pub(crate) lock: String,
}

impl ChangeQueries {
    pub(crate) fn new(mapping: &TableMapping, journal: &Journal) -> Self {
        Self {
            plain: change_query(mapping, journal, false),
            keyed: change_query(mapping, journal, true),
            cleanup: journal_cleanup(journal),
            lock: snapshot_lock(mapping, journal),
        }
    }

    /// The change query, with each row's key as JSON when `keyed` (see [`change_query`]).
    pub(crate) fn changes(&self, keyed: bool) -> &str {
        if keyed { &self.keyed } else { &self.plain }
    }
}

/// `LOCK TABLE ONLY <source>, <journal> IN ACCESS SHARE MODE` (see [`ChangeQueries::lock`]).
/// LOCK takes no snapshot itself, so a REPEATABLE READ transaction's snapshot comes after it.
/// ONLY: a rewrite of a partitioned table locks the table itself too, so its partitions need no
/// lock of their own here (a table with hundreds would take hundreds per batch).
pub(crate) fn snapshot_lock(mapping: &TableMapping, journal: &Journal) -> String {
    format!(
        "LOCK TABLE ONLY {}, {} IN ACCESS SHARE MODE",
        mapping.source.quoted(),
        journal.quoted()
    )
}

/// The change query for a table. With `keyed`, each row carries its key as a JSON object
/// ([`Layout::KEY_JSON`]), needed only to record a rejected row or resolve an earlier one; without,
/// that column is NULL and the source saves building it for every change. Parameters:
/// `$1` text: the previous snapshot (`pg_snapshot` as text);
/// `$2` float8, nullable: the sweep's lookback in seconds (NULL outside sweeps);
/// `$3` jsonb[]: keys to retry (objects as in [`Layout::KEY_JSON`]).
pub(crate) fn change_query(mapping: &TableMapping, journal: &Journal, keyed: bool) -> String {
    let keys: Vec<&Column> = mapping.key_columns().collect();
    let (txid, journal) = (journal.txid(), journal.quoted());
    let key_list = mapping.key_list();
    let source = mapping.source.quoted();

    // The snapshots are wrapped in scalar subqueries so that they are parsed and built once per
    // execution: in a generic plan they would otherwise be evaluated for every journal row.
    // The journal's keys compare as the source's columns do (a key `COLLATE "C"`).
    let journal_keys = join(keys.iter().map(|k| match &k.collation {
        Some(collation) => format!("j.{0} COLLATE {collation} AS {0}", k.quoted()),
        None => format!("j.{}", k.quoted()),
    }));
    let mut changed = format!(
        "SELECT {journal_keys} FROM {journal} j \
          WHERE (j.{txid} >= (SELECT pg_catalog.pg_snapshot_xmax($1::text::pg_snapshot)) \
                 OR j.{txid} = ANY (ARRAY(SELECT pg_catalog.pg_snapshot_xip($1::text::pg_snapshot)))) \
            AND pg_catalog.pg_visible_in_snapshot(j.{txid}, (SELECT pg_catalog.pg_current_snapshot()))"
    );
    if let Some(updated_at) = &mapping.updated_at {
        changed.push_str(&format!(
            " UNION SELECT {key_list} FROM {source} \
               WHERE $2::float8 IS NOT NULL \
                 AND {} > now() - pg_catalog.make_interval(secs => $2::float8)",
            quote(updated_at)
        ));
    }
    changed.push_str(&format!(
        " UNION SELECT {} FROM unnest($3::jsonb[]) AS r(key) CROSS JOIN LATERAL {}",
        join(keys.iter().map(|k| format!("p.{}", k.quoted()))),
        key_record(mapping, "r.key", "p", DatabaseRole::Source),
    ));

    let key_json = if keyed {
        format!(
            "pg_catalog.jsonb_build_object({})",
            join(
                keys.iter()
                    .map(|k| format!("{}, c.{}", quote_literal(&k.name), k.quoted()))
            )
        )
    } else {
        "NULL::jsonb".to_string()
    };
    let join_on = keys
        .iter()
        .map(|k| format!("s.{0} = c.{0}", k.quoted()))
        .collect::<Vec<_>>()
        .join(" AND ");
    // LATERAL with OFFSET 0 (which keeps the planner from flattening it back into a plain join):
    // one primary-key lookup per changed key, whatever the estimates. A plain join let it pick a
    // hash join over a scan of the whole table (the journal's statistics are always stale: it is
    // emptied continuously), which cost ~100 µs per change on a 1M-row table. The lookup computes
    // the mapped values and applies the filter over the source row alone: a row the filter
    // leaves out is absent, so it leaves the target.
    let projection = join(
        mapping
            .columns
            .iter()
            .enumerate()
            .map(|(j, c)| format!("{} AS c{j}", c.sent_ref("s"))),
    );
    format!(
        "WITH c AS ({changed}) \
         SELECT t.rowsync_present IS NOT NULL, {key_json}, {key_values}, {columns} \
           FROM c LEFT JOIN LATERAL (SELECT true AS rowsync_present, {projection} FROM {source} s \
                                     WHERE {join_on}{filter} OFFSET 0) t ON true",
        key_values = join(keys.iter().map(|k| k.sent_ref("c"))),
        columns = join((0..mapping.columns.len()).map(|j| format!("t.c{j}"))),
        filter = mapping.and_filter(),
    )
}

/// Every row of the source table, in the change query's layout (all present): the initial copy's
/// careful path, which applies rows like a batch when COPY cannot take them all.
pub(crate) fn full_table_query(mapping: &TableMapping) -> String {
    let keys: Vec<&Column> = mapping.key_columns().collect();
    let key_json = join(
        keys.iter()
            .map(|k| format!("{}, t.{}", quote_literal(&k.name), k.quoted())),
    );
    format!(
        "SELECT true, pg_catalog.jsonb_build_object({key_json}), {key_values}, {columns} \
           FROM {source} t WHERE true{filter}",
        key_values = join(keys.iter().map(|k| k.sent_ref("t"))),
        columns = join(mapping.columns.iter().map(|c| c.sent_ref("t"))),
        source = mapping.source.quoted(),
        filter = mapping.and_filter(),
    )
}

/// Deletes journal rows of every transaction visible in snapshot `$1`: all of them are applied.
/// Runs in the batch's own transaction, whose snapshot is `$1`.
///
/// Also deletes rows whose txid is past every transaction this statement can see: the triggers
/// cannot have written them (a row the statement sees was committed before it started, by a
/// transaction below its snapshot's xmax), so they were written by hand and would never become
/// visible, never be consumed, and keep the journal from ever being emptied.
///
/// `$2` text[]: the applied snapshots of the other mappings of the same source table, which read
/// the same journal (see [`crate::target::progress::others`]): a row goes only once it is visible
/// in every one of them too.
pub(crate) fn journal_cleanup(journal: &Journal) -> String {
    let txid = journal.txid();
    format!(
        "DELETE FROM {journal} \
          WHERE ({txid} < (SELECT pg_catalog.pg_snapshot_xmax($1::text::pg_snapshot)) \
                 AND pg_catalog.pg_visible_in_snapshot({txid}, (SELECT $1::text::pg_snapshot)) \
                 AND ((SELECT pg_catalog.cardinality($2::text[])) = 0 OR {others})) \
             OR {txid} >= (SELECT pg_catalog.pg_snapshot_xmax(pg_catalog.pg_current_snapshot()))",
        journal = journal.quoted(),
        others = applied_by_others(&txid, "$2"),
    )
}

/// The journal row of transaction `txid` (quoted column) is visible in every snapshot of
/// `snapshots` (a `text[]` parameter: the other mappings' applied snapshots, see
/// [`crate::target::progress::others`]): every other mapping of the source has applied it.
pub(crate) fn applied_by_others(txid: &str, snapshots: &str) -> String {
    format!(
        "NOT EXISTS (SELECT 1 FROM unnest({snapshots}::text[]) AS o(snapshot) \
                      WHERE NOT pg_catalog.pg_visible_in_snapshot({txid}, o.snapshot::pg_snapshot))"
    )
}

/// A string literal for SQL text (only used for column names inside jsonb_build_object).
fn quote_literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::ident::QualifiedName;
    use crate::catalog::mapping::Transfer;

    fn journal() -> Journal {
        Journal {
            table: QualifiedName::new("rowsync", "public_users_journal"),
            txid: "txid".into(),
            keys: vec!["id".into()],
        }
    }

    fn mapping() -> TableMapping {
        TableMapping {
            source: QualifiedName::new("public", "users"),
            target: QualifiedName::new("public", "users"),
            journal: Some(journal()),
            columns: vec![
                Column {
                    name: "id".into(),
                    target_name: "id".into(),
                    expression: None,
                    via: None,
                    target_type: "uuid".into(),
                    source_type: "uuid".into(),
                    transfer: Transfer::Binary,
                    identity_always: false,
                    collation: None,
                    target_collation: None,
                },
                Column {
                    name: "it's".into(),
                    target_name: "it's".into(),
                    expression: None,
                    via: None,
                    target_type: "text[]".into(),
                    source_type: "text[]".into(),
                    transfer: Transfer::Text,
                    identity_always: false,
                    collation: None,
                    target_collation: None,
                },
            ],
            key: vec![0],
            filter: None,
            definition: None,
            updated_at: None,
            copy_binary: false,
            target_partitioned: false,
            shapes: Default::default(),
            source_only: vec![],
        }
    }

    #[test]
    fn change_query_quotes_names_and_casts_text_columns() {
        let sql = change_query(&mapping(), &journal(), true);
        assert!(sql.contains(r#"s."it's"::text AS c1"#), "{sql}");
        assert!(sql.contains(r#"'id', c."id""#), "{sql}");
        assert!(!sql.contains("$2"), "no lookback without updated_at: {sql}");
        let plain = change_query(&mapping(), &journal(), false);
        assert!(
            plain.contains("NULL::jsonb") && !plain.contains("jsonb_build_object"),
            "{plain}"
        );
        let layout = Layout::new(&mapping());
        assert_eq!(layout.key(0), 2);
        assert_eq!(layout.column(1), 4);
    }

    #[test]
    fn literals_double_single_quotes() {
        assert_eq!(quote_literal("it's"), "'it''s'");
    }
}
