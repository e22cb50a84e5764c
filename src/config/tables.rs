//! Which tables are synced, and how: `SYNC_TABLES` (same-named tables, same-named columns) or the
//! mapping file named by `SYNC_CONFIG`.
//!
//! The file is TOML, read with the `toml` crate:
//!
//! ```toml
//! [[table]]
//! source  = "public.users"                 # required
//! target  = "public.chat_users"            # optional; default: the same name
//! filter  = "status <> 'deleted'"          # optional; an SQL condition over the source row
//! exclude = ["phone"]                      # optional; source columns not synced
//! key     = ["email"]                      # optional; default: the source primary key
//!
//! [table.rename]                           # optional; source column = target column
//! first_name = "given_name"
//!
//! [table.compute]                          # optional; target column = SQL over the source row
//! display_name = "first_name || ' ' || coalesce(last_name, '')"
//! ```
//!
//! What can be checked without a database is checked here (names, duplicates, SQL that could end
//! rowsync's statement); the rest against both catalogs when the mapping is loaded
//! ([`crate::catalog::mapping`]). Table names follow SQL's rules as in `SYNC_TABLES`; column names
//! are taken exactly as written (they are catalog names, not SQL text).

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;

use serde::Deserialize;

use super::{ConfigError, Env};
use crate::catalog::ident::TableRef;

/// The variable naming the mapping file.
pub const SYNC_CONFIG: &str = "SYNC_CONFIG";

/// One synced table: a source table into a target table, with how its rows and columns map.
#[derive(Debug, Clone, Default)]
pub struct TableSpec {
    pub source: TableRef,
    /// None: the table of the same name.
    pub target: Option<TableRef>,
    /// An SQL condition over the source row: only rows for which it is true are in the target.
    pub filter: Option<String>,
    /// Source columns not synced.
    pub exclude: Vec<String>,
    /// The key's source columns (None: the primary key).
    pub key: Option<Vec<String>>,
    /// Source column → target column.
    pub rename: BTreeMap<String, String>,
    /// Target column → SQL expression over the source row.
    pub compute: BTreeMap<String, String>,
    /// Where the entry was written (`rowsync.toml, [[table]] 2 (public.users)`), for errors;
    /// None for `SYNC_TABLES`.
    pub origin: Option<String>,
}

/// Two specs are the same table configured the same way, wherever they were written.
impl PartialEq for TableSpec {
    fn eq(&self, other: &Self) -> bool {
        (
            &self.source,
            &self.target,
            &self.filter,
            &self.exclude,
            &self.key,
            &self.rename,
            &self.compute,
        ) == (
            &other.source,
            &other.target,
            &other.filter,
            &other.exclude,
            &other.key,
            &other.rename,
            &other.compute,
        )
    }
}

impl Eq for TableSpec {}

impl TableSpec {
    /// A same-named table, as `SYNC_TABLES` lists it.
    pub fn plain(source: TableRef) -> Self {
        Self {
            source,
            ..Self::default()
        }
    }

    /// The target table's name as configured.
    pub fn target_ref(&self) -> &TableRef {
        self.target.as_ref().unwrap_or(&self.source)
    }

    /// The quoted target name, for `to_regclass` in the target (the table's lock is keyed by it).
    pub fn quoted(&self) -> String {
        self.target_ref().quoted()
    }

    /// Whether anything but the same-named columns is configured.
    pub fn maps(&self) -> bool {
        self.filter.is_some()
            || !self.exclude.is_empty()
            || self.key.is_some()
            || !self.rename.is_empty()
            || !self.compute.is_empty()
    }

    /// What the mapping says, as text to compare with the one a table was copied with: None for
    /// a same-named table with same-named columns.
    pub fn definition(&self) -> Option<String> {
        let target = self.target.as_ref().filter(|t| **t != self.source);
        if target.is_none() && !self.maps() {
            return None;
        }
        Some(
            serde_json::json!({
                "target": target.map(ToString::to_string),
                "filter": self.filter,
                "exclude": self.exclude,
                "key": self.key,
                "rename": self.rename,
                "compute": self.compute,
            })
            .to_string(),
        )
    }

    /// `problem` as an error about this entry: exit 2, naming the file and the entry.
    pub(crate) fn problem(&self, problem: impl Into<String>) -> ConfigError {
        let problem = problem.into();
        match &self.origin {
            Some(origin) => ConfigError::new(SYNC_CONFIG, format!("{origin}: {problem}")),
            None => ConfigError::new("SYNC_TABLES", format!("{self}: {problem}")),
        }
    }
}

