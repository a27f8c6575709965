#!/usr/bin/env bash
# The local store and the Ceph store side by side in one run: how fast a
# receiver applies a backlog into each, and how long a test failover takes
# to serve the newest point and to be read whole.
#
# Setup: a one-node Ceph testbed (scripts/ceph-testbed.sh, memstore, one
# OSD; or the cluster CEPH_CONF names, pool CEPH_TESTBED_RBD_POOL), then
# for each store (local: data-dir; ceph: [receiver.store] kind = "ceph",
# a namespace of its own) the real pipeline on loopback: enrolment, a
# receiver, a tracker serving a DISK_SIZE image of zeros, a shipper; the
# initial sync runs to "protected", then the shipper is stopped and fio
# writes WRITE_BYTES of random BS writes through the tracker's NBD socket
# (fio's nbd engine, 16 in flight, a FLUSH every FSYNC writes: every FLUSH
# a recovery point), so the log holds a backlog.
#
# 1. Apply: wall time from starting the shipper again to the receiver
#    having made the whole log durable (shipper status): MiB/s of
#    WRITE_BYTES. The shipper's reading and sending are in it on both
#    sides alike.
# 2. Test failover start: wall time from launching `tidemark test-failover
#    start --point latest` (--config: the store the receiver uses) to
#    nbdinfo answering on its socket.
# 3. Whole-disk read: `nbdcopy URI null:` of the served point (it asks
#    block status and reads what is not a hole); MiB/s of the disk's size.
#
# Ratios are ceph / local (times: above 1 the Ceph store is slower; rates:
# below 1). On 2 cores the OSD, the receiver and the rest share the CPUs:
# read the ratios, not the absolute figures.
#
# Usage: scripts/bench-ceph.sh   (as root, from anywhere)
#   Installs fio, libnbd-bin, python3 and the Ceph packages (ceph-mon,
#   ceph-osd, ceph-common) with apt-get when missing. About 2 minutes with
#   the defaults, plus a release build with the feature `ceph`.
# Environment:
#   TIDEMARK_BIN=PATH        a tidemark binary built with the feature ceph
#                            (default: cargo build --release -p tidemark
#                            --features ceph)
#   TIDEMARK_BENCH_DIR=PATH  where images, logs and replicas go (default
#                            ${CARGO_TARGET_DIR:-target}/bench-tmp)
#   DISK_SIZE=512MiB         the protected disk
#   WRITE_BYTES=128MiB       written through the tracker while the shipper
#                            is stopped (memstore holds ~3x what is written)
#   BS=64k                   fio block size
#   FSYNC=32                 writes between FLUSHes (recovery points)
#   KEEP=1                   keep the work directory
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT="$PWD"

DISK_SIZE="${DISK_SIZE:-512MiB}"
WRITE_BYTES="${WRITE_BYTES:-128MiB}"
BS="${BS:-64k}"
FSYNC="${FSYNC:-32}"
KEEP="${KEEP:-0}"
BASE="${TIDEMARK_BENCH_DIR:-${CARGO_TARGET_DIR:-$ROOT/target}/bench-tmp}"
HOST=bench-host.example

BENCH_NAME=bench-ceph
# shellcheck source=scripts/lib/bench-common.sh
source scripts/lib/bench-common.sh

[[ "$FSYNC" =~ ^[1-9][0-9]*$ ]] || die "FSYNC must be a positive whole number, not '$FSYNC'"
DISK_BYTES="$(bytes "$DISK_SIZE")"
WRITE_N="$(bytes "$WRITE_BYTES")"

ensure_commands fio:fio nbdinfo:libnbd-bin nbdcopy:libnbd-bin python3:python3 numfmt:coreutils
[ -n "${CEPH_CONF:-}" ] || ensure_commands ceph-mon:ceph-mon ceph-osd:ceph-osd ceph:ceph-common
fio --enghelp 2>/dev/null | grep -qw nbd || die "this fio ($(fio --version)) has no nbd engine"

if [ -n "${TIDEMARK_BIN:-}" ]; then
	BIN="$TIDEMARK_BIN"
