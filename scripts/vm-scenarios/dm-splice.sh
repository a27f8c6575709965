#!/bin/sh
# Guest side of the dm-splice scenario (busybox sh, run by the VM's /init):
# the live splice of the tracker into a mounted ext4's I/O path and out
# again, with device-mapper, while a writer keeps writing and fsyncing.
#
# A loop device over a tmpfs file is the disk. `tidemark protect` puts
# /dev/mapper/tidemark-vmdisk over it, ext4 is made and mounted there, a
# writer starts, and `tidemark tracker serve` (in the guest, backing = the
# same loop device) serves the disk to the kernel: as /dev/nbd0 attached
# with nbd-client, or (SPLICE_FRONTEND=ublk) as /dev/ublkbN. Then:
#   window 1: splice in and out with the filesystem frozen around each
#             swap, copying the disk at both edges: the log's records up to
#             the splice-out, replayed onto the first copy, must give the
#             second one byte for byte (every write of the window logged,
#             none lost, none invented);
#   gap:      writes go straight to the disk;
#   window 2: splice in and out live, the writer running, suspend measured;
# then the writer stops and must have had zero errors, the kernel logged no
# I/O error, every file reads back with the checksum written, e2fsck -fn is
# clean, and the map is removed.
#
# Environment (from `scripts/kernel-vm.sh run ... --env`), all optional:
#   SPLICE_DISK_MB  size of the disk (default 64)
#   SPLICE_RUN_S    seconds the writer runs in each phase (default 3)
#   SPLICE_FRONTEND nbd (default) or ublk: the tracker device spliced onto
# Needs in the guest: tidemark, and util-linux losetup (sector size) and
# fsfreeze (`--bin` them).
#
# Console lines for the host:
#   TIDEMARK-VM-INFO ...                 measurements, for reports
#   TIDEMARK-VM-PASS | TIDEMARK-VM-FAIL: reason

name=vmdisk
map=/dev/mapper/tidemark-$name
mnt=/mnt
work=/tmp/splice
ctl=$work/tracker.ctl
run_s=${SPLICE_RUN_S:-3}
size_mb=${SPLICE_DISK_MB:-64}
frontend=${SPLICE_FRONTEND:-nbd}
writer_pid=""
tracker_pid=""

fail() {
    echo "TIDEMARK-VM-FAIL: $*"
    [ -n "$writer_pid" ] && touch "$work/stop"
    [ -n "$writer_pid" ] && kill "$writer_pid" 2>/dev/null
    # Whatever the tracker said, for the reader of the console.
    [ -f "$work/tracker.err" ] && tail -n 20 "$work/tracker.err"
    dmesg | tail -n 20
    exit 1
}

info() { echo "TIDEMARK-VM-INFO $*"; }

# Milliseconds the map was suspended, from `tidemark splice ... --json`.
suspended_ms() { jq -r '.suspended_ms // empty' "$1"; }

# The live table's device, e.g. 43:0 (single linear target).
table_device() { dmsetup table "tidemark-$name" | awk '{ print $4 }'; }

# Reads the disk as it is on the medium: the loop device's page cache is
# not kept coherent with writes that reach it below it (dm's bios, the
# tracker's O_DIRECT), so it is dropped first and the copy is direct.
copy_disk() {
    sync
    blockdev --flushbufs "$disk"
    echo 3 > /proc/sys/vm/drop_caches
    dd if="$disk" of="$1" bs=1M iflag=direct 2>/dev/null || fail "copying $disk to $1"
}

# Writes completed by the tracker's device ($dev), from its sysfs stat.
dev_writes() { awk '{ print $5 }' "/sys/block/${dev#/dev/}/stat"; }

mkdir -p "$work/m"
truncate -s "${size_mb}M" "$work/disk.raw" || fail "truncate"
# 4 KiB sectors like the NBD device (nbd-client -b 4096): the splice
# refuses an NBD device whose blocks are larger than the disk's.
disk=$(/usr/local/bin/losetup -b 4096 -f --show "$work/disk.raw") || fail "losetup"

