"""The engine across processes: ``livemig run`` machines driven over QMP by ``qemu.qmp``.

``tests/test_engine.py`` runs both machines in one process; here every machine
is a ``livemig run`` process with a QMP socket, driven only by QEMU's own
Python QMP client (``qemu.qmp.QMPClient``), the way management code written
for QEMU would drive it. That adds what one process cannot show: the QMP
greeting, negotiation and error replies as a real client sees them, events on
the wire, and the faults that need a process boundary (a peer killed with
SIGKILL, a channel cut by something in between).

* Control: greeting, ``query-status`` (running, and paused with ``-S``),
  ``stop``/``cont`` with their events, capabilities and parameters set and
  queried, refusals as ``GenericError``.
* Live migration between two processes (1 and 4 channels, none and zstd): the
  MIGRATION and MIGRATION_PASS events, ``query-migrate`` numbers, the
  destination's workload check, the run states afterwards; passes following
  one another under ``max-bandwidth``; a second ``migrate`` refused with
  QEMU's text, then a cancel.
* ``livemig demo --json``: its summary line.
* Faults: a multifd channel cut mid-packet by a proxy, the destination killed,
  the source killed / terminated / quit, two sides that do not match (RAM size,
  channel count, compression), a destination nobody listens at. Both sides (or
  the survivor) report ``failed`` with an ``error-desc`` naming the cause, a
  surviving source runs on, and the survivors' threads, descriptors and socket
  files go back to what they were.
* Format interop: ``livemig run`` -> ``livemig receive`` -> snapshot ->
  ``livemig inspect --json``, and the snapshot ``livemig send``-ed back into a
  fresh ``livemig run`` that checks every page.

Every wait has a deadline; every process a test starts is killed at teardown
(``machines`` fixture), and the proxy's threads are joined.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
from helpers import LIVEMIG, ReceiveFactory, livemig_env, run_cli
from qemu.qmp import ExecuteError, QMPClient

from livemig.wire.multifd import INIT_PACKET_SIZE, PAGE_SIZE, RAM_HEADER_SIZE

T = TypeVar("T")

MIB = 1 << 20
#: Seconds for a ``livemig run`` process to print its ready line (import, RAM fill).
START_TIMEOUT = 60.0
#: Seconds for one QMP command (a reply is immediate; migrate-incoming waits for its listener).
QMP_TIMEOUT = 30.0
#: Seconds a migration may take in these tests (64-128 MiB over unix sockets: a few seconds).
MIGRATION_TIMEOUT = 120.0
#: Seconds for a failure to reach both sides, and for the survivors to settle back.
FAULT_TIMEOUT = 30.0
#: Seconds for the workload to make one more pass over its RAM.
PASS_TIMEOUT = 30.0
#: Seconds a process gets to exit after quit / SIGTERM before it is killed.
EXIT_TIMEOUT = 10.0
POLL = 0.02

TERMINAL = ("completed", "failed", "cancelled")
IN_PROGRESS = "There's a migration process in progress"


# --------------------------------------------------------------------------------------------
# QMP client on a private event loop
# --------------------------------------------------------------------------------------------


class QmpLoop:
    """An asyncio loop in a thread of its own: the tests stay synchronous (they block,
    sleep, run proxy threads) while every ``QMPClient`` lives on this loop."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="qmp-loop")
        self.thread.start()

    def call(self, coro: Awaitable[T], timeout: float = QMP_TIMEOUT) -> T:
        async def bounded() -> T:
            return await asyncio.wait_for(coro, timeout)

        fut = asyncio.run_coroutine_threadsafe(bounded(), self.loop)
        return fut.result(timeout + 5.0)

    def close(self) -> None:
        async def cancel_all() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        with contextlib.suppress(Exception):
            self.call(cancel_all(), 5.0)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10.0)
        assert not self.thread.is_alive(), "the QMP event loop did not stop"
        self.loop.close()


# --------------------------------------------------------------------------------------------
# A `livemig run` process
# --------------------------------------------------------------------------------------------


