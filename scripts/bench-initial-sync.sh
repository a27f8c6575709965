#!/usr/bin/env bash
# Initial sync at link speed: how long a new disk takes from starting the
# shipper until it is protected, side by side in one run with
#   quic      the QUIC ceiling: one stream over loopback with mutual TLS
#             and Tidemark's tuning (`cargo bench -p tidemark-net --bench
#             quic`, its "tidemark (both)" line), no compression, no disk;
#   nbdcopy   `nbdcopy` from an `nbdkit file` server on the same image to
#             a file: a local copy with no crypto and no compression, that
#             skips holes (block status) — the upper bound.
# The disk: SIZE (default 4 GiB), sparse, alternating PIECE (default
# 64 MiB) of random (incompressible) data and PIECE of hole: half data,
# half holes. Holes are not sent; the rate that counts is the data half's:
# data bytes / seconds to protected. Goal: ≥ 0.8× the QUIC ceiling.
#
# Every copy starts with the page cache dropped (the shipper reads the disk
# with O_DIRECT, nbdkit through the cache). The shipper and the receiver
# run on loopback on this machine with everything else: their figures
# include all of its work (read, compress, encrypt, decrypt, decompress,
# write, fdatasync), on its two cores.
#
# Usage: scripts/bench-initial-sync.sh   (as root, from anywhere)
#   Installs fio, nbdkit, libnbd-bin, python3 with apt-get when a command is
#   missing. About 5 minutes with the defaults.
# Environment:
#   TIDEMARK_BENCH_DIR=PATH  where the image and the replica go (default
#                            target/bench-tmp)
#   TIDEMARK_BIN=PATH        a built tidemark binary (default: a release
#                            build)
#   TIDEMARK_BIN_BEFORE=PATH a second binary, timed the same way after the
#                            first (before/after)
#   SIZE=4GiB                the disk
#   PIECE=64MiB              the alternating data and hole pieces
#   QUIC_BYTES=1GiB          bytes of the QUIC ceiling run
#   QUIC_MBS=N               skip that run and use N MB/s as the ceiling
#   VERIFY=0                 skip comparing the replica with the source
#   KEEP=1                   keep the work directory
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT="$PWD"

SIZE="${SIZE:-4GiB}"
PIECE="${PIECE:-64MiB}"
QUIC_BYTES="${QUIC_BYTES:-1GiB}"
QUIC_MBS="${QUIC_MBS:-}"
VERIFY="${VERIFY:-1}"
KEEP="${KEEP:-0}"
# Read by drop_caches (bench-common.sh).
# shellcheck disable=SC2034
DROP_CACHES=1
BASE="${TIDEMARK_BENCH_DIR:-${CARGO_TARGET_DIR:-$ROOT/target}/bench-tmp}"
HOST=bench-host.example

BENCH_NAME=bench-initial-sync
# shellcheck source=scripts/lib/bench-common.sh
source scripts/lib/bench-common.sh

[ "$(id -u)" -eq 0 ] || die "run as root (the page cache is dropped)"
SIZE_BYTES="$(bytes "$SIZE")"
PIECE_BYTES="$(bytes "$PIECE")"
QUIC_N="$(bytes "$QUIC_BYTES")"
if [ "$PIECE_BYTES" -eq 0 ] || [ $((SIZE_BYTES % (2 * PIECE_BYTES))) -ne 0 ]; then
	die "SIZE must be a whole number of 2 × PIECE"
fi
[ -z "$QUIC_MBS" ] || [[ "$QUIC_MBS" =~ ^[1-9][0-9]*$ ]] || die "QUIC_MBS must be a whole number of MB/s"
DATA_BYTES=$((SIZE_BYTES / 2))

ensure_commands fio:fio nbdkit:nbdkit nbdcopy:libnbd-bin nbdinfo:libnbd-bin python3:python3 numfmt:coreutils

