//! The two numbers every record carries and every crate passes around:
//! which disk of the group ([`DiskId`]) and where in the log ([`Seq`]).
//! Each is a newtype so that one cannot be passed for the other, or for an
//! offset or a length. Formats are unchanged by them: every codec (the
//! record header, the cursor, the wire's messages, the replica store's
//! state file) writes the inner integer exactly as before, and serde
//! (status files, `--json`) writes the bare number.

use std::fmt;

/// The conversions to and from the inner integer, and `Display` and `Debug`
/// as that integer, of an id newtype. `Debug` too is the bare number so that
/// messages and logs that print an `Option<Seq>` or a struct with `{:?}`
/// read exactly as they did when the fields were integers.
macro_rules! integer_id {
    ($id:ident, $int:ty) => {
        impl From<$int> for $id {
            fn from(value: $int) -> $id {
                $id(value)
            }
        }

        impl From<$id> for $int {
            fn from(id: $id) -> $int {
                id.0
            }
        }

        impl fmt::Display for $id {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Display::fmt(&self.0, f)
            }
        }

        impl fmt::Debug for $id {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Debug::fmt(&self.0, f)
            }
        }
    };
}

integer_id!(DiskId, u32);
integer_id!(Seq, u64);

/// A disk's id within its consistency group, the `disk` field of its
/// records. It is stable: given by the tracker when the disk joins the
/// group (its place in the disk list for the disks a group started with),
/// kept while other disks are added, moved or removed, and never given to
/// another disk (the tracker's state file keeps the ids). [`DiskId::GROUP`] (all ones)
/// stands for the whole group in barrier and marker records.
#[derive(
    Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(transparent)]
pub struct DiskId(pub u32);

impl DiskId {
    /// The `disk` of records that concern the whole group (barrier,
    /// marker).
    pub const GROUP: DiskId = DiskId(crate::record::GROUP_DISK);

    /// The id as the formats write it.
    pub const fn get(self) -> u32 {
        self.0
    }

    /// The id as an index (into tables by id, which may have gaps).
    pub fn index(self) -> usize {
        self.0 as usize
    }
}

/// A record's sequence number: strictly increasing across the log, never
/// reused (see [`crate::record`]). 0 stands for "before the first record"
/// (an empty cursor, a receiver that holds nothing).
#[derive(
    Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(transparent)]
pub struct Seq(pub u64);

impl Seq {
    /// Before the first record.
    pub const ZERO: Seq = Seq(0);

    /// The number as the formats write it.
    pub const fn get(self) -> u64 {
        self.0
    }

    /// The sequence number after this one. Sequence numbers read from disk
    /// are bounded by [`crate::record::MAX_SEQ`], far below `u64::MAX`, so
    /// this never overflows for a number that was accepted.
    pub const fn next(self) -> Seq {
        Seq(self.0 + 1)
    }

    /// The sequence number before this one; `None` before the first
    /// record.
    pub const fn prev(self) -> Option<Seq> {
        match self.0.checked_sub(1) {
            Some(n) => Some(Seq(n)),
            None => None,
        }
    }

    /// The sequence number before this one, [`Seq::ZERO`] for
    /// [`Seq::ZERO`]: the last record before the one numbered `self`,
    /// where 0 stands for none.
    pub const fn saturating_prev(self) -> Seq {
        Seq(self.0.saturating_sub(1))
    }

    /// How many sequence numbers `self` lies after `earlier` (0 when they
    /// are equal); `None` when `self` comes first.
    pub const fn since(self, earlier: Seq) -> Option<u64> {
        self.0.checked_sub(earlier.0)
    }

    /// The sequence number `count` after this one; `None` if that does not
    /// fit.
    pub const fn checked_add(self, count: u64) -> Option<Seq> {
        match self.0.checked_add(count) {
            Some(n) => Some(Seq(n)),
            None => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Status files and `--json` output keep the bare numbers they always
    /// had.
    #[test]
    fn serde_writes_the_bare_number() {
        assert_eq!(serde_json::to_string(&Seq(42)).unwrap(), "42");
        assert_eq!(serde_json::to_string(&DiskId(3)).unwrap(), "3");
        assert_eq!(serde_json::from_str::<Seq>("42").unwrap(), Seq(42));
        assert_eq!(serde_json::from_str::<DiskId>("7").unwrap(), DiskId(7));
    }

    #[test]
    fn display_order_and_group() {
        assert_eq!(format!("{} {}", Seq(9), DiskId(1)), "9 1");
        assert_eq!(format!("{:?} {:?}", Some(Seq(9)), DiskId(1)), "Some(9) 1");
        assert!(Seq(1) < Seq(2) && Seq(2).next() == Seq(3));
        assert_eq!(DiskId::GROUP.get(), u32::MAX);
        assert!(DiskId(0) < DiskId::GROUP);
    }

    #[test]
    fn seq_distance_and_neighbours() {
        assert_eq!(Seq(5).prev(), Some(Seq(4)));
        assert_eq!(Seq::ZERO.prev(), None);
        assert_eq!(Seq(5).saturating_prev(), Seq(4));
        assert_eq!(Seq::ZERO.saturating_prev(), Seq::ZERO);
        assert_eq!(Seq(7).since(Seq(3)), Some(4));
        assert_eq!(Seq(3).since(Seq(3)), Some(0));
        assert_eq!(Seq(3).since(Seq(7)), None);
        assert_eq!(Seq(3).checked_add(4), Some(Seq(7)));
        assert_eq!(Seq(u64::MAX).checked_add(1), None);
    }
}
