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
#    WRITE_BYTES (the status is looked at every 0.1 s). The shipper's
#    reading and sending are in it on both sides alike.
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
# Part 2 (receivers): the apply rate with several receivers on one cluster.
# For each count in RECEIVERS, a namespace of its own served by that many
# receivers (each its own port, data-dir and server certificate from the
# one CA, `advertise` its address) and HOSTS hosts, each a tracker and a
# shipper listing every receiver (`receivers = [...]`): each host in turn
# syncs its HOST_DISK_SIZE disk (which gives its group an owner: the first
# receiver its shipper dials takes the lease, the others redirect), then
# gets HOST_WRITE_BYTES written with its shipper stopped, as in part 1.
# Then all the shippers start at once:
#   apply: wall time until every host's log is durable (and when each
#     host was done), MiB/s of HOSTS x HOST_WRITE_BYTES, the ratio to the
#     first count (1 receiver);
#   where the time goes: CPU seconds (user + system, /proc/PID/stat) over
#     the apply of each receiver, the OSD and the monitor (the testbed's),
#     the shippers together and the script's own poller, and those
#     seconds as a share of all the cores over the apply ("ours"), beside
#     the share every process on the machine took ("machine", /proc/stat:
#     near 100 %, more receivers cannot go faster here) and the share
#     spent idle waiting for I/O ("iowait");
#   the spread: which receiver owns each group (`tidemark status
#     --config`), and the leases taken and shippers redirected as each
#     receiver's log counts them.
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
#   WRITE_BYTES=64MiB        written through the tracker while the shipper
#                            is stopped (memstore holds ~3x what is written)
#   BS=64k                   fio block size
#   FSYNC=32                 writes between FLUSHes (recovery points)
#   PARTS="stores receivers" the parts to run, in this order
#   RECEIVERS="1 2 4"        part 2: the receiver counts, the first the base
#   HOSTS=4                  part 2: protected hosts
#   HOST_DISK_SIZE=256MiB    part 2: each host's disk
#   HOST_WRITE_BYTES=64MiB   part 2: written on each host (HOSTS times
#                            this per count; the namespace is emptied after)
#   KEEP=1                   keep the work directory
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT="$PWD"

DISK_SIZE="${DISK_SIZE:-512MiB}"
WRITE_BYTES="${WRITE_BYTES:-64MiB}"
BS="${BS:-64k}"
FSYNC="${FSYNC:-32}"
KEEP="${KEEP:-0}"
PARTS="${PARTS:-stores receivers}"
RECEIVERS="${RECEIVERS:-1 2 4}"
HOSTS="${HOSTS:-4}"
HOST_DISK_SIZE="${HOST_DISK_SIZE:-256MiB}"
HOST_WRITE_BYTES="${HOST_WRITE_BYTES:-64MiB}"
BASE="${TIDEMARK_BENCH_DIR:-${CARGO_TARGET_DIR:-$ROOT/target}/bench-tmp}"
HOST=bench-host.example

BENCH_NAME=bench-ceph
# shellcheck source=scripts/lib/bench-common.sh
source scripts/lib/bench-common.sh

[[ "$FSYNC" =~ ^[1-9][0-9]*$ ]] || die "FSYNC must be a positive whole number, not '$FSYNC'"
DISK_BYTES="$(bytes "$DISK_SIZE")"
WRITE_N="$(bytes "$WRITE_BYTES")"
HOST_DISK_BYTES="$(bytes "$HOST_DISK_SIZE")"
HOST_WRITE_N="$(bytes "$HOST_WRITE_BYTES")"
[[ "$HOSTS" =~ ^[1-9][0-9]*$ ]] || die "HOSTS must be a positive whole number, not '$HOSTS'"
MAX_RECEIVERS=0
for n in $RECEIVERS; do
	[[ "$n" =~ ^[1-9][0-9]*$ ]] || die "RECEIVERS must list positive whole numbers, not '$n'"
	[ "$n" -gt "$MAX_RECEIVERS" ] && MAX_RECEIVERS=$n
done
[ "$MAX_RECEIVERS" -gt 0 ] || die "RECEIVERS is empty"

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

# Part 2 removes each count's images and logs before the next.
bench_workspace ceph $((3 * DISK_BYTES + 2 * WRITE_N + HOSTS * (HOST_DISK_BYTES + 2 * HOST_WRITE_N) + (1 << 30)))
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