tidemark_binary
BINS=("after=$BIN")
if [ -n "${TIDEMARK_BIN_BEFORE:-}" ]; then
	[ -x "$TIDEMARK_BIN_BEFORE" ] || die "no tidemark binary at $TIDEMARK_BIN_BEFORE"
	BINS+=("before=$TIDEMARK_BIN_BEFORE")
fi

# The source's data, one copy (nbdcopy's or a replica's) at a time, logs.
bench_workspace isync $((2 * DATA_BYTES + (1 << 30)))

now_s() { # seconds since the epoch, with microseconds
	echo "$EPOCHREALTIME"
}

elapsed() { # T0 → seconds since T0
	python3 -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.2f}')" "$1" "$(now_s)"
}

# The source: alternating data and holes.
SRC="$WORK/source.img"
truncate -s "$SIZE_BYTES" "$SRC"
note "writing $((DATA_BYTES >> 20)) MiB of random data into a $SIZE image, $PIECE pieces between holes"
fio --name=fill --filename="$SRC" --rw="write:$PIECE_BYTES" --bs="$PIECE_BYTES" --size="$SIZE_BYTES" \
	--ioengine=psync --refill_buffers --end_fsync=1 --output="$WORK/fill.txt" >/dev/null 2>"$WORK/fill.err" ||
	{ cat "$WORK/fill.err" >&2; die "filling the image failed"; }
allocated=$(($(stat -c %b "$SRC") * 512))
if [ "$allocated" -lt "$DATA_BYTES" ] || [ "$allocated" -ge $((DATA_BYTES + SIZE_BYTES / 8)) ]; then
	die "the image holds $((allocated >> 20)) MiB of data, not about $((DATA_BYTES >> 20)) MiB"
fi

# 1. The QUIC ceiling.
if [ -n "$QUIC_MBS" ]; then
	QUIC="$QUIC_MBS"
	note "QUIC ceiling given: $QUIC MB/s"
else
	command -v cargo >/dev/null || die "cargo is not installed: set QUIC_MBS to the ceiling measured elsewhere"
	note "measuring the QUIC ceiling ($((QUIC_N >> 20)) MiB)"
	TIDEMARK_BENCH_BYTES="$QUIC_N" cargo bench -q -p tidemark-net --bench quic >"$WORK/quic.txt" 2>"$WORK/quic.err" ||
		{ cat "$WORK/quic.err" >&2; die "the QUIC benchmark failed"; }
	QUIC="$(awk '/^tidemark \(both\)/ {print $(NF-1)}' "$WORK/quic.txt")"
	[ -n "$QUIC" ] || die "no 'tidemark (both)' line in $WORK/quic.txt"
fi

# 2. nbdcopy from nbdkit.
note "nbdcopy from nbdkit file"
drop_caches
nbdkit -f -r -U "$SOCKDIR/nbdkit.sock" file "$SRC" >"$WORK/nbdkit.out" 2>"$WORK/nbdkit.err" &
npid=$!
PIDS+=("$npid")
for _ in $(seq 600); do
	nbdinfo --size "nbd+unix:///?socket=$SOCKDIR/nbdkit.sock" >/dev/null 2>&1 && break
	sleep 0.1
done
t0="$(now_s)"
nbdcopy "nbd+unix:///?socket=$SOCKDIR/nbdkit.sock" "$WORK/copy.img"
sync "$WORK/copy.img"
NBDCOPY_S="$(elapsed "$t0")"
stop_pid "$npid"
cmp "$SRC" "$WORK/copy.img" || die "nbdcopy's copy differs from the source"
rm -f "$WORK/copy.img"

