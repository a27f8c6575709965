#!/usr/bin/env bash
# Test failover against qemu-nbd and fio, side by side: how long `tidemark
# test-failover start` takes to expose a recovery point, and how fast the
# exposed point reads compared with its base image read directly.
#
# Setup, for every disk size in SIZES (default 1GiB and 10GiB), the real
# pipeline on loopback (enrolment, receiver, tracker, shipper over QUIC):
#   - a sparse source image whose first DATA_SIZE (default 1 GiB, at most
#     the disk) is filled before it is protected: the initial sync carries
#     it into the replica's base image (disk-<id>.img of the group);
#   - then, through the tracker's NBD socket (fio's nbd engine), WRITE_BYTES
#     (default 256 MiB) of random 4 KiB writes into the data region, 32 in
#     flight, with fio's --fsync=WRITE_FSYNC (default 256), and SPREAD_BYTES (default 128 MiB) of
#     1 MiB writes at random offsets of the whole disk, 8 in flight, with
#     --fsync=8: every FLUSH is a barrier, every barrier a recovery point in
#     the receiver's journal (with requests in flight fio FLUSHes more often
#     than --fsync says: the table gives the points made, about 8000 with the
#     defaults); stopping the tracker writes the final barrier;
#   - once the receiver has everything, the pipeline is stopped, so nothing
#     else runs while measuring. The same writes go to every size: only the
#     disk size differs between them.
#   The newest point (the one measured) is the base image with the journal's
#   ranges over it: about 64k 4 KiB pieces and 128 1 MiB pieces.
#
# 1. Start time: wall time from launching `tidemark test-failover start
#    --point latest` to `nbdinfo` answering on its socket (polled every
#    10 ms), REPEATS times (default 5); the median, min and max. The peers:
#    `qemu-nbd -r` and `nbdkit -r file` on the group's base image, timed
#    the same way (the base image alone: no journal to read). The page
#    cache is synced and dropped before every start (cold: the journal is
#    read from the device), unless DROP_CACHES=0.
# 2. Reads (on the largest size only): fio (nbd engine, libnbd, one
#    connection) against
#      point      tidemark test-failover start --point latest
#      qemu-nbd   qemu-nbd -r -f raw --cache=writeback --aio=threads on the
#                 base image: the same file system, the same page cache use
#                 (the point reads its image and journal through the page
#                 cache too)
#      nbdkit     nbdkit -r file on the base image (buffered too)
#    (PEERS picks these) and fio directly on the base image file (io_uring,
#    buffered, --invalidate=0: no NBD, the same page cache state).
#    Every server is started fresh for every run. Workloads:
#      seq-1m-qd8       1 MiB reads, 8 in flight, over the data region
#      randread-4k-qd1  4 KiB random reads, 1 in flight, data region
#      randread-4k-qd32 4 KiB random reads, 32 in flight, data region
#      seq-1m-disk      1 MiB reads, 8 in flight, one pass over the whole
#                       disk (mostly holes on the larger sizes)
#      copy-disk        a whole-disk copy as backup and migration tools
#                       make it: `nbdcopy URI null:`, which asks block
#                       status and reads only what is not a hole (MB/s of
#                       the disk's size). Its peers serve the point itself,
#                       made into a sparse image file once (nbdcopy from
#                       the point, untimed): the same bytes, the same
#                       holes; "file" is nbdcopy reading that image file
#    in two cache states:
#      cold  page cache synced and dropped before the run; seq-1m-qd8 and
#            seq-1m-disk read their range once (size based), the random
#            workloads run RUNTIME seconds (what they read twice comes from
#            the cache the second time, on every side alike)
#      warm  the base image's data region and the journal read into the
#            page cache before the run; every workload runs RUNTIME
#            seconds, except seq-1m-disk (one pass)
#    Ratios are point / peer: above 1 the point is faster.
#
# Usage: scripts/bench-test-failover.sh   (as root, from anywhere)
#   Installs fio, qemu-utils, nbdkit, libnbd-bin, python3 with apt-get when a
#   command is missing. Takes about 10 minutes with the defaults. Other load
#   on the machine skews the figures: the load average is printed before
#   and after.
# Environment:
#   TIDEMARK_BENCH_DIR=PATH  where images, logs and replicas go (default
#                            target/bench-tmp): picks the filesystem
#   TIDEMARK_BIN=PATH        a built tidemark binary (default: cargo build
#                            --release -p tidemark, then target/release, or
#                            $CARGO_TARGET_DIR/release)
#   SIZES="1GiB 10GiB"       disk sizes; reads are measured on the last one
#   DATA_SIZE=1GiB           the filled region, read by the workloads
#   WRITE_BYTES=256MiB       random 4 KiB writes through the tracker
#   SPREAD_BYTES=128MiB      1 MiB writes spread over the whole disk
#   WRITE_FSYNC=256          random writes between FLUSHes (fewer: more
#                            recovery points in the same history)
#   REPEATS=5                starts timed per size and server
#   RUNTIME=10               seconds per time-based read run
#   CACHES="cold warm"       cache states for the read runs (empty: time
#                            the starts only)
#   WORKLOADS="…"            subset/order of the workloads above
#   PEERS="qemu-nbd nbdkit"  the servers the point is compared with
#   DROP_CACHES=0            never drop the page cache (cold = not dropped)
#   VERIFY=0                 skip checking that the point reads exactly as
#                            the source image (nbdcopy | cmp, untimed)
#   KEEP=1                   keep the work directory (fio JSON, logs, and
#                            the largest size's replica group)
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT="$PWD"

