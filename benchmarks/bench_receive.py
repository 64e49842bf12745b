#!/usr/bin/env python3
"""Benchmark ``livemig receive`` against a QEMU 10 -> QEMU 10 migration, side by side.

For every scenario and repetition, in one run and interleaved (so drift in the
machine's load hits every variant alike), this migrates the same paused QEMU 10
source guest to:

``qemu``          a QEMU 10 destination (``-incoming defer`` + ``migrate-incoming
                  unix:...``, same machine and RAM size, same multifd settings);
                  QEMU's default lazily allocated RAM;
``qemu-prealloc`` the same with ``-mem-prealloc`` on the destination (its RAM is faulted
                  in before the clock starts; the like-for-like lower bound);
``livemig``       ``livemig receive unix:... -o SNAPSHOT --json`` as a subprocess (the
                  snapshot is fsynced and renamed before it exits 0);
``disk-floor``    not a migration: pwrite the guest's non-zero bytes into a file on the
                  same disk and fsync it -- what writing a snapshot costs at the least.

Times are measured from the ``migrate`` QMP command:

* ``done``      -- ``qemu*``: the destination's MIGRATION event "completed"
                   (query-migrate polling as fallback); ``livemig``: the process exit;
* ``src_done``  -- the source's MIGRATION event "completed" (same fallback);
* ``src_total`` -- the source's own query-migrate ``total-time``;
* livemig also: peak RSS (GNU ``/usr/bin/time`` ``%M``, cross-checked by sampling
  ``VmHWM`` every 50 ms; only the sampling without GNU time), CPU seconds, and its own
  ``seconds`` from ``--json`` (which counts from the start of the command, i.e.
  includes the wait for the source to connect).

Scenarios (``--size`` defaults to 1 GiB, ``--quick`` is 256 MiB):

A  ``--size`` of random data in a guest of ``--size`` + 256 MiB, multifd (the headline)
B  a mostly-zero guest: ``--size`` RAM, a 16 MiB random blob, multifd
C  as A but plain precopy on one channel (no multifd)

Every run kills its QEMUs and livemig and deletes its snapshot, whatever happens; a
failed run is printed (with the peer's stderr tail), recorded in the JSON, excluded from
the medians, and makes the script exit 1.

Usage::

    python benchmarks/bench_receive.py --quick
    python benchmarks/bench_receive.py --reps 3 --json-out results.json
    python benchmarks/bench_receive.py -s A --variants qemu,livemig --profile py-spy

See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import (  # found through sys.path above
    GNU_TIME,
    GUEST_HEADROOM,
    MIB,
    SETTLE_BUSY,
    Blobs,
    QemuPeer,
    RunFailed,
    Scenario,
    add_run_options,
    arg_parser,
    bench_session,
    child_pid,
    foreign_cpu_since,
    foreign_cpu_snapshot,
    log,
    median,
    parse_size,
    pid_cpu_s,
    proc_cpu,
    proc_status_kib,
    proc_status_kib_meminfo,
    qemu10_version,
    ram_info,
    retry_noisy,
    run_banner,
    run_guarded,
    settle,
    start_destination,
    start_source,
    summarize_pyspy,
    tail,
    unix_listening,
    wait_terminal,
)

SMALL_BLOB = 16 << 20  # scenario B's data
VARIANTS = ("qemu", "qemu-prealloc", "livemig", "disk-floor")


# ------------------------------------------------------------------------------------------
# Scenarios
# ------------------------------------------------------------------------------------------


def make_scenarios(size: int, channels: int, compression: str) -> dict[str, Scenario]:
    return {
        "A": Scenario("A", "random guest", size + GUEST_HEADROOM, size, channels, compression),
        "B": Scenario("B", "mostly-zero guest", size, min(SMALL_BLOB, size), channels,
                      compression),
        "C": Scenario("C", "random guest, precopy", size + GUEST_HEADROOM, size, 0, "none"),
    }


# ------------------------------------------------------------------------------------------
# Helpers
# ------------------------------------------------------------------------------------------


def label_threads(pid: int, cpu: dict[int, tuple[float, float]],
                  channels: int) -> list[dict[str, Any]]:
    """livemig's threads with their CPU seconds. Python 3.11 does not name OS threads:
    the main thread has tid == pid, and the multifd receivers are the last ``channels``
    threads created (tids ascend); anything else (e.g. OpenBLAS's) is "other"."""
    others = sorted(t for t in cpu if t != pid)
    multifd = others[-channels:] if channels else []
    out = []
    for tid in [pid, *others]:
        if tid not in cpu:
            continue
        role = ("main" if tid == pid else
                f"multifd-{multifd.index(tid)}" if tid in multifd else "other")
        u, s = cpu[tid]
        if role == "other" and u + s == 0:
            continue
        out.append({"tid": tid, "role": role, "user_s": u, "sys_s": s})
    return out




# ------------------------------------------------------------------------------------------
# One run of each variant
# ------------------------------------------------------------------------------------------


class Bench:
    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.args = args
        self.workdir = workdir
        self.blobs = Blobs(workdir)
        self.snapdir = Path(args.snapshot_dir).resolve() if args.snapshot_dir else workdir
        self.run_no = 0

    # -- the source ----------------------------------------------------------------------

    def source(self, sc: Scenario) -> QemuPeer:
        return start_source(sc, self.blobs.get(sc.data), self.workdir, f"src{self.run_no}")

    def _poll_source(self, src: QemuPeer, t0: float, t0_wall: float, deadline: float,
                     seen: dict[str, float]) -> tuple[float, dict[str, Any]]:
        """Poll the source until it is terminal; return (src_done, final query-migrate)."""
        done, _, info = wait_terminal(src, "source", t0, t0_wall, deadline - t0,
                                      self.args.poll, seen)
        return done, info

    # -- QEMU -> QEMU --------------------------------------------------------------------

    def run_qemu(self, sc: Scenario, prealloc: bool) -> dict[str, Any]:
        sock = str(self.workdir / f"dst{self.run_no}.sock")
        rec: dict[str, Any] = {}
        src = self.source(sc)
        try:
            extra = ["-mem-prealloc"] if prealloc else []
            t_start = time.monotonic()
            dst = start_destination(sc, self.workdir, f"dst{self.run_no}", f"unix:{sock}",
                                    extra_args=tuple(extra))
            rec["dst_start_s"] = round(time.monotonic() - t_start, 3)
            try:
                rec["dst_rss_before_kib"] = proc_status_kib(dst.pid or 0, "VmRSS")
                rec["busy_before"] = settle(self.args.wait_idle)
                rec["loadavg"] = os.getloadavg()[0]
                src_seen: dict[str, float] = {}
                dst_seen: dict[str, float] = {}
                src_cpu0, dst_cpu0 = pid_cpu_s(src.pid), pid_cpu_s(dst.pid)
                foreign0 = foreign_cpu_snapshot()
                t0_wall = time.time()
                t0 = time.monotonic()
                src.migrate(f"unix:{sock}")
                deadline = t0 + self.args.timeout
                # the destination finishes last or nearly so
                done, dst_polled, _ = wait_terminal(dst, "destination", t0, t0_wall,
                                                    self.args.timeout, self.args.poll,
                                                    dst_seen)
                src_done, src_info = self._poll_source(src, t0, t0_wall, deadline, src_seen)
                rec["foreign_cpu_s"] = foreign_cpu_since(foreign0)
                rec["foreign_window_s"] = time.monotonic() - t0
                src_cpu1, dst_cpu1 = pid_cpu_s(src.pid), pid_cpu_s(dst.pid)
                if None not in (src_cpu0, src_cpu1, dst_cpu0, dst_cpu1):
                    rec["src_cpu_s"] = round(src_cpu1 - src_cpu0, 2)  # type: ignore[operator]
                    rec["dst_cpu_s"] = round(dst_cpu1 - dst_cpu0, 2)  # type: ignore[operator]
                rec["done_s"] = done
                rec["done_source"] = "event" if "completed" in dst_seen else "poll"
                rec["dst_polled_s"] = dst_polled
                rec["src_done_s"] = src_done
                rec["src_total_time_ms"] = src_info.get("total-time")
                rec["src_ram"] = ram_info(src_info)
                rec["dst_hwm_kib"] = proc_status_kib(dst.pid or 0, "VmHWM")
                rec["dst_rss_kib"] = proc_status_kib(dst.pid or 0, "VmRSS")
            finally:
                dst.close()
        finally:
            src.close()
            try:
                os.unlink(sock)
            except FileNotFoundError:
                pass
        return rec

    # -- QEMU -> livemig -----------------------------------------------------------------

    def livemig_cmd(self, sc: Scenario, uri: str, snap: str, prof: str | None) -> list[str]:
        cmd = self.args.livemig_tree.command("receive", uri, "-o", snap, "--json")
        if sc.channels:
            cmd += ["--multifd-channels", str(sc.channels),
                    "--multifd-compression", sc.compression]
        if prof is None:
            return cmd
        if self.args.profile == "py-spy":
            spy = shutil.which("py-spy")
            if spy is None:
                raise RunFailed("py-spy is not installed (pip install py-spy)")
            rate = str(self.args.profile_rate)
            extra = ["--idle"] if self.args.profile_idle else []
            if self.args.profile_native:
                extra.append("--native")
            return [spy, "record", "--threads", "-r", rate, *extra, "-f", "raw", "-o", prof,
                    "--", *cmd]
        # cProfile: main thread only (the multifd channel threads are not profiled)
        return [sys.executable, "-m", "cProfile", "-o", prof, *cmd[1:]]

    def run_livemig(self, sc: Scenario, prof: str | None = None) -> dict[str, Any]:
        sock = str(self.workdir / f"lm{self.run_no}.sock")
        snap = self.snapdir / f"snap{self.run_no}.lmsnap"
        out_path = self.workdir / f"livemig{self.run_no}.out"
        err_path = self.workdir / f"livemig{self.run_no}.err"
        time_path = self.workdir / f"livemig{self.run_no}.time"
        rec: dict[str, Any] = {}
        tree = self.args.livemig_tree
        env = tree.env(self.workdir)
        src = self.source(sc)
        proc: subprocess.Popen[bytes] | None = None
        waiter: threading.Thread | None = None
        exited: dict[str, Any] = {}
        hwm = [0]
        target: list[int | None] = [None]
        thread_cpu: dict[int, tuple[float, float]] = {}
        stop_sampling = threading.Event()
        try:
            cmd = self.livemig_cmd(sc, f"unix:{sock}", str(snap), prof)
            rec["cmd"] = cmd
            # Peak RSS: not wait4's ru_maxrss on our own child -- a child that Python
            # vforks inherits *our* high-water mark at exec. GNU time forks from a tiny
            # process, so its %M is livemig's own. Without it, sample VmHWM.
            timed = prof is None and GNU_TIME is not None
            if timed and GNU_TIME is not None:
                cmd = [GNU_TIME, "-f", "%M %e %U %S", "-o", str(time_path), *cmd]
            rec["busy_before"] = settle(self.args.wait_idle)
            with open(out_path, "wb") as out, open(err_path, "wb") as err:
                proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                        cwd=tree.root, env=env, start_new_session=True)
            pid = proc.pid

            def wait_exit() -> None:
                # wait4 instead of Popen.wait: rusage has the CPU times
                _, status, ru = os.wait4(pid, 0)
                exited["t"] = time.monotonic()
                exited["rc"] = os.waitstatus_to_exitcode(status)
                exited["utime"] = ru.ru_utime
                exited["stime"] = ru.ru_stime
                assert proc is not None
                proc.returncode = exited["rc"]
                stop_sampling.set()

            def sample_hwm() -> None:
                # also the CPU time of each thread (the last values seen: approximate)
                while not stop_sampling.wait(0.05):
                    if target[0] is None:  # livemig itself: time's child, or our child
                        target[0] = child_pid(pid) if timed else pid
                        if target[0] is None:
                            continue
                    t = target[0]
                    v = proc_status_kib(t, "VmHWM")
                    if v is not None and v > hwm[0]:
                        hwm[0] = v
                    try:
                        tids = os.listdir(f"/proc/{t}/task")
                    except OSError:
                        continue
                    for tid in tids:
                        c = proc_cpu(f"/proc/{t}/task/{tid}/stat")
                        if c is not None:
                            thread_cpu[int(tid)] = c

            waiter = threading.Thread(target=wait_exit, name="wait-livemig", daemon=True)
            waiter.start()
            threading.Thread(target=sample_hwm, name="hwm", daemon=True).start()
            deadline = time.monotonic() + 30
            while not unix_listening(sock):
                if "rc" in exited:
                    raise RunFailed(f"livemig exited with {exited['rc']} before listening:\n"
                                    f"{tail(err_path.read_text(errors='replace'))}")
                if time.monotonic() > deadline:
                    raise RunFailed(f"livemig is not listening on {sock} after 30 s; its "
                                    f"stderr:\n{tail(err_path.read_text(errors='replace'))}")
                time.sleep(0.01)
            rec["loadavg"] = os.getloadavg()[0]
            seen: dict[str, float] = {}
            src_cpu0 = pid_cpu_s(src.pid)
            lm = target[0] if target[0] is not None else (child_pid(pid) if timed else pid)
            lm_cpu0 = proc_cpu(f"/proc/{lm}/stat") if lm else None
            thread_cpu0 = dict(thread_cpu)
            foreign0 = foreign_cpu_snapshot()
            t0_wall = time.time()
            t0 = time.monotonic()
            src.migrate(f"unix:{sock}")
            deadline = t0 + self.args.timeout
            try:
                src_done, src_info = self._poll_source(src, t0, t0_wall, deadline, seen)
            except RunFailed as e:  # say what livemig said, too
                waiter.join(5.0)
                state = (f"exited with {exited['rc']}" if "rc" in exited
                         else "still running")
                raise RunFailed(f"{e}\nlivemig {state}; its stderr:\n"
                                f"{tail(err_path.read_text(errors='replace'))}") from None
            waiter.join(max(1.0, deadline - time.monotonic()))
            if "rc" not in exited:
                raise RunFailed(f"livemig did not exit within {self.args.timeout:.0f} s of "
                                f"'migrate' (the source completed after {src_done:.2f} s)")
            rec["foreign_cpu_s"] = foreign_cpu_since(foreign0)
            rec["foreign_window_s"] = time.monotonic() - t0
            rec["done_s"] = exited["t"] - t0
            rec["src_done_s"] = src_done
            src_cpu1 = pid_cpu_s(src.pid)
            if src_cpu0 is not None and src_cpu1 is not None:
                rec["src_cpu_s"] = round(src_cpu1 - src_cpu0, 2)
            if lm_cpu0 is not None:  # startup (interpreter, imports) until 'migrate'
                rec["startup_cpu_s"] = round(lm_cpu0[0] + lm_cpu0[1], 2)
            if target[0] is not None and thread_cpu:
                delta = {t: (u - thread_cpu0.get(t, (0.0, 0.0))[0],
                             s_ - thread_cpu0.get(t, (0.0, 0.0))[1])
                         for t, (u, s_) in thread_cpu.items()}
                rec["threads_cpu"] = label_threads(target[0], delta, sc.channels)
                for role in ("main", "multifd"):
                    ts = [t for t in rec["threads_cpu"] if t["role"].startswith(role)]
                    rec[f"{role}_user_s"] = round(sum(t["user_s"] for t in ts), 2)
                    rec[f"{role}_sys_s"] = round(sum(t["sys_s"] for t in ts), 2)
            rec["src_total_time_ms"] = src_info.get("total-time")
            rec["src_ram"] = ram_info(src_info)
            rec["rc"] = exited["rc"]
            rec["cpu_user_s"] = round(exited["utime"], 3)
            rec["cpu_sys_s"] = round(exited["stime"], 3)
            errtext = err_path.read_text(errors="replace")
            if timed:
                try:
                    fields = time_path.read_text().split()
                    rec["peak_rss_kib"] = int(fields[-4])
                    rec["cpu_user_s"] = float(fields[-2])
                    rec["cpu_sys_s"] = float(fields[-1])
                    rec["peak_rss_from"] = "GNU time %M"
                except (OSError, ValueError, IndexError):
                    raise RunFailed(f"no usable GNU time output in {time_path}; livemig "
                                    f"stderr:\n{tail(errtext)}") from None
                rec["hwm_sampled_kib"] = hwm[0] or None
            elif prof is None:
                rec["peak_rss_kib"] = hwm[0] or None
                rec["peak_rss_from"] = "VmHWM sampled every 50 ms"
            if exited["rc"] != 0:
                raise RunFailed(f"livemig exited with {exited['rc']}:\n{tail(errtext)}")
            if not snap.exists():
                raise RunFailed(f"livemig exited 0 but {snap} does not exist")
            rec["snapshot_bytes"] = snap.stat().st_size
            lines = [ln for ln in out_path.read_text(errors="replace").splitlines()
                     if ln.startswith("{")]
            if not lines:
                raise RunFailed(f"livemig printed no JSON summary; stderr:\n{tail(errtext)}")
            summary = json.loads(lines[-1])
            rec["livemig_seconds"] = summary.get("seconds")
            rec["livemig_summary"] = summary
            normal = rec["src_ram"].get("normal")
            if normal is not None and summary.get("normal_pages") != normal:
                raise RunFailed(f"livemig stored {summary.get('normal_pages')} normal pages, "
                                f"the source sent {normal}")
            if self.args.verify:
                rec["verified"] = self.verify(sc, snap)
        finally:
            stop_sampling.set()
            if proc is not None and "rc" not in exited:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except OSError:
                    pass
                if waiter is not None:
                    waiter.join(10)
            src.close()
            for p in (Path(sock), snap, out_path, err_path, time_path):
                try:
                    p.unlink()
                except FileNotFoundError:
                    pass
            for part in self.snapdir.glob(f".{snap.name}.part-*"):
                part.unlink(missing_ok=True)
        return rec

    def verify(self, sc: Scenario, snap: Path) -> bool:
        """Extract pc.ram and compare the blob region (outside the timed window)."""
        raw = self.workdir / f"verify{self.run_no}.raw"
        try:
            tree = self.args.livemig_tree
            subprocess.run(tree.command("extract", str(snap), "--block", "pc.ram", "-o",
                                        str(raw)),
                           check=True, cwd=tree.root, env=tree.env(), capture_output=True)
            with open(raw, "rb") as f:
                for path, addr in self.blobs.get(sc.data):
                    f.seek(addr)
                    want = hashlib.sha256(Path(path).read_bytes()).hexdigest()
                    got = hashlib.sha256(f.read(os.path.getsize(path))).hexdigest()
                    if got != want:
                        raise RunFailed(f"snapshot's pc.ram at {addr:#x} differs from {path}")
                f.seek(0, os.SEEK_END)
                if f.tell() != sc.memory:
                    raise RunFailed(f"pc.ram is {f.tell()} bytes, not {sc.memory}")
        finally:
            raw.unlink(missing_ok=True)
        return True

    # -- disk floor ----------------------------------------------------------------------

    def run_disk_floor(self, sc: Scenario) -> dict[str, Any]:
        path = self.workdir / f"floor{self.run_no}.bin"
        blobs = self.blobs.get(sc.data)
        rec: dict[str, Any] = {"busy_before": settle(self.args.wait_idle),
                               "loadavg": os.getloadavg()[0]}
        chunk = 8 << 20
        foreign0 = foreign_cpu_snapshot()
        t0 = time.monotonic()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            off = 0
            for bpath, _ in blobs:
                with open(bpath, "rb") as f:
                    while True:
                        buf = f.read(chunk)
                        if not buf:
                            break
                        mv = memoryview(buf)
                        while mv:
                            n = os.pwrite(fd, mv, off)
                            mv = mv[n:]
                            off += n
            rec["write_s"] = time.monotonic() - t0
            os.fsync(fd)
        finally:
            os.close(fd)
        rec["done_s"] = time.monotonic() - t0
        rec["foreign_cpu_s"] = foreign_cpu_since(foreign0)
        rec["foreign_window_s"] = time.monotonic() - t0
        rec["bytes"] = off
        path.unlink(missing_ok=True)
        return rec

    # -- driver --------------------------------------------------------------------------

    def run(self, sc: Scenario, variant: str, rep: int) -> list[dict[str, Any]]:
        """One repetition of one variant; re-run (up to --retries times) while other
        processes used more than --max-noise CPUs during it. Returns every attempt."""
        return retry_noisy(lambda: self.run_once(sc, variant, rep), self.args,
                           f"{sc.key} rep {rep} {variant:<13}")

    def run_once(self, sc: Scenario, variant: str, rep: int) -> dict[str, Any]:
        self.run_no += 1
        base: dict[str, Any] = {"scenario": sc.key, "variant": variant, "rep": rep, "ok": False}
        t = time.monotonic()
        run_guarded(base, f"{sc.key} rep {rep} {variant:<13}",
                    lambda: self._run_variant(sc, variant, rep, base))
        base["wall_s"] = round(time.monotonic() - t, 3)
        return base

    def _run_variant(self, sc: Scenario, variant: str, rep: int, base: dict[str, Any]) -> None:
        if variant == "qemu":
            rec = self.run_qemu(sc, prealloc=False)
        elif variant == "qemu-prealloc":
            rec = self.run_qemu(sc, prealloc=True)
        elif variant == "livemig":
            prof = None
            if self.args.profile:
                d = Path(self.args.profile_dir)
                d.mkdir(parents=True, exist_ok=True)
                ext = "txt" if self.args.profile == "py-spy" else "prof"
                prof = str(d.resolve() / f"livemig-{sc.key}-rep{rep}.{self.args.profile}"
                                         f".{ext}")
            rec = self.run_livemig(sc, prof)
            if prof:
                rec["profile"] = prof
                if self.args.profile == "py-spy" and os.path.exists(prof):
                    text = summarize_pyspy(prof)
                    Path(prof + ".summary").write_text(text + "\n")
                    log(text)
        elif variant == "disk-floor":
            rec = self.run_disk_floor(sc)
        else:
            raise ValueError(variant)
        base.update(rec)
        if base.get("foreign_cpu_s") is not None and base.get("foreign_window_s"):
            base["foreign_cores"] = round(base["foreign_cpu_s"] / base["foreign_window_s"], 3)
        extra = ""
        if variant == "livemig" and base.get("peak_rss_kib"):
            extra = (f", source done {base['src_done_s']:.3f} s, "
                     f"peak RSS {base['peak_rss_kib'] / 1024:.0f} MiB")
        elif "src_done_s" in base:
            extra = f", source done {base['src_done_s']:.3f} s"
        if base.get("busy_before", 0) >= SETTLE_BUSY:
            extra += f" [machine {base['busy_before']:.0%} busy before the run]"
        if base.get("foreign_cores", 0) > self.args.max_noise:
            extra += f" [other processes used {base['foreign_cores']:.2f} CPUs]"
        log(f"  {sc.key} rep {rep} {variant:<13} done {base['done_s']:.3f} s{extra}")


