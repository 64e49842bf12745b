"""What the QEMU benchmarks here share: scenarios and guests, QEMU peers, the clock and
CPU probes, quiet-machine waits and noisy-run retries, the run options, medians, and the
livemig tree a benchmark runs.

``bench_receive``, ``bench_send``, ``bench_relay``, ``bench_engine``,
``bench_device_state`` and ``bench_dirty_kernel`` import it (``import harness as h``);
``compare_trees`` runs them. Importing it puts this checkout's ``tests/`` (for
``peers``, the QEMU harness of the tests) and its root (for in-process imports of
``livemig``) first on ``sys.path``.

The livemig that a benchmark *runs* as a command line is a :class:`LivemigTree`:
``--livemig-tree DIR`` (every benchmark has it; default this checkout) runs ``DIR``'s
livemig with this interpreter, ``DIR`` first on ``PYTHONPATH`` and as the working
directory (``python -m`` and ``-c`` put the working directory before ``PYTHONPATH``).
So one checkout's benchmarks can measure another checkout's livemig, which is how
``compare_trees.py`` puts a change and its parent side by side.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import json
import os
import platform
import re
import shutil
import signal
import stat
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from peers import (  # noqa: E402 - tests/ is not a package: found through sys.path above
    MIGRATION_TERMINAL_STATES,
    QEMU_BINARIES,
    QemuPeer,
    make_blob,
    parse_size,
    qemu_version,
)

QEMU = "10.0"
MACHINE = "pc"
BLOB_ADDR = 0x100000  # 1 MiB: above the legacy VGA/BIOS holes
MAX_LOADER_BLOB = 1 << 30  # one -device loader takes at most 2 GiB; use 1 GiB pieces
GUEST_HEADROOM = 256 << 20  # guest RAM = data + this (bench_receive A/C, send, relay)
MAX_BANDWIDTH = 100 << 30  # bytes/s: never the limit
MIB = 1 << 20
GIB = 1 << 30
GNU_TIME = "/usr/bin/time" if os.access("/usr/bin/time", os.X_OK) else None

__all__ = [  # peers' names that the benchmarks use through the harness
    "MIGRATION_TERMINAL_STATES",
    "QEMU_BINARIES",
    "QemuPeer",
    "parse_size",
    "qemu_version",
]


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def fmt_size(n: int) -> str:
    if n >= 1 << 30 and n % (1 << 30) == 0:
        return f"{n >> 30} GiB"
    return f"{n / MIB:g} MiB"


# ------------------------------------------------------------------------------------------
# Guests
# ------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Scenario:
    key: str
    title: str
    memory: int  # guest RAM, bytes
    data: int  # random bytes loaded at BLOB_ADDR
    channels: int  # 0 = precopy, no multifd
    compression: str

    def describe(self) -> str:
        mode = (f"multifd {self.channels} ch, {self.compression}" if self.channels
                else "precopy, 1 channel")
        return (f"{self.key}: {self.title} -- {fmt_size(self.data)} random in "
                f"{fmt_size(self.memory)} RAM, {mode}")


class Blobs:
    """Random blob files (one per data size), split into loader-sized pieces."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self._made: dict[int, list[tuple[str, int]]] = {}

    def get(self, size: int) -> list[tuple[str, int]]:
        if size not in self._made:
            pieces = []
            done = 0
            while done < size:
                n = min(MAX_LOADER_BLOB, size - done)
                path = self.workdir / f"blob-{size}-{done}.bin"
                log(f"  making blob {path.name} ({fmt_size(n)})")
                make_blob(path, n, seed=1000 + done // MAX_LOADER_BLOB)
                pieces.append((str(path), BLOB_ADDR + done))
                done += n
            self._made[size] = pieces
        return self._made[size]


# ------------------------------------------------------------------------------------------
# The livemig that runs
# ------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LivemigTree:
    """A livemig source tree (a checkout or a git worktree) whose command line a benchmark
    runs, with this interpreter (the same numpy, zstandard, Python for every tree)."""

    root: Path

    def __str__(self) -> str:
        return str(self.root)

    def command(self, *args: str) -> list[str]:
        """``livemig ARGS...``; run it with :meth:`env` and ``cwd=tree.root``."""
        return [sys.executable, "-m", "livemig.cli.main", *args]

    def env(self, workdir: Path | None = None) -> dict[str, str]:
        """The environment livemig runs in: this tree first on the path, and (given a
        ``workdir``) its bytecode cached there as in an installed livemig, even where
        PYTHONDONTWRITEBYTECODE is set (it is on our test machines): otherwise every start
        compiles livemig's modules again (~30 ms)."""
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(self.root), env.get("PYTHONPATH"))
                                            if p)
        if workdir is not None:
            env.pop("PYTHONDONTWRITEBYTECODE", None)
            env["PYTHONPYCACHEPREFIX"] = str(workdir / "pycache")
        return env

    def git_head(self) -> str | None:
        """The commit of the tree, "+dirty" if its livemig/ has local changes."""
        try:
            head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=self.root,
                                  capture_output=True, text=True, check=True).stdout.strip()
            dirty = subprocess.run(["git", "status", "--porcelain", "--", "livemig"],
                                   cwd=self.root, capture_output=True, text=True,
                                   check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return None
        return head + ("+dirty" if dirty else "")


def livemig_tree(path: str) -> LivemigTree:
    """``--livemig-tree``'s type: a directory that holds a ``livemig`` package."""
    root = Path(path).resolve()
    if not (root / "livemig" / "__init__.py").is_file():
        raise argparse.ArgumentTypeError(f"{path}: no livemig/__init__.py there")
    return LivemigTree(root)


def add_tree_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--livemig-tree", type=livemig_tree, default=str(ROOT), metavar="DIR",
                   help="run the livemig of this source tree (a checkout or git worktree), "
                        "with this interpreter (default: the checkout the benchmark is in)")


