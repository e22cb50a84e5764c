//! A source snapshot (`pg_snapshot`), as PostgreSQL writes it: `xmin:xmax:xip,…`.
//!
//! rowsync never looks inside one: it takes them (`pg_current_snapshot()`), stores them as the
//! progress of a table, and hands them back to PostgreSQL in the change query and the journal
//! cleanup, where `$1::text::pg_snapshot` reads them. Travelling as text keeps them exact.

use std::fmt;

use bytes::BytesMut;
use postgres_types::{FromSql, IsNull, ToSql, Type, to_sql_checked};

/// A `pg_snapshot` of the source, in its text form.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PgSnapshot(String);

impl PgSnapshot {
    /// `SELECT` of the current snapshot, in the form this type reads.
    pub(crate) const CURRENT: &'static str = "SELECT pg_catalog.pg_current_snapshot()::text";
}

impl fmt::Display for PgSnapshot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl ToSql for PgSnapshot {
    fn to_sql(
        &self,
        ty: &Type,
        out: &mut BytesMut,
    ) -> Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        self.0.as_str().to_sql(ty, out)
    }

    fn accepts(ty: &Type) -> bool {
        <&str as ToSql>::accepts(ty)
    }

    to_sql_checked!();
}

impl<'a> FromSql<'a> for PgSnapshot {
    fn from_sql(
        ty: &Type,
        raw: &'a [u8],
    ) -> Result<Self, Box<dyn std::error::Error + Sync + Send>> {
        String::from_sql(ty, raw).map(Self)
    }

    fn accepts(ty: &Type) -> bool {
        <String as FromSql>::accepts(ty)
    }
}
