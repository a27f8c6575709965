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
