//! Append throughput of the change log on a real filesystem: write records of
//! 4 KiB and 64 KiB with a barrier (one fdatasync) every 1, 32 or 1024
//! records, the way the tracker drives the log.
//!
//! Each case opens a fresh log in its own temporary directory, then times
//! everything from the first append to the final sync: record encoding and
//! CRC, the pwrites into the preallocated segment, every barrier's
//! fdatasync, and every segment roll (seal sync, fallocate of the next
//! segment, header sync, directory fsync), because a running tracker pays
//! all of those. Opening the log (creating the first segment) is not timed,
//! just as fio does not time laying out its file.
//!
//! `scripts/bench-log.sh` runs this beside fio writing the same bytes with
//! the same fdatasync pattern and prints the ratio.
//!
//! ```text
//! cargo bench -p tidemark-changelog --bench append -- [options]
//!   --dir PATH            parent of the per-case log directories
//!                         (default $TIDEMARK_BENCH_DIR, else <target>/bench-tmp)
//!   --bytes SIZE          payload bytes per case, e.g. 256MiB (default: per case,
//!                         see `default_bytes`; or $TIDEMARK_BENCH_BYTES)
//!   --record-size LIST    payload sizes, e.g. 4k,64k (default 4k,64k)
//!   --barrier-every LIST  records per barrier, e.g. 1,32,1024 (default 1,32,1024)
//!   --segment-size SIZE   log segment size (default 64MiB)
//!   --repeat N            run every case N times (default 1)
//!   --json                print results as one JSON document
//! ```
//!
//! Without `--bench` (that is, under `cargo test --all-targets`) every case
//! runs once with 1 MiB, as a smoke test.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use rand::rngs::SmallRng;
use rand::{RngCore, SeedableRng};
use tidemark_changelog::record::HEADER_LEN;
use tidemark_changelog::{now_ns, ChangeLog, DiskId, Entry, FsDir, LogOptions, RecoveryPolicy};

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

/// Payload bytes per case in smoke-test mode.
const SMOKE_BYTES: u64 = MIB;

/// Payload bytes per case when none are given. Sized so that all six cases
/// take about 20 s on a 2-core VM with a virtio disk: the cases with a
/// barrier after every record are bound by fdatasync latency, not by
/// bandwidth, so they get a quarter of the bytes and still run for seconds.
fn default_bytes(record_size: u64, barrier_every: u64) -> u64 {
    let base = if record_size <= 4 * KIB {
        256 * MIB
    } else {
        GIB
    };
    if barrier_every == 1 {
        base / 4
    } else {
        base
    }
}

struct Args {
    dir: Option<PathBuf>,
    bytes: Option<u64>,
    record_sizes: Vec<u64>,
    barrier_every: Vec<u64>,
    segment_size: u64,
    repeat: u32,
    json: bool,
    bench: bool,
}

const USAGE: &str = "usage: append [--bench] [--dir PATH] [--bytes SIZE] [--record-size LIST] \
     [--barrier-every LIST] [--segment-size SIZE] [--repeat N] [--json]";

/// Parses "4096", "4k", "64KiB", "256MiB", "1G".
fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (digits, unit) = t.split_at(split);
    let n: u64 = digits.parse().map_err(|_| format!("bad size {s:?}"))?;
    let mult = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kib" => KIB,
        "m" | "mib" => MIB,
        "g" | "gib" => GIB,
        _ => return Err(format!("bad size unit in {s:?}")),
    };
    n.checked_mul(mult)
        .filter(|&v| v > 0)
        .ok_or_else(|| format!("bad size {s:?}"))
}

fn parse_list(s: &str, item: fn(&str) -> Result<u64, String>) -> Result<Vec<u64>, String> {
    s.split(',').map(item).collect()
}

