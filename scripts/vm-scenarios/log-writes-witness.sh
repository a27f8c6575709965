#!/bin/sh
# Guest side of the log-writes-witness scenario (busybox sh, run by the
# VM's /init): device-mapper's dm-log-writes as a witness of our change log
# that shares none of our code.
#
# The tracker runs in the guest and attaches /dev/nbd0 itself (`tracker
# serve --attach`) over an image on tmpfs. dm-log-writes sits above it:
# /dev/mapper/lw writes through to /dev/nbd0 and records every write that
# completed there, in its own log on a loop device. An ext4 on
# /dev/mapper/lw takes rounds of file churn (writes, fsyncs, in-place
# overwrites, renames, deletes); after each round the filesystem is frozen,
# flushed, and marked in both logs under the same name (`dmsetup message lw
# 0 mark mK`, `tidemark mark mK`), then thawed; a last mark follows the
# umount. For every mark, the witness's log replayed up to it
# (`log-writes-replay`, ours, written from the kernel's format) and our log
# replayed up to it (`tidemark log replay --label`), each onto a blank
# image, must be the same bytes, and the two logs must count the same
# bytes written and discarded up to it; as many marks must be compared as
# were taken. The check is shown able to fail: the witness at each mark
# against ours at the mark before must differ. The witness's whole log
# must also give the tracker's backing image, and a truncated copy of it
# must be refused.
#
# Discards: the witness logs a discard without data, so its replayer must
# be told what a discarded range reads; it refuses discards otherwise. The
# scenario first shows the tracker's disk reads zeroes after a discard (a
# written range, discarded, read back direct), replays the witness with
# --discard-as-zeroes, and shows the refusal without it. The discards come
# from `fstrim` in every other round, between the writes (mkfs and mount
# send none: -E nodiscard, -o nodiscard).
#
# Environment (from `scripts/kernel-vm.sh run ... --env`), all optional:
#   DISK_MB     size of the protected disk (default 64)
#   LOG_MB      size of the witness's log device (default 256; tmpfs, so
#               only what is logged takes memory)
#   ROUNDS      churn rounds, each ended by a mark (default 4; at least 2,
#               as the even rounds end with fstrim)
# Needs in the guest: tidemark, log-writes-replay, and util-linux losetup
# and fsfreeze (`--bin` them).
#
# Console lines for the host:
#   TIDEMARK-VM-INFO ...                 per-mark results, measurements
#   TIDEMARK-VM-RESULT key=value ...     the counts the host test checks
#   TIDEMARK-VM-PASS | TIDEMARK-VM-FAIL: reason

DISK_MB=${DISK_MB:-64}
LOG_MB=${LOG_MB:-256}
ROUNDS=${ROUNDS:-4}
dir=/tmp/w
mnt=/mnt
lw=/dev/mapper/lw
ctl=$dir/tracker.ctl
tracker=""
frozen=""

fail() {
    echo "TIDEMARK-VM-FAIL: $*"
    [ -n "$frozen" ] && /usr/local/bin/fsfreeze --unfreeze "$mnt" 2>/dev/null
    [ -f "$dir/tracker.err" ] && tail -n 20 "$dir/tracker.err" | sed 's/^/TIDEMARK-VM-INFO tracker: /'
    dmesg | grep -i -E "log-writes|nbd|I/O error|EXT4-fs" | tail -n 20 | sed 's/^/TIDEMARK-VM-INFO dmesg: /'
    [ -n "$tracker" ] && kill -9 "$tracker" 2>/dev/null
    exit 1
}

info() { echo "TIDEMARK-VM-INFO $*"; }

. /guest-lib.sh

[ "$ROUNDS" -ge 2 ] || fail "ROUNDS=$ROUNDS: at least 2 (the even rounds end with fstrim)"
t0=$(date +%s)
mkdir -p "$dir" || fail "mkdir $dir"
truncate -s "${DISK_MB}M" "$dir/disk.img" || fail "truncate"
write_tracker_toml "$dir/disk.img" 256MiB
serve_tracker tracker "attached " --attach
[ "$(cat /sys/block/nbd0/queue/logical_block_size)" = 4096 ] || fail "nbd0's block size is not 4096"

