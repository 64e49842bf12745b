#!/usr/bin/env python3
"""Downtime with vfio-sim device state on the main channel vs over multifd (issue 5).

Runs ``livemig demo --json`` (two ``livemig run`` processes, the dirty-pages
workload, N vfio-sim devices that keep changing their memory) once per path
and device count, alternating the paths, and reports the downtime each run
measured (machine stop on the source to the destination's confirmation) and
the ratio multifd / main.

    benchmarks/bench_device_state.py                  # 4 devices x 128M, 4 channels
    benchmarks/bench_device_state.py --devices 1 2 4 8 --size 64M
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness as h  # found through sys.path above


def demo(tree: h.LivemigTree, devices: int, size: str, path: str, channels: int, memory: str,
         precopy: str) -> dict:
    # without PRE_COPY all device state moves at switchover: allow the downtime that
    # takes, so that the switchover comes after the first RAM pass
    limit = "300" if precopy == "on" else "600000"
    r = subprocess.run(tree.command("demo", "--json", "--memory", memory,
                                    "--multifd-channels", str(channels),
                                    "--vfio-devices", str(devices), "--vfio-state-size", size,
                                    "--vfio-precopy", precopy, "--downtime-limit", limit,
                                    "--device-state-transfer", path),
                       cwd=tree.root, env=tree.env(), capture_output=True, timeout=900,
                       check=False)
    out = json.loads(r.stdout.decode().strip().splitlines()[-1])
    if r.returncode or not out.get("verified"):
        raise SystemExit(f"demo failed ({path}, {devices} devices): {out}")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--devices", type=int, nargs="+", default=[4])
    ap.add_argument("--size", default="128M", help="device memory per device")
    ap.add_argument("--channels", type=int, default=4)
    ap.add_argument("--memory", default="256M", help="guest RAM")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--precopy", choices=["on", "off"], default="off",
                    help="vfio-sim PRE_COPY (default off: all 128M per device moves at "
                         "switchover, the case multifd device state is for)")
    ap.add_argument("--json-out", metavar="FILE")
    h.add_tree_option(ap)
    args = ap.parse_args()
    rows = []
    print(f"{'devices':>7} {'main ms':>9} {'multifd ms':>11} {'ratio':>6}")
    for n in args.devices:
        times: dict[str, list[int]] = {"main": [], "multifd": []}
        for _ in range(args.repeat):
            for path in ("main", "multifd"):
                times[path].append(demo(args.livemig_tree, n, args.size, path, args.channels,
                                        args.memory, args.precopy)["downtime_ms"])
        main_ms = statistics.median(times["main"])
        mfd_ms = statistics.median(times["multifd"])
        ratio = mfd_ms / main_ms if main_ms else float("nan")
        rows.append({"devices": n, "size": args.size, "precopy": args.precopy,
                     "main_ms": times["main"],
                     "multifd_ms": times["multifd"], "ratio": ratio})
        print(f"{n:>7} {main_ms:>9.0f} {mfd_ms:>11.0f} {ratio:>6.2f}", flush=True)
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
