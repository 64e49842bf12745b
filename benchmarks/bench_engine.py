#!/usr/bin/env python3
"""Benchmark livemig -> livemig live migration against QEMU 10 -> QEMU 10, side by side.

Issue 4's speed floor: an idle machine of ``--size`` (1 GiB) random RAM migrated over
multifd must go livemig -> livemig at least as fast as QEMU 10 -> QEMU 10 with the same
guest size and channels. For every channel count (``--channels``, default 1,2,4,8) and
repetition (``--reps``, default 3) this runs, alternating in one pass so that drift in
the machine's load hits every variant alike:

``qemu``          QEMU 10 -> QEMU 10: the source paused (``-S``) with ``--size`` - 1 MiB
                  of random data loaded at 1 MiB (``-device loader``), the destination
                  ``-incoming defer``; QEMU's default lazily allocated destination RAM
                  (every page is faulted and zeroed while the data arrives);
``qemu-prealloc`` the same with ``-mem-prealloc`` on the destination (its RAM is faulted
                  in before the clock starts);
``livemig``       ``livemig run --fill random`` (idle: no workload) -> ``livemig run
                  --incoming defer -S``; livemig's destination faults its RAM in while it
                  waits for the source, so it compares with ``qemu-prealloc`` like for
                  like, and with ``qemu`` as the issue asks.

Both kinds of machine are driven the same way, through one QMP client
(``livemig.io.qmp_peer.QmpPeer``; QEMU gets a second monitor socket for it):
capabilities multifd + events and ``multifd-channels`` / ``multifd-compression`` on
both, ``max-bandwidth`` 0 (unlimited) on the source, ``migrate-incoming unix:...``,
then -- once the destination's CPU is quiet (livemig's pre-fault done) and the machine
is idle -- ``migrate``. Measured per run:

* ``total-time`` / ``downtime`` -- the source's own query-migrate figures;
* ``src wall`` / ``dst wall`` -- seconds from sending ``migrate`` until query-migrate
  (polled every ``--poll`` seconds, in the same loop for both sides) first says
  "completed" on the source / on the destination;
* throughput -- the source's ``ram.transferred`` over ``dst wall``;
* CPU seconds per GiB -- utime + stime from /proc/PID/stat of the source and the
  destination process, read just before ``migrate`` and after both completed, per GiB
  of ``ram.transferred``.

A run during which other processes used more than ``--max-noise`` CPUs is run again (up
to ``--retries`` times); every attempt stays in the JSON. Every run kills its machines
and deletes its sockets whatever happens.

Usage::

    python benchmarks/bench_engine.py --quick
    python benchmarks/bench_engine.py --json-out engine.json
    python benchmarks/bench_engine.py --channels 4 -n 5 --variants qemu,livemig
    python benchmarks/bench_engine.py --channels 4 -n 1 --variants livemig --profile-dir prof

See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import select
import shutil
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness as h  # noqa: E402 - found through sys.path above
from harness import (  # noqa: E402
    GIB,
    MIB,
    MIGRATION_TERMINAL_STATES,
    QemuPeer,
    RunFailed,
    log,
    parse_size,
)

from livemig.io.qmp_peer import QmpPeer  # noqa: E402 - the benchmark's own QMP client

VARIANTS = ("qemu", "qemu-prealloc", "livemig")
#: Seconds a livemig machine may take to start (imports, filling its RAM with random data).
START_TIMEOUT = 120.0
#: The destination counts as settled once it used less CPU than this over QUIET_WINDOW
#: (livemig's destination faults its RAM in after migrate-incoming, in its own thread).
QUIET_CPU_S = 0.02
QUIET_WINDOW = 0.2
QUIET_TIMEOUT = 60.0


# ------------------------------------------------------------------------------------------
# The machines: QEMU (through tests/peers.py) and `livemig run`, both behind a QmpPeer
# ------------------------------------------------------------------------------------------


class QemuMachine:
    """A QEMU 10 started by :class:`peers.QemuPeer`, with a second QMP monitor that the
    benchmark polls with the same client it uses for livemig."""

    def __init__(self, workdir: Path, name: str, memory: int, *,
                 blobs: list[tuple[str, int]] | None = None, incoming: bool = False,
                 prealloc: bool = False) -> None:
        path = workdir / f"{name}.qmp"
        extra = ["-chardev", f"socket,id=bench,path={path},server=on,wait=off",
                 "-mon", "chardev=bench,mode=control"]
        if prealloc:
            extra.append("-mem-prealloc")
        self.peer = QemuPeer(h.QEMU, machine=h.MACHINE, memory=f"{memory // MIB}M",
                             blobs=blobs or [], incoming="defer" if incoming else None, paused=True,
                             extra_args=extra, workdir=workdir, name=name, start_timeout=120)
        try:
            self.qmp = QmpPeer(f"unix:{path}", peer=f"QEMU {name}")
        except BaseException:
            self.peer.close()
            raise
        self.pid = self.peer.pid

    def tail(self) -> str:
        return h.tail(self.peer.stderr_text())

    def close(self) -> None:
        self.qmp.close()
        self.peer.close()


class LivemigMachine:
    """A ``livemig run`` process (its own session, so that it is killed as a group)."""

    def __init__(self, tree: h.LivemigTree, workdir: Path, name: str, memory: int, *,
                 incoming: bool, paused: bool, fill_random: bool) -> None:
        self.err_path = workdir / f"{name}.err"
        cmd = tree.command("run", "--memory", str(memory), "--qmp",
                           f"unix:{workdir / (name + '.qmp')}", "--print-ready")
        if fill_random:
            cmd += ["--fill", "random"]
        if incoming:
            cmd += ["--incoming", "defer"]
        if paused:
            cmd.append("-S")
        with open(self.err_path, "wb") as err:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                         stderr=err, cwd=tree.root, env=tree.env(workdir),
                                         start_new_session=True)
        self.pid = self.proc.pid
        self.qmp: QmpPeer | None = None
        try:
            info = json.loads(self._ready_line())
            self.qmp = QmpPeer(info["qmp"], peer=f"livemig {name}")
        except BaseException:
            self.close()
            raise

    def _ready_line(self) -> bytes:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        buf = b""
        deadline = time.monotonic() + START_TIMEOUT
        while b"\n" not in buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise RunFailed(f"livemig run did not print ready within {START_TIMEOUT:.0f} s:"
                                f"\n{self.tail()}")
            if select.select([fd], [], [], min(left, 0.5))[0]:
                chunk = os.read(fd, 4096)
                if not chunk:
                    raise RunFailed(f"livemig run exited with {self.proc.wait()} before it was "
                                    f"ready:\n{self.tail()}")
                buf += chunk
        return buf.split(b"\n", 1)[0]

    def tail(self) -> str:
        return h.tail(self.err_path.read_text(errors="replace"))

    def close(self) -> None:
        if self.qmp is not None:
            try:
                self.qmp.cmd("quit")
            except Exception:  # noqa: BLE001,S110 - it may be gone already; killed below
                pass
            self.qmp.close()
        try:
            self.proc.wait(10 if self.qmp is not None else 0)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except OSError:
                pass
            self.proc.wait(10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


Machine = QemuMachine | LivemigMachine


def system_busy_s() -> float:
    """CPU seconds all CPUs spent busy since boot (/proc/stat, all but idle + iowait)."""
    return h.cpu_times()[0] / h.CLK_TCK


def wait_cpu_quiet(pid: int | None) -> float:
    """Wait until ``pid`` used less than QUIET_CPU_S over QUIET_WINDOW; return the wait."""
    t0 = time.monotonic()
    last = h.pid_cpu_s(pid)
    while time.monotonic() - t0 < QUIET_TIMEOUT:
        time.sleep(QUIET_WINDOW)
        now = h.pid_cpu_s(pid)
        if last is None or now is None or now - last < QUIET_CPU_S:
            break
        last = now
    return time.monotonic() - t0


class Profiler:
    """``py-spy record --pid`` attached to one process for the migration window only
    (non-blocking sampling, so the process is not stopped for each sample)."""

    def __init__(self, pid: int, out: Path, rate: int) -> None:
        spy = shutil.which("py-spy")
        if spy is None:
            raise RunFailed("--profile-dir needs py-spy (pip install py-spy)")
        self.out = out
        self.proc = subprocess.Popen(
            [spy, "record", "--pid", str(pid), "--threads", "--nonblocking", "-r", str(rate),
             "-f", "raw", "-o", str(out)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        time.sleep(0.5)  # let it attach before the clock starts

    def stop(self) -> str:
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if self.out.exists():
            return h.summarize_pyspy(str(self.out))
        err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
        return f"py-spy wrote no profile: {err.strip()}"


# ------------------------------------------------------------------------------------------
# One run
# ------------------------------------------------------------------------------------------


class Bench:
    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.args = args
        self.workdir = workdir
        self.blobs = h.Blobs(workdir)
        self.run_no = 0

    def data_size(self) -> int:
        """QEMU's random data: the whole guest but the first MiB (below the loader)."""
        return self.args.size - h.BLOB_ADDR

    def start(self, variant: str, role: str) -> Machine:
        name = f"{role}{self.run_no}"
        if variant == "livemig":
            return LivemigMachine(self.args.livemig_tree, self.workdir, name, self.args.size,
                                  incoming=role == "dst",
                                  paused=role == "dst" or self.args.livemig_source_paused,
                                  fill_random=role == "src")
        if role == "src":
            return QemuMachine(self.workdir, name, self.args.size,
                               blobs=self.blobs.get(self.data_size()))
        return QemuMachine(self.workdir, name, self.args.size, incoming=True,
                           prealloc=variant == "qemu-prealloc")

    def run(self, channels: int, variant: str, rep: int) -> list[dict[str, Any]]:
        """One repetition, re-run while other processes used more than --max-noise CPUs
        during it (up to --retries times). Returns every attempt."""
        return h.retry_noisy(lambda: self.run_once(channels, variant, rep), self.args,
                             f"{channels} ch rep {rep} {variant:<13}", noise_key="other_cores")

    def run_once(self, channels: int, variant: str, rep: int) -> dict[str, Any]:
        self.run_no += 1
        rec: dict[str, Any] = {"channels": channels, "variant": variant, "rep": rep,
                               "ok": False}
        t = time.monotonic()
        machines: list[Machine] = []
        sock = self.workdir / f"mig{self.run_no}.sock"
        profilers: dict[str, Profiler] = {}
        try:
            dst = self.start(variant, "dst")
            machines.append(dst)
            src = self.start(variant, "src")
            machines.append(src)
            rec.update(self.migrate(src, dst, channels, sock, variant, profilers))
            rec["ok"] = True
            log(f"  {channels} ch rep {rep} {variant:<13} dst wall {rec['dst_wall_s']:.3f} s, "
                f"total-time {rec['src_total_time_ms']} ms, CPU/GiB src "
                f"{rec['src_cpu_per_gib']:.2f} dst {rec['dst_cpu_per_gib']:.2f}"
                + (f" [other processes used {rec['other_cores']:.2f} CPUs]"
                   if rec["other_cores"] > self.args.max_noise else ""))
        except KeyboardInterrupt:
            raise
        except BaseException as e:  # noqa: BLE001 - pytest.fail from peers is BaseException
            rec["error"] = f"{type(e).__name__}: {e}"
            rec["traceback"] = traceback.format_exc()
            for m in machines:
                rec["error"] += f"\n{type(m).__name__} pid {m.pid} output:\n{m.tail()}"
            log(f"  {channels} ch rep {rep} {variant:<13} FAILED: {rec['error']}")
        finally:
            for role, p in profilers.items():
                text = p.stop()
                rec[f"{role}_profile"] = str(p.out)
                Path(str(p.out) + ".summary").write_text(text + "\n")
                log(f"  {role} profile:\n{text}")
            for m in reversed(machines):
                m.close()
            sock.unlink(missing_ok=True)
        rec["wall_s"] = round(time.monotonic() - t, 3)
        return rec

    def migrate(self, src: Machine, dst: Machine, channels: int, sock: Path, variant: str,
                profilers: dict[str, Profiler]) -> dict[str, Any]:
        assert src.qmp is not None and dst.qmp is not None
        args = self.args
        rec: dict[str, Any] = {}
        caps = [{"capability": "multifd", "state": True},
                {"capability": "events", "state": True}]
        for m in (dst, src):
            m.qmp.cmd("migrate-set-capabilities", capabilities=caps)
            m.qmp.cmd("migrate-set-parameters", **{"multifd-channels": channels,
                                                   "multifd-compression": args.compression})
        src.qmp.cmd("migrate-set-parameters", **{"max-bandwidth": 0})
        uri = f"unix:{sock}"
        dst_cpu_incoming = h.pid_cpu_s(dst.pid)
        dst.qmp.cmd("migrate-incoming", uri=uri)
        deadline = time.monotonic() + 30
        while not h.unix_listening(str(sock)):
            if time.monotonic() > deadline:
                raise RunFailed(f"the destination does not listen on {sock} after 30 s")
            time.sleep(0.01)
        rec["dst_quiet_wait_s"] = round(wait_cpu_quiet(dst.pid), 3)
        rec["dst_rss_before_kib"] = h.proc_status_kib(dst.pid or 0, "VmRSS")
        rec["busy_before"] = round(h.settle(args.wait_idle), 3)
        rec["loadavg"] = os.getloadavg()
        if args.profile_dir and variant == "livemig":
            d = Path(args.profile_dir).resolve()
            d.mkdir(parents=True, exist_ok=True)
            for role, m in (("src", src), ("dst", dst)):
                out = d / f"livemig-{role}-{channels}ch-run{self.run_no}.txt"
                profilers[role] = Profiler(m.pid or 0, out, args.profile_rate)
        if isinstance(dst, LivemigMachine) and dst_cpu_incoming is not None:
            # livemig's pre-fault, outside the clock (QEMU's -mem-prealloc: at start-up)
            rec["dst_cpu_before_s"] = round((h.pid_cpu_s(dst.pid) or 0.0)
                                            - dst_cpu_incoming, 3)
        ours = [src.pid, dst.pid, *(p.proc.pid for p in profilers.values())]
        split0 = [h.proc_cpu(f"/proc/{pid}/stat") for pid in ours[:2]]
        cpu0 = [h.pid_cpu_s(pid) for pid in ours]
        busy0, self0 = system_busy_s(), sum(os.times()[:2])
        t0 = time.monotonic()
        src.qmp.cmd("migrate", uri=uri)
        done: dict[str, float] = {}
        final: dict[str, dict[str, Any]] = {}
        deadline = t0 + args.timeout
        while len(done) < 2:  # the same loop, the same client for both sides
            for role, m in (("src", src), ("dst", dst)):
                if role in done:
                    continue
                info = m.qmp.cmd("query-migrate")
                if info.get("status") in MIGRATION_TERMINAL_STATES:
                    done[role] = time.monotonic() - t0
                    final[role] = info
                    if info["status"] != "completed":
                        raise RunFailed(f"{role} migration {info['status']}: "
                                        f"{info.get('error-desc', '?')}")
            if time.monotonic() > deadline:
                raise RunFailed(f"not completed after {args.timeout:.0f} s "
                                f"(completed: {sorted(done) or 'neither'})")
            time.sleep(args.poll)
        elapsed = time.monotonic() - t0
        cpu1 = [h.pid_cpu_s(pid) for pid in ours]
        split1 = [h.proc_cpu(f"/proc/{pid}/stat") for pid in ours[:2]]
        if None in cpu0 or None in cpu1:
            raise RunFailed("cannot read the source's or the destination's CPU time")
        used = sum(cpu1) - sum(cpu0) + sum(os.times()[:2]) - self0  # type: ignore[arg-type]
        rec["other_cores"] = round(max(0.0, system_busy_s() - busy0 - used) / elapsed, 3)
        info = src.qmp.cmd("query-migrate")  # final figures (identical once completed)
        ram = info.get("ram", {})
        rec["src_wall_s"] = round(done["src"], 4)
        rec["dst_wall_s"] = round(done["dst"], 4)
        rec["src_total_time_ms"] = info.get("total-time")
        rec["src_setup_time_ms"] = info.get("setup-time")
        rec["downtime_ms"] = info.get("downtime")
        rec["src_ram"] = h.ram_info(info)
        rec["transferred"] = int(ram.get("transferred", 0))
        rec["dst_ram"] = h.ram_info(final["dst"])
        gib = rec["transferred"] / GIB
        rec["throughput_mib_s"] = round(rec["transferred"] / MIB / done["dst"], 1)
        for i, role in enumerate(("src", "dst")):
            rec[f"{role}_cpu_s"] = round(cpu1[i] - cpu0[i], 3)  # type: ignore[operator]
            a, b = split0[i], split1[i]
            if a is not None and b is not None:
                rec[f"{role}_user_s"] = round(b[0] - a[0], 3)
                rec[f"{role}_sys_s"] = round(b[1] - a[1], 3)
            rec[f"{role}_cpu_per_gib"] = round(rec[f"{role}_cpu_s"] / gib, 3) if gib else None
        rec["dst_hwm_kib"] = h.proc_status_kib(dst.pid or 0, "VmHWM")
        return rec


