#!/bin/sh
# Guest side of the ublk scenario (busybox sh, run by the VM's /init): the
# tracker serves its disk to the kernel as /dev/ublkbN through ublk
# (`tidemark tracker serve --ublk`, the same group and log as over NBD).
# An ext4 on it is made, churned and takes a stream of fsynced writes while
# the tracker is killed (SIGKILL) and, later, stopped with --keep-device
# (SIGTERM), and stopped plainly while mounted (the device is in use, so it
# is kept); each time a new tracker takes the quiesced device over (ublk
# user recovery). Then the disk grows online: the tracker tells the device
# its new size (UBLK_U_CMD_UPDATE_SIZE) and resize2fs grows the mounted
# ext4 (grow_online in guest-lib.sh). No write may fail and the kernel may
# log no I/O error.
# Then: e2fsck, a plain SIGTERM removes the device, the log verifies, holds
# barriers (the kernel's FLUSH and FUA), and replays onto a blank image to
# the very bytes of the backing image. The device has one queue per CPU,
# each served by a thread pinned where the driver wants it, with user copy;
# last, a tracker with `user-copy = false` serves a new device through
# per-tag buffers, and what it wrote reads back and replays.
#
# Environment (from `scripts/kernel-vm.sh run ... --env`), all optional:
#   DISK_MB         size of the protected disk (default 64)
#   WRITE_SECS      seconds of writing around each restart (default 3)
#   GROW_MB         how much the disk grows online (default 32)
#
# Console lines for the host:
#   TIDEMARK-VM-INFO ...                 measurements (restart gaps)
#   TIDEMARK-VM-RESULT key=value ...     the figures the host test checks
#   TIDEMARK-VM-PASS | TIDEMARK-VM-FAIL: reason

DISK_MB=${DISK_MB:-64}
WRITE_SECS=${WRITE_SECS:-3}
GROW_MB=${GROW_MB:-32}
dir=/tmp/tm
mnt=/mnt
tracker=""
writer=""

fail() { report_failure "ublk|I/O error" "$@"; }

. /guest-lib.sh

# Starts a tracker (extra flags in $@), waits until it serves the ublk
# device; sets $tracker, $ublk_line and $dev.
n=0
start_tracker() {
    n=$((n + 1))
    serve_tracker "tracker$n" "ublk " --ublk "$@"
    ublk_line=$ready_line
    dev=$(echo "$ublk_line" | cut -d' ' -f2)
}

# check_queues NAME LOG USER_COPY: the device has one hardware queue per
# CPU, each served by a tracker thread pinned to the CPUs the driver maps
# to it (not to all of them), and the tracker used (or not) user copy.
check_queues() {
    cpus=$(grep -c ^processor /proc/cpuinfo)
    queues=$(ls "/sys/block/$1/mq" | wc -l)
    echo "TIDEMARK-VM-INFO $1: $queues hardware queues for $cpus CPUs"
    [ "$queues" = "$cpus" ] || fail "$1 has $queues queues for $cpus CPUs"
    threads=0
    for task in /proc/$tracker/task/*; do
        case $(cat "$task/comm") in ublk*-q*) ;; *) continue ;; esac
        threads=$((threads + 1))
        allowed=$(sed -n 's/^Cpus_allowed_list:[[:space:]]*//p' "$task/status")
        echo "TIDEMARK-VM-INFO queue thread $(cat "$task/comm") runs on CPUs $allowed"
        if [ "$cpus" -gt 1 ] && [ "$allowed" = "0-$((cpus - 1))" ]; then
            fail "queue thread $(cat "$task/comm") is not pinned"
        fi
    done
    [ "$threads" = "$queues" ] || fail "$threads queue threads for $queues queues"
    grep -q "user_copy=$3" "$dir/$2.err" || fail "the tracker did not start with user_copy=$3"
}

[ -e /dev/ublk-control ] || fail "no /dev/ublk-control: the ublk_drv module is not loaded"
mkdir -p "$dir" || fail "mkdir $dir"
truncate -s "${DISK_MB}M" "$dir/disk.img" || fail "truncate"
write_tracker_toml "$dir/disk.img" 384MiB

