"""``livemig demo``: two livemig machines, one live migration, checked.

It does what a user would do by hand with two ``livemig run`` processes and
a QMP client: start a destination waiting for a migration and a source
running the dirty-pages workload, set the same migration capabilities and
parameters on both, ``migrate``, watch ``query-migrate`` until it ends,
then ask the destination whether every page arrived (its workload checks
every page against the sweep position it received). Nothing here reaches
into the machines: it only speaks QMP, so it also shows that the control
socket is enough to drive livemig.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any

from livemig.cli.run import add_vfio_options, vfio_arguments
from livemig.engine.states import FINISHED, MigrationStatus, RunState
from livemig.errors import MigrationError, PeerError, TransportError
from livemig.io.qmp_peer import QmpPeer
from livemig.io.uri import parse_size

#: Seconds for a machine process to come up (import, RAM fill, socket).
START_TIMEOUT = 60.0
#: Seconds a migration may take before the demo gives up (and cancels it).
MIGRATION_TIMEOUT = 600.0
POLL = 0.1


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    d = sub.add_parser(
        "demo", help="live-migrate a running livemig machine to another and check it",
        description="Start a destination and a source livemig machine (two 'livemig run' "
                    "processes), run the dirty-pages workload on the source, live-migrate it "
                    "over multifd with a live progress display, and verify on the destination "
                    "that no page was lost or stale. Exits 0 when the migration completed and "
                    "memory verified.")
    d.add_argument("--memory", default="512M", metavar="SIZE", help="guest RAM (default 512M)")
    d.add_argument("--multifd-channels", type=int, default=4, metavar="N",
                   help="multifd channels (default 4; 0 = plain precopy on one channel)")
    d.add_argument("--multifd-compression", default="none", choices=["none", "zlib", "zstd"])
    d.add_argument("--downtime-limit", type=int, default=300, metavar="MS",
                   help="QEMU's downtime-limit parameter (default 300)")
    d.add_argument("--max-bandwidth", default="0", metavar="BYTES_PER_S",
                   help="QEMU's max-bandwidth (default 0 = unlimited)")
    d.add_argument("--dirty-rate", default="64M", metavar="BYTES_PER_S",
                   help="how fast the workload dirties pages (default 64M per second)")
    d.add_argument("--auto-converge", action="store_true",
                   help="QEMU's auto-converge capability: throttle the source if needed")
    d.add_argument("--dirty-tracking", choices=["software", "kernel"], default="software")
    d.add_argument("--vhost-user-backends", type=int, default=0, metavar="N",
                   help="start N 'livemig vhost-user-backend' processes per side and give each "
                        "machine N vhost-user devices; their back-end state migrates too")
    d.add_argument("--vhost-user-state-size", default="256K", metavar="SIZE",
                   help="state size of each source back-end (default 256K)")
    add_vfio_options(d, "give each machine N vfio-sim devices (simulated VFIO devices)")
    d.add_argument("--json", action="store_true",
                   help="print the summary as one JSON object (the last line of stdout)")
    d.add_argument("-q", "--quiet", action="store_true", help="no progress display")


class _Backend:
    """One ``livemig vhost-user-backend`` process and its published state."""

    def __init__(self, name: str, workdir: str, seed: int | None, size: int) -> None:
        self.name = name
        self.socket = os.path.join(workdir, f"{name}.sock")
        self.state_file = os.path.join(workdir, f"{name}.json")
        argv = [sys.executable, "-m", "livemig.cli.main", "vhost-user-backend",
                "--socket-path", self.socket, "--state-file", self.state_file]
        if seed is not None:
            argv += ["--seed", str(seed), "--state-size", str(size)]
        self.log = open(os.path.join(workdir, f"{name}.log"), "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(argv, stdout=self.log, stderr=self.log, env=_child_env())

    def wait_listening(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not os.path.exists(self.socket):
            if self.proc.poll() is not None:
                raise TransportError(f"vhost-user back-end {self.name} exited with status "
                                     f"{self.proc.returncode}")
            if time.monotonic() > deadline:
                raise TransportError(f"vhost-user back-end {self.name} did not listen within "
                                     f"{timeout:.0f} s")
            time.sleep(0.02)

    def digest(self) -> str | None:
        try:
            with open(self.state_file) as f:
                return str(json.load(f)["sha256"])
        except (OSError, ValueError, KeyError):
            return None

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
        _reap(self.proc)
        self.log.close()


class _Machine:
    def __init__(self, name: str, argv: list[str], workdir: str) -> None:
        self.name = name
        self.log_path = os.path.join(workdir, f"{name}.log")
        self.log = open(self.log_path, "wb")  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "livemig.cli.main", "run", "--print-ready", *argv],
            stdout=subprocess.PIPE, stderr=self.log, env=_child_env())
        self.qmp: QmpPeer | None = None

    def ready(self, timeout: float) -> dict[str, Any]:
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        os.set_blocking(self.proc.stdout.fileno(), False)
        buf = b""
        while b"\n" not in buf:
            if self.proc.poll() is not None:
                raise TransportError(f"the {self.name} machine exited with status "
                                     f"{self.proc.returncode}: {self.tail()}")
            if time.monotonic() > deadline:
                raise TransportError(f"the {self.name} machine did not start within "
                                     f"{timeout:.0f} s")
            chunk = self.proc.stdout.read()
            if chunk:
                buf += chunk
            else:
                time.sleep(0.02)
        info: dict[str, Any] = json.loads(buf.split(b"\n", 1)[0])
        self.qmp = QmpPeer(info["qmp"], peer=f"{self.name} machine")
        return info

    def cmd(self, name: str, **args: Any) -> Any:
        assert self.qmp is not None
        return self.qmp.cmd(name, **args)

    def tail(self) -> str:
        self.log.flush()
        try:
            with open(self.log_path, "rb") as f:
                lines = f.read().decode(errors="replace").strip().splitlines()
            return " | ".join(lines[-3:]) or "(no output)"
        except OSError:
            return "(no output)"

    def close(self) -> None:
        if self.qmp is not None:
            with contextlib.suppress(MigrationError, OSError):
                self.qmp.cmd("quit")
            self.qmp.close()
        _reap(self.proc)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self.log.close()


def _reap(proc: subprocess.Popen[bytes]) -> None:
    """Wait for a child asked to leave; kill it if it does not within 10 s."""
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    return env


def cmd_demo(args: argparse.Namespace) -> int:
    memory = parse_size(args.memory, "--memory")
    channels = args.multifd_channels
    workdir = tempfile.mkdtemp(prefix="livemig-demo-")
    machines: list[_Machine] = []
    backends: list[_Backend] = []
    try:
        common = ["--memory", str(memory), "--workload", "dirty-pages",
                  "--dirty-tracking", args.dirty_tracking]
        common += vfio_arguments(args)
        vu_size = parse_size(args.vhost_user_state_size, "--vhost-user-state-size")
        src_vu, dst_vu = [], []
        for i in range(args.vhost_user_backends):
            src_vu.append(_Backend(f"vu-src-{i}", workdir, i + 1, vu_size))
            dst_vu.append(_Backend(f"vu-dst-{i}", workdir, None, vu_size))
        backends = src_vu + dst_vu
        for b in backends:
            b.wait_listening(START_TIMEOUT)
        dst = _Machine("destination", [*common, "--incoming", "defer",
                                       "--qmp", f"unix:{workdir}/dst.qmp",
                                       *_vu_args(dst_vu)], workdir)
        machines.append(dst)
        src = _Machine("source", [*common, "--fill", "random", "--workload-rate",
                                  args.dirty_rate, "--qmp", f"unix:{workdir}/src.qmp",
                                  *_vu_args(src_vu)], workdir)
        machines.append(src)
        dst.ready(START_TIMEOUT)
        src.ready(START_TIMEOUT)
        caps = [{"capability": "multifd", "state": channels > 0},
                {"capability": "events", "state": True},
                {"capability": "auto-converge", "state": args.auto_converge}]
        for m in (dst, src):
            m.cmd("migrate-set-capabilities", capabilities=caps)
            if channels:
                m.cmd("migrate-set-parameters", **{"multifd-channels": channels,
                                                   "multifd-compression":
                                                   args.multifd_compression})
        bandwidth = parse_size(args.max_bandwidth, "--max-bandwidth")
        src.cmd("migrate-set-parameters", **{"downtime-limit": args.downtime_limit,
                                             "max-bandwidth": bandwidth})
        uri = f"unix:{workdir}/migration.sock"
        dst.cmd("migrate-incoming", uri=uri)
        src.cmd("migrate", uri=uri)
        final = _watch(src, quiet=args.quiet or args.json)
        summary = _summary(final, src, dst)
        _check_backends(summary, src_vu, dst_vu)
    except MigrationError as e:
        if args.json:
            print(json.dumps({"status": MigrationStatus.FAILED.value, "verified": False,
                              "error": str(e)}))
        raise
    finally:
        for m in reversed(machines):
            m.close()
        for b in backends:
            b.close()
        shutil.rmtree(workdir, ignore_errors=True)
    if args.json:
        print(json.dumps(summary))
    elif not args.quiet:
        _print_summary(summary)
    ok = summary["status"] == MigrationStatus.COMPLETED and summary["verified"]
    return 0 if ok else 1


def _vu_args(backends: list[_Backend]) -> list[str]:
    return [a for b in backends for a in ("--vhost-user", b.socket)]


def _check_backends(summary: dict[str, Any], src: list[_Backend], dst: list[_Backend]) -> None:
    """A back-end's state is verified when the destination's back-end now holds
    exactly what the source's held (their published sha256)."""
    by_name = {d["name"]: d for d in summary["devices"]}
    for i, (a, b) in enumerate(zip(src, dst, strict=True)):
        dev = by_name.get(f"livemig-vhost-user/{i}")
        if dev is None:
            continue
        same = a.digest() is not None and a.digest() == b.digest()
        dev["verified"] = bool(dev.get("verified")) and same
        dev.pop("socket", None)
    summary["verified"] = summary["verified"] and all(
        d.get("verified") is not False for d in summary["devices"])


