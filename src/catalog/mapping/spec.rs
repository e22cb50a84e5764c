//! A configured mapping ([`TableSpec`]) checked against both catalogs: which source column goes
//! into which target column, computed columns and their types, the filter and the chosen key.
//!
//! Filters and expressions are the operator's SQL, run on the source by rowsync's own role inside
//! rowsync's queries. [`crate::config`] has made sure each is one self-contained piece (no `;`,
//! balanced parentheses, closed literals and comments); here each is prepared (parsed and planned,
//! never run) on the source as rowsync will run it, so one that does not parse, names a column
//! the table lacks, is not a boolean (a filter), aggregates or returns sets is refused before
//! anything is written.

use tokio_postgres::GenericClient;

use super::{CatalogColumn, Column, FIRST_NORMAL_OBJECT_ID, Transfer};
use crate::catalog::ident::{QualifiedName, quote};
use crate::config::{DatabaseRole, TableSpec};
use crate::error::{Error, Result};

/// The alias of the source table when rowsync checks a filter or an expression. rowsync's own
/// queries use other aliases: the operator's SQL must name columns unqualified.
const ROW: &str = "rowsync_row";

/// A spec and the two tables it maps, as the catalogs describe them.
pub(super) struct Tables<'a> {
    pub spec: &'a TableSpec,
    pub source: &'a QualifiedName,
    pub target: &'a QualifiedName,
    pub source_columns: &'a [CatalogColumn],
    pub target_columns: &'a [CatalogColumn],
}

