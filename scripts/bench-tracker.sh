#!/usr/bin/env bash
# The tracker against the bare device, nbdkit and qemu-nbd, side by side,
# with the same fio workloads through the same NBD client, on the same
# filesystem, in one run; with CPU time, context switches and system calls
# per request of every server, its peak memory, a profile of where a 4 KiB
# write's time goes, and the tracker's memory under a large write load.
#
# Servers (each serves the same preallocated, filled image file, one at a
# time, on a unix socket; every server is started fresh for every workload,
# and the page cache is written back and dropped before each start):
#   bare              no server: fio's io_uring engine with O_DIRECT on the
#                     image file itself, same block size and queue depth: the
#                     physical limit of this filesystem and device.
#   tracker-none      tidemark tracker serve --cache none: the image opened
#                     O_DIRECT, every write also appended to the change log;
#                     FLUSH = barrier = fdatasync(log) + flush(image).
#   tracker-writeback the same with --cache writeback: the image written
#                     through the page cache, fdatasync at barriers.
#   tracker-sync      (not run by default) --engine sync: the synchronous
#                     oracle engine.
#   nbdkit            nbdkit file FILE: buffered pwrite into the page cache,
#                     FLUSH = fdatasync (what `cache = "writeback"` is
#                     measured against).
#   nbdkit-nocache    (not run by default) nbdkit file FILE cache=none:
#                     still buffered, but nbdkit starts writeback and evicts
#                     the pages it wrote.
#   qemu-nbd          qemu-nbd -f raw --cache=none --aio=native: O_DIRECT +
#                     Linux AIO, FLUSH = fdatasync (what `cache = "none"` is
#                     measured against).
#   qemu-nbd-wb       qemu-nbd -f raw --cache=writeback: the page cache.
# None of the servers but the tracker keeps a log; the tracker writes every
# byte twice (image + log), which is the point of the comparison.
#
# Client: fio's nbd engine (libnbd, one connection per job) when this fio has
# it (`fio --enghelp` lists nbd); otherwise nbdfuse -C 1 + a loop device with
# --direct-io=on, and fio libaio --direct=1 on the loop device.
#
# Workloads (time based, RAMP seconds of warm-up excluded from the figures,
# then RUNTIME seconds measured; the warm-up also lets the tracker's activity
# map get hot, so the figures are its steady state):
#   randwrite-4k-qd1, randwrite-4k-qd32, write-1m-qd8, randread-4k-qd32, and
#   randwrite-4k-qd32-fsync32 (a FLUSH after every 32 writes: the barrier is
#   the tracker's real cost).
#
# Per server and workload, over the measured window only (from RAMP + 0.3 s
# to the end of the run, minus 0.3 s): CPU time per request (user + system
# time of the server process from /proc/PID/stat, io_uring workers
# included, divided by fio's request rate times the window), voluntary +
# involuntary context switches per request (summed over
# /proc/PID/task/*/status) and system calls per request (`perf stat -e
# raw_syscalls:sys_enter -p PID`; "-" when perf is missing or refused),
# and the server's peak RSS (VmHWM) over the whole run.
#
# Then, unless PROFILE=0: `perf record -g` of each tracker mode and its
# peers (PROFILE_SERVERS) under 4 KiB random writes at QD1 and QD32 and
# 1 MiB writes (PROFILE_WORKLOADS), each a separate run, and the top of
# `perf report` — where each request's time goes, beside the peer's. The
# table's "busiest thread" column says whether a server was bound by one
# thread's CPU (near 100 %) or waited. And unless MEMTEST=0: each tracker mode serves
# a MEM_IMAGE (64GiB) sparse image under fio 1 MiB random writes at QD32,
# MEM_IO (4g) in all, with a MEM_LOG_LIMIT (4GiB) log (at most 8 GB on
# disk), and its peak RSS is printed.
#
# The double-write bound: every byte the tracker takes goes to the image and
# to the log on the same filesystem, so its sequential write can reach about
# half of the bare device's (bare, write-1m-qd8).
#
# Usage: scripts/bench-tracker.sh          (as root, from anywhere)
#   Installs fio, nbdkit, libnbd-bin, fuse3, qemu-utils, linux-perf with
#   apt-get when a command is missing. Takes about 8 minutes with the
#   defaults. Other load on the machine (builds, tests) skews the figures:
#   the load average is printed before and after; compare ratios within one
#   run and CPU time per request, not absolute figures across runs.
# Environment:
#   TIDEMARK_BENCH_DIR=PATH   where the image, logs and files go (default
#                             target/bench-tmp): picks the filesystem
#   TIDEMARK_BENCH_SIZE=SIZE  image size (default 2GiB)
#   TIDEMARK_BIN=PATH         a built tidemark binary (default: cargo build
#                             --release -p tidemark, then
#                             ${CARGO_TARGET_DIR:-target}/release)
#   RUNTIME=S RAMP=S          measured seconds and warm-up seconds per run
#                             (default 7 and 2)
#   SERVERS="…"               subset/order of the servers above
#   WORKLOADS="…"             subset/order of the workloads above
#   CLIENT=auto|nbd|fuse      force the client path (default auto)
#   DROP_CACHES=0             do not drop the page cache between runs
#   PROFILE=0                 skip the perf profiles; PROFILE_WORKLOADS and
#                             PROFILE_SERVERS choose them
#   MEMTEST=0                 skip the memory run; MEM_IMAGE, MEM_IO and
#                             MEM_LOG_LIMIT (4GiB) size it
#   KEEP=1                    keep the work directory (fio JSON, server logs)
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT="$PWD"

