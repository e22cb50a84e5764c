//! The two statements that write a table's changes into the target, built once per table.

use crate::catalog::mapping::{Column, TableMapping, Transfer, join};

#[derive(Debug, Clone)]
pub(crate) struct ApplyStatements {
    /// Parameters: one array per synced column. Returns one `bool` per written row: true when
    /// inserted, false when updated. Rows whose content is already identical are not written (and
    /// not returned).
    pub upsert: String,
    /// Parameters: one array per key column. Returns the deleted rows' count.
    pub delete: String,
    /// Parameters: one array per key column. Adds the keys to the temporary table
    /// `rowsync_stage_keys` (the initial copy's record of which keys the source has).
    pub stage_keys: String,
    /// Parameters: one array per key column. Locks (`FOR UPDATE SKIP LOCKED`) the target rows of
    /// these keys that nobody else holds, and returns the 1-based positions of the keys whose
    /// target row exists but is locked by another session.
    pub locked: String,
    /// Parameters: as `upsert`'s. Updates the rows that exist in the target, without inserting:
    /// for a row whose insert the target refuses before the conflict is even looked for (a NOT
    /// NULL column rowsync does not write, such as one the source dropped). Returns the updated
    /// rows' count (0: the target has not got the row). None when every column is a key column.
    pub update_only: Option<String>,
}

impl ApplyStatements {
    pub(crate) fn new(mapping: &TableMapping) -> Self {
        Self {
            upsert: upsert(mapping),
            delete: delete(mapping),
            stage_keys: stage_keys(mapping),
            locked: locked(mapping),
            update_only: update_only(mapping),
        }
    }
}

/// `$n::type[]`: binary columns arrive in the target's own type, text columns as text.
fn array_param(n: usize, column: &Column) -> String {
    match column.transfer {
        Transfer::Binary => format!("${n}::{}[]", column.target_type),
        Transfer::Text => format!("${n}::text[]"),
    }
}

fn value_expr(alias: &str, column: &Column) -> String {
    match column.transfer {
        Transfer::Binary => format!("{alias}.{}", column.target_quoted()),
        Transfer::Text => column.cast_text(&format!("{alias}.{}", column.target_quoted())),
    }
}

/// A key value of `alias` as compared with the target's column: under the column's collation.
fn key_expr(alias: &str, column: &Column) -> String {
    let value = value_expr(alias, column);
    match &column.target_collation {
        Some(collation) => format!("{value} COLLATE {collation}"),
        None => value,
    }
}

fn upsert(mapping: &TableMapping) -> String {
    let columns = &mapping.columns;
    let params = join(
        columns
            .iter()
            .enumerate()
            .map(|(i, c)| array_param(i + 1, c)),
    );
    let insert = format!(
        "INSERT INTO {target} AS t ({column_list}) {overriding}\
         SELECT {values} FROM unnest({params}) AS s({column_list}) \
         {conflict}",
        target = mapping.target.quoted(),
        column_list = mapping.target_column_list(),
        overriding = overriding(mapping),
        values = join(columns.iter().map(|c| value_expr("s", c))),
        conflict = on_conflict(mapping),
    );
    if !mapping.target_partitioned {
        // A row the statement inserted has no xmax yet; one it updated has its own.
        return format!("{insert} RETURNING (t.xmax = 0)");
    }
    // A partitioned table's RETURNING cannot read system columns. The outer query sees the table
    // as it was before the statement (one snapshot for all), so a written key it does not find
    // there was created.
    let keys: Vec<&Column> = mapping.key_columns().collect();
    let matches = keys
        .iter()
        .map(|c| format!("b.{0} = w.{0}", c.target_quoted()))
        .collect::<Vec<_>>()
        .join(" AND ");
    format!(
        "WITH w AS ({insert} RETURNING {returned}) \
         SELECT NOT EXISTS (SELECT 1 FROM {target} AS b WHERE {matches}) FROM w",
        returned = join(keys.iter().map(|c| format!("t.{}", c.target_quoted()))),
        target = mapping.target.quoted(),
    )
}

/// `OVERRIDING SYSTEM VALUE ` when the target has `GENERATED ALWAYS AS IDENTITY` columns that the
/// source fills, else nothing.
pub(crate) fn overriding(mapping: &TableMapping) -> &'static str {
    if mapping.columns.iter().any(|c| c.identity_always) {
        "OVERRIDING SYSTEM VALUE "
    } else {
        ""
    }
}