# The highest sequence number in a log directory (its tracker stopped).
last_seq() { # LOG_DIR
	"$BIN" log check --json "$1" |
		python3 -c 'import json,sys; print(json.load(sys.stdin).get("last_seq") or 0)'
}

# wait_durable T0_US OUT LOG_DIR:LAST_SEQ...: waits until each shipper has
# made its log durable up to LAST_SEQ and says protected (10 minutes at
# most); writes to OUT, one line each, the host's index and its seconds
# since T0_US, then "poller_cpu" and the CPU seconds the wait itself took.
# One process for every look (a process per look and host would take
# more CPU than the receivers on 2 cores, and reading the log at each
# look as wait_caught_up does more still).
wait_durable() {
	local t0=$1 out=$2
	shift 2
	python3 - "$BIN" "$t0" "$@" >"$out" <<'EOF' || die "the backlogs were not applied in 10 minutes"
import json, os, subprocess, sys, time
bin_, t0 = sys.argv[1], int(sys.argv[2]) / 1e6
pending = {i: (d.rsplit(":", 1)[0], int(d.rsplit(":", 1)[1])) for i, d in enumerate(sys.argv[3:])}
done = {}
while pending and time.time() - t0 < 600:
    for i, (log, last) in list(pending.items()):
        out = subprocess.run([bin_, "shipper", "status", "--json", "--log-dir", log],
                             capture_output=True, text=True)
        try:
            s = json.loads(out.stdout)
        except ValueError:
            continue
        if s.get("durable_seq") == last and s.get("state") == "protected":
            done[i] = time.time() - t0
            del pending[i]
    time.sleep(0.1)
for i in sorted(done):
    print(i, f"{done[i]:.3f}")
t = os.times()
print("poller_cpu", f"{t.user + t.system + t.children_user + t.children_system:.2f}")
sys.exit(1 if pending else 0)
EOF
}

