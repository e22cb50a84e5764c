//! Catalog introspection: how one source table maps onto its target table.
//!
//! Columns synced are those present in both tables with the same name (generated columns in the
//! target excluded: they compute themselves). The key is the source's primary key, which must be
//! covered by a unique index in the target (the `ON CONFLICT` arbiter). Values travel in binary,
//! untouched, when both sides use the same built-in type; otherwise as text, cast to the target's
//! type by the target, so any pair of compatible types (varchar → text, int4 → int8, enum → enum of
//! the same labels) works.

use tokio_postgres::GenericClient;

mod spec;

use crate::catalog::ident::{QualifiedName, TableRef, quote};
use crate::config::{DatabaseRole, TableSpec};
use crate::error::{Error, Result, SqlContext};

/// Type OIDs below this are built into PostgreSQL and identical in every database.
const FIRST_NORMAL_OBJECT_ID: u32 = 16384;

/// Name of the source column a sweep's lookback uses, when the table has one.
pub(crate) const UPDATED_AT: &str = "updated_at";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Transfer {
    /// Same built-in, non-array type on both sides: the binary value is passed through as is.
    Binary,
    /// Read as text from the source, cast to the target's type by the target.
    Text,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Column {
    /// The source column's name (a computed column's: its target name, never read from the
    /// source). Keys keep it in the journal and in their JSON form (`{"id": 7}`) on both sides.
    pub name: String,
    /// The target column's name: `name`, unless renamed.
    pub target_name: String,
    /// A computed column: SQL over the source row (see [`Column::source_ref`]).
    pub expression: Option<String>,
    /// A computed column whose built-in type is not the target column's: the type its text is
    /// read as on the target before the cast to the column's (`pg_catalog.numeric` into an
    /// `integer` column rounds as an assignment would). The cast happens on the target, so a
    /// value that does not fit fails that row alone (isolated and recorded), never the read.
    pub via: Option<String>,
    /// The target's type by its catalog name, schema-qualified and without a modifier
    /// (`pg_catalog.bpchar`, `pg_catalog._varchar`, `app.mood`), for casts. Not SQL's spelling
    /// (`character`, `bit`): those mean `character(1)` and `bit(1)`, and a cast to them cuts
    /// values. Without a modifier nothing is cut; the assignment to the column then applies the
    /// column's own (`char(3)`, `bit(8)`, `numeric(10,2)`), and a value that does not fit is an
    /// error (the row is isolated and recorded), never silently truncated.
    pub target_type: String,
    /// The source's type, likewise (`pg_catalog.int4`): keys sent back to the source are cast to
    /// it.
    pub source_type: String,
    pub transfer: Transfer,
    /// The target column is `GENERATED ALWAYS AS IDENTITY`: inserted with `OVERRIDING SYSTEM
    /// VALUE`, and never updated (PostgreSQL allows updating it only to DEFAULT).
    pub identity_always: bool,
    /// The source column's collation when it is not its type's default (`pg_catalog."C"`): the
    /// journal's copy of a key must compare the same way.
    pub collation: Option<String>,
    /// The target column's, likewise: the keys rowsync sends are compared under it.
    pub target_collation: Option<String>,
}

impl Column {
    /// The quoted source name (journal columns and key JSON use it too).
    pub(crate) fn quoted(&self) -> String {
        quote(&self.name)
    }

    /// The quoted target name.
    pub(crate) fn target_quoted(&self) -> String {
        quote(&self.target_name)
    }

    /// The column's value in a query whose only FROM item is the source table as `alias`:
    /// `alias."name"`, or a computed column's expression, in parentheses and on lines of its own
    /// (a `--` comment in it ends there), cast to what the target takes.
    pub(crate) fn source_ref(&self, alias: &str) -> String {
        match &self.expression {
            Some(expression) => match self.transfer {
                Transfer::Binary => format!("((\n{expression}\n)::{})", self.source_type),
                Transfer::Text => format!("((\n{expression}\n)::pg_catalog.text)"),
            },
            None => format!("{alias}.{}", self.quoted()),
        }
    }

    /// The column's value as rowsync sends it to the target, in every path (the copy, the stream,
    /// sweeps, repairs): [`Column::source_ref`], and for a [`Transfer::Text`] column its text by
    /// SQL's cast (`true`, `10.0.0.1/32`, a `char(n)` without its padding), which is what an
    /// assignment to a text column would store; not the type's output (`t`, `10.0.0.1`), which is
    /// what COPY would write.
    pub(crate) fn sent_ref(&self, alias: &str) -> String {
        let value = self.source_ref(alias);
        match self.transfer {
            Transfer::Text if self.expression.is_none() => format!("{value}::text"),
            _ => value,
        }
    }

    /// What the target takes for this column, from the text `value` a [`Transfer::Text`] column
    /// arrives as: cast to the column's type (through the computed value's own type, if any).
    pub(crate) fn cast_text(&self, value: &str) -> String {
        match &self.via {
            Some(via) => format!("{value}::{via}::{}", self.target_type),
            None => format!("{value}::{}", self.target_type),
        }
    }

    /// The column's value in the target table as `alias`: `alias."target_name"`.
    pub(crate) fn target_ref(&self, alias: &str) -> String {
        format!("{alias}.{}", self.target_quoted())
    }

    /// The type name without quotes (`pg_catalog.varchar`, not `pg_catalog."varchar"`), to
    /// compare with known types.
    pub(crate) fn plain_type(name: &str) -> String {
        name.replace('"', "")
    }
}

/// `jsonb_to_record(<json>) AS <alias>(<key columns with their types on one side>)`: the key
/// columns of a JSON key object (`{"id": 7}`) as typed values, without converting anything else
/// of the row (`jsonb_populate_record` over the table's row type also checks every other column's
/// domain).
pub(crate) fn key_record(
    mapping: &TableMapping,
    json: &str,
    alias: &str,
    role: DatabaseRole,
) -> String {
    let columns = join(mapping.key_columns().map(|c| {
        let ty = match role {
            DatabaseRole::Source => &c.source_type,
            DatabaseRole::Target => &c.target_type,
        };
        format!("{} {ty}", c.quoted())
    }));
    format!("pg_catalog.jsonb_to_record({json}) AS {alias}({columns})")
}

/// Everything needed to read changes of one table from the source and apply them to the target.
#[derive(Debug, Clone)]
pub(crate) struct TableMapping {
    pub source: QualifiedName,
    pub target: QualifiedName,
    /// The source-side journal (None before capture is installed).
    pub journal: Option<Journal>,
    /// Synced columns, in the source's column order.
    pub columns: Vec<Column>,
    /// Positions in `columns` of the key, in primary-key order (or as configured).
    pub key: Vec<usize>,
    /// Only source rows for which this SQL condition holds are in the target.
    pub filter: Option<String>,
    /// The configured mapping as text ([`TableSpec::definition`]), recorded with the progress.
    pub definition: Option<String>,
    /// The source's `updated_at` column, if it has one: sweeps look back over it.
    pub updated_at: Option<String>,
    /// Whether the initial copy can use COPY's binary format (every column the same built-in type).
    pub copy_binary: bool,
    /// Source columns that the target lacks (reported once, not synced).
    pub source_only: Vec<String>,
    /// The target table is partitioned (its RETURNING cannot read system columns).
    pub target_partitioned: bool,
    /// The tables' columns as this mapping was read from them ([`shape`]): when either changes,
    /// the mapping is read again.
    pub shapes: Shapes,
}

/// [`shape`] of the source and the target table.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Shapes {
    pub source: Option<String>,
    pub target: Option<String>,
}