RUNTIME="${RUNTIME:-7}"
RAMP="${RAMP:-2}"
SIZE="${TIDEMARK_BENCH_SIZE:-2GiB}"
BASE="${TIDEMARK_BENCH_DIR:-$ROOT/target/bench-tmp}"
SERVERS="${SERVERS:-bare tracker-none tracker-writeback nbdkit qemu-nbd qemu-nbd-wb}"
WORKLOADS="${WORKLOADS:-randwrite-4k-qd1 randwrite-4k-qd32 write-1m-qd8 randread-4k-qd32 randwrite-4k-qd32-fsync32}"
CLIENT="${CLIENT:-auto}"
DROP_CACHES="${DROP_CACHES:-1}"
PROFILE="${PROFILE:-1}"
PROFILE_WORKLOADS="${PROFILE_WORKLOADS:-randwrite-4k-qd1 randwrite-4k-qd32 write-1m-qd8}"
PROFILE_SERVERS="${PROFILE_SERVERS:-tracker-none tracker-writeback nbdkit qemu-nbd}"
MEMTEST="${MEMTEST:-1}"
MEM_IMAGE="${MEM_IMAGE:-64GiB}"
MEM_IO="${MEM_IO:-4g}"
# The memory run's log: what fits beside the written part of the sparse
# image; past it the tracker goes on in bitmap mode (the notes say so).
MEM_LOG_LIMIT="${MEM_LOG_LIMIT:-4GiB}"
KEEP="${KEEP:-0}"

BENCH_NAME=bench-tracker
# shellcheck source=scripts/lib/bench-common.sh
source scripts/lib/bench-common.sh

for v in RUNTIME RAMP; do
	[[ "${!v}" =~ ^[0-9]+$ ]] || die "$v must be a whole number of seconds, not '${!v}'"
done
[ "$RUNTIME" -gt 1 ] || die "RUNTIME must be at least 2"
case "$CLIENT" in auto | nbd | fuse) ;; *) die "CLIENT must be auto, nbd or fuse" ;; esac
[ "$(id -u)" -eq 0 ] || die "run as root (page-cache drop, loop devices, apt-get)"

# qemu-utils only if qemu-nbd is missing: it is preinstalled (newer) here.
ensure_commands fio:fio nbdkit:nbdkit nbdinfo:libnbd-bin nbdfuse:libnbd-bin \
	fusermount3:fuse3 qemu-nbd:qemu-utils python3:python3 losetup:mount
