//! The replica store's decoders (`receiver/src/store`): the state file and
//! journal entry codecs alone, and a whole group directory (state file,
//! journal segments, images) opened and recovered by the store.
//!
//! Besides "never panics": a decoded state file or journal header encodes
//! to bytes that decode to the same thing, and a group that opened (and
//! recovered) once opens again and reads its recovery points.

use crate::checksums::{fix_journal, fix_state};
use crate::input::{Input, Output};
use std::fs::{self, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};
use tidemark_changelog::record::{Entry, Record};
use tidemark_names::Name;
use tidemark_receiver::store::fuzzing::{
    journal_header_round_trip, state_round_trip, JOURNAL_HEADER_LEN,
};
use tidemark_receiver::store::{ChunkRef, Disk, Purpose, ReplicaGroup, Retention};

/// A state file (mode bit 0 clear) or a journal entry header (set): `data`
/// is a mode byte (bit 1: repair the checksum), then the bytes.
pub fn state(data: &[u8]) {
    let mut input = Input::new(data);
    let mode = input.u8();
    let mut bytes = input.rest().to_vec();
    if mode & 1 == 0 {
        if mode & 2 != 0 {
            fix_state(&mut bytes);
        }
        if let Ok(encoded) = state_round_trip(&bytes) {
            // Decoding may read a field the encoder leaves zero (one its
            // flag says is unset); what it decoded encodes one way only.
            assert_eq!(state_round_trip(&encoded).as_ref(), Ok(&encoded));
        }
    } else {
        let mut header = [0; JOURNAL_HEADER_LEN];
        let n = bytes.len().min(JOURNAL_HEADER_LEN);
        header[..n].copy_from_slice(&bytes[..n]);
        if let Ok(encoded) = journal_header_round_trip(&header) {
            // Everything but the checksum, which covers the payload.
            assert_eq!(encoded[..36], header[..36]);
        }
    }
}

/// A scratch directory of this process, emptied for every input.
fn scratch() -> PathBuf {
    std::env::temp_dir().join(format!("tidemark-fuzz-group-{}", std::process::id()))
}

fn journal_name(segment: u8) -> String {
    format!("journal.{segment:08x}")
}

/// Lays a group directory out as `data` says: a mode byte (bit 0: repair
/// checksums; bit 1: also open it read-only; bit 2: fold every point the
/// retention allows), the state file, journal segments (number, content)
/// and image files (disk id, size; sparse).
fn lay_out(dir: &Path, input: &mut Input, mode: u8) -> io::Result<()> {
    match fs::remove_dir_all(dir) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    fs::create_dir_all(dir)?;
    let mut state = input.blob16().to_vec();
    if mode & 1 != 0 {
        fix_state(&mut state);
    }
    if !state.is_empty() {
        fs::write(dir.join("state"), state)?;
    }
    for _ in 0..input.u8() % 4 {
        let name = journal_name(input.u8());
        let mut content = input.blob32().to_vec();
        if mode & 1 != 0 {
            fix_journal(&mut content);
        }
        fs::write(dir.join(name), content)?;
    }
    for _ in 0..input.u8() % 4 {
        let (id, size) = (input.u32(), input.u64());
        let image = OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .open(dir.join(format!("disk-{id}.img")))?;
        // Sizes no filesystem takes are left out: the store then finds the
        // image the wrong size, which is fuzzed all the same.
        let _ = image.set_len(size);
    }
    Ok(())
}

/// A replica group directory, opened by the store as the receiver opens
/// it after a crash; see [`lay_out`] for `data`.
pub fn group(data: &[u8]) {
    let mut input = Input::new(data);
    let mode = input.u8();
    let dir = scratch();
    lay_out(&dir, &mut input, mode).expect("laying out the scratch directory");
    if mode & 2 != 0 {
        if let Ok(group) = ReplicaGroup::open_read_only(&dir) {
            read_points(&group);
        }
    }
    let mut group = match ReplicaGroup::open(&dir) {
        Ok(group) => group,
        Err(error) => return drop(error.to_string()),
    };
    read_points(&group);
    if mode & 4 != 0 {
        group.set_retention(Retention {
            window: std::time::Duration::ZERO,
            max_points: 1,
            max_space: Some(0),
            fold_interval: std::time::Duration::ZERO,
        });
        let _ = group.apply_retention(u64::MAX, true);
    }
    drop(group);
    // Recovery changed what it had to: the group opens again as it is.
    let group = ReplicaGroup::open(&dir).expect("a group that opened once opens again");
    read_points(&group);
}

/// Reads the first and last bytes of every disk as of every point and of
/// the newest state.
fn read_points(group: &ReplicaGroup) {
    let _ = (
        group.position(),
        group.history_bytes(),
        group.last_barrier(),
    );
    let disks = group.disks();
    let points = group.points();
    let seqs = points.iter().map(|p| Some(p.seq)).take(4).chain([None]);
    for seq in seqs {
        let Ok(view) = group.view(seq) else { continue };
        for disk in &disks {
            let len = disk.size.min(4096);
            let mut buf = vec![0; len as usize];
            let _ = view.read(disk.id, 0, &mut buf);
            let _ = view.read(disk.id, disk.size - len, &mut buf);
            let _ = view.is_zero(disk.id, 0, len);
        }
    }
}

fn record(entry: Entry, seq: u64) -> Record {
    Record::decode(&entry.encode(seq, 1)).expect("a valid record")
}

