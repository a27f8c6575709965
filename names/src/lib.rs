//! The names Tidemark gives hosts, consistency groups and disks, and the
//! labels of recovery points: one rule each, checked by the only way to
//! make a value, so a value of the type is sound wherever it came from.
//!
//! A [`Name`] arrives from configuration, the command line, a host's Hello
//! and its certificate, and becomes a directory or file name on the replica
//! site (`data-dir/HOST/GROUP/`, `DIR/DISK.img` of a failover), a file of
//! the tracker's log directory, a certificate's identity and a metric
//! label. The rule:
//!
//! - 1 to [`MAX_NAME_LEN`] (64) bytes: an X.509 common name holds at most
//!   64 characters, and a host's name is its certificate's;
//! - lower-case ASCII letters, digits, `.`, `_` and `-` only, so a name is
//!   one path component on every filesystem and one word everywhere;
//! - not starting with `.` or `-`: never `.`, `..`, a hidden file or
//!   something a command line would read as an option.
//!
//! Lower case only because host names are DNS names, and DNS does not tell
//! `DB1` from `db1`: a second spelling of one host must not become a second
//! replica directory (or collide with the first on a case-insensitive
//! filesystem).
//!
//! A [`Label`] tags a marker, a recovery point taken on request
//! (`tidemark mark nightly`). It is freer text and never becomes a path:
//! the type offers no conversion to one. 1 to [`MAX_LABEL_LEN`] bytes of
//! UTF-8 without white space (a label is one word of the tracker's control
//! requests) and without control characters (labels are printed on an
//! admin's terminal, where those would be commands).

use std::borrow::Borrow;
use std::ffi::OsStr;
use std::fmt;
use std::ops::Deref;
use std::path::Path;
use std::str::FromStr;

/// The longest [`Name`], in bytes.
pub const MAX_NAME_LEN: usize = 64;

/// The longest [`Label`], in bytes (what a marker record may carry).
pub const MAX_LABEL_LEN: usize = 1024;

/// The rule of a [`Name`], as said to whoever gave a bad one.
pub const NAME_RULE: &str = "a name is 1 to 64 bytes of lower-case letters, digits, \
                             '.', '_' and '-', not starting with '.' or '-'";

/// A host, consistency-group or disk name that follows the rule of this
/// module; safe as a path component.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Name(String);

/// What is wrong with a would-be [`Name`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NameProblem {
    /// It is empty.
    Empty,
    /// It holds a character outside `a-z 0-9 . _ -` (other than an
    /// upper-case letter).
    Character(char),
    /// It holds upper-case letters; the lower-case spelling would do.
    UpperCase,
    /// It is longer than [`MAX_NAME_LEN`] bytes.
    TooLong(usize),
    /// It starts with `.` or `-`.
    Leading(char),
}

impl fmt::Display for NameProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NameProblem::Empty => f.write_str("it is empty"),
            NameProblem::Character(c) => write!(f, "it contains {c:?}"),
            NameProblem::UpperCase => f.write_str("it has upper-case letters"),
            NameProblem::TooLong(len) => {
                write!(f, "it is {len} bytes long, more than {MAX_NAME_LEN}")
            }
            NameProblem::Leading(c) => write!(f, "it starts with {c:?}"),
        }
    }
}

/// A string refused as a [`Name`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{} is not a valid name: {problem}{}; {NAME_RULE}", shown(.name), suggestion(.name, .problem))]
pub struct NameError {
    /// The string as given.
    pub name: String,
    /// What is wrong with it.
    pub problem: NameProblem,
}

/// `text` quoted, escaped and cut short enough for one line of a message.
fn shown(text: &str) -> String {
    const MAX_SHOWN: usize = 80;
    match text.char_indices().nth(MAX_SHOWN) {
        Some((cut, _)) => format!("{:?}…", &text[..cut]),
        None => format!("{text:?}"),
    }
}

fn suggestion(name: &str, problem: &NameProblem) -> String {
    match problem {
        NameProblem::UpperCase => format!(" (write {:?})", name.to_ascii_lowercase()),
        _ => String::new(),
    }
}

impl Name {
    /// `name` if it follows the rule.
    pub fn new(name: impl Into<String>) -> Result<Name, NameError> {
        let name = name.into();
        match check_name(&name) {
            Ok(()) => Ok(Name(name)),
            Err(problem) => Err(NameError { name, problem }),
        }
    }

    /// A name written in the code (a default such as `"default"`).
    ///
    /// # Panics
    ///
    /// If `name` breaks the rule: a bug in the literal, not bad input.
    pub fn from_static(name: &'static str) -> Name {
        match Name::new(name) {
            Ok(name) => name,
            Err(e) => panic!("{e}"),
        }
    }

    /// The name as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The name as an owned string.
    pub fn into_string(self) -> String {
        self.0
    }
}

