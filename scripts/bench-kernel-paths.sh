#!/usr/bin/env bash
# Write performance of the kernel paths into a disk, side by side, in a
# Debian kernel under qemu (scripts/kernel-vm.sh; guest side:
# scripts/vm-scenarios/bench-kernel-paths.sh):
#   dm-linear  a plain device-mapper linear map over the disk
#   nbd        the disk behind the tracker, attached as /dev/nbdN over
#              netlink (`tidemark tracker serve --attach`), logging every
#              write
#   ublk       the same tracker serving the disk as /dev/ublkbN
#              (`tidemark tracker serve --ublk`)
# The disk is a loop device over a filled file on the guest's tmpfs.
# Workloads (fio in the guest, libaio, O_DIRECT): randwrite-4k (4 KiB
# random writes, IODEPTH 16) and seqwrite-1m (1 MiB sequential writes,
# SEQ_IODEPTH 1), RUNTIME seconds each (default 8); the tracker's runs stop
# early after IO_CAP_MB (288) written, to keep the log in guest memory.
#
# The guest runs under TCG (software CPU emulation, sharing the host's
# cores with whatever else runs): absolute figures are meaningless, the
# ratios to dm-linear are the result (above 1: faster than dm-linear).
# Also printed: the tracker process's CPU time per request (user + system
# from /proc/PID/stat over each fio run) on the nbd and ublk paths of the
# same run, the fairer comparison of the two under TCG, where CPU per
# request dominates. The ublk figure includes the driver's delivery work
# (task work of the tracker's queue threads); the nbd figure does not
# include the kernel nbd client's socket sends.
#
# Usage: scripts/bench-kernel-paths.sh   (as root, from anywhere)
# Environment:
#   PROFILE       which tidemark to run in the guest:
#                   release (default) target/release/tidemark if present,
#                           else `cargo build --release -p tidemark`
#                   debug   `cargo build -p tidemark` (dependencies at
#                           opt-level 2, Tidemark's own crates at 0)
#                   dev-o2  the dev profile with opt-level 2 for Tidemark's
#                           crates too (CARGO_PROFILE_DEV_OPT_LEVEL=2): reuses
#                           a debug build's dependencies, so it is minutes
#                           where a fresh release build is much longer;
#                           debug assertions stay on
#                 debug and dev-o2 binaries are stripped of debug info
#                 (objcopy --strip-debug) before going into the initramfs.
#   TIDEMARK_BIN  a tidemark binary to use as is (PROFILE is then ignored)
#   RUNTIME, IODEPTH, SEQ_IODEPTH, DISK_MB, IO_CAP_MB  passed to the guest
#   TIMEOUT       the VM's time limit in seconds (default 600)
#   CONSOLE       keep the guest console in this file
#   TIDEMARK_VM_CACHE  the kernel cache of scripts/kernel-vm.sh
# Needs: qemu-system-x86_64, busybox-static, kmod, dmsetup, e2fsprogs
# (scripts/kernel-vm.sh install), fio, util-linux losetup, binutils.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
BENCH_NAME=bench-kernel-paths
# shellcheck source=scripts/lib/bench-common.sh
source scripts/lib/bench-common.sh

PROFILE=${PROFILE:-release}
RUNTIME=${RUNTIME:-8}
IODEPTH=${IODEPTH:-16}
SEQ_IODEPTH=${SEQ_IODEPTH:-1}
DISK_MB=${DISK_MB:-96}
IO_CAP_MB=${IO_CAP_MB:-288}
TIMEOUT=${TIMEOUT:-600}
target=${CARGO_TARGET_DIR:-target}

[ "$(id -u)" -eq 0 ] || die "run as root (the kernel harness installs packages and boots qemu)"
ensure_commands fio:fio losetup:mount objcopy:binutils
command -v qemu-system-x86_64 >/dev/null && [ -x /bin/busybox ] ||
	scripts/kernel-vm.sh install

work=$(mktemp -d "${TMPDIR:-/tmp}/bench-kernel-paths.XXXXXX")
trap 'rm -rf "$work"' EXIT

# The binary, named tidemark in $work/bin (the guest calls it by name).
mkdir -p "$work/bin"
strip_into_work() {
	objcopy --strip-debug "$1" "$work/bin/tidemark" || die "objcopy --strip-debug $1 failed"
}
if [ -n "${TIDEMARK_BIN:-}" ]; then
	[ -x "$TIDEMARK_BIN" ] || die "TIDEMARK_BIN=$TIDEMARK_BIN is not an executable"
	cp "$TIDEMARK_BIN" "$work/bin/tidemark"
	bin_note="given binary $TIDEMARK_BIN"
else
	case $PROFILE in
	release)
		if [ -x "$target/release/tidemark" ]; then
			note "using the existing $target/release/tidemark (delete it to rebuild)"
		else
			note "cargo build --release -p tidemark (a fresh release build takes long on a small machine; PROFILE=dev-o2 is the quicker near-release alternative)"
			cargo build --release -q -p tidemark || die "cargo build --release failed"
		fi
		cp "$target/release/tidemark" "$work/bin/tidemark"
		bin_note="release"
		;;
	debug)
		note "cargo build -p tidemark (debug: Tidemark's own crates unoptimised)"
		cargo build -q -p tidemark || die "cargo build failed"
		strip_into_work "$target/debug/tidemark"
		bin_note="debug(deps-opt2,tidemark-opt0,stripped)"
		;;
	dev-o2)
		note "cargo build -p tidemark with CARGO_PROFILE_DEV_OPT_LEVEL=2 (not a release build)"
		CARGO_PROFILE_DEV_OPT_LEVEL=2 cargo build -q -p tidemark || die "cargo build failed"
		strip_into_work "$target/debug/tidemark"
		bin_note="dev-o2(opt-level2,debug-assertions,stripped)"
		;;
	*) die "PROFILE must be release, debug or dev-o2, not $PROFILE" ;;
	esac
