//! `log-writes-replay`: replays the kernel's dm-log-writes log onto an
//! image, so the kernel VM tests can hold our change log against a witness
//! that shares none of our code: device-mapper's own record of every write
//! that reached the device under it, with the marks sent to it
//! (`dmsetup message DEV 0 mark NAME`).
//!
//! ```text
//! log-writes-replay LOG [--onto IMAGE] [--until-mark NAME] [--discard-as-zeroes]
//! log-writes-replay LOG --dump
//! ```
//!
//! Without `--onto` it only walks and checks the log; `--dump` prints one
//! line per entry instead (index, block, blocks, flags, mark). It prints one line of
//! `key=value` fields (entries, writes, bytes, flushes, FUA writes,
//! discards, marks) and exits 1 with a message on a malformed log, a mark
//! that is not there, a discard it was not told how to replay, or a write
//! past the end of the image.
//!
//! # The log's format (kernel `drivers/md/dm-log-writes.c`, version 1)
//!
//! Little-endian throughout. `B` is the data device's logical block size,
//! written in the super block; every position and length in the log is a
//! whole number of blocks.
//!
//! ```text
//! offset 0, one block: the super block
//!   0   u64  magic        0x6a736677736872
//!   8   u64  version      1
//!   16  u64  nr_entries   entries the super block vouches for
//!   24  u32  sectorsize   B (a power of two, 512 or more)
//!   28   ... zero
//! then nr_entries entries, back to back, each:
//!   one block: the entry header
//!     0   u64  sector      first block written, in units of B
//!     8   u64  nr_sectors  blocks written (or discarded), in units of B
//!     16  u64  flags       1 FLUSH, 2 FUA, 4 DISCARD, 8 MARK, 16 METADATA
//!     24  u64  data_len    MARK: the mark's length; otherwise 0
//!     32   ... MARK: the mark's text (data_len bytes), then zero
//!   then nr_sectors blocks of the data written (none for a DISCARD,
//!   a MARK or a bare FLUSH)
//! ```
//!
//! The kernel logs a write once it has completed and a FLUSH covered it (a
//! FUA write at once), and rewrites the super block after every FUA or MARK
//! entry; entries past `nr_entries` may be unfinished and are ignored. The
//! whole log is only settled once the target is removed (`dmsetup remove`
//! waits for the log's own writes and appends a last mark,
//! `dm-log-writes-end`).

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::process::ExitCode;

/// The super block's magic number.
const MAGIC: u64 = 0x006a_7366_7773_6872;
/// The only format version there is.
const VERSION: u64 = 1;
/// Entry flags.
const FLUSH: u64 = 1 << 0;
const FUA: u64 = 1 << 1;
const DISCARD: u64 = 1 << 2;
const MARK: u64 = 1 << 3;
const METADATA: u64 = 1 << 4;
const KNOWN_FLAGS: u64 = FLUSH | FUA | DISCARD | MARK | METADATA;
/// Bytes of an entry header before a mark's text.
const ENTRY_HEADER: usize = 32;
/// Bytes of the super block that carry fields.
const SUPER_FIELDS: usize = 28;

/// What is wrong with a log. The log is untrusted input: every fault is
/// one of these, never a panic.
#[derive(Debug, thiserror::Error)]
enum LogError {
    /// The log cannot be read (the local file, not its contents).
    #[error("reading the log")]
    Read(#[source] io::Error),
    /// The log is shorter than a super block: nothing was ever logged, or
    /// it is not a log.
    #[error("the log is {len} bytes, shorter than its super block")]
    TooShort { len: u64 },
    /// The first bytes are not a dm-log-writes super block.
    #[error("bad magic {found:#x} (a dm-log-writes log starts with {MAGIC:#x})")]
    BadMagic { found: u64 },
    /// A format version this replayer does not know.
    #[error("format version {found}, only version {VERSION} is known")]
    UnsupportedVersion { found: u64 },
    /// The block size in the super block is not a power of two of at
    /// least 512 bytes.
    #[error("block size {found} in the super block is not a power of two of 512 or more")]
    BadBlockSize { found: u32 },
    /// An entry the super block vouches for runs past the end of the log.
    #[error(
        "entry {index} at byte {offset} needs {needed} bytes but the log ends at {len}: truncated"
    )]
    Truncated {
        index: u64,
        offset: u64,
        needed: u64,
        len: u64,
    },
    /// An entry carries flags the format does not define.
    #[error("entry {index} has unknown flags {flags:#x}")]
    UnknownFlags { index: u64, flags: u64 },
    /// A mark whose length does not fit its header block, or whose text is
    /// not UTF-8.
    #[error("entry {index} is a mark of {len} bytes that does not fit its block or is not text")]
    BadMark { index: u64, len: u64 },
    /// An entry whose position or length overflows 64-bit byte offsets.
    #[error(
        "entry {index} addresses blocks beyond 2^64 bytes (sector {sector}, {nr_sectors} blocks)"
    )]
    OutOfRange {
        index: u64,
        sector: u64,
        nr_sectors: u64,
    },
}

