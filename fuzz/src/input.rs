//! Structure read from fuzz input, and written for seeds.
//!
//! [`Input`] reads little-endian integers and length-prefixed byte strings
//! from the front of the fuzzer's bytes; once they run out, every read gives
//! zero or an empty string, so a harness never handles "short input" itself
//! and every byte string is a valid input. [`Output`] writes exactly what
//! `Input` reads, so seeds built from real encoders parse back field for
//! field.

/// Reads fields from the front of fuzz input.
pub struct Input<'a> {
    rest: &'a [u8],
}

impl<'a> Input<'a> {
    /// Reads `data` from its first byte.
    pub fn new(data: &'a [u8]) -> Input<'a> {
        Input { rest: data }
    }

    /// Whether every byte has been read.
    pub fn is_empty(&self) -> bool {
        self.rest.is_empty()
    }

    /// Up to `n` bytes: fewer if fewer are left.
    pub fn bytes(&mut self, n: usize) -> &'a [u8] {
        let (taken, rest) = self.rest.split_at(n.min(self.rest.len()));
        self.rest = rest;
        taken
    }

    /// Exactly `N` bytes, or `None` (consuming what is left) if fewer are
    /// left: a fixed-size header that a closed stream cut short.
    pub fn array<const N: usize>(&mut self) -> Option<[u8; N]> {
        let Some((taken, rest)) = self.rest.split_first_chunk::<N>() else {
            self.rest = &[];
            return None;
        };
        self.rest = rest;
        Some(*taken)
    }

    /// Every byte not read yet.
    pub fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.rest)
    }

    fn padded<const N: usize>(&mut self) -> [u8; N] {
        let mut field = [0; N];
        let taken = self.bytes(N);
        field[..taken.len()].copy_from_slice(taken);
        field
    }

    /// One byte.
    pub fn u8(&mut self) -> u8 {
        self.padded::<1>()[0]
    }

    /// A little-endian u16.
    pub fn u16(&mut self) -> u16 {
        u16::from_le_bytes(self.padded())
    }

    /// A little-endian u32.
    pub fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.padded())
    }

    /// A little-endian u64.
    pub fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.padded())
    }

    /// A byte string with a u8 length.
    pub fn blob8(&mut self) -> &'a [u8] {
        let len = self.u8();
        self.bytes(usize::from(len))
    }

    /// A byte string with a u16 length.
    pub fn blob16(&mut self) -> &'a [u8] {
        let len = self.u16();
        self.bytes(usize::from(len))
    }

    /// A byte string with a u32 length.
    pub fn blob32(&mut self) -> &'a [u8] {
        let len = self.u32();
        self.bytes(usize::try_from(len).unwrap_or(usize::MAX))
    }
}

/// Writes fields as [`Input`] reads them.
#[derive(Default)]
pub struct Output(pub Vec<u8>);

impl Output {
    /// An empty input.
    pub fn new() -> Output {
        Output::default()
    }

    /// Raw bytes, read back with [`Input::bytes`], [`Input::array`] or
    /// [`Input::rest`].
    pub fn bytes(&mut self, bytes: &[u8]) -> &mut Self {
        self.0.extend_from_slice(bytes);
        self
    }

    /// One byte.
    pub fn u8(&mut self, v: u8) -> &mut Self {
        self.bytes(&[v])
    }

    /// A little-endian u16.
    pub fn u16(&mut self, v: u16) -> &mut Self {
        self.bytes(&v.to_le_bytes())
    }

    /// A little-endian u32.
    pub fn u32(&mut self, v: u32) -> &mut Self {
        self.bytes(&v.to_le_bytes())
    }

    /// A little-endian u64.
    pub fn u64(&mut self, v: u64) -> &mut Self {
        self.bytes(&v.to_le_bytes())
    }

    /// A byte string with a u8 length (cut to 255 bytes).
    pub fn blob8(&mut self, bytes: &[u8]) -> &mut Self {
        let bytes = &bytes[..bytes.len().min(usize::from(u8::MAX))];
        self.u8(bytes.len() as u8).bytes(bytes)
    }

    /// A byte string with a u16 length (cut to 65535 bytes).
    pub fn blob16(&mut self, bytes: &[u8]) -> &mut Self {
        let bytes = &bytes[..bytes.len().min(usize::from(u16::MAX))];
        self.u16(bytes.len() as u16).bytes(bytes)
    }

    /// A byte string with a u32 length.
    pub fn blob32(&mut self, bytes: &[u8]) -> &mut Self {
        let len = u32::try_from(bytes.len()).expect("seed parts are small");
        self.u32(len).bytes(bytes)
    }

    /// The input.
    pub fn finish(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_output_writes_input_reads() {
        let bytes = Output::new()
            .u8(7)
            .u16(0x1234)
            .u32(0xdead_beef)
            .u64(u64::MAX)
            .blob8(b"ab")
            .blob16(b"cde")
            .blob32(b"")
            .bytes(b"tail")
            .finish();
        let mut input = Input::new(&bytes);
        assert_eq!(input.u8(), 7);
        assert_eq!(input.u16(), 0x1234);
        assert_eq!(input.u32(), 0xdead_beef);
        assert_eq!(input.u64(), u64::MAX);
        assert_eq!(input.blob8(), b"ab");
        assert_eq!(input.blob16(), b"cde");
        assert_eq!(input.blob32(), b"");
        assert_eq!(input.array::<2>(), Some(*b"ta"));
        assert_eq!(input.array::<3>(), None);
        assert!(input.is_empty());
        assert_eq!(input.u64(), 0);
        assert_eq!(input.blob32(), b"");
    }
}