/// What each table's mapping depends on, as text: the table's oid (a table dropped and re-created
/// is another) and each column's position, name, type, modifier, collation, nullability, default
/// and generation; None for a name no table has. One query for any number of tables (a sweep
/// checks them all).
pub(crate) async fn shapes(
    client: &impl GenericClient,
    role: DatabaseRole,
    tables: &[&QualifiedName],
) -> Result<Vec<Option<String>>> {
    let names: Vec<String> = tables.iter().map(|t| t.quoted()).collect();
    let rows = client
        .query(
            "SELECT (SELECT c.oid::text || '|' || coalesce(string_agg( \
                            concat_ws(':', a.attnum, a.attname, a.atttypid, a.atttypmod, \
                                      a.attcollation, a.attnotnull, a.atthasdef, a.attgenerated, \
                                      a.attidentity), \
                            ',' ORDER BY a.attnum), '') \
                       FROM pg_catalog.pg_class c \
                       LEFT JOIN pg_catalog.pg_attribute a \
                         ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped \
                      WHERE c.oid = pg_catalog.to_regclass(t.name) \
                      GROUP BY c.oid) \
               FROM unnest($1::text[]) WITH ORDINALITY AS t(name, position) \
              ORDER BY t.position",
            &[&names],
        )
        .await
        .context(role, || "reading the columns of the synced tables".into())?;
    Ok(rows.iter().map(|row| row.get(0)).collect())
}

