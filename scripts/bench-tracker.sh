#!/usr/bin/env bash
# The tracker against nbdkit and qemu-nbd, side by side, with the same fio
# workloads through the same NBD client, on the same filesystem.
#
# Servers (each serves the same preallocated, filled image file, one at a
# time, on a unix socket; every server is started fresh for every workload,
# and the page cache is written back and dropped before each start):
#   tracker-sync    tidemark tracker serve --engine sync: backing file opened
#                   O_DIRECT (no page cache), every write also appended to the
#                   change log (buffered pwrite into preallocated segments);
#                   FLUSH = barrier = fdatasync(log) + fdatasync(image).
#   tracker-uring   the same with --engine uring (io_uring on the image).
#   nbdkit          nbdkit file FILE (the reference, "ratio" column): buffered
#                   pwrite into the page cache, FLUSH = fdatasync. A write
#                   without FLUSH is acknowledged once it is in RAM, so for
#                   write workloads without flushes this favours nbdkit
#                   against an O_DIRECT server.
#   nbdkit-nocache  nbdkit file FILE cache=none: still buffered, but nbdkit
#                   starts writeback (sync_file_range) and evicts the pages
#                   of what it wrote and read (fadvise DONTNEED), so the
#                   device is really in the path: the closest nbdkit gets to
#                   O_DIRECT.
#   qemu-nbd        qemu-nbd -f raw --cache=none --aio=native: O_DIRECT +
#                   Linux AIO, FLUSH = fdatasync, single-threaded event loop.
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
# Then the double-write bound: fio's sequential 1 MiB O_DIRECT write of the
# bare filesystem (same directory); every byte the tracker takes goes to the
# image and to the log on that filesystem, so its sequential write can reach
# about half of that.
#
# Usage: scripts/bench-tracker.sh          (as root, from anywhere)
#   Installs fio, nbdkit, libnbd-bin, fuse3, qemu-utils with apt-get when a
#   command is missing. Takes about 4-5 minutes with the defaults. Other
#   load on the machine (builds, tests) skews the figures: the load average
#   is printed before and after.
# Environment:
#   TIDEMARK_BENCH_DIR=PATH   where the image, logs and files go (default
#                             target/bench-tmp): picks the filesystem
#   TIDEMARK_BENCH_SIZE=SIZE  image size (default 2GiB)
#   TIDEMARK_BIN=PATH         a built tidemark binary (default: cargo build
#                             --release -p tidemark, then target/release)
#   RUNTIME=S RAMP=S          measured seconds and warm-up seconds per run
#                             (default 7 and 2)
#   SERVERS="…"               subset/order of the servers above
#   WORKLOADS="…"             subset/order of the workloads above
#   CLIENT=auto|nbd|fuse      force the client path (default auto)
#   DROP_CACHES=0             do not drop the page cache between runs
#   KEEP=1                    keep the work directory (fio JSON, server logs)
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT="$PWD"

RUNTIME="${RUNTIME:-7}"
RAMP="${RAMP:-2}"
SIZE="${TIDEMARK_BENCH_SIZE:-2GiB}"
BASE="${TIDEMARK_BENCH_DIR:-$ROOT/target/bench-tmp}"
SERVERS="${SERVERS:-tracker-sync tracker-uring nbdkit nbdkit-nocache qemu-nbd}"
WORKLOADS="${WORKLOADS:-randwrite-4k-qd1 randwrite-4k-qd32 write-1m-qd8 randread-4k-qd32 randwrite-4k-qd32-fsync32}"
CLIENT="${CLIENT:-auto}"
DROP_CACHES="${DROP_CACHES:-1}"
KEEP="${KEEP:-0}"

BENCH_NAME=bench-tracker
# shellcheck source=scripts/lib/bench-common.sh
source scripts/lib/bench-common.sh

for v in RUNTIME RAMP; do
	[[ "${!v}" =~ ^[0-9]+$ ]] || die "$v must be a whole number of seconds, not '${!v}'"