/// Why a replay stopped short.
#[derive(Debug, thiserror::Error)]
enum ReplayError {
    /// The log is malformed.
    #[error("malformed log")]
    Log(#[from] LogError),
    /// The image cannot be written (the local file).
    #[error("writing the image")]
    Image(#[source] io::Error),
    /// A discard, and no rule for what it leaves on the disk was given:
    /// replaying it any way would be a guess about the device below.
    #[error(
        "entry {index} discards {nr_sectors} blocks at block {sector}; \
         pass --discard-as-zeroes if the device reads zeroes after a discard"
    )]
    Discard {
        index: u64,
        sector: u64,
        nr_sectors: u64,
    },
    /// A write ends past the end of the image: the image is not of the
    /// logged device's size.
    #[error("entry {index} writes up to byte {end}, past the image's {image_len} bytes")]
    PastImage {
        index: u64,
        end: u64,
        image_len: u64,
    },
    /// The log holds no mark of this name.
    #[error("no mark {mark:?} in the log (its marks: {seen:?})")]
    MarkNotFound { mark: String, seen: Vec<String> },
}

/// Positional reads from the log, so a log in a file is never held whole
/// in memory (the guest has little of it).
trait LogBytes {
    fn len(&self) -> Result<u64, LogError>;
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), LogError>;
}

impl LogBytes for File {
    fn len(&self) -> Result<u64, LogError> {
        Ok(self.metadata().map_err(LogError::Read)?.len())
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), LogError> {
        self.read_exact_at(buf, offset).map_err(LogError::Read)
    }
}

impl LogBytes for [u8] {
    fn len(&self) -> Result<u64, LogError> {
        Ok(<[u8]>::len(self) as u64)
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), LogError> {
        // Callers check the bounds against len() first; a short slice here
        // is still an error, not a panic.
        let range = usize::try_from(offset)
            .ok()
            .and_then(|start| Some(start..start.checked_add(buf.len())?));
        match range.and_then(|r| self.get(r)) {
            Some(src) => {
                buf.copy_from_slice(src);
                Ok(())
            }
            None => Err(LogError::Read(io::ErrorKind::UnexpectedEof.into())),
        }
    }
}

/// Positional writes to the image being rebuilt.
trait Image {
    fn len(&self) -> io::Result<u64>;
    fn write_at(&mut self, offset: u64, data: &[u8]) -> io::Result<()>;
}

impl Image for File {
    fn len(&self) -> io::Result<u64> {
        Ok(self.metadata()?.len())
    }
    fn write_at(&mut self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.write_all_at(data, offset)
    }
}

/// An in-memory image of a fixed size, for the tests.
#[cfg(test)]
impl Image for Vec<u8> {
    fn len(&self) -> io::Result<u64> {
        Ok(<[u8]>::len(self) as u64)
    }
    fn write_at(&mut self, offset: u64, data: &[u8]) -> io::Result<()> {
        let start = usize::try_from(offset).map_err(|_| io::ErrorKind::InvalidInput)?;
        let end = start + data.len();
        if end > <[u8]>::len(self) {
            return Err(io::ErrorKind::InvalidInput.into());
        }
        self[start..end].copy_from_slice(data);
        Ok(())
    }
}

/// The super block's fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Super {
    nr_entries: u64,
    block_size: u32,
}

/// One entry, as the log describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Entry {
    /// 0-based position among the entries.
    index: u64,
    /// First block on the data device (units of the block size).
    sector: u64,
    /// Blocks written or discarded.
    nr_sectors: u64,
    flags: u64,
    /// The mark's text, for a MARK entry.
    mark: Option<String>,
    /// Where the data written starts in the log (for a write).
    data_offset: u64,
}