impl Shapes {
    /// The shapes of every mapping's tables, in order.
    pub(crate) async fn read_all(
        source: &impl GenericClient,
        target: &impl GenericClient,
        mappings: &[&TableMapping],
    ) -> Result<Vec<Self>> {
        let sources: Vec<&QualifiedName> = mappings.iter().map(|m| &m.source).collect();
        let targets: Vec<&QualifiedName> = mappings.iter().map(|m| &m.target).collect();
        let sources = shapes(source, DatabaseRole::Source, &sources).await?;
        let targets = shapes(target, DatabaseRole::Target, &targets).await?;
        Ok(sources
            .into_iter()
            .zip(targets)
            .map(|(source, target)| Self { source, target })
            .collect())
    }
}

impl TableMapping {
    /// Stable name of the mapping in progress records, sync_errors, metrics and logs: the source's
    /// `schema.table`, or `source → target` when the target table is named otherwise.
    pub(crate) fn name(&self) -> String {
        if self.source == self.target {
            self.source.to_string()
        } else {
            format!("{} → {}", self.source, self.target)
        }
    }

    /// ` AND (<filter>)` for a WHERE clause whose only FROM item is the source table, or nothing.
    pub(crate) fn and_filter(&self) -> String {
        match &self.filter {
            Some(filter) => format!(
                " AND (
{filter}
)"
            ),
            None => String::new(),
        }
    }

    /// `"a", "b"` for the key columns' target names.
    pub(crate) fn target_key_list(&self) -> String {
        join(self.key_columns().map(Column::target_quoted))
    }

    /// `"a", "b", …` for all synced columns' target names.
    pub(crate) fn target_column_list(&self) -> String {
        join(self.columns.iter().map(Column::target_quoted))
    }

    pub(crate) fn key_columns(&self) -> impl Iterator<Item = &Column> {
        self.key.iter().map(|&i| &self.columns[i])
    }

    /// The key columns' source names.
    pub(crate) fn key_names(&self) -> Vec<String> {
        self.key_columns().map(|c| c.name.clone()).collect()
    }

    /// `"a", "b"` for the key columns.
    pub(crate) fn key_list(&self) -> String {
        join(self.key_columns().map(Column::quoted))
    }

    pub(crate) fn journal(&self) -> Result<&Journal> {
        self.journal
            .as_ref()
            .ok_or_else(|| Error::NotSetUp { table: self.name() })
    }

    /// The journal, once it is known to journal this mapping's key: a key chosen (or given up)
    /// since capture was installed needs `rowsync setup`, which captures the table afresh.
    pub(crate) fn journal_for_key(&self) -> Result<&Journal> {
        let journal = self.journal()?;
        let mut journaled = journal.keys.clone();
        let mut key = self.key_names();
        journaled.sort();
        key.sort();
        if journaled != key {
            return Err(Error::Schema {
                table: self.name(),
                problem: format!(
                    "capture journals the key ({}) but the mapping keys rows by ({}); run rowsync \
                     setup (it captures the table for the new key and copies it again)",
                    journal.keys.join(", "),
                    self.key_names().join(", ")
                ),
            });
        }
        Ok(journal)
    }
}

pub(crate) fn join(parts: impl Iterator<Item = String>) -> String {
    parts.collect::<Vec<_>>().join(", ")
}

/// A column as the catalog describes it.
#[derive(Debug, Clone)]
struct CatalogColumn {
    name: String,
    type_oid: u32,
    /// With modifier: `character varying(20)`.
    type_name: String,
    /// Without modifier: `character varying`.
    base_type: String,
    is_array: bool,
    is_base: bool,
    generated: bool,
    identity_always: bool,
    /// Non-default collation, quoted and qualified.
    collation: Option<String>,
    not_null: bool,
}

/// [`load_mapping`] on a session of each pool.
pub(crate) async fn load_mapping_pooled(
    pools: &crate::connection::Pools,
    spec: &TableSpec,
) -> Result<TableMapping> {
    let (source, target) = (pools.source().await?, pools.target().await?);
    load_mapping(&**source, &**target, spec).await
}

/// Resolves `spec`'s tables in both databases and builds its mapping. A problem with what a
/// mapping file configured is a configuration error naming the file and the entry (exit 2).
pub(crate) async fn load_mapping(
    source: &impl GenericClient,
    target: &impl GenericClient,
    spec: &TableSpec,
) -> Result<TableMapping> {
    match (load(source, target, spec).await, &spec.origin) {
        (Err(Error::Schema { problem, .. }), Some(_)) => Err(spec.problem(problem).into()),
        (loaded, _) => loaded,
    }
}