# perf only measures; without it the syscall column and the profile are "-".
if ! command -v perf >/dev/null; then
	ensure_commands perf:linux-perf 2>/dev/null || note "perf unavailable: no syscall counts, no profile"
fi
PERF=0
if command -v perf >/dev/null && perf stat -e raw_syscalls:sys_enter -- true >/dev/null 2>&1; then
	PERF=1
fi

REPORT_PY="$ROOT/scripts/bench-tracker-report.py"
[ -f "$REPORT_PY" ] || die "missing $REPORT_PY"

tidemark_binary

to_bytes() {
	numfmt --from=iec-i "${1%B}" 2>/dev/null || numfmt --from=iec "${1%B}"
}
SIZE_BYTES="$(to_bytes "$SIZE")" || die "cannot parse size '$SIZE'"
MEM_IMAGE_BYTES="$(to_bytes "$MEM_IMAGE")" || die "cannot parse MEM_IMAGE '$MEM_IMAGE'"

mkdir -p "$BASE"
BASE="$(cd "$BASE" && pwd)"
WORK="$(mktemp -d "$BASE/run.XXXXXX")"
# Unix socket paths are limited to 108 bytes: sockets go to a short path.
SOCKDIR="$(mktemp -d /tmp/tmbench.XXXXXX)"
IMG="$WORK/image.raw"
SOCK="$SOCKDIR/nbd.sock"
URI="nbd+unix:///disk?socket=$SOCK"
SERVER_PID=""
PIDS=()
FUSE_PID=""
LOOPDEV=""
CLK_TCK="$(getconf CLK_TCK)"

# The log gets every byte written in a run (nothing ships or recycles it):
# give it room for a whole run, so the tracker stays in data mode, but
# never more than 6 GiB (the machine is shared: a run's log is deleted
# after it, so image and log stay under 8 GiB with the default image). A
# run that fills it shows "bitmap mode" in its notes.
avail=$(($(df -P -B1 "$BASE" | awk 'NR==2 {print $4}')))
need=$((SIZE_BYTES * 2 + (8 << 30)))
[ "$avail" -ge "$need" ] || die "$BASE has $((avail >> 30)) GiB free; needs at least $((need >> 30)) GiB"
LOG_LIMIT=$(((avail - SIZE_BYTES * 2 - (2 << 30)) / (64 << 20) * (64 << 20)))
[ "$LOG_LIMIT" -gt $((12 << 30)) ] && LOG_LIMIT=$((12 << 30))

stop_server() {
	[ -n "$SERVER_PID" ] || return 0
	stop_pid "$SERVER_PID"
	SERVER_PID=""
	rm -f "$SOCK" "$SOCK.ctl"
}

detach_client() {
	if [ -n "$LOOPDEV" ]; then
		losetup -d "$LOOPDEV" 2>/dev/null || true
		LOOPDEV=""
	fi
	if [ -n "$FUSE_PID" ]; then
		fusermount3 -u "$WORK/fuse" 2>/dev/null || true
		wait "$FUSE_PID" 2>/dev/null || true
		FUSE_PID=""
	fi
}

