#!/usr/bin/env bash
# The whole replication pipeline under paced writes: how far behind the
# replica falls at each write rate, what each daemon spends per MiB, and
# the highest rate it keeps up with, against the tracker's own write
# ceiling measured in the same run.
#
# Setup, for each binary (TIDEMARK_BIN, then TIDEMARK_BIN_BEFORE if set),
# the real pipeline on loopback: enrolment (receiver init, host request,
# receiver sign), a receiver (a config file: its retention keeps at most
# HISTORY of journal, so the replica's history stays bounded), a tracker
# serving a DISK_SIZE image of zeros, a shipper; fio writes through the
# tracker's NBD unix socket with its nbd engine (libnbd, one connection).
#
# 1. Ceiling: the tracker alone (no shipper, no receiver), fio unpaced for
#    RUNTIME seconds with the same workload: the tracker's write ceiling.
# 2. Then receiver and shipper start, the initial sync runs to "protected",
#    and for every rate in RATES (MiB/s; "max" = unpaced) fio writes
#    RUNTIME seconds at that rate (fio --rate), then the script waits until
#    the receiver has made every record durable. One row per rate:
#      offered, achieved   MiB/s asked of fio, MiB/s fio wrote
#      lag p50/p99         from the shipper's tidemark_shipper_acked_lag_seconds
#                          histogram, diffed before/after the row (so only its
#                          own observations count), interpolated within the
#                          bucket as Prometheus' histogram_quantile does
#                          (but within the highest bucket that holds
#                          observations, only up to the largest lag polled,
#                          see max, when that is inside the bucket). The
#                          shipper observes one value per record an
#                          acknowledgement made durable: its age from the
#                          tracker taking the write to the shipper reading
#                          the receiver's Ack, so a quantile is over records
#                          (a release before this one observed one value per
#                          acknowledgement, its oldest record's age); obs is
#                          how many observations there were
#      lag max             the largest tidemark_shipper_lag_seconds gauge (age
#                          of the oldest record not yet durable) seen polling
#                          the shipper's /metrics every POLL seconds (or
#                          slower: each poll is a curl) from the start of the
#                          writes to the end of the drain: a lower bound;
#                          max<= is the upper bound of the histogram's highest
#                          bucket that got an observation in the row
#      CPU ms/MiB          user + system time (/proc/PID/stat, all threads) of
#                          tracker, shipper and receiver from the start of the
#                          writes to the end of the drain, per MiB fio wrote
#      RSS MiB             peak resident set (VmHWM) of each during the row
#                          (reset before it through /proc/PID/clear_refs)
#      wire MiB            tidemark_shipper_wire_bytes_total: frame bytes the
#                          shipper wrote to its QUIC stream (compressed
#                          records and framing, before QUIC/TLS overhead);
#                          lo MiB: every byte sent on the loopback interface
#                          (/proc/net/dev), which is QUIC packets both ways
#                          plus the metrics scrapes
#      drain s             from fio's end to the receiver holding the newest
#                          record the tracker had logged at that moment
# 3. Summary: the highest achieved rate whose lag p99 < 1 s and whose drain
#    took < 1 s (it kept up), its ratio to the ceiling of the same binary in
#    the same run (goal >= 0.8), and whether the shipper's and receiver's
#    peak RSS stayed < 256 MiB at every rate.
#
# Usage: scripts/bench-pipeline.sh   (as root or not; from anywhere)
#   Installs fio, libnbd-bin, curl, python3 with apt-get when a command is
#   missing (as root). Takes about 3 minutes per binary with the defaults.
#   Other load on the machine (builds, tests) skews the figures: the load
#   average is printed before and after; compare ratios within one run.
# Environment:
#   TIDEMARK_BIN=PATH         a built tidemark binary (default: cargo build
#                             --release -p tidemark, then
#                             ${CARGO_TARGET_DIR:-target}/release/tidemark)
#   TIDEMARK_BIN_BEFORE=PATH  a second binary run through the same rates
#                             after the first; its rows print beside them
#   TIDEMARK_BENCH_DIR=PATH   where images, logs and replicas go (default
#                             ${CARGO_TARGET_DIR:-target}/bench-tmp)
#   RATES="25 50 100 200 400" offered rates in MiB/s; "max" = unpaced
#   RUNTIME=10                seconds of writing per rate (and for the ceiling)
#   BS=64k                    fio block size
#   RW=randwrite              randwrite or write (sequential)
#   IODEPTH=8                 requests in flight
#   COMPRESS=0                fio buffer_compress_percentage: 0 incompressible,
#                             50 half compressible (fresh buffers every write)
#   FSYNC=256                 a FLUSH (a barrier: a recovery point) after this
#                             many writes; 0 none (the receiver's history then
#                             grows by every byte written: mind the disk)
#   DISK_SIZE=1GiB            the protected disk
#   LOG_LIMIT=4GiB            the tracker's log size limit (a row that reaches
#                             it is flagged: the tracker left data mode)
#   HISTORY=1GiB              the receiver's retention max-space
#   DRAIN_TIMEOUT=120         seconds to wait for a drain before giving up
#   POLL=0.1                  seconds between lag polls
#   KEEP=1                    keep the work directory (fio JSON, daemon logs)
# Disk: about DISK_SIZE x 2 + the log's backlog + HISTORY at a time (under
# 7 GiB with the defaults); the work directory is deleted at the end.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT="$PWD"