class RunProcess:
    """One ``livemig run --print-ready`` process and a ``QMPClient`` connected to it."""

    def __init__(self, loop: QmpLoop, workdir: Path, name: str, args: list[str]) -> None:
        self.loop = loop
        self.name = name
        self.qmp_path = workdir / f"{name}.qmp"
        self.stdout_path = workdir / f"{name}.stdout"
        self.stderr_path = workdir / f"{name}.stderr"
        self.args = [*LIVEMIG, "run", "--print-ready", "--qmp", f"unix:{self.qmp_path}", *args]
        with open(self.stdout_path, "wb") as out, open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen(self.args, stdin=subprocess.DEVNULL, stdout=out,
                                         stderr=err, start_new_session=True, env=livemig_env())
        self.client: QMPClient | None = None
        self.events: list[dict[str, Any]] = []
        try:
            self.ready = self._wait_ready()
            self.client = QMPClient(name)
            self.loop.call(self.client.connect(str(self.qmp_path)))
        except BaseException:
            self.close()  # the fixture never saw this one: kill it here
            raise

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stderr(self) -> str:
        return self.stderr_path.read_bytes().decode("utf-8", "replace")

    def _wait_ready(self) -> dict[str, Any]:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            text = self.stdout_path.read_bytes()
            if b"\n" in text:
                ready: dict[str, Any] = json.loads(text.split(b"\n", 1)[0])
                return ready
            rc = self.proc.poll()
            if rc is not None:
                raise AssertionError(f"livemig run ({self.name}) exited with status {rc} "
                                     f"before it was ready:\n{self.stderr()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"livemig run ({self.name}) not ready within "
                                     f"{START_TIMEOUT:.0f} s:\n{self.stderr()}")
            time.sleep(POLL)

    # -- QMP -----------------------------------------------------------------
    def cmd(self, name: str, timeout: float = QMP_TIMEOUT, **args: Any) -> Any:
        assert self.client is not None
        return self.loop.call(self.client.execute(name, args or None), timeout)

    def error(self, name: str, **args: Any) -> dict[str, Any]:
        """Run a command that must be refused; QMP's error object (class, desc)."""
        with pytest.raises(ExecuteError) as info:
            self.cmd(name, **args)
        return {"class": info.value.error_class, "desc": info.value.error.error.desc}

    def take_events(self) -> list[dict[str, Any]]:
        """Events received so far (oldest first), kept in :attr:`events` as well."""
        client = self.client
        assert client is not None

        async def take() -> list[Any]:
            return client.events.clear()

        new = [dict(e) for e in self.loop.call(take())]
        self.events.extend(new)
        return new

    def event_names(self) -> list[tuple[str, Any]]:
        self.take_events()
        return [(e["event"], e.get("data")) for e in self.events]

    def wait_event(self, name: str, timeout: float = QMP_TIMEOUT, **data: Any) -> dict[str, Any]:
        """The first event ``name`` (with ``data`` in its data) seen so far or within
        ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            self.take_events()
            for e in self.events:
                if e["event"] == name and all(e.get("data", {}).get(k) == v
                                              for k, v in data.items()):
                    return e
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.name}: no {name} {data or ''} event within "
                                     f"{timeout:.0f} s; events: {self.event_names()}")
            time.sleep(POLL)

    def status(self) -> str:
        return str(self.cmd("query-status")["status"])

    def set_caps(self, **caps: bool) -> None:
        self.cmd("migrate-set-capabilities", capabilities=[
            {"capability": k.replace("_", "-"), "state": v} for k, v in caps.items()])

    def set_params(self, **params: Any) -> None:
        self.cmd("migrate-set-parameters", **{k.replace("_", "-"): v for k, v in params.items()})

    def wait_migration(self, timeout: float = MIGRATION_TIMEOUT,
                       until: tuple[str, ...] = TERMINAL) -> dict[str, Any]:
        """Poll query-migrate until its status is in ``until``; that reply."""
        deadline = time.monotonic() + timeout
        while True:
            q: dict[str, Any] = self.cmd("query-migrate")
            if q.get("status") in until:
                return q
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.name}: migration still {q.get('status')!r} after "
                                     f"{timeout:.0f} s: {q}")
            time.sleep(0.05)

    def wait_status(self, status: str, timeout: float = FAULT_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while (st := self.status()) != status:
            assert time.monotonic() < deadline, f"{self.name}: run state {st}, not {status}"
            time.sleep(POLL)

    def wait_workload_passes(self, more_than: int, timeout: float = PASS_TIMEOUT) -> int:
        deadline = time.monotonic() + timeout
        while True:
            w = self.cmd("x-query-workload")
            if w["passes"] > more_than:
                return int(w["passes"])
            assert time.monotonic() < deadline, \
                f"{self.name}: workload still at {w['passes']} passes after {timeout:.0f} s: {w}"
            time.sleep(0.05)

    # -- what the process holds, seen from outside ---------------------------
    def threads(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/task"))

    def fds(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def resources(self) -> tuple[int, int]:
        return self.threads(), self.fds()

    def wait_resources(self, baseline: tuple[int, int], timeout: float = FAULT_TIMEOUT) -> None:
        """Threads and descriptors back to ``baseline`` (threads end a little after the
        migration's status is final)."""
        deadline = time.monotonic() + timeout
        while (now := self.resources()) != baseline:
            assert time.monotonic() < deadline, (
                f"{self.name}: (threads, fds) {now}, not back to {baseline}: "
                f"{self._fd_targets()}")
            time.sleep(0.05)

    def _fd_targets(self) -> list[str]:
        out = []
        for fd in os.listdir(f"/proc/{self.pid}/fd"):
            with contextlib.suppress(OSError):
                out.append(os.readlink(f"/proc/{self.pid}/fd/{fd}"))
        return sorted(out)

    # -- life cycle ----------------------------------------------------------
    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(OSError):
                os.killpg(self.proc.pid, sig)
            self.proc.wait(EXIT_TIMEOUT)

    def disconnect(self) -> None:
        client, self.client = self.client, None
        if client is not None:
            with contextlib.suppress(Exception):  # a killed peer: the client saw EOF already
                self.loop.call(client.disconnect(), 5.0)

    def close(self) -> None:
        """Quit (over QMP, else SIGTERM, else SIGKILL), always reaped."""
        asked = False
        if self.alive() and self.client is not None:
            with contextlib.suppress(Exception):
                self.cmd("quit", timeout=5.0)
                asked = True
        self.disconnect()
        if asked:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(EXIT_TIMEOUT)
        for sig in (signal.SIGTERM, signal.SIGKILL):
            if self.proc.poll() is not None:
                return
            with contextlib.suppress(OSError):
                os.killpg(self.proc.pid, sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(EXIT_TIMEOUT)
        assert self.proc.poll() is not None, f"{self.name}: still running after SIGKILL"


Factory = Callable[..., RunProcess]


@pytest.fixture
def machines(workdir: Path) -> Iterator[Factory]:
    """Factory ``machines(name, *run_args)``: a started ``livemig run``, connected over QMP.
    Every one is quit (or killed) at teardown, and the QMP loop stopped."""
    loop = QmpLoop()
    started: list[RunProcess] = []

    def start(name: str, *args: str) -> RunProcess:
        m = RunProcess(loop, workdir, name, list(args))
        started.append(m)
        return m

    try:
        yield start
    finally:
        for m in started:
            m.close()
        loop.close()


def workload_args(memory: int, *, rate: str = "32M", fill: bool = True) -> list[str]:
    return ["--memory", f"{memory >> 20}M", "--workload", "dirty-pages", "--workload-rate",
            rate, *(["--fill", "random"] if fill else [])]


def configure(channels: int, compression: str, *ms: RunProcess) -> None:
    for m in ms:
        m.set_caps(multifd=channels > 0, events=True)
        if channels:
            m.set_params(multifd_channels=channels, multifd_compression=compression)


def migration_statuses(m: RunProcess) -> list[str]:
    """The statuses of the MIGRATION events, in order, once the final one arrived (a
    query-migrate can answer with the new status just before its event is written)."""
    final = m.cmd("query-migrate")["status"]
    m.wait_event("MIGRATION", status=final)
    return [d["status"] for n, d in m.event_names() if n == "MIGRATION"]


# --------------------------------------------------------------------------------------------
# 1. Control over QMP
# --------------------------------------------------------------------------------------------


def test_greeting_status_stop_cont(machines: Factory) -> None:
    m = machines("m", "--memory", "16M", "--workload", "dirty-pages", "--workload-rate", "16M")
    assert m.ready["status"] == "running" and m.ready["memory"] == 16 * MIB
    assert m.ready["qmp"] == f"unix:{m.qmp_path}"
    assert m.client is not None
    greeting = m.client.greeting
    assert greeting is not None
    version: Any = greeting.QMP.version
    assert version["qemu"]["major"] >= 7 and "livemig" in version["package"]
    assert list(greeting.QMP.capabilities) == ["oob"]
    # QMPClient negotiated (qmp_capabilities) on connect: commands work
    assert m.cmd("query-status") == {"status": "running", "running": True}

    m.cmd("stop")
    assert m.cmd("query-status") == {"status": "paused", "running": False}
    m.wait_event("STOP")
    assert m.cmd("x-query-workload")["running"] is False
    m.cmd("cont")
    m.wait_event("RESUME")
    assert m.status() == "running"
    assert [n for n, _ in m.event_names()] == ["STOP", "RESUME"]
    m.wait_workload_passes(0)


def test_paused_with_S(machines: Factory) -> None:  # noqa: N802 - QEMU's option -S
    m = machines("m", "--memory", "16M", "-S")
    assert m.ready["status"] == "paused"
    assert m.cmd("query-status") == {"status": "paused", "running": False}
    m.cmd("stop")  # already stopped: nothing happens, no event
    m.cmd("cont")
    m.wait_event("RESUME")
    assert m.status() == "running"
    assert m.error("x-query-workload")["class"] == "GenericError"  # no workload on this one
    assert [n for n, _ in m.event_names()] == ["RESUME"]


def test_capabilities_and_parameters(machines: Factory) -> None:
    m = machines("m", "--memory", "16M", "-S")
    caps = {c["capability"]: c["state"] for c in m.cmd("query-migrate-capabilities")}
    assert caps == {"multifd": False, "events": False, "auto-converge": False,
                    "return-path": False}
    params = m.cmd("query-migrate-parameters")
    assert params["max-bandwidth"] == 128 * MIB and params["downtime-limit"] == 300
    assert params["multifd-channels"] == 2 and params["multifd-compression"] == "none"

    m.set_caps(multifd=True, events=True, auto_converge=True)
    m.set_params(multifd_channels=4, multifd_compression="zstd", downtime_limit=50,
                 max_bandwidth=0, cpu_throttle_initial=30)
    caps = {c["capability"]: c["state"] for c in m.cmd("query-migrate-capabilities")}
    assert caps["multifd"] and caps["events"] and caps["auto-converge"]
    assert not caps["return-path"]
    params = m.cmd("query-migrate-parameters")
    assert (params["multifd-channels"], params["multifd-compression"], params["downtime-limit"],
            params["max-bandwidth"], params["cpu-throttle-initial"]) == (4, "zstd", 50, 0, 30)

    # refusals: QEMU's error class, and nothing changed (all or nothing)
    e = m.error("migrate-set-capabilities",
                capabilities=[{"capability": "events", "state": False},
                              {"capability": "x-no-such-thing", "state": True}])
    assert e["class"] == "GenericError" and "x-no-such-thing" in e["desc"]
    e = m.error("migrate-set-parameters", **{"multifd-channels": 0})
    assert e["class"] == "GenericError" and "multifd-channels" in e["desc"]
    e = m.error("migrate-set-parameters", **{"downtime-limit": 10, "max-cpu-throttle": 100})
    assert e["class"] == "GenericError" and "max-cpu-throttle" in e["desc"]
    e = m.error("migrate-set-parameters", **{"multifd-compression": "lz4"})
    assert e["class"] == "GenericError"
    e = m.error("migrate-set-parameters", **{"max-bandwidth": -1})
    assert e["class"] == "GenericError"
    e = m.error("migrate-set-capabilities", capabilities="multifd")
    assert e["class"] == "GenericError"
    caps = {c["capability"]: c["state"] for c in m.cmd("query-migrate-capabilities")}
    assert caps["events"] is True
    params = m.cmd("query-migrate-parameters")
    assert params["downtime-limit"] == 50 and params["multifd-channels"] == 4
    e = m.error("x-no-such-command")
    assert e["class"] == "CommandNotFound"


# --------------------------------------------------------------------------------------------
# Live migration between two processes
# --------------------------------------------------------------------------------------------


def start_pair(machines: Factory, workdir: Path, memory: int, *, rate: str = "32M",
               channels: int = 2, compression: str = "none",
               tracking: str = "software") -> tuple[RunProcess, RunProcess, str]:
    dst = machines("dst", *workload_args(memory, fill=False), "--incoming", "defer",
                   "--dirty-tracking", tracking)
    src = machines("src", *workload_args(memory, rate=rate), "--dirty-tracking", tracking)
    configure(channels, compression, src, dst)
    uri = f"unix:{workdir}/mig.sock"
    return src, dst, uri


@pytest.mark.parametrize(("channels", "compression", "memory", "tracking"), [
    (1, "none", 64 * MIB, "software"), (4, "none", 128 * MIB, "software"),
    (1, "zstd", 64 * MIB, "software"), (4, "zstd", 64 * MIB, "software"),
    # the workload marks nothing: uffd-wp + PAGEMAP_SCAN see its writes
    (2, "none", 64 * MIB, "kernel")])
def test_live_migration(machines: Factory, workdir: Path, channels: int, compression: str,
                        memory: int, tracking: str) -> None:
    src, dst, uri = start_pair(machines, workdir, memory, channels=channels,
                               compression=compression, tracking=tracking)
    src.set_params(max_bandwidth=0)
    assert dst.status() == "inmigrate"
    src.wait_workload_passes(-1)
    dst.cmd("migrate-incoming", uri=uri)
    src.cmd("migrate", uri=uri)
    q = src.wait_migration()
    assert q["status"] == "completed", q
    dq = dst.wait_migration()
    assert dq["status"] == "completed", dq

    # events, in order, on the wire
    src.wait_event("MIGRATION", status="completed")
    assert migration_statuses(src) == ["setup", "active", "completed"]
    passes = [d["pass"] for n, d in src.event_names() if n == "MIGRATION_PASS"]
    assert passes and passes == list(range(1, len(passes) + 1))
    names = [n for n, _ in src.event_names()]
    assert names.index("STOP") > names.index("MIGRATION_PASS")
    dst.wait_event("RESUME")
    assert migration_statuses(dst) == ["setup", "active", "completed"]

    # query-migrate numbers
    ram = q["ram"]
    assert ram["total"] == memory and ram["remaining"] == 0
    assert ram["transferred"] >= memory  # random RAM: every page with its data
    assert ram["normal"] * PAGE_SIZE >= memory
    assert ram["dirty-sync-count"] >= 2  # the bulk pass and the final one, at least
    assert ram["multifd-bytes"] > 0
    assert q["setup-time"] >= 0 and q["downtime"] >= 0
    assert q["total-time"] >= max(q["downtime"], q["setup-time"])
    assert dq["ram"]["total"] == memory and dq["ram"]["normal"] == ram["normal"]
    assert dq["ram"]["transferred"] == ram["transferred"]

    # run states and the destination's check of every page
    assert src.status() == "postmigrate"
    dst.wait_status("running")
    w = dst.cmd("x-query-workload")
    assert w["verified"] is True and w["errors"] == 0, w
    dst.wait_workload_passes(w["passes"])  # and its workload carries on
    devices = dst.cmd("x-query-livemig-devices")
    assert [d["name"] for d in devices] == ["livemig-workload"]
    # a finished source cannot migrate again
    assert src.error("migrate", uri=uri)["class"] == "GenericError"


def test_iterations_while_dirtying(machines: Factory, workdir: Path) -> None:
    """A link (max-bandwidth) only twice as fast as the workload dirties: passes follow
    one another until what is left fits downtime-limit; query-migrate shows them live."""
    memory = 64 * MIB
    src, dst, uri = start_pair(machines, workdir, memory, rate="16M", channels=2)
    src.set_params(max_bandwidth=32 * MIB, downtime_limit=100)
    src.wait_workload_passes(-1)
    dst.cmd("migrate-incoming", uri=uri)
    src.cmd("migrate", uri=uri)
    seen: dict[str, Any] = {"dirty-pages-rate": 0, "expected-downtime": None, "mbps": 0}
    deadline = time.monotonic() + MIGRATION_TIMEOUT
    while (q := src.cmd("query-migrate"))["status"] not in TERMINAL:
        assert time.monotonic() < deadline, q
        if q["status"] == "active":
            ram = q["ram"]
            assert ram["total"] == memory and 0 <= ram["remaining"] <= memory + 64 * PAGE_SIZE
            seen["dirty-pages-rate"] = max(seen["dirty-pages-rate"], ram["dirty-pages-rate"])
            seen["mbps"] = max(seen["mbps"], ram["mbps"])
            if "expected-downtime" in q:
                seen["expected-downtime"] = q["expected-downtime"]
        time.sleep(0.05)
    assert q["status"] == "completed", q
    assert dst.wait_migration()["status"] == "completed"
    passes = [d["pass"] for n, d in src.event_names() if n == "MIGRATION_PASS"]
    assert len(passes) >= 2 and passes == list(range(1, len(passes) + 1)), passes
    assert q["ram"]["dirty-sync-count"] == len(passes) + 1  # and the one at the stop
    assert q["ram"]["transferred"] > memory  # dirtied pages went again
    assert seen["dirty-pages-rate"] > 0 and seen["mbps"] > 0
    assert seen["expected-downtime"] is not None, seen
    # max-bandwidth held: the bulk pass alone takes memory / bandwidth
    assert q["total-time"] >= 1000 * memory / (32 * MIB) * 0.9
    dst.wait_status("running")
    w = dst.cmd("x-query-workload")
    assert w["verified"] is True, w


def test_second_migrate_refused_then_cancel(machines: Factory, workdir: Path) -> None:
    src, dst, uri = start_pair(machines, workdir, 64 * MIB)
    src.set_params(max_bandwidth=4 * MIB)  # 16 s for the bulk pass: plenty of time
    dst.cmd("migrate-incoming", uri=uri)
    baseline = src.resources()
    src.cmd("migrate", uri=uri)
    src.wait_migration(until=("active",))
    e = src.error("migrate", uri=uri)
    assert e == {"class": "GenericError", "desc": IN_PROGRESS}
    e = src.error("migrate-set-capabilities", capabilities=[{"capability": "multifd",
                                                             "state": False}])
    assert e == {"class": "GenericError", "desc": IN_PROGRESS}
    assert src.error("migrate-set-parameters", **{"multifd-channels": 1})["class"] == \
        "GenericError"
    src.set_params(downtime_limit=100)  # a live parameter may change
    e = dst.error("migrate-incoming", uri=uri)
    assert e["class"] == "GenericError"
    src.cmd("migrate_cancel")
    q = src.wait_migration(FAULT_TIMEOUT)
    assert q["status"] == "cancelled" and "error-desc" not in q
    assert dst.wait_migration(FAULT_TIMEOUT)["status"] == "failed"
    assert migration_statuses(src) == ["setup", "active", "cancelling", "cancelled"]
    assert src.status() == "running"
    src.wait_resources(baseline)
    assert not os.path.exists(uri.removeprefix("unix:"))


# --------------------------------------------------------------------------------------------
# 2. livemig demo
# --------------------------------------------------------------------------------------------


def test_demo_json() -> None:
    # its own session: the demo's two machines are killed with it if it overruns
    r = run_cli(["demo", "--json", "--memory", "128M"],
                timeout=MIGRATION_TIMEOUT + START_TIMEOUT)
    assert r.rc == 0, r.stderr
    last = r.stdout.strip().splitlines()[-1]
    s = json.loads(last)
    assert isinstance(s, dict)
    for key in ("status", "verified", "total_time_ms", "setup_time_ms", "downtime_ms",
                "transferred_bytes", "throughput_mbps", "passes", "devices"):
        assert key in s, (key, s)
    assert s["status"] == "completed" and s["verified"] is True
    assert isinstance(s["devices"], list)
    assert s["transferred_bytes"] >= 128 * MIB and s["passes"] >= 2
    assert s["total_time_ms"] >= s["setup_time_ms"] >= 0 and s["downtime_ms"] >= 0
    assert s["throughput_mbps"] > 0


# --------------------------------------------------------------------------------------------
# 3. Faults
# --------------------------------------------------------------------------------------------


class CuttingProxy:
    """A unix-socket forwarder between source and destination that cuts one connection.

    Connection ``cut_index`` (0 = the first accepted: the main channel; 1.. = the
    multifd channels, in the order the source opens them) is closed, both ways,
    once ``cut_after`` bytes of it went from the source to the destination. Every
    thread belongs to the proxy; :meth:`close` joins them (with a deadline) and
    re-raises the first unexpected error.
    """

    CHUNK = 64 << 10

    def __init__(self, listen: str, target: str, *, cut_index: int, cut_after: int) -> None:
        self.listen_path = listen
        self.target = target
        self.cut_index = cut_index
        self.cut_after = cut_after
        self.cut = threading.Event()
        self.forwarded: dict[int, int] = {}
        self.errors: list[BaseException] = []
        self._closing = threading.Event()
        self._socks: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(listen)
        self.server.listen(16)
        self._spawn(self._accept, "proxy-accept")

    def _spawn(self, fn: Callable[..., None], name: str, *args: Any) -> None:
        def run() -> None:
            try:
                fn(*args)
            except BaseException as e:  # noqa: BLE001 - re-raised by close()
                if not self._closing.is_set():
                    self.errors.append(e)

        t = threading.Thread(target=run, name=name)
        with self._lock:
            self._threads.append(t)
        t.start()

    def _accept(self) -> None:
        index = 0
        while not self._closing.is_set():
            try:
                a, _ = self.server.accept()
            except OSError:
                return  # closed
            b = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            b.connect(self.target)
            with self._lock:
                self._socks += [a, b]
            self.forwarded[index] = 0
            self._spawn(self._pump, f"proxy-{index}-up", index, a, b, True)
            self._spawn(self._pump, f"proxy-{index}-down", index, b, a, False)
            index += 1

    def _pump(self, index: int, frm: socket.socket, to: socket.socket, upstream: bool) -> None:
        cutting = upstream and index == self.cut_index
        while True:
            try:
                data = frm.recv(self.CHUNK)
            except OSError:
                data = b""
            if cutting:
                left = self.cut_after - self.forwarded[index]
                data = data[:left]
            if data:
                try:
                    to.sendall(data)
                except OSError:
                    # the receiver is gone: so is this connection, both ways (as a
                    # closed peer makes the sender's next send fail)
                    self._drop(frm, to)
                    return
                if upstream:
                    self.forwarded[index] += len(data)
            if cutting and self.forwarded[index] >= self.cut_after:
                self._drop(frm, to)
                self.cut.set()
                return
            if not data:  # EOF: pass the half-close on
                with contextlib.suppress(OSError):
                    to.shutdown(socket.SHUT_WR)
                return

    @staticmethod
    def _drop(*socks: socket.socket) -> None:
        for s in socks:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self._closing.set()
        with contextlib.suppress(OSError):
            self.server.shutdown(socket.SHUT_RDWR)
        self.server.close()
        with self._lock:
            socks = list(self._socks)
        for s in socks:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
        deadline = time.monotonic() + 10.0
        with self._lock:
            threads = list(self._threads)
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))
        for s in socks:
            s.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.listen_path)
        alive = [t.name for t in threads if t.is_alive()]
        assert not alive, f"proxy threads still running: {alive}"
        if self.errors:
            raise self.errors[0]