# 3. tidemark: receiver, tracker, then the shipper, timed until protected.
PKI="$WORK/pki"
declare -A SECONDS_TO CPU_S CPU_R
sync_with() { # LABEL BINARY
	local label=$1 dir="$WORK/$1" rpid tpid spid addr t0 state hz
	BIN=$2
	rm -rf "$PKI"
	enrol "$PKI" "$HOST"
	mkdir -p "$dir"
	start_receiver "$dir"
	rpid=$RECEIVER_PID addr=$RECEIVER_ADDR
	start_tracker "$SRC" "$dir"
	tpid=$TRACKER_PID
	drop_caches
	note "$label: initial sync of $SIZE"
	t0="$(now_s)"
	TIDEMARK_LOG=warn "$BIN" shipper run --log-dir "$dir/log" --receiver "$addr" --host "$HOST" \
		--pki-dir "$PKI/host" >"$dir/shipper.out" 2>"$dir/shipper.err" &
	spid=$!
	PIDS+=("$spid")
	state=""
	for _ in $(seq 12000); do
		state="$("$BIN" shipper status --json --log-dir "$dir/log" 2>/dev/null |
			python3 -c 'import json,sys; print(json.load(sys.stdin)["state"])' 2>/dev/null)" || state=""
		[ "$state" = protected ] && break
		kill -0 "$spid" 2>/dev/null || { cat "$dir/shipper.err" >&2; die "$label: the shipper exited"; }
		sleep 0.1
	done
	[ "$state" = protected ] || die "$label: not protected after 20 minutes"
	SECONDS_TO[$label]="$(elapsed "$t0")"
	hz="$(getconf CLK_TCK)"
	CPU_S[$label]="$(awk -v hz="$hz" '{printf "%.1f", ($14 + $15) / hz}' "/proc/$spid/stat")"
	CPU_R[$label]="$(awk -v hz="$hz" '{printf "%.1f", ($14 + $15) / hz}' "/proc/$rpid/stat")"
	stop_pid "$spid"
	stop_pid "$tpid"
	stop_pid "$rpid"
	if [ "$VERIFY" = 1 ]; then
		local img
		img="$(find "$dir/replicas" -name 'disk-*.img' | head -n 1)"
		[ -n "$img" ] || die "$label: no replica image"
		cmp "$SRC" "$img" || die "$label: the replica differs from the source"
	fi
	rm -rf "$dir"
}

load_before="$(cut -d' ' -f1-3 /proc/loadavg)"
for b in "${BINS[@]}"; do
	sync_with "${b%%=*}" "${b#*=}"
done
load_after="$(cut -d' ' -f1-3 /proc/loadavg)"

echo
echo "== $BENCH_NAME: $(date -u +%FT%TZ)"
echo "kernel $(uname -r), $(nproc) CPUs; load average before $load_before, after $load_after"
echo "disk $SIZE: $((DATA_BYTES >> 20)) MiB random data in $PIECE pieces between holes of $PIECE"
echo "rates are MB/s of the data half (10^6 bytes), holes not counted"
python3 - "$DATA_BYTES" "$QUIC" "$NBDCOPY_S" "${BINS[@]}" <<EOF
import sys
data, quic, nbdcopy = int(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3])
seconds = {$(for b in "${BINS[@]}"; do l=${b%%=*}; printf '"%s": (%s, %s, %s), ' "$l" "${SECONDS_TO[$l]}" "${CPU_S[$l]}" "${CPU_R[$l]}"; done)}
rate = lambda s: data / s / 1e6
print(f"{'':24} {'seconds':>8} {'MB/s':>8} {'x QUIC':>7} {'x nbdcopy':>9}  CPU s shipper/receiver")
print(f"{'QUIC ceiling (no disk)':24} {data / 1e6 / quic:8.2f} {quic:8.0f} {1:7.2f} {'':>9}")
print(f"{'nbdcopy from nbdkit':24} {nbdcopy:8.2f} {rate(nbdcopy):8.0f} {rate(nbdcopy) / quic:7.2f} {1:9.2f}")
for label, (s, cs, cr) in seconds.items():
    r = rate(s)
    print(f"{'tidemark ' + label:24} {s:8.2f} {r:8.0f} {r / quic:7.2f} {r / rate(nbdcopy):9.2f}  {cs}/{cr}")
for label, (s, _, _) in seconds.items():
    r = rate(s) / quic
    print(f"{label}: initial sync at {r:.2f}x the QUIC ceiling (goal >= 0.8: {'met' if r >= 0.8 else 'MISSED'})")
EOF
