//! Names and shapes from the databases' catalogs: quoting identifiers, and how a source table
//! maps onto its target table.

pub mod ident;
pub(crate) mod mapping;