done
[ "$RUNTIME" -gt 0 ] || die "RUNTIME must be at least 1"
case "$CLIENT" in auto | nbd | fuse) ;; *) die "CLIENT must be auto, nbd or fuse" ;; esac
[ "$(id -u)" -eq 0 ] || die "run as root (page-cache drop, loop devices, apt-get)"

# qemu-utils only if qemu-nbd is missing: it is preinstalled (newer) here.
ensure_commands fio:fio nbdkit:nbdkit nbdinfo:libnbd-bin nbdfuse:libnbd-bin \
	fusermount3:fuse3 qemu-nbd:qemu-utils python3:python3 losetup:mount

REPORT_PY="$ROOT/scripts/bench-tracker-report.py"
[ -f "$REPORT_PY" ] || die "missing $REPORT_PY"

if [ -n "${TIDEMARK_BIN:-}" ]; then
	BIN="$TIDEMARK_BIN"
else
	command -v cargo >/dev/null || die "cargo is not installed (install Rust with rustup), or set TIDEMARK_BIN"
	note "building tidemark (release)"
	cargo build --release -q -p tidemark
	BIN="$ROOT/target/release/tidemark"
fi
[ -x "$BIN" ] || die "no tidemark binary at $BIN"

SIZE_BYTES="$(numfmt --from=iec-i "${SIZE%B}" 2>/dev/null || numfmt --from=iec "${SIZE%B}")" ||
	die "cannot parse size '$SIZE'"

mkdir -p "$BASE"
BASE="$(cd "$BASE" && pwd)"
WORK="$(mktemp -d "$BASE/run.XXXXXX")"
# Unix socket paths are limited to 108 bytes: sockets go to a short path.
SOCKDIR="$(mktemp -d /tmp/tmbench.XXXXXX)"
IMG="$WORK/image.raw"
SOCK="$SOCKDIR/nbd.sock"
URI="nbd+unix:///disk?socket=$SOCK"
SERVER_PID=""
FUSE_PID=""
LOOPDEV=""

# The log gets every byte written in a run (nothing ships or recycles it):
# give it room for a whole run, so the tracker stays in data mode.
avail=$(($(df -P -B1 "$BASE" | awk 'NR==2 {print $4}')))
need=$((SIZE_BYTES * 2 + (8 << 30)))
[ "$avail" -ge "$need" ] || die "$BASE has $((avail >> 30)) GiB free; needs at least $((need >> 30)) GiB"
LOG_LIMIT=$(((avail - SIZE_BYTES * 2 - (2 << 30)) / (64 << 20) * (64 << 20)))
[ "$LOG_LIMIT" -gt $((32 << 30)) ] && LOG_LIMIT=$((32 << 30))

stop_server() {
	[ -n "$SERVER_PID" ] || return 0
	if kill -0 "$SERVER_PID" 2>/dev/null; then
		kill -TERM "$SERVER_PID" 2>/dev/null || true
		local i
		for i in $(seq 600); do
			kill -0 "$SERVER_PID" 2>/dev/null || break
			sleep 0.1
		done
		if kill -0 "$SERVER_PID" 2>/dev/null; then
			note "server $SERVER_PID did not stop in 60 s; killing it"
			kill -KILL "$SERVER_PID" 2>/dev/null || true
		fi
	fi
	wait "$SERVER_PID" 2>/dev/null || true
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
		rm -rf "$WORK"/image.raw "$WORK"/raw.bin "$WORK"/log-* 2>/dev/null || true
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

# start_server NAME RUNDIR: serves $IMG on $SOCK as export "disk".
start_server() {
	local name=$1 dir=$2
	rm -f "$SOCK" "$SOCK.ctl"
	case "$name" in
	tracker-sync | tracker-uring)
		"$BIN" tracker serve --image "$IMG" --name disk --socket "$SOCK" \
			--log-dir "$WORK/log-$name" --engine "${name#tracker-}" \
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
		nbdkit -f -U "$SOCK" file "$IMG" >"$dir/server.out" 2>"$dir/server.err" &
		SERVER_PID=$!
		wait_nbd && return 0
		;;
	nbdkit-nocache)
		nbdkit -f -U "$SOCK" file "$IMG" cache=none >"$dir/server.out" 2>"$dir/server.err" &
		SERVER_PID=$!
		wait_nbd && return 0
		;;
	qemu-nbd)
		qemu-nbd -f raw -x disk -k "$SOCK" -t --cache=none --aio=native "$IMG" \
			>"$dir/server.out" 2>"$dir/server.err" &
		SERVER_PID=$!
		wait_nbd && return 0
		;;
	*) die "unknown server '$name' (known: tracker-sync tracker-uring nbdkit nbdkit-nocache qemu-nbd)" ;;
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

