# shellcheck shell=bash
# What the benchmark scripts share; sourced, not run. The caller sets
# BENCH_NAME (the prefix of its messages) first.

die() {
	echo "$BENCH_NAME: $*" >&2
	exit 1
}

note() {
	echo "$BENCH_NAME: $*" >&2
}

# Installs the Debian packages providing the given commands, if any is
# missing: apt-get update only when the plain install fails (stale lists).
ensure_commands() { # command:package...
	local missing=() pair
	for pair in "$@"; do
		command -v "${pair%%:*}" >/dev/null || missing+=("${pair#*:}")
	done
	[ "${#missing[@]}" -eq 0 ] && return 0
	[ "$(id -u)" -eq 0 ] || die "missing ${missing[*]}; install with apt-get (needs root)"
	command -v apt-get >/dev/null || die "missing ${missing[*]} and no apt-get to install them"
	export DEBIAN_FRONTEND=noninteractive
	note "installing ${missing[*]}"
	apt-get install -y -q "${missing[@]}" >/dev/null ||
		{ apt-get update -q >/dev/null && apt-get install -y -q "${missing[@]}" >/dev/null; } ||
		die "could not install ${missing[*]}"
	for pair in "$@"; do
		command -v "${pair%%:*}" >/dev/null || die "${pair%%:*} is still missing after apt-get install"
	done
}

# Writes dirty pages back and, when DROP_CACHES=1, empties the page cache.
drop_caches() {
	sync
	[ "$DROP_CACHES" = 1 ] && echo 3 >/proc/sys/vm/drop_caches
	return 0
}

# A size as people write it ("64k", "1GiB", "4096") in bytes.
bytes() { # SIZE
	local s=${1%B}
	numfmt --from=iec-i "$s" 2>/dev/null || numfmt --from=iec "${s^^}" 2>/dev/null ||
		die "cannot parse size '$1'"
}

# Sets BIN to the tidemark binary to measure: TIDEMARK_BIN, else a release
# build of this checkout (the caller is at its root).
tidemark_binary() {
	if [ -n "${TIDEMARK_BIN:-}" ]; then
		BIN="$TIDEMARK_BIN"
	else
		command -v cargo >/dev/null || die "cargo is not installed (install Rust with rustup), or set TIDEMARK_BIN"
		note "building tidemark (release)"
		cargo build --release -q -p tidemark
		BIN="${CARGO_TARGET_DIR:-$PWD/target}/release/tidemark"
	fi
	[ -x "$BIN" ] || die "no tidemark binary at $BIN"
}

# The caller's PIDS array lists the processes it started and must stop.
forget_pid() { # PID
	local keep=() p
	for p in "${PIDS[@]}"; do [ "$p" = "$1" ] || keep+=("$p"); done
	PIDS=("${keep[@]}")
}

# Stops a process the script started: SIGTERM, then SIGKILL after 60 s;
# it leaves PIDS.
stop_pid() { # PID
	local pid=$1
	kill -TERM "$pid" 2>/dev/null || true
	for _ in $(seq 600); do
		kill -0 "$pid" 2>/dev/null || break
		sleep 0.1
	done
	if kill -0 "$pid" 2>/dev/null; then
		note "process $pid did not stop in 60 s; killing it"
		kill -KILL "$pid" 2>/dev/null || true
	fi
	wait "$pid" 2>/dev/null || true
	forget_pid "$pid"
}

# Enrols HOST with a new receiver CA in DIR, as an admin would: DIR/receiver
# is the receiver's PKI directory, DIR/host the host's (with ca.crt).
enrol() { # DIR HOST
	local dir=$1 host=$2
	mkdir -p "$dir"
	"$BIN" receiver init --pki-dir "$dir/receiver" >/dev/null
	"$BIN" host request --host "$host" --pki-dir "$dir/host" >/dev/null
	"$BIN" receiver sign --pki-dir "$dir/receiver" --host "$host" \
		--csr "$dir/host/host.csr" --out "$dir/host/host.crt" >/dev/null
	cp "$dir/receiver/ca.crt" "$dir/host/ca.crt"
}

# bench_workspace PREFIX NEED_BYTES: checks that $BASE (made absolute) has
# NEED_BYTES free; makes WORK under it and SOCKDIR under /tmp (unix socket
# paths are limited to 108 bytes); at exit stops every process in PIDS and
# removes both (KEEP=1 keeps WORK).
bench_workspace() {
	local prefix=$1 need=$2 avail
	mkdir -p "$BASE"
	BASE="$(cd "$BASE" && pwd)"
	avail=$(($(df -P -B1 "$BASE" | awk 'NR==2 {print $4}')))
	[ "$avail" -ge "$need" ] || die "$BASE has $((avail >> 20)) MiB free; needs about $((need >> 20)) MiB"
	WORK="$(mktemp -d "$BASE/$prefix.XXXXXX")"
	SOCKDIR="$(mktemp -d "/tmp/tm$prefix.XXXXXX")"
	PIDS=()
	trap bench_cleanup EXIT
	trap 'exit 130' INT TERM
}

bench_cleanup() {
	local pid
	for pid in "${PIDS[@]}"; do stop_pid "$pid"; done
	rm -rf "$SOCKDIR"
	if [ "${KEEP:-0}" = 1 ]; then
		note "kept $WORK"
	else
		rm -rf "$WORK"
	fi
}

# wait_line FILE PREFIX PID: waits until FILE has a line starting with
# PREFIX (the process PID still running), 60 s at most.
wait_line() {
	local file=$1 prefix=$2 pid=$3
	for _ in $(seq 600); do
		grep -q "^$prefix" "$file" 2>/dev/null && return 0
		kill -0 "$pid" 2>/dev/null || break
		sleep 0.1
	done
	cat "${file%.out}.err" >&2 2>/dev/null || true
	die "no '$prefix' from pid $pid (see ${file%.out}.err)"
}

# start_receiver DIR: a receiver on a free loopback port with its replicas
# in DIR/replicas, enrolled by `enrol "$PKI"`; sets RECEIVER_PID and
# RECEIVER_ADDR once it is ready.
start_receiver() {
	local dir=$1
	TIDEMARK_LOG=warn "$BIN" receiver serve --listen 127.0.0.1:0 --data-dir "$dir/replicas" \
		--pki-dir "$PKI/receiver" >"$dir/receiver.out" 2>"$dir/receiver.err" &
	RECEIVER_PID=$!
	PIDS+=("$RECEIVER_PID")
	wait_line "$dir/receiver.out" "receiver ready on" "$RECEIVER_PID"
	RECEIVER_ADDR="$(sed -n 's/^receiver ready on //p' "$dir/receiver.out")"
}

# start_tracker IMAGE DIR: the tracker serving IMAGE as export "disk" on
# $SOCKDIR/tracker.sock, its log in DIR/log; sets TRACKER_PID once it is
# ready.
start_tracker() {
	local image=$1 dir=$2
	TIDEMARK_LOG=warn "$BIN" tracker serve --image "$image" --name disk \
		--socket "$SOCKDIR/tracker.sock" --log-dir "$dir/log" >"$dir/tracker.out" 2>"$dir/tracker.err" &
	TRACKER_PID=$!
	PIDS+=("$TRACKER_PID")
	wait_line "$dir/tracker.out" "tracker ready" "$TRACKER_PID"
}
