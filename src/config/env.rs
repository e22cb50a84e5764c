//! The environment rowsync is configured from: the process environment plus a `.env` file.
//!
//! `.env` is read from the working directory only, and parsed as Node's `dotenv` parses it (the
//! service rowsync replaces used it), so an existing file means the same thing here:
//! - one `KEY=value` (or `KEY: value`) per line, optionally prefixed by `export `; keys are letters,
//!   digits, `_`, `.` and `-`; anything else on a line (a comment, a typo) is skipped;
//! - values are **literal**: `$X` is never expanded, so a password such as `pa$word` stays intact;
//! - an unquoted value ends at the first `#` and is trimmed;
//! - a value in single quotes, double quotes or backticks is taken as written between them (it may
//!   contain `#`, spaces and the other quote characters, and span lines); in double quotes, `\n` and
//!   `\r` become line breaks. There is no other escaping;
//! - a later line for the same key replaces an earlier one.
//!
//! Variables already set in the environment win over the file, and the file never changes the
//! process environment. A value that is not valid UTF-8 is kept as such: asking for it is a
//! configuration error naming the variable (its value is never shown), and variables rowsync does
//! not read are never looked at.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::path::Path;

use super::ConfigError;

/// A snapshot of the variables rowsync may read, so parsing settings is a pure function.
#[derive(Clone, Default)]
pub struct Env {
    vars: BTreeMap<String, Value>,
}

#[derive(Clone)]
enum Value {
    Text(String),
    /// Set, but not valid UTF-8.
    NotUnicode,
}

/// The file read besides the environment, in the working directory.
pub const DOTENV: &str = ".env";

impl Env {
    /// The process environment, plus `.env` in the working directory if there is one.
    pub fn from_process() -> Result<Self, ConfigError> {
        let mut env = Self::from_os(std::env::vars_os());
        match std::fs::read(Path::new(DOTENV)) {
            Ok(bytes) => env.add_dotenv(&bytes)?,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
            Err(err) => {
                return Err(ConfigError::new(
                    DOTENV,
                    format!("could not be read: {}", err.kind()),
                ));
            }
        }
        Ok(env)
    }

    /// Variables from the operating system, which may not be UTF-8. A name that is not UTF-8 cannot
    /// be one rowsync reads, so it is left out.
    pub fn from_os(vars: impl IntoIterator<Item = (OsString, OsString)>) -> Self {
        let vars = vars
            .into_iter()
            .filter_map(|(name, value)| {
                let name = name.into_string().ok()?;
                let value = value.into_string().map_or(Value::NotUnicode, Value::Text);
                Some((name, value))
            })
            .collect();
        Self { vars }
    }

    pub fn from_pairs<K: Into<String>, V: Into<String>>(
        pairs: impl IntoIterator<Item = (K, V)>,
    ) -> Self {
        Self {
            vars: pairs
                .into_iter()
                .map(|(k, v)| (k.into(), Value::Text(v.into())))
                .collect(),
        }
    }

    /// Adds the variables of a `.env` file that the environment does not set already.
    pub fn add_dotenv(&mut self, bytes: &[u8]) -> Result<(), ConfigError> {
        let text = std::str::from_utf8(bytes).map_err(|err| {
            ConfigError::new(
                DOTENV,
                format!(
                    "is not valid UTF-8 (at byte {}); save it as UTF-8",
                    err.valid_up_to()
                ),
            )
        })?;
        for (name, value) in parse_dotenv(text) {
            self.vars.entry(name).or_insert(Value::Text(value));
        }
        Ok(())
    }

    /// The value of `variable`, trimmed; an empty value counts as unset.
    pub fn get(&self, variable: &'static str) -> Result<Option<&str>, ConfigError> {
        match self.vars.get(variable) {
            None => Ok(None),
            Some(Value::Text(value)) => Ok(Some(value.trim()).filter(|value| !value.is_empty())),
            Some(Value::NotUnicode) => Err(ConfigError::new(
                variable,
                "is not valid UTF-8; set it to UTF-8 text",
            )),
        }
    }

    /// Whether `variable` is set to anything (even something that is not UTF-8).
    pub fn is_set(&self, variable: &str) -> bool {
        self.vars.contains_key(variable)
    }
}