# ------------------------------------------------------------------------------------------
# Summary
# ------------------------------------------------------------------------------------------

SUMMARY_KEYS = ("src_wall_s", "dst_wall_s", "src_total_time_ms", "downtime_ms", "transferred",
                "throughput_mib_s", "src_cpu_s", "dst_cpu_s", "src_cpu_per_gib",
                "dst_cpu_per_gib", "dst_cpu_before_s", "src_user_s", "src_sys_s", "dst_user_s",
                "dst_sys_s", "other_cores", "busy_before")
RATIO_KEYS = ("src_total_time_ms", "src_wall_s", "dst_wall_s", "src_cpu_per_gib",
              "dst_cpu_per_gib")


def summarize(runs: list[dict[str, Any]], channel_list: list[int],
              variants: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for ch in channel_list:
        per = h.variant_medians([r for r in runs if r["channels"] == ch], variants,
                                 SUMMARY_KEYS)
        ratios: dict[str, float] = {}
        for ref in ("qemu", "qemu-prealloc"):
            for key in RATIO_KEYS:
                a, b = per.get("livemig", {}).get(key), per.get(ref, {}).get(key)
                if a is not None and b:
                    ratios[f"livemig/{ref} {key}"] = round(a / b, 3)
        out[str(ch)] = {"variants": per, "ratios": ratios}
    return out


def print_table(summary: dict[str, Any], args: argparse.Namespace) -> None:
    def f(v: float | None, prec: int = 3, scale: float = 1.0) -> str:
        return "-" if v is None else f"{v * scale:.{prec}f}"

    print()
    print(f"Idle {h.fmt_size(args.size)} random guest, multifd, compression "
          f"{args.compression}; medians of {args.reps} repetition(s); seconds from 'migrate'.")
    hdr = (f"{'ch':>3} {'variant':<14} {'ok':>5} {'total-time':>10} {'src wall':>9} "
           f"{'dst wall':>9} {'downtime':>9} {'MiB/s':>7} {'CPU s/GiB src':>14} "
           f"{'dst':>6} {'noise':>6}")
    print(hdr)
    print("-" * len(hdr))
    for ch, entry in summary.items():
        for v, m in entry["variants"].items():
            print(f"{ch:>3} {v:<14} {m['ok']:>2}/{m['runs']:<2} "
                  f"{f(m.get('src_total_time_ms'), scale=1e-3):>10} "
                  f"{f(m.get('src_wall_s')):>9} {f(m.get('dst_wall_s')):>9} "
                  f"{f(m.get('downtime_ms'), prec=0):>7}ms {f(m.get('throughput_mib_s'), 0):>7} "
                  f"{f(m.get('src_cpu_per_gib'), 2):>14} {f(m.get('dst_cpu_per_gib'), 2):>6} "
                  f"{f(m.get('other_cores'), 2):>6}"
                  + (f"  ({m['discarded_noisy']} noisy run(s) discarded)"
                     if m.get("discarded_noisy") else ""))
        r = entry["ratios"]
        for ref in ("qemu", "qemu-prealloc"):
            parts = [f"{key.split()[-1].removesuffix('_s').removesuffix('_ms')} "
                     f"{r[key]:.2f}x" for key in (f"livemig/{ref} {k}" for k in RATIO_KEYS)
                     if key in r]
            if parts:
                print(f"    livemig / {ref}: " + ", ".join(parts))
        split = [f"{v} {m['src_user_s']:.2f}+{m['src_sys_s']:.2f} / "
                 f"{m['dst_user_s']:.2f}+{m['dst_sys_s']:.2f}"
                 for v, m in entry["variants"].items() if m.get("src_user_s") is not None
                 and m.get("dst_user_s") is not None]
        if split:
            print("    CPU s user+sys, source / destination: " + "; ".join(split))
        before = entry["variants"].get("livemig", {}).get("dst_cpu_before_s")
        if before is not None:
            print(f"    livemig's destination used {before:.2f} CPU s before 'migrate' "
                  "(faulting its RAM in; not in the CPU/GiB above)")
        if "livemig/qemu dst_wall_s" in r:
            ok = r["livemig/qemu dst_wall_s"] <= 1.0 and r.get(
                "livemig/qemu src_total_time_ms", 0.0) <= 1.0
            print(f"    speed floor (livemig at least as fast as QEMU -> QEMU): "
                  f"{'OK' if ok else 'MISSED'}")
    print()
    print("  total-time / downtime: the source's query-migrate; src/dst wall: 'migrate' until\n"
          "  query-migrate first said completed on that side (polled every "
          f"{args.poll * 1000:.0f} ms, same loop and client\n"
          "  for both kinds); MiB/s: source ram.transferred / dst wall; CPU s/GiB: utime+stime\n"
          "  of the source / destination process from 'migrate' to completion, per GiB of\n"
          "  ram.transferred; noise: CPUs busy during the run beyond the two machines and\n"
          "  this script (/proc/stat).\n"
          "  QEMU's destination faults its RAM lazily (qemu) or before the clock (qemu-prealloc,\n"
          "  -mem-prealloc); livemig's destination faults its RAM in while it waits, before\n"
          "  the clock.")


# ------------------------------------------------------------------------------------------
# Main
# ------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = h.arg_parser(__doc__)
    p.add_argument("--size", default=None, help="guest RAM (QEMU size syntax; default 1G)")
    p.add_argument("--channels", default=None,
                   help="comma-separated multifd channel counts (default 1,2,4,8; 4 with "
                        "--quick)")
    p.add_argument("-n", "--reps", type=int, default=None,
                   help="repetitions (default 3; 1 with --quick)")
    p.add_argument("--quick", action="store_true",
                   help="256 MiB, 1 repetition, 4 channels: a smoke run")
    p.add_argument("--variants", default=",".join(VARIANTS),
                   help=f"comma-separated, from {', '.join(VARIANTS)} (default: all)")
    p.add_argument("--compression", default="none", choices=["none", "zstd"],
                   help="multifd compression (none)")
    p.add_argument("--livemig-source-paused", action="store_true",
                   help="start livemig's source with -S like QEMU's (default: running, idle)")
    h.add_run_options(p, max_noise=0.15, poll=0.01,
                       noise_help="other processes (all CPUs' busy time in /proc/stat, less "
                                  "what the two machines and this script used) used",
                       poll_help="; livemig answers each poll in Python, so a much shorter "
                                 "one costs it measurable CPU")
    p.add_argument("--profile-dir", metavar="DIR",
                   help="attach py-spy (raw stacks, every thread) to both livemig processes "
                        "for the migration window and write the profiles here; those runs' "
                        "times carry py-spy's overhead")
    p.add_argument("--profile-rate", type=int, default=200, help="py-spy samples/s (200)")
    a = p.parse_args(argv)
    a.size = parse_size(a.size or ("256M" if a.quick else "1G"))
    a.channels = a.channels or ("4" if a.quick else "1,2,4,8")
    try:
        a.channel_list = [int(x) for x in a.channels.split(",") if x.strip()]
    except ValueError:
        p.error(f"--channels: not a list of numbers: {a.channels}")
    if not a.channel_list or any(not 1 <= c <= 255 for c in a.channel_list):
        p.error("--channels: each count must be between 1 and 255")
    if a.reps is None:
        a.reps = 1 if a.quick else 3
    if a.reps < 1:
        p.error("--reps must be >= 1")
    a.variant_list = [x.strip() for x in a.variants.split(",") if x.strip()]
    bad = [x for x in a.variant_list if x not in VARIANTS]
    if bad:
        p.error(f"unknown variant(s) {bad}; known: {', '.join(VARIANTS)}")
    if a.size < 32 * MIB or a.size % MIB or a.size - h.BLOB_ADDR > h.MAX_LOADER_BLOB:
        p.error("--size must be a whole number of MiB from 32M to 1G + 1M (one loader blob)")
    return a


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    found = h.qemu10_version()
    if found is None:
        return 2
    git = args.livemig_tree.git_head()
    load = os.getloadavg()
    runs: list[dict[str, Any]] = []
    started = time.time()
    with h.bench_session(args, "lm-engine-",
                         f"{h.run_banner(args, git, found)}, load average {load[0]:.2f} "
                         f"{load[1]:.2f} {load[2]:.2f}") as session:
        bench = Bench(args, session["workdir"])
        if any(v.startswith("qemu") for v in args.variant_list):
            bench.blobs.get(bench.data_size())
        for ch in args.channel_list:
            log(f"{ch} channel(s)")
            for rep in range(1, args.reps + 1):
                for v in args.variant_list:
                    runs.extend(bench.run(ch, v, rep))
    interrupted = session["interrupted"]
    summary = summarize(runs, args.channel_list, args.variant_list)
    print_table(summary, args)
    failed = [r for r in runs if not r["ok"]]
    for r in failed:
        print(f"FAILED: {r['channels']} ch rep {r['rep']} {r['variant']}: "
              f"{r['error'].splitlines()[0]}")
    end_load = os.getloadavg()
    print(f"load average before {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}, after "
          f"{end_load[0]:.2f} {end_load[1]:.2f} {end_load[2]:.2f} ({os.cpu_count()} CPUs)")
    if args.json_out:
        doc = {
            "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)),
            "host": {"cpus": os.cpu_count(), "python": platform.python_version(),
                     "kernel": platform.release(), "qemu": found,
                     "loadavg_before": load, "loadavg_after": end_load},
            "args": vars(args),
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
