#!/usr/bin/env bash
# Change-log append throughput against fio, on the same filesystem.
#
# For records of 4 KiB and 64 KiB with a barrier every 1, 32 and 1024
# records, runs the `append` bench of tidemark-changelog and then fio writing
# the same payload bytes with the same fdatasync pattern to a file in the same
# directory, and prints both, their ratio, and whether the log reaches the
# goal of 0.9x fio.
#
# The fio job mirrors what the log does:
#   --rw=write --bs=<record size>   sequential writes of one record's payload
#   --ioengine=psync                one pwrite per write, through the page cache
#   --fdatasync=<k>                 one fdatasync every k writes (the barrier)
#   --end_fsync=1                   the final sync (counted in fio's runtime)
#   --fallocate=native              the log preallocates its segments with
#                                   fallocate(2) (mode 0), so fio's file is
#                                   preallocated the same way and both pay the
#                                   unwritten-extent conversion at fdatasync.
#                                   fio lays its file out before its clock
#                                   starts; the log's first segment is created
#                                   before its clock starts too, but the later
#                                   segments' creation (every 64 MiB) is timed:
#                                   a running tracker pays it.
# Each case runs both tools back to back, alternating which goes first, and
# REPEATS times (default 3); the table shows the medians.
#
# Usage: scripts/bench-log.sh
#   from any directory; needs cargo, and fio and python3, which it installs
#   with apt-get when missing (as root). Takes about 2 minutes on an idle
#   2-CPU VM; other I/O on the same disk skews the figures, so the load
#   average is printed and the per-run ratios shown beside the medians.
# Environment:
#   REPEATS=N                runs per case and tool (default 3)
#   TIDEMARK_BENCH_DIR=PATH  where the files go (default target/bench-tmp);
#                            this picks the filesystem being measured
#   TIDEMARK_BENCH_BYTES=SZ  payload bytes per case for both tools, e.g.
#                            64MiB (default: the bench's per-case sizes)
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

REPEATS="${REPEATS:-3}"
BASE="${TIDEMARK_BENCH_DIR:-$PWD/target/bench-tmp}"
RECORD_SIZES=(4096 65536)
BARRIER_EVERY=(1 32 1024)

BENCH_NAME=bench-log
# shellcheck source=scripts/lib/bench-common.sh
source scripts/lib/bench-common.sh

[[ "$REPEATS" =~ ^[1-9][0-9]*$ ]] || die "REPEATS must be a positive integer, not '$REPEATS'"
command -v cargo >/dev/null || die "cargo is not installed (install Rust with rustup)"
ensure_commands fio:fio python3:python3

echo "bench-log: building the append bench (release)" >&2
bench_bin="$(
	cargo bench -p tidemark-changelog --bench append --no-run --message-format=json-render-diagnostics |
		python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "append" and m.get("executable"):
        print(m["executable"])
'
)"
[ -x "$bench_bin" ] || die "could not find the built bench executable"

mkdir -p "$BASE"
work="$(mktemp -d "$BASE/bench-log.XXXXXX")"
trap 'rm -rf "$work"' EXIT
results="$work/results"
mkdir "$results"

fs="$(findmnt -n -o SOURCE,FSTYPE,OPTIONS -T "$work" 2>/dev/null || echo unknown)"
echo "bench-log: $work on $fs; $(nproc) CPUs; $(fio --version); $REPEATS run(s) per case" >&2
# The figures are only as good as the machine is quiet: show the load and
# what else is writing to the disk, and warn when something is.
disk_stat="/sys/class/block/$(basename "$(readlink -f "$(findmnt -n -o SOURCE -T "$work" 2>/dev/null || true)" 2>/dev/null || true)")/stat"
other_writes() { # seconds -> write requests completed on the disk meanwhile
	[ -r "$disk_stat" ] || { echo "?"; return; }
	local before after
	before="$(awk '{print $5}' "$disk_stat")"
	sleep "$1"
	after="$(awk '{print $5}' "$disk_stat")"
	echo $((after - before))
}
idle_writes="$(other_writes 3)"
echo "bench-log: load average $(cut -d' ' -f1-3 /proc/loadavg); other writes to the disk in the last 3 s: $idle_writes" >&2
if [[ "$idle_writes" =~ ^[0-9]+$ ]] && ((idle_writes > 30)); then
	echo "bench-log: WARNING: something else is writing to this disk; the figures will be noisy" >&2
fi

bytes_args=()
[ -n "${TIDEMARK_BENCH_BYTES:-}" ] && bytes_args=(--bytes "$TIDEMARK_BENCH_BYTES")