# The milliseconds until the last host was done, from wait_durable's OUT.
done_ms() { # OUT
	awk '$1 ~ /^[0-9]+$/ && $2 > m {m = $2} END {printf "%d\n", m * 1000 + 0.5}' "$1"
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
	local last
	last="$(last_seq "$dir/log")"
	now_us
	t0=$NOW
	start_shipper "$dir" "$addr"
	wait_durable "$t0" "$dir/done.txt" "$dir/log:$last"
	RESULT[$store.apply_ms]="$(done_ms "$dir/done.txt")"
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

# Part 1: the local store and the Ceph store, one receiver each.
stores_part() {
	local load_before load_after
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
}

# Part 2: one Ceph namespace served by 1, 2, 4 … receivers.

# The utime + stime of PID in clock ticks (0 once it is gone).
cpu_ticks() { # PID
	local stat
	stat="$(cat "/proc/$1/stat" 2>/dev/null)" || {
		echo 0
		return
	}
	# Fields after the command name, which may hold spaces: utime and
	# stime are the 14th and 15th of the whole line.
	stat="${stat##*) }"
	awk '{print $12 + $13}' <<<"$stat"
}

# The machine's busy and iowait clock ticks so far, all CPUs together
# (/proc/stat): "BUSY IOWAIT".
machine_ticks() {
	awk '$1 == "cpu" {print $2 + $3 + $4 + $7 + $8 + $9, $6}' /proc/stat
}

# COUNT free UDP ports on loopback, one a line (held together while
# picked, so they differ).
free_udp_ports() { # COUNT
	python3 - "$1" <<'EOF'
import socket, sys
socks = []
for _ in range(int(sys.argv[1])):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    socks.append(s)
for s in socks:
    print(s.getsockname()[1])
EOF
}

# Removes what a run left in a namespace of the cluster: its RBD images,
# then its objects.
drop_namespace() { # NAMESPACE
	local ns=$1 image
	for image in $(rbd -p "$POOL" --namespace "$ns" ls 2>/dev/null); do
		rbd -p "$POOL" --namespace "$ns" rm --no-progress "$image" >/dev/null 2>&1 || true
	done
	rados -p "$POOL" -N "$ns" ls 2>/dev/null | xargs -r -n 64 rados -p "$POOL" -N "$ns" rm 2>/dev/null || true
}

# spread RECEIVERS: N receivers on one namespace and HOSTS hosts, each with
# a backlog; the aggregate apply into the cluster, into RESULT[rN.*] and
# one line of $WORK/spread.txt.
spread() {
	local n=$1 dir="$WORK/r$1" ns="bench-$$-r$1" i h ports addrs=() rpids=() spids=() logs=()
	local list osd_pid="" mon_pid="" t0 before_r=() before_osd=0 before_mon=0
	mkdir -p "$dir"
	mapfile -t ports < <(free_udp_ports "$n")
	for ((i = 0; i < n; i++)); do addrs+=("127.0.0.1:${ports[$i]}"); done
	list="$(printf '"%s", ' "${addrs[@]}")"
	list="[${list%, }]"
	for ((i = 0; i < n; i++)); do
		mkdir -p "$dir/recv-$i"
		cat >"$dir/recv-$i/receiver.toml" <<-EOF
			[receiver]
			listen = "${addrs[$i]}"
			data-dir = "$dir/recv-$i/data"
			control-socket = "$SOCKDIR/r$n-$i.ctl"
			metrics-listen = "127.0.0.1:0"
			[receiver.tls]
			ca = "$PKI/receiver/ca.crt"
			ca-key = "$PKI/receiver/ca.key"
			cert = "$PKI/node-$i/receiver.crt"
			key = "$PKI/node-$i/receiver.key"
			[receiver.store]
			kind = "ceph"
			conf = "$CEPH_CONF"
			user = "client.admin"
			pool = "$POOL"
			namespace = "$ns"
			advertise = "${addrs[$i]}"
			release-idle = "1h"
		EOF
		TIDEMARK_LOG=info "$BIN" receiver serve --config "$dir/recv-$i/receiver.toml" \
			>"$dir/recv-$i/receiver.out" 2>"$dir/recv-$i/receiver.err" &
		rpids+=($!)
		PIDS+=($!)
	done
	for ((i = 0; i < n; i++)); do
		wait_line "$dir/recv-$i/receiver.out" "receiver ready on" "${rpids[$i]}"
	done

	# Each host in turn: its initial sync (which gives its group an owner),
	# then its backlog written with the shipper stopped.
	for ((h = 0; h < HOSTS; h++)); do
		local hd="$dir/host-$h" name="h$h.$HOST"
		mkdir -p "$hd"
		cat >"$hd/shipper.toml" <<-EOF
			[shipper]
			host = "$name"
			receivers = $list
			log-dir = "$hd/log"
			control-socket = "$SOCKDIR/r$n-h$h.ctl"
			metrics-listen = "127.0.0.1:0"
			[shipper.tls]
			ca = "$PKI/$name/ca.crt"
			cert = "$PKI/$name/host.crt"
			key = "$PKI/$name/host.key"
		EOF
		truncate -s "$HOST_DISK_BYTES" "$hd/source.img"
		start_tracker "$hd/source.img" "$hd"
		note "$n receiver(s): initial sync of $name ($HOST_DISK_SIZE)"
		TIDEMARK_LOG=warn "$BIN" shipper run --config "$hd/shipper.toml" \
			>"$hd/shipper.out" 2>"$hd/shipper.err" &
		SHIPPER_PID=$!
		PIDS+=("$SHIPPER_PID")
		wait_caught_up "$hd/log"
		stop_pid "$SHIPPER_PID"
		fio --name=backlog --ioengine=nbd --uri="nbd+unix:///disk?socket=$SOCKDIR/tracker.sock" \
			--rw=randwrite --bs="$BS" --iodepth=16 --size="$HOST_DISK_BYTES" --io_size="$HOST_WRITE_N" \
			--fsync="$FSYNC" --randrepeat=0 --output-format=json --output="$hd/fio.json" \
			>/dev/null 2>"$hd/fio.err" || { cat "$hd/fio.err" >&2; die "writing through the tracker failed"; }
		stop_pid "$TRACKER_PID"
		logs+=("$hd/log:$(last_seq "$hd/log")")
	done

	if [ -n "$CLUSTER" ]; then
		osd_pid="$(cat "$CLUSTER/run/osd.0.pid" 2>/dev/null)" || osd_pid=""
		mon_pid="$(cat "$CLUSTER/run/mon.a.pid" 2>/dev/null)" || mon_pid=""
	fi
	for ((i = 0; i < n; i++)); do before_r+=("$(cpu_ticks "${rpids[$i]}")"); done
	[ -n "$osd_pid" ] && before_osd="$(cpu_ticks "$osd_pid")"
	[ -n "$mon_pid" ] && before_mon="$(cpu_ticks "$mon_pid")"
	RESULT[r$n.load_before]="$(cut -d' ' -f1-3 /proc/loadavg)"
	local machine_before
	machine_before="$(machine_ticks)"

	note "$n receiver(s): applying $HOSTS backlogs of $HOST_WRITE_BYTES at once"
	now_us
	t0=$NOW
	for ((h = 0; h < HOSTS; h++)); do
		TIDEMARK_LOG=warn "$BIN" shipper run --config "$dir/host-$h/shipper.toml" \
			>>"$dir/host-$h/shipper.out" 2>>"$dir/host-$h/shipper.err" &
		spids+=($!)
		PIDS+=($!)
	done
	wait_durable "$t0" "$dir/done.txt" "${logs[@]}"
	local machine_after
	machine_after="$(machine_ticks)"
	RESULT[r$n.apply_ms]="$(done_ms "$dir/done.txt")"
	RESULT[r$n.machine_ticks]="$((${machine_after% *} - ${machine_before% *})),$((${machine_after#* } - ${machine_before#* }))"
	RESULT[r$n.load_after]="$(cut -d' ' -f1-3 /proc/loadavg)"
	local rcpu="" shcpu=0
	for ((i = 0; i < n; i++)); do
		rcpu+="$(($(cpu_ticks "${rpids[$i]}") - before_r[i])),"
	done
	for i in "${spids[@]}"; do shcpu=$((shcpu + $(cpu_ticks "$i"))); done
	RESULT[r$n.receiver_ticks]="${rcpu%,}"
	RESULT[r$n.shipper_ticks]=$shcpu
	RESULT[r$n.osd_ticks]=$([ -n "$osd_pid" ] && echo $(($(cpu_ticks "$osd_pid") - before_osd)) || echo -1)
	RESULT[r$n.mon_ticks]=$([ -n "$mon_pid" ] && echo $(($(cpu_ticks "$mon_pid") - before_mon)) || echo -1)
	RESULT[r$n.hosts_s]="$(awk '$1 ~ /^[0-9]+$/ {printf "%s%s", s, $2; s=","}' "$dir/done.txt")"
	RESULT[r$n.poller_s]="$(awk '$1 == "poller_cpu" {print $2}' "$dir/done.txt")"

	# Which receiver applies which group, as the cluster records it.
	"$BIN" status --config "$dir/recv-0/receiver.toml" --json >"$dir/status.json" 2>"$dir/status.err" ||
		{ cat "$dir/status.err" >&2; die "tidemark status --config failed"; }
	RESULT[r$n.owners]="$(python3 - "$dir/status.json" "${addrs[@]}" <<'EOF'
import json, sys
doc = json.load(open(sys.argv[1]))
addrs = sys.argv[2:]
owners = {}
for r in doc.get("replicas", []):
    a = (r.get("owner") or {}).get("address")
    owners[r["host"]] = f"r{addrs.index(a)}" if a in addrs else str(a)
print(" ".join(f"{h.split('.')[0]}:{owners[h]}" for h in sorted(owners)))
EOF
)"
	# And what each receiver's log says: leases taken, shippers redirected.
	local logged=""
	for ((i = 0; i < n; i++)); do
		logged+="r$i $(grep -c "group lease taken" "$dir/recv-$i/receiver.err" || true)/$(grep -c "redirected the shipper" "$dir/recv-$i/receiver.err" || true), "
	done
	RESULT[r$n.redirects]="${logged%, }"
	for i in "${spids[@]}"; do stop_pid "$i"; done
	for i in "${rpids[@]}"; do stop_pid "$i"; done
	drop_namespace "$ns"
	[ "$KEEP" = 1 ] || rm -rf "$dir"/host-*/log "$dir"/host-*/source.img
}

