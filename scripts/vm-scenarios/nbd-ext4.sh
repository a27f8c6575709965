#!/bin/sh
# Guest side of the nbd-ext4 scenario (busybox sh, run by the VM's /init):
# the real kernel NBD client attached to the host's tracker over TCP, a real
# ext4 made, mounted, churned and unmounted on it. The host side (see
# tests/tests/kernel_vm.rs) then proves the tracker's log replays to the
# very image it served.
#
# Environment (from `scripts/kernel-vm.sh run ... --env`):
#   NBD_PORT    TCP port of the tracker on the host (required)
#   NBD_EXPORT  export name (required)
#   NBD_HOST    default 10.0.2.2, qemu's alias for the host's 127.0.0.1
#
# Console lines for the host:
#   TIDEMARK-VM-RESULT known-file=PATH sha256=HEX   the file to verify
#   TIDEMARK-VM-INFO ...                           measurements, for reports
#   TIDEMARK-VM-PASS | TIDEMARK-VM-FAIL: reason

fail() {
    echo "TIDEMARK-VM-FAIL: $*"
    exit 1
}

: "${NBD_PORT:?}" "${NBD_EXPORT:?}"
NBD_HOST=${NBD_HOST:-10.0.2.2}
dev=/dev/nbd0
mnt=/mnt

# Every request the block layer issues to nbd0, with its flags: the only
# place the guest can tell a FUA write from a plain one. Optional: without
# tracefs the scenario runs unmeasured.
trace=/sys/kernel/tracing
tracing=0
if [ -w "$trace/events/block/block_rq_issue/enable" ]; then
    echo 16384 > "$trace/buffer_size_kb"
    # nbd0 is 43:0; the kernel encodes dev_t as major << 20 | minor.
    echo "dev == $((43 << 20))" > "$trace/events/block/block_rq_issue/filter"
    echo 1 > "$trace/events/block/block_rq_issue/enable"
    tracing=1
fi

nbd-client "$NBD_HOST" "$NBD_PORT" "$dev" -N "$NBD_EXPORT" -b 4096 ||
    fail "nbd-client could not attach $NBD_HOST:$NBD_PORT export $NBD_EXPORT"
q=/sys/block/nbd0/queue
echo "TIDEMARK-VM-INFO nbd0 size=$(($(cat /sys/block/nbd0/size) * 512))" \
    "logical_block_size=$(cat $q/logical_block_size)" \
    "max_sectors_kb=$(cat $q/max_sectors_kb) max_hw_sectors_kb=$(cat $q/max_hw_sectors_kb)" \
    "write_cache=\"$(cat $q/write_cache)\" fua=$(cat $q/fua)" \
    "discard_max_bytes=$(cat $q/discard_max_bytes)"

mkfs.ext4 -q -F -E lazy_itable_init=0,lazy_journal_init=0 "$dev" || fail "mkfs.ext4 failed"
mount -t ext4 "$dev" "$mnt" || fail "mount failed"

# A deterministic pseudo-random sequence (LCG) for file sizes.
x=12345
next() { x=$(( (x * 1103515245 + 12345) % 2147483648 )); }

# File churn: create, overwrite in place, append, delete, rename, with
# syncs and fsyncs between, so the journal commits (FLUSH + FUA) many times.
for round in 0 1 2 3; do
    d=$mnt/round$round
    mkdir -p "$d" || fail "mkdir $d"
    i=0
    while [ $i -lt 30 ]; do
        next
        blocks=$(( x % 48 + 1 ))
        dd if=/dev/urandom of="$d/f$i" bs=4k count=$blocks 2>/dev/null || fail "write $d/f$i"
        i=$((i + 1))
    done
    # Overwrite the middle of some files in place, fsyncing each.
    for i in 2 7 11 19 23; do
        dd if=/dev/urandom of="$d/f$i" bs=4k count=2 seek=1 conv=notrunc,fsync 2>/dev/null ||
            fail "overwrite $d/f$i"
    done
    echo "round $round appended" >> "$mnt/journal.txt"
    if [ $round -gt 0 ]; then
        old=$mnt/round$((round - 1))
        for i in 0 3 6 9 12 15 18 21 24 27; do
            rm -f "$old/f$i" || fail "rm $old/f$i"
        done
        mv "$old/f1" "$d/moved" || fail "rename"
    fi
    sync
done
rm -rf "$mnt/round0" || fail "rm -r round0"

# The file the host finds again, byte for byte, in the replayed image.
dd if=/dev/urandom of="$mnt/known.bin" bs=64k count=32 conv=fsync 2>/dev/null ||
    fail "write known.bin"
sum=$(sha256sum "$mnt/known.bin" | cut -d' ' -f1)
sync
umount "$mnt" || fail "umount failed"

echo "TIDEMARK-VM-INFO nbd0-stat $(cat /sys/block/nbd0/stat)"
nbd-client -d "$dev" || fail "nbd-client -d failed"

if [ $tracing -eq 1 ]; then
    echo 0 > "$trace/events/block/block_rq_issue/enable"
    # Fields after "block_rq_issue:": dev rwbs bytes ... rwbs is the op (R,
    # W, D, F for a flush, WZ for a write-zeroes in newer kernels, N for
    # others: write-zeroes before) with 'F' before it for a preflush and
    # after it for FUA.
    awk '{
        for (i = 1; i <= NF && $i != "block_rq_issue:"; i++) ;
        if (i > NF) next
        rwbs = $(i + 2); bytes = $(i + 3)
        if (rwbs ~ /WZ/ || rwbs ~ /N/) { zeroes++; zbytes += bytes }
        else if (rwbs ~ /W/) {
            writes++; wbytes += bytes
            if (rwbs ~ /W[A-Z]*F/) fua++
            if (rwbs ~ /^F/) preflush++
            if (bytes > max) max = bytes
            if (bytes <= 4096) s4k++
            else if (bytes < 65536) s64k++
            else if (bytes < 524288) s512k++
            else if (bytes < 1048576) s1m++
            else sbig++
        } else if (rwbs ~ /R/) reads++
        else if (rwbs ~ /D/) discards++
        else if (rwbs ~ /^F/) flushes++
    } END {
        printf "TIDEMARK-VM-INFO guest-requests writes=%d fua-writes=%d preflush-writes=%d flushes=%d write-zeroes=%d discards=%d reads=%d write-bytes=%d max-write=%d write-zeroes-bytes=%d\n",
            writes, fua, preflush, flushes, zeroes, discards, reads, wbytes, max, zbytes
        printf "TIDEMARK-VM-INFO guest-write-sizes 4k=%d <64k=%d <512k=%d <1m=%d >=1m=%d\n",
            s4k, s64k, s512k, s1m, sbig
    }' "$trace/trace"
    grep -q 'LOST' "$trace/trace" && echo "TIDEMARK-VM-INFO trace lost events"
fi

echo "TIDEMARK-VM-RESULT known-file=/known.bin sha256=$sum"
echo "TIDEMARK-VM-PASS"