# The tracker's disk reads zeroes after a discard: what the witness's
# replayer is told to assume. The probe is the disk's last MiB, written and
# discarded before anything else, so it reads as blank for both logs.
probe_blocks=16
probe_at=$(( DISK_MB * 16 - probe_blocks ))
dd if=/dev/urandom of=/dev/nbd0 bs=64k seek=$probe_at count=$probe_blocks oflag=direct conv=notrunc 2>/dev/null ||
    fail "writing the discard probe"
dd if=/dev/nbd0 of="$dir/probe" bs=64k skip=$probe_at count=$probe_blocks iflag=direct 2>/dev/null ||
    fail "reading the discard probe"
dd if=/dev/zero of="$dir/zeroes" bs=64k count=$probe_blocks 2>/dev/null
cmp -s "$dir/probe" "$dir/zeroes" && fail "the discard probe reads zeroes before the discard"
blkdiscard -o $((probe_at * 65536)) -l $((probe_blocks * 65536)) /dev/nbd0 || fail "blkdiscard /dev/nbd0"
dd if=/dev/nbd0 of="$dir/probe" bs=64k skip=$probe_at count=$probe_blocks iflag=direct 2>/dev/null ||
    fail "reading the discard probe"
cmp -s "$dir/probe" "$dir/zeroes" || fail "the tracker's disk does not read zeroes after a discard"
rm -f "$dir/probe" "$dir/zeroes"
info "discard probe: the tracker's disk reads zeroes after a discard"

# The witness: dm-log-writes over /dev/nbd0, logging to a loop device.
truncate -s "${LOG_MB}M" "$dir/witness.log" || fail "truncate the witness log"
logdev=$(/usr/local/bin/losetup -f --show "$dir/witness.log") || fail "losetup"
sectors=$(cat /sys/block/nbd0/size)
dmsetup create lw --table "0 $sectors log-writes /dev/nbd0 $logdev" || fail "dmsetup create log-writes"
[ -b "$lw" ] || fail "no $lw"
for b in /sys/block/dm-*; do [ "$(cat "$b/dm/name" 2>/dev/null)" = lw ] && lw_sys=$b; done
info "witness table=\"$(dmsetup table lw)\"" \
    "discard-max-bytes: nbd0=$(cat /sys/block/nbd0/queue/discard_max_bytes)" \
    "lw=$(cat "${lw_sys:-/nonexistent}/queue/discard_max_bytes" 2>/dev/null)"

mkfs.ext4 -q -F -E nodiscard,lazy_itable_init=0,lazy_journal_init=0 "$lw" || fail "mkfs.ext4"
mount -t ext4 -o nodiscard "$lw" "$mnt" || fail "mount"

# A FLUSH through the witness: dm-log-writes logs a completed write only
# when a FLUSH covers it (a FUA write at once), and a mark at once, so a
# write not yet flushed would land after the mark in its log while it is
# before the mark in ours. fsync on the block device sends one.
flush_witness() { dd if=/dev/null of="$lw" conv=fsync,notrunc 2>/dev/null || fail "flushing $lw"; }

# The same mark in both logs, with nothing written to the device between.
marks=""
taken=0
mark_both() {
    dmsetup message lw 0 mark "$1" || fail "dmsetup message lw 0 mark $1"
    tidemark mark "$1" --control-socket "$ctl" > "$dir/mark.out" 2>&1 ||
        fail "tidemark mark $1: $(cat "$dir/mark.out")"
    marks="$marks $1"
    taken=$((taken + 1))
}

# One round of file churn in $mnt/rN, touching round N-1's files too.
churn() {
    r=$1
    d=$mnt/r$r
    prev=$mnt/r$((r - 1))
    mkdir -p "$d" || fail "mkdir $d"
    i=0
    while [ $i -lt 24 ]; do
        n=$(( (i * 7 + r) % 13 + 1 ))
        if [ $((i % 3)) -eq 0 ]; then
            dd if=/dev/urandom of="$d/f$i" bs=4k count=$n conv=fsync 2>/dev/null || fail "write $d/f$i"
        else
            dd if=/dev/urandom of="$d/f$i" bs=4k count=$n 2>/dev/null || fail "write $d/f$i"
        fi
        i=$((i + 1))
    done
    dd if=/dev/urandom of="$d/big" bs=64k count=16 conv=fsync 2>/dev/null || fail "write $d/big"
    if [ -d "$prev" ]; then
        # Overwrite in place, rename, move across directories, delete.
        dd if=/dev/urandom of="$prev/big" bs=4k seek=10 count=8 conv=notrunc,fsync 2>/dev/null ||
            fail "overwrite $prev/big"
        mv "$prev/f1" "$prev/f1.renamed" || fail "rename"
        mv "$prev/f4" "$d/from-prev" || fail "move"
        rm -f "$prev/f2" "$prev/f5" "$prev/f7" "$prev/f11" || fail "rm"
    fi
    echo "round $r at $(cut -d' ' -f1 /proc/uptime)" >> "$mnt/rounds.txt"
    if [ $((r % 2)) -eq 0 ]; then
        sync
        fstrim "$mnt" || fail "fstrim $mnt"
    fi
}

