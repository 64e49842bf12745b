"""Issue 12, the engine's share: operator mistakes and hostile peers get QEMU's answer.

Every wait is on an event (a connection accepted, a status reached, a process
ended) with a deadline; nothing here measures elapsed time.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import LIVEMIG, livemig_env, run_cli, uri_listening

from livemig.engine.controller import CommandError, MachineController
from livemig.engine.handlers import BlobDevice
from livemig.engine.machine import Machine

MIB = 1 << 20
DEADLINE = 60.0


class Recorder:
    """A controller's events, with a condition to wait for one."""

    def __init__(self) -> None:
        self.events: list[tuple[str, Any]] = []
        self._cond = threading.Condition()

    def __call__(self, name: str, data: Any) -> None:
        with self._cond:
            self.events.append((name, data))
            self._cond.notify_all()

    def names(self) -> list[str]:
        with self._cond:
            return [n for n, _ in self.events]


@pytest.fixture
def machines() -> Iterator[list[tuple[MachineController, Machine]]]:
    made: list[tuple[MachineController, Machine]] = []
    yield made
    for ctl, m in made:
        ctl.close()
        m.close()


def _machine(made: list[tuple[MachineController, Machine]], rec: Recorder, *,
             incoming: str | None = None, devices: tuple[BlobDevice, ...] = (),
             ) -> tuple[MachineController, Machine]:
    m = Machine(8 * MIB)
    for d in devices:
        m.add_device(d)
    ctl = MachineController(m, incoming=incoming, emit=rec)
    made.append((ctl, m))
    ctl.start()
    ctl.migrate_set_capabilities([{"capability": "events", "state": True}])
    return ctl, m


# -- item 13: a failed migration leaves a machine the user paused paused -------------------


@pytest.mark.parametrize("when", ["before", "during-setup"])
def test_failed_migration_keeps_user_pause(machines: list[tuple[MachineController, Machine]],
                                           workdir: Path, when: str) -> None:
    """QEMU resumes after a failure only a machine the migration itself stopped
    (``vm_old_state``); a ``stop`` by the user, before or during the migration, stays."""
    rec = Recorder()
    ctl, m = _machine(machines, rec)
    assert m.state == "running"
    path = str(workdir / "silent.sock")
    lsock = socket.socket(socket.AF_UNIX)
    lsock.bind(path)
    lsock.listen(1)
    lsock.settimeout(DEADLINE)
    try:
        if when == "before":
            ctl.stop()
        ctl.migrate(f"unix:{path}")
        conn, _ = lsock.accept()  # the migration is under way: its main channel is here
        if when == "during-setup":
            ctl.stop()
        assert m.state == "paused"
        conn.close()  # the destination goes away: the migration fails
    finally:
        lsock.close()
    assert ctl.wait_migration(DEADLINE) == "failed"
    assert m.state == "paused"
    assert "RESUME" not in rec.names(), rec.events
    assert ctl.query_status() == {"status": "paused", "running": False}


# -- item 4: a machine whose incoming migration failed cannot be migrated on ---------------


def test_failed_incoming_refuses_migrate(machines: list[tuple[MachineController, Machine]],
                                         workdir: Path) -> None:
    src_rec, dst_rec = Recorder(), Recorder()
    src, _ = _machine(machines, src_rec, devices=(BlobDevice("only-on-source", b"abc"),))
    dst, dst_m = _machine(machines, dst_rec, incoming="defer")
    with pytest.raises(CommandError, match=r"^Guest is waiting for an incoming migration$"):
        dst.migrate(f"unix:{workdir}/never.sock")  # not loaded yet
    uri = f"unix:{workdir}/mig.sock"
    dst.migrate_incoming(uri)
    src.migrate(uri)
    assert src.wait_migration(DEADLINE) == "failed"
    assert dst.wait_migration(DEADLINE) == "failed"
    with pytest.raises(CommandError, match=r"^Guest is waiting for an incoming migration$"):
        dst.migrate(f"unix:{workdir}/third.sock")
    assert dst.outgoing is None
    with pytest.raises(CommandError):
        dst.cont()
    assert dst_m.state == "paused"
    assert "RESUME" not in dst_rec.names()


# -- `livemig run` as a process, driven over a plain QMP socket ---------------------------


