#!/bin/bash
# The workload of the Debian guest of tests/tests/vm_guests.rs, started by
# guest-records.service at every boot. On the data disk (the virtio disk
# with the serial "data", an ext4 file system) it first checks what a
# failover or a test failover left it: the journal replayed (what mounting
# does), then a full read-only e2fsck that must find nothing, then every
# record of /records: record n is the 512-byte line record_text(n), and
# records 1..N must all be there, intact and in order (a partial record
# after the last whole one is a write that was never acknowledged). It
# prints one line the host reads,
#   TIDEMARK-GUEST-CHECK verdict=PASS|FAIL clean=yes|no records=N tail=... why=...
# and then appends records N+1, N+2, ..., each fsync'ed before the next,
# printing `TIDEMARK-GUEST-ACK n` once record n is durable (an I/O error
# prints `TIDEMARK-GUEST-IOERR n` and stops the workload).
set -u
exec >/dev/ttyS0 2>&1
say() { echo "TIDEMARK-GUEST-$*"; }

# The record's text, one 512-byte line (511 characters and a newline);
# the same awk function checks them.
record_awk='function record_text(n,   s, fill) {
    s = sprintf("REC %08d ", n); fill = sprintf("%x-", n * 7919)
    while (length(s) < 511) s = s fill
    return substr(s, 1, 511)
}'

dev=""
for _ in $(seq 200); do
    for serial in /sys/block/vd*/serial; do
        [ "$(cat "$serial" 2>/dev/null)" = data ] || continue
        dev=${serial%/serial}; dev=/dev/${dev##*/}
    done
    [ -n "$dev" ] && [ -b "$dev" ] && break
    sleep 0.1
done
if [ -z "$dev" ]; then
    say "CHECK verdict=FAIL clean=unknown records=0 tail=unknown why=no-data-disk"
    exit 1
fi

# The journal replayed (exit 0, or 1 when it was replayed), then a forced
# read-only check: status 0 is a clean file system.
e2fsck -p -E journal_only "$dev" >/run/fsck-journal.log 2>&1
replay=$?
e2fsck -f -n "$dev" >/run/fsck.log 2>&1
fsck=$?
clean=yes
why=none
if [ $replay -gt 1 ] || [ $fsck -ne 0 ]; then
    clean=no
    why=e2fsck-$replay-$fsck
    sed 's/^/fsck: /' /run/fsck-journal.log /run/fsck.log
fi
mkdir -p /data
if ! mount -t ext4 "$dev" /data; then
    say "CHECK verdict=FAIL clean=$clean records=0 tail=unknown why=mount"
    exit 1
fi
touch /data/records
size=$(stat -c %s /data/records)
whole=$((size / 512))
tail=none
[ $((size % 512)) -eq 0 ] || tail=partial
# The first record that is not what it should be, 0 if all are.
bad=$(head -c $((whole * 512)) /data/records |
      awk "$record_awk"' $0 != record_text(NR) { print NR; found = 1; exit } END { if (!found) print 0 }')
verdict=PASS
if [ "$bad" != 0 ]; then
    verdict=FAIL
    why=record-$bad-damaged
elif [ $clean = no ]; then
    verdict=FAIL
fi
say "CHECK verdict=$verdict clean=$clean records=$whole tail=$tail why=$why"
# A torn tail is cut so the next record starts on its own line.
[ $tail = none ] || truncate -s $((whole * 512)) /data/records

n=$whole
while :; do
    n=$((n + 1))
    if ! awk -v n=$n "$record_awk"' BEGIN { print record_text(n) }' |
         dd of=/data/records oflag=append conv=notrunc,fsync status=none; then
        say "IOERR $n"
        exit 1
    fi
    say "ACK $n"
    sleep 0.2
done
