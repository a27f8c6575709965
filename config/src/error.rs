//! The errors of loading a configuration, and the two things every one of
//! them points at: where in which file ([`SourceLocation`]) and which setting
//! ([`FieldPath`]).
//!
//! Every error here is the fault of the configuration's author except
//! [`ConfigError::Read`], which is about the local filesystem. Messages are
//! written for the admin who has the file open in an editor:
//! `tracker.toml:12:1: tracker.disk[0]: unknown field `pth`, expected one of
//! `name`, `path`, `export-name``.

use std::fmt;
use std::path::PathBuf;

use crate::DaemonKind;

/// A position in a configuration file, 1-based, as editors count them.
///
/// `column` counts characters (not bytes) from the start of the line.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct SourceLocation {
    /// The file as the caller named it (see [`crate::parse_str`]).
    pub file: PathBuf,
    /// Line number, starting at 1.
    pub line: usize,
    /// Column number in characters, starting at 1.
    pub column: usize,
}

impl fmt::Display for SourceLocation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}", self.file.display(), self.line, self.column)
    }
}

/// One step of a [`FieldPath`]: a table key or an array index.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum PathSegment {
    Key(String),
    Index(usize),
}

/// The dotted path of a setting inside the document, as an admin would
/// write it: `tracker.disk[1].path`, `shipper.bandwidth.schedule[0].window`.
///
/// The empty path is the document itself and displays as `top level`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct FieldPath {
    segments: Vec<PathSegment>,
}

impl FieldPath {
    /// The document itself.
    pub fn root() -> Self {
        Self::default()
    }

    /// This path extended by a table key.
    #[must_use]
    pub fn key(&self, key: impl Into<String>) -> Self {
        let mut next = self.clone();
        next.segments.push(PathSegment::Key(key.into()));
        next
    }

    /// This path extended by an array index.
    #[must_use]
    pub fn index(&self, index: usize) -> Self {
        let mut next = self.clone();
        next.segments.push(PathSegment::Index(index));
        next
    }

    /// The path one step up, or `None` for the document itself.
    pub fn parent(&self) -> Option<Self> {
        let mut parent = self.clone();
        parent.segments.pop().map(|_| parent)
    }

    /// Whether this is the document itself.
    pub fn is_root(&self) -> bool {
        self.segments.is_empty()
    }

    /// Number of steps from the document root.
    pub(crate) fn depth(&self) -> usize {
        self.segments.len()
    }
}

impl fmt::Display for FieldPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.segments.is_empty() {
            return f.write_str("top level");
        }
        for (i, segment) in self.segments.iter().enumerate() {
            match segment {
                PathSegment::Key(key) => {
                    if i > 0 {
                        f.write_str(".")?;
                    }
                    let bare = !key.is_empty()
                        && key
                            .chars()
                            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
                    if bare {
                        f.write_str(key)?;
                    } else {
                        // Quote keys a TOML author would have had to quote,
                        // so the path can be pasted back into the file.
                        write!(f, "{key:?}")?;
                    }
                }
                PathSegment::Index(index) => write!(f, "[{index}]")?,
            }
        }
        Ok(())
    }
}