fn parse_count(s: &str) -> Result<u64, String> {
    s.trim()
        .parse::<u64>()
        .ok()
        .filter(|&n| n > 0)
        .ok_or_else(|| format!("bad count {s:?}"))
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        dir: std::env::var_os("TIDEMARK_BENCH_DIR").map(PathBuf::from),
        bytes: match std::env::var("TIDEMARK_BENCH_BYTES") {
            Ok(v) => Some(parse_size(&v)?),
            Err(_) => None,
        },
        record_sizes: vec![4 * KIB, 64 * KIB],
        barrier_every: vec![1, 32, 1024],
        segment_size: 64 * MIB,
        repeat: 1,
        json: false,
        bench: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = || it.next().ok_or_else(|| format!("{arg} needs a value"));
        match arg.as_str() {
            "--bench" => args.bench = true,
            "--json" => args.json = true,
            "--dir" => args.dir = Some(PathBuf::from(value()?)),
            "--bytes" => args.bytes = Some(parse_size(&value()?)?),
            "--record-size" => args.record_sizes = parse_list(&value()?, parse_size)?,
            "--barrier-every" => args.barrier_every = parse_list(&value()?, parse_count)?,
            "--segment-size" => args.segment_size = parse_size(&value()?)?,
            "--repeat" => {
                args.repeat = u32::try_from(parse_count(&value()?)?).map_err(|e| e.to_string())?
            }
            "-h" | "--help" => return Err(USAGE.to_string()),
            other => return Err(format!("unknown argument {other:?}\n{USAGE}")),
        }
    }
    Ok(args)
}

/// `<target>/bench-tmp`: the cargo target directory is the nearest ancestor
/// of this executable that holds cargo's `CACHEDIR.TAG`. (`cargo bench`
/// runs benches from the package directory, so the current directory is
/// not the workspace root.)
fn default_dir() -> PathBuf {
    let exe = std::env::current_exe().ok();
    let target = exe
        .as_deref()
        .and_then(|exe| exe.ancestors().find(|d| d.join("CACHEDIR.TAG").is_file()));
    match target {
        Some(t) => t.join("bench-tmp"),
        None => PathBuf::from("target").join("bench-tmp"),
    }
}

/// Incompressible payload, generated once (seeded), so that nothing
/// between the log and the disk can cheat on all-zero pages.
fn random_bytes(len: usize) -> Vec<u8> {
    let mut out = vec![0; len];
    SmallRng::seed_from_u64(1).fill_bytes(&mut out);
    out
}

struct CaseResult {
    record_size: u64,
    barrier_every: u64,
    records: u64,
    barriers: u64,
    payload_bytes: u64,
    log_bytes: u64,
    segments: u64,
    seconds: f64,
    /// CPU time of the process during the case, user and system: how much
    /// of `seconds` was spent computing (CRC, copies into the page cache,
    /// writeback submitted from fdatasync) rather than waiting on the disk.
    cpu_user: f64,
    cpu_sys: f64,
}

impl CaseResult {
    fn mb_per_s(&self) -> f64 {
        self.payload_bytes as f64 / self.seconds / 1e6
    }

    fn records_per_s(&self) -> f64 {
        self.records as f64 / self.seconds
    }
}

fn run_case(
    base: &Path,
    record_size: u64,
    barrier_every: u64,
    bytes: u64,
    segment_size: u64,
) -> Result<CaseResult, String> {
    let records = (bytes / record_size).max(1);
    let payload_bytes = records * record_size;
    let barriers = records / barrier_every;
    let log_bytes = records * (record_size + HEADER_LEN as u64) + barriers * HEADER_LEN as u64;
    let tmp = tempfile::Builder::new()
        .prefix("append-")
        .tempdir_in(base)
        .map_err(|e| format!("creating a directory in {}: {e}", base.display()))?;
    let dir = FsDir::create_all(&tmp.path().join("log")).map_err(|e| e.to_string())?;
    // Room for every record plus slack, so the log never overflows.
    let size_limit = (log_bytes / segment_size + 4) * segment_size;
    let opts = LogOptions {
        segment_size,
        size_limit,
    };
    let (mut log, _recovery) = ChangeLog::open(
        dir,
        opts,
        RecoveryPolicy::CleanStop { last_seq: None },
        now_ns(),
    )
    .map_err(|e| e.to_string())?;

    // A pool a little larger than one record; each record takes a different
    // window of it, so consecutive records differ.
    let size = usize::try_from(record_size).map_err(|e| e.to_string())?;
    let pool = random_bytes(size + 4096);
    let err = |e: tidemark_changelog::AppendError| e.to_string();

    let (user0, sys0) = cpu_times();
    let start = Instant::now();
    for i in 0..records {
        let shift = (i as usize % 512) * 8;
        let payload = &pool[shift..shift + size];
        log.append(&Entry::write(DiskId(0), i * record_size, payload, now_ns()))
            .map_err(err)?;
        if (i + 1) % barrier_every == 0 {
            log.barrier(now_ns()).map_err(err)?;
        }
    }
    // Like fio's end_fsync: whatever follows the last barrier is made durable.
    log.sync().map_err(err)?;
    let seconds = start.elapsed().as_secs_f64();
    let (user1, sys1) = cpu_times();

    let segments = log.bytes_in_use() / segment_size;
    drop(log);
    tmp.close()
        .map_err(|e| format!("removing the case directory: {e}"))?;
    settle();
    Ok(CaseResult {
        record_size,
        barrier_every,
        records,
        barriers,
        payload_bytes,
        log_bytes,
        segments,
        seconds,
        cpu_user: user1 - user0,
        cpu_sys: sys1 - sys0,
    })
}