cleanup() {
	detach_client
	stop_server
	rm -rf "$SOCKDIR"
	if [ "$KEEP" = 1 ]; then
		note "kept $WORK"
		rm -rf "$WORK"/image.raw "$WORK"/sparse.raw "$WORK"/log-* 2>/dev/null || true
	else
		rm -rf "$WORK"
	fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Waits until an NBD client can connect to $URI (or the server died).
wait_nbd() {
	local i
	for i in $(seq 300); do
		kill -0 "$SERVER_PID" 2>/dev/null || return 1
		[ -S "$SOCK" ] && nbdinfo --size "$URI" >/dev/null 2>&1 && return 0
		sleep 0.1
	done
	return 1
}

# start_server NAME RUNDIR [IMAGE]: serves IMAGE (default $IMG) on $SOCK as
# export "disk".
start_server() {
	local name=$1 dir=$2 image=${3:-$IMG}
	rm -f "$SOCK" "$SOCK.ctl"
	case "$name" in
	tracker-*)
		local how
		case "$name" in
		tracker-none | tracker-writeback) how=(--cache "${name#tracker-}") ;;
		tracker-sync | tracker-uring) how=(--engine "${name#tracker-}") ;;
		*) die "unknown tracker variant '$name'" ;;
		esac
		"$BIN" tracker serve --image "$image" --name disk --socket "$SOCK" \
			--log-dir "$WORK/log-$name" "${how[@]}" \
			--log-size-limit "$LOG_LIMIT" >"$dir/server.out" 2>"$dir/server.err" &
		SERVER_PID=$!
		local i
		for i in $(seq 300); do
			grep -q '^tracker ready on' "$dir/server.out" 2>/dev/null && return 0
			kill -0 "$SERVER_PID" 2>/dev/null || break
			sleep 0.1
		done
		;;
	nbdkit)
		nbdkit -f -U "$SOCK" file "$image" >"$dir/server.out" 2>"$dir/server.err" &
		SERVER_PID=$!
		wait_nbd && return 0
		;;
	nbdkit-nocache)
		nbdkit -f -U "$SOCK" file "$image" cache=none >"$dir/server.out" 2>"$dir/server.err" &
		SERVER_PID=$!
		wait_nbd && return 0
		;;
	qemu-nbd)
		qemu-nbd -f raw -x disk -k "$SOCK" -t --cache=none --aio=native "$image" \
			>"$dir/server.out" 2>"$dir/server.err" &
		SERVER_PID=$!
		wait_nbd && return 0
		;;
	qemu-nbd-wb)
		qemu-nbd -f raw -x disk -k "$SOCK" -t --cache=writeback "$image" \
			>"$dir/server.out" 2>"$dir/server.err" &
		SERVER_PID=$!
		wait_nbd && return 0
		;;
	*) die "unknown server '$name' (known: bare tracker-none tracker-writeback tracker-sync nbdkit nbdkit-nocache qemu-nbd qemu-nbd-wb)" ;;
	esac
	cat "$dir/server.err" >&2 || true
	die "$name did not start"
}

# Attaches the fallback client path: nbdfuse (one connection) + loop device.
attach_fuse() {
	mkdir -p "$WORK/fuse"
	rm -f "$WORK/nbdfuse.pid"
	nbdfuse -C 1 -P "$WORK/nbdfuse.pid" "$WORK/fuse/disk" "$URI" 2>"$WORK/nbdfuse.err" &
	FUSE_PID=$!
	local i
	for i in $(seq 300); do
		[ -s "$WORK/nbdfuse.pid" ] && break
		kill -0 "$FUSE_PID" 2>/dev/null || die "nbdfuse failed: $(cat "$WORK/nbdfuse.err")"
		sleep 0.1
	done
	[ -s "$WORK/nbdfuse.pid" ] || die "nbdfuse did not come up"
	LOOPDEV="$(losetup -f --show --direct-io=on "$WORK/fuse/disk")"
}

# The fio options of each workload.
workload_args() {
	case "$1" in
	randwrite-4k-qd1) echo "--rw=randwrite --bs=4k --iodepth=1" ;;
	randwrite-4k-qd32) echo "--rw=randwrite --bs=4k --iodepth=32" ;;
	write-1m-qd8) echo "--rw=write --bs=1m --iodepth=8" ;;
	randread-4k-qd32) echo "--rw=randread --bs=4k --iodepth=32" ;;
	randwrite-4k-qd32-fsync32) echo "--rw=randwrite --bs=4k --iodepth=32 --fsync=32" ;;
	*) die "unknown workload '$1'" ;;
	esac
}

FIO_TIME=(--time_based "--runtime=$RUNTIME" "--ramp_time=$RAMP" --lat_percentiles=1
	--norandommap --randrepeat=0 --group_reporting --output-format=json)

if [ "$CLIENT" = auto ]; then
	if fio --enghelp 2>/dev/null | grep -qw nbd; then CLIENT=nbd; else CLIENT=fuse; fi