/// Why a configuration could not be loaded.
///
/// All variants but [`ConfigError::Read`] are the configuration author's to
/// fix; their messages name the file, line, column and setting.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The file could not be read: missing, unreadable, or not UTF-8. A local
    /// filesystem or permissions problem, not a problem of the contents.
    #[error("cannot read configuration file {}", .path.display())]
    Read {
        /// The file that was to be read.
        path: PathBuf,
        /// What the operating system said.
        #[source]
        source: std::io::Error,
    },

    /// The file is not well-formed TOML (unquoted string, unclosed bracket,
    /// duplicate key, ...).
    #[error("{location}: {}invalid TOML: {message}", FieldPrefix(.field.as_ref()))]
    Syntax {
        /// Where the parser stopped.
        location: SourceLocation,
        /// The setting being written there, when the parser got far enough
        /// to tell.
        field: Option<FieldPath>,
        /// What the parser expected.
        message: String,
    },

    /// The file is TOML but does not fit the schema: an unknown or missing
    /// key, a value of the wrong type, or a size, duration, time window or
    /// address that does not parse.
    #[error("{location}: {field}: {message}")]
    Schema {
        /// Where the offending key or value is.
        location: SourceLocation,
        /// The table holding an unknown or missing key, or else the setting
        /// whose value is wrong.
        field: FieldPath,
        /// What is wrong and what was expected.
        message: String,
    },

    /// A value is well-typed but not acceptable, alone or together with
    /// another setting (for example a segment larger than the log).
    #[error("{}{field}: {message}", LocationPrefix(.location.as_ref()))]
    Invalid {
        /// Where the setting is written; when the setting was left at its
        /// default, the table it belongs to. `None` when the configuration
        /// was built in code rather than read from a file.
        location: Option<SourceLocation>,
        /// The setting that breaks the rule.
        field: FieldPath,
        /// The rule, and the values that break it.
        message: String,
    },

    /// The file has none of the `[tracker]`, `[shipper]` and `[receiver]`
    /// tables, so it configures nothing.
    #[error(
        "{}: no [tracker], [shipper] or [receiver] table; a configuration file \
         needs at least one of them",
        .file.display()
    )]
    NoDaemonTable {
        /// The file in question.
        file: PathBuf,
    },

    /// A daemon was started with a file that has no table for it.
    #[error("{}: no [{daemon}] table in this file", .file.display())]
    MissingDaemonTable {
        /// The file in question.
        file: PathBuf,
        /// The daemon whose table is missing.
        daemon: DaemonKind,
    },
}

impl ConfigError {
    /// Where in the file the error is, if it is about the file's contents
    /// and the position is known.
    pub fn location(&self) -> Option<&SourceLocation> {
        match self {
            Self::Syntax { location, .. } | Self::Schema { location, .. } => Some(location),
            Self::Invalid { location, .. } => location.as_ref(),
            Self::Read { .. } | Self::NoDaemonTable { .. } | Self::MissingDaemonTable { .. } => {
                None
            }
        }
    }

    /// The setting the error is about, if it is about one.
    pub fn field(&self) -> Option<&FieldPath> {
        match self {
            Self::Syntax { field, .. } => field.as_ref(),
            Self::Schema { field, .. } | Self::Invalid { field, .. } => Some(field),
            Self::Read { .. } | Self::NoDaemonTable { .. } | Self::MissingDaemonTable { .. } => {
                None
            }
        }
    }

    /// A validation error not yet tied to a file position.
    pub(crate) fn invalid(field: FieldPath, message: impl Into<String>) -> Self {
        Self::Invalid {
            location: None,
            field,
            message: message.into(),
        }
    }
}

/// `"{location}: "` when there is a location, nothing otherwise.
struct LocationPrefix<'a>(Option<&'a SourceLocation>);

impl fmt::Display for LocationPrefix<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(location) => write!(f, "{location}: "),
            None => Ok(()),
        }
    }
}

/// `"{field}: "` when there is a field, nothing otherwise.
struct FieldPrefix<'a>(Option<&'a FieldPath>);

impl fmt::Display for FieldPrefix<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(field) => write!(f, "{field}: "),
            None => Ok(()),
        }
    }
}

/// A size, duration, time window or address written in a form this crate
/// does not understand.
///
/// Returned by the value parsers ([`crate::ByteSize::parse`],
/// [`crate::parse_duration`], ...), which the CLI also uses for its flags;
/// inside a configuration file it surfaces as [`ConfigError::Schema`].
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("invalid {what} {}: {problem}", Quoted(.input))]
pub struct ValueError {
    /// What kind of value was being parsed ("size", "duration", ...).
    pub what: &'static str,
    /// The text as given.
    pub input: String,
    /// What is wrong with it and what would be accepted.
    pub problem: String,
}

impl ValueError {
    pub(crate) fn new(what: &'static str, input: &str, problem: impl Into<String>) -> Self {
        Self {
            what,
            input: input.to_owned(),
            problem: problem.into(),
        }
    }
}

/// Quotes user input for a message, escaping control characters and cutting
/// it short so a pasted-in megabyte does not become a megabyte of error.
struct Quoted<'a>(&'a str);

impl fmt::Display for Quoted<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const MAX_CHARS: usize = 64;
        if self.0.chars().count() <= MAX_CHARS {
            write!(f, "{:?}", self.0)
        } else {
            let head: String = self.0.chars().take(MAX_CHARS).collect();
            write!(f, "{head:?}...")
        }
    }
}
