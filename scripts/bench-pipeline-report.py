#!/usr/bin/env python3
"""The table of scripts/bench-pipeline.sh, from the files of its run.

Arguments: MANIFEST CLK_TCK BLOCK_BYTES. The manifest has one line per
measured run: binary label, rate ("ceiling" for the tracker alone, "max"
for unpaced, else MiB/s), and the run's directory, which holds fio.json,
proc.before/proc.after ("name pid ticks VmHWM-KiB" per daemon) and, for the
pipeline's rates, the shipper's metrics before and after (before.prom,
after.prom), the polled lag gauge (lag.samples), the loopback byte counts
(lo.before, lo.after), the drain time (drain) and the tracker's metrics
after the row (tracker.prom).
"""

import json
import math
import sys
from pathlib import Path

MIB = 1 << 20
LAG = "tidemark_shipper_acked_lag_seconds"
P99_GOAL = 1.0
RATIO_GOAL = 0.8
RSS_GOAL_MIB = 256


def samples(path):
    """{(name, labels-text): value} of a Prometheus/OpenMetrics text."""
    out = {}
    p = Path(path)
    if not p.exists():
        return out
    for line in p.read_text().splitlines():
        if not line or line.startswith("#"):
            continue
        parts = line.rsplit(" ", 1)
        if len(parts) != 2:
            continue
        key, value = parts
        name, _, labels = key.partition("{")
        try:
            out[(name, labels.rstrip("}"))] = float(value)
        except ValueError:
            continue
    return out


def one(metrics, name):
    """The value of the first sample called NAME (0 if none)."""
    for (n, _), v in metrics.items():
        if n == name:
            return v
    return 0.0


def lag_buckets(metrics):
    """[(le, cumulative count)] of the lag histogram, ascending."""
    out = []
    for (n, labels), v in metrics.items():
        if n != LAG + "_bucket":
            continue
        for part in labels.split(","):
            k, _, val = part.partition("=")
            if k.strip() == "le":
                le = val.strip('"')
                out.append((math.inf if le == "+Inf" else float(le), v))
    return sorted(out)


def quantile(q, buckets, seen_max=None):
    """histogram_quantile as Prometheus computes it: linear within the
    bucket, the lower bound of the first bucket 0; None without data. One
    difference: in the highest bucket that holds observations the values
    are spread up to SEEN_MAX (the largest lag polled) instead of the
    bucket's bound when that lies inside it, so a p99 in a wide bucket
    (10 to 30 s) is not read as near its top when no lag came near it."""
    if not buckets or buckets[-1][1] <= 0:
        return None
    total = buckets[-1][1]
    rank = q * total
    prev_le, prev_c = 0.0, 0.0
    for le, c in buckets:
        if c >= rank:
            if math.isinf(le):
                return prev_le
            if c == prev_c:
                return le
            if c == total and seen_max is not None and prev_le < seen_max < le:
                le = seen_max
            return prev_le + (le - prev_le) * (rank - prev_c) / (c - prev_c)
        prev_le, prev_c = le, c
    return prev_le


def procs(path):
    """{name: (ticks, hwm_kib)} of a proc sample file."""
    out = {}
    p = Path(path)
    if p.exists():
        for line in p.read_text().splitlines():
            f = line.split()
            if len(f) == 4:
                out[f[0]] = (float(f[2]), float(f[3]))
    return out


def fio_written(path):
    """(bytes written, seconds of the run) from fio's JSON."""
    j = json.loads(Path(path).read_text())
    job = j["jobs"][0]
    return job["write"]["io_bytes"], job["job_runtime"] / 1000.0


def read(path, default=""):
    p = Path(path)
    return p.read_text().strip() if p.exists() else default


def fmt(v, digits=2):
    return "-" if v is None else f"{v:.{digits}f}"