SIZES="${SIZES:-1GiB 10GiB}"
DATA_SIZE="${DATA_SIZE:-1GiB}"
WRITE_BYTES="${WRITE_BYTES:-256MiB}"
SPREAD_BYTES="${SPREAD_BYTES:-128MiB}"
WRITE_FSYNC="${WRITE_FSYNC:-256}"
REPEATS="${REPEATS:-5}"
RUNTIME="${RUNTIME:-10}"
CACHES="${CACHES-cold warm}"
WORKLOADS="${WORKLOADS:-seq-1m-qd8 randread-4k-qd1 randread-4k-qd32 seq-1m-disk copy-disk}"
PEERS="${PEERS:-qemu-nbd nbdkit}"
DROP_CACHES="${DROP_CACHES:-1}"
VERIFY="${VERIFY:-1}"
KEEP="${KEEP:-0}"
BASE="${TIDEMARK_BENCH_DIR:-${CARGO_TARGET_DIR:-$ROOT/target}/bench-tmp}"
HOST=bench-host.example

BENCH_NAME=bench-test-failover
# shellcheck source=scripts/lib/bench-common.sh
source scripts/lib/bench-common.sh

for v in REPEATS RUNTIME WRITE_FSYNC; do
	[[ "${!v}" =~ ^[1-9][0-9]*$ ]] || die "$v must be a positive whole number, not '${!v}'"
done
[ "$(id -u)" -eq 0 ] || [ "$DROP_CACHES" = 0 ] ||
	die "run as root (the page cache is dropped), or set DROP_CACHES=0"
for c in $CACHES; do
	case "$c" in cold | warm) ;; *) die "CACHES: unknown cache state '$c' (cold, warm)" ;; esac
done
for peer in $PEERS; do
	case "$peer" in qemu-nbd | nbdkit) ;; *) die "PEERS: unknown server '$peer' (qemu-nbd, nbdkit)" ;; esac
done
for wl in $WORKLOADS; do
	case "$wl" in seq-1m-qd8 | randread-4k-qd1 | randread-4k-qd32 | seq-1m-disk | copy-disk) ;;
	*) die "WORKLOADS: unknown workload '$wl'" ;;
	esac
done

ensure_commands fio:fio qemu-nbd:qemu-utils nbdkit:nbdkit nbdinfo:libnbd-bin \
	nbdcopy:libnbd-bin python3:python3 numfmt:coreutils
fio --enghelp 2>/dev/null | grep -qw nbd || die "this fio ($(fio --version)) has no nbd engine"

tidemark_binary

DATA_BYTES="$(bytes "$DATA_SIZE")"
WRITE_N="$(bytes "$WRITE_BYTES")"
SPREAD_N="$(bytes "$SPREAD_BYTES")"
SIZE_LIST=()
for s in $SIZES; do SIZE_LIST+=("$s"); done
[ "${#SIZE_LIST[@]}" -gt 0 ] || die "SIZES is empty"
LARGEST="${SIZE_LIST[${#SIZE_LIST[@]} - 1]}"

