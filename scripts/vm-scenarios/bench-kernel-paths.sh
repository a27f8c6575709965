#!/bin/sh
# Guest side of the kernel-path benchmark (busybox sh, run by the VM's
# /init; the host side is scripts/bench-kernel-paths.sh): write performance
# of the same disk through
#   dm-linear  a plain device-mapper linear map over the disk;
#   nbd        the tracker serving the disk (`tidemark tracker serve
#              --attach`, as in nbd-netlink.sh), /dev/nbdN over netlink,
#              every write going through the tracker and into its log;
#   ublk       the same tracker serving the disk as /dev/ublkbN
#              (`tidemark tracker serve --ublk`, as in ublk-ext4.sh).
#
# The disk is a loop device (4 KiB sectors, like the NBD device) over a
# file on the guest's tmpfs, filled once so that no path pays for tmpfs
# page allocation. The tracker's log is on the same tmpfs; every workload
# gets a fresh tracker and an empty log.
#
# Workloads (fio, libaio, O_DIRECT, one job), each run on every path:
#   randwrite-4k  4 KiB random writes, IODEPTH in flight (default 16)
#   seqwrite-1m   1 MiB sequential writes, SEQ_IODEPTH in flight (default 1)
# each for RUNTIME seconds (default 8); through the tracker a run also stops once it has
# written IO_CAP_MB (default 288): the cap keeps the tracker's log inside
# the guest's tmpfs (half of its 1 GiB; an overflowing log would switch the
# tracker to its bitmap mode and measure something else). fio computes IOPS
# and bandwidth over the time it actually ran, so a capped run is still a
# fair figure (runtime-ms in the result line says how long it was).
#
# Under TCG every figure is slow; only the ratios between paths mean much.
#
# Environment (from `scripts/kernel-vm.sh run ... --env`), all optional:
#   DISK_MB      size of the disk (default 96)
#   RUNTIME      seconds per run (default 8)
#   IO_CAP_MB    most bytes a run through the tracker writes (default 288)
#   IODEPTH      in flight for randwrite-4k (default 16)
#   SEQ_IODEPTH  in flight for seqwrite-1m (default 1: dd-like O_DIRECT
#                streaming)
#   BIN_NOTE     the tidemark build used, echoed for the record
# Needs in the guest: tidemark, fio, util-linux losetup (`--bin` them).
#
# Console lines for the host:
#   TIDEMARK-VM-INFO bench result path=P workload=W iops=N mbps=X runtime-ms=T written-mb=M
#   TIDEMARK-VM-INFO bench ratio workload=W P/dm-linear iops=R mbps=R
#   TIDEMARK-VM-INFO bench tracker path=P workload=W writes=N write-latency-ms=X
#                                        the tracker's mean write latency
#                                        (its metrics) on path P
#   TIDEMARK-VM-INFO bench cpu path=P workload=W requests=N cpu-ms=C cpu-us-per-request=X
#                                        the tracker process's CPU time
#                                        (user + system, /proc/PID/stat)
#                                        over the fio run, per request
#   TIDEMARK-VM-INFO ...                 other facts (devices, log sizes)
#   TIDEMARK-VM-PASS | TIDEMARK-VM-FAIL: reason

DISK_MB=${DISK_MB:-96}
RUNTIME=${RUNTIME:-8}
IO_CAP_MB=${IO_CAP_MB:-288}
IODEPTH=${IODEPTH:-16}
SEQ_IODEPTH=${SEQ_IODEPTH:-1}
dir=/tmp/bench
map=bench
tracker=""

info() { echo "TIDEMARK-VM-INFO $*"; }

. /guest-lib.sh

fail() {
    echo "TIDEMARK-VM-FAIL: $*"
    for f in "$dir"/tracker*.err "$dir"/fio*.err; do
        [ -s "$f" ] && tail -n 20 "$f" | sed "s|^|TIDEMARK-VM-INFO $(basename "$f"): |"
    done
    dmesg | tail -n 20 | sed 's/^/TIDEMARK-VM-INFO dmesg: /'
    [ -n "$tracker" ] && kill -9 "$tracker" 2>/dev/null
    exit 1
}