@pytest.fixture
def proxies() -> Iterator[list[CuttingProxy]]:
    made: list[CuttingProxy] = []
    yield made
    for p in made:
        p.close()


def assert_source_runs_on(src: RunProcess) -> None:
    """After a failed migration the source's guest runs again and keeps working."""
    src.wait_status("running")
    before = src.cmd("x-query-workload")["passes"]
    src.wait_workload_passes(before)
    assert src.status() == "running"


#: A cut inside the first RAM packet of a multifd channel: past the channel's init
#: packet and a (header-only) sync packet, short of the end of the first full packet
#: of 128 pages.
CUT_AFTER = 300_000
assert INIT_PACKET_SIZE + 2 * RAM_HEADER_SIZE < CUT_AFTER < \
    INIT_PACKET_SIZE + 2 * RAM_HEADER_SIZE + 128 * PAGE_SIZE


@pytest.mark.parametrize("channel", ["multifd", "main"])
def test_fault_channel_cut_mid_packet(machines: Factory, workdir: Path,
                                      proxies: list[CuttingProxy], channel: str) -> None:
    """A connection cut by something in between, inside a packet: multifd channel 1 of 4
    (connection 2), or the main channel of a plain precopy migration, inside its pages."""
    channels = 4 if channel == "multifd" else 0
    src, dst, uri = start_pair(machines, workdir, 64 * MIB, rate="64M", channels=channels)
    src.set_params(max_bandwidth=64 * MIB)
    src_base, dst_base = src.resources(), dst.resources()
    dst.cmd("migrate-incoming", uri=uri)
    proxy_path = str(workdir / "proxy.sock")
    proxy = CuttingProxy(proxy_path, uri.removeprefix("unix:"),
                         cut_index=2 if channel == "multifd" else 0, cut_after=CUT_AFTER)
    proxies.append(proxy)
    src.cmd("migrate", uri=f"unix:{proxy_path}")
    assert proxy.cut.wait(FAULT_TIMEOUT), f"the proxy never cut: {proxy.forwarded}"

    q = src.wait_migration(FAULT_TIMEOUT)
    dq = dst.wait_migration(FAULT_TIMEOUT)
    assert q["status"] == "failed", q
    assert dq["status"] == "failed", dq
    # The destination names the first cause. The source names the first of its sends
    # that failed: for multifd, channel 1's, unless that one's packet was already in the
    # socket buffer and another channel sent first after the destination closed.
    if channel == "multifd":
        # connection 2 is multifd channel 1 (0 is main), cut inside packet 1 (packet 0
        # is the setup sync)
        assert re.search(r"multifd channel 1\b.*middle of packet", dq["error-desc"]), \
            dq["error-desc"]
    else:
        # the record the stream ends in (it starts at most a page and its header before
        # the cut); or, when the destination came to the source's PING only after the
        # cut, its PONG that could not go back
        err = dq["error-desc"]
        m = re.search(r"main channel, offset (0x[0-9a-f]+): .*stream ends", err)
        if m:
            assert CUT_AFTER - 2 * PAGE_SIZE < int(m.group(1), 16) <= CUT_AFTER, err
        else:
            assert "main channel: return path send failed" in err, err
    assert re.search(r"(main|multifd) channel.*send failed", q["error-desc"]), \
        q["error-desc"]
    assert migration_statuses(src) == ["setup", "active", "failed"]
    assert migration_statuses(dst) == ["setup", "active", "failed"]
    assert_source_runs_on(src)
    assert dst.status() == "paused"
    proxies.remove(proxy)
    proxy.close()
    src.wait_resources(src_base)
    dst.wait_resources(dst_base)
    assert sorted(os.listdir(workdir)) == sorted(
        f"{n}.{x}" for n in ("src", "dst") for x in ("qmp", "stdout", "stderr"))