need=0
for s in "${SIZE_LIST[@]}"; do
	sb="$(bytes "$s")"
	data=$((DATA_BYTES < sb ? DATA_BYTES : sb))
	# Source + base image data, the tracker's log and the journal.
	n=$((2 * data + 2 * (WRITE_N + SPREAD_N) + (1 << 30)))
	[ "$n" -gt "$need" ] && need=$n
done
bench_workspace tf "$need"

# Waits until the receiver has made the whole log durable and the shipper
# says protected.
wait_caught_up() { # LOG_DIR
	local log=$1 last i
	for i in $(seq 1200); do
		last="$("$BIN" log check --json "$log" 2>/dev/null |
			python3 -c 'import json,sys; print(json.load(sys.stdin).get("last_seq") or 0)')" || last=""
		if [ -n "$last" ] && "$BIN" shipper status --json --log-dir "$log" 2>/dev/null |
			python3 -c 'import json,sys; s=json.load(sys.stdin); sys.exit(0 if s["durable_seq"]=='"$last"' and s["state"]=="protected" else 1)' 2>/dev/null; then
			return 0
		fi
		sleep 0.5
	done
	"$BIN" shipper status --log-dir "$log" >&2 || true
	die "replication did not catch up in 10 minutes"
}

now_us() { # the wall clock in µs, into the variable NOW
	local t=$EPOCHREALTIME
	NOW=$((${t%.*} * 1000000 + 10#${t#*.}))
}

# start_server KIND GROUP_DIR SOCK LOGBASE: starts it in the background
# (SERVER_PID) and sets STARTED_MS to the milliseconds from its launch until
# nbdinfo answers on SOCK.
start_server() {
	local kind=$1 group=$2 sock=$3 logbase=$4 t0 i
	local uri="nbd+unix:///disk?socket=$sock"
	rm -f "$sock"
	now_us
	t0=$NOW
	case "$kind" in
	point)
		"$BIN" test-failover start --data-dir "${group%/*/*}" --host "$HOST" --point latest \
			--socket "$sock" >"$logbase.out" 2>"$logbase.err" &
		;;
	qemu-nbd)
		qemu-nbd -r -f raw -x disk -k "$sock" -t --cache=writeback --aio=threads \
			"${PEER_IMAGE:-$(base_image "$group")}" >"$logbase.out" 2>"$logbase.err" &
		;;
	nbdkit)
		nbdkit -f -r -U "$sock" file "${PEER_IMAGE:-$(base_image "$group")}" >"$logbase.out" 2>"$logbase.err" &
		;;
	*) die "unknown server $kind" ;;
	esac
	SERVER_PID=$!
	PIDS+=("$SERVER_PID")
	for i in $(seq 12000); do
		nbdinfo --size "$uri" >/dev/null 2>&1 && break
		kill -0 "$SERVER_PID" 2>/dev/null || { cat "$logbase.err" >&2; die "$kind exited before serving"; }
		sleep 0.01
	done
	now_us
	nbdinfo --size "$uri" >/dev/null 2>&1 || die "$kind did not serve within about 2 minutes"
	STARTED_MS=$(((NOW - t0 + 500) / 1000))
}

stop_server() {
	[ -n "${SERVER_PID:-}" ] || return 0
	stop_pid "$SERVER_PID"
	forget_pid "$SERVER_PID"
	SERVER_PID=""
}

base_image() { # GROUP_DIR
	local img
	img="$(find "$1" -maxdepth 1 -name 'disk-*.img' | head -n 1)"
	[ -n "$img" ] || die "no base image in $1"
	echo "$img"
}

median() { # numbers on stdin → "median min max"
	sort -n | awk '{v[NR] = $1} END {
		m = (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2
		printf "%.0f %.0f %.0f", m, v[1], v[NR]}'
}

PKI="$WORK/pki"
enrol "$PKI" "$HOST"