async fn load(
    source: &impl GenericClient,
    target: &impl GenericClient,
    spec: &TableSpec,
) -> Result<TableMapping> {
    let (source_name, source_oid, _) = resolve(source, DatabaseRole::Source, &spec.source).await?;
    let (target_name, target_oid, target_partitioned) =
        resolve(target, DatabaseRole::Target, spec.target_ref()).await?;
    let schema_error = |problem: String| Error::Schema {
        table: source_name.to_string(),
        problem,
    };

    let source_columns = columns(source, DatabaseRole::Source, source_oid).await?;
    let target_columns = columns(target, DatabaseRole::Target, target_oid).await?;
    let tables = spec::Tables {
        spec,
        source: &source_name,
        target: &target_name,
        source_columns: &source_columns,
        target_columns: &target_columns,
    };
    let (mut columns, source_only) = tables.match_columns().map_err(schema_error)?;
    tables.compute(source, target, &mut columns).await?;
    tables.check_filter(source).await?;
    let key_names = match &spec.key {
        Some(key) => {
            let unique = unique_indexes(source, DatabaseRole::Source, source_oid).await?;
            tables.chosen_key(key, &unique).map_err(schema_error)?
        }
        None => primary_key(source, source_oid).await?,
    };
    if key_names.is_empty() {
        let hint = if spec.origin.is_some() {
            "; name the columns of a unique index whose columns are NOT NULL as its key"
        } else {
            ""
        };
        return Err(schema_error(format!(
            "the source table has no primary key; rowsync identifies rows by it{hint}"
        )));
    }
    let mut key = Vec::new();
    for name in &key_names {
        let position = columns
            .iter()
            .position(|c| &c.name == name && c.expression.is_none())
            .ok_or_else(|| {
                schema_error(if spec.compute.contains_key(name) {
                    format!("compute {name}: {name} is a key column, which is synced as it is")
                } else {
                    format!(
                        "key column {name} is missing in the target table {target_name} (or generated there)"
                    )
                })
            })?;
        key.push(position);
    }
    let unique_sets = unique_indexes(target, DatabaseRole::Target, target_oid).await?;
    let mut sorted_key: Vec<String> = key
        .iter()
        .map(|&i| columns[i].target_name.clone())
        .collect();
    sorted_key.sort();
    if !unique_sets.iter().any(|set| set == &sorted_key) {
        return Err(schema_error(format!(
            "the target table {target_name} needs a primary key or unique index on ({}), the source's key",
            key.iter()
                .map(|&i| columns[i].target_name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        )));
    }
    let copy_binary = copy_binary(&source_columns, &target_columns, &columns);
    let journal = journal_of(source, &source_name).await?;
    let mut mapping = TableMapping {
        source: source_name,
        target: target_name,
        journal,
        columns,
        key,
        filter: spec.filter.clone(),
        definition: spec.definition(),
        updated_at: updated_at(&source_columns),
        copy_binary,
        source_only,
        target_partitioned,
        shapes: Shapes::default(),
    };
    mapping.shapes = Shapes::read_all(source, target, &[&mapping])
        .await?
        .pop()
        .unwrap_or_default();
    Ok(mapping)
}

/// Whether the initial copy can use COPY's binary format: every synced column has the same
/// built-in type on both sides (a computed column: is cast to its target column's built-in type).
fn copy_binary(source: &[CatalogColumn], target: &[CatalogColumn], synced: &[Column]) -> bool {
    synced.iter().all(|m| {
        if m.expression.is_some() {
            return m.transfer == Transfer::Binary;
        }
        let (Some(s), Some(t)) = (
            source.iter().find(|c| c.name == m.name),
            target.iter().find(|c| c.name == m.target_name),
        ) else {
            return false;
        };
        s.type_oid < FIRST_NORMAL_OBJECT_ID && t.type_oid == s.type_oid
    })
}

/// The source's `updated_at` column, if it has one of a type a sweep can look back over.
fn updated_at(source: &[CatalogColumn]) -> Option<String> {
    source
        .iter()
        .find(|c| {
            c.name == UPDATED_AT
                && [
                    "timestamp with time zone",
                    "timestamp without time zone",
                    "date",
                ]
                .contains(&c.type_name.as_str())
        })
        .map(|c| c.name.clone())
}

async fn resolve(
    client: &impl GenericClient,
    role: DatabaseRole,
    table: &TableRef,
) -> Result<(QualifiedName, u32, bool)> {
    let row = client
        .query_opt(
            "SELECT n.nspname::text, c.relname::text, c.oid, c.relkind::text, \
                    c.relrowsecurity AND NOT r.rolsuper AND NOT r.rolbypassrls \
                      AND (c.relforcerowsecurity OR NOT pg_catalog.pg_has_role(c.relowner, 'USAGE')), \
                    current_user::text \
               FROM pg_catalog.pg_class c \
               JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
               JOIN pg_catalog.pg_roles r ON r.rolname = current_user \
              WHERE c.oid = pg_catalog.to_regclass($1)",
            &[&table.quoted()],
        )
        .await
        .context(role, || format!("looking up table {table}"))?;
    let Some(row) = row else {
        let problem = match renamed_to(client, role, table).await {
            Some(now) => format!(
                "was renamed to {now} in the {role} database: name it in SYNC_TABLES and reload \
                 rowsync (its capture followed it: its changes are journaled meanwhile)"
            ),
            None => format!("no such table in the {role} database"),
        };
        return Err(Error::Schema {
            table: table.to_string(),
            problem,
        });
    };
    let kind: String = row.get(3);
    let name = QualifiedName::new(row.get::<_, String>(0), row.get::<_, String>(1));
    if kind != "r" && kind != "p" {
        return Err(Error::Schema {
            table: name.to_string(),
            problem: format!("is not a table in the {role} database (relkind {kind})"),
        });
    }
    // Row-level security that applies to rowsync's role would hide rows: hidden rows would look
    // deleted (the source) or stay unwritten (the target). Its sessions run with row_security off,
    // so such a read would fail anyway; say why, and what to grant, before anything runs.
    if row.get::<_, bool>(4) {
        let user: String = row.get(5);
        return Err(Error::RowSecurity {
            table: name.to_string(),
            role,
            user,
        });
    }
    Ok((name, row.get(2), kind == "p"))
}

async fn columns(
    client: &impl GenericClient,
    role: DatabaseRole,
    oid: u32,
) -> Result<Vec<CatalogColumn>> {
    let rows = client
        .query(
            "SELECT a.attname::text, a.atttypid, pg_catalog.format_type(a.atttypid, a.atttypmod), \
                    t.typcategory = 'A', t.typtype = 'b', a.attgenerated <> '', \
                    pg_catalog.quote_ident(tn.nspname) || '.' || pg_catalog.quote_ident(t.typname), \
                    a.attidentity = 'a', \
                    CASE WHEN a.attcollation <> 0 AND a.attcollation <> t.typcollation \
                         THEN pg_catalog.quote_ident(cn.nspname) || '.' || pg_catalog.quote_ident(co.collname) END, \
                    a.attnotnull \
               FROM pg_catalog.pg_attribute a \
               JOIN pg_catalog.pg_type t ON t.oid = a.atttypid \
               JOIN pg_catalog.pg_namespace tn ON tn.oid = t.typnamespace \
               LEFT JOIN pg_catalog.pg_collation co ON co.oid = a.attcollation \
               LEFT JOIN pg_catalog.pg_namespace cn ON cn.oid = co.collnamespace \
              WHERE a.attrelid = $1 AND a.attnum > 0 AND NOT a.attisdropped \
              ORDER BY a.attnum",
            &[&oid],
        )
        .await
        .context(role, || "reading table columns".into())?;
    Ok(rows
        .iter()
        .map(|row| CatalogColumn {
            name: row.get(0),
            type_oid: row.get(1),
            type_name: row.get(2),
            is_array: row.get(3),
            is_base: row.get(4),
            generated: row.get(5),
            base_type: row.get(6),
            identity_always: row.get(7),
            collation: row.get(8),
            not_null: row.get(9),
        })
        .collect())
}

async fn primary_key(client: &impl GenericClient, oid: u32) -> Result<Vec<String>> {
    let rows = client
        .query(
            "SELECT a.attname::text \
               FROM pg_catalog.pg_index i \
              CROSS JOIN LATERAL unnest((i.indkey::int2[])[0:i.indnkeyatts - 1]) WITH ORDINALITY AS k(attnum, ord) \
               JOIN pg_catalog.pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum \
              WHERE i.indrelid = $1 AND i.indisprimary \
              ORDER BY k.ord",
            &[&oid],
        )
        .await
        .context(DatabaseRole::Source, || "reading the primary key".into())?;
    Ok(rows.iter().map(|row| row.get(0)).collect())
}

/// Column sets (sorted) of a table's unique indexes usable as ON CONFLICT arbiters (and as a key).
async fn unique_indexes(
    client: &impl GenericClient,
    role: DatabaseRole,
    oid: u32,
) -> Result<Vec<Vec<String>>> {
    let rows = client
        .query(
            "SELECT array_agg(a.attname::text ORDER BY a.attname) \
               FROM pg_catalog.pg_index i \
              CROSS JOIN LATERAL unnest((i.indkey::int2[])[0:i.indnkeyatts - 1]) AS k(attnum) \
               JOIN pg_catalog.pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum \
              WHERE i.indrelid = $1 AND i.indisunique AND i.indimmediate \
                AND i.indpred IS NULL AND i.indexprs IS NULL \
              GROUP BY i.indexrelid",
            &[&oid],
        )
        .await
        .context(role, || "reading unique indexes".into())?;
    Ok(rows.iter().map(|row| row.get(0)).collect())
}

/// A captured table's journal on the source: `rowsync.<table>_journal (txid, key columns…)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Journal {
    pub table: QualifiedName,
    /// The name of its first column, the writer's transaction id: `txid`, unless the table has a
    /// key column of that name.
    pub txid: String,
    /// Its key columns, as capture journals them.
    pub keys: Vec<String>,
}