def wait_transferred(m: RunProcess, n: int) -> None:
    """Until ``m``'s query-migrate counts ``n`` bytes transferred: mid-migration."""
    deadline = time.monotonic() + FAULT_TIMEOUT
    while (q := m.cmd("query-migrate")).get("ram", {}).get("transferred", 0) < n:
        assert q["status"] in ("setup", "active"), q
        assert time.monotonic() < deadline, f"{m.name}: the migration made no progress: {q}"
        time.sleep(0.05)


def test_fault_destination_killed(machines: Factory, workdir: Path) -> None:
    src, dst, uri = start_pair(machines, workdir, 64 * MIB, rate="64M", channels=2)
    src.set_params(max_bandwidth=8 * MIB)  # 8 s for the bulk pass
    dst.cmd("migrate-incoming", uri=uri)
    src_base = src.resources()
    src.cmd("migrate", uri=uri)
    wait_transferred(src, 4 * MIB)
    dst.kill()
    q = src.wait_migration(FAULT_TIMEOUT)
    assert q["status"] == "failed", q
    assert q["ram"]["transferred"] < 64 * MIB  # it really was cut short
    # the first cause: a send to the gone destination
    assert re.search(r"(main|multifd) channel.*(send|recv).*(pipe|reset|closed)",
                     q["error-desc"], re.IGNORECASE), q["error-desc"]
    assert migration_statuses(src) == ["setup", "active", "failed"]
    assert_source_runs_on(src)
    src.wait_resources(src_base)
    # what is left is the killed destination's (it could not clean up), nothing of the source
    assert sorted(os.listdir(workdir)) == sorted(
        ["mig.sock", *(f"{n}.{x}" for n in ("src", "dst") for x in ("qmp", "stdout", "stderr"))])


