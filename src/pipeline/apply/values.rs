//! Values passed through untouched: read in binary from the source, sent in binary to the target.
//!
//! [`RawValue`] accepts a column of any type and keeps its wire bytes; [`ColumnArray`] sends one
//! column of a batch as a one-dimensional array parameter, taking the element type from the
//! parameter type the target inferred (`$1::uuid[]` → elements of type uuid). No value is decoded
//! or re-encoded on the way, so every type round-trips exactly.

use std::error::Error;

use bytes::BytesMut;
use postgres_protocol::types::{ArrayDimension, array_to_sql};
use postgres_types::{FromSql, IsNull, Kind, ToSql, Type, to_sql_checked};
use tokio_postgres::Row;

/// A column value in PostgreSQL's binary format, whatever its type.
#[derive(Debug, Clone, Copy)]
pub(super) struct RawValue<'a>(pub &'a [u8]);

impl<'a> FromSql<'a> for RawValue<'a> {
    fn from_sql(_: &Type, raw: &'a [u8]) -> Result<Self, Box<dyn Error + Sync + Send>> {
        Ok(RawValue(raw))
    }

    fn accepts(_: &Type) -> bool {
        true
    }
}

/// One column of several rows, sent as an array parameter.
#[derive(Debug)]
pub(super) struct ColumnArray<'a> {
    values: Vec<Option<&'a [u8]>>,
}

impl<'a> ColumnArray<'a> {
    /// Column `index` of each row.
    pub(super) fn from_rows(rows: &[&'a Row], index: usize) -> Result<Self, tokio_postgres::Error> {
        let values = rows
            .iter()
            .map(|row| {
                row.try_get::<_, Option<RawValue<'a>>>(index)
                    .map(|value| value.map(|value| value.0))
            })
            .collect::<Result<_, _>>()?;
        Ok(Self { values })
    }
}

impl ToSql for ColumnArray<'_> {
    fn to_sql(
        &self,
        ty: &Type,
        out: &mut BytesMut,
    ) -> Result<IsNull, Box<dyn Error + Sync + Send>> {
        let Kind::Array(element) = ty.kind() else {
            return Err(format!("a column batch must be sent as an array, not as {ty}").into());
        };
        let dimension = ArrayDimension {
            len: i32::try_from(self.values.len())?,
            lower_bound: 1,
        };
        array_to_sql(
            Some(dimension),
            element.oid(),
            self.values.iter(),
            |value, buf| match value {
                Some(bytes) => {
                    buf.extend_from_slice(bytes);
                    Ok(postgres_protocol::IsNull::No)
                }
                None => Ok(postgres_protocol::IsNull::Yes),
            },
            out,
        )?;
        Ok(IsNull::No)
    }

    fn accepts(ty: &Type) -> bool {
        matches!(ty.kind(), Kind::Array(_))
    }

    to_sql_checked!();
}