t0=$(date +%s)
# A refusal first: a disk that is not a block device.
tidemark protect "$work/disk.raw" --name bad > "$work/out" 2>&1 &&
    fail "protect accepted a regular file"
grep -q "not a block device" "$work/out" || fail "protect of a file: $(cat "$work/out")"

tidemark protect "$disk" --name "$name" || fail "tidemark protect $disk"
[ -b "$map" ] || fail "no $map after protect"
# Idempotent: again over the same disk is fine.
tidemark protect "$disk" --name "$name" > /dev/null || fail "a second protect of the same disk"
info "protected table=\"$(dmsetup table "tidemark-$name")\""
disk_dev=$(table_device)

mkfs.ext4 -q -F -b 4096 -E lazy_itable_init=0,lazy_journal_init=0 "$map" || fail "mkfs.ext4 on $map"
mount -t ext4 "$map" "$mnt" || fail "mount $map"
mkdir -p "$mnt/w" || fail "mkdir"

# The writer: small and larger files rewritten in turn, each with
# conv=fsync; what each file should hold is remembered by checksum.
writer() {
    i=0
    writes=0
    errors=0
    while [ ! -e "$work/stop" ]; do
        if [ $((i % 8)) -eq 7 ]; then
            f=big$((i / 8 % 4))
            blocks=256
        else
            f=f$((i % 40))
            blocks=$((i % 16 + 1))
        fi
        dd if=/dev/urandom of="$work/blk" bs=4k count=$blocks 2>/dev/null
        if dd if="$work/blk" of="$mnt/w/$f" bs=4k conv=fsync 2>/dev/null; then
            sha256sum < "$work/blk" | cut -d' ' -f1 > "$work/m/$f"
            writes=$((writes + 1))
        else
            echo "write-failed" > "$work/m/$f"
            errors=$((errors + 1))
        fi
        i=$((i + 1))
        echo "writes=$writes errors=$errors" > "$work/writer.count"
    done
}
writer &
writer_pid=$!

cat > "$work/tracker.toml" <<EOF
[tracker]
log-dir = "$work/log"
socket = "$work/nbd.sock"
control-socket = "$ctl"
tcp-listen = "127.0.0.1:10809"
log-size-limit = "160MiB"
segment-size = "8MiB"
max-block-size = "4MiB"

[[tracker.disk]]
name = "$name"
path = "$disk"
EOF
case $frontend in
nbd) serve_flags="" ready="tracker ready" ;;
ublk) serve_flags="--ublk" ready="ublk " ;;
*) fail "SPLICE_FRONTEND=$frontend: nbd or ublk" ;;
esac
# shellcheck disable=SC2086 # no flag, or one
tidemark tracker serve --config "$work/tracker.toml" $serve_flags > "$work/tracker.out" 2> "$work/tracker.err" &
tracker_pid=$!
n=0
until grep -q "^$ready" "$work/tracker.out" 2>/dev/null; do
    n=$((n + 1))
    [ $n -gt 300 ] && fail "the tracker did not become ready"
    kill -0 $tracker_pid 2>/dev/null || fail "the tracker exited: $(tail -n 5 "$work/tracker.err")"
    sleep 0.1
done
grep -q "held by its tidemark map" "$work/tracker.err" ||
    fail "the tracker did not say it shares the disk with its map"
if [ "$frontend" = nbd ]; then
    nbd-client 127.0.0.1 10809 /dev/nbd0 -N "$name" -b 4096 > /dev/null 2>&1 ||
        fail "nbd-client could not attach the tracker"
    dev=/dev/nbd0
else
    # "ublk /dev/ublkbN (new device)"
    dev=$(sed -n 's/^ublk \(\/dev\/ublkb[0-9]*\) .*/\1/p' "$work/tracker.out")
    [ -b "$dev" ] || fail "no ublk device in: $(cat "$work/tracker.out")"
fi
dev_id=$(cat "/sys/block/${dev#/dev/}/dev")
info "setup seconds=$(( $(date +%s) - t0 )) frontend=$frontend device=$dev ($dev_id)"