# setup SIZE DIR: a replica group of a SIZE disk in DIR/replicas, through
# the real pipeline; sets SETUP_POINTS (recovery points) and SETUP_HISTORY
# (bytes of journal behind them).
setup() {
	local size=$1 dir=$2 sb data rpid tpid spid addr turi
	sb="$(bytes "$size")"
	data=$((DATA_BYTES < sb ? DATA_BYTES : sb))
	mkdir -p "$dir"
	truncate -s "$sb" "$dir/source.img"
	fio --name=fill --filename="$dir/source.img" --rw=write --bs=1m --iodepth=8 \
		--ioengine=libaio --direct=1 --size="$data" --output-format=json \
		--output="$dir/fill.json" >/dev/null 2>"$dir/fill.err" || { cat "$dir/fill.err" >&2; die "filling the image failed"; }

	start_receiver "$dir"
	rpid=$RECEIVER_PID addr=$RECEIVER_ADDR
	start_tracker "$dir/source.img" "$dir"
	tpid=$TRACKER_PID
	turi="nbd+unix:///disk?socket=$SOCKDIR/tracker.sock"

	TIDEMARK_LOG=warn "$BIN" shipper run --log-dir "$dir/log" --receiver "$addr" --host "$HOST" \
		--pki-dir "$PKI/host" >"$dir/shipper.out" 2>"$dir/shipper.err" &
	spid=$!
	PIDS+=("$spid")
	wait_caught_up "$dir/log"

	fio --name=rand4k --ioengine=nbd --uri="$turi" --rw=randwrite --bs=4k --iodepth=32 \
		--offset=0 --size="$data" --io_size="$WRITE_N" --fsync="$WRITE_FSYNC" --randrepeat=0 \
		--output-format=json --output="$dir/write-rand.json" >/dev/null 2>"$dir/write.err" ||
		{ cat "$dir/write.err" >&2; die "writing through the tracker failed"; }
	fio --name=spread1m --ioengine=nbd --uri="$turi" --rw=randwrite --bs=1m --iodepth=8 \
		--offset=0 --size="$sb" --io_size="$SPREAD_N" --fsync=8 --randrepeat=0 \
		--output-format=json --output="$dir/write-spread.json" >/dev/null 2>"$dir/write.err" ||
		{ cat "$dir/write.err" >&2; die "writing through the tracker failed"; }

	# A planned stop: the final barrier; then the receiver gets everything.
	stop_pid "$tpid"
	forget_pid "$tpid"
	wait_caught_up "$dir/log"
	stop_pid "$spid"
	forget_pid "$spid"
	stop_pid "$rpid"
	forget_pid "$rpid"
	rm -rf "$dir/log"

	local group="$dir/replicas/$HOST/default"
	[ -d "$group" ] || die "no replica group at $group"
	SETUP_POINTS="$("$BIN" points --json --data-dir "$dir/replicas" --host "$HOST" | wc -l)"
	SETUP_HISTORY="$(find "$group" -maxdepth 1 -name 'journal.*' -printf '%s\n' | awk '{s += $1} END {print s + 0}')"
}

# verify DIR: the point export reads exactly as the source image.
verify() {
	local dir=$1 group="$1/replicas/$HOST/default" sock="$SOCKDIR/verify.sock"
	start_server point "$group" "$sock" "$dir/verify"
	nbdcopy "nbd+unix:///disk?socket=$sock" - | cmp - "$dir/source.img" ||
		die "the point export does not read as the source image"
	stop_server
}

# fio_args WORKLOAD CACHE SIZE_BYTES: the fio options of a read run.
fio_args() {
	local wl=$1 cache=$2 sb=$3 data timed
	data=$((DATA_BYTES < sb ? DATA_BYTES : sb))
	timed="--time_based --runtime=$RUNTIME"
	case "$wl" in
	seq-1m-qd8)
		[ "$cache" = cold ] && timed=""
		echo "--rw=read --bs=1m --iodepth=8 --offset=0 --size=$data $timed"
		;;
	randread-4k-qd1) echo "--rw=randread --bs=4k --iodepth=1 --offset=0 --size=$data --norandommap --randrepeat=0 $timed" ;;
	randread-4k-qd32) echo "--rw=randread --bs=4k --iodepth=32 --offset=0 --size=$data --norandommap --randrepeat=0 $timed" ;;
	seq-1m-disk) echo "--rw=read --bs=1m --iodepth=8 --offset=0 --size=$sb" ;;
	esac
}

# copy_disk SOURCE OUT SIZE_BYTES: times `nbdcopy SOURCE null:` and writes
# fio-like JSON (the disk's size over the wall time) to OUT for figure().
copy_disk() {
	local src=$1 out=$2 sb=$3 t0
	now_us
	t0=$NOW
	nbdcopy "$src" null: 2>"$out.err" || { cat "$out.err" >&2; die "nbdcopy from $src failed"; }
	now_us
	echo "{\"jobs\": [{\"read\": {\"iops\": 0, \"bw_bytes\": $((sb * 1000000 / (NOW - t0)))}}]}" >"$out"
}