/// The `KEY=value` pairs of a `.env` file, in order, as Node's dotenv reads them (see the module
/// documentation).
pub fn parse_dotenv(text: &str) -> Vec<(String, String)> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let text = text.replace("\r\n", "\n").replace('\r', "\n");
    let mut pairs = Vec::new();
    let mut pos = 0;
    while pos < text.len() {
        let line_end = text[pos..].find('\n').map_or(text.len(), |i| pos + i);
        let line = &text[pos..line_end];
        let mut next = (line_end + 1).min(text.len());
        if let Some((key, value_offset)) = key_and_separator(line) {
            let value_at = pos + value_offset;
            // A quoted value may go on past this line; then the next key starts after its end.
            match quoted(&text[value_at..]) {
                Some((value, used)) => {
                    next = (value_at + used + 1).min(text.len());
                    pairs.push((key.to_string(), value));
                }
                None => pairs.push((key.to_string(), unquoted(&line[value_offset..]))),
            }
        }
        pos = next;
    }
    pairs
}

/// `KEY` and where its value starts in `line` (after `=`, or `: `), or None if the line is not an
/// assignment.
fn key_and_separator(line: &str) -> Option<(&str, usize)> {
    let offset = |rest: &str| line.len() - rest.len();
    let rest = line.trim_start();
    let rest = match rest.strip_prefix("export") {
        Some(after) if after.starts_with(char::is_whitespace) => after.trim_start(),
        _ => rest,
    };
    let key_len = rest
        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == '.' || c == '-'))
        .unwrap_or(rest.len());
    if key_len == 0 {
        return None;
    }
    let (key, after_key) = rest.split_at(key_len);
    if let Some(value) = after_key.trim_start().strip_prefix('=') {
        return Some((key, offset(value)));
    }
    // `KEY: value` needs whitespace after the colon (`KEY:value` is not an assignment).
    match after_key.strip_prefix(':') {
        Some(value) if value.starts_with(char::is_whitespace) => Some((key, offset(value))),
        _ => None,
    }
}

/// A value in quotes at the start of `text` (after leading blanks): its content and how many bytes
/// of `text` it used, up to the end of its closing line. None when no closing quote is followed
/// on its line by nothing but blanks or a comment: the value is then read unquoted.
///
/// Which quote closes the value follows dotenv's pattern (`'(?:\\'|[^'])*'`): a quote after a
/// backslash may belong to the value, the first one without a backslash ends it, and of those, the
/// last one that leaves only blanks or a comment after it is the closing one.
fn quoted(text: &str) -> Option<(String, usize)> {
    let blank = text.len() - text.trim_start_matches([' ', '\t']).len();
    let body = &text[blank..];
    let quote = body
        .chars()
        .next()
        .filter(|c| matches!(c, '\'' | '"' | '`'))?;
    let inner = &body[1..];
    let mut candidates = Vec::new();
    let mut previous = None;
    for (i, c) in inner.char_indices() {
        if c == quote {
            candidates.push(i);
            if previous != Some('\\') {
                break;
            }
        }
        previous = Some(c);
    }
    candidates.into_iter().rev().find_map(|close| {
        let after = &inner[close + 1..];
        let line_end = after.find('\n').unwrap_or(after.len());
        let tail = after[..line_end].trim();
        if !(tail.is_empty() || tail.starts_with('#')) {
            return None;
        }
        let content = &inner[..close];
        let value = if quote == '"' {
            content.replace("\\n", "\n").replace("\\r", "\r")
        } else {
            content.to_string()
        };
        Some((value, blank + 1 + close + 1 + line_end))
    })
}