# Runs one fio workload on device $2 for path $1; prints the result line
# and keeps "iops mbps" in $dir/$1.$3.
n=0
run_fio() {
    path=$1 dev=$2 workload=$3
    n=$((n + 1))
    case $workload in
        randwrite-4k) args="--rw=randwrite --bs=4k --iodepth=$IODEPTH --randrepeat=0 --norandommap" ;;
        seqwrite-1m) args="--rw=write --bs=1M --iodepth=$SEQ_IODEPTH" ;;
        *) fail "unknown workload $workload" ;;
    esac
    # dm-linear writes no log: it runs the whole RUNTIME, over the disk
    # again and again.
    case $path in
        dm-linear) limit="--time_based" ;;
        *) limit="--io_size=${IO_CAP_MB}M" ;;
    esac
    cpu_before=$(tracker_cpu_ticks)
    # shellcheck disable=SC2086
    fio --name="$path-$workload" --filename="$dev" $args --ioengine=libaio --direct=1 \
        --size="${DISK_MB}M" $limit --runtime="$RUNTIME" \
        --numjobs=1 --minimal > "$dir/fio$n.out" 2> "$dir/fio$n.err" ||
        fail "fio $workload on $path ($dev) failed"
    # Terse v3: field 5 error, 47 write KiB, 48 write KiB/s, 49 write IOPS,
    # 50 write runtime ms.
    line=$(grep ';' "$dir/fio$n.out" | tail -n 1)
    err=$(echo "$line" | cut -d';' -f5)
    [ "$err" = 0 ] || fail "fio $workload on $path: error $err"
    set -- $(echo "$line" | awk -F';' '{ printf "%d %.1f %d %.0f\n", $49, $48 / 1024, $50, $47 / 1024 }')
    info "bench result path=$path workload=$workload iops=$1 mbps=$2 runtime-ms=$3 written-mb=$4"
    echo "$1 $2" > "$dir/$path.$workload"
    if [ -n "$cpu_before" ]; then
        cpu_after=$(tracker_cpu_ticks)
        case $workload in randwrite-4k) kib=4 ;; *) kib=1024 ;; esac
        # Requests: what fio wrote over the request size.
        echo "$line" | awk -F';' -v b="$cpu_before" -v a="$cpu_after" -v kib="$kib" \
            -v p="$path" -v w="$workload" '{
                n = int($47 / kib); ms = (a - b) * 10
                printf "TIDEMARK-VM-INFO bench cpu path=%s workload=%s requests=%d cpu-ms=%d cpu-us-per-request=%.1f\n",
                    p, w, n, ms, (n > 0 ? ms * 1000 / n : 0) }'
    fi
}

# The tracker's user + system CPU time so far, in clock ticks (USER_HZ,
# 100 a second on x86 Linux): fields 14 and 15 of /proc/PID/stat (its
# name, field 2, has no spaces). Empty when no tracker runs. The ublk
# driver's request delivery runs as task work of the tracker's queue
# threads and counts here; the kernel nbd client's socket sends run in the
# submitting task and its workers, not in the tracker.
tracker_cpu_ticks() {
    [ -n "$tracker" ] && [ -r "/proc/$tracker/stat" ] || return 0
    awk '{ print $14 + $15 }' "/proc/$tracker/stat"
}

# Starts a tracker with a fresh log over the disk, serving it through $1
# (nbd: --attach, ublk: --ublk), and waits until the kernel device is
# there; sets $tracker and $kdev.
t=0
start_tracker() {
    frontend=$1
    t=$((t + 1))
    rm -rf "$dir/log"
    write_tracker_toml "$disk" "$((IO_CAP_MB + 64))MiB" "
[tracker.attach]
io-timeout = \"30s\"
dead-connection-timeout = \"60s\"
"
    case $frontend in
        nbd) serve_tracker "tracker$t" "attached " --attach ;;
        ublk) serve_tracker "tracker$t" "ublk " --ublk ;;
    esac
    kdev=$(echo "$ready_line" | cut -d' ' -f2)
    [ -b "$kdev" ] || fail "tracker $t: no device in: $(cat "$dir/tracker$t.out")"
}

