//! Checksum repair, so mutated input reaches what lies behind a CRC.
//!
//! Every Tidemark format guards its bytes with a CRC32C, and a mutation
//! almost never keeps one valid: without help the fuzzer would only ever
//! exercise the checksum comparison. Each target therefore repairs the
//! checksums of about half its inputs (a mode bit of the input decides)
//! before decoding them, and fuzzes the fields the checksums guard. Only
//! where each format keeps its CRC is known here (the byte diagrams in the
//! modules that own the formats); the decoding is left to the decoders.

/// CRC32C of `covered` followed by `payload`.
fn crc(covered: &[u8], payload: &[u8]) -> [u8; 4] {
    crc32c::crc32c_append(crc32c::crc32c(covered), payload).to_le_bytes()
}

fn le_u32(bytes: &[u8], at: usize) -> Option<usize> {
    let field = bytes.get(at..at + 4)?;
    usize::try_from(u32::from_le_bytes(field.try_into().ok()?)).ok()
}

/// Repairs every change-log record (`TMRC`, `changelog/src/record.rs`)
/// found anywhere in `bytes`: its CRC at 52 covers bytes 0..52 and the
/// payload (payload-len at 48), cut at the end of `bytes`. Later records
/// first, so a record whose payload holds another is repaired last.
pub fn fix_records(bytes: &mut [u8]) {
    const HEADER: usize = 56;
    let starts: Vec<usize> = bytes
        .windows(4)
        .enumerate()
        .filter(|(_, w)| *w == b"TMRC")
        .map(|(at, _)| at)
        .filter(|at| at + HEADER <= bytes.len())
        .collect();
    for at in starts.into_iter().rev() {
        let payload_len = le_u32(bytes, at + 48).unwrap_or(0);
        let end = (at + HEADER).saturating_add(payload_len).min(bytes.len());
        let sum = crc(&bytes[at..at + 52], &bytes[at + HEADER..end]);
        bytes[at + 52..at + HEADER].copy_from_slice(&sum);
    }
}

/// Repairs a change-log segment header (`TMLOGSEG`,
/// `changelog/src/segment.rs`) at the start of `bytes`: CRC at 60 over
/// bytes 0..60.
pub fn fix_segment_header(bytes: &mut [u8]) {
    if bytes.len() >= 64 && bytes.starts_with(b"TMLOGSEG") {
        let sum = crc(&bytes[..60], &[]);
        bytes[60..64].copy_from_slice(&sum);
    }
}

/// Repairs a stream of entries laid one after the other from its start,
/// each a `header`-byte header starting with `magic` and followed by the
/// length at `len_at`, whose CRC at `crc_at` covers the header up to it
/// and then the body (cut at the end of `bytes`). Stops at the first bytes
/// that do not start an entry.
fn fix_entries(bytes: &mut [u8], magic: &[u8], header: usize, len_at: usize, crc_at: usize) {
    let mut at = 0;
    while at + header <= bytes.len() && bytes[at..].starts_with(magic) {
        let body_len = le_u32(bytes, at + len_at).unwrap_or(0);
        let end = (at + header).saturating_add(body_len).min(bytes.len());
        let sum = crc(&bytes[at..at + crc_at], &bytes[at + header..end]);
        bytes[at + crc_at..at + crc_at + 4].copy_from_slice(&sum);
        at = end;
    }
}

/// Repairs the frames (`TMWF`, `wire/src/frame.rs`) of a stream: a 20-byte
/// header, CRC at 16 over bytes 0..16 and the wire body (wire-len at 8).
pub fn fix_frames(bytes: &mut [u8]) {
    fix_entries(bytes, b"TMWF", 20, 8, 16);
}

/// Repairs the entries of a replica journal segment (`TMJE`,
/// `receiver/src/store/mod.rs`): a 40-byte header, CRC at 36 over bytes
/// 0..36 and the payload (payload-len at 12).
pub fn fix_journal(bytes: &mut [u8]) {
    fix_entries(bytes, b"TMJE", 40, 12, 36);
}

/// Repairs a replica state file (`receiver/src/store/mod.rs`): its last
/// 4 bytes are the CRC of every byte before them.
pub fn fix_state(bytes: &mut [u8]) {
    if let Some(body_len) = bytes.len().checked_sub(4) {
        let sum = crc(&bytes[..body_len], &[]);
        bytes[body_len..].copy_from_slice(&sum);
    }
}
