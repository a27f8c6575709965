#!/usr/bin/env python3
"""Prints the tables of scripts/bench-tracker.sh from what its runs left.

Usage: bench-tracker-report.py MANIFEST PROFILES MEMORY CLK_TCK MEM_IMAGE MEM_IO
  MANIFEST: lines "workload<TAB>server<TAB>fio.json<TAB>status.json-or-empty<TAB>run dir"
            (the run dir holds `window`, `perf-stat` and `end` of the server)
  PROFILES: lines "server<TAB>dir" (dir holds report.txt, threads.txt)
  MEMORY:   lines "server<TAB>dir" (dir holds fio.json and `end`)

Plain json only: runs under any python3.
"""

import json
import os
import sys

SEQ_WORKLOAD = "write-1m-qd8"
BUDGET_MIB = 128


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
        "bytes": d["io_bytes"],
        "p99_us": p99 / 1000 if p99 is not None else None,
        "syncs": job.get("sync", {}).get("total_ios", 0),
    }


def samples(path):
    """Lines of "time ticks ctxsw hwm_kib" written by sample_process."""
    try:
        with open(path) as f:
            return [[float(x) for x in line.split()] for line in f if line.strip()]
    except OSError:
        return []


def perf_count(path):
    try:
        with open(path) as f:
            for line in f:
                parts = line.strip().split(",")
                if len(parts) > 2 and parts[2].startswith("raw_syscalls:sys_enter"):
                    return float(parts[0])
    except (OSError, ValueError):
        pass
    return None


def costs(run_dir, iops, clk_tck):
    """CPU µs, context switches and syscalls per request over the measured
    window, and the peak RSS in MiB; None where not measured."""
    out = {"cpu_us": None, "ctx": None, "sys": None, "rss_mib": None, "busiest": None}
    if not run_dir:
        return out
    win = samples(os.path.join(run_dir, "window"))
    if len(win) == 2 and iops > 0:
        (t0, k0, c0, _), (t1, k1, c1, _) = win
        reqs = iops * (t1 - t0)
        if reqs > 0:
            out["cpu_us"] = (k1 - k0) / clk_tck * 1e6 / reqs
            out["ctx"] = (c1 - c0) / reqs
            n = perf_count(os.path.join(run_dir, "perf-stat"))
            if n is not None:
                out["sys"] = n / reqs
    end = samples(os.path.join(run_dir, "end"))
    if end:
        out["rss_mib"] = end[-1][3] / 1024
    out["busiest"] = busiest_thread(os.path.join(run_dir, "threads"), clk_tck)
    return out


def busiest_thread(path, clk_tck):
    """(name, share of one CPU) of the thread that ran most over the
    measured window, from two samples per thread written by
    sample_threads: a share near 1.0 means the server is bound by that
    one thread's CPU, a lower one that it waits (for the client, the
    device or another thread)."""
    first, best = {}, None
    try:
        with open(path) as f:
            for line in f:
                parts = line.split(None, 3)
                if len(parts) < 3:
                    continue
                t, tid, ticks = float(parts[0]), parts[1], float(parts[2])
                name = parts[3].strip() if len(parts) > 3 else tid
                if tid not in first:
                    first[tid] = (t, ticks)
                    continue
                t0, k0 = first[tid]
                if t > t0:
                    share = (ticks - k0) / clk_tck / (t - t0)
                    if best is None or share > best[1]:
                        best = (name, share)
    except (OSError, ValueError):
        return None
    return best


def tracker_note(path):
    if not path:
        return ""
    try:
        with open(path) as f:
            st = json.load(f)
    except (OSError, ValueError):
        return "status unreadable"
    hot = sum(d.get("hot_extents", 0) for d in st.get("disks", []))
    note = f"{st['tracking']} mode, {st['barriers']} barriers, log {st['log_bytes'] >> 20} MiB, {hot} hot"
    if st.get("bitmap_reason"):
        note += f" (bitmap: {st['bitmap_reason']})"
    return note


def mode(server):
    """The tracker's cache mode a server name stands for, if it is one."""
    if server == "tracker-writeback":
        return "writeback"
    if server.startswith("tracker-"):
        return "none"
    return None


def fmt(value, spec, missing="-"):
    return missing if value is None else format(value, spec)


def busy(b):
    return "-" if b is None else f"{b[0][:15]} {b[1] * 100:.0f}%"


def ratio(a, b):
    return a / b if a is not None and b else None