r=1
while [ $r -le "$ROUNDS" ]; do
    churn $r
    /usr/local/bin/fsfreeze --freeze "$mnt" || fail "fsfreeze --freeze"
    frozen=1
    flush_witness
    mark_both "m$r"
    /usr/local/bin/fsfreeze --unfreeze "$mnt" || fail "fsfreeze --unfreeze"
    frozen=""
    r=$((r + 1))
done
# A last round, then a mark after the umount.
churn $r
umount "$mnt" || fail "umount"
flush_witness
mark_both final
info "churn seconds=$(( $(date +%s) - t0 )) marks=$taken:$marks"

status=$(dmsetup status lw)
info "witness status=\"$status\""
case $status in *logging_disabled*) fail "dm-log-writes stopped logging (log device full?)" ;; esac
# Removing the target waits for its log writes and settles the super block.
dmsetup remove lw || fail "dmsetup remove lw"
/usr/local/bin/losetup -d "$logdev" || fail "losetup -d"
kill -TERM "$tracker"
wait "$tracker" || fail "the tracker did not stop cleanly"
tracker=""
tidemark log check "$dir/log" > "$dir/check.out" 2>&1 || {
    sed 's/^/TIDEMARK-VM-INFO log check: /' "$dir/check.out"
    fail "tidemark log check"
}

# The witness's whole log: what it holds, and that it is the disk.
zeroes=--discard-as-zeroes
log-writes-replay "$dir/witness.log" $zeroes > "$dir/walk.out" 2> "$dir/walk.err" ||
    fail "the witness log does not parse: $(cat "$dir/walk.err")"
walk=$(cat "$dir/walk.out")
info "witness log $walk used-bytes=$(du -k "$dir/witness.log" | cut -f1)KiB"
field() { printf '%s\n' "$2" | tr ' ' '\n' | sed -n "s/^$1=//p"; }
[ "$(field discards "$walk")" -gt 0 ] || fail "fstrim left no discard in the witness log: $walk"
# Without being told what a discard leaves, the replayer refuses.
log-writes-replay "$dir/witness.log" > /dev/null 2> "$dir/walk.err" &&
    fail "the witness log with discards was replayed without --discard-as-zeroes"
grep -q "pass --discard-as-zeroes" "$dir/walk.err" || fail "discard refusal: $(cat "$dir/walk.err")"
rm -f "$dir/whole.img"
truncate -s "${DISK_MB}M" "$dir/whole.img"
log-writes-replay "$dir/witness.log" $zeroes --onto "$dir/whole.img" > /dev/null 2> "$dir/walk.err" ||
    fail "replaying the whole witness log: $(cat "$dir/walk.err")"
cmp -s "$dir/whole.img" "$dir/disk.img" || fail "the witness's whole log is not the tracker's image"
rm -f "$dir/whole.img"

# Each mark in the witness's log follows the FLUSH sent just before it,
# with nothing between: no write of before the mark was left unlogged.
log-writes-replay "$dir/witness.log" --dump > "$dir/dump" 2> "$dir/walk.err" ||
    fail "dumping the witness log: $(cat "$dir/walk.err")"
after_flush=0
for m in $marks; do
    before=$(grep -B1 " mark=$m\$" "$dir/dump" | head -n 1)
    case $before in
        *" blocks=0 flags=flush") after_flush=$((after_flush + 1)) ;;
        *) info "witness entry before mark $m: $before" ;;
    esac
done
rm -f "$dir/dump"