def main():
    manifest, clk_tck = sys.argv[1], float(sys.argv[2])
    rows = []
    ceilings = {}
    for line in Path(manifest).read_text().splitlines():
        label, rate, d = line.split("\t")
        d = Path(d)
        written, secs = fio_written(d / "fio.json")
        mib = written / MIB
        achieved = mib / secs if secs > 0 else 0.0
        before, after = procs(d / "proc.before"), procs(d / "proc.after")
        cpu = {}
        rss = {}
        for name, (ticks, hwm) in after.items():
            t0 = before.get(name, (ticks, 0))[0]
            cpu[name] = (ticks - t0) / clk_tck * 1000 / mib if mib > 0 else None
            rss[name] = hwm / 1024
        tracker = samples(d / "tracker.prom")
        bitmap = any(
            n == "tidemark_tracker_tracking_state" and 'state="bitmap"' in l and v > 0
            for (n, l), v in tracker.items()
        )
        if rate == "ceiling":
            ceilings[label] = (achieved, cpu.get("tracker"), rss.get("tracker"), bitmap)
            continue
        m0, m1 = samples(d / "before.prom"), samples(d / "after.prom")
        b0 = dict(lag_buckets(m0))
        b1 = lag_buckets(m1)
        diff = [(le, c - b0.get(le, 0.0)) for le, c in b1]
        acks = diff[-1][1] if diff else 0
        # The upper bound of the highest bucket that got an observation in
        # this row: no acknowledgement lagged more.
        top = None
        prev = 0.0
        for le, c in diff:
            if c > prev:
                top = le
            prev = c
        lags = []
        for s in read(d / "lag.samples").splitlines():
            f = s.split()
            if len(f) >= 2:
                try:
                    lags.append(float(f[1]))
                except ValueError:
                    pass
        wire = (one(m1, "tidemark_shipper_wire_bytes_total") - one(m0, "tidemark_shipper_wire_bytes_total")) / MIB
        lo = (float(read(d / "lo.after", "0")) - float(read(d / "lo.before", "0"))) / MIB
        drain = read(d / "drain", "timeout")
        rows.append(
            dict(
                label=label,
                rate=rate,
                achieved=achieved,
                mib=mib,
                p50=quantile(0.5, diff, max(lags, default=None)),
                p99=quantile(0.99, diff, max(lags, default=None)),
                max=max(lags) if lags else None,
                top=top,
                acks=int(acks),
                cpu=cpu,
                rss=rss,
                wire=wire,
                lo=lo,
                drain=None if drain == "timeout" else float(drain),
                bitmap=bitmap,
            )
        )

    labels = list(ceilings) or sorted({r["label"] for r in rows})
    print("tracker alone (no shipper), unpaced:")
    for label, (ach, cpu, rss, bitmap) in ceilings.items():
        note = "  (the log filled: bitmap mode)" if bitmap else ""
        print(
            f"  {label:<6} ceiling {ach:7.1f} MiB/s, tracker CPU {fmt(cpu)} ms/MiB, "
            f"RSS {fmt(rss, 0)} MiB{note}"
        )
    print()
    head = (
        f"{'bin':<6} {'offered':>7} {'achieved':>8} {'lag p50':>7} {'p99':>6} {'max':>6} {'max<=':>6} "
        f"{'obs':>6} {'CPU ms/MiB trk/shp/rcv':>23} {'RSS MiB trk/shp/rcv':>19} "
        f"{'wire MiB':>8} {'lo MiB':>7} {'written':>7} {'drain s':>7}"
    )
    print("pipeline (MiB/s; lag in s; wire = shipper frames; lo = loopback bytes):")
    print(head)
    order = {r: i for i, r in enumerate(dict.fromkeys(r["rate"] for r in rows))}
    for r in sorted(rows, key=lambda r: (order[r["rate"]], labels.index(r["label"]) if r["label"] in labels else 0)):
        c, s = r["cpu"], r["rss"]
        cpus = "/".join(fmt(c.get(n)) for n in ("tracker", "shipper", "receiver"))
        rsss = "/".join(fmt(s.get(n), 0) for n in ("tracker", "shipper", "receiver"))
        flags = "  bitmap mode" if r["bitmap"] else ""
        print(
            f"{r['label']:<6} {r['rate']:>7} {r['achieved']:8.1f} {fmt(r['p50'], 3):>7} "
            f"{fmt(r['p99'], 3):>6} {fmt(r['max'], 2):>6} {fmt(r['top'], 2):>6} {r['acks']:>6} {cpus:>23} {rsss:>19} "
            f"{r['wire']:8.0f} {r['lo']:7.0f} {r['mib']:7.0f} "
            f"{fmt(r['drain']) if r['drain'] is not None else 'timeout':>7}{flags}"
        )
    print()
    for label in labels:
        mine = [r for r in rows if r["label"] == label]
        kept = [
            r
            for r in mine
            if r["p99"] is not None
            and r["p99"] < P99_GOAL
            and r["drain"] is not None
            and r["drain"] < P99_GOAL
            and not r["bitmap"]
        ]
        ceiling = ceilings.get(label, (None,))[0]
        rss_max = max(
            (r["rss"].get(n, 0) for r in mine for n in ("shipper", "receiver")), default=0
        )
        rss_ok = "met" if rss_max < RSS_GOAL_MIB else "MISSED"
        if kept and ceiling:
            best = max(kept, key=lambda r: r["achieved"])
            ratio = best["achieved"] / ceiling
            verdict = "met" if ratio >= RATIO_GOAL else "MISSED"
            print(
                f"{label}: highest sustained rate with lag p99 < 1 s (and drain < 1 s): "
                f"{best['achieved']:.1f} MiB/s (offered {best['rate']}) = {ratio:.2f}x the tracker's "
                f"ceiling alone {ceiling:.1f} MiB/s (goal >= {RATIO_GOAL}: {verdict}); "
                f"shipper/receiver peak RSS {rss_max:.0f} MiB (goal < {RSS_GOAL_MIB}: {rss_ok})"
            )
        else:
            print(
                f"{label}: no rate kept lag p99 < 1 s with drain < 1 s; "
                f"shipper/receiver peak RSS {rss_max:.0f} MiB (goal < {RSS_GOAL_MIB}: {rss_ok})"
            )


if __name__ == "__main__":
    main()
