#!/usr/bin/env python3
"""Benchmark ``livemig relay`` against a direct QEMU 10 -> QEMU 10 migration, side by side.

For every repetition, in one run and interleaved (so drift in the machine's load hits
both alike), the same paused QEMU 10 source guest (``--size`` of random data, loaded at
1 MiB with ``-device loader``; RAM = size + 256 MiB) migrates with multifd
``--channels`` (4) and compression none on every hop, ``return-path`` on:

``qemu``           straight to a QEMU 10 destination (``-incoming defer``,
                   ``migrate-incoming unix:...``);
``livemig-relay``  to ``livemig relay unix:IN unix:OUT --in-multifd-channels N
                   --out-multifd-channels N --json`` (started, and listening, before the
                   clock), which forwards it to the same kind of QEMU 10 destination.

Time (``done``) = from the source's ``migrate`` command to the destination's MIGRATION
event "completed" (QEMU's timestamp; query-migrate polling as fallback); ``src done`` =
the source's "completed". livemig's CPU seconds (user + sys, from ``/proc`` before
``migrate`` and GNU time at its exit) during the migration are given per GiB of the
source's ``ram.transferred``, next to the QEMU source's and destination's.

A run during which other processes used more than ``--max-noise`` CPUs is run again
(up to ``--retries`` times), and every run first waits for a quiet machine.

Usage::

    .venv/bin/python benchmarks/bench_relay.py                # 1 GiB random, 4 channels, 3 reps
    .venv/bin/python benchmarks/bench_relay.py --size 256M -n 1

See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness as h  # found through sys.path above
from harness import GIB, GNU_TIME, QemuPeer, RunFailed, log

VARIANTS = ("qemu", "livemig-relay")


class Bench:
    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.args = args
        self.workdir = workdir
        self.blobs = h.Blobs(workdir)
        self.sc = h.Scenario("relay", "random guest", args.size + h.GUEST_HEADROOM,
                              args.size, args.channels, "none")
        self.run_no = 0

    def source(self) -> QemuPeer:
        src = h.start_source(self.sc, self.blobs.get(self.sc.data), self.workdir,
                              f"src{self.run_no}")
        try:
            src.set_caps({"return-path": True})
        except BaseException:
            src.close()
            raise
        return src

    def migrate(self, src: QemuPeer, dst: QemuPeer, uri: str, rec: dict[str, Any],
                pids: dict[str, int | None]) -> float:
        """``migrate`` to ``uri``; wait for both sides. Fills ``rec`` with the times and
        the CPU seconds of ``pids`` over the migration; returns the clock's start."""
        rec["busy_before"] = h.settle(self.args.wait_idle)
        cpu0 = {k: h.pid_cpu_s(p) for k, p in pids.items()}
        foreign0 = h.foreign_cpu_snapshot()
        t0_wall, t0 = time.time(), time.monotonic()
        src.migrate(uri)
        dst_seen: dict[str, float] = {}
        src_seen: dict[str, float] = {}
        rec["done_s"], _, _ = h.wait_terminal(dst, "destination", t0, t0_wall,
                                               self.args.timeout, self.args.poll, dst_seen)
        rec["src_done_s"], _, info = h.wait_terminal(src, "source", t0, t0_wall,
                                                      self.args.timeout, self.args.poll,
                                                      src_seen)
        for k, p in pids.items():
            c1 = h.pid_cpu_s(p)
            if c1 is not None and cpu0[k] is not None:
                rec[f"{k}_cpu_s"] = round(c1 - cpu0[k], 3)  # type: ignore[operator]
        rec["foreign_cpu_s"] = h.foreign_cpu_since(foreign0)
        rec["foreign_window_s"] = time.monotonic() - t0
        rec["src_ram"] = h.ram_info(info)
        return t0

    def run_qemu(self) -> dict[str, Any]:
        sock = self.workdir / f"q{self.run_no}.sock"
        rec: dict[str, Any] = {}
        with self.source() as src, \
                h.start_destination(self.sc, self.workdir, f"dst{self.run_no}",
                                     f"unix:{sock}") as dst:
            self.migrate(src, dst, f"unix:{sock}", rec, {"src": src.pid, "dst": dst.pid})
        sock.unlink(missing_ok=True)
        return rec

    def run_relay(self) -> dict[str, Any]:
        in_sock = self.workdir / f"in{self.run_no}.sock"
        out_sock = self.workdir / f"out{self.run_no}.sock"
        time_path = self.workdir / f"relay{self.run_no}.time"
        err_path = self.workdir / f"relay{self.run_no}.err"
        if GNU_TIME is None:
            raise RunFailed("livemig's CPU time needs GNU time (/usr/bin/time)")
        ch = str(self.sc.channels)
        tree: h.LivemigTree = self.args.livemig_tree
        cmd = [GNU_TIME, "-f", "%e %U %S", "-o", str(time_path),
               *tree.command("relay", f"unix:{in_sock}", f"unix:{out_sock}", "--json",
                             "--in-multifd-channels", ch, "--out-multifd-channels", ch)]
        rec: dict[str, Any] = {}
        proc: subprocess.Popen[bytes] | None = None
        try:
            with self.source() as src, \
                    h.start_destination(self.sc, self.workdir, f"dst{self.run_no}",
                                         f"unix:{out_sock}") as dst:
                with open(err_path, "wb") as err:
                    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL,
                                            stdout=subprocess.PIPE, stderr=err,
                                            cwd=tree.root, env=tree.env(self.workdir),
                                            start_new_session=True)
                deadline = time.monotonic() + 60
                while not h.unix_listening(str(in_sock)):
                    if proc.poll() is not None or time.monotonic() > deadline:
                        raise RunFailed("livemig relay did not start listening:\n"
                                        + h.tail(err_path.read_text(errors="replace")))
                    time.sleep(0.01)
                relay_pid = h.child_pid(proc.pid)  # GNU time's child
                relay_cpu0 = h.pid_cpu_s(relay_pid)
                t0 = self.migrate(src, dst, f"unix:{in_sock}", rec,
                                  {"src": src.pid, "dst": dst.pid})
                out, _ = proc.communicate(timeout=self.args.timeout)
                rec["relay_exit_s"] = time.monotonic() - t0
        except BaseException as e:  # also Ctrl-C: kill livemig first
            if proc is not None and proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            if isinstance(e, KeyboardInterrupt):
                raise
            raise RunFailed(f"{e}\nlivemig relay's stderr:\n"
                            f"{h.tail(err_path.read_text(errors='replace'))}") from None
        if proc.returncode != 0:
            raise RunFailed(f"livemig relay exited with {proc.returncode}:\n"
                            f"{h.tail(err_path.read_text(errors='replace'))}")
        summary = json.loads(out.decode().strip().splitlines()[-1])
        _, user, sys_ = (float(x) for x in time_path.read_text().split()[-3:])
        rec.update(cpu_user_s=user, cpu_sys_s=sys_, relay_summary=summary)
        if relay_cpu0 is not None:
            rec["relay_startup_cpu_s"] = relay_cpu0
            rec["relay_cpu_s"] = round(user + sys_ - relay_cpu0, 3)
        for p in (in_sock, out_sock, time_path, err_path):
            p.unlink(missing_ok=True)
        return rec

    def run_once(self, variant: str, rep: int) -> dict[str, Any]:
        self.run_no += 1
        base: dict[str, Any] = {"variant": variant, "rep": rep, "ok": False}
        fn = self.run_qemu if variant == "qemu" else self.run_relay

        def body() -> None:
            base.update(fn())
            base["foreign_cores"] = round(base["foreign_cpu_s"] / base["foreign_window_s"], 3)
            gib = base["src_ram"].get("transferred", self.args.size) / GIB
            for k in ("src", "dst", "relay"):
                if base.get(f"{k}_cpu_s") is not None:
                    base[f"{k}_cpu_per_gib"] = base[f"{k}_cpu_s"] / gib
            extra = f", source done {base['src_done_s']:.3f} s"
            if base.get("relay_cpu_s") is not None:
                extra += f", relay CPU {base['relay_cpu_s']:.2f} s"
            extra += f", noise {base['foreign_cores']:.2f}"
            log(f"  rep {rep} {variant:<13} done {base['done_s']:.3f} s{extra}")

        return h.run_guarded(base, f"rep {rep} {variant:<13}", body)


