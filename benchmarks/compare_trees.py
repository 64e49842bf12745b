#!/usr/bin/env python3
"""Measure two livemig source trees side by side: is the change any slower?

Issue 11's rule for a change that is not meant to change speed: the benchmarks' ratios
(engine 1 GiB / 4 channels against QEMU 10, send, relay, receive) measured before and
after the change in one run; no variant more than 5 % slower.

For every round (``-n``, default 5) and every benchmark, this runs the benchmark's
livemig variant once for each tree, in turn (``--before`` then ``--after``, or
alternating with ``--order abba``), then the benchmark's QEMU reference once, each as
its own invocation of the benchmark script of *this* checkout with ``-n 1`` and
``--livemig-tree`` pointing at the tree. Running round by round spreads every
benchmark's repetitions over the whole session, and keeps each before/after pair
next to each other in time, so that drift in the machine's load hits both alike. The
benchmarks themselves still wait for a quiet machine and re-run noisy runs.

Per benchmark the table shows the median of each tree's runs, after / before (the
verdict: at most ``1 + --tolerance``), the median of the per-round after / before
ratios (the pairs are adjacent in time, so drift cancels in them), and each tree
against the median of the QEMU reference.

Usage::

    .venv/bin/python benchmarks/compare_trees.py --before /work/baseline --after /work/main
    .venv/bin/python benchmarks/compare_trees.py --before ../base --after . -n 7 \\
        --benchmarks engine,send --json-out compare.json
    .venv/bin/python benchmarks/compare_trees.py --before ../base --after . --size 64M -n 1 \\
        --wait-idle 2 --retries 0                       # a try-out in a minute or two

Exit status 0 if every run worked and no benchmark is slower than the tolerance, 1
otherwise, 2 if QEMU 10 is missing. See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness as h  # found through sys.path above

HERE = Path(__file__).resolve().parent
#: Seconds one benchmark invocation may take on top of ``--timeout`` per migration (start
#: the QEMUs, make the blob, capture the snapshot for bench_send, wait for a quiet machine
#: before each of up to ``--retries`` + 1 attempts) before it is stopped.
INVOCATION_SLACK = 900.0
#: Seconds a stopped benchmark gets to kill its QEMUs and remove its files after SIGTERM.
TERM_GRACE = 30.0


@dataclasses.dataclass(frozen=True)
class Benchmark:
    """How to run one benchmark's livemig variant and its QEMU reference, and where in its
    JSON the time to compare is."""

    name: str
    script: str
    livemig: str  # the livemig variant's name in --variants
    references: tuple[str, ...]  # its QEMU variants; the first is the default reference
    metric: str  # the run record's key: seconds, lower is better
    what: str  # the metric for people
    options: tuple[str, ...] = ()  # fixed options, e.g. the scenario
    select: Callable[[dict[str, Any], argparse.Namespace], bool] = lambda run, args: True


BENCHMARKS = {
    b.name: b for b in (
        Benchmark("engine", "bench_engine.py", "livemig", ("qemu", "qemu-prealloc"),
                  "dst_wall_s", "dst wall",
                  select=lambda run, args: run.get("channels") == args.channels),
        Benchmark("send", "bench_send.py", "livemig", ("qemu-file", "qemu-socket"),
                  "done_s", "done"),
        Benchmark("relay", "bench_relay.py", "livemig-relay", ("qemu",), "done_s", "done"),
        Benchmark("receive", "bench_receive.py", "livemig", ("qemu", "qemu-prealloc"),
                  "done_s", "done (A)", options=("-s", "A"),
                  select=lambda run, args: run.get("scenario") == "A"),
    )
}


# ------------------------------------------------------------------------------------------
# One invocation
# ------------------------------------------------------------------------------------------


class Runner:
    """Runs benchmark scripts one at a time, each in its own session (so that a stopped
    one takes its QEMUs and livemig with it), its output in ``logdir``."""

    def __init__(self, args: argparse.Namespace, logdir: Path) -> None:
        self.args = args
        self.logdir = logdir
        self.count = 0
        self.proc: subprocess.Popen[bytes] | None = None

    def command(self, bench: Benchmark, variant: str, tree: h.LivemigTree,
                json_out: Path) -> list[str]:
        a = self.args
        cmd = [sys.executable, str(HERE / bench.script), *bench.options, "-n", "1",
               "--variants", variant, "--channels", str(a.channels),
               "--livemig-tree", str(tree.root), "--json-out", str(json_out),
               "--wait-idle", str(a.wait_idle), "--retries", str(a.retries),
               "--timeout", str(a.timeout)]
        if a.size:
            cmd += ["--size", a.size]
        if a.max_noise is not None:
            cmd += ["--max-noise", str(a.max_noise)]
        if a.tmpdir:
            cmd += ["--tmpdir", a.tmpdir]
        return cmd

    def run(self, bench: Benchmark, variant: str, tree: h.LivemigTree, label: str,
            rnd: int) -> dict[str, Any]:
        """One invocation; its record: the metric's values, noise, exit status."""
        self.count += 1
        stem = f"{self.count:03d}-{bench.name}-{label}"
        json_out = self.logdir / f"{stem}.json"
        log_path = self.logdir / f"{stem}.log"
        cmd = self.command(bench, variant, tree, json_out)
        rec: dict[str, Any] = {"benchmark": bench.name, "round": rnd, "side": label,
                               "variant": variant, "tree": str(tree.root), "log": str(log_path)}
        t0 = time.monotonic()
        with open(log_path, "wb") as out:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rec["rc"] = self.proc.wait(self.args.timeout + INVOCATION_SLACK)
        except subprocess.TimeoutExpired:
            self.stop()
            rec["rc"] = None
            rec["error"] = f"still running after {self.args.timeout + INVOCATION_SLACK:.0f} s"
        finally:
            self.proc = None
        rec["wall_s"] = round(time.monotonic() - t0, 1)
        runs: list[dict[str, Any]] = []
        if json_out.exists():
            runs = json.loads(json_out.read_text()).get("runs", [])
        counted = [r for r in runs if r.get("variant") == variant and bench.select(r, self.args)
                   and r.get("ok") and not r.get("discarded")]
        rec["values"] = [r[bench.metric] for r in counted if r.get(bench.metric) is not None]
        rec["noise"] = [r.get("foreign_cores", r.get("other_cores")) for r in counted]
        rec["discarded_noisy"] = sum(1 for r in runs if r.get("discarded"))
        if not rec["values"] and "error" not in rec:
            failed = [r.get("error", "") for r in runs if not r.get("ok")]
            rec["error"] = (failed[0].splitlines()[0] if failed and failed[0]
                            else f"exit status {rec['rc']}, no {bench.metric} in its JSON")
        return rec

    def stop(self) -> None:
        """SIGTERM the running benchmark (it cleans up), SIGKILL its session after a grace."""
        p = self.proc
        if p is None or p.poll() is not None:
            return
        with contextlib.suppress(OSError):
            os.killpg(p.pid, signal.SIGTERM)
        try:
            p.wait(TERM_GRACE)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(OSError):
                os.killpg(p.pid, signal.SIGKILL)
            p.wait()