# The tracker's own write latency (its metrics: from a write reaching the
# group, through the backing write and the log append, to its
# acknowledgement), as the mean over the run: what is left of a write's
# time beyond it is the transport (NBD: the kernel client, the socket, the
# request and reply handling; ublk: the driver and the io_uring commands).
tracker_latency() {
    path=$1 workload=$2
    port=$(grep "serving metrics" "$dir/tracker$t.err" | grep -o "127.0.0.1:[0-9]*" | head -n 1 | cut -d: -f2)
    [ -n "$port" ] || return 0
    wget -q -O - "http://127.0.0.1:$port/metrics" 2>/dev/null | awk -v p="$path" -v w="$workload" '
        /^tidemark_tracker_write_latency_seconds_sum/ { sum = $NF }
        /^tidemark_tracker_write_latency_seconds_count/ { n = $NF }
        END { if (n > 0) printf "TIDEMARK-VM-INFO bench tracker path=%s workload=%s writes=%d write-latency-ms=%.2f\n", p, w, n, sum / n * 1000 }'
}

stop_tracker() {
    tracker_latency "$1" "$2"
    info "tracker $t: log after the run $(du -sk "$dir/log" | cut -f1) KiB (limit $((IO_CAP_MB + 64)) MiB)"
    grep -i -E "overflow|bitmap" "$dir/tracker$t.err" | head -n 3 | sed "s/^/TIDEMARK-VM-INFO tracker $t: /"
    kill -TERM "$tracker"
    wait "$tracker"
    rc=$?
    [ $rc -eq 0 ] || fail "tracker $t exited with status $rc on SIGTERM"
    tracker=""
}

ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "n/a" }'; }

mkdir -p "$dir" || fail "mkdir $dir"
command -v fio > /dev/null || fail "no fio in the guest"
info "bench setup: kernel $(uname -r), $(grep -c ^processor /proc/cpuinfo) vCPUs, disk ${DISK_MB} MiB loop on tmpfs," \
    "runtime ${RUNTIME} s per run (nbd: at most ${IO_CAP_MB} MiB), randwrite iodepth ${IODEPTH}, seqwrite iodepth ${SEQ_IODEPTH}," \
    "fio $(fio --version), tidemark build: ${BIN_NOTE:-unknown}"
# Filled, not sparse: every path then overwrites allocated tmpfs pages.
dd if=/dev/zero of="$dir/disk.raw" bs=1M count="$DISK_MB" 2>/dev/null || fail "filling the disk file"
disk=$(/usr/local/bin/losetup -b 4096 -f --show "$dir/disk.raw") || fail "losetup"
sectors=$(blockdev --getsz "$disk")

# (a) dm-linear over the disk.
echo "0 $sectors linear $disk 0" | dmsetup create "$map" || fail "dmsetup create linear"
for w in randwrite-4k seqwrite-1m; do
    run_fio dm-linear "/dev/mapper/$map" "$w"
done
dmsetup remove "$map" || fail "dmsetup remove"

# (b) the tracker as /dev/nbdN over netlink, (c) as /dev/ublkbN; a fresh
# tracker and log each.
for path in nbd ublk; do
    for w in randwrite-4k seqwrite-1m; do
        start_tracker "$path"
        if [ "$w" = randwrite-4k ]; then
            q=/sys/block/${kdev#/dev/}/queue
            info "bench $path: $kdev logical_block_size=$(cat $q/logical_block_size)" \
                "max_sectors_kb=$(cat $q/max_sectors_kb) nr_requests=$(cat $q/nr_requests)" \
                "write_cache=\"$(cat $q/write_cache)\" scheduler=\"$(cat $q/scheduler)\""
        fi
        run_fio "$path" "$kdev" "$w"
        stop_tracker "$path" "$w"
    done
done

io_errors=$(dmesg | grep -c -i "I/O error")
[ "$io_errors" -eq 0 ] || fail "the kernel logged $io_errors I/O errors"

for w in randwrite-4k seqwrite-1m; do
    read -r di dm < "$dir/dm-linear.$w"
    read -r ni nm < "$dir/nbd.$w"
    read -r ui um < "$dir/ublk.$w"
    info "bench ratio workload=$w nbd/dm-linear iops=$(ratio "$ni" "$di") mbps=$(ratio "$nm" "$dm")"
    info "bench ratio workload=$w ublk/dm-linear iops=$(ratio "$ui" "$di") mbps=$(ratio "$um" "$dm")"
    info "bench ratio workload=$w ublk/nbd iops=$(ratio "$ui" "$ni") mbps=$(ratio "$um" "$nm")"
done
/usr/local/bin/losetup -d "$disk"
echo "TIDEMARK-VM-PASS"
