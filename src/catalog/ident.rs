//! SQL identifiers: the one place where names are quoted for use in SQL text.
//!
//! Values never pass through here: they always travel as bind parameters. Identifiers cannot, so every
//! table, column and schema name that reaches SQL text is quoted by [`quote`], which makes any name
//! (mixed case, spaces, quotes) safe and exact.

use std::fmt;

/// Quotes an identifier for SQL text: `users` → `"users"`, `a"b` → `"a""b"`.
pub fn quote(name: &str) -> String {
    let mut quoted = String::with_capacity(name.len() + 2);
    quoted.push('"');
    for c in name.chars() {
        if c == '"' {
            quoted.push('"');
        }
        quoted.push(c);
    }
    quoted.push('"');
    quoted
}

/// A table name as the user wrote it in `SYNC_TABLES`, following SQL's rules: unquoted parts fold to
/// lower case, double-quoted parts are kept exactly. The schema is optional; without one the name is
/// resolved through each database's `search_path`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TableRef {
    pub schema: Option<String>,
    pub name: String,
}

/// A table name resolved in a database: both parts known and exact.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct QualifiedName {
    pub schema: String,
    pub name: String,
}

impl QualifiedName {
    pub fn new(schema: impl Into<String>, name: impl Into<String>) -> Self {
        Self {
            schema: schema.into(),
            name: name.into(),
        }
    }

    /// The quoted form for SQL text: `"public"."users"`.
    pub fn quoted(&self) -> String {
        format!("{}.{}", quote(&self.schema), quote(&self.name))
    }
}

/// Human form for logs and reports: `public.users`.
impl fmt::Display for QualifiedName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.schema, self.name)
    }
}

impl TableRef {
    /// Parses `table`, `schema.table`, or either part double-quoted (`"My Schema"."Users"`).
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut parts = Vec::new();
        let mut chars = text.trim().chars().peekable();
        loop {
            let part = if chars.peek() == Some(&'"') {
                chars.next();
                let mut part = String::new();
                loop {
                    match chars.next() {
                        Some('"') if chars.peek() == Some(&'"') => {
                            chars.next();
                            part.push('"');
                        }
                        Some('"') => break,
                        Some(c) => part.push(c),
                        None => return Err("unterminated double quote".into()),
                    }
                }
                part
            } else {
                let mut part = String::new();
                while let Some(&c) = chars.peek() {
                    if c == '.' {
                        break;
                    }
                    if !(c.is_alphanumeric() || c == '_' || c == '$') {
                        return Err(format!(
                            "unexpected character {c:?} (quote names with special characters)"
                        ));
                    }
                    part.push(c.to_ascii_lowercase());
                    chars.next();
                }
                part
            };
            if part.is_empty() {
                return Err("empty name".into());
            }
            parts.push(part);
            match chars.next() {
                None => break,
                Some('.') => continue,
                Some(c) => return Err(format!("unexpected character {c:?} after a quoted name")),
            }
        }
        match <[String; 2]>::try_from(parts) {
            Ok([schema, name]) => Ok(Self {
                schema: Some(schema),
                name,
            }),
            Err(parts) if parts.len() == 1 => Ok(Self {
                schema: None,
                name: parts.into_iter().next().unwrap_or_default(),
            }),
            Err(_) => Err("expected table or schema.table".into()),
        }
    }

    /// The quoted form, for `to_regclass` in a database (which applies that database's search_path).
    pub fn quoted(&self) -> String {
        match &self.schema {
            Some(schema) => format!("{}.{}", quote(schema), quote(&self.name)),
            None => quote(&self.name),
        }
    }
}

impl fmt::Display for TableRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.schema {
            Some(schema) => write!(f, "{schema}.{}", self.name),
            None => f.write_str(&self.name),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quote_doubles_embedded_quotes() {
        assert_eq!(quote("users"), r#""users""#);
        assert_eq!(quote(r#"a"b"#), r#""a""b""#);
        assert_eq!(
            quote("Robert'); DROP TABLE x;--"),
            r#""Robert'); DROP TABLE x;--""#
        );
    }

    #[test]
    fn table_ref_folds_unquoted_and_keeps_quoted() {
        assert_eq!(
            TableRef::parse("Users").unwrap(),
            TableRef {
                schema: None,
                name: "users".into()
            }
        );
        assert_eq!(
            TableRef::parse(r#" Public."My ""Users""" "#).unwrap(),
            TableRef {
                schema: Some("public".into()),
                name: r#"My "Users""#.into()
            }
        );
    }

    #[test]
    fn table_ref_rejects_malformed_names() {
        for bad in [
            "", "a.", ".a", "a.b.c", "a b", r#""open"#, r#""a"b"#, "a;drop",
        ] {
            assert!(TableRef::parse(bad).is_err(), "{bad:?} should be rejected");
        }
    }

    #[test]
    fn qualified_name_quotes_both_parts() {
        assert_eq!(
            QualifiedName::new("public", "Users").quoted(),
            r#""public"."Users""#
        );
    }
}
