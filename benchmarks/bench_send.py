#!/usr/bin/env python3
"""Benchmark ``livemig send`` against QEMU 10 loading the same VM by its own means.

All variants put the same paused VM (``--size`` of random data, captured once into a
snapshot with ``livemig receive``) into a fresh QEMU 10 destination with the same
multifd channel count, interleaved repetition by repetition, page cache warm:

``qemu-file``    QEMU 10 ``-incoming defer``, capabilities mapped-ram + multifd,
                 ``migrate-incoming file:SNAPSHOT`` (QEMU's own parallel file loader);
``qemu-socket``  a QEMU 10 source holding the same guest (paused, the same blob at the
                 same address) migrating with ``migrate unix:...`` to a QEMU 10
                 ``-incoming defer`` with multifd: what ``livemig send`` does, done by
                 QEMU's own sender;
``livemig``      the same destination, then ``livemig send SNAPSHOT unix:... --json``
                 with the same channels (started as a process, under GNU time).

Time (``done``) = from the command that starts the load (``migrate-incoming`` /
``migrate`` / starting the ``livemig send`` process) until the destination's MIGRATION
event "completed" (QEMU's timestamp; query-migrate polling as fallback). ``active`` is
the destination's "active" event: every channel has connected, so for livemig it is
its start-up (interpreter, imports, reading the snapshot's bitmaps, connecting).

A run during which other processes used more than ``--max-noise`` CPUs is run again
(up to ``--retries`` times), and every run first waits for a quiet machine.

Usage::

    .venv/bin/python benchmarks/bench_send.py                # 1 GiB random, 4 channels, 3 reps
    .venv/bin/python benchmarks/bench_send.py --size 256M -n 1
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

VARIANTS = ("qemu-file", "qemu-socket", "livemig")


class Bench:
    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.args = args
        self.workdir = workdir
        self.tree: h.LivemigTree = args.livemig_tree
        self.blobs = h.Blobs(workdir)
        self.sc = h.Scenario("send", "random guest", args.size + h.GUEST_HEADROOM,
                              args.size, args.channels, "none")
        self.snap = workdir / "vm.snap"
        self.run_no = 0

    # -- set-up ----------------------------------------------------------------------------

    def capture(self) -> None:
        """The snapshot of the paused guest that every variant restores."""
        sock = self.workdir / "cap.sock"
        recv = subprocess.Popen(self.tree.command("receive", f"unix:{sock}", "-o",
                                                  str(self.snap), "-q", "--multifd-channels",
                                                  str(self.sc.channels)),
                                cwd=self.tree.root, env=self.tree.env(self.workdir),
                                start_new_session=True)
        try:
            deadline = time.monotonic() + 60
            while not h.unix_listening(str(sock)):
                if recv.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit("livemig receive did not start listening")
                time.sleep(0.02)
            with h.start_source(self.sc, self.blobs.get(self.sc.data), self.workdir,
                                 "capture") as src:
                src.migrate(f"unix:{sock}")
                src.wait_migration(timeout=self.args.timeout)
            if recv.wait(timeout=self.args.timeout) != 0:
                raise SystemExit("capture failed: livemig receive exited with "
                                 f"{recv.returncode}")
        finally:
            if recv.poll() is None:
                os.killpg(recv.pid, signal.SIGKILL)
                recv.wait()

    def import_cpu(self) -> dict[str, float]:
        """What starting the interpreter and importing the send path costs, alone:
        ``livemig send`` on a missing snapshot, which imports what a real one does and
        stops at the check for the file (whatever module layout the tree has)."""
        out = self.workdir / "import.time"
        missing = self.workdir / "no-such.snap"
        r = subprocess.run([GNU_TIME or "/usr/bin/time", "-f", "%e %U %S", "-o", str(out),
                            *self.tree.command("send", str(missing),
                                               f"unix:{self.workdir / 'none.sock'}")],
                           cwd=self.tree.root, env=self.tree.env(self.workdir),
                           capture_output=True, text=True, check=False)
        if "no such file" not in r.stderr:
            raise SystemExit(f"livemig send on a missing snapshot did not say so:\n{r.stderr}")
        wall, user, sys_ = (float(x) for x in out.read_text().split()[-3:])
        return {"wall_s": wall, "user_s": user, "sys_s": sys_}

    # -- the variants ----------------------------------------------------------------------

    def destination(self, uri: str | None, caps: dict[str, bool] | None = None) -> QemuPeer:
        return h.start_destination(self.sc, self.workdir, f"dst{self.run_no}", uri, caps)

    def finish(self, dst: QemuPeer, t0: float, t0_wall: float, rec: dict[str, Any]) -> None:
        seen: dict[str, float] = {}
        rec["done_s"], rec["dst_polled_s"], _ = h.wait_terminal(
            dst, "destination", t0, t0_wall, self.args.timeout, self.args.poll, seen)
        rec["active_s"] = seen.get("active")

    def run_qemu_file(self) -> dict[str, Any]:
        rec: dict[str, Any] = {"busy_before": h.settle(self.args.wait_idle)}
        with self.destination(None, {"mapped-ram": True}) as dst:
            cpu0 = h.pid_cpu_s(dst.pid)
            foreign0 = h.foreign_cpu_snapshot()
            t0_wall, t0 = time.time(), time.monotonic()
            dst.migrate_incoming(f"file:{self.snap}")
            self.finish(dst, t0, t0_wall, rec)
            rec["dst_cpu_s"] = h.pid_cpu_s(dst.pid) - cpu0  # type: ignore[operator]
            rec["foreign_cpu_s"] = h.foreign_cpu_since(foreign0)
            rec["foreign_window_s"] = time.monotonic() - t0
        return rec

    def run_qemu_socket(self) -> dict[str, Any]:
        sock = self.workdir / f"qs{self.run_no}.sock"
        rec: dict[str, Any] = {}
        with h.start_source(self.sc, self.blobs.get(self.sc.data), self.workdir,
                             f"src{self.run_no}") as src, \
                self.destination(f"unix:{sock}") as dst:
            rec["busy_before"] = h.settle(self.args.wait_idle)
            src_cpu0, cpu0 = h.pid_cpu_s(src.pid), h.pid_cpu_s(dst.pid)
            foreign0 = h.foreign_cpu_snapshot()
            t0_wall, t0 = time.time(), time.monotonic()
            src.migrate(f"unix:{sock}")
            self.finish(dst, t0, t0_wall, rec)
            info = src.wait_migration(timeout=self.args.timeout, poll=self.args.poll)
            rec["src_cpu_s"] = h.pid_cpu_s(src.pid) - src_cpu0  # type: ignore[operator]
            rec["dst_cpu_s"] = h.pid_cpu_s(dst.pid) - cpu0  # type: ignore[operator]
            rec["foreign_cpu_s"] = h.foreign_cpu_since(foreign0)
            rec["foreign_window_s"] = time.monotonic() - t0
            rec["src_ram"] = h.ram_info(info)
        sock.unlink(missing_ok=True)
        return rec

    def run_livemig(self) -> dict[str, Any]:
        sock = self.workdir / f"lm{self.run_no}.sock"
        time_path = self.workdir / f"lm{self.run_no}.time"
        err_path = self.workdir / f"lm{self.run_no}.err"
        rec: dict[str, Any] = {}
        cmd = self.tree.command("send", str(self.snap), f"unix:{sock}", "--json",
                                "--multifd-channels", str(self.sc.channels))
        if GNU_TIME is None:
            raise RunFailed("livemig's CPU time needs GNU time (/usr/bin/time)")
        cmd = [GNU_TIME, "-f", "%e %U %S", "-o", str(time_path), *cmd]
        with self.destination(f"unix:{sock}") as dst:
            rec["busy_before"] = h.settle(self.args.wait_idle)
            cpu0 = h.pid_cpu_s(dst.pid)
            foreign0 = h.foreign_cpu_snapshot()
            with open(err_path, "wb") as err:
                t0_wall, t0 = time.time(), time.monotonic()
                proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                        stderr=err, cwd=self.tree.root,
                                        env=self.tree.env(self.workdir),
                                        start_new_session=True)
            try:
                self.finish(dst, t0, t0_wall, rec)
                out, _ = proc.communicate(timeout=self.args.timeout)
                rec["exit_s"] = time.monotonic() - t0
            except BaseException as e:  # noqa: BLE001 - also Ctrl-C: kill livemig first
                if proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
                errtext = err_path.read_text(errors="replace")
                raise RunFailed(f"{e}\nlivemig send's stderr:\n{h.tail(errtext)}") from None
            rec["dst_cpu_s"] = h.pid_cpu_s(dst.pid) - cpu0  # type: ignore[operator]
            rec["foreign_cpu_s"] = h.foreign_cpu_since(foreign0)
            rec["foreign_window_s"] = time.monotonic() - t0
        if proc.returncode != 0:
            raise RunFailed(f"livemig send exited with {proc.returncode}:\n"
                            f"{h.tail(err_path.read_text(errors='replace'))}")
        summary = json.loads(out.decode().strip().splitlines()[-1])
        _, user, sys_ = (float(x) for x in time_path.read_text().split()[-3:])
        rec.update(cpu_user_s=user, cpu_sys_s=sys_, livemig_seconds=summary["seconds"],
                   normal_pages=summary["normal_pages"])
        # its own clock starts once the main channel is connected, just before the
        # first byte; what comes before is start-up
        rec["startup_s"] = rec["exit_s"] - summary["seconds"]
        rec["cpu_per_gib"] = (user + sys_) / (summary["normal_pages"] * 4096 / GIB)
        for p in (sock, time_path, err_path):
            p.unlink(missing_ok=True)
        return rec

    # -- driver ----------------------------------------------------------------------------

    def run_once(self, variant: str, rep: int) -> dict[str, Any]:
        self.run_no += 1
        base: dict[str, Any] = {"variant": variant, "rep": rep, "ok": False}
        fn = {"qemu-file": self.run_qemu_file, "qemu-socket": self.run_qemu_socket,
              "livemig": self.run_livemig}[variant]

        def body() -> None:
            base.update(fn())
            base["foreign_cores"] = round(base["foreign_cpu_s"] / base["foreign_window_s"], 3)
            extra = ""
            if base.get("active_s") is not None:
                extra += f", active {base['active_s']:.3f} s"
            if variant == "livemig":
                extra += (f", start-up {base['startup_s']:.3f} s, CPU "
                          f"{base['cpu_user_s']:.2f}+{base['cpu_sys_s']:.2f} s")
            extra += f", noise {base['foreign_cores']:.2f}"
            log(f"  rep {rep} {variant:<12} done {base['done_s']:.3f} s{extra}")

        return h.run_guarded(base, f"rep {rep} {variant:<12}", body)


def summarize(runs: list[dict[str, Any]], variants: list[str]) -> dict[str, Any]:
    per = h.variant_medians(runs, variants, (
        "done_s", "active_s", "exit_s", "startup_s", "livemig_seconds", "cpu_user_s",
        "cpu_sys_s", "cpu_per_gib", "src_cpu_s", "dst_cpu_s", "foreign_cores"))
    ratios = {}
    lm = per.get("livemig", {}).get("done_s")
    for ref in ("qemu-file", "qemu-socket"):
        r = per.get(ref, {}).get("done_s")
        if lm is not None and r:
            ratios[f"livemig/{ref}"] = lm / r
    return {"variants": per, "ratios": ratios}


def print_summary(s: dict[str, Any], args: argparse.Namespace, imports: dict[str, float]
                  ) -> None:
    def f(v: float | None, prec: int = 3) -> str:
        return "-" if v is None else f"{v:.{prec}f}"

    print(f"\n{h.fmt_size(args.size)} random guest, multifd {args.channels} channels; "
          f"medians of {args.reps} repetition(s), seconds from the command that starts "
          "the load")
    hdr = (f"  {'variant':<12} {'ok':>3} {'done':>7} {'active':>7} {'CPU u+s':>8} "
           f"{'CPU s/GiB':>9} {'noise':>6}")
    print(hdr)
    print("  " + "-" * (len(hdr) - 2))
    for v, m in s["variants"].items():
        cpu = None
        if v == "livemig" and m.get("cpu_user_s") is not None:
            cpu = m["cpu_user_s"] + m["cpu_sys_s"]
        elif v == "qemu-socket" and m.get("src_cpu_s") is not None:
            cpu = m["src_cpu_s"]  # the sender's
        per_gib = m.get("cpu_per_gib") if v == "livemig" else (
            None if cpu is None else cpu / (args.size / GIB))
        print(f"  {v:<12} {m['ok']:>3} {f(m.get('done_s')):>7} {f(m.get('active_s')):>7} "
              f"{f(cpu, 2):>8} {f(per_gib, 2):>9} {f(m.get('foreign_cores'), 2):>6}"
              + (f"  ({m['discarded_noisy']} noisy run(s) discarded)"
                 if m.get("discarded_noisy") else ""))
    lm = s["variants"].get("livemig", {})
    if lm.get("startup_s") is not None:
        print(f"  livemig send: start-up to its first byte {lm['startup_s']:.3f} s, "
              f"sending {f(lm.get('livemig_seconds'))} s, CPU {lm['cpu_user_s']:.2f} user + "
              f"{lm['cpu_sys_s']:.2f} sys = {lm['cpu_per_gib']:.2f} s/GiB (start-up "
              "included)")
    print(f"  interpreter + imports alone (livemig send on a missing snapshot): "
          f"{imports['wall_s']:.2f} s wall, "
          f"{imports['user_s'] + imports['sys_s']:.2f} s CPU")
    dst = ", ".join(f"{v} {m['dst_cpu_s']:.2f}" for v, m in s["variants"].items()
                    if m.get("dst_cpu_s") is not None)
    print(f"  destination QEMU CPU s: {dst}")
    h.print_ratios(s["ratios"], 1.0, lambda k: k == "livemig/qemu-file")
    print("  done: destination 'completed'; active: destination 'active' (all channels "
          "connected);\n  CPU u+s: livemig's whole process / QEMU source's during the "
          "migration;\n  noise: CPUs other processes used during the run.")


def main(argv: list[str] | None = None) -> int:
    args = h.parse_pair_args(argv, __doc__, VARIANTS, "multifd channels (4)")
    found = h.qemu10_version()
    if found is None:
        return 2

    git = args.livemig_tree.git_head()
    runs: list[dict[str, Any]] = []
    imports: dict[str, float] = {}
    with h.bench_session(args, "lm-bench-send-", h.run_banner(args, git, found)) as session:
        workdir = session["workdir"]
        bench = Bench(args, workdir)
        log(f"capturing a paused guest with {h.fmt_size(args.size)} of random data ...")
        bench.capture()
        subprocess.run(["cat", str(bench.snap)], stdout=subprocess.DEVNULL, check=True)
        imports = bench.import_cpu()
        h.run_interleaved(bench.run_once, args, runs)
    interrupted = session["interrupted"]
    summary = summarize(runs, args.variant_list)
    if imports:
        print_summary(summary, args, imports)
    return h.report_end(runs, args, interrupted, {"git": git, "qemu": found,
                                                   "imports": imports, "summary": summary})

if __name__ == "__main__":
    sys.exit(main())
