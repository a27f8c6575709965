//! The lag history of one host's group: 24 hours of one-minute slots in a
//! small file of fixed size (`lag.ring` in the group's directory), filled
//! from the shipper's status reports, for the console's lag chart.
//!
//! It is history, not replicated data: a slot is written (without a sync)
//! whenever the minute's figures change, and the file is synced every ten
//! minutes and when the group's reports stop, so a power cut may lose the
//! last minutes. A wrong value is never shown: each slot carries its own
//! checksum and a slot that does not verify reads as empty, as does a slot
//! older than 24 hours (the ring wrapped past it).
//!
//! # Format
//!
//! ```text
//! header, 32 bytes:
//!   0  8  magic "TMLAGRG1"
//!   8  2  u16 version (1)
//!  10  2  u16 seconds per slot (60)
//!  12  4  u32 slots (1440)
//!  16  8  u64 created, ns since the Unix epoch
//!  24  4  u32 reserved (0)
//!  28  4  u32 CRC32C of bytes 0..28
//! slot i at 32 + 32·i, i = minute mod 1440, 32 bytes:
//!   0  8  u64 minute (minutes since the Unix epoch; 0: empty)
//!   8  4  u32 the minute's highest lag, ms (saturating)
//!  12  4  u32 the minute's last lag, ms (saturating)
//!  16  8  u64 the minute's most pending bytes
//!  24  4  u32 flags: bit 0 the shipper said critical during the minute
//!  28  4  u32 CRC32C of bytes 0..28
//! ```
//!
//! Little-endian. A file whose header does not verify (or of another
//! layout) is started afresh: its history is lost, never misread.
//!
//! [`LagRing`] is the pure core (bytes in, slots and writes out, `now`
//! passed in); [`LagRingFile`] writes it through the storage seam.

use std::io;
use std::time::Duration;

use tidemark_durable::{LogDir, LogFile};

/// The file's name in the group's directory.
pub const LAG_RING_FILE: &str = "lag.ring";
/// Slots in the ring: 24 hours of minutes.
pub const SLOTS: usize = 1440;
/// Seconds a slot covers.
pub const SLOT_SECONDS: u64 = 60;
const MAGIC: &[u8; 8] = b"TMLAGRG1";
const VERSION: u16 = 1;
const HEADER_LEN: usize = 32;
const SLOT_LEN: usize = 32;
/// Bytes of the whole file.
pub const FILE_LEN: usize = HEADER_LEN + SLOTS * SLOT_LEN;
const FLAG_CRITICAL: u32 = 1;
/// How often written slots are made durable.
const SYNC_EVERY: Duration = Duration::from_secs(600);

/// One minute of lag history.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LagSlot {
    /// Minutes since the Unix epoch.
    pub minute: u64,
    /// The highest lag reported in the minute, ms.
    pub max_lag_ms: u32,
    /// The last lag reported in the minute, ms.
    pub last_lag_ms: u32,
    /// The most pending bytes reported in the minute.
    pub pending_bytes: u64,
    /// Whether the shipper said critical during the minute.
    pub critical: bool,
}