fi
[ "$CLIENT" = nbd ] && { fio --enghelp 2>/dev/null | grep -qw nbd || die "this fio has no nbd engine"; }

# The fio command line of WORKLOAD against the server on $SOCK, or against
# the image itself for the bare device, into OUTPUT.json.
fio_command() { # WORKLOAD SERVER OUTPUT
	local wl=$1 srv=$2 out=$3 args
	read -ra args <<<"$(workload_args "$wl")"
	if [ "$srv" = bare ]; then
		FIO=(fio --name="$wl" --ioengine=io_uring --direct=1 "--filename=$IMG" "${args[@]}"
			"${FIO_TIME[@]}" "--output=$out")
	elif [ "$CLIENT" = nbd ]; then
		FIO=(fio --name="$wl" --ioengine=nbd "--uri=$URI" "${args[@]}" "${FIO_TIME[@]}"
			"--output=$out")
	else
		FIO=(fio --name="$wl" --ioengine=libaio --direct=1 "--filename=$LOOPDEV" "${args[@]}"
			"${FIO_TIME[@]}" "--output=$out")
	fi
}

# One line of figures of process PID: time, user+system ticks, context
# switches summed over its threads, peak RSS (KiB).
sample_process() { # PID
	local pid=$1 ticks ctx hwm
	ticks="$(awk '{print $14 + $15}' "/proc/$pid/stat" 2>/dev/null || echo 0)"
	ctx="$(cat /proc/"$pid"/task/*/status 2>/dev/null |
		awk '/^(voluntary|nonvoluntary)_ctxt_switches/ {s += $2} END {print s + 0}')"
	hwm="$(awk '/^VmHWM/ {print $2}' "/proc/$pid/status" 2>/dev/null || echo 0)"
	echo "$(date +%s.%N) $ticks $ctx $hwm"
}

# One line per thread of process PID: time, thread id, user+system ticks,
# name (the name last: it may hold spaces).
sample_threads() { # PID
	local pid=$1 now t
	now="$(date +%s.%N)"
	for t in /proc/"$pid"/task/*; do
		awk -v now="$now" -v tid="${t##*/}" -v name="$(cat "$t/comm" 2>/dev/null)" \
			'{sub(/^.*\) /, ""); print now, tid, $12 + $13, name}' "$t/stat" 2>/dev/null || true
	done
}

# Measures PID over the measured window of a run started now, in the
# background: writes DIR/window (two samples), DIR/threads (two samples
# per thread: how busy the busiest thread was) and DIR/perf-stat.
measure_window() { # PID DIR
	local pid=$1 dir=$2 window
	window="$(awk -v r="$RUNTIME" 'BEGIN {print r - 0.6}')"
	sleep "$(awk -v r="$RAMP" 'BEGIN {print r + 0.3}')"
	sample_process "$pid" >"$dir/window"
	sample_threads "$pid" >"$dir/threads"
	if [ "$PERF" = 1 ]; then
		perf stat -x, -e raw_syscalls:sys_enter -p "$pid" -o "$dir/perf-stat" -- sleep "$window" \
			>/dev/null 2>&1 || true
	else
		sleep "$window"
	fi
	sample_process "$pid" >>"$dir/window"
	sample_threads "$pid" >>"$dir/threads"
}

# run_one WORKLOAD SERVER DIR: one measured run.
run_one() {
	local wl=$1 srv=$2 dir=$3 pid measurer=""
	fio_command "$wl" "$srv" "$dir/fio.json"
	[ "$CLIENT" = fuse ] && [ "$srv" != bare ] && attach_fuse
	"${FIO[@]}" >/dev/null 2>"$dir/fio.err" &
	pid=$!
	if [ -n "$SERVER_PID" ]; then
		measure_window "$SERVER_PID" "$dir" &
		measurer=$!
	fi
	if ! wait "$pid"; then
		cat "$dir/fio.err" >&2
		detach_client
		die "fio $wl on $srv failed"
	fi
	[ -n "$measurer" ] && wait "$measurer"
	[ -n "$SERVER_PID" ] && sample_process "$SERVER_PID" >"$dir/end"
	detach_client
}