/// `source`, or `source → target` when the target is named differently.
impl fmt::Display for TableSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.target {
            Some(target) if *target != self.source => write!(f, "{} → {target}", self.source),
            _ => self.source.fmt(f),
        }
    }
}

/// The synced tables: from `SYNC_CONFIG`'s file, or `SYNC_TABLES` (default `users`).
pub(crate) fn tables(env: &Env) -> Result<Vec<TableSpec>, ConfigError> {
    match (env.get(SYNC_CONFIG)?, env.get("SYNC_TABLES")?) {
        (Some(_), Some(_)) => Err(ConfigError::new(
            SYNC_CONFIG,
            "and SYNC_TABLES are both set; name the tables in one of them (the file can say \
             everything SYNC_TABLES can)",
        )),
        (Some(path), None) => from_file(Path::new(path)),
        (None, listed) => Ok(from_list(listed.unwrap_or("users"))?
            .into_iter()
            .map(TableSpec::plain)
            .collect()),
    }
}

fn from_list(text: &str) -> Result<Vec<TableRef>, ConfigError> {
    let mut tables: Vec<TableRef> = Vec::new();
    for entry in TableRef::split_list(text) {
        let table = TableRef::parse(entry).map_err(|problem| {
            ConfigError::new(
                "SYNC_TABLES",
                format!(
                    "expected a comma-separated list of table or schema.table names; {:?}: {problem}",
                    entry.trim()
                ),
            )
        })?;
        if tables.contains(&table) {
            return Err(ConfigError::new(
                "SYNC_TABLES",
                format!("lists {table} twice"),
            ));
        }
        tables.push(table);
    }
    Ok(tables)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    table: Vec<Entry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Entry {
    source: String,
    target: Option<String>,
    filter: Option<String>,
    #[serde(default)]
    exclude: Vec<String>,
    key: Option<Vec<String>>,
    #[serde(default)]
    rename: BTreeMap<String, String>,
    #[serde(default)]
    compute: BTreeMap<String, String>,
}

fn from_file(path: &Path) -> Result<Vec<TableSpec>, ConfigError> {
    let shown = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|err| {
        ConfigError::new(SYNC_CONFIG, format!("{shown}: could not be read: {err}"))
    })?;
    parse(&shown, &text)
}

/// The specs of a mapping file's text (`file` names it in errors).
pub(crate) fn parse(file: &str, text: &str) -> Result<Vec<TableSpec>, ConfigError> {
    let parsed: File = toml::from_str(text).map_err(|err| {
        let line = err
            .span()
            .map(|span| text[..span.start.min(text.len())].matches('\n').count() + 1);
        let at = line.map(|l| format!(" line {l}:")).unwrap_or_default();
        let message = err.message().replace('\n', " ");
        ConfigError::new(SYNC_CONFIG, format!("{file}:{at} {}", message.trim()))
    })?;
    if parsed.table.is_empty() {
        return Err(ConfigError::new(
            SYNC_CONFIG,
            format!("{file}: names no table; add a [[table]] entry with source = \"schema.table\""),
        ));
    }
    let mut specs: Vec<TableSpec> = Vec::new();
    for (n, entry) in parsed.table.into_iter().enumerate() {
        let spec = spec(file, n + 1, entry)?;
        if let Some(other) = specs.iter().find(|s| s.target_ref() == spec.target_ref()) {
            return Err(spec.problem(format!(
                "target {} is already the target of {}: two entries cannot write one table",
                spec.target_ref(),
                other.origin.as_deref().unwrap_or_default()
            )));
        }
        specs.push(spec);
    }
    Ok(specs)
}

fn spec(file: &str, n: usize, entry: Entry) -> Result<TableSpec, ConfigError> {
    let origin = format!("{file}, [[table]] {n}");
    let name = |text: &str, field: &str| {
        TableRef::parse(text).map_err(|problem| {
            ConfigError::new(
                SYNC_CONFIG,
                format!(
                    "{origin}: {field} {text:?} is not a table or schema.table name: {problem}"
                ),
            )
        })
    };
    let source = name(&entry.source, "source")?;
    let target = entry
        .target
        .as_deref()
        .map(|t| name(t, "target"))
        .transpose()?;
    let mut spec = TableSpec {
        source,
        target,
        filter: entry.filter,
        exclude: entry.exclude,
        key: entry.key,
        rename: entry.rename,
        compute: entry.compute,
        origin: None,
    };
    spec.origin = Some(format!("{origin} ({spec})"));
    check(&spec)?;
    Ok(spec)
}