impl Entry {
    fn is_write(&self) -> bool {
        self.flags & (DISCARD | MARK) == 0 && self.nr_sectors > 0
    }
}

impl fmt::Display for Entry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names = [
            (FLUSH, "flush"),
            (FUA, "fua"),
            (DISCARD, "discard"),
            (MARK, "mark"),
            (METADATA, "metadata"),
        ];
        let flags: Vec<&str> = names
            .iter()
            .filter(|(bit, _)| self.flags & bit != 0)
            .map(|(_, name)| *name)
            .collect();
        write!(
            f,
            "entry={} sector={} blocks={} flags={}",
            self.index,
            self.sector,
            self.nr_sectors,
            if flags.is_empty() {
                "-".to_string()
            } else {
                flags.join(",")
            }
        )?;
        if let Some(mark) = &self.mark {
            write!(f, " mark={mark}")?;
        }
        Ok(())
    }
}

fn le_u64(b: &[u8], at: usize) -> u64 {
    let mut v = [0u8; 8];
    v.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(v)
}

/// Reads and checks the super block.
fn read_super(log: &(impl LogBytes + ?Sized)) -> Result<Super, LogError> {
    let len = log.len()?;
    if len < SUPER_FIELDS as u64 {
        return Err(LogError::TooShort { len });
    }
    let mut b = [0u8; SUPER_FIELDS];
    log.read_at(0, &mut b)?;
    let magic = le_u64(&b, 0);
    if magic != MAGIC {
        return Err(LogError::BadMagic { found: magic });
    }
    let version = le_u64(&b, 8);
    if version != VERSION {
        return Err(LogError::UnsupportedVersion { found: version });
    }
    let block_size = u32::from_le_bytes([b[24], b[25], b[26], b[27]]);
    if block_size < 512 || !block_size.is_power_of_two() {
        return Err(LogError::BadBlockSize { found: block_size });
    }
    if len < u64::from(block_size) {
        return Err(LogError::TooShort { len });
    }
    Ok(Super {
        nr_entries: le_u64(&b, 16),
        block_size,
    })
}

/// The entries the super block vouches for, in log order; each is checked
/// (flags, mark, bounds) before it is handed out.
struct Entries<'a, L: LogBytes + ?Sized> {
    log: &'a L,
    len: u64,
    block: u64,
    nr_entries: u64,
    next_index: u64,
    next_offset: u64,
    header: Vec<u8>,
    failed: bool,
}

impl<'a, L: LogBytes + ?Sized> Entries<'a, L> {
    fn new(log: &'a L, sb: Super) -> Result<Self, LogError> {
        let block = u64::from(sb.block_size);
        Ok(Entries {
            log,
            len: log.len()?,
            block,
            nr_entries: sb.nr_entries,
            next_index: 0,
            next_offset: block,
            header: vec![0; sb.block_size as usize],
            failed: false,
        })
    }

    fn read_entry(&mut self) -> Result<Entry, LogError> {
        let index = self.next_index;
        let offset = self.next_offset;
        let truncated = |needed| LogError::Truncated {
            index,
            offset,
            needed,
            len: self.len,
        };
        if offset
            .checked_add(self.block)
            .is_none_or(|end| end > self.len)
        {
            return Err(truncated(self.block));
        }
        self.log.read_at(offset, &mut self.header)?;
        let h = &self.header;
        let (sector, nr_sectors, flags, data_len) =
            (le_u64(h, 0), le_u64(h, 8), le_u64(h, 16), le_u64(h, 24));
        if flags & !KNOWN_FLAGS != 0 {
            return Err(LogError::UnknownFlags { index, flags });
        }
        let out_of_range = LogError::OutOfRange {
            index,
            sector,
            nr_sectors,
        };
        // The device's byte range must be addressable even where no data
        // follows (a discard), or applying it would overflow.
        let device_bytes = nr_sectors.checked_mul(self.block);
        if sector
            .checked_mul(self.block)
            .zip(device_bytes)
            .and_then(|(start, n)| start.checked_add(n))
            .is_none()
        {
            return Err(out_of_range);
        }
        let mark = if flags & MARK != 0 {
            let fits = data_len <= self.block - ENTRY_HEADER as u64;
            let text = fits
                .then(|| std::str::from_utf8(&h[ENTRY_HEADER..ENTRY_HEADER + data_len as usize]))
                .and_then(Result::ok);
            match text {
                Some(t) => Some(t.to_string()),
                None => {
                    return Err(LogError::BadMark {
                        index,
                        len: data_len,
                    })
                }
            }
        } else {
            None
        };
        // Positions follow the kernel's: every entry but a discard is
        // followed by nr_sectors blocks (none for a mark or a bare flush).
        let data_blocks = if flags & DISCARD != 0 { 0 } else { nr_sectors };
        let needed = data_blocks
            .checked_add(1)
            .and_then(|n| n.checked_mul(self.block))
            .ok_or(out_of_range)?;
        if offset.checked_add(needed).is_none_or(|end| end > self.len) {
            return Err(truncated(needed));
        }
        self.next_index += 1;
        self.next_offset = offset + needed;
        Ok(Entry {
            index,
            sector,
            nr_sectors,
            flags,
            mark,
            data_offset: offset + self.block,
        })
    }
}