# ", a virtio disk …" when DEVICE is one: its fdatasync is what the
# hypervisor makes of it, not a physical disk's.
virtio_note() { # DEVICE
	local name
	name="$(basename "$(readlink -f "$1")")"
	name="${name%%[0-9]*}"
	case "$(readlink -f "/sys/block/$name/device/driver" 2>/dev/null)" in
	*virtio*) echo ", a virtio disk inside a VM: fdatasync figures are the hypervisor's" ;;
	esac
}

fstype="$(stat -f -c %T "$BASE")"
device="$(df -P "$BASE" | awk 'NR==2 {print $1}')"
cat <<EOF
== bench-tracker: $(date -u +%Y-%m-%dT%H:%M:%SZ)
kernel $(uname -r), $(nproc) CPUs; $(fio --version); nbdkit $(nbdkit --version | awk '{print $2}'); $(qemu-nbd --version | head -1)
tidemark $BIN
directory $BASE ($fstype on $device$(virtio_note "$device"))
image $SIZE ($SIZE_BYTES bytes), filled; tracker log limit $((LOG_LIMIT >> 30)) GiB
client: $([ "$CLIENT" = nbd ] && echo "fio --ioengine=nbd (libnbd, one connection)" || echo "nbdfuse -C 1 + losetup --direct-io=on + fio libaio --direct=1")
runs: ${RAMP}s warm-up + ${RUNTIME}s measured, each server started fresh per workload; page cache $([ "$DROP_CACHES" = 1 ] && echo "synced and dropped" || echo "synced (not dropped)") before each run
syscalls per request: $([ "$PERF" = 1 ] && echo "perf stat -e raw_syscalls:sys_enter -p PID over the measured window" || echo "not measured (no usable perf)")
load average before: $(cut -d' ' -f1-3 /proc/loadavg)
EOF

note "filling the $SIZE image"
fio --name=fill "--filename=$IMG" "--size=$SIZE_BYTES" --rw=write --bs=1m --iodepth=8 \
	--ioengine=libaio --direct=1 --fallocate=native --output-format=json \
	--output="$WORK/fill.json" >/dev/null 2>"$WORK/fill.err" || { cat "$WORK/fill.err" >&2; die "filling the image failed"; }

MANIFEST="$WORK/manifest.tsv"
: >"$MANIFEST"
for wl in $WORKLOADS; do
	workload_args "$wl" >/dev/null
	for srv in $SERVERS; do
		dir="$WORK/$wl.$srv"
		mkdir -p "$dir"
		rm -rf "$WORK/log-$srv"
		drop_caches
		note "$wl on $srv"
		[ "$srv" != bare ] && start_server "$srv" "$dir"
		run_one "$wl" "$srv" "$dir"
		status=""
		if [[ "$srv" == tracker-* ]]; then
			"$BIN" tracker status --control-socket "$SOCK.ctl" --json >"$dir/status.json" 2>/dev/null &&
				status="$dir/status.json"
		fi
		stop_server
		rm -rf "$WORK/log-$srv"
		printf '%s\t%s\t%s\t%s\t%s\n' "$wl" "$srv" "$dir/fio.json" "$status" "$dir" >>"$MANIFEST"
	done
done