impl LagSlot {
    fn encode(&self) -> [u8; SLOT_LEN] {
        let mut b = [0u8; SLOT_LEN];
        b[0..8].copy_from_slice(&self.minute.to_le_bytes());
        b[8..12].copy_from_slice(&self.max_lag_ms.to_le_bytes());
        b[12..16].copy_from_slice(&self.last_lag_ms.to_le_bytes());
        b[16..24].copy_from_slice(&self.pending_bytes.to_le_bytes());
        let flags = if self.critical { FLAG_CRITICAL } else { 0 };
        b[24..28].copy_from_slice(&flags.to_le_bytes());
        let crc = crc32c::crc32c(&b[..28]);
        b[28..32].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// The slot `b` holds; `None` if empty or damaged.
    fn decode(b: &[u8]) -> Option<LagSlot> {
        let u32_at = |at: usize| u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"));
        let u64_at = |at: usize| u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"));
        if b.len() != SLOT_LEN || crc32c::crc32c(&b[..28]) != u32_at(28) {
            return None;
        }
        let minute = u64_at(0);
        let flags = u32_at(24);
        if minute == 0 || flags & !FLAG_CRITICAL != 0 {
            return None;
        }
        Some(LagSlot {
            minute,
            max_lag_ms: u32_at(8),
            last_lag_ms: u32_at(12),
            pending_bytes: u64_at(16),
            critical: flags & FLAG_CRITICAL != 0,
        })
    }
}

fn header(created_ns: u64) -> [u8; HEADER_LEN] {
    let mut b = [0u8; HEADER_LEN];
    b[0..8].copy_from_slice(MAGIC);
    b[8..10].copy_from_slice(&VERSION.to_le_bytes());
    b[10..12].copy_from_slice(&(SLOT_SECONDS as u16).to_le_bytes());
    b[12..16].copy_from_slice(&(SLOTS as u32).to_le_bytes());
    b[16..24].copy_from_slice(&created_ns.to_le_bytes());
    let crc = crc32c::crc32c(&b[..28]);
    b[28..32].copy_from_slice(&crc.to_le_bytes());
    b
}

fn header_ok(b: &[u8]) -> bool {
    b.len() >= HEADER_LEN && {
        let mut expect = header(u64::from_le_bytes(b[16..24].try_into().expect("8 bytes")));
        expect[24..28].copy_from_slice(&b[24..28]);
        let crc = crc32c::crc32c(&expect[..28]);
        expect[28..32].copy_from_slice(&crc.to_le_bytes());
        b[..HEADER_LEN] == expect
    }
}

/// The minute `now_ns` falls in.
fn minute_of(now_ns: u64) -> u64 {
    now_ns / 1_000_000_000 / SLOT_SECONDS
}

/// What a ring asks to be written: `bytes` at `offset` of the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RingWrite {
    /// Where in the file.
    pub offset: u64,
    /// What.
    pub bytes: Vec<u8>,
}

/// The ring in memory (see the module documentation).
#[derive(Debug, Clone)]
pub struct LagRing {
    slots: Vec<Option<LagSlot>>,
    /// A fresh file's header, to be written first.
    header: Option<[u8; HEADER_LEN]>,
    /// Slots changed and not yet handed out to be written.
    dirty: Vec<usize>,
}

impl LagRing {
    /// The ring a file holds (`bytes`: its whole content, possibly short
    /// or damaged). A file that is not a ring is started afresh at
    /// `now_ns`: [`LagRing::poll_write`] then writes a new header first.
    pub fn from_bytes(bytes: &[u8], now_ns: u64) -> LagRing {
        if !header_ok(bytes) {
            return LagRing {
                slots: vec![None; SLOTS],
                header: Some(header(now_ns)),
                dirty: Vec::new(),
            };
        }
        let slots = (0..SLOTS)
            .map(|i| {
                let at = HEADER_LEN + i * SLOT_LEN;
                bytes
                    .get(at..at + SLOT_LEN)
                    .and_then(LagSlot::decode)
                    // A slot must sit where its minute puts it.
                    .filter(|s| s.minute as usize % SLOTS == i)
            })
            .collect();
        LagRing {
            slots,
            header: None,
            dirty: Vec::new(),
        }
    }

    /// Takes one report: its lag and pending bytes count in the minute of
    /// `now_ns` (the receiver's clock, on which the chart is drawn).
    pub fn handle_report(&mut self, lag_ms: u64, pending_bytes: u64, critical: bool, now_ns: u64) {
        let minute = minute_of(now_ns);
        let i = minute as usize % SLOTS;
        let lag = u32::try_from(lag_ms).unwrap_or(u32::MAX);
        let slot = match self.slots[i] {
            Some(s) if s.minute == minute => LagSlot {
                minute,
                max_lag_ms: s.max_lag_ms.max(lag),
                last_lag_ms: lag,
                pending_bytes: s.pending_bytes.max(pending_bytes),
                critical: s.critical || critical,
            },
            // Empty, or a day old: the ring wrapped onto it.
            _ => LagSlot {
                minute,
                max_lag_ms: lag,
                last_lag_ms: lag,
                pending_bytes,
                critical,
            },
        };
        if self.slots[i] != Some(slot) {
            self.slots[i] = Some(slot);
            if !self.dirty.contains(&i) {
                self.dirty.push(i);
            }
        }
    }