# ------------------------------------------------------------------------------------------
# Probes, peers and runs
# ------------------------------------------------------------------------------------------


class RunFailed(Exception):
    pass


def unix_listening(path: str) -> bool:
    """True if some process listens on unix socket ``path``, from /proc/net/unix (a probe
    connection would be taken by livemig for a migration channel). A listener that binds
    a temporary name and renames it into place once listening shows the bound name
    (``path.SUFFIX``) there, so ``path`` must also exist as a socket."""
    try:
        if not stat.S_ISSOCK(os.stat(path).st_mode):
            return False
        with open("/proc/net/unix") as f:
            next(f)
            for line in f:
                parts = line.split()
                if (len(parts) >= 8 and int(parts[3], 16) & 0x10000
                        and (parts[7] == path or parts[7].startswith(path + "."))):
                    return True
    except OSError:
        pass
    return False


def child_pid(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            kids = f.read().split()
    except OSError:
        return None
    return int(kids[0]) if kids else None


CLK_TCK = os.sysconf("SC_CLK_TCK")


def proc_cpu(path: str) -> tuple[float, float] | None:
    """(user, system) CPU seconds from a /proc/.../stat file."""
    try:
        with open(path) as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return int(fields[11]) / CLK_TCK, int(fields[12]) / CLK_TCK
    except (OSError, ValueError, IndexError):
        return None


def pid_cpu_s(pid: int | None) -> float | None:
    c = proc_cpu(f"/proc/{pid}/stat") if pid else None
    return None if c is None else c[0] + c[1]


def proc_status_kib(pid: int, key: str) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return None


def event_time(peer: QemuPeer, status: str, t0_wall: float,
               seen: dict[str, float]) -> float | None:
    """Seconds from ``t0_wall`` to the peer's MIGRATION event ``status`` (QEMU's own
    timestamp), or None if it has not arrived. ``seen`` caches what was drained."""
    for ev in peer.events():
        if ev.get("event") == "MIGRATION":
            st = ev.get("data", {}).get("status")
            ts = ev.get("timestamp", {})
            if st and st not in seen and "seconds" in ts:
                seen[st] = ts["seconds"] + ts.get("microseconds", 0) / 1e6 - t0_wall
    return seen.get(status)


def tail(text: str, n: int = 20) -> str:
    return "\n".join(text.rstrip().splitlines()[-n:])


def ram_info(info: dict[str, Any]) -> dict[str, Any]:
    ram = info.get("ram", {})
    keys = ("total", "transferred", "normal", "duplicate", "normal-bytes", "mbps",
            "pages-per-second")
    return {k: ram[k] for k in keys if k in ram}


def cpu_times() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs from /proc/stat."""
    with open("/proc/stat") as f:
        vals = [int(x) for x in f.readline().split()[1:]]
    idle = vals[3] + (vals[4] if len(vals) > 4 else 0)  # idle + iowait
    return sum(vals) - idle, sum(vals)


def cpu_busy(interval: float = 0.5) -> float:
    """Fraction of all CPUs busy over ``interval`` seconds (0..1)."""
    b0, t0 = cpu_times()
    time.sleep(interval)
    b1, t1 = cpu_times()
    return (b1 - b0) / max(1, t1 - t0)


SETTLE_BUSY = 0.25  # the machine counts as quiet below this CPU use
PF_KTHREAD = 0x00200000


def foreign_cpu_snapshot() -> dict[int, float]:
    """CPU seconds (own + reaped children) of every user process that is not this
    benchmark or one of its descendants: what other jobs on a shared machine use."""
    me = os.getpid()
    info: dict[int, tuple[int, int, float]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            ppid, flags = int(fields[1]), int(fields[6])
            cpu = sum(int(x) for x in fields[11:15]) / CLK_TCK
        except (OSError, ValueError, IndexError):
            continue
        info[int(d)] = (ppid, flags, cpu)
    out: dict[int, float] = {}
    for pid, (ppid, flags, cpu) in info.items():
        if flags & PF_KTHREAD or pid == me:
            continue
        p, ours = ppid, False
        for _ in range(64):  # walk up to init
            if p == me:
                ours = True
                break
            if p <= 1 or p not in info:
                break
            p = info[p][0]
        if not ours:
            out[pid] = cpu
    return out


def foreign_cpu_since(before: dict[int, float]) -> float:
    after = foreign_cpu_snapshot()
    return sum(max(0.0, cpu - before.get(pid, 0.0)) for pid, cpu in after.items())


def settle(wait_idle: float) -> float:
    """Flush dirty pages left by anybody (so they do not land in our fsync), then wait
    up to ``wait_idle`` seconds for other processes to leave the CPUs alone. Returns
    the last measured busy fraction (recorded with every run)."""
    os.sync()
    deadline = time.monotonic() + wait_idle
    while True:
        busy = cpu_busy()
        if busy < SETTLE_BUSY or time.monotonic() > deadline:
            return busy


def start_source(sc: Scenario, blobs: list[tuple[str, int]], workdir: Path,
                 name: str) -> QemuPeer:
    """A paused QEMU 10 source holding ``blobs``, with the scenario's multifd settings,
    the ``events`` capability and ``max-bandwidth`` MAX_BANDWIDTH."""
    src = QemuPeer(QEMU, machine=MACHINE, memory=f"{sc.memory // MIB}M", blobs=blobs,
                   paused=True, workdir=workdir, name=name)
    try:
        caps = {"events": True}
        if sc.channels:
            caps["multifd"] = True
        src.set_caps(caps)
        params: dict[str, Any] = {"max-bandwidth": MAX_BANDWIDTH}
        if sc.channels:
            params["multifd-channels"] = sc.channels
            params["multifd-compression"] = sc.compression
        src.set_params(**params)
        src.events()
    except BaseException:
        src.close()
        raise
    return src


def start_destination(sc: Scenario, workdir: Path, name: str, uri: str | None,
                      caps: dict[str, bool] | None = None,
                      extra_args: tuple[str, ...] = ()) -> QemuPeer:
    """A QEMU 10 destination (``-incoming defer``, paused) with the scenario's RAM size
    and multifd settings and the ``events`` capability, listening on ``uri`` (if given)."""
    dst = QemuPeer(QEMU, machine=MACHINE, memory=f"{sc.memory // MIB}M", incoming="defer",
                   paused=True, extra_args=extra_args, workdir=workdir, name=name,
                   start_timeout=120)
    try:
        all_caps = {"events": True, **(caps or {})}
        if sc.channels:
            all_caps["multifd"] = True
        dst.set_caps(all_caps)
        if sc.channels:
            dst.set_params(**{"multifd-channels": sc.channels,
                              "multifd-compression": sc.compression})
        if uri is not None:
            dst.migrate_incoming(uri)
        dst.events()
    except BaseException:
        dst.close()
        raise
    return dst


def retry_noisy(run_once: Callable[[], dict[str, Any]], args: argparse.Namespace,
                label: str, noise_key: str = "foreign_cores") -> list[dict[str, Any]]:
    """Run ``run_once`` and again (up to ``args.retries`` times) while other processes
    used more than ``args.max_noise`` CPUs during it (its record's ``noise_key``).
    Returns every attempt; the discarded ones are marked ``"discarded": "noisy"``."""
    attempts = []
    for attempt in range(args.retries + 1):
        r = run_once()
        attempts.append(r)
        noise = r.get(noise_key)
        if not r["ok"] or noise is None or noise <= args.max_noise:
            break
        if attempt < args.retries:
            r["discarded"] = "noisy"
            log(f"  {label} other processes used {noise:.2f} CPUs during the run: "
                "discarded, running it again")
    return attempts


def wait_terminal(peer: QemuPeer, role: str, t0: float, t0_wall: float, timeout: float,
                  poll: float, seen: dict[str, float]) -> tuple[float, float, dict[str, Any]]:
    """Poll a QEMU ``role`` ("source", "destination") until its migration is terminal.
    Returns (seconds from ``t0`` to "completed" by its MIGRATION event, or by polling if
    the event is missing; the polled time; the final query-migrate). Raises RunFailed
    if it did not complete within ``timeout`` seconds of ``t0``."""
    deadline = t0 + timeout
    while True:
        info = peer.query_migrate()
        st = info.get("status")
        if st in MIGRATION_TERMINAL_STATES:
            polled = time.monotonic() - t0
            break
        if time.monotonic() > deadline:
            raise RunFailed(f"{role} still '{st}' after {timeout:.0f} s")
        time.sleep(poll)
    if st != "completed":
        raise RunFailed(f"{role} migration {st}: {info.get('error-desc', '?')}\n"
                        f"{role} stderr:\n{tail(peer.stderr_text())}")
    ev = event_time(peer, "completed", t0_wall, seen)
    return (ev if ev is not None else polled), polled, info


def run_guarded(base: dict[str, Any], label: str, body: Callable[[], None]) -> dict[str, Any]:
    """Run one benchmark run's ``body`` (which fills ``base``); a failure is recorded in
    ``base`` (error, traceback) and logged instead of raised, Ctrl-C excepted."""
    try:
        body()
        base["ok"] = True
    except KeyboardInterrupt:
        raise
    except BaseException as e:  # noqa: BLE001 - pytest.fail from peers is BaseException
        base["ok"] = False
        base["error"] = f"{type(e).__name__}: {e}"
        base["traceback"] = traceback.format_exc()
        log(f"  {label} FAILED: {base['error']}")
    return base


def arg_parser(doc: str) -> argparse.ArgumentParser:
    """A benchmark's command line: its docstring's first paragraph, the rest of it (usage)
    kept as written."""
    return argparse.ArgumentParser(description=doc.split("\n\n", maxsplit=1)[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter,
                                   epilog="See benchmarks/README.md.")


def run_banner(args: argparse.Namespace, git: str | None, qemu: str) -> str:
    """What a run measures, for its log: the livemig tree and commit, QEMU, the machine."""
    return (f"livemig {git} in {args.livemig_tree}, QEMU {qemu}, {os.cpu_count()} CPUs, "
            f"python {platform.python_version()}")


def add_run_options(p: argparse.ArgumentParser, *, max_noise: float, poll: float,
                    noise_help: str = "other processes used", poll_help: str = "") -> None:
    """The options every QEMU benchmark here shares: output, work directory, timeouts,
    the wait for a quiet machine and the re-runs of noisy runs, the livemig tree."""
    p.add_argument("--json-out", metavar="PATH", help="write all runs and medians as JSON")
    p.add_argument("--tmpdir", default=tempfile.gettempdir(),
                   help="where the work directory goes (default: the system temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the work directory (debugging)")
    p.add_argument("--timeout", type=float, default=300.0,
                   help="seconds one migration may take before the run fails (300)")
    p.add_argument("--wait-idle", type=float, default=30.0, metavar="SECONDS",
                   help="before each run, wait up to this long for the CPUs to be less than "
                        f"{SETTLE_BUSY:.0%}% busy (other jobs on a shared machine); the "
                        "measured busy fraction is recorded per run (default 30)")
    p.add_argument("--max-noise", type=float, default=max_noise, metavar="CPUS",
                   help=f"a run during which {noise_help} more than this many CPUs on "
                        f"average is discarded and run again (default {max_noise})")
    p.add_argument("--retries", type=int, default=3,
                   help="how often to re-run a noisy run (default 3; the last attempt "
                        "counts whatever the noise)")
    p.add_argument("--poll", type=float, default=poll,
                   help=f"query-migrate polling interval in seconds ({poll}{poll_help})")
    add_tree_option(p)


def parse_pair_args(argv: list[str] | None, doc: str, variants: tuple[str, ...],
                    channels_help: str) -> argparse.Namespace:
    """The command line of the benchmarks that compare livemig with QEMU on one guest
    (bench_send, bench_relay): --size, --channels, -n, --variants and the run options."""
    ap = arg_parser(doc)
    ap.add_argument("--size", default="1G", help="random data in the guest (default 1G)")
    ap.add_argument("--channels", type=int, default=4, help=channels_help)
    ap.add_argument("-n", "--reps", type=int, default=3, help="repetitions (3)")
    ap.add_argument("--variants", default=",".join(variants),
                    help=f"comma-separated, from {', '.join(variants)} (default: all)")
    add_run_options(ap, max_noise=0.1, poll=0.005)
    a = ap.parse_args(argv)
    a.size = parse_size(a.size)
    a.variant_list = [x.strip() for x in a.variants.split(",") if x.strip()]
    bad = [x for x in a.variant_list if x not in variants]
    if bad:
        ap.error(f"unknown variant(s) {bad}; known: {', '.join(variants)}")
    if a.size < 32 * MIB or a.size % MIB:
        ap.error("--size must be a whole number of MiB, at least 32M")
    return a


def print_ratios(ratios: dict[str, float], target: float,
                 is_target: Callable[[str], bool]) -> None:
    """One line per ratio; the ratios the issue sets a floor for say whether it is met."""
    for k, r in ratios.items():
        verdict = (f" (target <= {target}x: {'OK' if r <= target else 'MISSED'})"
                   if is_target(k) else "")
        print(f"  {k} = {r:.2f}x{verdict}")


def qemu10_version() -> str | None:
    """QEMU 10's full version, or None (said on stderr) if it is missing."""
    found = qemu_version(QEMU_BINARIES[QEMU])
    if found is None or not found.startswith(QEMU):
        log(f"QEMU {QEMU} ({QEMU_BINARIES[QEMU]}) is missing or reports {found}; "
            "install it with scripts/install-qemu-peers.sh")
        return None
    return found


def run_interleaved(run_once: Callable[[str, int], dict[str, Any]],
                    args: argparse.Namespace, runs: list[dict[str, Any]]) -> None:
    """Every variant once per repetition, in turn, noisy runs again (into ``runs``)."""
    for rep in range(1, args.reps + 1):
        for v in args.variant_list:
            runs.extend(retry_noisy(lambda v=v, rep=rep: run_once(v, rep), args,
                                    f"rep {rep} {v:<13}"))


def variant_medians(runs: list[dict[str, Any]], variants: list[str],
                    keys: tuple[str, ...]) -> dict[str, dict[str, Any]]:
    """Per variant: runs that count (``ok``), noisy ones discarded, and the median (and
    all values, ``KEY_all``) of each of ``keys``."""
    per: dict[str, dict[str, Any]] = {}
    for v in variants:
        rs = [r for r in runs if r["variant"] == v]
        ok = [r for r in rs if r["ok"] and not r.get("discarded")]
        m: dict[str, Any] = {"runs": len([r for r in rs if not r.get("discarded")]),
                             "ok": len(ok),
                             "discarded_noisy": len([r for r in rs if r.get("discarded")])}
        for key in keys:
            vals = [r[key] for r in ok if r.get(key) is not None]
            if vals:
                m[key] = statistics.median(vals)
                m[key + "_all"] = vals
        per[v] = m
    return per


def report_end(runs: list[dict[str, Any]], args: argparse.Namespace, interrupted: bool,
               doc: dict[str, Any]) -> int:
    """Print the failed runs, write ``doc`` (+ every run) to --json-out; the exit status."""
    failed = [r for r in runs if not r["ok"]]
    for r in failed:
        print(f"  rep {r['rep']} {r['variant']} FAILED: {r['error']}")
    if args.json_out:
        doc = {**doc, "python": platform.python_version(), "args": vars(args), "runs": runs}
        Path(args.json_out).write_text(json.dumps(doc, indent=2, default=str) + "\n")
    return 1 if failed or interrupted else 0


@contextlib.contextmanager
def bench_session(args: argparse.Namespace, prefix: str,
                  banner: str = "") -> Iterator[dict[str, Any]]:
    """A work directory under ``args.tmpdir`` (removed at the end unless ``args.keep``)
    as ``session["workdir"]``, logged with ``banner``; Ctrl-C or SIGTERM inside ends the
    runs early with ``session["interrupted"]`` set, so that what ran is still reported."""
    def on_term(signum: int, frame: object) -> None:
        raise KeyboardInterrupt  # clean up (QEMUs, livemig, files) as for Ctrl-C

    signal.signal(signal.SIGTERM, on_term)
    session: dict[str, Any] = {"workdir": Path(tempfile.mkdtemp(prefix=prefix,
                                                                 dir=args.tmpdir)),
                               "interrupted": False}
    if banner:
        log(f"work directory {session['workdir']} ({banner})")
    try:
        yield session
    except KeyboardInterrupt:
        session["interrupted"] = True
        log("interrupted: reporting what ran")
    finally:
        if args.keep:
            log(f"kept {session['workdir']}")
        else:
            shutil.rmtree(session["workdir"], ignore_errors=True)


# ------------------------------------------------------------------------------------------
# Summaries
# ------------------------------------------------------------------------------------------


def summarize_pyspy(path: str, top: int = 8) -> str:
    """Per thread, the functions the samples of a ``py-spy record -f raw --threads``
    file end in (self time), leaving out start-up (imports) and the wait for the source
    to connect. Threads are told apart by their stacks (Python 3.11 threads have no OS
    names): the multifd receivers run MultifdReceiver._run."""
    per: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    total: collections.Counter[str] = collections.Counter()
    skipped = 0
    with open(path) as f:
        for line in f:
            stack, _, n_ = line.rstrip("\n").rpartition(" ")
            try:
                n = int(n_)
            except ValueError:
                continue
            frames = stack.split(";")
            if any("_find_and_load" in fr or "accept_migration" in fr for fr in frames):
                skipped += n
                continue
            thread = frames[0]
            if any("MultifdReceiver._run" in fr for fr in frames):
                thread = f"multifd receiver {thread}"
            elif any("MainChannelLoader" in fr or "_cmd_receive" in fr for fr in frames):
                thread = f"main {thread}"
            per[thread][frames[-1]] += n
            total[thread] += n
    lines = [(f"{path}: {sum(total.values())} samples ({skipped} at start-up or waiting "
              "for the source left out)")]
    for thread, n in total.most_common():
        lines.append(f"  {thread}: {n} samples")
        for leaf, k in per[thread].most_common(top):
            lines.append(f"    {100 * k / n:5.1f}%  {leaf}")
    return "\n".join(lines)



def median(values: list[float]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def proc_status_kib_meminfo() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            m = re.search(r"MemTotal:\s+(\d+)", f.read())
        return int(m.group(1)) if m else None
    except OSError:
        return None