# Where the time goes: a profile of each server in PROFILE_SERVERS under
# each workload in PROFILE_WORKLOADS (separate runs: perf record slows the
# process), so a tracker's profile reads beside its peer's.
PROFILES="$WORK/profiles.tsv"
: >"$PROFILES"
if [ "$PROFILE" = 1 ] && [ "$PERF" = 1 ]; then
	for wl in $PROFILE_WORKLOADS; do
		for srv in $PROFILE_SERVERS; do
			[ "$srv" = bare ] && continue
			dir="$WORK/profile.$wl.$srv"
			mkdir -p "$dir"
			rm -rf "$WORK/log-$srv"
			drop_caches
			note "profiling $srv under $wl"
			start_server "$srv" "$dir"
			fio_command "$wl" "$srv" "$dir/fio.json"
			[ "$CLIENT" = fuse ] && attach_fuse
			"${FIO[@]}" >/dev/null 2>"$dir/fio.err" &
			fio_pid=$!
			sleep "$RAMP"
			perf record -q -g -p "$SERVER_PID" -o "$dir/perf.data" -- sleep "$((RUNTIME - 1))" \
				>/dev/null 2>&1 || true
			wait "$fio_pid" || true
			detach_client
			stop_server
			rm -rf "$WORK/log-$srv"
			perf report -i "$dir/perf.data" --no-children --sort symbol --percent-limit 1.5 \
				--stdio -g none 2>/dev/null | grep -v '^#' | grep -v '^$' | head -25 >"$dir/report.txt" || true
			perf report -i "$dir/perf.data" --no-children --sort comm --stdio -g none \
				2>/dev/null | grep -v '^#' | grep -v '^$' | head -8 >"$dir/threads.txt" || true
			rm -f "$dir/perf.data"
			printf '%s\t%s\t%s\n' "$srv" "$dir" "$wl" >>"$PROFILES"
		done
	done
fi

# The tracker's memory under 1 MiB random writes at QD32 to a large sparse
# image: peak RSS against the 128 MiB budget.
MEMORY="$WORK/memory.tsv"
: >"$MEMORY"
if [ "$MEMTEST" = 1 ]; then
	sparse="$WORK/sparse.raw"
	for srv in $SERVERS; do
		[[ "$srv" == tracker-* ]] || continue
		dir="$WORK/memory.$srv"
		mkdir -p "$dir"
		rm -f "$sparse"
		truncate -s "$MEM_IMAGE_BYTES" "$sparse"
		rm -rf "$WORK/log-$srv"
		drop_caches
		note "memory of $srv: 1 MiB random writes at QD32, $MEM_IO to a $MEM_IMAGE sparse image"
		mem_avail=$(($(df -P -B1 "$BASE" | awk 'NR==2 {print $4}')))
		if [ "$mem_avail" -lt $(($(numfmt --from=iec "${MEM_IO^^}") + $(to_bytes "$MEM_LOG_LIMIT") + (4 << 30))) ]; then
			note "skipping the memory run: $((mem_avail >> 30)) GiB free is not enough for $MEM_IO of data and a $MEM_LOG_LIMIT log"
			continue
		fi
		LOG_LIMIT_SAVED=$LOG_LIMIT
		LOG_LIMIT=$(to_bytes "$MEM_LOG_LIMIT")
		start_server "$srv" "$dir" "$sparse"
		LOG_LIMIT=$LOG_LIMIT_SAVED
		if [ "$CLIENT" = nbd ]; then
			FIO=(fio --name=memory --ioengine=nbd "--uri=$URI")
		else
			attach_fuse
			FIO=(fio --name=memory --ioengine=libaio --direct=1 "--filename=$LOOPDEV")
		fi
		"${FIO[@]}" --rw=randwrite --bs=1m --iodepth=32 "--io_size=$MEM_IO" --norandommap \
			--randrepeat=0 --output-format=json "--output=$dir/fio.json" >/dev/null 2>"$dir/fio.err" ||
			{ cat "$dir/fio.err" >&2; die "the memory run of $srv failed"; }
		sample_process "$SERVER_PID" >"$dir/end"
		"$BIN" tracker status --control-socket "$SOCK.ctl" --json >"$dir/status.json" 2>/dev/null || true
		detach_client
		stop_server
		rm -rf "$WORK/log-$srv" "$sparse"
		printf '%s\t%s\n' "$srv" "$dir" >>"$MEMORY"
	done
fi

echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg)"
echo
python3 "$REPORT_PY" "$MANIFEST" "$PROFILES" "$MEMORY" "$CLK_TCK" "$MEM_IMAGE" "$MEM_IO"