    /// The next write the file needs, if any: a fresh header (and the
    /// file's whole length) first, then each changed slot.
    pub fn poll_write(&mut self) -> Option<RingWrite> {
        if let Some(h) = self.header.take() {
            let mut bytes = vec![0u8; FILE_LEN];
            bytes[..HEADER_LEN].copy_from_slice(&h);
            for (i, s) in self.slots.iter().enumerate() {
                if let Some(s) = s {
                    let at = HEADER_LEN + i * SLOT_LEN;
                    bytes[at..at + SLOT_LEN].copy_from_slice(&s.encode());
                }
            }
            self.dirty.clear();
            return Some(RingWrite { offset: 0, bytes });
        }
        let i = self.dirty.pop()?;
        let slot = self.slots[i].expect("a dirty slot is filled");
        Some(RingWrite {
            offset: (HEADER_LEN + i * SLOT_LEN) as u64,
            bytes: slot.encode().to_vec(),
        })
    }

    /// The slots of the 24 hours up to `now_ns`, oldest first (a minute
    /// without a slot is absent).
    pub fn slots(&self, now_ns: u64) -> Vec<LagSlot> {
        let now = minute_of(now_ns);
        let from = now.saturating_sub(SLOTS as u64 - 1);
        let mut out: Vec<LagSlot> = self
            .slots
            .iter()
            .flatten()
            .filter(|s| (from..=now).contains(&s.minute))
            .copied()
            .collect();
        out.sort_by_key(|s| s.minute);
        out
    }
}

/// A ring kept in a file through the storage seam.
pub struct LagRingFile<D: LogDir> {
    ring: LagRing,
    file: D::File,
    synced_at: std::time::Instant,
    unsynced: bool,
}