# Refusals: an NBD device of another size, and unprotect while in use.
truncate -s 32M "$work/small.raw"
small=$(/usr/local/bin/losetup -b 4096 -f --show "$work/small.raw") || fail "losetup small"
tidemark splice start "$name" --nbd "$small" --control-socket "$ctl" > "$work/out" 2>&1 &&
    fail "splice start accepted a device of another size"
grep -q "does not serve this disk" "$work/out" || fail "size mismatch: $(cat "$work/out")"
# The name is taken by another disk; the disk is held by its map.
tidemark protect "$small" --name "$name" > "$work/out" 2>&1 &&
    fail "protect accepted a second disk under a taken name"
grep -q "exists already and protects" "$work/out" || fail "name taken: $(cat "$work/out")"
tidemark protect "$disk" --name other > "$work/out" 2>&1 &&
    fail "protect accepted a disk already held by a map"
grep -q "already used by tidemark-$name" "$work/out" || fail "disk held: $(cat "$work/out")"
dmsetup ls | grep -q tidemark-other && fail "a refused protect left its map behind"
/usr/local/bin/losetup -d "$small"
[ "$(table_device)" = "$disk_dev" ] ||
    fail "a refused splice changed the table: $(dmsetup table "tidemark-$name")"

sleep "$run_s"

# Window 1, exact edges: frozen while the disk is copied and spliced.
/usr/local/bin/fsfreeze --freeze "$mnt" || fail "fsfreeze -f"
copy_disk "$work/at-splice-in.img"
tidemark splice start "$name" --device "$dev" --control-socket "$ctl" --json > "$work/in1.json" ||
    { /usr/local/bin/fsfreeze --unfreeze "$mnt"; fail "splice start (frozen): $(cat "$work/in1.json")"; }
/usr/local/bin/fsfreeze --unfreeze "$mnt" || fail "fsfreeze -u"
[ "$(table_device)" = "$dev_id" ] || fail "after splice start the table is $(dmsetup table "tidemark-$name")"
tidemark splice status "$name" | grep -q "spliced onto device $dev_id" ||
    fail "splice status: $(tidemark splice status "$name" 2>&1)"
w0=$(dev_writes)
sleep "$run_s"
w1=$(dev_writes)
[ "$w1" -gt "$w0" ] || fail "no write went through $dev while spliced ($w0 -> $w1)"
/usr/local/bin/fsfreeze --freeze "$mnt" || fail "fsfreeze -f"
tidemark splice stop "$name" --control-socket "$ctl" --json > "$work/out1.json" ||
    { /usr/local/bin/fsfreeze --unfreeze "$mnt"; fail "splice stop (frozen)"; }
copy_disk "$work/at-splice-out.img"
/usr/local/bin/fsfreeze --unfreeze "$mnt" || fail "fsfreeze -u"
[ "$(table_device)" = "$disk_dev" ] || fail "after splice stop the table is $(dmsetup table "tidemark-$name")"
until_seq=$(jq -r '.resync_seq // empty' "$work/out1.json")
[ -n "$until_seq" ] || fail "splice stop recorded no resync in the log: $(cat "$work/out1.json")"
info "window1 splice-in-frozen-ms=$(suspended_ms "$work/in1.json") splice-out-frozen-ms=$(suspended_ms "$work/out1.json") device-writes=$((w1 - w0)) log-until-seq=$until_seq"

# The gap: untracked writes straight to the disk.
sleep "$run_s"

# Window 2, live: the writer runs through both swaps.
tidemark splice start "$name" --device "$dev" --control-socket "$ctl" --json > "$work/in2.json" ||
    fail "live splice start: $(cat "$work/in2.json")"
[ "$(table_device)" = "$dev_id" ] || fail "after the live splice start the table is $(dmsetup table "tidemark-$name")"
tidemark unprotect "$name" > "$work/out" 2>&1 && fail "unprotect accepted a spliced map"
grep -q "splice stop" "$work/out" || fail "unprotect while spliced: $(cat "$work/out")"
w0=$(dev_writes)
sleep "$run_s"
w1=$(dev_writes)
[ "$w1" -gt "$w0" ] || fail "no write went through $dev in window 2 ($w0 -> $w1)"
tidemark splice stop "$name" --control-socket "$ctl" --json > "$work/out2.json" ||
    fail "live splice stop"
