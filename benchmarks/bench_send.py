#!/usr/bin/env python3
"""Benchmark ``livemig send`` against QEMU 10 loading the same VM from its own mapped-ram file.

Both variants restore the same snapshot (a QEMU mapped-ram file written by
``livemig receive``: QEMU 10 loads it directly) into a fresh QEMU 10 with the
same multifd channel count, interleaved repetition by repetition, page cache warm:

``qemu-file``  QEMU 10 ``-incoming defer``, capabilities mapped-ram + multifd,
               ``migrate-incoming file:SNAPSHOT`` (QEMU's own parallel file loader);
``livemig``    QEMU 10 ``-incoming defer`` with multifd, ``migrate-incoming unix:...``,
               then ``livemig send SNAPSHOT unix:...`` with the same channels.

Time = from the command that starts the load (``migrate-incoming`` / starting
``livemig send``) until the destination reports ``completed``.

Usage::

    .venv/bin/python benchmarks/bench_send.py                # 1 GiB random, 4 channels, 3 reps
    .venv/bin/python benchmarks/bench_send.py --size 256M -n 1
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from peers import QemuPeer, make_blob, parse_size  # noqa: E402


def capture(work: Path, size: int, channels: int) -> Path:
    """A snapshot of a paused QEMU 10 guest holding ``size`` bytes of random data."""
    blob = work / "blob.bin"
    make_blob(blob, size, seed=5)
    snap = work / "vm.snap"
    sock = work / "cap.sock"
    mem = f"{(size >> 20) + 256}M"
    recv = subprocess.Popen([sys.executable, "-m", "livemig.cli.main", "receive",
                             f"unix:{sock}", "-o", str(snap), "-q",
                             "--multifd-channels", str(channels)])
    while not sock.exists():
        time.sleep(0.02)
    with QemuPeer("10.0", memory=mem, blobs=[(str(blob), 0x100000)],
                  workdir=str(work / "src")) as src:
        src.set_caps({"multifd": True})
        src.set_params(**{"multifd-channels": channels, "max-bandwidth": 100 << 30})
        src.migrate(f"unix:{sock}")
        src.wait_migration(timeout=600)
    if recv.wait(timeout=600) != 0:
        raise SystemExit("capture failed")
    blob.unlink()
    return snap


def wait_completed(q: QemuPeer, timeout: float = 600) -> float:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        st = q.query_migrate().get("status")
        if st == "completed":
            return time.monotonic()
        if st == "failed":
            raise SystemExit(f"destination failed: {q.query_migrate()}")
        time.sleep(0.005)
    raise SystemExit("destination did not complete")


def run_qemu_file(snap: Path, mem: str, channels: int, work: Path) -> float:
    with QemuPeer("10.0", memory=mem, incoming="defer", workdir=str(work / "qf")) as q:
        q.set_caps({"mapped-ram": True, "multifd": True})
        q.set_params(**{"multifd-channels": channels})
        t0 = time.monotonic()
        q.migrate_incoming(f"file:{snap}")
        return wait_completed(q) - t0


def run_livemig(snap: Path, mem: str, channels: int, work: Path) -> float:
    sock = work / "send.sock"
    with QemuPeer("10.0", memory=mem, incoming="defer", workdir=str(work / "lm")) as q:
        q.set_caps({"multifd": True})
        q.set_params(**{"multifd-channels": channels})
        q.migrate_incoming(f"unix:{sock}")
        t0 = time.monotonic()
        p = subprocess.run([sys.executable, "-m", "livemig.cli.main", "send", str(snap),
                            f"unix:{sock}", "-q", "--multifd-channels", str(channels)],
                           timeout=600)
        if p.returncode != 0:
            raise SystemExit("livemig send failed")
        return wait_completed(q) - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="1G")
    ap.add_argument("--channels", type=int, default=4)
    ap.add_argument("-n", "--reps", type=int, default=3)
    ap.add_argument("--json-out")
    args = ap.parse_args()
    size = parse_size(args.size)
    mem = f"{(size >> 20) + 256}M"
    with tempfile.TemporaryDirectory(prefix="lm-bench-send-") as tmp:
        work = Path(tmp)
        print(f"capturing a {args.size} random guest ...", flush=True)
        snap = capture(work, size, args.channels)
        subprocess.run(["cat", str(snap)], stdout=subprocess.DEVNULL, check=True)  # warm
        times: dict[str, list[float]] = {"qemu-file": [], "livemig": []}
        for rep in range(args.reps):
            for name, fn in (("qemu-file", run_qemu_file), ("livemig", run_livemig)):
                t = fn(snap, mem, args.channels, work)
                times[name].append(t)
                print(f"  rep {rep + 1} {name:10s} {t:.3f} s", flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    ratio = med["livemig"] / med["qemu-file"]
    print(f"medians: qemu-file {med['qemu-file']:.3f} s, livemig send {med['livemig']:.3f} s; "
          f"ratio livemig/qemu-file = {ratio:.2f}x (target <= 1.0x: "
          f"{'OK' if ratio <= 1.0 else 'MISSED'})")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"times": times, "medians": med,
                                                   "ratio": ratio, "args": vars(args)},
                                                  indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