impl<L: LogBytes + ?Sized> Iterator for Entries<'_, L> {
    type Item = Result<Entry, LogError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed || self.next_index >= self.nr_entries {
            return None;
        }
        let entry = self.read_entry();
        self.failed = entry.is_err();
        Some(entry)
    }
}

/// What a replay (or a walk) went through.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct Summary {
    block_size: u32,
    /// Entries the super block vouches for.
    nr_entries: u64,
    /// Entries gone through, up to and including the mark stopped at.
    entries: u64,
    writes: u64,
    write_bytes: u64,
    flushes: u64,
    fua: u64,
    discards: u64,
    discard_bytes: u64,
    marks: Vec<String>,
    /// The mark the replay stopped at.
    stopped_at: Option<String>,
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "block-size={} nr-entries={} entries={} writes={} write-bytes={} flushes={} \
             fua={} discards={} discard-bytes={} marks={} mark-names={} stopped-at={}",
            self.block_size,
            self.nr_entries,
            self.entries,
            self.writes,
            self.write_bytes,
            self.flushes,
            self.fua,
            self.discards,
            self.discard_bytes,
            self.marks.len(),
            if self.marks.is_empty() {
                "-".to_string()
            } else {
                self.marks.join(",")
            },
            self.stopped_at.as_deref().unwrap_or("end"),
        )
    }
}

/// How to replay.
#[derive(Debug, Default, Clone)]
struct Options {
    /// Stop after the first mark with this text.
    until_mark: Option<String>,
    /// Apply a discard as zeroes (the device reads zeroes after one);
    /// without it a discard is refused.
    discard_as_zeroes: bool,
}

/// Applies the log's entries in order onto `image` (or only walks and
/// checks them when there is none).
fn replay(
    log: &(impl LogBytes + ?Sized),
    mut image: Option<&mut dyn Image>,
    options: &Options,
) -> Result<Summary, ReplayError> {
    let sb = read_super(log)?;
    let block = u64::from(sb.block_size);
    let image_len = match &image {
        Some(image) => Some(image.len().map_err(ReplayError::Image)?),
        None => None,
    };
    let mut summary = Summary {
        block_size: sb.block_size,
        nr_entries: sb.nr_entries,
        ..Summary::default()
    };
    let mut buf = vec![0u8; 1 << 20];
    for entry in Entries::new(log, sb)? {
        let entry = entry?;
        summary.entries += 1;
        if entry.flags & FLUSH != 0 {
            summary.flushes += 1;
        }
        if entry.flags & FUA != 0 {
            summary.fua += 1;
        }
        // Bounds were checked by the iterator: these cannot overflow.
        let start = entry.sector * block;
        let bytes = entry.nr_sectors * block;
        if entry.flags & DISCARD != 0 && entry.nr_sectors > 0 {
            summary.discards += 1;
            summary.discard_bytes += bytes;
            if !options.discard_as_zeroes {
                return Err(ReplayError::Discard {
                    index: entry.index,
                    sector: entry.sector,
                    nr_sectors: entry.nr_sectors,
                });
            }
        }
        if entry.is_write() {
            summary.writes += 1;
            summary.write_bytes += bytes;
        }
        let touches = entry.is_write() || entry.flags & DISCARD != 0 && entry.nr_sectors > 0;
        if let (Some(image), Some(image_len), true) = (image.as_deref_mut(), image_len, touches) {
            if start + bytes > image_len {
                return Err(ReplayError::PastImage {
                    index: entry.index,
                    end: start + bytes,
                    image_len,
                });
            }
            let mut done = 0;
            while done < bytes {
                let n = (bytes - done).min(buf.len() as u64) as usize;
                if entry.is_write() {
                    log.read_at(entry.data_offset + done, &mut buf[..n])?;
                } else {
                    buf[..n].fill(0);
                }
                image
                    .write_at(start + done, &buf[..n])
                    .map_err(ReplayError::Image)?;
                done += n as u64;
            }
        }
        if let Some(mark) = entry.mark {
            let stop = options.until_mark.as_deref() == Some(mark.as_str());
            summary.marks.push(mark.clone());
            if stop {
                summary.stopped_at = Some(mark);
                return Ok(summary);
            }
        }
    }
    match &options.until_mark {
        Some(mark) => Err(ReplayError::MarkNotFound {
            mark: mark.clone(),
            seen: summary.marks,
        }),
        None => Ok(summary),
    }
}