t0=$(now_ms)
start_tracker
echo "TIDEMARK-VM-INFO first start: $ublk_line in $(( $(now_ms) - t0 )) ms"
case $ublk_line in "ublk /dev/ublkb"*" (new device)") ;; *) fail "unexpected: $ublk_line" ;; esac
[ -b "$dev" ] || fail "$dev is not a block device"
name=${dev#/dev/}
q=/sys/block/$name/queue
echo "TIDEMARK-VM-INFO $name size=$(($(cat /sys/block/$name/size) * 512))" \
    "logical_block_size=$(cat $q/logical_block_size)" \
    "max_sectors_kb=$(cat $q/max_sectors_kb) max_hw_sectors_kb=$(cat $q/max_hw_sectors_kb)" \
    "write_cache=\"$(cat $q/write_cache)\" fua=$(cat $q/fua)" \
    "discard_max_bytes=$(cat $q/discard_max_bytes)"
[ "$(($(cat /sys/block/$name/size) * 512))" = "$((DISK_MB << 20))" ] || fail "$dev has the wrong size"
[ "$(cat $q/logical_block_size)" = 4096 ] || fail "block size is not 4096"
[ "$(cat $q/fua)" = 1 ] || fail "$dev does not take FUA writes"
tidemark ublk list | sed 's/^/TIDEMARK-VM-INFO ublk list: /'
check_queues "$name" tracker1 true

mkfs.ext4 -q -F -E lazy_itable_init=0,lazy_journal_init=0 "$dev" || fail "mkfs.ext4 failed"
mount -t ext4 "$dev" "$mnt" || fail "mount failed"
# Churn: files made, overwritten, renamed, removed.
for i in 1 2 3 4 5 6 7 8; do
    dd if=/dev/urandom of="$mnt/c$i" bs=64k count=$((i * 2)) 2>/dev/null || fail "churn write"
done
mv "$mnt/c3" "$mnt/c3.moved" && rm "$mnt/c5" && sync || fail "churn"
sha256sum "$mnt"/c* > "$dir/churn.sums"

start_writer "$mnt"
keep_writing 0

# 1. The tracker dies mid-write; a new one takes the device over.
before=$(writes)
t_kill=$(now_ms)
kill -9 "$tracker"
wait "$tracker" 2>/dev/null
start_tracker --keep-device
gap_kill=$(( $(now_ms) - t_kill ))
echo "TIDEMARK-VM-INFO restart after SIGKILL: $ublk_line, gap $gap_kill ms (at $before writes)"
case $ublk_line in *"took over"*) ;; *) fail "after SIGKILL: $ublk_line" ;; esac
keep_writing "$before"

# 2. A clean stop that keeps the device, and a new tracker again.
before=$(writes)
t_term=$(now_ms)
kill -TERM "$tracker"
wait "$tracker"
rc=$?
[ $rc -eq 0 ] || fail "the tracker with --keep-device exited with status $rc on SIGTERM"
[ -b "$dev" ] || fail "$dev was not kept on SIGTERM with --keep-device"
start_tracker
gap_term=$(( $(now_ms) - t_term ))
echo "TIDEMARK-VM-INFO restart after SIGTERM --keep-device: $ublk_line, gap $gap_term ms (at $before writes)"
case $ublk_line in *"took over"*) ;; *) fail "after SIGTERM --keep-device: $ublk_line" ;; esac
keep_writing "$before"

# 2b. A plain SIGTERM while the ext4 is mounted: the device is in use, so
# the tracker keeps it rather than removing it under the filesystem.
before=$(writes)
t_busy=$(now_ms)
kill -TERM "$tracker"
wait "$tracker"
rc=$?
[ $rc -eq 0 ] || fail "the tracker exited with status $rc on SIGTERM with the device mounted"
[ -b "$dev" ] || fail "$dev was removed on SIGTERM although mounted"
grep -q "in use" "$dir/tracker$n.err" || fail "the tracker did not say why it kept the mounted device"
start_tracker
gap_busy=$(( $(now_ms) - t_busy ))
echo "TIDEMARK-VM-INFO restart after SIGTERM while mounted: $ublk_line, gap $gap_busy ms (at $before writes)"
case $ublk_line in *"took over"*) ;; *) fail "after SIGTERM while mounted: $ublk_line" ;; esac
keep_writing "$before"