/// What can be told wrong without a database.
fn check(spec: &TableSpec) -> Result<(), ConfigError> {
    let column = |what: &str, name: &str| {
        if name.is_empty() {
            Err(spec.problem(format!("{what}: an empty column name")))
        } else {
            Ok(())
        }
    };
    for (i, name) in spec.exclude.iter().enumerate() {
        column("exclude", name)?;
        if spec.exclude[..i].contains(name) {
            return Err(spec.problem(format!("exclude lists {name} twice")));
        }
        if spec.rename.contains_key(name) {
            return Err(spec.problem(format!("column {name} is both excluded and renamed")));
        }
    }
    if let Some(key) = &spec.key {
        if key.is_empty() {
            return Err(spec.problem("key is empty; leave it out to use the primary key"));
        }
        for (i, name) in key.iter().enumerate() {
            column("key", name)?;
            if key[..i].contains(name) {
                return Err(spec.problem(format!("key lists {name} twice")));
            }
            if spec.exclude.contains(name) {
                return Err(spec.problem(format!("key column {name} is excluded")));
            }
        }
    }
    let mut targets: BTreeMap<&str, String> = BTreeMap::new();
    for (from, to) in &spec.rename {
        column("rename", from)?;
        column("rename", to)?;
        if let Some(earlier) = targets.insert(to, format!("rename {from}")) {
            return Err(spec.problem(format!(
                "target column {to} is mapped twice ({earlier} and rename {from})"
            )));
        }
    }
    for (to, expression) in &spec.compute {
        column("compute", to)?;
        if let Some(earlier) = targets.insert(to, format!("compute {to}")) {
            return Err(spec.problem(format!(
                "target column {to} is mapped twice ({earlier} and compute {to})"
            )));
        }
        self_contained(expression)
            .map_err(|problem| spec.problem(format!("compute {to}: {problem}")))?;
    }
    if let Some(filter) = &spec.filter {
        self_contained(filter).map_err(|problem| spec.problem(format!("filter: {problem}")))?;
    }
    Ok(())
}

/// Checks that `sql` is one self-contained piece of an expression: not empty, no `;` outside
/// string literals, quoted names and comments, parentheses balanced, and every literal and
/// comment closed. rowsync puts it between parentheses (and line breaks, which end a `--`
/// comment) inside its own statements, so such a piece cannot end the statement or reach past
/// its parentheses. The scan follows PostgreSQL's lexer (`scan.l`) where they could disagree:
/// names take `$` and every non-ASCII character, `E'…'` strings take backslash escapes also in
/// their continuations (`E'a'` newline `'b'`), dollar-quote tags take non-ASCII characters.
/// rowsync's sessions set `standard_conforming_strings = on`, as this scan assumes.
pub(crate) fn self_contained(sql: &str) -> Result<(), String> {
    if sql.trim().is_empty() {
        return Err("is empty".into());
    }
    let chars: Vec<char> = sql.chars().collect();
    let ident = |c: char| c.is_alphanumeric() || c == '_' || c == '$' || !c.is_ascii();
    let tag_start = |c: char| c.is_alphabetic() || c == '_' || !c.is_ascii();
    let tag_char = |c: char| tag_start(c) || c.is_ascii_digit();
    let at = |i: usize| chars.get(i).copied();
    let (mut i, mut depth) = (0usize, 0i64);
    while i < chars.len() {
        let c = chars[i];
        let after_ident = i > 0 && ident(chars[i - 1]);
        match c {
            ';' => return Err("contains `;`: write one expression, not statements".into()),
            '(' => depth += 1,
            ')' => {
                depth -= 1;
                if depth < 0 {
                    return Err("has a `)` without its `(`".into());
                }
            }
            '-' if at(i + 1) == Some('-') => {
                i = line_end(&chars, i);
                continue;
            }
            '/' if at(i + 1) == Some('*') => {
                i = comment_end(&chars, i).ok_or("has a /* comment that is not closed")?;
                continue;
            }
            '"' => {
                i += 1;
                loop {
                    match at(i) {
                        None => return Err("has a quoted name that is not closed".into()),
                        Some('"') if at(i + 1) == Some('"') => i += 2,
                        Some('"') => break,
                        Some(_) => i += 1,
                    }
                }
            }
            '\'' => {
                // E'…' (e or E right before the quote, not ending a name) takes backslash escapes.
                let escapes =
                    i > 0 && matches!(chars[i - 1], 'e' | 'E') && !(i >= 2 && ident(chars[i - 2]));
                i = string_end(&chars, i, escapes)
                    .ok_or("has a string literal that is not closed")?;
                continue;
            }
            '$' if !after_ident => {
                // $tag$ … $tag$ (a $ inside a name, or $1, is not one).
                let end = (i + 1..chars.len()).find(|&j| !tag_char(chars[j]));
                let opens = end.is_some_and(|end| {
                    chars[end] == '$' && (end == i + 1 || tag_start(chars[i + 1]))
                });
                if let (true, Some(end)) = (opens, end) {
                    let tag = &chars[i..=end];
                    let close = (end + 1..chars.len()).find(|&j| chars[j..].starts_with(tag));
                    match close {
                        Some(close) => {
                            i = close + tag.len();
                            continue;
                        }
                        None => {
                            let tag: String = tag.iter().collect();
                            return Err(format!("has a {tag} string that is not closed"));
                        }
                    }
                }
            }
            _ => {}
        }
        i += 1;
    }
    if depth != 0 {
        return Err("has a `(` without its `)`".into());
    }
    Ok(())
}

