"""The QMP control socket (livemig.control) against QEMU 10's own QMP.

* The same raw messages, good and bad, go to a real QEMU 10 (and 7.2) and to a QmpServer
  whose table mimics QEMU's (query-status, human-monitor-command arguments):
  replies must match in shape, key order, error class and (all of QEMU's texts
  here being fixed) error text.
* qemu.qmp's QMPClient drives the server as it drives QEMU.
* Raw sockets: input split anywhere, several messages at once, an over-long
  message, a handler that fails, events to several clients, a client that never
  reads, 50 start/close cycles that leave no thread or descriptor behind.
* The input parser on its own: whole, a byte at a time, with trailing bytes, and
  fuzzed (parse or report, nothing else).

Every wait has a deadline. QEMU 10 and 7.2 must be installed: without them the
comparison tests fail (peers.require_qemu), they are never skipped.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Self

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from peers import QemuPeer
from qemu.qmp import ExecuteError, QMPClient

from livemig.control import QmpError, QmpServer, check_arguments, qmp_server
from livemig.control.qmp_json import (
    MAX_QMP_MESSAGE,
    InputTooLarge,
    Message,
    ParseFailure,
    QmpInputParser,
)
from livemig.control.qmp_server import MAX_CLIENT_BACKLOG
from livemig.errors import ConfigError, StateError

READ_TIMEOUT = 10.0  # seconds for one reply from either server
ASYNC_TIMEOUT = 20.0  # seconds for one qemu.qmp conversation


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


class RawClient:
    """A QMP client over a plain socket: bytes out, one parsed message per line in."""

    def __init__(self, address: str, timeout: float = READ_TIMEOUT) -> None:
        kind, _, rest = address.partition(":")
        if kind == "unix":
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.settimeout(timeout)
            self.sock.connect(rest)
        else:
            host, _, port = rest.rpartition(":")
            self.sock = socket.create_connection((host, int(port)), timeout=timeout)
        self.buf = b""
        self.greeting = self.read()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def read_line(self) -> bytes | None:
        """One raw line (CRLF removed), or None at EOF."""
        while b"\n" not in self.buf:
            chunk = self.sock.recv(65536)  # socket timeout = the deadline
            if not chunk:
                return None
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        assert line.endswith(b"\r"), f"QMP lines end in CRLF: {line!r}"
        return line[:-1]

    def read(self) -> dict[str, Any]:
        line = self.read_line()
        assert line is not None, "the server closed the connection"
        msg = json.loads(line)
        assert isinstance(msg, dict)
        return msg

    def cmd(self, name: str, **args: Any) -> dict[str, Any]:
        req: dict[str, Any] = {"execute": name}
        if args:
            req["arguments"] = args
        self.send(json.dumps(req).encode() + b"\n")
        return self.read()

    def negotiate(self) -> None:
        assert self.cmd("qmp_capabilities") == {"return": {}}

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _query_status(args: dict[str, Any]) -> dict[str, Any]:
    check_arguments(args, {})
    return {"status": "prelaunch", "running": False}


def _hmp(args: dict[str, Any]) -> str:
    # QEMU's schema for human-monitor-command; only its argument errors are compared.
    check_arguments(args, {"command-line": "string", "*cpu-index": "integer"})
    return ""


def _fail(args: dict[str, Any]) -> None:
    raise RuntimeError("the handler broke")


def _refuse(args: dict[str, Any]) -> None:
    raise QmpError("no such device", "DeviceNotFound")


TABLE = {"query-status": _query_status, "human-monitor-command": _hmp,
         "x-fail": _fail, "x-refuse": _refuse}


@pytest.fixture
def sockdir() -> Iterator[Path]:
    """A short private directory (unix socket paths are limited to 107 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="lmqmp-"))
    yield path
    for p in path.iterdir():
        p.unlink()
    path.rmdir()


@pytest.fixture(params=["unix", "tcp"])
def address(request: pytest.FixtureRequest, sockdir: Path) -> str:
    return f"unix:{sockdir / 'qmp.sock'}" if request.param == "unix" else "tcp:127.0.0.1:0"


@pytest.fixture
def server(address: str) -> Iterator[QmpServer]:
    with QmpServer(address, TABLE) as srv:
        yield srv


