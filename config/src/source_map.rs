//! Where each setting is written in the configuration text.
//!
//! The typed config structs carry no positions (they are built in code too),
//! so positions come from a second view of the same parse: a flat list of
//! every key and value in the document with its byte span. It answers two
//! questions:
//!
//! - a parse or schema error has a byte offset: which setting is there?
//! - a validation error names a setting: where is it written? A setting left
//!   at its default is not written anywhere; the nearest enclosing table that
//!   is written stands in for it.

use std::ops::Range;

use toml::de::{DeTable, DeValue};
use toml::Spanned;

use crate::error::FieldPath;

/// One key or array element and where it is written.
#[derive(Debug)]
struct Entry {
    path: FieldPath,
    /// The key's text; `None` for array elements, which have no key.
    key: Option<Range<usize>>,
    /// The value's text. For a table opened by a `[header]` or
    /// `[[header]]` this is the header line, not the table's body (which
    /// need not be contiguous).
    value: Range<usize>,
    /// Whether this is a table opened by a `[header]` or `[[header]]`: the
    /// lines after the header, up to the next one, are its body.
    header: bool,
}

/// Every key and value of one document, with byte spans.
#[derive(Debug, Default)]
pub(crate) struct SourceMap {
    entries: Vec<Entry>,
}

impl SourceMap {
    /// Indexes a document parsed from `text`. Walks with an explicit
    /// stack: nesting depth is chosen by whoever wrote the file.
    pub(crate) fn new(root: &DeTable<'_>, text: &str) -> Self {
        // Inline tables start with '{'; only header-opened tables with '['.
        let is_header = |value: &Spanned<DeValue<'_>>| {
            matches!(value.get_ref(), DeValue::Table(_))
                && text.as_bytes().get(value.span().start) == Some(&b'[')
        };
        let mut entries = Vec::new();
        let mut pending: Vec<(FieldPath, &DeTable<'_>)> = vec![(FieldPath::root(), root)];
        let mut pending_arrays: Vec<(FieldPath, &[Spanned<DeValue<'_>>])> = Vec::new();
        loop {
            if let Some((path, table)) = pending.pop() {
                for (key, value) in table {
                    let here = path.key(key.get_ref().as_ref());
                    entries.push(Entry {
                        path: here.clone(),
                        key: Some(key.span()),
                        value: value.span(),
                        header: is_header(value),
                    });
                    match value.get_ref() {
                        DeValue::Table(inner) => pending.push((here, inner)),
                        DeValue::Array(items) => pending_arrays.push((here, items)),
                        _ => {}
                    }
                }
            } else if let Some((path, items)) = pending_arrays.pop() {
                for (i, item) in items.iter().enumerate() {
                    let here = path.index(i);
                    entries.push(Entry {
                        path: here.clone(),
                        key: None,
                        value: item.span(),
                        header: is_header(item),
                    });
                    match item.get_ref() {
                        DeValue::Table(inner) => pending.push((here, inner)),
                        DeValue::Array(inner) => pending_arrays.push((here, inner)),
                        _ => {}
                    }
                }
            } else {
                break;
            }
        }
        Self { entries }
    }

    /// The setting an error at byte `offset` is about.
    ///
    /// The innermost key or value whose text covers the offset wins. When the
    /// offset is on a key's name (an unknown key, a duplicate key) the
    /// complaint is about the table holding that key, so the table's path is
    /// returned; when it is on a value, the key's own path. When nothing
    /// covers the offset (text the parser could not make sense of), the
    /// table whose body it is in.
    pub(crate) fn field_at(&self, offset: usize) -> FieldPath {
        let mut best: Option<(&Entry, bool)> = None;
        for entry in &self.entries {
            let on_key = entry.key.as_ref().is_some_and(|key| covers(key, offset));
            if !on_key && !covers(&entry.value, offset) {
                continue;
            }
            if best.is_none_or(|(b, _)| entry.path.depth() > b.path.depth()) {
                best = Some((entry, on_key));
            }
        }
        match best {
            Some((entry, true)) => entry.path.parent().unwrap_or_default(),
            Some((entry, false)) => entry.path.clone(),
            None => self
                .entries
                .iter()
                .filter(|entry| entry.header && entry.value.start <= offset)
                .max_by_key(|entry| entry.value.start)
                .map_or_else(FieldPath::root, |entry| entry.path.clone()),
        }
    }

    /// Byte offset at which `field` is written: its value, or for a setting
    /// left at its default the nearest enclosing table that is written, or
    /// the start of the document.
    pub(crate) fn offset_of(&self, field: &FieldPath) -> usize {
        let mut wanted = Some(field.clone());
        while let Some(path) = wanted {
            if let Some(entry) = self.entries.iter().find(|e| e.path == path) {
                return entry.value.start;
            }
            wanted = path.parent();
        }
        0
    }
}

/// Whether a span covers an offset; an empty span covers its own start, so
/// errors reported at "end of value" still find their key.
fn covers(span: &Range<usize>, offset: usize) -> bool {
    span.contains(&offset) || (span.is_empty() && span.start == offset)
}

/// The 1-based line and character column of byte `offset` in `text`.
///
/// Offsets past the end, or inside a multi-byte character, are clamped to
/// the nearest character boundary before them; they come from a parser and a
/// wrong guess must not panic.
pub(crate) fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let mut offset = offset.min(text.len());
    while !text.is_char_boundary(offset) {
        offset -= 1;
    }
    let before = &text[..offset];
    let line_start = before.rfind('\n').map_or(0, |nl| nl + 1);
    let line = before.matches('\n').count() + 1;
    let column = before[line_start..].chars().count() + 1;
    (line, column)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(text: &str) -> SourceMap {
        let root = DeTable::parse(text).expect("test document parses");
        SourceMap::new(root.get_ref(), text)
    }

    #[test]
    fn line_column_counts_characters_from_one() {
        let text = "a = 1\nbé = 2\n";
        assert_eq!(line_column(text, 0), (1, 1));
        assert_eq!(line_column(text, 4), (1, 5));
        assert_eq!(line_column(text, 6), (2, 1));
        // 'é' is two bytes but one column.
        assert_eq!(line_column(text, 9), (2, 3));
        assert_eq!(line_column(text, 10), (2, 4));
        // Inside 'é': clamped back to its start.
        assert_eq!(line_column(text, 8), (2, 2));
        assert_eq!(line_column(text, 10_000), (3, 1));
        assert_eq!(line_column("", 5), (1, 1));
    }

    #[test]
    fn error_on_a_key_names_the_table_holding_it() {
        let text = "[tracker]\n[[tracker.disk]]\nname = 'a'\npth = 'b'\n";
        let offset = text.find("pth").unwrap();
        assert_eq!(map(text).field_at(offset).to_string(), "tracker.disk[0]");
    }

    #[test]
    fn error_on_a_value_names_its_key() {
        let text = "[tracker]\nsegment-size = 'x'\n";
        let offset = text.find("'x'").unwrap();
        assert_eq!(
            map(text).field_at(offset).to_string(),
            "tracker.segment-size"
        );
    }

    #[test]
    fn inline_arrays_and_tables_are_indexed() {
        let text = "a = [{ b = 1 }, { b = [1, 2] }]\n";
        let offset = text.rfind('2').unwrap();
        assert_eq!(map(text).field_at(offset).to_string(), "a[1].b[1]");
    }

    #[test]
    fn offsets_between_settings_belong_to_the_table_above() {
        let text = "top = 1\n[a]\nx = 1\n\n[[b]]\ny = { z = 1 }\n\n";
        let map = map(text);
        assert_eq!(
            map.field_at(text.find("\n[a]").unwrap()).to_string(),
            "top level"
        );
        assert_eq!(
            map.field_at(text.find("\n\n[[b]]").unwrap() + 1)
                .to_string(),
            "a"
        );
        assert_eq!(map.field_at(text.len() - 1).to_string(), "b[0]");
    }

    #[test]
    fn missing_settings_fall_back_to_their_table() {
        let text = "x = 1\n[tracker]\nlog-dir = '/l'\n";
        let map = map(text);
        let tracker = FieldPath::root().key("tracker");
        assert_eq!(
            map.offset_of(&tracker.key("log-dir")),
            text.find("'/l'").unwrap()
        );
        assert_eq!(
            map.offset_of(&tracker.key("segment-size")),
            text.find('[').unwrap()
        );
        assert_eq!(map.offset_of(&FieldPath::root().key("nope")), 0);
    }
}