else
	command -v cargo >/dev/null || die "cargo is not installed, or set TIDEMARK_BIN"
	note "building tidemark (release, feature ceph)"
	cargo build --release -q -p tidemark --features ceph
	BIN="${CARGO_TARGET_DIR:-$PWD/target}/release/tidemark"
fi
[ -x "$BIN" ] || die "no tidemark binary at $BIN"

bench_workspace ceph $((3 * DISK_BYTES + 2 * WRITE_N + (1 << 30)))
PKI="$WORK/pki"
enrol "$PKI" "$HOST"

CLUSTER=""
stop_cluster() {
	[ -n "$CLUSTER" ] && "$ROOT/scripts/ceph-testbed.sh" down "$CLUSTER" >/dev/null 2>&1
	bench_cleanup
}
trap stop_cluster EXIT
if [ -z "${CEPH_CONF:-}" ]; then
	CLUSTER="$WORK/cluster"
	note "starting the Ceph testbed"
	env_lines="$(CEPH_TESTBED_RGW=0 "$ROOT/scripts/ceph-testbed.sh" up "$CLUSTER")" ||
		die "the Ceph testbed did not start (see $CLUSTER/log)"
	eval "$env_lines"
fi
POOL="${CEPH_TESTBED_RBD_POOL:-rbd}"

