//! Deserializing a `[[name]]` array of tables with an error that shows the
//! double brackets: writing `[tracker.disk]` for `[[tracker.disk]]` is the
//! commonest slip, and serde's own "invalid type: map, expected a sequence"
//! does not say how to fix it.

use std::fmt;
use std::marker::PhantomData;

use serde::de::{Deserialize, Deserializer, SeqAccess, Visitor};

/// Deserializes a list of `T` written as `[[header]]` tables (or an inline
/// array of tables); `header` is the name between the brackets.
pub(crate) fn deserialize<'de, D, T>(
    deserializer: D,
    header: &'static str,
) -> Result<Vec<T>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    struct TableListVisitor<T> {
        header: &'static str,
        item: PhantomData<T>,
    }

    impl<'de, T: Deserialize<'de>> Visitor<'de> for TableListVisitor<T> {
        type Value = Vec<T>;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            write!(
                f,
                "[[{}]] tables, one per entry (note the double brackets)",
                self.header
            )
        }

        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<T>, A::Error> {
            let mut items = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(1024));
            while let Some(item) = seq.next_element()? {
                items.push(item);
            }
            Ok(items)
        }
    }

    deserializer.deserialize_seq(TableListVisitor {
        header,
        item: PhantomData,
    })
}