def tail_of(path: str, n: int = 15) -> str:
    try:
        return h.tail(Path(path).read_text(errors="replace"), n)
    except OSError:
        return ""


# ------------------------------------------------------------------------------------------
# The session
# ------------------------------------------------------------------------------------------


def run_rounds(args: argparse.Namespace, runner: Runner, trees: dict[str, h.LivemigTree],
               records: list[dict[str, Any]]) -> None:
    for rnd in range(1, args.reps + 1):
        sides = ["before", "after"]
        if args.order == "abba" and rnd % 2 == 0:
            sides.reverse()
        for name in args.bench_list:
            bench = BENCHMARKS[name]
            steps = [(s, bench.livemig, trees[s]) for s in sides]
            steps.append(("qemu", args.refs[name], trees["after"]))
            for side, variant, tree in steps:
                rec = runner.run(bench, variant, tree, side, rnd)
                records.append(rec)
                got = ", ".join(f"{v:.3f}" for v in rec["values"]) or "-"
                noise = ", ".join(f"{x:.2f}" for x in rec["noise"] if x is not None)
                line = (f"round {rnd}/{args.reps} {name:<8} {side:<6} {variant:<14} "
                        f"{bench.what} {got} s" + (f" (noise {noise})" if noise else ""))
                if "error" in rec:
                    line += f" FAILED: {rec['error']}\n{tail_of(rec['log'])}"
                h.log(line)