# figure JSON WORKLOAD: MB/s for sequential workloads, IOPS for random ones.
figure() {
	python3 - "$1" "$2" <<'EOF'
import json, sys
with open(sys.argv[1]) as f:
    job = json.load(f)["jobs"][0]
if job.get("error"):
    raise SystemExit(f"{sys.argv[1]}: fio error {job['error']}")
r = job["read"]
print(f"{r['iops']:.0f}" if sys.argv[2].startswith("rand") else f"{r['bw_bytes'] / 1e6:.0f}")
EOF
}

# warm_up GROUP_DIR SIZE_BYTES: the data region of the base image and the
# journal into the page cache.
warm_up() {
	local group=$1 sb=$2 data
	data=$((DATA_BYTES < sb ? DATA_BYTES : sb))
	dd if="$(base_image "$group")" of=/dev/null bs=1M count=$((data >> 20)) status=none
	find "$group" -maxdepth 1 -name 'journal.*' -exec cat {} + >/dev/null
}

cat <<EOF
== bench-test-failover: $(date -u +%Y-%m-%dT%H:%M:%SZ)
kernel $(uname -r), $(nproc) CPUs, $(($(awk '/MemTotal/ {print $2}' /proc/meminfo) >> 20)) GiB RAM; $(fio --version); $(qemu-nbd --version | head -1); $(nbdinfo --version | head -1)
tidemark $BIN
directory $BASE ($(stat -f -c %T "$BASE") on $(df -P "$BASE" | awk 'NR==2 {print $1}'))
disks: $SIZES, sparse; the first $DATA_SIZE filled before protection (initial sync → base image);
  then through the tracker: $WRITE_BYTES random 4 KiB writes (qd32, fio --fsync=$WRITE_FSYNC) into it and
  $SPREAD_BYTES of 1 MiB writes over the whole disk (qd8, --fsync=8) → journal + recovery points
page cache: $([ "$DROP_CACHES" = 1 ] && echo "synced and dropped before every start and cold run" || echo "never dropped (DROP_CACHES=0)")
load average before: $(cut -d' ' -f1-3 /proc/loadavg)
EOF

declare -A START POINTS HISTORY
for size in "${SIZE_LIST[@]}"; do
	dir="$WORK/$size"
	note "$size: building the replica through tracker, shipper and receiver"
	setup "$size" "$dir"
	POINTS[$size]=$SETUP_POINTS
	HISTORY[$size]=$SETUP_HISTORY
	group="$dir/replicas/$HOST/default"
	if [ "$VERIFY" = 1 ]; then
		note "$size: checking that the point reads as the source image"
		verify "$dir"
	fi
	rm -f "$dir/source.img"
	for kind in point $PEERS; do
		note "$size: timing $REPEATS starts of $kind"
		: >"$dir/start-$kind.ms"
		for i in $(seq "$REPEATS"); do
			drop_caches
			start_server "$kind" "$group" "$SOCKDIR/start.sock" "$dir/start-$kind-$i"
			echo "$STARTED_MS" >>"$dir/start-$kind.ms"
			stop_server
		done
	done
	for kind in point $PEERS; do
		START[$size.$kind]="$(median <"$dir/start-$kind.ms")"
	done
	if [ "$size" != "$LARGEST" ]; then
		rm -rf "$dir/replicas"
	fi
done

# Reads of the largest size.
dir="$WORK/$LARGEST"
group="$dir/replicas/$HOST/default"
sb="$(bytes "$LARGEST")"
img="$(base_image "$group")"
POINT_IMAGE=""
if [[ " $WORKLOADS " == *" copy-disk "* ]] && [ -n "$CACHES" ]; then
	# The point as a sparse image file, for the peers of copy-disk.
	note "$LARGEST: copying the point into an image file for the copy-disk peers"
	POINT_IMAGE="$dir/point.img"
	start_server point "$group" "$SOCKDIR/read.sock" "$dir/point-image"
	nbdcopy "nbd+unix:///disk?socket=$SOCKDIR/read.sock" "$POINT_IMAGE" ||
		die "copying the point into $POINT_IMAGE failed"
	stop_server
	note "$LARGEST: the point's image file holds $(($(stat -c %b "$POINT_IMAGE") * 512 >> 20)) MiB of data"