/// User and system CPU seconds this process has used so far.
fn cpu_times() -> (f64, f64) {
    // SAFETY: an all-zero `rusage` is a valid value of this plain C struct.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: getrusage writes into the struct we own; RUSAGE_SELF is valid.
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) } != 0 {
        return (0.0, 0.0);
    }
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    (secs(usage.ru_utime), secs(usage.ru_stime))
}

/// Commits the removal of the case's files before the next case starts: on
/// a filesystem mounted with `discard` the freed blocks are discarded at
/// the next journal commit, which would otherwise land in the next case's
/// first fdatasync.
fn settle() {
    // SAFETY: sync(2) takes no arguments and cannot fail.
    unsafe { libc::sync() };
}

fn size_label(bytes: u64) -> String {
    if bytes.is_multiple_of(MIB) {
        format!("{}MiB", bytes / MIB)
    } else if bytes.is_multiple_of(KIB) {
        format!("{}KiB", bytes / KIB)
    } else {
        format!("{bytes}B")
    }
}

fn print_table(results: &[CaseResult]) {
    println!(
        "{:<20} {:>9} {:>9} {:>8} {:>9} {:>9} {:>11} {:>7} {:>7}",
        "case", "payload", "records", "segments", "seconds", "MB/s", "records/s", "user s", "sys s"
    );
    for r in results {
        let case = format!(
            "{} / barrier {}",
            size_label(r.record_size),
            r.barrier_every
        );
        println!(
            "{:<20} {:>9} {:>9} {:>8} {:>9.3} {:>9.1} {:>11.0} {:>7.3} {:>7.3}",
            case,
            size_label(r.payload_bytes),
            r.records,
            r.segments,
            r.seconds,
            r.mb_per_s(),
            r.records_per_s(),
            r.cpu_user,
            r.cpu_sys
        );
    }
}

fn print_json(results: &[CaseResult]) {
    let mut out = String::from("{\"bench\":\"tidemark-changelog/append\",\"cases\":[");
    for (i, r) in results.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        let _ = write!(
            out,
            "{{\"record_size\":{},\"barrier_every\":{},\"records\":{},\"barriers\":{},\
             \"payload_bytes\":{},\"log_bytes\":{},\"segments\":{},\"seconds\":{:.6},\
             \"mb_per_s\":{:.3},\"records_per_s\":{:.1},\"cpu_user_s\":{:.3},\"cpu_sys_s\":{:.3}}}",
            r.record_size,
            r.barrier_every,
            r.records,
            r.barriers,
            r.payload_bytes,
            r.log_bytes,
            r.segments,
            r.seconds,
            r.mb_per_s(),
            r.records_per_s(),
            r.cpu_user,
            r.cpu_sys
        );
    }
    out.push_str("]}");
    println!("{out}");
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(a) => a,
        Err(msg) => {
            eprintln!("{msg}");
            return ExitCode::from(2);
        }
    };
    let base = args.dir.clone().unwrap_or_else(default_dir);
    if let Err(e) = std::fs::create_dir_all(&base) {
        eprintln!("creating {}: {e}", base.display());
        return ExitCode::FAILURE;
    }
    let mut results = Vec::new();
    for _ in 0..args.repeat {
        for &record_size in &args.record_sizes {
            for &barrier_every in &args.barrier_every {
                let bytes = match (args.bench, args.bytes) {
                    (false, _) => SMOKE_BYTES,
                    (true, Some(b)) => b,
                    (true, None) => default_bytes(record_size, barrier_every),
                };
                match run_case(&base, record_size, barrier_every, bytes, args.segment_size) {
                    Ok(r) => results.push(r),
                    Err(e) => {
                        eprintln!(
                            "case {} / barrier {barrier_every}: {e}",
                            size_label(record_size)
                        );
                        return ExitCode::FAILURE;
                    }
                }
            }
        }
    }
    if args.json {
        print_json(&results);
    } else {
        print_table(&results);
    }
    ExitCode::SUCCESS
}