class Qmp:
    """A synchronous QMP client: replies to commands, events kept aside."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.settimeout(DEADLINE)
        self.sock.connect(path)
        self.buf = b""
        self.events: list[dict[str, Any]] = []
        assert "QMP" in self._read()
        assert self.cmd("qmp_capabilities") == {"return": {}}

    def _read(self) -> dict[str, Any]:
        while b"\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError("the QMP server closed the connection")
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        msg: dict[str, Any] = json.loads(line)
        return msg

    def cmd(self, name: str, **args: Any) -> dict[str, Any]:
        req: dict[str, Any] = {"execute": name}
        if args:
            req["arguments"] = args
        self.sock.sendall(json.dumps(req).encode())
        while True:
            msg = self._read()
            if "event" in msg:
                self.events.append(msg)
            else:
                return msg

    def rest(self) -> list[dict[str, Any]]:
        """Everything until the server closes: the events at the end."""
        with contextlib.suppress(EOFError, OSError):
            while True:
                self.events.append(self._read())
        return self.events

    def close(self) -> None:
        self.sock.close()


class RunProc:
    def __init__(self, workdir: Path, *args: str) -> None:
        self.qmp_path = str(workdir / "m.qmp")
        self.out = workdir / "ready.json"
        with open(self.out, "wb") as out:
            self.proc = subprocess.Popen(
                [*LIVEMIG, "run", "--memory", "8M", "--print-ready", "--qmp",
                 f"unix:{self.qmp_path}", *args],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.PIPE,
                env=livemig_env(), start_new_session=True)
        # --print-ready's line comes once the QMP socket and the incoming listener are up
        while b"\n" not in self.out.read_bytes():
            assert self.proc.poll() is None, self.proc.communicate()[1]
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(0.05)
        self.qmp = Qmp(self.qmp_path)

    def wait(self) -> int:
        """Its exit status; a process still alive after the deadline fails the test."""
        try:
            return self.proc.wait(DEADLINE)
        except subprocess.TimeoutExpired:
            raise AssertionError("livemig run did not stop") from None

    def close(self) -> None:
        self.qmp.close()
        if self.proc.poll() is None:
            with contextlib.suppress(OSError):
                os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(DEADLINE)
        assert self.proc.stderr is not None
        self.proc.stderr.close()


@pytest.fixture
def run_procs() -> Iterator[list[RunProc]]:
    made: list[RunProc] = []
    yield made
    for p in made:
        p.close()


# -- item 1: a destination waiting for its source stops at once ----------------------------


@pytest.mark.parametrize("start", ["incoming", "defer"])
@pytest.mark.parametrize("how", ["SIGTERM", "quit", "migrate_cancel"])
def test_waiting_destination_stops(run_procs: list[RunProc], workdir: Path, start: str,
                                   how: str) -> None:
    uri = f"unix:{workdir}/in.sock"
    args = ["--incoming", uri] if start == "incoming" else ["--incoming", "defer"]
    m = RunProc(workdir, *args)
    run_procs.append(m)
    if start == "defer":
        assert m.qmp.cmd("migrate-incoming", uri=uri) == {"return": {}}
    assert uri_listening(uri)
    assert m.qmp.cmd("query-status")["return"]["status"] == "inmigrate"
    if how == "SIGTERM":
        m.proc.send_signal(signal.SIGTERM)
        assert m.wait() == 128 + signal.SIGTERM
    elif how == "quit":
        assert m.qmp.cmd("quit") == {"return": {}}
        assert m.wait() == 0
    else:
        assert m.qmp.cmd("migrate_cancel") == {"return": {}}
        # the wait ends: the listener is gone and the incoming migration has failed (the
        # cancel is asynchronous, as QEMU's: its thread reports it a moment later)
        deadline = time.monotonic() + 5
        while (q := m.qmp.cmd("query-migrate")["return"])["status"] == "setup" \
                and time.monotonic() < deadline:
            pass
        assert q["status"] == "failed", q
        assert not uri_listening(uri)
        assert m.proc.poll() is None  # the machine stays, as QEMU's with exit-on-error off
        assert m.qmp.cmd("quit") == {"return": {}}
        assert m.wait() == 0
    assert not os.path.exists(f"{workdir}/in.sock")


# -- item 16: QMP fidelity -----------------------------------------------------------------


def test_quit_emits_shutdown(run_procs: list[RunProc], workdir: Path) -> None:
    m = RunProc(workdir)
    run_procs.append(m)
    assert m.qmp.cmd("quit") == {"return": {}}
    events = [e for e in m.qmp.rest() if e.get("event") == "SHUTDOWN"]
    assert [e["data"] for e in events] == [{"guest": False, "reason": "host-qmp-quit"}]
    assert m.wait() == 0


def test_migrate_refuses_blk_like_qemu10(run_procs: list[RunProc], workdir: Path) -> None:
    m = RunProc(workdir)
    run_procs.append(m)
    for arg in ("blk", "inc"):
        r = m.qmp.cmd("migrate", uri=f"unix:{workdir}/none.sock", **{arg: True})
        assert r == {"error": {"class": "GenericError",
                               "desc": f"Parameter '{arg}' is unexpected"}}, r
    assert m.qmp.cmd("query-migrate") == {"return": {}}
    assert "error" in m.qmp.cmd("query-workload")
    assert m.qmp.cmd("x-query-workload")["error"]["desc"] == "this machine runs no workload"


# -- item 17: inspect --fields for a person, and the captured run state --------------------

DATA = Path(__file__).parent / "data"


@pytest.fixture
def qemu10_stream(workdir: Path) -> Path:
    import lzma
    out = workdir / "qemu10.stream"
    out.write_bytes(lzma.decompress((DATA / "qemu10.0-precopy.stream.xz").read_bytes()))
    return out


def test_inspect_fields_readable(qemu10_stream: Path) -> None:
    r = run_cli(["inspect", str(qemu10_stream), "--fields"])
    assert r.rc == 0, r.stderr
    lines = r.stdout.splitlines()
    assert "      runstate: \"prelaunch\"" in lines  # text, not 70726572...
    assert "      env.eip: 0xfff0" in lines  # a register in hex
    regs = [x for x in lines if x.strip().startswith("env.regs:")]
    assert regs and regs[0].strip().startswith("env.regs: [0x0, 0x0, 0x"), regs  # one line
    assert any(x.strip().startswith("env.segs[1]: {selector: 0xf000, base: 0xffff0000")
               for x in lines)
    # one line per field or array element: far fewer lines than values
    assert len(lines) < 1000, len(lines)
    assert "  run state:    prelaunch when captured" in lines


def test_inspect_json_keeps_numbers_and_shows_runstate(qemu10_stream: Path) -> None:
    r = run_cli(["inspect", str(qemu10_stream), "--fields", "--json"])
    assert r.rc == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["runstate"] == "prelaunch"
    cpu = next(d for d in report["devices"] if d["idstr"] == "cpu")
    assert cpu["fields"]["env.eip"] == 0xFFF0  # JSON: a number
    glob = next(d for d in report["devices"] if d["idstr"] == "globalstate")
    assert glob["fields"]["runstate"] == "prelaunch"
    plain = run_cli(["inspect", str(qemu10_stream)])
    assert "  run state:    prelaunch when captured" in plain.stdout.splitlines()


# -- item 8: --dest-qmp against a monitor answering in unexpected shapes -------------------

GOOD_REPLIES: dict[str, Any] = {
    "qmp_capabilities": {"return": {}},
    "query-version": {"return": {"qemu": {"major": 10, "minor": 0, "micro": 0},
                                 "package": ""}},
    "qom-get": {"return": "pc-i440fx-10.0-machine"},
    "query-memory-size-summary": {"return": {"base-memory": 8 * MIB}},
    "query-migrate": {"return": {}},
    "query-migrate-capabilities": {"return": [{"capability": "multifd", "state": False}]},
    "migrate-set-capabilities": {"return": {}},
    "migrate-set-parameters": {"return": {}},
    "migrate-incoming": {"return": {}},
}


class FakeMonitor:
    """A QMP monitor on a unix socket that answers each command from a table."""

    def __init__(self, path: str, replies: dict[str, Any]) -> None:
        self.path = path
        self.replies = {**GOOD_REPLIES, **replies}
        self.lsock = socket.socket(socket.AF_UNIX)
        self.lsock.bind(path)
        self.lsock.listen(1)
        self.lsock.settimeout(DEADLINE)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._serve, name="fake-qmp")
        self.thread.start()

    def _serve(self) -> None:
        try:
            conn, _ = self.lsock.accept()
            with conn:
                conn.settimeout(DEADLINE)
                conn.sendall(b'{"QMP": {"version": {}, "capabilities": []}}\r\n')
                buf = b""
                while True:
                    chunk = conn.recv(65536)
                    if not chunk:
                        return
                    buf += chunk
                    while b"\n" in buf:
                        line, _, buf = buf.partition(b"\n")
                        name = json.loads(line)["execute"]
                        conn.sendall(json.dumps(self.replies[name]).encode() + b"\r\n")
        except BaseException as e:  # noqa: BLE001 - re-raised by close()
            self.error = e

    def close(self) -> None:
        self.lsock.close()
        self.thread.join(DEADLINE)
        assert not self.thread.is_alive()
        if self.error is not None and not isinstance(self.error, OSError):
            raise self.error


@pytest.mark.parametrize(("replies", "names"), [
    ({"query-version": {"error": "boom"}}, "query-version"),
    ({"query-version": {"error": ["x"]}}, "query-version"),
    ({"query-version": {"return": [10, 0]}}, "query-version"),
    ({"query-version": {"return": None}}, "query-version"),
    ({"query-version": {"return": {"qemu": {"major": "ten", "minor": 0}}}}, "query-version"),
    ({"query-version": {"return": {"qemu": [10, 0]}}}, "query-version"),
    ({"qom-get": {"return": {"type": "pc"}}}, "qom-get"),
    ({"query-memory-size-summary": {"return": [1]}}, "query-memory-size-summary"),
    ({"query-memory-size-summary": {"return": {"base-memory": "8M"}}},
     "query-memory-size-summary"),
    ({"query-migrate": {"return": ["active"]}}, "query-migrate"),
    ({"query-migrate-capabilities": {"return": {"multifd": False}}},
     "query-migrate-capabilities"),
    ({"query-migrate-capabilities": {"return": [{}]}}, "query-migrate-capabilities"),
    ({"query-migrate-capabilities": {"return": [{"capability": "multifd", "state": "on"}]}},
     "query-migrate-capabilities"),
    ({"migrate-set-capabilities": {"error": {"class": "GenericError"}}},
     "migrate-set-capabilities"),
])
def test_dest_qmp_unexpected_shapes(workdir: Path, replies: dict[str, Any], names: str) -> None:
    from types import SimpleNamespace

    from livemig.commands.dest_check import preflight
    from livemig.errors import MigrationError
    from livemig.io.qmp_peer import QmpPeer
    from livemig.io.uri import parse_uri
    from livemig.wire.constants import MultifdCompression

    path = str(workdir / "fake.qmp")
    fake = FakeMonitor(path, replies)
    load: Any = SimpleNamespace(configuration=SimpleNamespace(machine="pc-i440fx-10.0"),
                                blocks=[SimpleNamespace(name="pc.ram", length=8 * MIB)])
    try:
        qmp = QmpPeer(f"unix:{path}")
        try:
            with pytest.raises(MigrationError) as info:
                # multifd on: the capability differs from the fake's, so it is set
                preflight(qmp, load, parse_uri(f"unix:{workdir}/m.sock"), 2,
                          MultifdCompression.NONE)
        finally:
            qmp.close()
    finally:
        fake.close()
    msg = str(info.value)
    assert names in msg and "\n" not in msg, msg


_MAIN = {"channel-type": "main"}


@pytest.mark.parametrize(("command", "args", "desc"), [
    ("migrate", {"channels": [1]}, "Invalid parameter type for 'channels[0]', expected: object"),
    ("migrate", {"channels": [{**_MAIN, "addr": 1}]},
     "Invalid parameter type for 'channels[0].addr', expected: object"),
    ("migrate", {"channels": [{"addr": {}}]}, "Parameter 'channels[0].channel-type' is missing"),
    ("migrate", {"channels": [{**_MAIN, "addr": {"transport": "socket", "type": "inet"}}]},
     "Parameter 'channels[0].addr.host' is missing"),
    ("migrate", {"channels": [{**_MAIN, "addr": {"transport": "socket", "type": "inet",
                                                 "host": "h", "port": 5}}]},
     "Invalid parameter type for 'channels[0].addr.port', expected: string"),
    ("migrate", {"channels": [{**_MAIN, "addr": {"transport": "socket", "type": "unix"}}]},
     "Parameter 'channels[0].addr.path' is missing"),
    ("migrate", {"channels": [{**_MAIN, "addr": {"transport": "pigeon"}}]},
     "Parameter 'channels[0].addr.transport' does not accept value 'pigeon'"),
    ("migrate", {}, "need either 'uri' or 'channels' argument"),
    ("migrate-incoming", {"channels": [{**_MAIN, "addr": 5}]},
     "Invalid parameter type for 'channels[0].addr', expected: object"),
    ("migrate-incoming", {}, "need either 'uri' or 'channels' argument"),
])
def test_qmp_argument_errors_are_qemu_texts(command: str, args: dict[str, Any],
                                            desc: str) -> None:
    """Malformed arguments get QEMU's descriptions, never Python's ("'host'",
    "'int' object has no attribute 'get'")."""
    from livemig.control.machine_commands import machine_commands
    from livemig.control.qmp_session import QmpError

    m = Machine(1 * MIB)
    ctl = MachineController(m, incoming="defer")
    try:
        ctl.start()
        with pytest.raises(QmpError) as info:
            machine_commands(ctl)[command](args)
        assert str(info.value) == desc
    finally:
        ctl.close()
        m.close()