[ "$(table_device)" = "$disk_dev" ] || fail "after the live splice stop the table is $(dmsetup table "tidemark-$name")"
info "window2 splice-in-live-ms=$(suspended_ms "$work/in2.json") splice-out-live-ms=$(suspended_ms "$work/out2.json") device-writes=$((w1 - w0))"
sleep 1

touch "$work/stop"
wait "$writer_pid"
writer_pid=""
. "$work/writer.count" 2>/dev/null || fail "no writer count"
info "writer writes=$writes errors=$errors seconds=$(( $(date +%s) - t0 ))"
[ "$writes" -gt 0 ] || fail "the writer wrote nothing"
[ "$errors" -eq 0 ] || fail "the writer saw $errors failed writes"

# Every file holds what was written last, read from the medium.
sync
echo 3 > /proc/sys/vm/drop_caches
checked=0
for m in "$work"/m/*; do
    f=$(basename "$m")
    sum=$(sha256sum < "$mnt/w/$f" | cut -d' ' -f1)
    [ "$sum" = "$(cat "$m")" ] || fail "$f reads back with another checksum"
    checked=$((checked + 1))
done
umount "$mnt" || fail "umount"
e2fsck -fn "$map" > "$work/fsck" 2>&1 || { cat "$work/fsck"; fail "e2fsck -fn is not clean"; }
info "manifest files=$checked"

if dmesg | grep -i -E "I/O error|blk_update_request|Buffer I/O|EXT4-fs error|blocked for more than" > "$work/dmesg.bad"; then
    cat "$work/dmesg.bad"
    fail "the kernel logged I/O errors"
fi

tidemark unprotect "$name" || fail "unprotect"
[ -e "$map" ] && fail "$map still exists after unprotect"
dmsetup ls | grep -q "tidemark-$name" && fail "the map is still listed after unprotect"

if [ "$frontend" = nbd ]; then
    nbd-client -d /dev/nbd0 > /dev/null 2>&1 || fail "nbd-client -d"
fi
kill -TERM "$tracker_pid"
wait "$tracker_pid" || fail "the tracker did not stop cleanly"
# Spliced out, nothing holds the ublk device: a plain stop removes it.
[ "$frontend" = ublk ] && [ -e "$dev" ] && fail "$dev is still there after the tracker stopped"
tidemark log check "$work/log" > "$work/check" || { cat "$work/check"; fail "log check"; }

# Window 1 exactly: the log up to the splice-out's resync record, replayed
# onto the disk as it was at the splice-in, is the disk at the splice-out.
# Window 1 changed the disk (else the comparison below proves nothing).
cmp -s "$work/at-splice-in.img" "$work/at-splice-out.img" &&
    fail "the disk did not change while spliced in window 1"
# Each of the four splices recorded the whole disk as resync-needed.
resyncs=$(tidemark log dump --json "$work/log" | jq -s 'map(select(.kind == "resync-needed")) | length')
[ "$resyncs" -eq 4 ] || fail "$resyncs whole-disk resync-needed records in the log, not 4"
tidemark log replay "$work/log" --onto "$work/at-splice-in.img" --until "$until_seq" --json > "$work/replay" 2>/dev/null ||
    fail "log replay"
set -- $(jq -r '"\(.applied) \(.bytes)"' "$work/replay")
[ "${1:-0}" -gt 0 ] || fail "the log of window 1 holds no write: $(cat "$work/replay")"
info "log resync-needed=$resyncs window1-records-applied=$1 window1-bytes=$2"
cmp "$work/at-splice-in.img" "$work/at-splice-out.img" > "$work/cmp" 2>&1 ||
    fail "the log of window 1 replayed onto the disk at splice-in is not the disk at splice-out: $(head -n 3 "$work/cmp")"
echo "TIDEMARK-VM-PASS"
