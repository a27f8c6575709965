#!/bin/sh
# Guest side of the nbd-netlink scenario (busybox sh, run by the VM's /init):
# the tracker runs in the guest and attaches /dev/nbd0 itself over the nbd
# generic netlink family (`tidemark tracker serve --attach`, no nbd-client).
# An ext4 on it takes a stream of fsynced writes while the tracker is
# killed (SIGKILL) and, later, stopped with --keep-device (SIGTERM); each
# time a new tracker re-adopts the device with NBD_CMD_RECONFIGURE. In
# between the tracker is frozen (SIGSTOP) past the kernel's request
# timeout, so the kernel drops its connection; the thawed tracker hands the
# device a new one itself. Then the disk grows online: the tracker tells
# the device its new size (NBD_CMD_RECONFIGURE, NBD_ATTR_SIZE_BYTES) and
# resize2fs grows the mounted ext4 (grow_online in guest-lib.sh). No
# write may fail and the kernel may log no I/O error. Then: e2fsck of the
# device, the tracker detaches it on a plain SIGTERM, its log verifies
# (`tidemark log check`) and replays onto a blank image to the very bytes
# of the backing image.
#
# Environment (from `scripts/kernel-vm.sh run ... --env`), all optional:
#   DISK_MB         size of the protected disk (default 64)
#   IO_TIMEOUT      the kernel's per-request timeout (default "3s")
#   WRITE_SECS      seconds of writing around each restart (default 3)
#   STALL_SECS      how long the tracker is stopped (SIGSTOP), more than
#                   IO_TIMEOUT (default 6)
#   GROW_MB         how much the disk grows online (default 32)
#
# Console lines for the host:
#   TIDEMARK-VM-INFO ...                 measurements (restart gaps, stalls)
#   TIDEMARK-VM-PASS | TIDEMARK-VM-FAIL: reason

DISK_MB=${DISK_MB:-64}
IO_TIMEOUT=${IO_TIMEOUT:-3s}
WRITE_SECS=${WRITE_SECS:-3}
STALL_SECS=${STALL_SECS:-6}
GROW_MB=${GROW_MB:-32}
dir=/tmp/tm
mnt=/mnt
dev=/dev/nbd0
tracker=""
writer=""

fail() { report_failure "nbd|I/O error" "$@"; }

. /guest-lib.sh

# Starts a tracker (extra flags in $@), waits until it has attached the
# device; sets $tracker and $attached_line.
n=0
start_tracker() {
    n=$((n + 1))
    serve_tracker "tracker$n" "attached " --attach "$@"
    attached_line=$ready_line
}

mkdir -p "$dir" || fail "mkdir $dir"
truncate -s "${DISK_MB}M" "$dir/disk.img" || fail "truncate"
write_tracker_toml "$dir/disk.img" 384MiB "
[tracker.attach]
io-timeout = \"$IO_TIMEOUT\"
dead-connection-timeout = \"60s\"
"

t0=$(now_ms)
start_tracker
echo "TIDEMARK-VM-INFO first attach: $attached_line in $(( $(now_ms) - t0 )) ms"
case $attached_line in "attached $dev (new connection)") ;; *) fail "unexpected: $attached_line" ;; esac
q=/sys/block/nbd0/queue
echo "TIDEMARK-VM-INFO nbd0 size=$(($(cat /sys/block/nbd0/size) * 512))" \
    "logical_block_size=$(cat $q/logical_block_size)" \
    "max_sectors_kb=$(cat $q/max_sectors_kb) max_hw_sectors_kb=$(cat $q/max_hw_sectors_kb)" \
    "write_cache=\"$(cat $q/write_cache)\" fua=$(cat $q/fua)" \
    "discard_max_bytes=$(cat $q/discard_max_bytes)" \
    "backend=$(cat /sys/block/nbd0/backend) pid=$(cat /sys/block/nbd0/pid)"
[ "$(cat $q/logical_block_size)" = 4096 ] || fail "block size is not 4096"
[ "$(cat /sys/block/nbd0/pid)" = "$tracker" ] || fail "nbd0's pid is not the tracker's"

mkfs.ext4 -q -F -E lazy_itable_init=0,lazy_journal_init=0 "$dev" || fail "mkfs.ext4 failed"
mount -t ext4 "$dev" "$mnt" || fail "mount failed"

start_writer "$mnt"
keep_writing 0