# A cut log is refused, not replayed in part.
used_kb=$(du -k "$dir/witness.log" | cut -f1)
dd if="$dir/witness.log" of="$dir/cut.log" bs=1k count=$((used_kb / 2)) 2>/dev/null
if log-writes-replay "$dir/cut.log" $zeroes > /dev/null 2> "$dir/cut.err"; then
    fail "a witness log cut in half was accepted"
fi
grep -q "truncated" "$dir/cut.err" || fail "a cut witness log: $(cat "$dir/cut.err")"
info "cut witness log refused: $(cat "$dir/cut.err")"
rm -f "$dir/cut.log"

# Mark by mark: the witness and our log, each replayed onto a blank image.
compared=0
agreed=0
bytes_agreed=0
shifted=0
shifted_differ=0
previous=""
for m in $marks; do
    rm -f "$dir/witness.img" "$dir/ours.img"
    truncate -s "${DISK_MB}M" "$dir/witness.img" "$dir/ours.img"
    log-writes-replay "$dir/witness.log" $zeroes --onto "$dir/witness.img" --until-mark "$m" \
        > "$dir/w.out" 2> "$dir/w.err" || fail "witness replay to $m: $(cat "$dir/w.err")"
    tidemark log replay "$dir/log" --label "$m" --onto "$dir/ours.img" --json \
        > "$dir/t.out" 2> "$dir/t.err" || fail "tidemark log replay --label $m: $(cat "$dir/t.err")"
    w=$(cat "$dir/w.out")
    ours=$(jq -r '"records=\(.applied) bytes=\(.bytes)"' "$dir/t.out")
    compared=$((compared + 1))
    # Every byte written or discarded reached both logs once: the same
    # count, once ours is cleared of the probe (written, then discarded,
    # before the witness was there).
    [ $(( $(field write-bytes "$w") + $(field discard-bytes "$w") + 2 * probe_blocks * 65536 )) \
        = "${ours#*bytes=}" ] && bytes_agreed=$((bytes_agreed + 1))
    if cmp "$dir/witness.img" "$dir/ours.img" > "$dir/cmp.out" 2>&1; then
        agreed=$((agreed + 1))
        result=equal
    else
        result="DIFFERENT($(head -n 1 "$dir/cmp.out"))"
    fi
    info "mark $m: witness entries=$(field entries "$w") writes=$(field writes "$w")" \
        "write-bytes=$(field write-bytes "$w") discards=$(field discards "$w"); ours $ours; $result"
    # The check can fail: the witness here against ours at the mark before.
    if [ -n "$previous" ]; then
        shifted=$((shifted + 1))
        if cmp -s "$dir/witness.img" "$dir/previous.img"; then
            info "mark $m: the witness here equals ours at $previous (no change between them?)"
        else
            shifted_differ=$((shifted_differ + 1))
        fi
    fi
    mv "$dir/ours.img" "$dir/previous.img"
    previous=$m
done
rm -f "$dir/witness.img" "$dir/previous.img"

echo "TIDEMARK-VM-RESULT marks-taken=$taken marks-compared=$compared marks-agreed=$agreed" \
    "bytes-agreed=$bytes_agreed marks-after-flush=$after_flush" \
    "shifted-compared=$shifted shifted-differed=$shifted_differ" \
    "witness-entries=$(field entries "$walk") witness-writes=$(field writes "$walk")" \
    "witness-write-bytes=$(field write-bytes "$walk") witness-flushes=$(field flushes "$walk")" \
    "witness-fua=$(field fua "$walk") witness-discards=$(field discards "$walk")" \
    "witness-discard-bytes=$(field discard-bytes "$walk") witness-marks=$(field marks "$walk") seconds=$(( $(date +%s) - t0 ))"
[ "$compared" -eq "$taken" ] || fail "$compared marks compared, $taken taken"
[ "$agreed" -eq "$taken" ] || fail "the witness and our log disagree at $((taken - agreed)) of $taken marks"
[ "$bytes_agreed" -eq "$taken" ] ||
    fail "the witness and our log count different bytes written or discarded at $((taken - bytes_agreed)) of $taken marks"
[ "$after_flush" -eq "$taken" ] ||
    fail "$((taken - after_flush)) of $taken marks do not follow a flush in the witness log"
[ "$shifted_differ" -eq "$shifted" ] && [ "$shifted" -gt 0 ] ||
    fail "the witness at a mark equalled ours at the mark before ($shifted_differ of $shifted differed)"
echo "TIDEMARK-VM-PASS"
