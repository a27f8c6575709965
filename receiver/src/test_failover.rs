//! Test failover, the replica site's data plane: a recovery point made
//! writable without changing it. The test's writes go to scratch files
//! (copy-on-write in 4 KiB blocks); every block the test has not written
//! reads from the point. Retention does not fold the point while the test
//! runs (it is pinned, see [`crate::pin`]), and ending the test removes
//! every trace.
//!
//! Layout, in the group's directory (the pin's directory, see
//! [`crate::pin`] for `lock` and `pin`):
//!
//! ```text
//! test-failover/disk-<id>.scratch   the test's writes to disk <id>, sparse,
//!                                   the disk's size, 0600
//! ```
//!
//! The scratch files live only as long as the test: nothing but this
//! process reads them, and a test that was killed leaves them for
//! `tidemark test-failover cleanup` ([`PinLock::remove_all`]).
//!
//! [`nbd`] serves a test failover over NBD.

pub mod nbd;

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::{Arc, Mutex};
use tidemark_changelog::Seq;

use tidemark_durable::{private_file, zero_range, AllocationRun, Zeroes};

use crate::pin::{PinError, PinLock};
use crate::store::{Disk, LocalEngine, PointReader, ReplicaStore, StoreError};

/// The copy-on-write block: a write that covers a block only in part
/// first copies the rest of the block from the point.
pub const BLOCK: u64 = 4096;

/// The smallest run [`CowOverlay::allocation`] splits data down to.
pub const ALLOCATION_GRAIN: u64 = 64 << 10;

/// The most bytes one [`CowOverlay::allocation`] answer covers: a client
/// asks again from where it ends.
pub const MAX_ALLOCATION_SCAN: u64 = 1 << 30;