def _wait_for(cond: Any, what: str, timeout: float = READ_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


# --------------------------------------------------------------------------------------------
# Real QEMU 10 and QmpServer, message for message
# --------------------------------------------------------------------------------------------

#: Sent in this order on one connection to each server. Each entry is complete (it leaves
#: neither parser inside a message), so a sentinel command after it collects its replies.
#: Before negotiation, then qmp_capabilities, then command mode.
CASES_BEFORE = [
    b'{"execute": "query-status", "id": 1}',
    b'{"execute": "nope", "id": "a"}',
    b'{"execute": "query-status"}',
    b'{"exec-oob": "query-status", "id": 2}',
    b'{"id": 3}',
    b'[1, 2]',
    b'{"execute": "qmp_capabilities", "arguments": {"enable": ["foo"]}, "id": 4}',
    b'{"execute": "qmp_capabilities", "arguments": {"enable": "oob"}, "id": 5}',
    b'{"execute": "qmp_capabilities", "arguments": {"enable": [1]}, "id": 6}',
    b'{"execute": "qmp_capabilities", "arguments": {"x": 1}, "id": 7}',
    b'{"execute": "qmp_capabilities", "arguments": [], "id": 8}',
]
CASES_NEGOTIATE = [b'{"execute": "qmp_capabilities", "id": {"nested": [1, null]}}']
CASES_AFTER = [
    b'{"execute": "qmp_capabilities", "id": 9}',
    b'{"execute": "query-status", "id": 10}',
    b'{"execute": "query-status", "id": null}',
    b'{"execute": "query-status", "id": [1, "two", {"3": false}]}',
    b'{"execute": "query-status"}',
    b"{'execute': 'query-status', 'id': 'single \\' quoted'}",
    b'{"execute": "query-status", "id": "\\u00e9\xc3\xa9\\ud83d\\ude00\\/\\b\\f\\n\\r\\t"}',
    b'{"execute": "query-status", "id": 18446744073709551615}',
    b'{"execute": "query-status", "id": -9223372036854775808}',
    b'{"execute": "query-status", "id": 99999999999999999999}',
    b'{"execute": "query-status", "id": -0.5E+2}',
    b'{"execute": "query-status", "id": 0.25}',
    b'{"execute": "query-status", "arguments": {}, "id": 11}',
    b'{"execute": "query-status", "arguments": {"x": 1}, "id": 12}',
    b'{"execute": "query-status", "arguments": [1], "id": 13}',
    b'{"execute": "query-status", "arguments": null, "id": 14}',
    b'{"execute": "query-status", "bogus": 1, "id": 15}',
    b'{"execute": "query-status", "control": {}, "id": 16}',
    b'{"execute": "nope", "id": 17}',
    b'{"execute": 5, "id": 18}',
    b'{"id": 19}',
    b'{}',
    b'{"exec-oob": "query-status", "id": 20}',
    b'{"execute": "query-version", "arguments": {"a": 1}, "id": 21}',
    b'{"execute": "query-commands", "arguments": {"a": 1}, "id": 22}',
    b'{"execute": "human-monitor-command", "id": 23}',
    b'{"execute": "human-monitor-command", "arguments": {"command-line": 1}, "id": 24}',
    (b'{"execute": "human-monitor-command", "arguments": '
    b'{"command-line": "info version", "cpu-index": "a"}, "id": 25}'),
    (b'{"execute": "human-monitor-command", "arguments": '
    b'{"command-line": "info version", "zzz": 1}, "id": 26}'),
    # Not objects, not JSON.
    b'[1, 2]', b'"text"', b'42 ', b'true ', b'null ',
    b'{"execute": "query-status", "id": 27}{"execute": "query-status", "id": 28}',
    b'{"execute" "query-status"}',
    b'{"execute": "query-status" "id": 1}',
    b'{1: 2}',
    b'{"a": }',
    b'{"a": [1 2]}',
    b'{"a": [1,]}',
    b'{,}',
    b'{"a": 1,}',
    b'{]',
    b'[1}',
    b'}', b']',
    b'{"a": bad}',
    b'{"execute": "query-status", "id": 1, "id": 2}',
    b'{"a": "\\x"}',
    b'{"a": "\\u12"}',
    b'{"a": "\\u1x23"}',
    b'{"a": "\\ud800"}',
    b'{"a": "\\udc00"}',
    b'{"a": "\\ud800\\u0041"}',
    b'{"a": "\\uFFFF"}',
    b'{"a": "\xc3("}',
    b'{"a": "\xed\xa0\x80"}',
    b'{"execute": "query-status", "id": "\xc0\x80"}',
    b'{"a": 1e}',
    b'{"a": 1.}',
    b'{"a": -}',
    b'{"a": 01}',
    b'{"execute": "query-status", "id": 0e1}',
    b'{"a": X}',
    b'{"a": NaN}',
    b'{"a": %d}',
    b'{"a": "x\ny"}',
    b'{"a": "x\x01y"}',
    b'X"a"\n',
    b'X\n"a"\n',
    b'X,"a"\n',
    b'X\xff\n',
    b'\xff{"execute": "query-status", "id": 29}',
    b'{"execute": "query-status", "id": 30}\x00\n',
    b'[' * 1025 + b'\n',
    # Deep, but within what Python's json module (this test's reader) can read.
    b'{"execute": "query-status", "id": ' + b'[' * 500 + b']' * 500 + b'}',
    b'{"a": 1}}',
    # qmp_capabilities turned oob off: exec-oob is an unexpected member, as above.
    b'{"exec-oob": "query-status", "execute": "query-status", "id": 31}',
]
#: On a second connection, negotiated with oob on.
CASES_OOB = [
    b'{"exec-oob": "query-status", "id": 1}',
    b'{"exec-oob": "nope", "id": 2}',
    b'{"exec-oob": "query-status"}',
    b'{"exec-oob": 7, "id": 3}',
    b'{"exec-oob": "query-status", "execute": "query-status", "id": 4}',
    b'{"execute": "query-status", "id": 5}',
]


def _converse(address: str, cases: list[bytes], oob: bool | None = None) -> list[Any]:
    """Send each case, then a sentinel; return (greeting, the replies to each case)."""
    out: list[Any] = []
    with RawClient(address) as c:
        out.append(c.greeting)
        if oob is not None:
            enable = b', "arguments": {"enable": ["oob"]}' if oob else b""
            c.send(b'{"execute": "qmp_capabilities"' + enable + b"}\n")
            assert c.read() == {"return": {}}
        for i, case in enumerate(cases):
            sentinel = f"sentinel-{i}"
            c.send(case + b'\n{"execute": "query-status", "id": "' + sentinel.encode()
                   + b'"}\n')
            replies = []
            while True:
                line = c.read_line()
                assert line is not None, f"connection closed after {case[:60]!r}"
                msg = json.loads(line)
                if msg.get("id") == sentinel:
                    break
                replies.append(msg)
            out.append(replies)
    return out


def _shape(msg: Any) -> Any:
    """What must be equal between QEMU and livemig: the message with key order made
    visible, and the version/package and the command list reduced to their form."""
    if isinstance(msg, dict):
        if "QMP" in msg or ("return" in msg and isinstance(msg["return"], dict)
                            and "package" in msg["return"]):
            return _version_shape(msg)
        if isinstance(msg.get("return"), list) and msg["return"] and "name" in msg["return"][0]:
            return {"return": "<commands>", **{k: v for k, v in msg.items() if k != "return"}}
        return [(k, _shape(v)) for k, v in msg.items()]
    return msg  # lists (deep ids among them) compare as they are


def _version_shape(msg: Any) -> Any:
    if isinstance(msg, dict):
        return [(k, _version_shape(v)) for k, v in msg.items()]
    if isinstance(msg, list):
        return [_version_shape(v) for v in msg]
    return type(msg).__name__


def _raw_qemu(version: str) -> Iterator[str]:
    """A QEMU (paused, so query-status says prelaunch) with a second QMP monitor for
    raw conversations (QemuPeer's own qemu.qmp client holds the first)."""
    private = tempfile.mkdtemp(prefix="lmqraw-")
    path = os.path.join(private, "raw.sock")
    try:
        with QemuPeer(version, extra_args=[
                "-chardev", f"socket,id=qmpraw,path={path},server=on,wait=off",
                "-mon", "chardev=qmpraw,mode=control"]):
            yield f"unix:{path}"
    finally:
        if os.path.exists(path):
            os.unlink(path)
        os.rmdir(private)


@pytest.fixture(scope="module")
def qemu10_raw() -> Iterator[str]:
    yield from _raw_qemu("10.0")


@pytest.fixture(scope="module")
def qemu72_raw() -> Iterator[str]:
    yield from _raw_qemu("7.2")


def _without_singlestep(replies: list[Any]) -> list[Any]:
    """7.2's query-status also has "singlestep" (the table's business, not the server's)."""
    for r in replies:
        if isinstance(r.get("return"), dict):
            r["return"].pop("singlestep", None)
    return replies


@pytest.mark.qemu
@pytest.mark.parametrize("version", ["10.0", "7.2"])
@pytest.mark.parametrize("phase", ["plain", "oob"])
def test_replies_match_qemu(request: pytest.FixtureRequest, sockdir: Path, phase: str,
                            version: str) -> None:
    qemu = request.getfixturevalue("qemu10_raw" if version == "10.0" else "qemu72_raw")
    if phase == "plain":
        cases, oob = CASES_BEFORE + CASES_NEGOTIATE + CASES_AFTER, None
    else:
        cases, oob = CASES_OOB, True
    theirs = _converse(qemu, cases, oob)
    with QmpServer(f"unix:{sockdir / 'lm.sock'}", TABLE) as srv:
        ours = _converse(srv.address, cases, oob)
    assert _shape(ours[0]) == _shape(theirs[0]), "greeting"
    assert ours[0]["QMP"]["capabilities"] == theirs[0]["QMP"]["capabilities"] == ["oob"]
    mismatches = [
        f"{case[:70]!r}:\n  QEMU {version}: {t}\n  livemig: {o}"
        for case, t, o in zip(cases, theirs[1:], ours[1:], strict=True)
        if _shape(_without_singlestep(t)) != _shape(o)
    ]
    assert not mismatches, f"replies differ from QEMU {version}'s:\n" + "\n".join(mismatches)


@pytest.mark.qemu
def test_query_commands_and_version_like_qemu10(qemu10_raw: str, sockdir: Path) -> None:
    with RawClient(qemu10_raw) as q, QmpServer(f"unix:{sockdir / 'lm.sock'}", TABLE,
                                               version=(10, 0, 2), package="pkg") as srv:
        q.negotiate()
        qemu_names = {c["name"] for c in q.cmd("query-commands")["return"]}
        with RawClient(srv.address) as c:
            assert c.greeting["QMP"]["version"] == {
                "qemu": {"micro": 2, "minor": 0, "major": 10}, "package": "pkg"}
            c.negotiate()
            ours = c.cmd("query-commands")["return"]
            assert all(list(entry) == ["name"] for entry in ours)
            names = {entry["name"] for entry in ours}
            assert names == {*TABLE, "qmp_capabilities", "query-commands", "query-version"}
            assert {"qmp_capabilities", "query-commands", "query-version"} <= qemu_names
            assert c.cmd("query-version") == {"return": c.greeting["QMP"]["version"]}


@pytest.mark.qemu
def test_event_shape_like_qemu10() -> None:
    with QemuPeer("10.0") as peer, tempfile.TemporaryDirectory(prefix="lmq-") as d:
        peer.cont()
        peer.stop()
        _wait_for(lambda: any(e["event"] == "STOP" for e in peer.events(clear=False)),
                  "QEMU's STOP event")
        qemu_stop = next(e for e in peer.events() if e["event"] == "STOP")
        with QmpServer(f"unix:{d}/s.sock", TABLE) as srv, RawClient(srv.address) as c:
            c.negotiate()
            srv.emit("STOP")
            srv.emit("MIGRATION", {"status": "active"})
            stop, mig = c.read(), c.read()
    assert set(stop) == set(qemu_stop)  # no "data" for an event without any
    assert list(stop) == ["timestamp", "event"]
    assert list(mig) == ["timestamp", "event", "data"]
    assert list(stop["timestamp"]) == ["seconds", "microseconds"]
    assert abs(stop["timestamp"]["seconds"] - time.time()) < 60
    assert 0 <= mig["timestamp"]["microseconds"] < 1_000_000


# --------------------------------------------------------------------------------------------
# qemu.qmp drives it as it drives QEMU
# --------------------------------------------------------------------------------------------


def test_qemu_qmp_client(server: QmpServer) -> None:
    addr = server.address.partition(":")[2]
    target: Any = addr if server.address.startswith("unix:") else (
        addr.rpartition(":")[0], int(addr.rpartition(":")[2]))

    async def talk() -> list[Any]:
        clients = [QMPClient(f"c{i}") for i in range(3)]
        try:
            for c in clients:
                await c.connect(target)
            assert await clients[0].execute("query-status") == {
                "status": "prelaunch", "running": False}
            with pytest.raises(ExecuteError) as err:
                await clients[1].execute("x-refuse")
            assert err.value.error_class == "DeviceNotFound"
            with pytest.raises(ExecuteError) as err:
                await clients[1].execute("x-fail")
            assert (err.value.error_class, str(err.value)) == (
                "GenericError", "the handler broke")
            with pytest.raises(ExecuteError) as err:
                await clients[2].execute("nope")
            assert str(err.value) == "The command nope has not been found"
            # The server keeps going after a handler failed.
            version: Any = await clients[1].execute("query-version")
            assert version["package"].startswith("livemig")
            server.emit("SHUTDOWN", {"guest": False, "reason": "host-qmp-quit"})
            return [await asyncio.wait_for(c.events.get(), 5.0) for c in clients]
        finally:
            for c in clients:
                await c.disconnect()

    events = asyncio.run(asyncio.wait_for(talk(), ASYNC_TIMEOUT))
    assert len(events) == 3
    for ev in events:
        assert ev["event"] == "SHUTDOWN"
        assert ev["data"] == {"guest": False, "reason": "host-qmp-quit"}
        assert set(ev["timestamp"]) == {"seconds", "microseconds"}


# --------------------------------------------------------------------------------------------
# Raw sockets
# --------------------------------------------------------------------------------------------


def test_split_and_batched_input(server: QmpServer) -> None:
    with RawClient(server.address) as c:
        c.negotiate()
        msg = b'{"execute": "query-status", "id": "split"}\r\n'
        for b in msg:  # one byte per send
            c.send(bytes([b]))
        assert c.read()["id"] == "split"
        batch = b"".join(b'{"execute": "query-status", "id": %d}' % i for i in range(200))
        c.send(batch)
        assert [c.read()["id"] for _ in range(200)] == list(range(200))


def test_over_long_message_closes_only_that_client(server: QmpServer) -> None:
    with RawClient(server.address) as bad, RawClient(server.address) as good:
        bad.negotiate()
        good.negotiate()
        chunk = b"x" * 65536
        bad.send(b'{"execute": "query-status", "id": "')
        for _ in range(MAX_QMP_MESSAGE // len(chunk) + 2):
            bad.send(chunk)
        bad.sock.shutdown(socket.SHUT_WR)
        reply = bad.read()
        assert reply["error"]["class"] == "GenericError"
        assert "too large" in reply["error"]["desc"]
        assert bad.read_line() is None, "the connection must be closed"
        assert good.cmd("query-status") == {"return": {"status": "prelaunch",
                                                       "running": False}}


def test_events_reach_every_negotiated_client(server: QmpServer) -> None:
    with RawClient(server.address) as a, RawClient(server.address) as b, \
            RawClient(server.address) as early:
        a.negotiate()
        b.negotiate()
        t0 = time.time()
        server.emit("RESUME")
        server.emit("MIGRATION_PASS", {"pass": 2})
        for c in (a, b):
            ev1, ev2 = c.read(), c.read()
            assert ev1["event"] == "RESUME" and "data" not in ev1
            assert ev2["event"] == "MIGRATION_PASS" and ev2["data"] == {"pass": 2}
            ts = ev2["timestamp"]["seconds"] + ev2["timestamp"]["microseconds"] / 1e6
            assert t0 - 1 <= ts <= time.time() + 1
        # No event before negotiation; its first reply is the one to qmp_capabilities.
        early.negotiate()


def test_client_that_never_reads_does_not_block_emit(server: QmpServer) -> None:
    with RawClient(server.address) as stuck, RawClient(server.address) as live:
        stuck.negotiate()
        live.negotiate()
        stuck.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        payload = {"blob": "y" * 8192}
        # Past the backlog limit even after the kernel's socket buffers took their share
        # (tcp autotuning grows them to a few MiB).
        n = (MAX_CLIENT_BACKLOG + (16 << 20)) // 8192
        got: list[int] = []

        def read_all() -> None:
            for _ in range(n):
                # one at a time: the emitting thread watches len(got) grow
                got.append(live.read()["data"]["n"])  # noqa: PERF401

        reader = threading.Thread(target=read_all)
        reader.start()
        slowest = 0.0
        batch = 32  # 256 KiB, then wait for the live client: it must not fall 1 MiB behind
        for start in range(0, n, batch):
            for i in range(start, min(start + batch, n)):
                t = time.monotonic()
                server.emit("BLOB", {**payload, "n": i})
                slowest = max(slowest, time.monotonic() - t)
            sent = min(start + batch, n)
            _wait_for(lambda sent=sent: len(got) >= sent or not reader.is_alive(),
                      "the live client to keep up")
        reader.join(READ_TIMEOUT)
        assert not reader.is_alive(), "the live client did not get every event"
        assert got == list(range(n))
        assert slowest < 1.0, f"emit blocked for {slowest:.2f}s"
        # The stuck client was dropped (reading what the kernel still holds for it
        # through its tiny window would take minutes over tcp).
        _wait_for(lambda: server.client_count == 1, "the stuck client to be dropped")
        assert live.cmd("query-status")["return"]["status"] == "prelaunch"


def test_concurrent_clients_and_events(server: QmpServer) -> None:
    """Eight clients pipelining commands while another thread emits: every reply in
    order, every event once, in order, to every client."""
    n_cmds, n_events = 200, 300
    results: dict[int, tuple[list[Any], list[int]]] = {}
    negotiated = threading.Barrier(9)

    def client(k: int) -> None:
        with RawClient(server.address) as c:
            c.negotiate()
            negotiated.wait(READ_TIMEOUT)
            c.send(b"".join(b'{"execute": "query-status", "id": %d}\n' % i
                            for i in range(n_cmds)))
            ids: list[Any] = []
            seen: list[int] = []
            while len(ids) < n_cmds or len(seen) < n_events:
                msg = c.read()
                if "event" in msg:
                    seen.append(msg["data"]["n"])
                else:
                    ids.append(msg["id"])
            results[k] = (ids, seen)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    negotiated.wait(READ_TIMEOUT)  # events before negotiation are not theirs
    for i in range(n_events):
        server.emit("TICK", {"n": i})
    for t in threads:
        t.join(READ_TIMEOUT * 3)
        assert not t.is_alive()
    assert len(results) == 8
    for ids, seen in results.values():
        assert ids == list(range(n_cmds))
        assert seen == list(range(n_events))


def test_clients_past_the_limit_are_told_why(
        address: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Idle clients holding every slot do not lock the next one out in silence: it
    reads an error naming the limit, and is served once a slot is free."""
    monkeypatch.setattr(qmp_server, "MAX_QMP_CLIENTS", 2)
    with QmpServer(address, TABLE) as srv, RawClient(srv.address) as a, \
            RawClient(srv.address) as b:
        _wait_for(lambda: srv.client_count == 2, "two clients")
        with RawClient(srv.address) as refused:
            err = refused.greeting["error"]
            assert err["class"] == "GenericError"
            assert "too many QMP clients: 2 are connected" in err["desc"], err
            assert refused.read_line() is None  # and closed
        assert srv.client_count == 2
        a.close()
        _wait_for(lambda: srv.client_count == 1, "a free slot")
        with RawClient(srv.address) as c:
            assert "QMP" in c.greeting
            c.negotiate()
        b.negotiate()


def test_handler_may_emit_and_failures_do_not_stop_the_server(address: str) -> None:
    srv: QmpServer

    def stop(args: dict[str, Any]) -> None:
        srv.emit("STOP")

    def bad_result(args: dict[str, Any]) -> Any:
        return {"x": object()}

    with QmpServer(address, {"stop": stop, "bad": bad_result}) as srv, \
            RawClient(srv.address) as c:
        c.negotiate()
        c.send(b'{"execute": "stop", "id": 1}\n')
        first, second = c.read(), c.read()
        assert first["event"] == "STOP" and second == {"return": {}, "id": 1}
        reply = c.cmd("bad")
        assert reply["error"]["class"] == "GenericError"
        assert "cannot be written as JSON" in reply["error"]["desc"]
        c.send(b'{"execute": "stop"}\n')
        assert c.read()["event"] == "STOP"
        assert c.read() == {"return": {}}


def test_deeply_nested_id_is_echoed(server: QmpServer) -> None:
    depth = 1023  # with the request's own braces: QEMU's limit, 1024
    with RawClient(server.address) as c:
        c.negotiate()
        c.send(b'{"execute": "query-status", "id": ' + b"[" * depth + b"]" * depth + b"}")
        line = c.read_line()
    assert line is not None
    (reply,) = QmpInputParser().feed(line + b"\n")  # Python's json cannot read it
    assert isinstance(reply, Message)
    nested = reply.value["id"]
    for _ in range(depth - 1):
        (nested,) = nested
    assert nested == []


def test_close_is_idempotent_and_refused_from_a_handler(address: str) -> None:
    errors: list[BaseException] = []
    srv: QmpServer

    def quit_(args: dict[str, Any]) -> None:
        try:
            srv.close()
        except StateError as e:
            errors.append(e)
            raise QmpError(str(e)) from None

    srv = QmpServer(address, {"quit": quit_})
    srv.start()
    with pytest.raises(StateError):
        srv.start()
    with RawClient(srv.address) as c:
        c.negotiate()
        assert c.cmd("quit")["error"]["class"] == "GenericError"
        srv.close()
        assert c.read_line() is None
    srv.close()
    assert len(errors) == 1


def test_reply_sent_before_close(address: str) -> None:
    """The engine's quit: the handler signals, another thread closes the server; the
    client still gets the reply and the event emitted before close()."""
    asked = threading.Event()
    release = threading.Event()

    def quit_(args: dict[str, Any]) -> None:
        asked.set()
        release.wait(READ_TIMEOUT)

    srv = QmpServer(address, {"quit": quit_})
    with srv, RawClient(srv.address) as c:
        c.negotiate()
        c.send(b'{"execute": "quit", "id": "q"}\n')
        assert asked.wait(READ_TIMEOUT)
        srv.emit("SHUTDOWN", {"guest": False, "reason": "host-qmp-quit"})
        closer = threading.Thread(target=srv.close)
        closer.start()
        time.sleep(0.05)
        release.set()
        closer.join(READ_TIMEOUT)
        assert not closer.is_alive()
        msgs = [c.read(), c.read()]
        assert c.read_line() is None
    assert {"return": {}, "id": "q"} in msgs
    assert any(m.get("event") == "SHUTDOWN" for m in msgs)


def _open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def test_start_close_cycles_leave_nothing_behind(address: str, sockdir: Path) -> None:
    before_threads = {t.ident for t in threading.enumerate()}
    before_fds = _open_fds()
    for i in range(50):
        srv = QmpServer(address, TABLE)
        srv.start()
        if i % 5 == 0:
            c = RawClient(srv.address)
            c.negotiate()
            srv.close()
            c.close()
        else:
            srv.close()
        srv.close()
    assert {t.ident for t in threading.enumerate()} == before_threads
    assert _open_fds() == before_fds
    assert list(sockdir.iterdir()) == []


def test_unix_socket_replaces_stale_and_spares_other_files(sockdir: Path) -> None:
    path = sockdir / "qmp.sock"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))
    stale.close()  # the file stays: a stale socket
    with QmpServer(f"unix:{path}", TABLE) as srv, RawClient(srv.address) as c:
        assert "QMP" in c.greeting
    assert not path.exists()
    path.write_text("not a socket")
    with pytest.raises(ConfigError, match="not a socket"):
        QmpServer(f"unix:{path}", TABLE)
    assert path.read_text() == "not a socket"


def test_tcp_port_zero_is_resolved() -> None:
    with QmpServer("tcp:127.0.0.1:0", TABLE) as srv:
        host, _, port = srv.address.removeprefix("tcp:").rpartition(":")
        assert host == "127.0.0.1" and int(port) > 0
        with RawClient(srv.address) as c:
            c.negotiate()


def test_bad_configuration() -> None:
    before = _open_fds()
    with pytest.raises(ConfigError):
        QmpServer("file:/tmp/x", TABLE)
    assert _open_fds() == before
    with pytest.raises(ConfigError, match="qmp_capabilities"):
        QmpServer("tcp:127.0.0.1:0", {"qmp_capabilities": _fail})


def test_check_arguments_texts() -> None:
    schema = {"uri": "string", "*n": "integer", "*flag": "boolean", "*v": "any"}
    check_arguments({"uri": "x", "n": 3, "v": None}, schema)
    cases: list[tuple[dict[str, Any], str]] = [
        ({}, "Parameter 'uri' is missing"),
        ({"uri": 1}, "Invalid parameter type for 'uri', expected: string"),
        ({"uri": "x", "n": True}, "Invalid parameter type for 'n', expected: integer"),
        ({"uri": "x", "flag": 1}, "Invalid parameter type for 'flag', expected: boolean"),
        ({"uri": "x", "other": 1}, "Parameter 'other' is unexpected"),
    ]
    for args, text in cases:
        with pytest.raises(QmpError) as err:
            check_arguments(args, schema)
        assert (err.value.desc, err.value.error_class) == (text, "GenericError")


# --------------------------------------------------------------------------------------------
# The input parser alone
# --------------------------------------------------------------------------------------------

PARSER_INPUT = (b'{"execute": "a", "arguments": {"s": "x\\"y\xc3\xa9", "n": [1, -2.5e3, true]}}'
                b"\r\n{'execute': 'b'}  X\n[1] 7 ")
PARSER_EXPECTED = [
    Message({"execute": "a", "arguments": {"s": 'x"yé', "n": [1, -2500.0, True]}}),
    Message({"execute": "b"}),
    ParseFailure("JSON parse error, stray 'X'"),
    Message([1]),
    Message(7),
]


@pytest.mark.parametrize("how", ["whole", "bytewise", "trailing"])
def test_parser_three_ways(how: str) -> None:
    p = QmpInputParser()
    if how == "whole":
        items = p.feed(PARSER_INPUT)
    elif how == "bytewise":
        items = [it for b in PARSER_INPUT for it in p.feed(bytes([b]))]
    else:
        items = p.feed(PARSER_INPUT + b'{"execute": "unfinished"')
        assert p.feed(b"") == []
    assert items == PARSER_EXPECTED


def test_lexer_fast_paths_agree_with_the_table() -> None:
    """Every byte a run expression swallows must be one the table keeps in that state."""
    from livemig.control import qmp_json as q

    for state, run in q._RUNS.items():
        for b in range(256):
            if run.fullmatch(bytes([b])):
                do, arg = q._TABLE[state][b]
                assert do is q._Do.SKIP or (do is q._Do.GOTO and arg == state), (state, b)


def test_parser_limit_poisons() -> None:
    p = QmpInputParser(max_message=64)
    items = p.feed(b'{"ok": 1} {"s": "' + b"z" * 100)
    assert items[0] == Message({"ok": 1})
    assert isinstance(items[1], InputTooLarge)
    with pytest.raises(RuntimeError):
        p.feed(b"{}")


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=40), max_size=8))
def test_parser_fuzz(chunks: list[bytes]) -> None:
    p = QmpInputParser(max_message=256)
    for chunk in chunks:
        try:
            items = p.feed(chunk)
        except RuntimeError:
            return  # poisoned after InputTooLarge: the documented outcome
        assert all(isinstance(it, Message | ParseFailure | InputTooLarge) for it in items)


@settings(max_examples=500, deadline=None)
@given(st.lists(st.sampled_from([
    b"{", b"}", b"[", b"]", b",", b":", b" ", b"\n", b'"', b"'", b"\\", b"0", b"1", b"9",
    b"-", b"+", b".", b"e", b"E", b"true", b"nul", b"X", b"\x00", b"\xff", b"\xc3\xa9",
    b"\\u00e9", b'"key"', b"12.5e-3"]), max_size=40))
def test_parser_whole_equals_bytewise(pieces: list[bytes]) -> None:
    """Whole input takes the per-token fast path; one byte at a time takes the table:
    both must read QEMU's way, identically."""
    data = b"".join(pieces) + b"\n"
    bytewise = QmpInputParser()
    assert QmpInputParser().feed(data) == [it for b in data for it in bytewise.feed(bytes([b]))]


@settings(max_examples=200, deadline=None)
@given(st.recursive(
    st.none() | st.booleans() | st.integers(-(1 << 63), (1 << 64) - 1)
    | st.text(alphabet=st.characters(exclude_categories=["Cs"]), max_size=10),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner,
                                                                max_size=4),
    max_leaves=20))
def test_parser_round_trip(value: Any) -> None:
    noncharacter = any(0xFDD0 <= ord(ch) <= 0xFDEF or (ord(ch) & 0xFFFE) == 0xFFFE
                       for ch in json.dumps(value, ensure_ascii=False))
    items = QmpInputParser().feed(json.dumps([value], ensure_ascii=False).encode() + b"\n")
    if noncharacter:
        assert isinstance(items[0], ParseFailure)
    else:
        assert items == [Message([value])]