/// Writes one line per entry the super block vouches for; returns how many.
fn dump(log: &(impl LogBytes + ?Sized), out: &mut dyn io::Write) -> Result<u64, String> {
    let sb = read_super(log).map_err(|e| report(&e))?;
    let mut n = 0;
    for entry in Entries::new(log, sb).map_err(|e| report(&e))? {
        let entry = entry.map_err(|e| report(&e))?;
        writeln!(out, "{entry}").map_err(|e| format!("writing the dump: {e}"))?;
        n += 1;
    }
    Ok(n)
}

/// The command line.
struct Args {
    log: PathBuf,
    onto: Option<PathBuf>,
    options: Options,
    dump: bool,
}

const USAGE: &str = "usage: log-writes-replay LOG [--onto IMAGE] [--until-mark NAME] \
                     [--discard-as-zeroes] | LOG --dump";

fn parse_args(mut args: impl Iterator<Item = std::ffi::OsString>) -> Result<Args, String> {
    let mut log = None;
    let mut onto = None;
    let mut options = Options::default();
    let mut dump = false;
    while let Some(arg) = args.next() {
        match arg.to_str() {
            Some("--onto") => onto = Some(PathBuf::from(args.next().ok_or("--onto needs a file")?)),
            Some("--until-mark") => {
                let name = args.next().ok_or("--until-mark needs a name")?;
                options.until_mark = Some(name.into_string().map_err(|_| "a mark is text")?);
            }
            Some("--discard-as-zeroes") => options.discard_as_zeroes = true,
            Some("--dump") => dump = true,
            Some("-h" | "--help") => return Err(USAGE.to_string()),
            Some(s) if s.starts_with('-') => return Err(format!("unknown option {s}\n{USAGE}")),
            _ if log.is_none() => log = Some(PathBuf::from(arg)),
            _ => return Err(format!("one log only\n{USAGE}")),
        }
    }
    if dump && (onto.is_some() || options.until_mark.is_some()) {
        return Err(format!("--dump replays nothing\n{USAGE}"));
    }
    Ok(Args {
        log: log.ok_or(USAGE)?,
        onto,
        options,
        dump,
    })
}

/// The error and its causes, one line.
fn report(e: &dyn std::error::Error) -> String {
    let mut line = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        line.push_str(&format!(": {c}"));
        cause = c.source();
    }
    line
}