impl Journal {
    /// The quoted table name, for SQL text.
    pub(crate) fn quoted(&self) -> String {
        self.table.quoted()
    }

    /// The quoted transaction-id column, for SQL text.
    pub(crate) fn txid(&self) -> String {
        quote(&self.txid)
    }
}

impl std::fmt::Display for Journal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.table.fmt(f)
    }
}

/// Whether the source has rowsync's capture objects (`sql/capture.sql` was installed).
async fn capture_installed(client: &impl GenericClient) -> Result<bool> {
    Ok(client
        .query_one(
            "SELECT pg_catalog.to_regclass('rowsync.captured_tables') IS NOT NULL",
            &[],
        )
        .await
        .context(DatabaseRole::Source, || {
            "looking for rowsync's capture schema".into()
        })?
        .get(0))
}

/// The name a captured source table has now, if it was renamed from `table` (capture records the
/// names it had). None when it was not, or when that cannot be told.
async fn renamed_to(
    client: &impl GenericClient,
    role: DatabaseRole,
    table: &TableRef,
) -> Option<String> {
    if role != DatabaseRole::Source {
        return None;
    }
    if !capture_installed(client).await.ok()? {
        return None;
    }
    // (Through jsonb: captured_tables of an older rowsync has no former_names.)
    let row = client
        .query_opt(
            "SELECT pg_catalog.format('%I.%I', ct.table_schema, ct.table_name) \
               FROM rowsync.captured_tables ct, pg_catalog.to_jsonb(ct) AS j \
              WHERE j -> 'former_names' ? \
                    pg_catalog.format('%I.%I', coalesce($1, pg_catalog.current_schema()), $2::text) \
              LIMIT 1",
            &[&table.schema, &table.name],
        )
        .await
        .ok()??;
    Some(row.get(0))
}