@pytest.mark.parametrize("how", ["SIGKILL", "SIGTERM", "quit"])
def test_fault_source_gone(machines: Factory, workdir: Path, how: str) -> None:
    """The source killed, terminated or told to quit mid-migration: the destination
    reports failed within the deadline, names the cut stream, and stays (paused,
    answering) with its threads, descriptors and listening socket gone back. A source
    that was asked to leave ends the migration, exits promptly and removes its socket."""
    src, dst, uri = start_pair(machines, workdir, 64 * MIB, rate="64M", channels=2)
    src.set_params(max_bandwidth=8 * MIB)  # 8 s for the bulk pass
    dst_base = dst.resources()
    dst.cmd("migrate-incoming", uri=uri)
    src.cmd("migrate", uri=uri)
    wait_transferred(dst, 4 * MIB)
    if how == "SIGKILL":
        src.kill()
    else:
        if how == "quit":
            src.cmd("quit")
        else:
            os.kill(src.pid, signal.SIGTERM)
        try:
            rc = src.proc.wait(EXIT_TIMEOUT)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"the source did not exit within {EXIT_TIMEOUT:.0f} s of "
                                 f"{how} during a migration:\n{src.stderr()}") from None
        # quit is a normal end; SIGTERM ends any livemig command with 128 + 15
        assert rc == (0 if how == "quit" else 128 + signal.SIGTERM), src.stderr()
        assert "Traceback" not in src.stderr(), src.stderr()
    dq = dst.wait_migration(FAULT_TIMEOUT)
    assert dq["status"] == "failed", dq
    # the first channel that saw the end (main, idle between sections, as a rule)
    assert re.search(r"(main|multifd) channel\b.*(stream ends|closed)", dq["error-desc"]), \
        dq["error-desc"]
    assert migration_statuses(dst) == ["setup", "active", "failed"]
    # the destination stays, paused, and keeps answering
    assert dst.alive()
    assert dst.cmd("query-status") == {"status": "paused", "running": False}
    assert dst.cmd("query-migrate")["status"] == "failed"
    dst.wait_resources(dst_base)
    assert dst.alive()
    # the listening socket is gone; a killed source leaves its QMP socket behind
    left = ["dst.qmp", *(f"{n}.{x}" for n in ("src", "dst") for x in ("stdout", "stderr"))]
    if how == "SIGKILL":
        left.append("src.qmp")
    assert sorted(os.listdir(workdir)) == sorted(left)