/// Why a test failover could not start or end.
#[derive(Debug, thiserror::Error)]
pub enum TestFailoverError {
    /// The point could not be pinned, or the test's files removed.
    #[error(transparent)]
    Pin(#[from] PinError),
    /// The replica could not be opened.
    #[error("opening the replica")]
    Open(#[source] StoreError),
    /// The point was folded between being chosen and being pinned.
    #[error("the point at sequence {seq} was folded before it could be pinned; choose another")]
    Folded {
        /// The point.
        seq: Seq,
        /// Why it could not be opened.
        #[source]
        source: StoreError,
    },
    /// A scratch file could not be created (local disk).
    #[error("creating the scratch file {}", path.display())]
    Scratch {
        /// The file.
        path: std::path::PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

/// Why a read or a change of a test failover's disk failed.
#[derive(Debug, thiserror::Error)]
pub enum OverlayError {
    /// No disk with this index (the client's mistake).
    #[error("no disk {0}")]
    NoSuchDisk(u32),
    /// The point could not be read (the replica's disk).
    #[error("reading the point")]
    Point(#[source] StoreError),
    /// A scratch file could not be read or written (local disk).
    #[error("scratch file")]
    Scratch(#[source] io::Error),
}

/// One disk's scratch: the test's writes, and which blocks they hold.
#[derive(Debug)]
struct Scratch {
    file: File,
    size: u64,
    /// One bit per block; the lock also orders copy-on-write.
    written: Mutex<Vec<u64>>,
}

/// A recovery point with the test's scratch files over it: reads and
/// writes in storage terms (disk index, byte offset), for a frontend (the
/// NBD server) to serve.
pub struct CowOverlay {
    view: Arc<dyn PointReader>,
    disks: Vec<Disk>,
    scratch: Vec<Scratch>,
}

impl std::fmt::Debug for CowOverlay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CowOverlay")
            .field("disks", &self.disks)
            .finish_non_exhaustive()
    }
}

/// A running test failover: the pin's lock, the pinned point and the
/// overlay that serves it. [`TestFailover::end`] removes every trace.
#[derive(Debug)]
pub struct TestFailover {
    lock: PinLock,
    overlay: Arc<CowOverlay>,
}

impl TestFailover {
    /// Starts a test failover of the point `seq` of the group in
    /// `group_dir`, under `lock` (taken with [`PinLock::acquire`] before
    /// the point was chosen): pins the point, opens it, and creates a
    /// scratch file per disk. If it cannot start, every trace (the pin,
    /// scratch files made so far) is removed and the lock released.
    pub fn start(
        group_dir: &Path,
        lock: PinLock,
        seq: Seq,
    ) -> Result<TestFailover, TestFailoverError> {
        Self::start_on(|| LocalEngine::open_dir_read_only(group_dir), lock, seq)
    }

    /// [`TestFailover::start`] of a group that `open` opens read-only
    /// (from any store engine; the lock's directory keeps the scratch
    /// files, and pins in the store too if the lock was given its
    /// [`StorePin`](crate::pin::StorePin)).
    pub fn start_on(
        open: impl FnOnce() -> Result<Arc<dyn ReplicaStore>, StoreError>,
        lock: PinLock,
        seq: Seq,
    ) -> Result<TestFailover, TestFailoverError> {
        match Self::open(open, &lock, seq) {
            Ok(overlay) => Ok(TestFailover {
                lock,
                overlay: Arc::new(overlay),
            }),
            Err(e) => {
                // The error that stopped the start is the one to report; a
                // trace left behind is removed by `test-failover cleanup`.
                let _ = lock.remove_all();
                Err(e)
            }
        }
    }

    fn open(
        open: impl FnOnce() -> Result<Arc<dyn ReplicaStore>, StoreError>,
        lock: &PinLock,
        seq: Seq,
    ) -> Result<CowOverlay, TestFailoverError> {
        // Pin, then open: a fold between choosing the point and pinning
        // it is noticed here, when the point is looked up again.
        lock.pin(seq)?;
        let group = open().map_err(TestFailoverError::Open)?;
        let disks = group.disks_at(seq);
        let view = group
            .shared_reader(seq)
            .map_err(|source| TestFailoverError::Folded { seq, source })?;
        let mut scratch = Vec::new();
        for d in &disks {
            let path = lock.dir().join(format!("disk-{}.scratch", d.id));
            let created = private_file()
                .read(true)
                .write(true)
                .create_new(true)
                .open(&path)
                .and_then(|file| file.set_len(d.size).map(|()| file));
            let file = created.map_err(|source| TestFailoverError::Scratch { path, source })?;
            scratch.push(Scratch {
                file,
                size: d.size,
                written: Mutex::new(vec![0u64; d.size.div_ceil(BLOCK).div_ceil(64) as usize]),
            });
        }
        Ok(CowOverlay {
            view,
            disks,
            scratch,
        })
    }

    /// The point and the test's writes.
    pub fn overlay(&self) -> Arc<CowOverlay> {
        self.overlay.clone()
    }

    /// Ends the test: its writes are discarded, the pin and the scratch
    /// files removed. The frontend must have stopped serving the overlay.
    pub fn end(self) -> Result<(), PinError> {
        drop(self.overlay);
        self.lock.remove_all()
    }
}

impl CowOverlay {
    /// The disks, in index order.
    pub fn disks(&self) -> &[Disk] {
        &self.disks
    }

    fn disk(&self, index: u32) -> Result<(&Disk, &Scratch), OverlayError> {
        let i = index as usize;
        match (self.disks.get(i), self.scratch.get(i)) {
            (Some(d), Some(s)) => Ok((d, s)),
            _ => Err(OverlayError::NoSuchDisk(index)),
        }
    }

    fn read_point(&self, disk: &Disk, offset: u64, buf: &mut [u8]) -> Result<(), OverlayError> {
        self.view
            .read(disk.id, offset, buf)
            .map_err(OverlayError::Point)
    }

    /// Reads `buf.len()` bytes of disk `index` at `offset`: the test's
    /// writes where it made them, the point elsewhere.
    pub fn read(&self, index: u32, offset: u64, buf: &mut [u8]) -> Result<(), OverlayError> {
        let (disk, s) = self.disk(index)?;
        let written = s.written.lock().unwrap_or_else(|e| e.into_inner());
        let end = offset + buf.len() as u64;
        let mut at = offset;
        while at < end {
            let b = at / BLOCK;
            let from_scratch = bit(&written, b);
            // Extend the run while blocks come from the same place.
            let mut run_end = ((b + 1) * BLOCK).min(end);
            while run_end < end && bit(&written, run_end / BLOCK) == from_scratch {
                run_end = ((run_end / BLOCK + 1) * BLOCK).min(end);
            }
            let piece = &mut buf[(at - offset) as usize..(run_end - offset) as usize];
            if from_scratch {
                s.file
                    .read_exact_at(piece, at)
                    .map_err(OverlayError::Scratch)?;
            } else {
                self.read_point(disk, at, piece)?;
            }
            at = run_end;
        }
        Ok(())
    }

    /// Writes `data` to disk `index` at `offset`.
    pub fn write(&self, index: u32, offset: u64, data: &[u8]) -> Result<(), OverlayError> {
        if data.is_empty() {
            return Ok(());
        }
        self.change(index, offset, data.len() as u64, Some(data))
    }

    /// Makes `offset..offset+len` of disk `index` read as zeroes.
    pub fn write_zeroes(&self, index: u32, offset: u64, len: u64) -> Result<(), OverlayError> {
        if len == 0 {
            return Ok(());
        }
        self.change(index, offset, len, None)
    }

    /// Makes the test's writes to disk `index` durable (in its scratch
    /// file; they are discarded when the test ends all the same).
    pub fn flush(&self, index: u32) -> Result<(), OverlayError> {
        let (_, s) = self.disk(index)?;
        s.file.sync_data().map_err(OverlayError::Scratch)
    }

    /// What `offset..offset+len` of disk `index` holds, in runs from
    /// `offset` (at most [`MAX_ALLOCATION_SCAN`] bytes of it): data where
    /// the test wrote or the point may hold bytes, a hole where the test
    /// wrote nothing and the point surely reads as zeroes (a hole of the
    /// replica image, zeroes in the point's journal; see
    /// [`PointReader::is_zero`]). Runs are found by halving: a range that
    /// is all hole costs one question, data is resolved to
    /// [`ALLOCATION_GRAIN`].
    ///
    /// The scratch's block map is held meanwhile, so a write the test
    /// acknowledged before (its bits are set once its bytes are in the
    /// scratch) is data here; the point never changes.
    pub fn allocation(
        &self,
        index: u32,
        offset: u64,
        len: u64,
    ) -> Result<Vec<AllocationRun>, OverlayError> {
        let (disk, s) = self.disk(index)?;
        let end = offset
            .saturating_add(len.min(MAX_ALLOCATION_SCAN))
            .min(s.size);
        let written = s.written.lock().unwrap_or_else(|e| e.into_inner());
        let mut runs: Vec<AllocationRun> = Vec::new();
        // Ranges still to classify, the next one on top.
        let mut todo = vec![(offset, end)];
        while let Some((start, stop)) = todo.pop() {
            if start >= stop {
                continue;
            }
            let untouched = !any_bit(&written, start / BLOCK, (stop - 1) / BLOCK);
            let hole = untouched && self.view.is_zero(disk.id, start, stop - start);
            if !hole && stop - start > ALLOCATION_GRAIN {
                let half = start + (stop - start) / 2;
                let mid =
                    (half / ALLOCATION_GRAIN).max(start / ALLOCATION_GRAIN + 1) * ALLOCATION_GRAIN;
                todo.push((mid.min(stop), stop));
                todo.push((start, mid.min(stop)));
                continue;
            }
            match runs.last_mut() {
                Some(last) if last.data != hole => last.length += stop - start,
                _ => runs.push(AllocationRun {
                    offset: start,
                    length: stop - start,
                    data: !hole,
                }),
            }
        }
        Ok(runs)
    }

    /// Changes `offset..offset+len` in the scratch: `data` (or zeroes).
    /// Blocks the change covers only in part are first copied from the
    /// point.
    fn change(
        &self,
        index: u32,
        offset: u64,
        len: u64,
        data: Option<&[u8]>,
    ) -> Result<(), OverlayError> {
        let (disk, s) = self.disk(index)?;
        let mut written = s.written.lock().unwrap_or_else(|e| e.into_inner());
        let end = offset + len;
        let first = offset / BLOCK;
        let last = (end - 1) / BLOCK;
        for b in [first, last] {
            let (bs, be) = (b * BLOCK, ((b + 1) * BLOCK).min(s.size));
            let partial = offset > bs || end < be;
            if partial && !bit(&written, b) {
                let mut block = vec![0u8; (be - bs) as usize];
                self.read_point(disk, bs, &mut block)?;
                s.file
                    .write_all_at(&block, bs)
                    .map_err(OverlayError::Scratch)?;
                set_bits(&mut written, b, b);
            }
        }
        match data {
            Some(d) => s.file.write_all_at(d, offset),
            None => zero_range(&s.file, offset, len, Zeroes::Hole),
        }
        .map_err(OverlayError::Scratch)?;
        set_bits(&mut written, first, last);
        Ok(())
    }
}

fn bit(bits: &[u64], b: u64) -> bool {
    bits[(b / 64) as usize] & (1 << (b % 64)) != 0
}

fn any_bit(bits: &[u64], first: u64, last: u64) -> bool {
    (first..=last).any(|b| bit(bits, b))
}

fn set_bits(bits: &mut [u64], first: u64, last: u64) {
    for b in first..=last {
        bits[(b / 64) as usize] |= 1 << (b % 64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pin::{self, TEST_FAILOVER_DIR};
    use crate::store::{ChunkRef, Purpose, ReplicaGroup, Retention};
    use tidemark_changelog::DiskId;
    use tidemark_changelog::{Entry, Record};
    use tidemark_durable::FsDir;
    use tidemark_names::Name;

    const SIZE: u64 = 65536;

    /// A group of one disk with two points: 2 (all 3s) and 4 (a block of
    /// 9s at 8 KiB).
    fn group(dir: &Path) -> ReplicaGroup {
        let mut g = ReplicaGroup::open(dir).unwrap();
        // The records' timestamps are from 1970: keep every point.
        g.set_retention(Retention {
            window: std::time::Duration::MAX,
            max_points: 100,
            max_space: None,
            fold_interval: std::time::Duration::ZERO,
        });
        g.ensure_disks(&[Disk {
            id: DiskId(0),
            name: Name::from_static("a"),
            size: SIZE,
        }])
        .unwrap();
        g.apply_chunk(
            DiskId(0),
            0,
            ChunkRef::Data(&[3u8; SIZE as usize]),
            Purpose::InitialSync,
        )
        .unwrap();
        g.commit().unwrap();
        let rec = |e: &Entry<'_>, seq| Record::decode(&e.encode(seq, 0)).unwrap();
        g.apply_record(&rec(&Entry::write(0, 0, &[3u8; 512], 0), 1))
            .unwrap();
        g.apply_record(&rec(&Entry::barrier(2), 2)).unwrap();
        g.commit().unwrap();
        g.apply_record(&rec(&Entry::write(0, 8192, &[9u8; 4096], 0), 3))
            .unwrap();
        g.apply_record(&rec(&Entry::barrier(4), 4)).unwrap();
        g.commit().unwrap();
        g
    }

    fn read(o: &CowOverlay, offset: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0u8; len];
        o.read(0, offset, &mut buf).unwrap();
        buf
    }

    #[test]
    fn writes_go_to_scratch_block_by_block_and_the_point_stays_as_it_was() {
        let dir = tempfile::tempdir().unwrap();
        let g = group(dir.path());
        let lock = PinLock::acquire(dir.path()).unwrap();
        let test = TestFailover::start(dir.path(), lock, Seq(2)).unwrap();
        assert_eq!(
            pin::read(&FsDir::at(&dir.path().join(TEST_FAILOVER_DIR))),
            Some(Seq(2))
        );
        let o = test.overlay();
        assert_eq!(o.disks().len(), 1);
        assert_eq!(read(&o, 0, SIZE as usize), vec![3u8; SIZE as usize]);

        // A write within one block: the rest of the block still reads as
        // the point (copied on write).
        o.write(0, 100, &[7u8; 10]).unwrap();
        let mut want = vec![3u8; SIZE as usize];
        want[100..110].fill(7);
        assert_eq!(read(&o, 0, SIZE as usize), want);
        // Zeroes across a block boundary, in part of two blocks.
        o.write_zeroes(0, 4000, 200).unwrap();
        want[4000..4200].fill(0);
        assert_eq!(read(&o, 0, SIZE as usize), want);
        // A read that starts and ends inside blocks of either source.
        assert_eq!(read(&o, 90, 5000), want[90..5090]);
        o.flush(0).unwrap();
        assert!(matches!(o.read(0, 0, &mut [0u8; 1]), Ok(())));
        assert!(matches!(
            o.write(1, 0, &[1]),
            Err(OverlayError::NoSuchDisk(1))
        ));

        // The point itself is unchanged, and later points too.
        let mut buf = vec![0u8; SIZE as usize];
        g.view(Some(Seq(2)))
            .unwrap()
            .read(DiskId(0), 0, &mut buf)
            .unwrap();
        assert_eq!(buf, vec![3u8; SIZE as usize]);
        g.view(Some(Seq(4)))
            .unwrap()
            .read(DiskId(0), 8192, &mut buf[..4096])
            .unwrap();
        assert_eq!(buf[..4096], [9u8; 4096]);

        drop(o);
        test.end().unwrap();
        assert!(!dir.path().join(TEST_FAILOVER_DIR).exists());
    }

    /// The runs of an allocation answer as (offset, length, data).
    fn runs(o: &CowOverlay, offset: u64, len: u64) -> Vec<(u64, u64, bool)> {
        let runs = o.allocation(0, offset, len).unwrap();
        runs.iter().map(|r| (r.offset, r.length, r.data)).collect()
    }

    /// A point whose image has holes (a sparse initial sync) and whose
    /// journal trimmed a range: both are holes of the point; data of the
    /// image or the journal is data; the test's own writes are data, even
    /// over a hole.
    #[test]
    fn allocation_reports_the_points_holes_and_the_tests_writes() {
        const BIG: u64 = 1 << 20;
        const G: u64 = ALLOCATION_GRAIN;
        let dir = tempfile::tempdir().unwrap();
        let mut g = ReplicaGroup::open(dir.path()).unwrap();
        g.ensure_disks(&[Disk {
            id: DiskId(0),
            name: Name::from_static("a"),
            size: BIG,
        }])
        .unwrap();
        // Data in the first 4 grains, zeroes (not sent as data) after.
        let data = vec![5u8; (4 * G) as usize];
        g.apply_chunk(DiskId(0), 0, ChunkRef::Data(&data), Purpose::InitialSync)
            .unwrap();
        g.apply_chunk(
            DiskId(0),
            4 * G,
            ChunkRef::Zero(BIG - 4 * G),
            Purpose::InitialSync,
        )
        .unwrap();
        g.commit().unwrap();
        let rec = |e: &Entry<'_>, seq| Record::decode(&e.encode(seq, 0)).unwrap();
        // The journal trims grain 1 and writes grain 8.
        g.apply_record(&rec(&Entry::trim(0, G, G, 0), 1)).unwrap();
        g.apply_record(&rec(&Entry::write(0, 8 * G, &data[..G as usize], 0), 2))
            .unwrap();
        g.apply_record(&rec(&Entry::barrier(3), 3)).unwrap();
        g.commit().unwrap();

        let lock = PinLock::acquire(dir.path()).unwrap();
        let test = TestFailover::start(dir.path(), lock, Seq(3)).unwrap();
        let o = test.overlay();
        let holes_known = runs(&o, 4 * G, 4 * G) == [(4 * G, 4 * G, false)];
        if !holes_known {
            // The filesystem of the temporary directory reports no holes:
            // everything is data, which is correct.
            assert!(runs(&o, 0, BIG).iter().all(|r| r.2));
            eprintln!("this filesystem reports no holes; hole detection not checked");
            return;
        }
        assert_eq!(
            runs(&o, 0, BIG),
            [
                (0, G, true),
                (G, G, false),
                (2 * G, 2 * G, true),
                (4 * G, 4 * G, false),
                (8 * G, G, true),
                (9 * G, BIG - 9 * G, false),
            ]
        );
        // A write of the test over a hole makes its grain data.
        o.write(0, 12 * G + 100, &[1u8; 10]).unwrap();
        assert_eq!(
            runs(&o, 10 * G, 4 * G),
            [
                (10 * G, 2 * G, false),
                (12 * G, G, true),
                (13 * G, G, false)
            ]
        );
        // Every run lies within the question, and past the disk is nothing.
        assert_eq!(runs(&o, 9 * G, G), [(9 * G, G, false)]);
        assert!(runs(&o, BIG, 4096).is_empty());
        assert!(matches!(
            o.allocation(1, 0, 1),
            Err(OverlayError::NoSuchDisk(1))
        ));
        drop(o);
        test.end().unwrap();
    }

    #[test]
    fn a_point_that_is_gone_is_refused_and_leaves_no_trace() {
        let dir = tempfile::tempdir().unwrap();
        let _g = group(dir.path());
        let lock = PinLock::acquire(dir.path()).unwrap();
        let err = TestFailover::start(dir.path(), lock, Seq(3)).unwrap_err();
        assert!(
            matches!(err, TestFailoverError::Folded { seq: Seq(3), .. }),
            "{err:?}"
        );
        assert!(!dir.path().join(TEST_FAILOVER_DIR).exists());
        // The lock was released with it.
        PinLock::acquire(dir.path()).unwrap();
    }

    /// A test failover of a point from before a growth serves the disk at
    /// its size then; one of a later point at the new size.
    #[test]
    fn a_point_before_a_growth_is_served_at_the_old_size() {
        let dir = tempfile::tempdir().unwrap();
        let mut g = group(dir.path());
        g.ensure_disks(&[Disk {
            id: DiskId(0),
            name: Name::from_static("a"),
            size: 2 * SIZE,
        }])
        .unwrap();
        g.resync_done(DiskId(0), SIZE, SIZE).unwrap();
        g.commit().unwrap();
        let rec = |e: &Entry<'_>, seq| Record::decode(&e.encode(seq, 0)).unwrap();
        g.apply_record(&rec(&Entry::write(0, SIZE, &[5u8; 4096], 0), 5))
            .unwrap();
        g.apply_record(&rec(&Entry::barrier(6), 6)).unwrap();
        g.commit().unwrap();
        for (seq, size) in [(4, SIZE), (6, 2 * SIZE)] {
            let lock = PinLock::acquire(dir.path()).unwrap();
            let test = TestFailover::start(dir.path(), lock, Seq(seq)).unwrap();
            let o = test.overlay();
            assert_eq!(o.disks()[0].size, size, "point {seq}");
            let beyond = o.read(0, SIZE, &mut [0u8; 4096]);
            if size == SIZE {
                assert!(beyond.is_err(), "point {seq} reads beyond its size");
            } else {
                assert_eq!(read(&o, SIZE, 4096), vec![5u8; 4096]);
            }
            drop(o);
            test.end().unwrap();
        }
    }
}