fi
declare -A FIG
for cache in $CACHES; do
	for wl in $WORKLOADS; do
		read -ra args <<<"$(fio_args "$wl" "$cache" "$sb")"
		for side in point $PEERS file; do
			out="$dir/read-$cache-$wl-$side.json"
			note "$LARGEST reads: $wl, $cache cache, $side"
			if [ "$cache" = cold ]; then drop_caches; else warm_up "$group" "$sb"; fi
			if [ "$wl" = copy-disk ]; then
				if [ "$side" = file ]; then
					copy_disk "$POINT_IMAGE" "$out" "$sb"
				else
					PEER_IMAGE="$POINT_IMAGE" start_server "$side" "$group" "$SOCKDIR/read.sock" "$dir/read-$cache-$wl-$side"
					copy_disk "nbd+unix:///disk?socket=$SOCKDIR/read.sock" "$out" "$sb"
					stop_server
				fi
			elif [ "$side" = file ]; then
				# --invalidate=0: fio would drop the file's cached pages.
				fio --name="$wl" --filename="$img" --readonly --ioengine=io_uring --direct=0 --invalidate=0 \
					"${args[@]}" --output-format=json --output="$out" >/dev/null 2>"$out.err" ||
					{ cat "$out.err" >&2; die "fio $wl on the file failed"; }
			else
				start_server "$side" "$group" "$SOCKDIR/read.sock" "$dir/read-$cache-$wl-$side"
				fio --name="$wl" --ioengine=nbd --uri="nbd+unix:///disk?socket=$SOCKDIR/read.sock" \
					"${args[@]}" --output-format=json --output="$out" >/dev/null 2>"$out.err" ||
					{ cat "$out.err" >&2; die "fio $wl on $side failed"; }
				stop_server
			fi
			FIG[$cache.$wl.$side]="$(figure "$out" "$wl")"
		done
	done
done

ratio() { awk -v a="$1" -v b="$2" 'BEGIN {if (a > 0 && b > 0) printf "%.2f", a / b; else print "-"}'; }

echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg)"
echo
echo "Start: launch → nbdinfo answers, ms: median of $REPEATS [min-max]; page cache $([ "$DROP_CACHES" = 1 ] && echo "dropped before each" || echo "not dropped")"
echo "(ratio: the peer's time / test-failover's; goal: test-failover under 5000 ms, whatever the size)"
line="$(printf '%-8s %7s %9s  %-18s' disk points history "test-failover")"
for peer in $PEERS; do line+="$(printf ' %-18s %6s' "$peer" ratio)"; done
echo "$line"
for size in "${SIZE_LIST[@]}"; do
	read -r pm pmin pmax <<<"${START[$size.point]}"
	line="$(printf '%-8s %7s %5s MiB  %-18s' "$size" "${POINTS[$size]}" "$((HISTORY[$size] >> 20))" "$pm [$pmin-$pmax]")"
	for peer in $PEERS; do
		read -r qm qmin qmax <<<"${START[$size.$peer]}"
		line+="$(printf ' %-18s %6s' "$qm [$qmin-$qmax]" "$(ratio "$qm" "$pm")")"
	done
	echo "$line"
done
[ -n "$CACHES" ] || exit 0
echo
echo "Reads on the $LARGEST disk: MB/s for seq-* and copy-disk, IOPS for randread-*; the peers read the"
echo "base image, except for copy-disk (the point made into an image file)"
echo "(ratio: point / peer, above 1 the point is faster)"
line="$(printf '%-5s %-16s %8s' cache workload point)"
for peer in $PEERS file; do
	[ "$peer" = file ] && peer="fio-file"
	line+="$(printf ' %9s %6s' "$peer" ratio)"
done
echo "$line"
for cache in $CACHES; do
	for wl in $WORKLOADS; do
		p="${FIG[$cache.$wl.point]}"
		line="$(printf '%-5s %-16s %8s' "$cache" "$wl" "$p")"
		for peer in $PEERS file; do
			q="${FIG[$cache.$wl.$peer]}"
			line+="$(printf ' %9s %6s' "$q" "$(ratio "$p" "$q")")"
		done
		echo "$line"
	done
done