fn check_name(name: &str) -> Result<(), NameProblem> {
    let allowed = |b: u8| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'.' | b'_' | b'-');
    if name.is_empty() {
        return Err(NameProblem::Empty);
    }
    if let Some(c) = name
        .chars()
        .find(|c| !c.is_ascii() || !(allowed(*c as u8) || c.is_ascii_uppercase()))
    {
        return Err(NameProblem::Character(c));
    }
    if name.bytes().any(|b| b.is_ascii_uppercase()) {
        return Err(NameProblem::UpperCase);
    }
    if name.len() > MAX_NAME_LEN {
        return Err(NameProblem::TooLong(name.len()));
    }
    match name.chars().next() {
        Some(c @ ('.' | '-')) => Err(NameProblem::Leading(c)),
        _ => Ok(()),
    }
}

impl fmt::Display for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

impl Deref for Name {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl AsRef<str> for Name {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

/// A name is one normal path component.
impl AsRef<Path> for Name {
    fn as_ref(&self) -> &Path {
        Path::new(&self.0)
    }
}

impl AsRef<OsStr> for Name {
    fn as_ref(&self) -> &OsStr {
        OsStr::new(&self.0)
    }
}

impl Borrow<str> for Name {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl FromStr for Name {
    type Err = NameError;
    fn from_str(s: &str) -> Result<Name, NameError> {
        Name::new(s)
    }
}

impl TryFrom<String> for Name {
    type Error = NameError;
    fn try_from(s: String) -> Result<Name, NameError> {
        Name::new(s)
    }
}

impl TryFrom<&str> for Name {
    type Error = NameError;
    fn try_from(s: &str) -> Result<Name, NameError> {
        Name::new(s)
    }
}

impl From<Name> for String {
    fn from(name: Name) -> String {
        name.0
    }
}

impl PartialEq<str> for Name {
    fn eq(&self, other: &str) -> bool {
        self.0 == other
    }
}

impl PartialEq<&str> for Name {
    fn eq(&self, other: &&str) -> bool {
        self.0 == *other
    }
}

impl PartialEq<String> for Name {
    fn eq(&self, other: &String) -> bool {
        &self.0 == other
    }
}

impl PartialEq<Name> for str {
    fn eq(&self, other: &Name) -> bool {
        self == other.0
    }
}

impl PartialEq<Name> for &str {
    fn eq(&self, other: &Name) -> bool {
        *self == other.0
    }
}

impl serde::Serialize for Name {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> serde::Deserialize<'de> for Name {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Name, D::Error> {
        let text = String::deserialize(d)?;
        Name::new(text).map_err(serde::de::Error::custom)
    }
}

/// The label of a marker: free text within the rule of this module, never
/// a path.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Label(String);

/// What is wrong with a would-be [`Label`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LabelProblem {
    /// It is empty.
    Empty,
    /// It is longer than [`MAX_LABEL_LEN`] bytes.
    TooLong(usize),
    /// It holds white space.
    WhiteSpace(char),
    /// It holds a control character.
    Control(char),
}

impl fmt::Display for LabelProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LabelProblem::Empty => f.write_str("it is empty"),
            LabelProblem::TooLong(len) => {
                write!(f, "it is {len} bytes long, more than {MAX_LABEL_LEN}")
            }
            LabelProblem::WhiteSpace(c) => write!(f, "it contains white space ({c:?})"),
            LabelProblem::Control(c) => write!(f, "it contains the control character {c:?}"),
        }
    }
}

/// A string refused as a [`Label`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "{} is not a valid label: {problem}; a label is 1 to 1024 bytes \
     without white space or control characters",
    shown(.label)
)]
pub struct LabelError {
    /// The string as given.
    pub label: String,
    /// What is wrong with it.
    pub problem: LabelProblem,
}

impl Label {
    /// `label` if it follows the rule.
    pub fn new(label: impl Into<String>) -> Result<Label, LabelError> {
        let label = label.into();
        match check_label(&label) {
            Ok(()) => Ok(Label(label)),
            Err(problem) => Err(LabelError { label, problem }),
        }
    }

    /// Whether `label` follows the rule, for decoders that keep the bytes
    /// where they are.
    pub fn check(label: &str) -> Result<(), LabelProblem> {
        check_label(label)
    }

    /// The label as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

fn check_label(label: &str) -> Result<(), LabelProblem> {
    if label.is_empty() {
        return Err(LabelProblem::Empty);
    }
    if label.len() > MAX_LABEL_LEN {
        return Err(LabelProblem::TooLong(label.len()));
    }
    for c in label.chars() {
        if c.is_control() {
            return Err(LabelProblem::Control(c));
        }
        if c.is_whitespace() {
            return Err(LabelProblem::WhiteSpace(c));
        }
    }
    Ok(())
}

impl fmt::Display for Label {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Label {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

impl FromStr for Label {
    type Err = LabelError;
    fn from_str(s: &str) -> Result<Label, LabelError> {
        Label::new(s)
    }
}

impl TryFrom<String> for Label {
    type Error = LabelError;
    fn try_from(s: String) -> Result<Label, LabelError> {
        Label::new(s)
    }
}

impl PartialEq<str> for Label {
    fn eq(&self, other: &str) -> bool {
        self.0 == other
    }
}

impl PartialEq<&str> for Label {
    fn eq(&self, other: &&str) -> bool {
        self.0 == *other
    }
}

impl serde::Serialize for Label {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> serde::Deserialize<'de> for Label {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Label, D::Error> {
        let text = String::deserialize(d)?;
        Label::new(text).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::path::Component;