# 1. The tracker dies mid-write; a new one re-adopts the device.
before=$(writes)
t_kill=$(now_ms)
kill -9 "$tracker"
wait "$tracker" 2>/dev/null
start_tracker --keep-device
gap_kill=$(( $(now_ms) - t_kill ))
echo "TIDEMARK-VM-INFO restart after SIGKILL: $attached_line, gap $gap_kill ms (at $before writes)"
case $attached_line in *re-adopted*) ;; *) fail "after SIGKILL: $attached_line" ;; esac
keep_writing "$before"

# 1b. The tracker stalls (SIGSTOP) for longer than the kernel's request
# timeout: the kernel gives up on the live connection and requeues its
# requests; once the tracker runs again, it hands the device a new one.
reconnected_before=$(dmesg | grep -c "reconnected socket")
before=$(writes)
t_stop=$(now_ms)
kill -STOP "$tracker"
sleep "$STALL_SECS"
kill -CONT "$tracker"
keep_writing "$before"
reconnected=$(dmesg | grep -c "reconnected socket")
echo "TIDEMARK-VM-INFO stall of ${STALL_SECS} s: writes resumed, $((reconnected - reconnected_before)) new connection(s) in $(( $(now_ms) - t_stop )) ms"
[ "$reconnected" -gt "$reconnected_before" ] ||
    fail "no new connection after the kernel timed out the stalled tracker's"
kill -0 "$tracker" 2>/dev/null || fail "the tracker died after the stall"

# 2. A clean stop that keeps the device (this tracker runs with
# --keep-device), and a new tracker again.
before=$(writes)
t_term=$(now_ms)
kill -TERM "$tracker"
wait "$tracker"
rc=$?
[ $rc -eq 0 ] || fail "the tracker with --keep-device exited with status $rc on SIGTERM"
[ -e /sys/block/nbd0/backend ] || fail "nbd0 was not kept on SIGTERM with --keep-device"
start_tracker
gap_term=$(( $(now_ms) - t_term ))
echo "TIDEMARK-VM-INFO restart after SIGTERM --keep-device: $attached_line, gap $gap_term ms (at $before writes)"
case $attached_line in *re-adopted*) ;; *) fail "after SIGTERM --keep-device: $attached_line" ;; esac
keep_writing "$before"

# 2b. The disk grows online under the mounted ext4 and the writer: the
# tracker tells the device (NBD_CMD_RECONFIGURE with the new size),
# resize2fs grows the ext4, and a file that fits only in the new space is
# written.
before=$(writes)
grow_online "$dir/disk.img" "$dev" "$mnt" "$GROW_MB"
keep_writing "$before"

stop_writer
result=$writer_result
echo "TIDEMARK-VM-INFO writer $result"
sha256sum -c "$dir/grown.sums" > /dev/null || fail "the file in the grown space changed"
sync
umount "$mnt" || fail "umount failed"
e2fsck -fn "$dev" > "$dir/fsck.out" 2>&1 || {
    sed 's/^/TIDEMARK-VM-INFO fsck: /' "$dir/fsck.out"
    fail "e2fsck -fn $dev found problems"
}

# 3. A plain SIGTERM detaches the device.
kill -TERM "$tracker"
wait "$tracker"
rc=$?
[ $rc -eq 0 ] || fail "the last tracker exited with status $rc on SIGTERM"
tracker=""
[ -e /sys/block/nbd0/backend ] && fail "nbd0 is still configured after a plain SIGTERM"

io_errors=$(dmesg | grep -c -i "I/O error")
echo "TIDEMARK-VM-INFO kernel: $io_errors I/O errors; nbd messages:"
dmesg | grep -i "nbd" | sed 's/^/TIDEMARK-VM-INFO dmesg: /'
[ "$io_errors" -eq 0 ] || fail "the kernel logged $io_errors I/O errors"
case $result in *" errors=0 "*) ;; *) fail "writes failed: $result" ;; esac
[ -s "$dir/dd.err" ] && grep -v -E "records (in|out)|bytes .* copied" "$dir/dd.err" | head -n 5 |
    sed 's/^/TIDEMARK-VM-INFO dd: /'

# 4. The log verifies and replays to the image the trackers served.
log_replays_to "$dir/disk.img"

echo "TIDEMARK-VM-RESULT restart-gap-kill-ms=$gap_kill restart-gap-term-ms=$gap_term io-errors=$io_errors $grow_result $result"
echo "TIDEMARK-VM-PASS"