/// The position after the string literal whose opening quote is at `open` (None: not closed),
/// its continuations included: another literal after whitespace holding a line break (and `--`
/// comments) continues it, in the same escape mode.
fn string_end(chars: &[char], open: usize, escapes: bool) -> Option<usize> {
    let mut i = open + 1;
    loop {
        match chars.get(i).copied()? {
            '\\' if escapes => i += 2,
            '\'' if chars.get(i + 1) == Some(&'\'') => i += 2,
            '\'' => {
                i += 1;
                match continuation(chars, i) {
                    Some(next) => i = next + 1,
                    None => return Some(i),
                }
            }
            _ => i += 1,
        }
    }
}

/// Where a string continuation's quote is, if the text at `i` is one: horizontal whitespace, a
/// line break, then whitespace and `--` comments, then `'`.
fn continuation(chars: &[char], mut i: usize) -> Option<usize> {
    while matches!(chars.get(i), Some(' ' | '\t' | '\x0c')) {
        i += 1;
    }
    if !matches!(chars.get(i), Some('\n' | '\r')) {
        return None;
    }
    loop {
        match chars.get(i).copied()? {
            ' ' | '\t' | '\x0c' | '\n' | '\r' => i += 1,
            '-' if chars.get(i + 1) == Some(&'-') => i = line_end(chars, i),
            '\'' => return Some(i),
            _ => return None,
        }
    }
}

/// The position of the line break ending the `--` comment at `i` (or the end).
fn line_end(chars: &[char], mut i: usize) -> usize {
    while i < chars.len() && chars[i] != '\n' {
        i += 1;
    }
    i
}