impl<D: LogDir> LagRingFile<D> {
    /// Opens the ring in `dir` (created if absent or not a ring).
    pub fn open(dir: &D, now_ns: u64) -> io::Result<LagRingFile<D>> {
        let file = match dir.open(LAG_RING_FILE, true) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                let f = dir.create(LAG_RING_FILE)?;
                dir.sync_dir()?;
                f
            }
            Err(e) => return Err(e),
        };
        let len = file.size()?.min(FILE_LEN as u64) as usize;
        let mut bytes = vec![0u8; len];
        let got = file.read_full_at(&mut bytes, 0)?;
        bytes.truncate(got);
        Ok(LagRingFile {
            ring: LagRing::from_bytes(&bytes, now_ns),
            file,
            synced_at: std::time::Instant::now(),
            unsynced: false,
        })
    }

    /// Takes one report and writes what changed.
    pub fn handle_report(
        &mut self,
        lag_ms: u64,
        pending_bytes: u64,
        critical: bool,
        now_ns: u64,
    ) -> io::Result<()> {
        self.ring
            .handle_report(lag_ms, pending_bytes, critical, now_ns);
        while let Some(w) = self.ring.poll_write() {
            self.file.write_all_at(&[&w.bytes], w.offset)?;
            self.unsynced = true;
        }
        if self.unsynced && self.synced_at.elapsed() >= SYNC_EVERY {
            self.sync()?;
        }
        Ok(())
    }

    /// Makes what was written durable.
    pub fn sync(&mut self) -> io::Result<()> {
        if self.unsynced {
            self.file.sync_data()?;
            self.unsynced = false;
        }
        self.synced_at = std::time::Instant::now();
        Ok(())
    }

    /// The ring.
    pub fn ring(&self) -> &LagRing {
        &self.ring
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tidemark_durable::SimDir;

    const MIN: u64 = 60_000_000_000;
    /// A minute of 2026 (any minute far from 0 would do).
    const T0: u64 = 29_610_000 * MIN;

    #[test]
    fn a_minute_keeps_its_highest_and_last_lag_and_most_pending() {
        let mut ring = LagRing::from_bytes(&[], T0);
        ring.handle_report(500, 10, false, T0);
        ring.handle_report(2_000, 40, false, T0 + MIN / 3);
        ring.handle_report(700, 20, true, T0 + MIN / 2);
        ring.handle_report(100, 0, false, T0 + MIN);
        let slots = ring.slots(T0 + MIN);
        assert_eq!(slots.len(), 2);
        assert_eq!(
            slots[0],
            LagSlot {
                minute: T0 / MIN,
                max_lag_ms: 2_000,
                last_lag_ms: 700,
                pending_bytes: 40,
                critical: true,
            }
        );
        assert_eq!((slots[1].max_lag_ms, slots[1].critical), (100, false));
    }

    #[test]
    fn the_ring_wraps_after_a_day_and_forgets_what_is_older() {
        let mut ring = LagRing::from_bytes(&[], T0);
        for m in 0..SLOTS as u64 + 10 {
            ring.handle_report(m, m, false, T0 + m * MIN);
        }
        let now = T0 + (SLOTS as u64 + 9) * MIN;
        let slots = ring.slots(now);
        assert_eq!(slots.len(), SLOTS, "one day of minutes");
        assert_eq!(
            slots[0].minute,
            T0 / MIN + 10,
            "the oldest ten were overwritten"
        );
        assert_eq!(slots.last().unwrap().max_lag_ms, SLOTS as u32 + 9);
        // A day and more without reports: nothing is shown as current.
        assert!(ring.slots(now + 2 * SLOTS as u64 * MIN).is_empty());
        // Ten minutes on, the ten oldest are out of the window.
        assert_eq!(ring.slots(now + 10 * MIN).len(), SLOTS - 10);
    }

    /// Writes a ring through a simulated directory, reopens it with each
    /// byte of each slot flipped: the slot reads as empty, never as a
    /// different value; a damaged header starts the ring afresh.
    #[test]
    fn a_damaged_slot_reads_as_empty_never_as_a_wrong_value() {
        let dir = SimDir::new();
        let mut f = LagRingFile::open(&dir, T0).unwrap();
        for m in 0..3u64 {
            f.handle_report(1_000 * (m + 1), 4096, false, T0 + m * MIN)
                .unwrap();
        }
        f.sync().unwrap();
        let good = dir.after_power_cut()[LAG_RING_FILE].clone();
        assert_eq!(good.len(), FILE_LEN);
        let now = T0 + 2 * MIN;
        let want = LagRing::from_bytes(&good, now).slots(now);
        assert_eq!(want.len(), 3);
        let i = (T0 / MIN) as usize % SLOTS + 1;
        let at = HEADER_LEN + i * SLOT_LEN;
        for byte in at..at + SLOT_LEN {
            for bit in 0..8 {
                let mut bad = good.clone();
                bad[byte] ^= 1 << bit;
                let got = LagRing::from_bytes(&bad, now).slots(now);
                assert_eq!(got, [want[0], want[2]], "byte {byte} bit {bit}");
            }
        }
        for byte in 0..HEADER_LEN {
            let mut bad = good.clone();
            bad[byte] ^= 1;
            let mut ring = LagRing::from_bytes(&bad, now);
            assert!(ring.slots(now).is_empty(), "header byte {byte}");
            let w = ring.poll_write().expect("a fresh file is written");
            assert_eq!((w.offset, w.bytes.len()), (0, FILE_LEN));
        }
        // A slot moved to another minute's place does not count either.
        let mut moved = good.clone();
        moved.copy_within(at..at + SLOT_LEN, at + SLOT_LEN);
        let got = LagRing::from_bytes(&moved, now).slots(now);
        assert_eq!(
            got,
            [want[0], want[1]],
            "the copy at the next minute's place is no slot"
        );
    }

    #[test]
    fn reopened_the_ring_goes_on_where_it_was() {
        let dir = SimDir::new();
        let mut f = LagRingFile::open(&dir, T0).unwrap();
        f.handle_report(1_500, 1, false, T0).unwrap();
        f.sync().unwrap();
        drop(f);
        let mut f = LagRingFile::open(&dir, T0 + MIN).unwrap();
        f.handle_report(2_500, 2, false, T0 + MIN).unwrap();
        let lags: Vec<u32> = f
            .ring()
            .slots(T0 + MIN)
            .iter()
            .map(|s| s.max_lag_ms)
            .collect();
        assert_eq!(lags, [1_500, 2_500]);
    }
}