def _watch(src: _Machine, *, quiet: bool) -> dict[str, Any]:
    from livemig.cli.progress import MigrationProgress

    deadline = time.monotonic() + MIGRATION_TIMEOUT
    with MigrationProgress(enabled=not quiet) as progress:
        while True:
            q = src.cmd("query-migrate")
            progress.update(q)
            if q.get("status") in FINISHED:
                return dict(q)
            if time.monotonic() > deadline:
                src.cmd("migrate_cancel")
                raise PeerError(f"the migration did not finish within {MIGRATION_TIMEOUT:.0f} s "
                                "(it was cancelled): does the workload dirty memory faster than "
                                "the link carries? try --auto-converge")
            time.sleep(POLL)


def _summary(q: dict[str, Any], src: _Machine, dst: _Machine) -> dict[str, Any]:
    status = q.get("status")
    ram = q.get("ram", {})
    verified = False
    devices: list[dict[str, Any]] = []
    if status == MigrationStatus.COMPLETED:
        deadline = time.monotonic() + 30
        while (dst.cmd("query-status")["status"] != RunState.RUNNING
               and time.monotonic() < deadline):
            time.sleep(0.02)
        w = dst.cmd("x-query-workload")
        verified = bool(w.get("verified"))
        devices = [d for d in dst.cmd("x-query-livemig-devices") if d.get("kind") != "workload"]
        verified = verified and all(d.get("verified") is not False for d in devices)
    total = int(q.get("total-time", 0))
    transferred = int(ram.get("transferred", 0))
    out: dict[str, Any] = {
        "status": status,
        "verified": verified,
        "total_time_ms": total,
        "setup_time_ms": int(q.get("setup-time", 0)),
        "downtime_ms": int(q.get("downtime", 0)),
        "transferred_bytes": transferred,
        "throughput_mbps": round(transferred * 8 / total / 1000, 1) if total else 0.0,
        "passes": int(ram.get("dirty-sync-count", 0)),
        "ram_bytes": int(ram.get("total", 0)),
        "normal_pages": int(ram.get("normal", 0)),
        "zero_pages": int(ram.get("duplicate", 0)),
        "devices": devices,
    }
    if "cpu-throttle-percentage" in q:
        out["cpu_throttle_percentage"] = q["cpu-throttle-percentage"]
    if status != MigrationStatus.COMPLETED:
        out["error"] = q.get("error-desc", status)
        # the first cause is often on the destination's side
        deadline = time.monotonic() + 10
        while True:
            dq = dst.cmd("query-migrate")
            if dq.get("status") in (MigrationStatus.FAILED, MigrationStatus.COMPLETED) \
                    or time.monotonic() > deadline:
                break
            time.sleep(POLL)
        if dq.get("error-desc"):
            out["destination_error"] = dq["error-desc"]
    return out


def _print_summary(s: dict[str, Any]) -> None:
    ok = "verified" if s["verified"] else "NOT verified"
    print(f"migration {s['status']}: {s['ram_bytes'] >> 20} MiB in {s['total_time_ms']} ms "
          f"({s['throughput_mbps']} Mbit/s), {s['passes']} passes, downtime "
          f"{s['downtime_ms']} ms; destination memory {ok}")
    if "destination_error" in s:
        print(f"  destination: {s['destination_error']}")
    for d in s["devices"]:
        print(f"  device {d['name']} ({d['kind']}): {d['state_bytes']} bytes, "
              f"{'verified' if d['verified'] else 'NOT verified'}")
    if s.get("error"):
        print(f"  error: {s['error']}")