def main():
    manifest, profiles, memory, clk_tck = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
    mem_image, mem_io = sys.argv[5], sys.argv[6]
    rows = []
    with open(manifest) as f:
        for line in f:
            wl, srv, fio_json, status, run_dir = (line.rstrip("\n").split("\t") + ["", ""])[:5]
            fig = figures(fio_json)
            fig.update(costs(run_dir if srv != "bare" else "", fig["iops"], clk_tck))
            rows.append((wl, srv, fig, tracker_note(status)))
    by = {(wl, srv): fig for wl, srv, fig, _ in rows}

    head = (f"{'workload':<26} {'server':<18} {'IOPS':>8} {'MB/s':>7} {'p99 µs':>7} "
            f"{'/bare':>6} {'/nbdkit':>7} {'/qemu':>6} {'CPU µs/req':>10} {'ctxsw/req':>9} "
            f"{'sys/req':>7} {'RSS MiB':>7} {'busiest thread':>22}  notes")
    print(head)
    print("-" * len(head))
    last = None
    for wl, srv, fig, note in rows:
        if last is not None and wl != last:
            print()
        last = wl
        bare = by.get((wl, "bare"), {}).get("iops")
        nbdkit = by.get((wl, "nbdkit"), {}).get("iops")
        qemu = by.get((wl, "qemu-nbd"), {}).get("iops")
        if fig["syncs"]:
            note = f"{fig['syncs']} flushes; " + note if note else f"{fig['syncs']} flushes"
        print(f"{wl:<26} {srv:<18} {fig['iops']:>8.0f} {fig['mbs']:>7.1f} {fmt(fig['p99_us'], '.0f'):>7} "
              f"{fmt(ratio(fig['iops'], bare), '.2f'):>6} {fmt(ratio(fig['iops'], nbdkit), '.2f'):>7} "
              f"{fmt(ratio(fig['iops'], qemu), '.2f'):>6} {fmt(fig['cpu_us'], '.1f'):>10} "
              f"{fmt(fig['ctx'], '.2f'):>9} {fmt(fig['sys'], '.2f'):>7} {fmt(fig['rss_mib'], '.0f'):>7} "
              f"{busy(fig['busiest']):>22}  {note}")

    print()
    bare_seq = by.get((SEQ_WORKLOAD, "bare"))
    bound = bare_seq["mbs"] / 2 if bare_seq else None
    if bound:
        print(f"bare device, fio io_uring 1M QD8 O_DIRECT sequential write: {bare_seq['mbs']:.1f} MB/s; "
              f"double-write bound (image + log on the same device): {bound:.1f} MB/s")

    goals = []

    def goal(text, value, target, higher=True):
        if value is None:
            goals.append((text, "not measured", "-"))
            return
        met = value >= target if higher else value <= target
        goals.append((text, f"{value:.2f}x (goal {'>=' if higher else '<='} {target:.2f}x)",
                      "met" if met else "MISSED"))

    for wl, srv, fig, _ in rows:
        m = mode(srv)
        if m is None:
            continue
        if m == "writeback" and wl in ("randwrite-4k-qd1", "randwrite-4k-qd32", "randwrite-4k-qd32-fsync32"):
            ref = by.get((wl, "nbdkit"), {}).get("iops")
            goal(f"{srv}: {wl} IOPS vs nbdkit", ratio(fig["iops"], ref), 0.9)
        if m == "none" and wl in ("randwrite-4k-qd1", "randwrite-4k-qd32"):
            ref = by.get((wl, "qemu-nbd"), {}).get("iops")
            goal(f"{srv}: {wl} IOPS vs qemu-nbd (O_DIRECT)", ratio(fig["iops"], ref), 1.0)
        if m == "none" and wl == "randwrite-4k-qd32":
            ref = by.get((wl, "qemu-nbd"), {}).get("cpu_us")
            goal(f"{srv}: {wl} CPU per request vs qemu-nbd", ratio(fig["cpu_us"], ref), 1.2, higher=False)
        if wl == SEQ_WORKLOAD:
            goal(f"{srv}: {wl} MB/s vs the double-write bound", ratio(fig["mbs"], bound),
                 0.9 if m == "writeback" else 0.8)

    mem_rows = []
    if os.path.exists(memory):
        with open(memory) as f:
            for line in f:
                srv, run_dir = line.rstrip("\n").split("\t")[:2]
                end = samples(os.path.join(run_dir, "end"))
                fig = figures(os.path.join(run_dir, "fio.json"))
                rss = end[-1][3] / 1024 if end else None
                mem_rows.append((srv, rss, fig, tracker_note(os.path.join(run_dir, "status.json"))))
                goals.append((f"{srv}: peak RSS under 1M QD32 writes to a {mem_image} sparse image",
                              f"{fmt(rss, '.0f')} MiB (goal < {BUDGET_MIB} MiB)",
                              "met" if rss is not None and rss < BUDGET_MIB else "MISSED"))

    if goals:
        print()
        print("goals")
        for text, value, verdict in goals:
            print(f"  {verdict:<12} {text}: {value}")

    if mem_rows:
        print()
        print(f"memory: fio 1 MiB random writes, QD32, {mem_io} in all, to a {mem_image} sparse image")
        for srv, rss, fig, note in mem_rows:
            print(f"  {srv:<18} peak RSS {fmt(rss, '.1f')} MiB; {fig['bytes'] / 1e9:.2f} GB written at {fig['mbs']:.0f} MB/s; {note}")

    if os.path.exists(profiles):
        with open(profiles) as f:
            for line in f:
                srv, run_dir, wl = (line.rstrip("\n").split("\t") + ["", "", "randwrite-4k-qd32"])[:3]
                print()
                print(f"where the time goes: {srv} under {wl} (perf record -g; self time by symbol, then by thread)")
                for name in ("report.txt", "threads.txt"):
                    try:
                        with open(os.path.join(run_dir, name)) as r:
                            for text in r:
                                print("  " + text.rstrip())
                    except OSError:
                        print("  (no profile)")


if __name__ == "__main__":
    main()