# 2c. The disk grows online under the mounted ext4 and the writer: the
# tracker tells the device (UBLK_U_CMD_UPDATE_SIZE), resize2fs grows the
# ext4, and a file that fits only in the new space is written.
before=$(writes)
grow_online "$dir/disk.img" "$dev" "$mnt" "$GROW_MB"
keep_writing "$before"

stop_writer
result=$writer_result
echo "TIDEMARK-VM-INFO writer $result"
sha256sum -c "$dir/churn.sums" > /dev/null || fail "churned files changed"
sha256sum -c "$dir/grown.sums" > /dev/null || fail "the file in the grown space changed"
sync
umount "$mnt" || fail "umount failed"
e2fsck -fn "$dev" > "$dir/fsck.out" 2>&1 || {
    sed 's/^/TIDEMARK-VM-INFO fsck: /' "$dir/fsck.out"
    fail "e2fsck -fn $dev found problems"
}

# 3. A plain SIGTERM removes the device.
kill -TERM "$tracker"
wait "$tracker"
rc=$?
[ $rc -eq 0 ] || fail "the last tracker exited with status $rc on SIGTERM"
tracker=""
i=0
while [ -e "/sys/block/$name" ]; do
    i=$((i + 1))
    [ $i -gt 50 ] && fail "$dev still exists after a plain SIGTERM"
    usleep 100000
done

io_errors=$(dmesg | grep -c -i "I/O error")
echo "TIDEMARK-VM-INFO kernel: $io_errors I/O errors; ublk messages:"
dmesg | grep -i "ublk" | sed 's/^/TIDEMARK-VM-INFO dmesg: /'
[ "$io_errors" -eq 0 ] || fail "the kernel logged $io_errors I/O errors"
case $result in *" errors=0 "*) ;; *) fail "writes failed: $result" ;; esac

# 4. The log verifies, holds the barriers, replays to the served image.
log_replays_to "$dir/disk.img"
barriers=$(tidemark log dump --json "$dir/log" | jq -s 'map(select(.kind == "barrier")) | length')
[ "$barriers" -gt 0 ] || fail "no barrier in the log"

# 5. The driver-copy path (user-copy = false: per-tag buffers), on a new
# device: data written through it reads back, and reaches the log.
write_tracker_toml "$dir/disk.img" 384MiB "
[tracker.ublk]
user-copy = false
queue-depth = 16
"
start_tracker
case $ublk_line in "ublk /dev/ublkb"*" (new device)") ;; *) fail "driver copy: unexpected: $ublk_line" ;; esac
name=${dev#/dev/}
check_queues "$name" "tracker$n" false
dd if=/dev/urandom of="$dir/pattern" bs=1M count=4 2>/dev/null || fail "pattern"
dd if="$dir/pattern" of="$dev" bs=1M seek=8 conv=fsync 2>/dev/null || fail "driver copy: write"
echo 3 > /proc/sys/vm/drop_caches
dd if="$dev" of="$dir/readback" bs=1M skip=8 count=4 2>/dev/null || fail "driver copy: read"
cmp "$dir/pattern" "$dir/readback" || fail "driver copy: the data read back differs"
kill -TERM "$tracker"
wait "$tracker"
rc=$?
[ $rc -eq 0 ] || fail "the driver-copy tracker exited with status $rc on SIGTERM"
tracker=""
log_replays_to "$dir/disk.img"

echo "TIDEMARK-VM-RESULT restart-gap-kill-ms=$gap_kill restart-gap-term-ms=$gap_term restart-gap-busy-ms=$gap_busy io-errors=$io_errors barriers=$barriers $grow_result $result"
echo "TIDEMARK-VM-PASS"
