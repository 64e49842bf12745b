#!/usr/bin/env python3
"""Cost of kernel dirty tracking (livemig.io.dirty_kernel) on one large RAM block.

For each dirty fraction (random pages; 100% = every page) this writes one
byte into each chosen page, then times ``KernelDirtyTracker.collect()``.
Also timed: ``start()``, a collect with nothing written, and the writes
themselves with and without tracking (the tracked first write of a page in a
round takes a minor fault that the kernel resolves).

Random pages are the hard case for collect: they give the most regions per
dirty page. Every collect's result is checked against what was written.

Usage::

    .venv/bin/python benchmarks/bench_dirty_kernel.py               # 1 GiB, private, 5 reps
    .venv/bin/python benchmarks/bench_dirty_kernel.py --size 256M --shared -n 3
"""

from __future__ import annotations

import argparse
import mmap
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness as h  # found through sys.path above

FRACTIONS = (0.01, 0.5, 1.0)


def ms(seconds: list[float]) -> str:
    return f"{statistics.median(seconds) * 1e3:8.1f} ms (min {min(seconds) * 1e3:.1f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="1G", help="RAM block size (default 1G)")
    parser.add_argument("--shared", action="store_true",
                        help="MAP_SHARED anonymous memory (default MAP_PRIVATE)")
    parser.add_argument("-n", type=int, default=5, help="repetitions per fraction")
    h.add_tree_option(parser)
    args = parser.parse_args()
    # in this process: the chosen tree's livemig, ahead of the harness's own checkout
    sys.path.insert(0, str(args.livemig_tree.root))
    from livemig.io.dirty_kernel import (
        KernelDirtyTracker,
        address_of,
        kernel_tracking_unavailable,
    )

    reason = kernel_tracking_unavailable()
    if reason is not None:
        raise SystemExit(f"kernel dirty tracking unavailable: {reason}")
    size = h.parse_size(args.size)
    ps = mmap.PAGESIZE
    pages = size // ps
    flags = (mmap.MAP_SHARED if args.shared else mmap.MAP_PRIVATE) | mmap.MAP_ANONYMOUS
    buf = mmap.mmap(-1, size, flags=flags)
    mem = np.frombuffer(buf, np.uint8)
    mem[::ps] = 1  # populated, like a running guest's RAM
    rng = np.random.default_rng(1)
    chosen = {f: [np.flatnonzero(rng.random(pages) < f) if f < 1 else np.arange(pages)
                  for _ in range(args.n)] for f in FRACTIONS}

    untracked = {f: [] for f in FRACTIONS}
    for f in FRACTIONS:
        for idx in chosen[f]:
            t0 = time.perf_counter()
            mem[idx * ps] += 1
            untracked[f].append(time.perf_counter() - t0)

    kind = "shared" if args.shared else "private"
    print(f"{size >> 20} MiB {kind} anonymous, {pages} pages of {ps} bytes, {args.n} reps")
    with KernelDirtyTracker(address_of(buf), size) as tracker:
        t0 = time.perf_counter()
        tracker.start()
        print(f"start()                      {(time.perf_counter() - t0) * 1e3:8.1f} ms")
        out = np.zeros(pages, np.uint8)
        idle = []
        for _ in range(args.n):
            t0 = time.perf_counter()
            tracker.collect(out)
            idle.append(time.perf_counter() - t0)
        print(f"collect(), nothing written   {ms(idle)}")
        for f in FRACTIONS:
            collect, write = [], []
            for idx in chosen[f]:
                t0 = time.perf_counter()
                mem[idx * ps] += 1
                write.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                tracker.collect(out)
                collect.append(time.perf_counter() - t0)
                if not np.array_equal(np.flatnonzero(out), idx):
                    raise SystemExit(f"{f:.0%}: collect() does not match the pages written")
            print(f"collect(), {f:4.0%} dirty        {ms(collect)}   "
                  f"writes: tracked {ms(write)}, untracked {ms(untracked[f])}")
    del mem
    buf.close()


if __name__ == "__main__":
    main()