/// Builds a group with the store's own code and serializes its directory
/// as [`group`] reads it.
fn group_seed(name: &str, build: impl FnOnce(&mut ReplicaGroup)) -> Vec<u8> {
    let dir =
        std::env::temp_dir().join(format!("tidemark-fuzz-seed-{name}-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    let mut group = ReplicaGroup::open(&dir).expect("a new group");
    build(&mut group);
    drop(group);
    let mut out = Output::new();
    out.u8(1)
        .blob16(&fs::read(dir.join("state")).expect("a state file"));
    let mut segments = Vec::new();
    let mut images = Vec::new();
    for entry in fs::read_dir(&dir).expect("the group directory") {
        let entry = entry.expect("a directory entry");
        let name = entry.file_name().into_string().expect("a UTF-8 name");
        if let Some(hex) = name.strip_prefix("journal.") {
            let number = u8::from_str_radix(hex, 16).expect("a small segment number");
            segments.push((number, fs::read(entry.path()).expect("a journal segment")));
        } else if let Some(id) = name
            .strip_prefix("disk-")
            .and_then(|n| n.strip_suffix(".img"))
        {
            let size = entry.metadata().expect("an image").len();
            images.push((id.parse::<u32>().expect("a disk id"), size));
        }
    }
    segments.sort();
    images.sort();
    out.u8(segments.len() as u8);
    for (number, content) in &segments {
        out.u8(*number).blob32(content);
    }
    out.u8(images.len() as u8);
    for (id, size) in images {
        out.u32(id).u64(size);
    }
    let _ = fs::remove_dir_all(&dir);
    out.finish()
}

/// Groups the store wrote: in initial sync, consistent with recovery
/// points in a journal of several segments, resyncing, and one a disk
/// left (in the older points only).
pub fn group_seeds() -> Vec<(&'static str, Vec<u8>)> {
    let disks = [
        Disk {
            id: tidemark_changelog::DiskId(0),
            name: Name::from_static("data"),
            size: 16 << 10,
        },
        Disk {
            id: tidemark_changelog::DiskId(1),
            name: Name::from_static("logs"),
            size: 8 << 10,
        },
    ];
    let sync = |group: &mut ReplicaGroup, upto: u64| {
        group.ensure_disks(&disks).expect("disks");
        for disk in &disks {
            let data = vec![disk.id.get() as u8 + 1; 4096];
            group
                .apply_chunk(disk.id, 0, ChunkRef::Data(&data), Purpose::InitialSync)
                .expect("a chunk");
            let rest = upto.min(disk.size) - 4096;
            if rest > 0 {
                group
                    .apply_chunk(disk.id, 4096, ChunkRef::Zero(rest), Purpose::InitialSync)
                    .expect("a zero chunk");
            }
        }
        group.commit().expect("commit");
    };
    let history = |group: &mut ReplicaGroup| {
        group.set_segment_size(600);
        let data = [0x42; 300];
        let entries = [
            Entry::write(0, 1024, &data, 10),
            Entry::barrier(11),
            Entry::write_zeroes(1, 0, 2048, true, 12),
            Entry::trim(0, 8192, 4096, 13),
            Entry::marker("before upgrade", true, 14),
            Entry::write(1, 4096, &data, 15),
            Entry::barrier(16),
        ];
        for (i, entry) in entries.into_iter().enumerate() {
            group
                .apply_record(&record(entry, i as u64 + 1))
                .expect("a record");
            group.commit().expect("commit");
        }
    };
    vec![
        ("initial-sync", group_seed("initial", |g| sync(g, 4096))),
        (
            "consistent",
            group_seed("consistent", |g| {
                sync(g, u64::MAX);
                history(g);
            }),
        ),
        (
            "resyncing",
            group_seed("resyncing", |g| {
                sync(g, u64::MAX);
                history(g);
                g.apply_record(&record(Entry::resync_needed(0, 0, 4096, 20), 8))
                    .expect("a resync-needed record");
                g.commit().expect("commit");
            }),
        ),
        (
            "a-disk-left",
            group_seed("left", |g| {
                sync(g, u64::MAX);
                history(g);
                g.leave(&[tidemark_changelog::DiskId(1)])
                    .expect("a disk leaves");
                g.apply_record(&record(Entry::write(0, 0, &[7; 512], 20), 8))
                    .expect("a record");
                g.apply_record(&record(Entry::barrier(21), 9))
                    .expect("a barrier");
                g.commit().expect("commit");
            }),
        ),
    ]
}

/// State files and journal headers of the groups the store wrote.
pub fn state_seeds() -> Vec<(&'static str, Vec<u8>)> {
    let mut seeds = Vec::new();
    for (name, group) in group_seeds() {
        let mut input = Input::new(&group);
        input.u8();
        let state = input.blob16();
        seeds.push((name, Output::new().u8(2).bytes(state).finish()));
        for _ in 0..input.u8() {
            input.u8();
            let mut segment = input.blob32();
            // Entry after entry: a header, then payload-len (at 12) bytes.
            while let Some((header, rest)) = segment.split_first_chunk::<JOURNAL_HEADER_LEN>() {
                seeds.push((name, Output::new().u8(3).bytes(header).finish()));
                let payload_len = u32::from_le_bytes(header[12..16].try_into().unwrap());
                segment = rest.get(payload_len as usize..).unwrap_or_default();
            }
        }
        let _ = input.rest();
    }
    seeds
}