# ------------------------------------------------------------------------------------------
# Summary
# ------------------------------------------------------------------------------------------




def summarize(runs: list[dict[str, Any]], scenarios: list[Scenario],
              variants: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for sc in scenarios:
        per: dict[str, Any] = {}
        for v in variants:
            rs = [r for r in runs if r["scenario"] == sc.key and r["variant"] == v
                  and not r.get("discarded")]
            ok = [r for r in rs if r["ok"]]
            m: dict[str, Any] = {"runs": len(rs), "ok": len(ok)}
            noisy = [r for r in runs if r["scenario"] == sc.key and r["variant"] == v
                     and r.get("discarded")]
            if noisy:
                m["discarded_noisy"] = len(noisy)
            for key in ("done_s", "src_done_s", "src_total_time_ms", "livemig_seconds",
                        "peak_rss_kib", "hwm_sampled_kib", "dst_hwm_kib", "cpu_user_s",
                        "cpu_sys_s", "write_s", "src_cpu_s", "dst_cpu_s", "main_user_s",
                        "main_sys_s", "multifd_user_s", "multifd_sys_s", "startup_cpu_s",
                        "foreign_cores"):
                vals = [r[key] for r in ok if r.get(key) is not None]
                if vals:
                    m[key] = median(vals)
                    m[key + "_all"] = vals
            per[v] = m
        ratios: dict[str, float] = {}

        def ratio(name: str, a: str, ka: str, b: str, kb: str,
                  per: dict[str, Any] = per, ratios: dict[str, float] = ratios) -> None:
            x, y = per.get(a, {}).get(ka), per.get(b, {}).get(kb)
            if x is not None and y:
                ratios[name] = x / y

        ratio("livemig_done/qemu_done", "livemig", "done_s", "qemu", "done_s")
        ratio("livemig_done/qemu_prealloc_done", "livemig", "done_s", "qemu-prealloc",
              "done_s")
        ratio("livemig_src_done/qemu_src_done", "livemig", "src_done_s", "qemu", "src_done_s")
        ratio("livemig_src_done/qemu_prealloc_src_done", "livemig", "src_done_s",
              "qemu-prealloc", "src_done_s")
        ratio("qemu_done/qemu_prealloc_done", "qemu", "done_s", "qemu-prealloc", "done_s")
        ratio("livemig_done/disk_floor", "livemig", "done_s", "disk-floor", "done_s")
        out[sc.key] = {"scenario": dataclasses.asdict(sc), "variants": per, "ratios": ratios}
    return out


def print_table(summary: dict[str, Any], scenarios: list[Scenario], reps: int) -> None:
    def s(v: float | None, unit: str = "", scale: float = 1.0, prec: int = 3) -> str:
        return "-" if v is None else f"{v * scale:.{prec}f}{unit}"

    print()
    print(f"Medians over {reps} repetition(s); times in seconds from the 'migrate' command.")
    for sc in scenarios:
        entry = summary[sc.key]
        print()
        print(sc.describe())
        hdr = (f"  {'variant':<14} {'ok':>5} {'done':>8} {'src done':>9} {'src total':>10} "
               f"{'lm secs':>8} {'peak RSS':>10} {'cpu u+s':>8} {'noise':>6}")
        print(hdr)
        print("  " + "-" * (len(hdr) - 2))
        for v, m in entry["variants"].items():
            rss = m.get("peak_rss_kib") or m.get("dst_hwm_kib")
            rss_s = "-" if rss is None else (f"{rss / 1024:.0f} MiB"
                                            + ("" if v == "livemig" else "*"))
            cpu = None
            if m.get("cpu_user_s") is not None:
                cpu = m["cpu_user_s"] + m.get("cpu_sys_s", 0.0)
            print(f"  {v:<14} {m['ok']:>2}/{m['runs']:<2} {s(m.get('done_s')):>8} "
                  f"{s(m.get('src_done_s')):>9} "
                  f"{s(m.get('src_total_time_ms'), scale=1e-3):>10} "
                  f"{s(m.get('livemig_seconds')):>8} {rss_s:>10} {s(cpu, prec=2):>8} "
                  f"{s(m.get('foreign_cores'), prec=2):>6}"
                  + (f"  ({m['discarded_noisy']} noisy run(s) discarded)"
                     if m.get("discarded_noisy") else ""))
        cpu_parts = []
        for v, m in entry["variants"].items():
            if m.get("src_cpu_s") is None:
                continue
            part = f"{v}: source {m['src_cpu_s']:.2f}"
            if m.get("dst_cpu_s") is not None:
                part += f", destination {m['dst_cpu_s']:.2f}"
            if m.get("cpu_user_s") is not None:
                part += (f", livemig {m['cpu_user_s']:.2f} user + "
                         f"{m.get('cpu_sys_s', 0):.2f} sys")
                if m.get("main_user_s") is not None:
                    part += (f" (main thread {m['main_user_s']:.2f}+{m['main_sys_s']:.2f}")
                    if m.get("multifd_user_s") or m.get("multifd_sys_s"):
                        part += (f", multifd threads {m['multifd_user_s']:.2f}+"
                                 f"{m['multifd_sys_s']:.2f}")
                    part += ")"
            cpu_parts.append(part)
        if cpu_parts:
            print("  CPU seconds: " + "; ".join(cpu_parts))
        st = entry["variants"].get("livemig", {}).get("startup_cpu_s")
        if st is not None:
            print(f"  (livemig's CPU before 'migrate', interpreter start and imports: {st:.2f} s;"
                  " its threads' CPU above counts from 'migrate')")
        r = entry["ratios"]
        if r:
            print("  ratios: " + ", ".join(f"{k} = {v:.2f}x" for k, v in r.items()))
        lm = entry["variants"].get("livemig", {})
        if sc.key == "A" and "livemig_done/qemu_done" in r:
            verdict = "OK" if r["livemig_done/qemu_done"] <= 1.1 else "MISSED"
            print(f"  target livemig done <= 1.1x qemu->qemu: {verdict}")
        if lm.get("peak_rss_kib") is not None:
            verdict = "OK" if lm["peak_rss_kib"] < 256 * 1024 else "MISSED"
            print(f"  target livemig peak RSS < 256 MiB: {verdict}")
    print()
    print("  done: qemu* = destination 'completed' (MIGRATION event timestamp); livemig = "
          "process exit\n"
          "        (snapshot fsynced + renamed); disk-floor = pwrite the non-zero data + "
          "fsync.\n"
          "  src done / src total: the source's 'completed' event / its query-migrate "
          "total-time.\n"
          "  lm secs: livemig's own --json 'seconds' (from its start, includes waiting for "
          "QEMU).\n"
          "  peak RSS: livemig's maximum RSS; * = destination QEMU VmHWM (for scale).\n"
          "  cpu u+s: livemig user+system CPU seconds (2-core machine); CPU seconds: used\n"
          "        during the migration (QEMU: from /proc/PID/stat; livemig's threads:\n"
          "        sampled every 50 ms, so approximate).\n"
          "  noise: CPUs that other processes (not this benchmark's) used during the run.")


# ------------------------------------------------------------------------------------------
# Main
# ------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = arg_parser(__doc__)
    p.add_argument("-s", "--scenarios", default="A,B,C",
                   help="comma-separated scenarios: A (random, multifd), B (mostly zero, "
                        "multifd), C (random, precopy); default A,B,C")
    p.add_argument("--size", default=None,
                   help="data size of A/C and RAM size of B (QEMU size syntax; default 1G)")
    p.add_argument("-n", "--reps", type=int, default=None,
                   help="repetitions (default 3; 1 with --quick)")
    p.add_argument("--quick", action="store_true", help="256 MiB and 1 repetition: try it out")
    p.add_argument("--variants", default=",".join(VARIANTS),
                   help=f"comma-separated, from {', '.join(VARIANTS)} (default: all)")
    p.add_argument("--channels", type=int, default=4, help="multifd channels for A/B (4)")
    p.add_argument("--compression", default="none", choices=["none", "zlib", "zstd"],
                   help="multifd compression for A/B (none)")
    add_run_options(p, max_noise=0.1, poll=0.01)
    p.add_argument("--snapshot-dir", metavar="DIR",
                   help="where livemig writes its snapshots (default: the work directory); "
                        "e.g. /dev/shm to take the disk out of the measurement")
    p.add_argument("--verify", action="store_true",
                   help="after each livemig run, extract pc.ram and compare it with the blob "
                        "(outside the timed window)")
    p.add_argument("--profile", choices=["py-spy", "cprofile"],
                   help="run livemig under a profiler (its timings then carry the profiler's "
                        "overhead and no RSS); cprofile sees the main thread only")
    p.add_argument("--profile-dir", default="bench-profiles",
                   help="where profiles go (default ./bench-profiles)")
    p.add_argument("--profile-rate", type=int, default=250, help="py-spy samples/s (250)")
    p.add_argument("--profile-idle", action="store_true",
                   help="py-spy --idle: also sample threads blocked in system calls")
    p.add_argument("--profile-native", action="store_true", help="py-spy --native")
    a = p.parse_args(argv)
    a.size = parse_size(a.size or ("256M" if a.quick else "1G"))
    if a.reps is None:
        a.reps = 1 if a.quick else 3
    a.scenario_keys = [x.strip().upper() for x in a.scenarios.split(",") if x.strip()]
    a.variant_list = [x.strip() for x in a.variants.split(",") if x.strip()]
    bad = [x for x in a.scenario_keys if x not in "ABC" or len(x) != 1]
    if bad:
        p.error(f"unknown scenario(s) {bad}")
    bad = [x for x in a.variant_list if x not in VARIANTS]
    if bad:
        p.error(f"unknown variant(s) {bad}; known: {', '.join(VARIANTS)}")
    if a.reps < 1:
        p.error("--reps must be >= 1")
    if a.size < 32 * MIB or a.size % MIB:
        p.error("--size must be a whole number of MiB, at least 32M")
    return a


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    found = qemu10_version()
    if found is None:
        return 2
    all_sc = make_scenarios(args.size, args.channels, args.compression)
    scenarios = [all_sc[k] for k in args.scenario_keys]
    git = args.livemig_tree.git_head()
    runs: list[dict[str, Any]] = []
    started = time.time()
    with bench_session(args, "lm-bench-", run_banner(args, git, found)) as session:
        workdir = session["workdir"]
        bench = Bench(args, workdir)
        for sc in scenarios:
            log(sc.describe())
            bench.blobs.get(sc.data)
            for rep in range(1, args.reps + 1):
                for v in args.variant_list:
                    runs.extend(bench.run(sc, v, rep))
    interrupted = session["interrupted"]
    summary = summarize(runs, scenarios, args.variant_list)
    print_table(summary, scenarios, args.reps)
    failed = [r for r in runs if not r["ok"]]
    if failed:
        print(f"\n{len(failed)} run(s) FAILED:")
        for r in failed:
            print(f"  {r['scenario']} rep {r['rep']} {r['variant']}: {r['error']}")
    if args.json_out:
        doc = {
            "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)),
            "host": {"cpus": os.cpu_count(), "python": platform.python_version(),
                     "kernel": platform.release(), "qemu": found,
                     "mem_total_kib": proc_status_kib_meminfo()},
            "args": {k: v for k, v in vars(args).items()},
            "git": git,
            "interrupted": interrupted,
            "summary": summary,
            "runs": runs,
        }
        Path(args.json_out).write_text(json.dumps(doc, indent=2, default=str) + "\n")
        log(f"wrote {args.json_out}")
    return 1 if failed or interrupted else 0




if __name__ == "__main__":
    sys.exit(main())