/// `ON CONFLICT (key) DO UPDATE SET … WHERE <content differs>` for an `INSERT INTO … AS t`.
/// The key columns are written too: a key the source changed to a value its type calls equal
/// (a `citext` email's case, numeric `1.0` to `1.00`, float `-0` to `0`) matches the same target
/// row, whose key must take the source's value all the same. Target identity columns that are
/// `GENERATED ALWAYS` are inserted but never updated.
pub(crate) fn on_conflict(mapping: &TableMapping) -> String {
    let written: Vec<&Column> = mapping
        .columns
        .iter()
        .filter(|c| !c.identity_always)
        .collect();
    let key_list = mapping.target_key_list();
    if written.is_empty() {
        return format!("ON CONFLICT ({key_list}) DO NOTHING");
    }
    // record_image_eq compares the stored bytes, so it works for every type (json and point have no
    // equality operator), tells `1.0` from `1.00`, and treats NULL as equal to NULL.
    format!(
        "ON CONFLICT ({key_list}) DO UPDATE SET {} \
         WHERE NOT pg_catalog.record_image_eq(ROW({}), ROW({}))",
        join(
            written
                .iter()
                .map(|c| format!("{0} = EXCLUDED.{0}", c.target_quoted()))
        ),
        join(written.iter().map(|c| format!("t.{}", c.target_quoted()))),
        join(
            written
                .iter()
                .map(|c| format!("EXCLUDED.{}", c.target_quoted()))
        ),
    )
}

fn update_only(mapping: &TableMapping) -> Option<String> {
    let columns = &mapping.columns;
    let non_key: Vec<&Column> = columns
        .iter()
        .enumerate()
        .filter(|(i, c)| !mapping.key.contains(i) && !c.identity_always)
        .map(|(_, c)| c)
        .collect();
    if non_key.is_empty() {
        return None;
    }
    let params = join(
        columns
            .iter()
            .enumerate()
            .map(|(i, c)| array_param(i + 1, c)),
    );
    let matches = mapping
        .key_columns()
        .map(|k| format!("t.{} = {}", k.target_quoted(), key_expr("s", k)))
        .collect::<Vec<_>>()
        .join(" AND ");
    // (No "unless identical" filter: the count must tell whether the target has the row.)
    Some(format!(
        "UPDATE {target} AS t SET {sets} \
           FROM unnest({params}) AS s({column_list}) \
          WHERE {matches}",
        target = mapping.target.quoted(),
        sets = join(non_key.iter().map(|c| format!(
            "{} = {}",
            c.target_quoted(),
            value_expr("s", c)
        ))),
        column_list = mapping.target_column_list(),
    ))
}

fn delete(mapping: &TableMapping) -> String {
    let keys: Vec<&Column> = mapping.key_columns().collect();
    let params = join(keys.iter().enumerate().map(|(i, c)| array_param(i + 1, c)));
    let matches = keys
        .iter()
        .map(|k| format!("t.{} = {}", k.target_quoted(), key_expr("d", k)))
        .collect::<Vec<_>>()
        .join(" AND ");
    format!(
        "DELETE FROM {target} AS t USING unnest({params}) AS d({key_list}) WHERE {matches}",
        target = mapping.target.quoted(),
        key_list = mapping.target_key_list(),
    )
}

fn stage_keys(mapping: &TableMapping) -> String {
    let keys: Vec<&Column> = mapping.key_columns().collect();
    format!(
        "INSERT INTO rowsync_stage_keys ({key_list}) SELECT {values} FROM unnest({params}) AS d({key_list})",
        key_list = mapping.target_key_list(),
        values = join(keys.iter().map(|k| value_expr("d", k))),
        params = join(keys.iter().enumerate().map(|(i, c)| array_param(i + 1, c))),
    )
}