run_tidemark() { # size every rep
	"$bench_bin" --bench --json --dir "$work" --record-size "$1" --barrier-every "$2" "${bytes_args[@]}" \
		>"$results/tidemark-$1-$2-$3.json"
}

run_fio() { # size every rep payload-bytes
	fio --name="append-$1-$2" --filename="$work/fio.dat" \
		--rw=write --bs="$1" --size="$4" --fdatasync="$2" \
		--ioengine=psync --end_fsync=1 --fallocate=native \
		--output-format=json --output="$results/fio-$1-$2-$3.json" >/dev/null
	rm -f "$work/fio.dat"
	# As the bench does after each case: commit the unlink (and, with
	# -o discard, its discards) before the next run starts.
	sync
}

payload_bytes() { # size every
	python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))["cases"][0]["payload_bytes"])' \
		"$results/tidemark-$1-$2-1.json"
}

for rep in $(seq 1 "$REPEATS"); do
	for size in "${RECORD_SIZES[@]}"; do
		for every in "${BARRIER_EVERY[@]}"; do
			echo "bench-log: run $rep/$REPEATS: $((size / 1024)) KiB records, barrier every $every" >&2
			# The first run goes tidemark-first to learn the case's byte
			# count; later runs alternate the order to cancel any bias.
			if ((rep % 2 == 1)); then
				run_tidemark "$size" "$every" "$rep"
				run_fio "$size" "$every" "$rep" "$(payload_bytes "$size" "$every")"
			else
				run_fio "$size" "$every" "$rep" "$(payload_bytes "$size" "$every")"
				run_tidemark "$size" "$every" "$rep"
			fi
		done
	done
done

echo "bench-log: load average after: $(cut -d' ' -f1-3 /proc/loadavg); other writes in 3 s: $(other_writes 3)" >&2

python3 - "$results" "$REPEATS" "${RECORD_SIZES[*]}" "${BARRIER_EVERY[*]}" <<'EOF'
import json, statistics, sys

results, repeats = sys.argv[1], int(sys.argv[2])
sizes = [int(s) for s in sys.argv[3].split()]
everies = [int(k) for k in sys.argv[4].split()]
GOAL = 0.9

rows = []
for size in sizes:
    for every in everies:
        tm, fio, ratios, recs, iops = [], [], [], [], []
        for rep in range(1, repeats + 1):
            t = json.load(open(f"{results}/tidemark-{size}-{every}-{rep}.json"))["cases"][0]
            f = json.load(open(f"{results}/fio-{size}-{every}-{rep}.json"))["jobs"][0]["write"]
            if f["io_bytes"] != t["payload_bytes"]:
                sys.exit(f"fio wrote {f['io_bytes']} bytes, the log {t['payload_bytes']}")
            fio_mbs = f["io_bytes"] / (f["runtime"] / 1000) / 1e6
            tm.append(t["mb_per_s"])
            fio.append(fio_mbs)
            ratios.append(t["mb_per_s"] / fio_mbs)
            recs.append(t["records_per_s"])
            iops.append(f["iops"])
        rows.append({
            "case": f"{size // 1024} KiB / barrier every {every}",
            "bytes": t["payload_bytes"],
            "tm": statistics.median(tm),
            "fio": statistics.median(fio),
            "ratio": statistics.median(ratios),
            "ratios": ratios,
            "recs": statistics.median(recs),
            "iops": statistics.median(iops),
        })

print()
print(f"median of {repeats} run(s); MB = 10^6 bytes of payload; ratio = median of per-run tidemark/fio")
hdr = f"{'case':<27} {'payload':>8} {'tidemark MB/s':>14} {'fio MB/s':>9} {'ratio':>6}  {'tidemark rec/s':>14} {'fio IOPS':>9}  per-run ratios"
print(hdr)
print("-" * len(hdr))
for r in rows:
    per_run = " ".join(f"{x:.2f}" for x in r["ratios"])
    print(f"{r['case']:<27} {r['bytes'] >> 20:>5}MiB {r['tm']:>14.1f} {r['fio']:>9.1f} {r['ratio']:>6.2f}  "
          f"{r['recs']:>14.0f} {r['iops']:>9.0f}  {per_run}")
print()
for r in rows:
    verdict = "meets" if r["ratio"] >= GOAL else "BELOW"
    print(f"{verdict} the >= {GOAL}x fio goal: {r['case']} ({r['ratio']:.2f}x)")
EOF