    #[test]
    fn names_follow_one_rule() {
        for good in [
            "db1",
            "db-01.example.com",
            "wal_2",
            "a",
            "0",
            "disk.raw",
            "a..b",
            &"x".repeat(64),
        ] {
            assert_eq!(Name::new(good).map(String::from), Ok(good.to_owned()));
        }
        for (bad, problem) in [
            ("", NameProblem::Empty),
            ("../../escaped", NameProblem::Character('/')),
            ("/etc", NameProblem::Character('/')),
            ("a b", NameProblem::Character(' ')),
            ("dísk", NameProblem::Character('í')),
            ("a\0", NameProblem::Character('\0')),
            ("a\\b", NameProblem::Character('\\')),
            ("DB1", NameProblem::UpperCase),
            (&"x".repeat(65), NameProblem::TooLong(65)),
            (".", NameProblem::Leading('.')),
            ("..", NameProblem::Leading('.')),
            (".hidden", NameProblem::Leading('.')),
            ("-rf", NameProblem::Leading('-')),
        ] {
            let err = Name::new(bad).expect_err(bad);
            assert_eq!(err.problem, problem, "{bad:?}");
            assert_eq!(err.name, bad);
        }
    }

    #[test]
    fn a_refusal_names_the_string_the_problem_and_the_rule() {
        let err = Name::new("../../escaped").unwrap_err();
        assert_eq!(
            err.to_string(),
            format!("\"../../escaped\" is not a valid name: it contains '/'; {NAME_RULE}")
        );
        let err = Name::new("DB1.Example").unwrap_err();
        assert!(
            err.to_string()
                .contains("it has upper-case letters (write \"db1.example\")"),
            "{err}"
        );
        // Control characters are escaped, long strings cut.
        let err = Name::new(format!("\x1b[2J{}", "y".repeat(500))).unwrap_err();
        let text = err.to_string();
        assert!(!text.contains('\x1b') && text.len() < 400, "{text}");
    }

    #[test]
    fn labels_are_one_printable_word() {
        for good in [
            "nightly",
            "before-change",
            "Vor-Änderung",
            "2026-11-23T10:00Z",
            &"l".repeat(1024),
        ] {
            assert_eq!(Label::new(good).unwrap().as_str(), good);
        }
        for (bad, problem) in [
            ("", LabelProblem::Empty),
            ("a b", LabelProblem::WhiteSpace(' ')),
            ("a\u{a0}b", LabelProblem::WhiteSpace('\u{a0}')),
            ("\x1b[31mred", LabelProblem::Control('\x1b')),
            ("a\nb", LabelProblem::Control('\n')),
            (&"l".repeat(1025), LabelProblem::TooLong(1025)),
        ] {
            assert_eq!(Label::new(bad).unwrap_err().problem, problem, "{bad:?}");
        }
    }

    #[test]
    fn serde_refuses_what_the_constructors_refuse() {
        let name: Name = serde_json::from_str("\"data\"").unwrap();
        assert_eq!(name, "data");
        assert_eq!(serde_json::to_string(&name).unwrap(), "\"data\"");
        let err = serde_json::from_str::<Name>("\"../x\"").unwrap_err();
        assert!(err.to_string().contains("not a valid name"), "{err}");
        assert!(serde_json::from_str::<Label>("\"a b\"").is_err());
        let label: Label = serde_json::from_str("\"nightly\"").unwrap();
        assert_eq!(serde_json::to_string(&label).unwrap(), "\"nightly\"");
    }

    proptest! {
        /// Whatever is accepted is exactly one normal path component, so
        /// `dir.join(name)` stays inside `dir`.
        #[test]
        fn an_accepted_name_is_one_path_component(s in "\\PC{0,80}") {
            if let Ok(name) = Name::new(s.clone()) {
                let components: Vec<_> = Path::new(&name).components().collect();
                prop_assert_eq!(components, vec![Component::Normal(OsStr::new(&s))]);
                prop_assert!(!s.bytes().any(|b| b.is_ascii_uppercase()));
                prop_assert!(s.len() <= MAX_NAME_LEN);
            }
        }

        /// Every string of the rule's alphabet and length is accepted.
        #[test]
        fn every_name_of_the_rule_is_accepted(s in "[a-z0-9_][a-z0-9._-]{0,63}") {
            prop_assert!(Name::new(s).is_ok());
        }

        #[test]
        fn an_accepted_label_has_no_space_or_control(s in "\\PC{0,40}|[ \\t\\n\\x1b]{1,3}") {
            if let Ok(label) = Label::new(s) {
                prop_assert!(!label.as_str().chars().any(|c| c.is_whitespace() || c.is_control()));
            }
        }
    }
}