fn locked(mapping: &TableMapping) -> String {
    let keys: Vec<&Column> = mapping.key_columns().collect();
    let params = join(keys.iter().enumerate().map(|(i, c)| array_param(i + 1, c)));
    let on = |left: &str, right: &str| {
        keys.iter()
            .map(|k| format!("{left}.{} = {}", k.target_quoted(), key_expr(right, k)))
            .collect::<Vec<_>>()
            .join(" AND ")
    };
    format!(
        "WITH d AS (SELECT * FROM unnest({params}) WITH ORDINALITY AS d({key_list}, rowsync_n)), \
              mine AS (SELECT {mine_keys} FROM {target} t JOIN d ON {t_d} FOR UPDATE OF t SKIP LOCKED) \
         SELECT d.rowsync_n FROM d JOIN {target} t ON {t_d} \
          WHERE NOT EXISTS (SELECT 1 FROM mine m WHERE {m_t})",
        target = mapping.target.quoted(),
        key_list = mapping.target_key_list(),
        mine_keys = join(keys.iter().map(|k| format!("t.{}", k.target_quoted()))),
        t_d = on("t", "d"),
        m_t = keys
            .iter()
            .map(|k| format!("m.{0} = t.{0}", k.target_quoted()))
            .collect::<Vec<_>>()
            .join(" AND "),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::ident::QualifiedName;

    fn mapping(columns: &[(&str, &str, Transfer)], key: Vec<usize>) -> TableMapping {
        TableMapping {
            source: QualifiedName::new("public", "t"),
            target: QualifiedName::new("chat", "t"),
            journal: None,
            columns: columns
                .iter()
                .map(|(name, ty, transfer)| Column {
                    name: name.to_string(),
                    target_name: name.to_string(),
                    expression: None,
                    via: None,
                    target_type: ty.to_string(),
                    source_type: ty.to_string(),
                    transfer: *transfer,
                    identity_always: false,
                    collation: None,
                    target_collation: None,
                })
                .collect(),
            key,
            filter: None,
            definition: None,
            updated_at: None,
            copy_binary: true,
            target_partitioned: false,
            shapes: Default::default(),
            source_only: vec![],
        }
    }

    #[test]
    fn upsert_skips_identical_rows_and_casts_text_columns() {
        let m = mapping(
            &[
                ("id", "uuid", Transfer::Binary),
                ("Name", "text", Transfer::Binary),
                ("tags", "text[]", Transfer::Text),
            ],
            vec![0],
        );
        let sql = ApplyStatements::new(&m).upsert;
        assert!(
            sql.starts_with(r#"INSERT INTO "chat"."t" AS t ("id", "Name", "tags")"#),
            "{sql}"
        );
        assert!(
            sql.contains(r#"unnest($1::uuid[], $2::text[], $3::text[])"#),
            "{sql}"
        );
        assert!(sql.contains(r#"s."tags"::text[]"#), "{sql}");
        assert!(
            sql.contains(
                r#"ON CONFLICT ("id") DO UPDATE SET "id" = EXCLUDED."id", "Name" = EXCLUDED."Name""#
            ),
            "{sql}"
        );
        assert!(
            sql.contains(
                r#"record_image_eq(ROW(t."id", t."Name", t."tags"), ROW(EXCLUDED."id", EXCLUDED."Name", EXCLUDED."tags"))"#
            ),
            "{sql}"
        );
    }

    #[test]
    fn key_only_tables_write_their_keys_on_conflict() {
        let m = mapping(
            &[
                ("a", "integer", Transfer::Binary),
                ("b", "text", Transfer::Binary),
            ],
            vec![1, 0],
        );
        let statements = ApplyStatements::new(&m);
        assert!(
            statements.upsert.contains(
                r#"ON CONFLICT ("b", "a") DO UPDATE SET "a" = EXCLUDED."a", "b" = EXCLUDED."b""#
            ),
            "{}",
            statements.upsert
        );
        assert_eq!(
            statements.delete,
            r#"DELETE FROM "chat"."t" AS t USING unnest($1::text[], $2::integer[]) AS d("b", "a") WHERE t."b" = d."b" AND t."a" = d."a""#
        );
    }

    #[test]
    fn target_statements_use_the_target_names() {
        let mut m = mapping(
            &[
                ("id", "integer", Transfer::Binary),
                ("first_name", "text", Transfer::Binary),
            ],
            vec![0],
        );
        m.columns[0].target_name = "user_id".into();
        m.columns[1].target_name = "given_name".into();
        let statements = ApplyStatements::new(&m);
        assert!(
            statements.upsert.contains(
                r#"("user_id", "given_name") SELECT s."user_id", s."given_name" FROM unnest($1::integer[], $2::text[]) AS s("user_id", "given_name") ON CONFLICT ("user_id")"#
            ),
            "{}",
            statements.upsert
        );
        for sql in [
            &statements.delete,
            &statements.locked,
            &statements.stage_keys,
        ] {
            assert!(
                sql.contains(r#""user_id""#) && !sql.contains(r#""id""#),
                "{sql}"
            );
        }
    }
}