RATES="${RATES:-25 50 100 200 400}"
RUNTIME="${RUNTIME:-10}"
BS="${BS:-64k}"
RW="${RW:-randwrite}"
IODEPTH="${IODEPTH:-8}"
COMPRESS="${COMPRESS:-0}"
FSYNC="${FSYNC:-256}"
DISK_SIZE="${DISK_SIZE:-1GiB}"
LOG_LIMIT="${LOG_LIMIT:-4GiB}"
HISTORY="${HISTORY:-1GiB}"
DRAIN_TIMEOUT="${DRAIN_TIMEOUT:-120}"
POLL="${POLL:-0.1}"
KEEP="${KEEP:-0}"
BASE="${TIDEMARK_BENCH_DIR:-${CARGO_TARGET_DIR:-$ROOT/target}/bench-tmp}"
HOST=bench-host.example

BENCH_NAME=bench-pipeline
# shellcheck source=scripts/lib/bench-common.sh
source scripts/lib/bench-common.sh

for v in RUNTIME IODEPTH DRAIN_TIMEOUT; do
	[[ "${!v}" =~ ^[1-9][0-9]*$ ]] || die "$v must be a positive whole number, not '${!v}'"
done
[[ "$FSYNC" =~ ^[0-9]+$ ]] || die "FSYNC must be a whole number, not '$FSYNC'"
if ! [[ "$COMPRESS" =~ ^[0-9]+$ ]] || [ "$COMPRESS" -gt 100 ]; then
	die "COMPRESS must be 0 to 100, not '$COMPRESS'"
fi
[[ "$POLL" =~ ^[0-9]*\.?[0-9]+$ ]] || die "POLL must be a number of seconds, not '$POLL'"
case "$RW" in randwrite | write) ;; *) die "RW must be randwrite or write, not '$RW'" ;; esac
for r in $RATES; do
	[[ "$r" =~ ^[1-9][0-9]*$ ]] || [ "$r" = max ] || die "RATES: '$r' is neither MiB/s nor max"
done
[ -n "$RATES" ] || die "RATES is empty"
DISK_BYTES="$(bytes "$DISK_SIZE")"
LOG_BYTES="$(bytes "$LOG_LIMIT")"
HISTORY_BYTES="$(bytes "$HISTORY")"
BS_BYTES="$(bytes "$BS")"

ensure_commands fio:fio nbdinfo:libnbd-bin curl:curl python3:python3 numfmt:coreutils
fio --enghelp 2>/dev/null | grep -qw nbd || die "this fio ($(fio --version)) has no nbd engine"

tidemark_binary
BINS=("after=$BIN")
if [ -n "${TIDEMARK_BIN_BEFORE:-}" ]; then
	[ -x "$TIDEMARK_BIN_BEFORE" ] || die "no tidemark binary at $TIDEMARK_BIN_BEFORE"
	BINS+=("before=$TIDEMARK_BIN_BEFORE")
fi