fn main() -> ExitCode {
    let args = match parse_args(std::env::args_os().skip(1)) {
        Ok(args) => args,
        Err(msg) => {
            eprintln!("{msg}");
            return ExitCode::from(2);
        }
    };
    let run = || -> Result<(), String> {
        let log = File::open(&args.log).map_err(|e| format!("{}: {e}", args.log.display()))?;
        if args.dump {
            dump(&log, &mut io::stdout().lock())
                .map_err(|e| format!("{}: {e}", args.log.display()))?;
            return Ok(());
        }
        let mut image = match &args.onto {
            Some(path) => Some(
                OpenOptions::new()
                    .write(true)
                    .create(true)
                    .truncate(false)
                    .open(path)
                    .map_err(|e| format!("{}: {e}", path.display()))?,
            ),
            None => None,
        };
        let summary = replay(
            &log,
            image.as_mut().map(|f| f as &mut dyn Image),
            &args.options,
        )
        .map_err(|e| format!("{}: {}", args.log.display(), report(&e)))?;
        if let Some(image) = &image {
            image
                .sync_all()
                .map_err(|e| format!("syncing the image: {e}"))?;
        }
        println!("{summary}");
        Ok(())
    };
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(msg) => {
            eprintln!("log-writes-replay: {msg}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    /// Builds a log as the kernel lays it out, block by block.
    struct LogBuilder {
        block: usize,
        body: Vec<u8>,
        entries: u64,
    }

    impl LogBuilder {
        fn new(block: usize) -> Self {
            LogBuilder {
                block,
                body: Vec::new(),
                entries: 0,
            }
        }

        fn header(&mut self, sector: u64, nr_sectors: u64, flags: u64, text: &[u8]) {
            let mut h = vec![0u8; self.block];
            h[0..8].copy_from_slice(&sector.to_le_bytes());
            h[8..16].copy_from_slice(&nr_sectors.to_le_bytes());
            h[16..24].copy_from_slice(&flags.to_le_bytes());
            h[24..32].copy_from_slice(&(text.len() as u64).to_le_bytes());
            h[32..32 + text.len()].copy_from_slice(text);
            self.body.extend_from_slice(&h);
            self.entries += 1;
        }

        /// A write of `blocks` blocks at `sector`, each filled with `fill`.
        fn write(mut self, sector: u64, blocks: u64, fill: u8, flags: u64) -> Self {
            self.header(sector, blocks, flags, b"");
            self.body
                .extend(std::iter::repeat_n(fill, blocks as usize * self.block));
            self
        }

        fn flush(mut self) -> Self {
            self.header(0, 0, FLUSH, b"");
            self
        }

        fn discard(mut self, sector: u64, blocks: u64) -> Self {
            self.header(sector, blocks, DISCARD, b"");
            self
        }

        fn mark(mut self, name: &str) -> Self {
            self.header(0, 0, MARK, name.as_bytes());
            self
        }

        fn build(&self) -> Vec<u8> {
            self.build_claiming(self.entries)
        }

        /// The log with a super block claiming `nr_entries`.
        fn build_claiming(&self, nr_entries: u64) -> Vec<u8> {
            let mut log = vec![0u8; self.block];
            log[0..8].copy_from_slice(&MAGIC.to_le_bytes());
            log[8..16].copy_from_slice(&VERSION.to_le_bytes());
            log[16..24].copy_from_slice(&nr_entries.to_le_bytes());
            log[24..28].copy_from_slice(&(self.block as u32).to_le_bytes());
            log.extend_from_slice(&self.body);
            log
        }
    }

    const B: usize = 512;

    fn sample() -> LogBuilder {
        LogBuilder::new(B)
            .write(0, 2, 0xaa, 0)
            .write(4, 1, 0xbb, FUA | METADATA)
            .flush()
            .mark("m1")
            .write(1, 1, 0xcc, 0)
            .flush()
            .mark("m2")
    }

    fn until(mark: &str) -> Options {
        Options {
            until_mark: Some(mark.to_string()),
            ..Options::default()
        }
    }

    fn replay_onto(log: &[u8], blocks: usize, options: &Options) -> Result<Vec<u8>, ReplayError> {
        let mut image = vec![0u8; blocks * B];
        replay(log, Some(&mut image), options)?;
        Ok(image)
    }

    fn expected(blocks: &[u8]) -> Vec<u8> {
        blocks
            .iter()
            .flat_map(|&b| std::iter::repeat_n(b, B))
            .collect()
    }

    #[test]
    fn replays_up_to_each_mark() {
        let log = sample().build();
        assert_eq!(
            replay_onto(&log, 6, &until("m1")).unwrap(),
            expected(&[0xaa, 0xaa, 0, 0, 0xbb, 0])
        );
        assert_eq!(
            replay_onto(&log, 6, &until("m2")).unwrap(),
            expected(&[0xaa, 0xcc, 0, 0, 0xbb, 0])
        );
        assert_eq!(
            replay_onto(&log, 6, &Options::default()).unwrap(),
            expected(&[0xaa, 0xcc, 0, 0, 0xbb, 0])
        );
    }

    #[test]
    fn counts_what_it_went_through() {
        let log = sample().build();
        let s = replay(&log[..], None, &until("m1")).unwrap();
        assert_eq!(
            s,
            Summary {
                block_size: B as u32,
                nr_entries: 7,
                entries: 4,
                writes: 2,
                write_bytes: 3 * B as u64,
                flushes: 1,
                fua: 1,
                marks: vec!["m1".into()],
                stopped_at: Some("m1".into()),
                ..Summary::default()
            }
        );
        let s = replay(&log[..], None, &Options::default()).unwrap();
        assert_eq!((s.entries, s.writes, s.flushes), (7, 3, 2));
        assert_eq!(s.marks, ["m1", "m2"]);
        assert_eq!(s.stopped_at, None);
        assert!(s.to_string().contains("mark-names=m1,m2 stopped-at=end"));
    }

    #[test]
    fn a_mark_not_in_the_log_is_an_error() {
        let log = sample().build();
        match replay(&log[..], None, &until("m3")) {
            Err(ReplayError::MarkNotFound { mark, seen }) => {
                assert_eq!(mark, "m3");
                assert_eq!(seen, ["m1", "m2"]);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn entries_past_the_super_blocks_count_are_ignored() {
        let log = sample().build_claiming(4);
        let s = replay(&log[..], None, &Options::default()).unwrap();
        assert_eq!((s.entries, s.marks.len()), (4, 1));
    }

    #[test]
    fn every_cut_of_the_log_is_a_typed_error() {
        let log = sample().build();
        for cut in 0..log.len() {
            match replay(&log[..cut], None, &Options::default()) {
                Err(ReplayError::Log(LogError::TooShort { .. } | LogError::Truncated { .. })) => {}
                other => panic!("cut at {cut}: {other:?}"),
            }
        }
        // A data block missing mid-log names the entry.
        let mut builder = LogBuilder::new(B).write(0, 2, 1, 0);
        builder.body.truncate(builder.body.len() - B);
        match replay(&builder.build()[..], None, &Options::default()) {
            Err(ReplayError::Log(LogError::Truncated {
                index: 0,
                offset,
                needed,
                ..
            })) => assert_eq!((offset, needed), (B as u64, 3 * B as u64)),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_bad_super_block_is_refused() {
        let good = sample().build();
        let mut log = good.clone();
        log[0] ^= 1;
        assert!(matches!(
            replay(&log[..], None, &Options::default()),
            Err(ReplayError::Log(LogError::BadMagic { .. }))
        ));
        let mut log = good.clone();
        log[8] = 2;
        assert!(matches!(
            replay(&log[..], None, &Options::default()),
            Err(ReplayError::Log(LogError::UnsupportedVersion { found: 2 }))
        ));
        for size in [0u32, 256, 1000, 4097] {
            let mut log = good.clone();
            log[24..28].copy_from_slice(&size.to_le_bytes());
            assert!(matches!(
                replay(&log[..], None, &Options::default()),
                Err(ReplayError::Log(LogError::BadBlockSize { .. }))
            ));
        }
        // A block size larger than the log itself.
        let mut log = good;
        log[24..28].copy_from_slice(&(1u32 << 20).to_le_bytes());
        assert!(matches!(
            replay(&log[..], None, &Options::default()),
            Err(ReplayError::Log(LogError::TooShort { .. }))
        ));
    }

    #[test]
    fn bad_entries_are_refused() {
        let header = B; // the first entry's header
        let cases: [(usize, u64); 4] = [
            (16, 1 << 7),   // unknown flag
            (8, u64::MAX),  // nr_sectors overflows
            (0, u64::MAX),  // sector overflows
            (24, B as u64), // (with MARK below) a mark longer than its block
        ];
        for (field, value) in cases {
            let mut log = LogBuilder::new(B).mark("m").build();
            log[header + field..header + field + 8].copy_from_slice(&value.to_le_bytes());
            let got = replay(&log[..], None, &Options::default());
            assert!(
                matches!(
                    got,
                    Err(ReplayError::Log(
                        LogError::UnknownFlags { .. }
                            | LogError::OutOfRange { .. }
                            | LogError::BadMark { .. }
                    ))
                ),
                "field at {field} = {value:#x}: {got:?}"
            );
        }
        let mut log = LogBuilder::new(B).mark("m").build();
        log[header + 32] = 0xff; // not UTF-8
        assert!(matches!(
            replay(&log[..], None, &Options::default()),
            Err(ReplayError::Log(LogError::BadMark { index: 0, len: 1 }))
        ));
    }

    #[test]
    fn random_bit_flips_never_panic() {
        let good = sample().build();
        // A fixed pseudo-random sequence: reproducible.
        let mut rng = StdRng::seed_from_u64(0x9e37_79b9_7f4a_7c15);
        for _ in 0..2000 {
            let mut log = good.clone();
            for _ in 0..3 {
                let bit = rng.random_range(0..log.len() * 8);
                log[bit / 8] ^= 1 << (bit % 8);
            }
            let mut image = vec![0u8; 6 * B];
            let _ = replay(&log[..], Some(&mut image), &Options::default());
        }
    }

    #[test]
    fn discards_are_refused_unless_told_they_read_zeroes() {
        let log = LogBuilder::new(B)
            .write(0, 3, 0xaa, 0)
            .discard(1, 1)
            .mark("m")
            .build();
        match replay_onto(&log, 3, &Options::default()) {
            Err(ReplayError::Discard {
                index: 1,
                sector: 1,
                nr_sectors: 1,
            }) => {}
            other => panic!("{other:?}"),
        }
        let zeroes = Options {
            discard_as_zeroes: true,
            ..Options::default()
        };
        assert_eq!(
            replay_onto(&log, 3, &zeroes).unwrap(),
            expected(&[0xaa, 0, 0xaa])
        );
        let s = replay(&log[..], None, &zeroes).unwrap();
        assert_eq!((s.discards, s.discard_bytes), (1, B as u64));
    }

    #[test]
    fn a_write_past_the_image_is_refused() {
        let log = LogBuilder::new(B).write(2, 2, 1, 0).build();
        match replay_onto(&log, 3, &Options::default()) {
            Err(ReplayError::PastImage {
                index: 0,
                end,
                image_len,
            }) => assert_eq!((end, image_len), (4 * B as u64, 3 * B as u64)),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn large_writes_cross_the_copy_buffer() {
        // 3 MiB in one entry: copied through the 1 MiB buffer in pieces.
        let blocks = 3 * 2048;
        let log = LogBuilder::new(B).write(1, blocks, 0x5a, 0).build();
        let image = replay_onto(&log, blocks as usize + 2, &Options::default()).unwrap();
        assert!(image[..B].iter().all(|&b| b == 0));
        assert!(image[B..(blocks as usize + 1) * B]
            .iter()
            .all(|&b| b == 0x5a));
        assert!(image[(blocks as usize + 1) * B..].iter().all(|&b| b == 0));
    }

    #[test]
    fn the_dump_has_a_line_per_entry() {
        let log = sample().build();
        let mut out = Vec::new();
        assert_eq!(dump(&log[..], &mut out).unwrap(), 7);
        let text = String::from_utf8(out).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 7);
        assert_eq!(lines[0], "entry=0 sector=0 blocks=2 flags=-");
        assert_eq!(lines[1], "entry=1 sector=4 blocks=1 flags=fua,metadata");
        assert_eq!(lines[2], "entry=2 sector=0 blocks=0 flags=flush");
        assert_eq!(lines[3], "entry=3 sector=0 blocks=0 flags=mark mark=m1");
        let cut = &log[..log.len() - 1];
        assert!(dump(cut, &mut Vec::new())
            .unwrap_err()
            .contains("truncated"));
    }

    #[test]
    fn the_command_line() {
        let args = |v: &[&str]| parse_args(v.iter().map(std::ffi::OsString::from));
        let a = args(&["log", "--onto", "img", "--until-mark", "m1"]).unwrap();
        assert_eq!(a.log, PathBuf::from("log"));
        assert_eq!(a.onto, Some(PathBuf::from("img")));
        assert_eq!(a.options.until_mark.as_deref(), Some("m1"));
        assert!(!a.options.discard_as_zeroes);
        assert!(
            args(&["log", "--discard-as-zeroes"])
                .unwrap()
                .options
                .discard_as_zeroes
        );
        assert!(args(&[]).is_err());
        assert!(args(&["log", "--until-mark"]).is_err());
        assert!(args(&["log", "--bogus"]).is_err());
        assert!(args(&["a", "b"]).is_err());
        assert!(args(&["log", "--dump"]).unwrap().dump);
        assert!(args(&["log", "--dump", "--onto", "img"]).is_err());
    }
}