# --------------------------------------------------------------------------------------------
# 4. The format: livemig run -> livemig receive -> snapshot -> livemig inspect
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("channels", "compression"), [(0, "none"), (2, "zstd")])
def test_run_to_receive_snapshot_inspect(machines: Factory, workdir: Path,
                                         livemig_receive: ReceiveFactory,
                                         livemig_cli: Callable[..., Any], channels: int,
                                         compression: str) -> None:
    memory = 64 * MIB
    src = machines("src", *workload_args(memory))
    src.set_caps(multifd=channels > 0, events=True)
    if channels:
        src.set_params(multifd_channels=channels, multifd_compression=compression)
    src.set_params(max_bandwidth=0)
    uri = f"unix:{workdir}/recv.sock"
    snap = workdir / "vm.snap"
    recv = livemig_receive(uri, snap, multifd_channels=channels,
                           multifd_compression=compression if channels else None)
    src.wait_workload_passes(-1)
    src.cmd("migrate", uri=uri)
    q = src.wait_migration()
    assert q["status"] == "completed", q
    recv.wait_ok()
    assert src.status() == "postmigrate"
    assert migration_statuses(src) == ["setup", "active", "completed"]

    report = json.loads(livemig_cli("inspect", "--json", str(snap)).stdout)
    assert report["format"] == "mapped-ram snapshot"
    assert report["machine"] == "livemig"
    assert report["ram_total"] == memory == q["ram"]["total"]
    blocks = {b["name"]: b for b in report["ram_blocks"]}
    assert list(blocks) == ["pc.ram"]
    ram = blocks["pc.ram"]
    assert ram["size"] == memory and ram["pages"] == memory // PAGE_SIZE
    # every page is in the snapshot, as data or as a zero page; random RAM has data
    assert ram["pages_present"] + ram["zero_pages"] == memory // PAGE_SIZE
    assert ram["pages_present"] == memory // PAGE_SIZE
    devices = [(d["idstr"], d["instance_id"]) for d in report["devices"]]
    assert devices == [("livemig-workload", 0)]
    assert report["devices"][0]["size"] > 0