mkdir -p "$BASE"
BASE="$(cd "$BASE" && pwd)"
need=$((2 * DISK_BYTES + LOG_BYTES + HISTORY_BYTES + (1 << 30)))
avail=$(($(df -P -B1 "$BASE" | awk 'NR==2 {print $4}')))
[ "$avail" -ge "$need" ] || die "$BASE has $((avail >> 20)) MiB free; needs about $((need >> 20)) MiB"

WORK="$(mktemp -d "$BASE/pipe.XXXXXX")"
# Unix socket paths are limited to 108 bytes: sockets go to a short path.
SOCKDIR="$(mktemp -d /tmp/tmpipe.XXXXXX)"
SOCK="$SOCKDIR/tracker.sock"
URI="nbd+unix:///disk?socket=$SOCK"
CLK_TCK="$(getconf CLK_TCK)"
PIDS=()

cleanup() {
	local pid
	for pid in "${PIDS[@]}"; do stop_pid "$pid"; done
	rm -rf "$SOCKDIR"
	if [ "$KEEP" = 1 ]; then
		find "$WORK" \( -name '*.img' -o -name '*.seg' -o -name 'journal.*' \) -delete 2>/dev/null || true
		note "kept $WORK (without images, logs and journals)"
	else
		rm -rf "$WORK"
	fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# start NAME DIR ARGS...: starts `$BIN ARGS` (a daemon given
# --metrics-listen) in the background with its output in DIR/NAME.out and
# .err, and waits (60 s at most) until it prints its metrics address, after
# its ready line; sets STARTED to its pid.
start() {
	local name=$1 dir=$2 ready="metrics on"
	shift 2
	TIDEMARK_LOG=warn "$BIN" "$@" >"$dir/$name.out" 2>"$dir/$name.err" &
	STARTED=$!
	PIDS+=("$STARTED")
	for _ in $(seq 600); do
		grep -q "^$ready" "$dir/$name.out" 2>/dev/null && return 0
		kill -0 "$STARTED" 2>/dev/null || break
		sleep 0.1
	done
	cat "$dir/$name.err" >&2 || true
	die "$name did not start (see $dir/$name.err)"
}

# The metrics URL a daemon printed on its stdout.
metrics_url() { # OUT_FILE
	sed -n 's/^metrics on //p' "$1" | head -n 1
}

# The value of one unlabelled-enough sample of a metrics text on stdin.
metric() { # NAME
	awk -v n="$1" '$1 == n || index($1, n "{") == 1 {print $2; exit}'
}

# The tracker's next sequence number (its newest record + 1).
tracker_next_seq() {
	"$BIN" tracker status --control-socket "$SOCK.ctl" --json 2>/dev/null |
		python3 -c 'import json,sys; print(json.load(sys.stdin)["next_seq"])'
}

# One line per daemon: name pid user+system-ticks VmHWM-KiB.
sample_daemons() { # NAME=PID...
	local pair pid
	for pair in "$@"; do
		pid=${pair#*=}
		echo "${pair%%=*} $pid $(awk '{print $14 + $15}' "/proc/$pid/stat") $(awk '/^VmHWM/ {print $2}' "/proc/$pid/status")"
	done
}

# Bytes sent on the loopback interface so far.
lo_bytes() {
	awk -F'[: ]+' '$2 == "lo" {print $11}' /proc/net/dev
}

# fio against the tracker at RATE (MiB/s or max) for RUNTIME seconds.
run_fio() { # RATE OUTPUT
	local rate=$1 out=$2 args=()
	[ "$rate" != max ] && args+=("--rate=${rate}m")
	[ "$FSYNC" -gt 0 ] && args+=("--fsync=$FSYNC")
	[ "$COMPRESS" -gt 0 ] && args+=("--buffer_compress_percentage=$COMPRESS")
	fio --name=pipe --ioengine=nbd "--uri=$URI" "--rw=$RW" "--bs=$BS" "--iodepth=$IODEPTH" \
		--size="$DISK_BYTES" --time_based "--runtime=$RUNTIME" --norandommap --randrepeat=0 \
		--refill_buffers --kb_base=1024 "${args[@]}" --output-format=json "--output=$out" \
		>/dev/null 2>"$out.err" || { cat "$out.err" >&2; die "fio at $rate failed"; }
}

# Polls the shipper's lag gauge and durable sequence into FILE until
# killed: "seconds-since-epoch lag durable".
poll_lag() { # URL FILE
	local url=$1 file=$2 text
	while :; do
		text="$(curl -s --max-time 2 "$url" 2>/dev/null)" || text=""
		if [ -n "$text" ]; then
			echo "$EPOCHREALTIME $(metric tidemark_shipper_lag_seconds <<<"$text") $(metric tidemark_shipper_durable_sequence <<<"$text")" >>"$file"
		fi
		sleep "$POLL"
	done
}

# Waits until the shipper's durable sequence reaches SEQ; prints the
# seconds it took from T0 (an $EPOCHREALTIME).
wait_durable() { # URL SEQ T0
	local url=$1 seq=$2 t0=$3 durable deadline
	deadline=$((${t0%.*} + DRAIN_TIMEOUT))
	while :; do
		durable="$(curl -s --max-time 2 "$url" | metric tidemark_shipper_durable_sequence)" || durable=""
		if [ -n "$durable" ] && [ "${durable%.*}" -ge "$seq" ]; then
			awk -v a="$t0" -v b="$EPOCHREALTIME" 'BEGIN {printf "%.2f\n", b - a}'
			return 0
		fi
		[ "${EPOCHREALTIME%.*}" -lt "$deadline" ] || { echo "timeout"; return 0; }
		sleep 0.05
	done
}

# Waits until the initial sync is over and the replica holds the whole log.
wait_protected() { # DIR URL
	local dir=$1 url=$2 state seq
	for _ in $(seq 1200); do
		state="$("$BIN" shipper status --json --log-dir "$dir/log" 2>/dev/null |
			python3 -c 'import json,sys; print(json.load(sys.stdin)["state"])' 2>/dev/null)" || state=""
		if [ "$state" = protected ]; then
			seq=$(($(tracker_next_seq) - 1))
			[ "$(wait_durable "$url" "$seq" "$EPOCHREALTIME")" != timeout ] && return 0
		fi
		sleep 0.5
	done
	"$BIN" shipper status --log-dir "$dir/log" >&2 || true
	die "the initial sync did not finish in 10 minutes"
}

PKI="$WORK/pki"

# bench LABEL BINARY: the ceiling and every rate with one binary; writes
# its rows into the manifest.
bench() {
	local label=$1 dir="$WORK/$1" rpid tpid spid addr surl rdir t0 seq drain poller rate
	BIN=$2
	mkdir -p "$dir"
	rm -rf "$PKI"
	enrol "$PKI" "$HOST"

	note "$label: a $DISK_SIZE disk of zeros"
	dd if=/dev/zero of="$dir/source.img" bs=1M count=$((DISK_BYTES >> 20)) conv=fsync status=none

	# 1. The tracker alone.
	note "$label: the tracker alone, unpaced, ${RUNTIME}s"
	start tracker-alone "$dir" tracker serve --image "$dir/source.img" --name disk \
		--socket "$SOCK" --log-dir "$dir/log-alone" --log-size-limit "$LOG_BYTES" --metrics-listen 127.0.0.1:0
	tpid=$STARTED
	rdir="$dir/alone"
	mkdir -p "$rdir"
	echo 5 >"/proc/$tpid/clear_refs" 2>/dev/null || true
	sample_daemons "tracker=$tpid" >"$rdir/proc.before"
	run_fio max "$rdir/fio.json"
	sample_daemons "tracker=$tpid" >"$rdir/proc.after"
	curl -s "$(metrics_url "$dir/tracker-alone.out")" >"$rdir/tracker.prom" || true
	stop_pid "$tpid"
	rm -rf "$dir/log-alone" "$SOCK" "$SOCK.ctl"
	printf '%s\t%s\t%s\n' "$label" ceiling "$rdir" >>"$MANIFEST"

	# 2. The pipeline.
	cat >"$dir/receiver.toml" <<-EOF
		[receiver]
		listen = "127.0.0.1:0"
		data-dir = "$dir/replicas"
		control-socket = "$SOCKDIR/receiver.ctl"
		metrics-listen = "127.0.0.1:0"
		[receiver.tls]
		ca = "$PKI/receiver/ca.crt"
		ca-key = "$PKI/receiver/ca.key"
		cert = "$PKI/receiver/receiver.crt"
		key = "$PKI/receiver/receiver.key"
		[receiver.retention]
		max-space = "$HISTORY"
		[[receiver.host]]
		name = "$HOST"
	EOF
	start receiver "$dir" receiver serve --config "$dir/receiver.toml"
	rpid=$STARTED
	addr="$(sed -n 's/^receiver ready on //p' "$dir/receiver.out")"
	start tracker "$dir" tracker serve --image "$dir/source.img" --name disk \
		--socket "$SOCK" --log-dir "$dir/log" --log-size-limit "$LOG_BYTES" --metrics-listen 127.0.0.1:0
	tpid=$STARTED
	start shipper "$dir" shipper run --log-dir "$dir/log" --receiver "$addr" --host "$HOST" \
		--pki-dir "$PKI/host" --tracker-control-socket "$SOCK.ctl" --metrics-listen 127.0.0.1:0
	spid=$STARTED
	surl="$(metrics_url "$dir/shipper.out")"
	note "$label: initial sync"
	wait_protected "$dir" "$surl"

	for rate in $RATES; do
		rdir="$dir/rate-$rate"
		mkdir -p "$rdir"
		note "$label: $rate MiB/s for ${RUNTIME}s"
		local p
		for p in "$tpid" "$spid" "$rpid"; do echo 5 >"/proc/$p/clear_refs" 2>/dev/null || true; done
		curl -s "$surl" >"$rdir/before.prom"
		lo_bytes >"$rdir/lo.before"
		sample_daemons "tracker=$tpid" "shipper=$spid" "receiver=$rpid" >"$rdir/proc.before"
		: >"$rdir/lag.samples"
		poll_lag "$surl" "$rdir/lag.samples" &
		poller=$!
		run_fio "$rate" "$rdir/fio.json"
		t0=$EPOCHREALTIME
		seq=$(($(tracker_next_seq) - 1))
		drain="$(wait_durable "$surl" "$seq" "$t0")"
		kill "$poller" 2>/dev/null || true
		wait "$poller" 2>/dev/null || true
		sample_daemons "tracker=$tpid" "shipper=$spid" "receiver=$rpid" >"$rdir/proc.after"
		lo_bytes >"$rdir/lo.after"
		curl -s "$surl" >"$rdir/after.prom"
		curl -s "$(metrics_url "$dir/tracker.out")" >"$rdir/tracker.prom" || true
		echo "$drain" >"$rdir/drain"
		printf '%s\t%s\t%s\n' "$label" "$rate" "$rdir" >>"$MANIFEST"
		[ "$drain" = timeout ] && note "$label: the replica did not catch up in ${DRAIN_TIMEOUT}s after $rate MiB/s"
	done

	stop_pid "$spid"
	stop_pid "$tpid"
	stop_pid "$rpid"
	rm -rf "$dir/log" "$dir/replicas" "$dir/source.img"
}

MANIFEST="$WORK/manifest.tsv"
: >"$MANIFEST"
cat <<EOF
== bench-pipeline: $(date -u +%Y-%m-%dT%H:%M:%SZ)
kernel $(uname -r), $(nproc) CPUs; $(fio --version)
$(for b in "${BINS[@]}"; do echo "${b%%=*}: ${b#*=} ($("${b#*=}" --version 2>/dev/null | head -n 1))"; done)
directory $BASE ($(stat -f -c %T "$BASE"))
fio: nbd engine, $RW, bs $BS, iodepth $IODEPTH, $([ "$COMPRESS" -gt 0 ] && echo "${COMPRESS} % compressible" || echo incompressible), $([ "$FSYNC" -gt 0 ] && echo "FLUSH every $FSYNC writes" || echo "no FLUSH"), ${RUNTIME}s per rate; disk $DISK_SIZE; log limit $LOG_LIMIT; receiver history $HISTORY
load average before: $(cut -d' ' -f1-3 /proc/loadavg)
EOF
for b in "${BINS[@]}"; do bench "${b%%=*}" "${b#*=}"; done
echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg)"
echo
python3 "$ROOT/scripts/bench-pipeline-report.py" "$MANIFEST" "$CLK_TCK" "$BS_BYTES"