def summarize(runs: list[dict[str, Any]], variants: list[str]) -> dict[str, Any]:
    per = h.variant_medians(runs, variants, (
        "done_s", "src_done_s", "src_cpu_per_gib", "dst_cpu_per_gib", "relay_cpu_per_gib",
        "relay_cpu_s", "relay_startup_cpu_s", "cpu_user_s", "cpu_sys_s", "foreign_cores"))
    ratios = {}
    a, b = per.get("livemig-relay", {}), per.get("qemu", {})
    for key in ("done_s", "src_done_s"):
        if a.get(key) is not None and b.get(key):
            ratios[f"livemig-relay/qemu {key}"] = a[key] / b[key]
    return {"variants": per, "ratios": ratios}


def print_summary(s: dict[str, Any], args: argparse.Namespace) -> None:
    def f(v: float | None, prec: int = 3) -> str:
        return "-" if v is None else f"{v:.{prec}f}"

    print(f"\n{h.fmt_size(args.size)} random guest, multifd {args.channels} channels on "
          f"every hop, compression none; medians of {args.reps} repetition(s), seconds "
          "from 'migrate'")
    hdr = (f"  {'variant':<14} {'ok':>3} {'done':>7} {'src done':>9} {'CPU s/GiB: src':>15} "
           f"{'dst':>5} {'relay':>6} {'noise':>6}")
    print(hdr)
    print("  " + "-" * (len(hdr) - 2))
    for v, m in s["variants"].items():
        print(f"  {v:<14} {m['ok']:>3} {f(m.get('done_s')):>7} {f(m.get('src_done_s')):>9} "
              f"{f(m.get('src_cpu_per_gib'), 2):>15} {f(m.get('dst_cpu_per_gib'), 2):>5} "
              f"{f(m.get('relay_cpu_per_gib'), 2):>6} {f(m.get('foreign_cores'), 2):>6}"
              + (f"  ({m['discarded_noisy']} noisy run(s) discarded)"
                 if m.get("discarded_noisy") else ""))
    lm = s["variants"].get("livemig-relay", {})
    if lm.get("relay_cpu_s") is not None:
        print(f"  livemig relay: {lm['relay_cpu_s']:.2f} CPU s during the migration "
              f"({lm['relay_cpu_per_gib']:.2f} s/GiB), {lm['relay_startup_cpu_s']:.2f} s "
              f"before it (start-up); whole process {lm['cpu_user_s']:.2f} user + "
              f"{lm['cpu_sys_s']:.2f} sys")
    h.print_ratios(s["ratios"], 1.15,
                    lambda k: k.endswith("done_s") and not k.endswith("src_done_s"))
    print("  done / src done: destination / source 'completed'; CPU s/GiB: during the "
          "migration, per GiB\n  the source transferred; noise: CPUs other processes "
          "used during the run.")


def main(argv: list[str] | None = None) -> int:
    args = h.parse_pair_args(argv, __doc__, VARIANTS, "multifd channels on every hop (4)")
    found = h.qemu10_version()
    if found is None:
        return 2
    git = args.livemig_tree.git_head()
    runs: list[dict[str, Any]] = []
    with h.bench_session(args, "lm-bench-relay-", h.run_banner(args, git, found)) as session:
        workdir = session["workdir"]
        bench = Bench(args, workdir)
        bench.blobs.get(bench.sc.data)
        h.run_interleaved(bench.run_once, args, runs)
    summary = summarize(runs, args.variant_list)
    print_summary(summary, args)
    return h.report_end(runs, args, session["interrupted"],
                         {"git": git, "qemu": found, "summary": summary})

if __name__ == "__main__":
    sys.exit(main())