impl Tables<'_> {
    /// The synced source columns (excluded ones left out, renamed ones into their new name), and
    /// the source columns that the target lacks (not synced, reported once).
    pub(super) fn match_columns(&self) -> Result<(Vec<Column>, Vec<String>), String> {
        let spec = self.spec;
        for name in spec.exclude.iter().chain(spec.rename.keys()) {
            self.source_column(name)?;
        }
        let mut columns: Vec<Column> = Vec::new();
        let mut source_only = Vec::new();
        for column in self.source_columns {
            if spec.exclude.contains(&column.name) {
                continue;
            }
            let renamed = spec.rename.get(&column.name);
            let target_name = renamed.unwrap_or(&column.name);
            // A computed column takes the place of the same-named source column (`email =
            // "lower(email)"`); a renamed one cannot be computed too (checked with the file).
            if renamed.is_none() && spec.compute.contains_key(target_name) {
                continue;
            }
            let target = self.target_columns.iter().find(|t| &t.name == target_name);
            let target = match (target, renamed) {
                (Some(t), _) if !t.generated => t,
                (found, Some(to)) => {
                    let why = if found.is_some() {
                        "is generated"
                    } else {
                        "does not exist"
                    };
                    return Err(format!(
                        "rename {} = {to}: the column {to} of the target table {} {why}",
                        column.name, self.target
                    ));
                }
                (_, None) => {
                    source_only.push(column.name.clone());
                    continue;
                }
            };
            if let Some(other) = columns.iter().find(|c| c.target_name == *target_name) {
                return Err(format!(
                    "target column {target_name} is mapped twice (from source columns {} and {})",
                    other.name, column.name
                ));
            }
            let same_builtin =
                column.type_oid == target.type_oid && column.type_oid < FIRST_NORMAL_OBJECT_ID;
            let transfer = if same_builtin && !column.is_array && column.is_base {
                Transfer::Binary
            } else {
                Transfer::Text
            };
            columns.push(Column {
                name: column.name.clone(),
                target_name: target_name.clone(),
                expression: None,
                via: None,
                target_type: target.base_type.clone(),
                source_type: column.base_type.clone(),
                transfer,
                identity_always: target.identity_always,
                collation: column.collation.clone(),
                target_collation: target.collation.clone(),
            });
        }
        Ok((columns, source_only))
    }

    /// Adds the computed columns, each checked on the source (it parses, names existing columns,
    /// is a plain per-row expression) and on the target (a value of its built-in type can be
    /// assigned to a built-in column type by PostgreSQL's assignment rules).
    pub(super) async fn compute(
        &self,
        source: &impl GenericClient,
        target: &impl GenericClient,
        columns: &mut Vec<Column>,
    ) -> Result<()> {
        for (name, expression) in &self.spec.compute {
            let problem = |problem: String| self.problem(format!("compute {name}: {problem}"));
            let column = self
                .target_columns
                .iter()
                .find(|t| &t.name == name)
                .filter(|t| !t.generated)
                .ok_or_else(|| {
                    problem(format!(
                        "the target table {} has no column {name} that can be written",
                        self.target
                    ))
                })?;
            let table = self.source.quoted();
            let sql = format!("SELECT (\n{expression}\n) FROM {table} {ROW}");
            let statement = source
                .prepare(&sql)
                .await
                .or_else(|e| rejected(e, DatabaseRole::Source, &problem))?;
            // In a WHERE clause PostgreSQL refuses aggregates, window and set-returning functions:
            // an expression must take one row and give one value.
            let per_row = format!("SELECT 1 FROM {table} {ROW} WHERE (\n{expression}\n) IS NULL");
            source
                .prepare(&per_row)
                .await
                .or_else(|e| rejected(e, DatabaseRole::Source, &problem))?;
            let produced = statement.columns()[0].type_().clone();
            let builtin = |oid: u32| oid < FIRST_NORMAL_OBJECT_ID;
            let target_builtin = builtin(column.type_oid);
            if builtin(produced.oid()) && target_builtin {
                // PostgreSQL's assignment rules, as an INSERT of such a value would apply them.
                let overriding = if column.identity_always {
                    "OVERRIDING SYSTEM VALUE "
                } else {
                    ""
                };
                let assign = format!(
                    "INSERT INTO {} ({}) {overriding}SELECT NULL::pg_catalog.{}",
                    self.target.quoted(),
                    quote(name),
                    quote(produced.name())
                );
                target
                    .prepare(&assign)
                    .await
                    .or_else(|e| rejected(e, DatabaseRole::Target, &problem))?;
            }
            // Passed through in binary when it is the column's own type; else as text, cast on
            // the target (a value that does not fit fails its row there, not the read). A type
            // the target does not have (an enum, a domain) takes the text as its input.
            let same = produced.oid() == column.type_oid
                && target_builtin
                && !column.is_array
                && column.is_base;
            let computed = Column {
                name: name.clone(),
                target_name: name.clone(),
                expression: Some(expression.clone()),
                via: (!same && target_builtin && builtin(produced.oid()))
                    .then(|| format!("pg_catalog.{}", quote(produced.name()))),
                target_type: column.base_type.clone(),
                source_type: if same {
                    column.base_type.clone()
                } else {
                    "pg_catalog.text".into()
                },
                transfer: if same {
                    Transfer::Binary
                } else {
                    Transfer::Text
                },
                identity_always: column.identity_always,
                collation: None,
                target_collation: column.collation.clone(),
            };
            columns.push(computed);
        }
        Ok(())
    }

    /// Prepares the filter on the source, as rowsync will run it.
    pub(super) async fn check_filter(&self, source: &impl GenericClient) -> Result<()> {
        let Some(filter) = &self.spec.filter else {
            return Ok(());
        };
        let sql = format!(
            "SELECT 1 FROM {} {ROW} WHERE (\n{filter}\n)",
            self.source.quoted()
        );
        let problem = |problem: String| self.problem(format!("filter: {problem}"));
        source
            .prepare(&sql)
            .await
            .or_else(|e| rejected(e, DatabaseRole::Source, &problem))?;
        Ok(())
    }

    /// The configured key's columns, once they are known to be the columns of a unique index of
    /// the source (`unique`: the column sets of its unique indexes, sorted) that are NOT NULL.
    pub(super) fn chosen_key(
        &self,
        key: &[String],
        unique: &[Vec<String>],
    ) -> Result<Vec<String>, String> {
        for name in key {
            let column = self.source_column(name).map_err(|p| format!("key: {p}"))?;
            if !column.not_null {
                return Err(format!(
                    "key column {name} may be NULL; a key's columns must be NOT NULL (ALTER TABLE {} ALTER COLUMN {} SET NOT NULL)",
                    self.source,
                    quote(name)
                ));
            }
        }
        let mut sorted = key.to_vec();
        sorted.sort();
        if !unique.contains(&sorted) {
            return Err(format!(
                "key ({}) is not the columns of a unique index of {} (one without WHERE or expressions)",
                key.join(", "),
                self.source
            ));
        }
        Ok(key.to_vec())
    }

    fn source_column(&self, name: &str) -> Result<&CatalogColumn, String> {
        if let Some(column) = self.source_columns.iter().find(|c| c.name == name) {
            return Ok(column);
        }
        let alike = self
            .source_columns
            .iter()
            .find(|c| c.name.eq_ignore_ascii_case(name))
            .map(|c| format!(" (column names are exact: there is {})", c.name))
            .unwrap_or_default();
        Err(format!(
            "the source table {} has no column {name}{alike}",
            self.source
        ))
    }

    fn problem(&self, problem: String) -> Error {
        Error::Schema {
            table: self.source.to_string(),
            problem,
        }
    }
}

/// A server's refusal of the operator's SQL, as the entry's problem; anything else (a lost
/// connection) stays what it is.
fn rejected<T>(
    error: tokio_postgres::Error,
    role: DatabaseRole,
    problem: &impl Fn(String) -> Error,
) -> Result<T> {
    match error.as_db_error() {
        Some(db) => Err(problem(db.message().to_string())),
        None => Err(Error::Sql {
            role,
            action: "checking the mapping's SQL".into(),
            source: error,
        }),
    }
}