receivers_part() {
	local n i name
	for ((i = 0; i < MAX_RECEIVERS; i++)); do
		# A server certificate of its own for each receiver node, from the
		# one CA, under the name shippers check (server-name). `receiver
		# sign --console` is the command that issues a server certificate
		# from the CA (serverAuth, the name in the SAN, a new key), which is
		# what a receiver presents too.
		mkdir -p "$PKI/node-$i"
		"$BIN" receiver sign --pki-dir "$PKI/receiver" --console tidemark-receiver \
			--out "$PKI/node-$i/receiver.crt" --key-out "$PKI/node-$i/receiver.key" >/dev/null
	done
	for ((i = 0; i < HOSTS; i++)); do
		name="h$i.$HOST"
		"$BIN" host request --host "$name" --pki-dir "$PKI/$name" >/dev/null
		"$BIN" receiver sign --pki-dir "$PKI/receiver" --host "$name" \
			--csr "$PKI/$name/host.csr" --out "$PKI/$name/host.crt" >/dev/null
		cp "$PKI/receiver/ca.crt" "$PKI/$name/ca.crt"
	done
	for n in $RECEIVERS; do spread "$n"; done

	local args=()
	for n in $RECEIVERS; do
		args+=("$n" "${RESULT[r$n.apply_ms]}" "${RESULT[r$n.receiver_ticks]}" "${RESULT[r$n.osd_ticks]}"
			"${RESULT[r$n.mon_ticks]}" "${RESULT[r$n.shipper_ticks]}" "${RESULT[r$n.poller_s]}"
			"${RESULT[r$n.hosts_s]}" "${RESULT[r$n.owners]}" "${RESULT[r$n.redirects]}"
			"${RESULT[r$n.load_before]}" "${RESULT[r$n.load_after]}" "${RESULT[r$n.machine_ticks]}")
	done
	python3 - "$((HOSTS * HOST_WRITE_N))" "$(getconf CLK_TCK)" "$(nproc)" "${args[@]}" <<'EOF'
import sys
total, hz, cores = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
a = sys.argv[4:]
runs = [a[i:i + 13] for i in range(0, len(a), 13)]
base = None
print(f"{'receivers':>9} {'apply s':>8} {'MiB/s':>7} {'x 1 rcv':>7}  {'CPU s: receivers':<24} {'osd':>5} {'mon':>5} "
      f"{'shippers':>8} {'poller':>6} {'ours':>5} {'machine':>7} {'iowait':>6}")
for n, ms, rt, osd, mon, sh, poll, hosts, owners, redirects, lb, la, mach in runs:
    s = int(ms) / 1000
    rate = total / 1048576 / s
    base = base or rate
    r = [int(t) / hz for t in rt.split(",")]
    osd_s, mon_s, sh_s = int(osd) / hz, int(mon) / hz, int(sh) / hz
    busy, iowait = (int(x) / hz for x in mach.split(","))
    ours = sum(r) + max(osd_s, 0) + max(mon_s, 0) + sh_s + float(poll or 0)
    rs = "+".join(f"{x:.1f}" for x in r) + f" = {sum(r):.1f}"
    fmt = lambda x: f"{x:5.1f}" if x >= 0 else "  n/a"
    share = lambda x: f"{x / (s * cores):.0%}"
    print(f"{n:>9} {s:8.2f} {rate:7.1f} {rate / base:7.2f}  {rs:<24} {fmt(osd_s)} {fmt(mon_s)} {sh_s:8.1f} "
          f"{float(poll or 0):6.1f} {share(ours):>5} {share(busy):>7} {share(iowait):>6}")
for n, ms, rt, osd, mon, sh, poll, hosts, owners, redirects, lb, la, mach in runs:
    print(f"  {n} receiver(s): groups {owners}; hosts done after {hosts} s; "
          f"leases taken/redirects in each receiver's log: {redirects}; load average {lb} -> {la}")
print(f"  ours = the CPU seconds listed, machine = every process's (/proc/stat), iowait = idle waiting "
      f"for I/O, each / ({cores} cores x apply time)")
EOF
	echo "$HOSTS hosts, each a $HOST_DISK_SIZE disk with $HOST_WRITE_BYTES written in $BS writes (a FLUSH every $FSYNC) while its shipper was stopped"
}

for part in $PARTS; do
	case $part in
	stores) stores_part ;;
	receivers) receivers_part ;;
	*) die "PARTS: unknown part '$part' (stores, receivers)" ;;
	esac
done
