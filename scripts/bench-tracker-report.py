#!/usr/bin/env python3
"""Prints the table of scripts/bench-tracker.sh from fio's JSON output.

Usage: bench-tracker-report.py MANIFEST RAW_JSON
  MANIFEST: lines "workload<TAB>server<TAB>fio.json<TAB>status.json-or-empty"
  RAW_JSON: fio's sequential O_DIRECT write of the bare filesystem.

Plain json only: runs under any python3.
"""

import json
import sys

REFERENCE = "nbdkit"
SEQ_WORKLOAD = "write-1m-qd8"
GOAL_RANDWRITE = 0.9  # x nbdkit's 4k random-write IOPS
GOAL_SEQ = 0.9  # within 10 % of the double-write bound


def direction(job):
    """The data direction that did I/O (write or read)."""
    w, r = job["write"], job["read"]
    return w if w["total_ios"] >= r["total_ios"] else r


def figures(path):
    with open(path) as f:
        data = json.load(f)
    job = data["jobs"][0]
    if job.get("error"):
        raise SystemExit(f"{path}: fio reported error {job['error']}")
    d = direction(job)
    lat = d.get("lat_ns", {}).get("percentile") or d.get("clat_ns", {}).get("percentile") or {}
    p99 = lat.get("99.000000")
    return {
        "iops": d["iops"],
        "mbs": d["bw_bytes"] / 1e6,
        "p99_us": p99 / 1000 if p99 is not None else None,
        "syncs": job.get("sync", {}).get("total_ios", 0),
    }


def tracker_note(path):
    if not path:
        return ""
    try:
        with open(path) as f:
            st = json.load(f)
    except (OSError, ValueError):
        return "status unreadable"
    hot = sum(d.get("hot_extents", 0) for d in st.get("disks", []))
    note = f"{st['tracking']} mode, {st['barriers']} barriers, log {st['log_bytes'] >> 20} MiB, {hot} hot extents"
    if st.get("bitmap_reason"):
        note += f" (bitmap: {st['bitmap_reason']})"
    return note


def main():
    manifest, raw_json = sys.argv[1], sys.argv[2]
    rows = []
    with open(manifest) as f:
        for line in f:
            wl, srv, fio_json, status = (line.rstrip("\n").split("\t") + [""])[:4]
            rows.append((wl, srv, figures(fio_json), tracker_note(status)))

    ref = {wl: fig["iops"] for wl, srv, fig, _ in rows if srv == REFERENCE}
    head = f"{'workload':<26} {'server':<15} {'IOPS':>9} {'MB/s':>8} {'p99 lat (µs)':>13} {'vs nbdkit':>9}  notes"
    print(head)
    print("-" * len(head))
    last = None
    for wl, srv, fig, note in rows:
        if last is not None and wl != last:
            print()
        last = wl
        r = ref.get(wl)
        ratio = f"{fig['iops'] / r:.2f}x" if r else "-"
        p99 = f"{fig['p99_us']:.0f}" if fig["p99_us"] is not None else "-"
        if fig["syncs"]:
            note = f"{fig['syncs']} flushes; " + note if note else f"{fig['syncs']} flushes"
        print(f"{wl:<26} {srv:<15} {fig['iops']:>9.0f} {fig['mbs']:>8.1f} {p99:>13} {ratio:>9}  {note}")

    raw = figures(raw_json)
    bound = raw["mbs"] / 2
    print()
    print(f"raw sequential write of the filesystem (fio 1M QD8 O_DIRECT): {raw['mbs']:.1f} MB/s")
    print(f"double-write bound for the tracker (image + log on the same device): {bound:.1f} MB/s")
    for wl, srv, fig, _ in rows:
        if wl == SEQ_WORKLOAD and srv.startswith("tracker"):
            ratio = fig["mbs"] / bound
            verdict = "meets" if ratio >= GOAL_SEQ else "misses"
            print(f"  {srv}: {fig['mbs']:.1f} MB/s = {ratio:.2f}x the bound ({verdict} the goal of >= {GOAL_SEQ:.2f}x)")
    print()
    print(f"goal: 4k random write >= {GOAL_RANDWRITE:.1f}x nbdkit's IOPS while logging")
    for wl, srv, fig, _ in rows:
        if wl.startswith("randwrite-4k") and srv.startswith("tracker") and ref.get(wl):
            ratio = fig["iops"] / ref[wl]
            verdict = "meets" if ratio >= GOAL_RANDWRITE else "misses"
            print(f"  {wl:<26} {srv:<15} {ratio:.2f}x ({verdict})")


if __name__ == "__main__":
    main()