# run_fio WORKLOAD OUTPUT.json: the workload against the server on $SOCK.
run_fio() {
	local wl=$1 out=$2 args
	read -ra args <<<"$(workload_args "$wl")"
	if [ "$CLIENT" = nbd ]; then
		fio --name="$wl" --ioengine=nbd "--uri=$URI" "${args[@]}" "${FIO_TIME[@]}" \
			"--output=$out" >/dev/null 2>"$out.err" || { cat "$out.err" >&2; die "fio $wl failed"; }
	else
		attach_fuse
		fio --name="$wl" --ioengine=libaio --direct=1 "--filename=$LOOPDEV" "${args[@]}" \
			"${FIO_TIME[@]}" "--output=$out" >/dev/null 2>"$out.err" ||
			{ cat "$out.err" >&2; detach_client; die "fio $wl failed"; }
		detach_client
	fi
}

fstype="$(stat -f -c %T "$BASE")"
device="$(df -P "$BASE" | awk 'NR==2 {print $1}')"
cat <<EOF
== bench-tracker: $(date -u +%Y-%m-%dT%H:%M:%SZ)
kernel $(uname -r), $(nproc) CPUs; $(fio --version); nbdkit $(nbdkit --version | awk '{print $2}'); $(qemu-nbd --version | head -1)
tidemark $BIN
directory $BASE ($fstype on $device); image $SIZE ($SIZE_BYTES bytes), filled; tracker log limit $((LOG_LIMIT >> 30)) GiB
client: $([ "$CLIENT" = nbd ] && echo "fio --ioengine=nbd (libnbd, one connection)" || echo "nbdfuse -C 1 + losetup --direct-io=on + fio libaio --direct=1")
runs: ${RAMP}s warm-up + ${RUNTIME}s measured, each server started fresh per workload; page cache $([ "$DROP_CACHES" = 1 ] && echo "synced and dropped" || echo "synced (not dropped)") before each run
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
		start_server "$srv" "$dir"
		status=""
		run_fio "$wl" "$dir/fio.json"
		if [[ "$srv" == tracker-* ]]; then
			"$BIN" tracker status --control-socket "$SOCK.ctl" --json >"$dir/status.json" 2>/dev/null &&
				status="$dir/status.json"
		fi
		stop_server
		rm -rf "$WORK/log-$srv"
		printf '%s\t%s\t%s\t%s\n' "$wl" "$srv" "$dir/fio.json" "$status" >>"$MANIFEST"
	done
done

# The double-write bound, on the same filesystem, no server running.
drop_caches
note "raw sequential write of the filesystem (bound)"
fio --name=raw "--filename=$WORK/raw.bin" "--size=$SIZE_BYTES" --rw=write --bs=1m --iodepth=8 \
	--ioengine=libaio --direct=1 "${FIO_TIME[@]}" --output="$WORK/raw.json" >/dev/null 2>"$WORK/raw.err" ||
	{ cat "$WORK/raw.err" >&2; die "raw fio failed"; }
rm -f "$WORK/raw.bin"

echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg)"
echo
python3 "$REPORT_PY" "$MANIFEST" "$WORK/raw.json"