/// The position after the block comment opening at `i` (they nest in PostgreSQL); None when it
/// is not closed.
fn comment_end(chars: &[char], mut i: usize) -> Option<usize> {
    let mut nesting = 0;
    loop {
        match (chars.get(i).copied()?, chars.get(i + 1).copied()) {
            ('/', Some('*')) => {
                nesting += 1;
                i += 2;
            }
            ('*', Some('/')) => {
                nesting -= 1;
                i += 2;
                if nesting == 0 {
                    return Some(i);
                }
            }
            _ => i += 1,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(vars: &[(&str, &str)]) -> Env {
        Env::from_pairs(vars.iter().map(|(k, v)| (k.to_string(), v.to_string())))
    }

    #[test]
    fn sql_pieces_must_be_self_contained() {
        for ok in [
            "status <> 'deleted'",
            "name = 'a;b' OR note = 'it''s;'",
            "x = E'\\';' ",
            "body = $$ ; $$ AND y = $t$;$t$",
            "\"we;ird\" IS NOT NULL",
            "a -- a comment; with a semicolon\n AND b",
            "a /* nested /* ; */ still */ AND (b OR c)",
            "price$1 > 0",
            "a$e'\\' = 'x'",
            "x = 'a'\n'b' AND y",
            "x = E'a\\'b'\n'c\\'d'",
            "note = $€$ ; $€$",
        ] {
            assert_eq!(self_contained(ok), Ok(()), "{ok}");
        }
        for bad in [
            "",
            "  ",
            "true; DROP TABLE users",
            "true) OR (true",
            "(true",
            "'open",
            "\"open",
            "/* open",
            "$x$ open",
            "x = E'\\\\'; DROP",
            "x = 'a\\'; DROP",
            // What a reviewer found to reach outside the parentheses of a first version.
            "'' = $€$ '$€$ ) OR (true -- '",
            "'' = E'x'\n'\\' ' ) OR (true -- '",
            "x = 'a'\n  -- c\n  'b'' ) OR (true",
            "€e'\\' ) OR (true -- '",
        ] {
            assert!(self_contained(bad).is_err(), "{bad:?} should be rejected");
        }
    }

    #[test]
    fn the_file_reads_every_field() {
        let specs = parse(
            "m.toml",
            r#"
            [[table]]
            source  = "public.users"
            target  = "public.chat_users"
            filter  = "status <> 'deleted'"
            exclude = ["phone"]
            key     = ["email"]
            [table.rename]
            first_name = "given_name"
            [table.compute]
            display_name = "first_name || ' ' || coalesce(last_name, '')"

            [[table]]
            source = "Orders"
            "#,
        )
        .unwrap();
        assert_eq!(specs.len(), 2);
        let users = &specs[0];
        assert_eq!(users.to_string(), "public.users → public.chat_users");
        assert_eq!(users.exclude, ["phone"]);
        assert_eq!(users.key.as_deref(), Some(&["email".to_string()][..]));
        assert_eq!(users.rename["first_name"], "given_name");
        assert!(users.compute["display_name"].starts_with("first_name"));
        assert_eq!(
            users.origin.as_deref(),
            Some("m.toml, [[table]] 1 (public.users → public.chat_users)")
        );
        assert_eq!(
            specs[1],
            TableSpec::plain(TableRef::parse("orders").unwrap())
        );
        assert!(!specs[1].maps() && users.maps());
    }

    #[test]
    fn file_problems_name_the_file_and_the_entry() {
        let problem = |text: &str| parse("m.toml", text).unwrap_err().to_string();
        let cases = [
            ("", "names no table"),
            ("[[table]]\ntarget = \"x\"", "line 1"),
            ("[[table]]\nsource = \"users\"\ncolour = 1", "unknown field"),
            (
                "[[table]]\nsource = \"a.b.c\"",
                "[[table]] 1: source \"a.b.c\"",
            ),
            (
                "[[table]]\nsource = \"users\"\nfilter = \"true; DROP TABLE users\"",
                "[[table]] 1 (users): filter: contains `;`",
            ),
            (
                "[[table]]\nsource = \"users\"\nexclude = [\"a\"]\n[table.rename]\na = \"b\"",
                "a is both excluded and renamed",
            ),
            (
                "[[table]]\nsource = \"users\"\n[table.rename]\na = \"x\"\n[table.compute]\nx = \"1\"",
                "target column x is mapped twice",
            ),
            ("[[table]]\nsource = \"users\"\nkey = []", "key is empty"),
            (
                "[[table]]\nsource = \"a\"\ntarget = \"t\"\n[[table]]\nsource = \"b\"\ntarget = \"t\"",
                "[[table]] 2 (b → t): target t is already the target of m.toml, [[table]] 1 (a → t)",
            ),
        ];
        for (text, expected) in cases {
            let got = problem(text);
            assert!(got.starts_with("SYNC_CONFIG: m.toml"), "{got}");
            assert!(got.contains(expected), "{text:?}: {got}");
            assert!(!got.contains('\n'), "one line: {got}");
        }
    }

    #[test]
    fn sync_config_and_sync_tables_exclude_each_other() {
        let err = tables(&env(&[("SYNC_CONFIG", "x.toml"), ("SYNC_TABLES", "users")])).unwrap_err();
        assert_eq!(err.variable, SYNC_CONFIG);
        assert!(err.problem.contains("SYNC_TABLES"), "{err}");
        let err = tables(&env(&[("SYNC_CONFIG", "/nonexistent/rowsync.toml")])).unwrap_err();
        assert!(err.to_string().contains("could not be read"), "{err}");
    }
}
