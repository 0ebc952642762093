//! Where an error is: the line and column of a byte offset, and the field there as a path
//! such as `upstreams.echo.servers[1]`, read from the spans of the parsed TOML document so
//! that multi-line arrays, inline tables, dotted keys and arrays of tables are all named
//! by the keys and indices that lead to them.

use std::ops::Range;

use toml::Spanned;
use toml::de::{DeTable, DeValue};

use super::ConfigError;

/// The field named for errors about the file as a whole.
const TOP_LEVEL: &str = "(top level)";

/// Makes the located errors of one file.
pub(super) struct Locator<'a> {
    file: &'a str,
    src: &'a str,
}

impl<'a> Locator<'a> {
    /// Errors in `src` will name `file`.
    pub(super) fn new(file: &'a str, src: &'a str) -> Self {
        Locator { file, src }
    }

    /// An error about the key or value that starts at `span`.
    pub(super) fn at(&self, span: Range<usize>, message: String) -> ConfigError {
        let (line, column) = line_col(self.src, span.start);
        ConfigError::Invalid {
            file: self.file.to_string(),
            line,
            column,
            field: field_path(self.src, span.start),
            message,
        }
    }

    /// Where `span` starts in this file, as `line L, column C (FIELD)`, for errors found
    /// after validation (a plugin's `init` refusing its config).
    pub(super) fn place(&self, span: Range<usize>) -> String {
        let (line, column) = line_col(self.src, span.start);
        let field = field_path(self.src, span.start);
        format!("line {line}, column {column} ({field})")
    }

    /// An error about the file as a whole, such as a required table that is missing.
    pub(super) fn top_level(&self, message: String) -> ConfigError {
        ConfigError::Invalid {
            file: self.file.to_string(),
            line: 1,
            column: 1,
            field: TOP_LEVEL.into(),
            message,
        }
    }
}

/// The 1-based line and column (in bytes) of a byte offset.
fn line_col(src: &str, offset: usize) -> (usize, usize) {
    let before = src.as_bytes().get(..offset).unwrap_or(src.as_bytes());
    let line = before.iter().filter(|&&b| b == b'\n').count() + 1;
    let column = match before.iter().rposition(|&b| b == b'\n') {
        Some(newline) => before.len() - newline,
        None => before.len() + 1,
    };
    (line, column)
}

/// One key or value of the document, with the path that leads to it.
struct Node {
    span: Range<usize>,
    path: String,
    /// Keys and indices in `path`; the deepest node at an offset names it.
    depth: usize,
    /// A table opened by a `[header]` or `[[header]]` line: its span is that line only,
    /// and its body runs to the next header.
    header: bool,
}

/// Names the field at a byte offset. A syntax error still gets the path of what was
/// parsed around it, since the document is parsed with recovery.
fn field_path(src: &str, offset: usize) -> String {
    let (root, _) = DeTable::parse_recoverable(src);
    let mut nodes = Vec::new();
    collect_table(src, root.get_ref(), "", 1, &mut nodes);
    let deepest = |hit: &dyn Fn(&Range<usize>) -> bool| {
        nodes
            .iter()
            .filter(|n| hit(&n.span))
            .max_by_key(|n| n.depth)
    };
    deepest(&|s| s.contains(&offset) || (s.is_empty() && s.start == offset))
        // Just past a value cut short, such as an unclosed string or array.
        .or_else(|| deepest(&|s| s.end == offset))
        // Elsewhere in a table's body: a duplicate key, a blank or comment line.
        .or_else(|| {
            nodes
                .iter()
                .filter(|n| n.header && n.span.start <= offset)
                .max_by_key(|n| n.span.start)
        })
        .map_or_else(|| TOP_LEVEL.to_string(), |n| n.path.clone())
}