def summarize(records: list[dict[str, Any]], args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in args.bench_list:
        rs = [r for r in records if r["benchmark"] == name]
        m: dict[str, Any] = {"metric": BENCHMARKS[name].metric, "reference": args.refs[name]}
        for side in ("before", "after", "qemu"):
            vals = [v for r in rs if r["side"] == side for v in r["values"]]
            m[side] = {"values": vals, "runs": sum(1 for r in rs if r["side"] == side),
                       "median": statistics.median(vals) if vals else None}
        b, a, q = (m[s]["median"] for s in ("before", "after", "qemu"))
        m["after/before"] = a / b if a is not None and b else None
        m["before/qemu"] = b / q if b is not None and q else None
        m["after/qemu"] = a / q if a is not None and q else None
        paired = []
        for rnd in range(1, args.reps + 1):
            pb = [v for r in rs if r["round"] == rnd and r["side"] == "before" for v in r["values"]]
            pa = [v for r in rs if r["round"] == rnd and r["side"] == "after" for v in r["values"]]
            if pb and pa and pb[0]:
                paired.append(pa[0] / pb[0])
        m["paired"] = paired
        m["paired_median"] = statistics.median(paired) if paired else None
        ratio = m["after/before"]
        m["verdict"] = ("no data" if ratio is None else
                        "OK" if ratio <= 1 + args.tolerance else "SLOWER")
        out[name] = m
    return out


def print_table(summary: dict[str, Any], args: argparse.Namespace,
                heads: dict[str, str | None]) -> None:
    def f(v: float | None, fmt: str = ".3f", suffix: str = "") -> str:
        return "-" if v is None else f"{v:{fmt}}{suffix}"

    print()
    print(f"before: {args.before} ({heads['before']}); after: {args.after} ({heads['after']})")
    print(f"medians of {args.reps} round(s), seconds (lower is better); size "
          f"{args.size or 'each benchmark default (1G)'}, {args.channels} multifd channels")
    hdr = (f"{'benchmark':<9} {'metric':<9} {'before':>7} {'after':>7} {'after/before':>12} "
           f"{'paired':>7} {'QEMU ref':<19} {'before/QEMU':>11} {'after/QEMU':>10} "
           f"{'runs b/a/q':>10}  verdict")
    print(hdr)
    print("-" * len(hdr))
    for name, m in summary.items():
        ref = f"{m['reference']} {f(m['qemu']['median'])}"
        runs = "/".join(f"{len(m[s]['values'])}" for s in ("before", "after", "qemu"))
        print(f"{name:<9} {BENCHMARKS[name].what:<9} {f(m['before']['median']):>7} "
              f"{f(m['after']['median']):>7} {f(m['after/before'], '.3f', 'x'):>12} "
              f"{f(m['paired_median'], '.3f', 'x'):>7} {ref:<19} "
              f"{f(m['before/qemu'], '.2f', 'x'):>11} {f(m['after/qemu'], '.2f', 'x'):>10} "
              f"{runs:>10}  {m['verdict']}")
    print(f"\n  after/before: ratio of the medians; verdict OK if <= {1 + args.tolerance:.2f}x. "
          "paired: median of the per-round\n  after/before ratios (each pair ran back to "
          "back). QEMU ref: the reference's median, run once per round.\n  runs b/a/q: "
          "runs that counted for before / after / the reference.")


# ------------------------------------------------------------------------------------------
# Main
# ------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = h.arg_parser(__doc__)
    p.add_argument("--before", type=h.livemig_tree, required=True, metavar="DIR",
                   help="the tree before the change (e.g. a git worktree at its parent)")
    p.add_argument("--after", type=h.livemig_tree, required=True, metavar="DIR",
                   help="the tree with the change")
    p.add_argument("-n", "--reps", type=int, default=5, help="rounds (default 5)")
    p.add_argument("--benchmarks", default=",".join(BENCHMARKS),
                   help=f"comma-separated, from {', '.join(BENCHMARKS)} (default: all)")
    p.add_argument("--ref", action="append", default=[], metavar="BENCH=VARIANT",
                   help="the QEMU reference of a benchmark (default: engine=qemu, "
                        "send=qemu-file, relay=qemu, receive=qemu); may be repeated")
    p.add_argument("--size", help="passed to every benchmark's --size (QEMU size syntax; "
                                  "default: theirs, 1G); e.g. 64M for a try-out")
    p.add_argument("--channels", type=int, default=4, help="multifd channels (4)")
    p.add_argument("--order", choices=["abab", "abba"], default="abab",
                   help="abab: before then after in every round (default); abba: the "
                        "order alternates from round to round")
    p.add_argument("--tolerance", type=float, default=0.05,
                   help="how much slower after may be than before (default 0.05: 5 %%)")
    p.add_argument("--timeout", type=float, default=300.0,
                   help="seconds one migration may take (passed on; default 300)")
    p.add_argument("--wait-idle", type=float, default=30.0, metavar="SECONDS",
                   help="passed on: the wait for a quiet machine before each run (30)")
    p.add_argument("--max-noise", type=float, default=None, metavar="CPUS",
                   help="passed on (default: each benchmark's own)")
    p.add_argument("--retries", type=int, default=3,
                   help="passed on: re-runs of a noisy run (3)")
    p.add_argument("--tmpdir", help="passed on: where the benchmarks' work directories go")
    p.add_argument("--log-dir", metavar="DIR",
                   help="keep every invocation's output and JSON here (default: a temporary "
                        "directory, removed at the end unless a run failed)")
    p.add_argument("--json-out", metavar="PATH", help="write every run and the summary as JSON")
    a = p.parse_args(argv)
    a.bench_list = [x.strip() for x in a.benchmarks.split(",") if x.strip()]
    bad = [x for x in a.bench_list if x not in BENCHMARKS]
    if bad:
        p.error(f"unknown benchmark(s) {bad}; known: {', '.join(BENCHMARKS)}")
    a.refs = {name: BENCHMARKS[name].references[0] for name in BENCHMARKS}
    for item in a.ref:
        name, _, variant = item.partition("=")
        if name not in BENCHMARKS or variant not in BENCHMARKS[name].references:
            p.error(f"--ref {item}: use BENCH=VARIANT with one of "
                    + "; ".join(f"{n}: {', '.join(b.references)}"
                                for n, b in BENCHMARKS.items()))
        a.refs[name] = variant
    if a.reps < 1:
        p.error("-n must be at least 1")
    if a.before.root == a.after.root:
        p.error("--before and --after are the same tree")
    return a


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    found = h.qemu10_version()
    if found is None:
        return 2
    trees = {"before": args.before, "after": args.after}
    heads = {k: t.git_head() for k, t in trees.items()}
    logdir = Path(args.log_dir or tempfile.mkdtemp(prefix="lm-compare-", dir=args.tmpdir))
    logdir.mkdir(parents=True, exist_ok=True)
    h.log(f"before {args.before} ({heads['before']}), after {args.after} ({heads['after']}); "
          f"QEMU {found}, {os.cpu_count()} CPUs; output of every run in {logdir}")
    runner = Runner(args, logdir)
    records: list[dict[str, Any]] = []
    started = time.time()
    interrupted = False

    def on_term(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    try:
        run_rounds(args, runner, trees, records)
    except KeyboardInterrupt:
        interrupted = True
        runner.stop()
        h.log("interrupted: reporting what ran")
    summary = summarize(records, args)
    print_table(summary, args, heads)
    failed = [r for r in records if "error" in r]
    for r in failed:
        print(f"FAILED: round {r['round']} {r['benchmark']} {r['side']}: {r['error']} "
              f"(output: {r['log']})")
    if args.json_out:
        doc = {"started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)),
               "host": {"cpus": os.cpu_count(), "python": platform.python_version(),
                        "kernel": platform.release(), "qemu": found},
               "trees": {k: {"root": str(t.root), "git": heads[k]} for k, t in trees.items()},
               "args": vars(args), "interrupted": interrupted, "summary": summary,
               "runs": records}
        Path(args.json_out).write_text(json.dumps(doc, indent=2, default=str) + "\n")
        h.log(f"wrote {args.json_out}")
    if args.log_dir is None and not failed:
        shutil.rmtree(logdir, ignore_errors=True)
    slower = [n for n, m in summary.items() if m["verdict"] != "OK"]
    return 1 if failed or slower or interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