/// The journal of a captured table, from `rowsync.captured_tables` (None when not installed).
async fn journal_of(client: &impl GenericClient, table: &QualifiedName) -> Result<Option<Journal>> {
    if !capture_installed(client).await? {
        return Ok(None);
    }
    let row = client
        .query_opt(
            "SELECT ct.journal_name::text, coalesce(a.attname::text, 'txid'), \
                    ARRAY(SELECT k.attname::text FROM pg_catalog.pg_attribute k \
                           WHERE k.attrelid = a.attrelid AND k.attnum > 1 AND NOT k.attisdropped \
                           ORDER BY k.attnum) \
               FROM rowsync.captured_tables ct \
               LEFT JOIN pg_catalog.pg_attribute a \
                 ON a.attrelid = pg_catalog.to_regclass(pg_catalog.format('rowsync.%I', ct.journal_name)) \
                AND a.attnum = 1 \
              WHERE ct.table_schema = $1 AND ct.table_name = $2",
            &[&table.schema, &table.name],
        )
        .await
        .context(DatabaseRole::Source, || {
            format!("looking up the journal of {table}")
        })?;
    Ok(row.map(|row| Journal {
        table: QualifiedName::new("rowsync", row.get::<_, String>(0)),
        txid: row.get(1),
        keys: row.get(2),
    }))
}