def test_snapshot_sent_back_into_a_machine(machines: Factory, workdir: Path,
                                           livemig_receive: ReceiveFactory,
                                           livemig_cli: Callable[..., Any]) -> None:
    """The snapshot holds a consistent machine: ``livemig send`` migrates it into a fresh
    ``livemig run`` whose workload checks every page against the sweep position that
    travelled in the workload section."""
    memory = 32 * MIB
    src = machines("src", *workload_args(memory, rate="64M"))
    src.set_params(max_bandwidth=0)
    uri = f"unix:{workdir}/recv.sock"
    snap = workdir / "vm.snap"
    recv = livemig_receive(uri, snap)
    src.wait_workload_passes(0)  # counters past their first sweep
    src.cmd("migrate", uri=uri)
    assert src.wait_migration()["status"] == "completed"
    recv.wait_ok()

    dst = machines("dst", *workload_args(memory, fill=False), "--incoming", "defer")
    dst.set_caps(events=True)
    back = f"unix:{workdir}/back.sock"
    dst.cmd("migrate-incoming", uri=back)
    sent = livemig_cli("send", str(snap), back, "--json")
    assert json.loads(sent.stdout.strip().splitlines()[-1])["verdict"] == \
        "confirmed by the destination"
    dq = dst.wait_migration()
    assert dq["status"] == "completed", dq
    dst.wait_status("running")
    w = dst.cmd("x-query-workload")
    assert w["verified"] is True and w["errors"] == 0, w
    assert w["passes"] >= 1