fi
"$work/bin/tidemark" tracker serve --help | grep -q -- '--ublk' ||
	die "this tidemark has no 'tracker serve --ublk'"
note "tidemark for the guest: $bin_note"
[ "$bin_note" = release ] || note "NOTE: not a release build ($bin_note): the nbd and ublk figures understate a release tracker"

console=${CONSOLE:-$work/console.log}
t0=$SECONDS
rc=0
scripts/kernel-vm.sh run scripts/vm-scenarios/bench-kernel-paths.sh \
	--bin "$(command -v fio)" --bin "$work/bin/tidemark" --bin "$(command -v losetup)" \
	--env RUNTIME="$RUNTIME" --env IODEPTH="$IODEPTH" --env SEQ_IODEPTH="$SEQ_IODEPTH" \
	--env DISK_MB="$DISK_MB" --env IO_CAP_MB="$IO_CAP_MB" --env BIN_NOTE="$bin_note" \
	--timeout "$TIMEOUT" --console "$console" > "$work/vm.out" 2>&1 || rc=$?
took=$((SECONDS - t0))
grep -a -E '^TIDEMARK-VM-INFO bench|^TIDEMARK-VM-(PASS|FAIL)' "$work/vm.out" || true
if [ $rc -ne 0 ]; then
	cat "$work/vm.out"
	die "the guest benchmark failed (VM wall time $took s)"
fi

echo
echo "Kernel write paths in a Debian $(sed -n 's/.*bench setup: kernel \([^,]*\),.*/\1/p' "$work/vm.out" | head -n 1) guest under qemu TCG"
echo "(tidemark: $bin_note; VM wall time $took s incl. boot; TCG: compare ratios, not absolutes)"
awk '
	/^TIDEMARK-VM-INFO bench tracker / {
		for (i = 4; i <= NF; i++) { split($i, kv, "="); g[kv[1]] = kv[2] }
		lat[g["workload"] SUBSEP g["path"]] = g["write-latency-ms"]
	}
	/^TIDEMARK-VM-INFO bench cpu / {
		for (i = 4; i <= NF; i++) { split($i, kv, "="); c[kv[1]] = kv[2] }
		cpu[c["workload"] SUBSEP c["path"]] = c["cpu-us-per-request"]
	}
	/^TIDEMARK-VM-INFO bench result / {
		for (i = 4; i <= NF; i++) { split($i, kv, "="); f[kv[1]] = kv[2] }
		k = f["workload"] SUBSEP f["path"]
		iops[k] = f["iops"]; mbps[k] = f["mbps"]; ms[k] = f["runtime-ms"]; mb[k] = f["written-mb"]
		if (!(f["workload"] in seen)) { seen[f["workload"]] = 1; order[++n] = f["workload"] }
	}
	function r(a, b) { return b > 0 ? sprintf("%.2f", a / b) : "n/a" }
	END {
		printf "%-13s | %19s | %19s | %19s | %-14s | %-14s | %-14s\n", "", "dm-linear", "nbd (netlink)", "ublk", "nbd/dm-linear", "ublk/dm-linear", "ublk/nbd"
		printf "%-13s | %7s %11s | %7s %11s | %7s %11s | %6s %7s | %6s %7s | %6s %7s\n", "workload", "IOPS", "MB/s", "IOPS", "MB/s", "IOPS", "MB/s", "IOPS", "MB/s", "IOPS", "MB/s", "IOPS", "MB/s"
		for (i = 1; i <= n; i++) {
			w = order[i]; d = w SUBSEP "dm-linear"; b = w SUBSEP "nbd"; u = w SUBSEP "ublk"
			printf "%-13s | %7d %11.1f | %7d %11.1f | %7d %11.1f | %6s %7s | %6s %7s | %6s %7s\n", w,
				iops[d], mbps[d], iops[b], mbps[b], iops[u], mbps[u],
				r(iops[b], iops[d]), r(mbps[b], mbps[d]), r(iops[u], iops[d]), r(mbps[u], mbps[d]),
				r(iops[u], iops[b]), r(mbps[u], mbps[b])
		}
		printf "run lengths: "
		for (i = 1; i <= n; i++) {
			w = order[i]
			printf "%s dm-linear %d ms/%d MB, nbd %d ms/%d MB, ublk %d ms/%d MB%s", w,
				ms[w SUBSEP "dm-linear"], mb[w SUBSEP "dm-linear"], ms[w SUBSEP "nbd"], mb[w SUBSEP "nbd"],
				ms[w SUBSEP "ublk"], mb[w SUBSEP "ublk"], i < n ? "; " : "\n"
		}
		printf "tracker CPU per request (user + system of the tracker process over the run, /proc/PID/stat):"
		for (i = 1; i <= n; i++) {
			w = order[i]
			printf " %s nbd %s us, ublk %s us%s", w, ((w, "nbd") in cpu) ? cpu[w, "nbd"] : "n/a",
				((w, "ublk") in cpu) ? cpu[w, "ublk"] : "n/a", i < n ? ";" : "\n"
		}
		printf "tracker write latency (backing write + log append, its metrics), mean per write:"
		for (i = 1; i <= n; i++) {
			w = order[i]
			printf " %s nbd %s ms, ublk %s ms%s", w, ((w, "nbd") in lat) ? lat[w, "nbd"] : "n/a",
				((w, "ublk") in lat) ? lat[w, "ublk"] : "n/a", i < n ? ";" : "\n"
		}
	}' "$work/vm.out"