now_us() { # the wall clock in µs, into NOW
	local t=$EPOCHREALTIME
	NOW=$((${t%.*} * 1000000 + 10#${t#*.}))
}

# Waits until the receiver has made the whole log durable and the shipper
# says protected.
wait_caught_up() { # LOG_DIR
	local log=$1 last
	for _ in $(seq 6000); do
		last="$("$BIN" log check --json "$log" 2>/dev/null |
			python3 -c 'import json,sys; print(json.load(sys.stdin).get("last_seq") or 0)')" || last=""
		if [ -n "$last" ] && "$BIN" shipper status --json --log-dir "$log" 2>/dev/null |
			python3 -c 'import json,sys; s=json.load(sys.stdin); sys.exit(0 if s["durable_seq"]=='"$last"' and s["state"]=="protected" else 1)' 2>/dev/null; then
			return 0
		fi
		sleep 0.1
	done
	"$BIN" shipper status --log-dir "$log" >&2 || true
	die "replication did not catch up in 10 minutes"
}

start_shipper() { # DIR ADDR
	TIDEMARK_LOG=warn "$BIN" shipper run --log-dir "$1/log" --receiver "$2" --host "$HOST" \
		--pki-dir "$PKI/host" >"$1/shipper.out" 2>"$1/shipper.err" &
	SHIPPER_PID=$!
	PIDS+=("$SHIPPER_PID")
}

declare -A RESULT

# bench STORE: one store's three figures into RESULT[STORE.*].
bench() {
	local store=$1 dir="$WORK/$1" rpid tpid t0 uri sock
	mkdir -p "$dir"
	{
		cat <<-EOF
			[receiver]
			listen = "127.0.0.1:0"
			data-dir = "$dir/replicas"
			control-socket = "$SOCKDIR/$store.ctl"
			[receiver.tls]
			ca = "$PKI/receiver/ca.crt"
			ca-key = "$PKI/receiver/ca.key"
			cert = "$PKI/receiver/receiver.crt"
			key = "$PKI/receiver/receiver.key"
			[[receiver.host]]
			name = "$HOST"
		EOF
		if [ "$store" = ceph ]; then
			cat <<-EOF
				[receiver.store]
				kind = "ceph"
				conf = "$CEPH_CONF"
				user = "client.admin"
				pool = "$POOL"
				namespace = "bench-$$"
			EOF
		fi
	} >"$dir/receiver.toml"
	TIDEMARK_LOG=warn "$BIN" receiver serve --config "$dir/receiver.toml" \
		>"$dir/receiver.out" 2>"$dir/receiver.err" &
	rpid=$!
	PIDS+=("$rpid")
	wait_line "$dir/receiver.out" "receiver ready on" "$rpid"
	local addr
	addr="$(sed -n 's/^receiver ready on //p' "$dir/receiver.out")"
	truncate -s "$DISK_BYTES" "$dir/source.img"
	start_tracker "$dir/source.img" "$dir"
	tpid=$TRACKER_PID
	note "$store: initial sync of $DISK_SIZE"
	start_shipper "$dir" "$addr"
	wait_caught_up "$dir/log"
	stop_pid "$SHIPPER_PID"

	note "$store: writing $WRITE_BYTES through the tracker, shipper stopped"
	fio --name=backlog --ioengine=nbd --uri="nbd+unix:///disk?socket=$SOCKDIR/tracker.sock" \
		--rw=randwrite --bs="$BS" --iodepth=16 --size="$DISK_BYTES" --io_size="$WRITE_N" \
		--fsync="$FSYNC" --randrepeat=0 --output-format=json --output="$dir/fio.json" \
		>/dev/null 2>"$dir/fio.err" || { cat "$dir/fio.err" >&2; die "writing through the tracker failed"; }
	stop_pid "$tpid"

	note "$store: applying the backlog"
	now_us
	t0=$NOW
	start_shipper "$dir" "$addr"
	wait_caught_up "$dir/log"
	now_us
	RESULT[$store.apply_ms]=$(((NOW - t0 + 500) / 1000))
	stop_pid "$SHIPPER_PID"

	note "$store: test failover of the newest point"
	sock="$SOCKDIR/$store-tf.sock"
	uri="nbd+unix:///disk?socket=$sock"
	now_us
	t0=$NOW
	"$BIN" test-failover start --config "$dir/receiver.toml" --host "$HOST" --point latest \
		--socket "$sock" >"$dir/tf.out" 2>"$dir/tf.err" &
	local tf=$!
	PIDS+=("$tf")
	for _ in $(seq 12000); do
		nbdinfo --size "$uri" >/dev/null 2>&1 && break
		kill -0 "$tf" 2>/dev/null || { cat "$dir/tf.err" >&2; die "the test failover exited before serving"; }
		sleep 0.01
	done
	now_us
	RESULT[$store.tf_start_ms]=$(((NOW - t0 + 500) / 1000))
	now_us
	t0=$NOW
	nbdcopy "$uri" null: || die "nbdcopy of the $store test failover failed"
	now_us
	RESULT[$store.tf_read_ms]=$(((NOW - t0 + 500) / 1000))
	stop_pid "$tf"
	stop_pid "$rpid"
}

load_before="$(cut -d' ' -f1-3 /proc/loadavg)"
bench local
bench ceph
load_after="$(cut -d' ' -f1-3 /proc/loadavg)"

python3 - "$WRITE_N" "$DISK_BYTES" \
	"${RESULT[local.apply_ms]}" "${RESULT[ceph.apply_ms]}" \
	"${RESULT[local.tf_start_ms]}" "${RESULT[ceph.tf_start_ms]}" \
	"${RESULT[local.tf_read_ms]}" "${RESULT[ceph.tf_read_ms]}" <<'EOF'
import sys
w, disk, la, ca, ls, cs, lr, cr = map(int, sys.argv[1:])
mib = lambda b, ms: b / 1048576 / max(ms, 1) * 1000
rows = [
    ("apply backlog, MiB/s", mib(w, la), mib(w, ca)),
    ("apply backlog, ms", la, ca),
    ("test failover start, ms", ls, cs),
    ("whole-disk nbdcopy, ms", lr, cr),
    ("whole-disk nbdcopy, MiB/s", mib(disk, lr), mib(disk, cr)),
]
print(f"{'':28} {'local':>10} {'ceph':>10} {'ceph/local':>11}")
for name, l, c in rows:
    print(f"{name:28} {l:10.1f} {c:10.1f} {c / l if l else float('nan'):11.2f}")
EOF
echo "disk $DISK_SIZE, $WRITE_BYTES written in $BS writes (a FLUSH every $FSYNC); load average before: $load_before, after: $load_after"