# --------------------------------------------------------------------------------------------
# The two sides disagree
# --------------------------------------------------------------------------------------------


def test_migrate_to_nowhere(machines: Factory, workdir: Path) -> None:
    """Nothing listens at the URI: the source fails in setup, says so, and runs on."""
    src = machines("src", *workload_args(16 * MIB, rate="64M"))
    src.set_caps(events=True)
    base = src.resources()
    src.cmd("migrate", uri=f"unix:{workdir}/nobody.sock")
    q = src.wait_migration(FAULT_TIMEOUT)
    assert q["status"] == "failed", q
    assert re.search(r"cannot connect to the destination unix:.*nobody\.sock: No such file",
                     q["error-desc"]), q["error-desc"]
    assert migration_statuses(src) == ["setup", "failed"]
    assert_source_runs_on(src)
    src.wait_resources(base)
    for bad in ("file:/tmp/x", "nonsense"):
        assert src.error("migrate", uri=bad)["class"] == "GenericError"


#: How soon a cancel must take effect, whatever the migration is doing.
CANCEL_TIMEOUT = 2.0


@pytest.mark.parametrize("how", ["migrate_cancel", "quit"])
def test_cancel_while_connecting_is_prompt(machines: Factory, workdir: Path, how: str) -> None:
    """The source retries a connection nobody accepts for a while (the destination may
    not listen yet); a cancel or a quit ends that at once."""
    src = machines("src", *workload_args(16 * MIB, rate="64M"))
    src.cmd("migrate", uri=f"unix:{workdir}/nobody.sock")
    time.sleep(0.3)  # into connect's retries
    t0 = time.monotonic()
    if how == "quit":
        src.cmd("quit")
        try:
            assert src.proc.wait(CANCEL_TIMEOUT + EXIT_TIMEOUT) == 0, src.stderr()
        except subprocess.TimeoutExpired:
            raise AssertionError("quit while connecting: the source did not exit") from None
        took = time.monotonic() - t0
    else:
        src.cmd("migrate_cancel")
        q = src.wait_migration(FAULT_TIMEOUT)
        took = time.monotonic() - t0
        assert q["status"] == "cancelled", q
        assert_source_runs_on(src)
    limit = CANCEL_TIMEOUT + (3.0 if how == "quit" else 0.0)  # and the interpreter's exit
    assert took < limit, f"{how} took {took:.1f} s to end the migration"


@pytest.mark.parametrize("mismatch", ["ram-size", "channels", "compression"])
def test_mismatched_sides_fail_both(machines: Factory, workdir: Path, mismatch: str) -> None:
    """The destination refuses what does not fit it and says why; the source fails
    and runs on."""
    memory = 64 * MIB
    dst_memory = memory // 2 if mismatch == "ram-size" else memory
    dst = machines("dst", *workload_args(dst_memory, fill=False), "--incoming", "defer")
    src = machines("src", *workload_args(memory, rate="64M"))
    configure(4 if mismatch == "channels" else 2,
              "zstd" if mismatch == "compression" else "none", src)
    configure(2, "none", dst)
    uri = f"unix:{workdir}/mig.sock"
    src_base, dst_base = src.resources(), dst.resources()
    dst.cmd("migrate-incoming", uri=uri)
    src.cmd("migrate", uri=uri)
    q = src.wait_migration(FAULT_TIMEOUT)
    dq = dst.wait_migration(FAULT_TIMEOUT)
    assert q["status"] == "failed" and q["error-desc"], q
    assert dq["status"] == "failed", dq
    expect = {"ram-size": r"RAM block pc\.ram: the source has 67108864 bytes, this machine "
                          r"33554432",
              "channels": r"more connections than .* multifd channels",
              "compression": r"multifd channel \d.*zstd.*multifd-compression here is none"}
    assert re.search(expect[mismatch], dq["error-desc"]), dq["error-desc"]
    if mismatch == "ram-size":
        # the destination's loader refused: it says so on the return path (SHUT 1) before
        # it closes, and the source reports that rather than its broken channel
        assert q["error-desc"] == "the destination failed to load the migration (status 1)"
    assert_source_runs_on(src)
    assert dst.status() == "paused"
    src.wait_resources(src_base)
    dst.wait_resources(dst_base)
    assert "mig.sock" not in os.listdir(workdir)