/// An unquoted value: up to the first `#`, trimmed. A value that still starts and ends with the same
/// quote character loses them (what dotenv does with a quoted value followed by more text).
fn unquoted(rest: &str) -> String {
    let value = rest.split('#').next().unwrap_or_default().trim();
    let mut chars = value.chars();
    match (chars.next(), chars.next_back()) {
        (Some(first), Some(last)) if first == last && matches!(first, '\'' | '"' | '`') => {
            let inner = &value[1..value.len() - 1];
            if first == '"' {
                inner.replace("\\n", "\n").replace("\\r", "\r")
            } else {
                inner.to_string()
            }
        }
        _ => value.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::ffi::OsStringExt;

    use super::*;

    /// Every case next to what Node's dotenv 16.6.1 makes of the same file
    /// (`require("dotenv").parse(fs.readFileSync("dotenv-cases.env"))`).
    #[test]
    fn parses_like_nodes_dotenv() {
        let pairs = parse_dotenv(include_str!("dotenv-cases.env"));
        let mut parsed = BTreeMap::new();
        for (key, value) in pairs {
            parsed.insert(key, value);
        }
        let expected = [
            ("PLAIN", "hello world"),
            ("DOLLAR", "pa$word"),
            ("DOLLAR_BRACE", "${HOME}x"),
            ("HASH", "abc"),
            ("HASH_SPACED", "abc"),
            ("SINGLE", "pa$word #1 \"q\""),
            ("DOUBLE", "it's $HOME #x \\\"esc\\\""),
            ("BACKTICK", "pa$word #1 \"q\" 'x'"),
            ("NEWLINES", "a\nb\rc"),
            ("SINGLE_NL", "a\\nb"),
            ("EXPORTED", "yes"),
            ("INDENTED", "spaced value"),
            ("COLON", "colon value"),
            ("EMPTY", ""),
            ("QUOTED_THEN_JUNK", "'abc'def"),
            ("ESC_END", "a\\"),
            ("ESC_MID", "a\\'b"),
            ("MULTI", "line1\nline2"),
            ("AFTER_MULTI", "ok"),
            ("DUP", "second"),
            ("dotted.key-1", "v"),
            (
                "URL",
                "postgres://app:pa$word%20x@127.0.0.1:5432/app?sslmode=require",
            ),
            ("UNTERMINATED", "'abc"),
            ("NEXT", "after unterminated"),
        ];
        let expected: BTreeMap<String, String> = expected
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        assert_eq!(parsed, expected);
    }

    #[test]
    fn crlf_and_a_byte_order_mark_are_handled() {
        let pairs = parse_dotenv("\u{feff}A=1\r\nB='x'\r\nC=3\r");
        assert_eq!(
            pairs,
            [("A", "1"), ("B", "x"), ("C", "3")].map(|(k, v)| (k.to_string(), v.to_string()))
        );
    }

    #[test]
    fn the_environment_wins_over_the_file() {
        let mut env = Env::from_pairs([("LOG_LEVEL", "debug")]);
        env.add_dotenv(b"LOG_LEVEL=warn\nLOG_FORMAT=json\n")
            .unwrap();
        assert_eq!(env.get("LOG_LEVEL").unwrap(), Some("debug"));
        assert_eq!(env.get("LOG_FORMAT").unwrap(), Some("json"));
    }

    #[test]
    fn a_file_that_is_not_utf8_is_an_error_naming_it() {
        let err = Env::default().add_dotenv(b"A=\xff\xfe").unwrap_err();
        assert_eq!(err.variable, DOTENV);
    }

    #[test]
    fn values_that_are_not_utf8_fail_only_when_read_and_are_never_shown() {
        let env = Env::from_os([
            (
                OsString::from("SOURCE_DATABASE_URL"),
                OsString::from_vec(b"postgres://u:hunter2\xff@h/db".to_vec()),
            ),
            (
                OsString::from("UNRELATED"),
                OsString::from_vec(b"\xff".to_vec()),
            ),
            (
                OsString::from_vec(b"NAME\xff".to_vec()),
                OsString::from("x"),
            ),
            (OsString::from("LOG_LEVEL"), OsString::from("info")),
        ]);
        assert_eq!(env.get("LOG_LEVEL").unwrap(), Some("info"));
        let err = env.get("SOURCE_DATABASE_URL").unwrap_err();
        assert_eq!(err.variable, "SOURCE_DATABASE_URL");
        assert!(!format!("{err} {err:?}").contains("hunter2"), "{err}");
    }

    #[test]
    fn empty_and_blank_values_are_unset() {
        let env = Env::from_pairs([("A", ""), ("B", "  "), ("C", " x ")]);
        assert_eq!(env.get("A").unwrap(), None);
        assert_eq!(env.get("B").unwrap(), None);
        assert_eq!(env.get("C").unwrap(), Some("x"));
    }
}