fn collect_table(src: &str, table: &DeTable<'_>, path: &str, depth: usize, out: &mut Vec<Node>) {
    for (key, value) in table.iter() {
        let path = join_key(path, key.get_ref());
        out.push(Node {
            span: key.span(),
            path: path.clone(),
            depth,
            header: false,
        });
        collect_value(src, value, path, depth, out);
    }
}

fn collect_value(
    src: &str,
    value: &Spanned<DeValue<'_>>,
    path: String,
    depth: usize,
    out: &mut Vec<Node>,
) {
    match value.get_ref() {
        DeValue::Table(t) => collect_table(src, t, &path, depth + 1, out),
        DeValue::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                collect_value(src, item, format!("{path}[{i}]"), depth + 1, out);
            }
        }
        _ => {}
    }
    let header =
        value.get_ref().is_table() && src.get(value.span()).is_some_and(|s| s.starts_with('['));
    out.push(Node {
        span: value.span(),
        path,
        depth,
        header,
    });
}

/// `path.key`, with the key quoted unless it is bare (letters, digits, `-`, `_`).
fn join_key(path: &str, key: &str) -> String {
    let bare = !key.is_empty()
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    match (path.is_empty(), bare) {
        (true, true) => key.to_string(),
        (true, false) => format!("{key:?}"),
        (false, true) => format!("{path}.{key}"),
        (false, false) => format!("{path}.{key:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The field named at the first occurrence of `needle`.
    fn field_of(src: &str, needle: &str) -> String {
        field_path(src, src.find(needle).expect("needle in src"))
    }

    const DOC: &str = r#"
[listeners.public]
bind = "127.0.0.1:8080"

[upstreams.echo]
servers = [
  "127.0.0.1:9001",
  "host:port",
]
health = { check = "ping", interval = "5s" }
a.b.c = "dotted"

[[routes]]
upstream = "echo"

[[routes]]
upstream = "other"
matrix = [[1, 2], [3, "deep"]]

[listeners."odd name"]
bind = "x"
"#;

    #[test]
    fn values_are_named_by_the_keys_and_indices_that_lead_to_them() {
        assert_eq!(field_of(DOC, "\"host:port\""), "upstreams.echo.servers[1]");
        assert_eq!(field_of(DOC, "\"ping\""), "upstreams.echo.health.check");
        assert_eq!(field_of(DOC, "\"dotted\""), "upstreams.echo.a.b.c");
        assert_eq!(field_of(DOC, "\"other\""), "routes[1].upstream");
        assert_eq!(field_of(DOC, "\"deep\""), "routes[1].matrix[1][1]");
        assert_eq!(field_of(DOC, "\"x\""), "listeners.\"odd name\".bind");
    }

    #[test]
    fn keys_and_headers_name_their_own_field_or_table() {
        assert_eq!(field_of(DOC, "servers"), "upstreams.echo.servers");
        assert_eq!(field_of(DOC, "interval"), "upstreams.echo.health.interval");
        assert_eq!(field_of(DOC, "[upstreams.echo]"), "upstreams.echo");
        assert_eq!(
            field_of(DOC, "[[routes]]\nupstream = \"other\""),
            "routes[1]"
        );
        assert_eq!(field_of(DOC, "[listeners.\"odd"), "listeners.\"odd name\"");
    }

    #[test]
    fn places_outside_any_value_fall_back_to_the_table_or_the_top_level() {
        assert_eq!(field_path(DOC, 0), TOP_LEVEL);
        let dup = "[t]\nx = 1\nx = 2\n";
        assert_eq!(field_path(dup, dup.rfind('x').unwrap()), "t");
        let unclosed = "[t]\nx = \"open\ny = 1\n";
        assert_eq!(
            field_path(unclosed, unclosed.find('\n').unwrap() + 10),
            "t.x"
        );
    }

    #[test]
    fn lines_and_columns_count_from_one() {
        assert_eq!(line_col("ab\ncd", 0), (1, 1));
        assert_eq!(line_col("ab\ncd", 4), (2, 2));
        assert_eq!(line_col("ab", 99), (1, 3));
    }
}
