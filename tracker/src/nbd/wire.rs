//! Big-endian field access for NBD messages.
//!
//! [`Fields`] reads and writes the fields of a fixed-size header at offsets
//! that are checked when the code compiles, so header decoders cannot index
//! out of range whatever bytes arrive. [`PayloadReader`] walks the
//! variable-length data of an option and reports running out as `None`.
//! [`within_string_limit`] keeps server-side strings within the protocol's
//! limit.

use super::constants::MAX_STRING_LEN;

/// A fixed-size header, `N` bytes, with fields at compile-time-checked
/// offsets.
#[derive(Clone, Copy)]
pub(crate) struct Fields<const N: usize>(pub(crate) [u8; N]);

impl<const N: usize> Fields<N> {
    /// A header of zero bytes, to be filled in.
    pub(crate) const fn zeroed() -> Self {
        Self([0; N])
    }

    fn get<const AT: usize, const W: usize>(&self) -> [u8; W] {
        const { assert!(AT + W <= N, "field runs past the end of the header") };
        let mut field = [0; W];
        field.copy_from_slice(&self.0[AT..AT + W]);
        field
    }

    fn set<const AT: usize, const W: usize>(&mut self, field: [u8; W]) {
        const { assert!(AT + W <= N, "field runs past the end of the header") };
        self.0[AT..AT + W].copy_from_slice(&field);
    }

    pub(crate) fn u16_at<const AT: usize>(&self) -> u16 {
        u16::from_be_bytes(self.get::<AT, 2>())
    }

    pub(crate) fn u32_at<const AT: usize>(&self) -> u32 {
        u32::from_be_bytes(self.get::<AT, 4>())
    }

    pub(crate) fn u64_at<const AT: usize>(&self) -> u64 {
        u64::from_be_bytes(self.get::<AT, 8>())
    }

    pub(crate) fn set_u16_at<const AT: usize>(&mut self, value: u16) {
        self.set::<AT, 2>(value.to_be_bytes());
    }

    pub(crate) fn set_u32_at<const AT: usize>(&mut self, value: u32) {
        self.set::<AT, 4>(value.to_be_bytes());
    }

    pub(crate) fn set_u64_at<const AT: usize>(&mut self, value: u64) {
        self.set::<AT, 8>(value.to_be_bytes());
    }
}

/// A server-side string cut to the protocol's length limit
/// ([`MAX_STRING_LEN`]) at a character boundary.
pub(crate) fn within_string_limit(text: &str) -> &str {
    if text.len() <= MAX_STRING_LEN {
        return text;
    }
    let mut end = MAX_STRING_LEN;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// Reads big-endian fields from the front of untrusted option data.
pub(crate) struct PayloadReader<'a> {
    rest: &'a [u8],
}

impl<'a> PayloadReader<'a> {
    pub(crate) fn new(bytes: &'a [u8]) -> Self {
        Self { rest: bytes }
    }

    /// The next `len` bytes, or `None` if fewer remain.
    pub(crate) fn take(&mut self, len: u32) -> Option<&'a [u8]> {
        let len = usize::try_from(len).ok()?;
        if len > self.rest.len() {
            return None;
        }
        let (taken, rest) = self.rest.split_at(len);
        self.rest = rest;
        Some(taken)
    }

    pub(crate) fn u16(&mut self) -> Option<u16> {
        let (field, rest) = self.rest.split_first_chunk::<2>()?;
        self.rest = rest;
        Some(u16::from_be_bytes(*field))
    }

    pub(crate) fn u32(&mut self) -> Option<u32> {
        let (field, rest) = self.rest.split_first_chunk::<4>()?;
        self.rest = rest;
        Some(u32::from_be_bytes(*field))
    }

    /// Whether every byte has been read.
    pub(crate) fn is_empty(&self) -> bool {
        self.rest.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_round_trip_big_endian() {
        let mut header = Fields::<14>::zeroed();
        header.set_u16_at::<0>(0x0102);
        header.set_u32_at::<2>(0x0304_0506);
        header.set_u64_at::<6>(0x0708_090a_0b0c_0d0e);
        assert_eq!(header.0, [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14]);
        assert_eq!(header.u16_at::<0>(), 0x0102);
        assert_eq!(header.u32_at::<2>(), 0x0304_0506);
        assert_eq!(header.u64_at::<6>(), 0x0708_090a_0b0c_0d0e);
    }

    #[test]
    fn long_server_strings_are_cut_at_a_character_boundary() {
        let text = "é".repeat(MAX_STRING_LEN);
        let cut = within_string_limit(&text);
        assert_eq!(cut.len(), MAX_STRING_LEN);
        assert!(text.starts_with(cut));
        let odd = format!("a{text}");
        assert_eq!(within_string_limit(&odd).len(), MAX_STRING_LEN - 1);
        assert_eq!(within_string_limit("short"), "short");
    }

    #[test]
    fn payload_reader_reports_running_out() {
        let mut reader = PayloadReader::new(&[0, 0, 0, 2, 0xab, 0xcd, 0x01]);
        assert_eq!(reader.u32(), Some(2));
        assert_eq!(reader.take(2), Some(&[0xab, 0xcd][..]));
        assert_eq!(reader.u16(), None);
        assert_eq!(reader.take(2), None);
        assert!(!reader.is_empty());
        assert_eq!(reader.take(1), Some(&[0x01][..]));
        assert!(reader.is_empty());
        assert_eq!(reader.take(u32::MAX), None);
    }
}
