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
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
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

/// The name as SQL would read it back, quoting only the parts that need it: `public.users`,
/// `public."Users"`, `"a.b".c`. This is the table's name in progress records, `sync_errors`,
/// metrics labels and logs, so two tables never share it (`"a.b".c` and `a."b.c"` differ).
impl fmt::Display for QualifiedName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", Part(&self.schema), Part(&self.name))
    }
}

impl QualifiedName {
    /// The form earlier versions used as the table's name (`schema.table`, never quoted), which
    /// their progress rows carry. None when that text could name another table too (it has more
    /// than one dot), so that a row shared by two tables is never taken for either.
    pub fn legacy_name(&self) -> Option<String> {
        let legacy = format!("{}.{}", self.schema, self.name);
        (legacy != self.to_string() && legacy.matches('.').count() == 1).then_some(legacy)
    }
}

/// One part of a name, quoted unless SQL would read it unquoted as the same name: lower-case
/// letters (any non-ASCII letters too, which PostgreSQL does not fold), digits, `_` and `$`, not
/// starting with a digit or `$`.
struct Part<'a>(&'a str);

impl fmt::Display for Part<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let plain = self.0.chars().enumerate().all(|(i, c)| {
            let letter = c == '_' || (c.is_alphabetic() && !c.is_ascii_uppercase());
            letter || (i > 0 && (c.is_numeric() || c == '$'))
        });
        if plain && !self.0.is_empty() {
            f.write_str(self.0)
        } else {
            f.write_str(&quote(self.0))
        }
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

    /// The entries of a comma-separated list of names: commas inside double quotes belong to the
    /// name (`"a,b".c, d`).
    pub fn split_list(text: &str) -> Vec<&str> {
        let mut entries = Vec::new();
        let (mut start, mut quoted) = (0, false);
        for (i, c) in text.char_indices() {
            match c {
                '"' => quoted = !quoted,
                ',' if !quoted => {
                    entries.push(&text[start..i]);
                    start = i + 1;
                }
                _ => {}
            }
        }
        entries.push(&text[start..]);
        entries
    }

    /// The quoted form, for `to_regclass` in a database (which applies that database's search_path).
    pub fn quoted(&self) -> String {
        match &self.schema {
            Some(schema) => format!("{}.{}", quote(schema), quote(&self.name)),
            None => quote(&self.name),
        }
    }
}

/// The name as [`TableRef::parse`] reads it back (see [`QualifiedName`]'s `Display`).
impl fmt::Display for TableRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.schema {
            Some(schema) => write!(f, "{}.{}", Part(schema), Part(&self.name)),
            None => Part(&self.name).fmt(f),
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
    fn lists_split_at_commas_outside_quotes() {
        assert_eq!(
            TableRef::split_list(r#"users, "a,b"."c "",d", e"#),
            vec!["users", r#" "a,b"."c "",d""#, " e"]
        );
        assert_eq!(TableRef::split_list("users"), vec!["users"]);
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
    fn names_display_quoted_only_where_needed_and_never_collide() {
        let shown = |schema: &str, name: &str| QualifiedName::new(schema, name).to_string();
        assert_eq!(shown("public", "users"), "public.users");
        assert_eq!(shown("público", "usuários_2"), "público.usuários_2");
        assert_eq!(shown("public", "Users"), r#"public."Users""#);
        assert_eq!(shown("My Schema", r#"a"b"#), r#""My Schema"."a""b""#);
        assert_eq!(shown("a.b", "c"), r#""a.b".c"#);
        assert_eq!(shown("a", "b.c"), r#"a."b.c""#);
        assert_eq!(shown("s", "1st"), r#"s."1st""#);
        for (schema, name) in [("a.b", "c"), ("My Schema", r#"x"y"#), ("s", "Ünï cödé")] {
            let parsed = TableRef::parse(&shown(schema, name)).unwrap();
            assert_eq!(parsed.schema.as_deref(), Some(schema));
            assert_eq!(parsed.name, name);
            assert_eq!(parsed.to_string(), shown(schema, name));
        }
    }

    #[test]
    fn legacy_names_only_where_unambiguous_and_different() {
        let legacy = |schema: &str, name: &str| QualifiedName::new(schema, name).legacy_name();
        assert_eq!(legacy("public", "users"), None);
        assert_eq!(legacy("public", "Users").as_deref(), Some("public.Users"));
        assert_eq!(legacy("a.b", "c"), None);
        assert_eq!(legacy("a", "b.c"), None);
    }

    #[test]
    fn qualified_name_quotes_both_parts() {
        assert_eq!(
            QualifiedName::new("public", "Users").quoted(),
            r#""public"."Users""#
        );
    }
}
