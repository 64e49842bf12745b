"""The vhost-user back-end library and the virtio-fs back-end, driven by a front-end written
here from vhost-user.rst (raw socket, struct, socket.send_fds), not by livemig's codec.

Also: livemig's own front-end (VhostUserFrontend) against the back-end, the stream chunk
framing, and the ``livemig vhost-user-backend`` program conventions (capabilities, SIGTERM).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import LIVEMIG, livemig_env, run_cli

from livemig.errors import LimitExceeded, PeerError
from livemig.vhost_user.backend import BackendServer
from livemig.vhost_user.frontend import ChunkReader, VhostUserFrontend, frame_chunks
from livemig.vhost_user.fs_backend import FsBackend, seeded_payload, serialize

pytestmark = pytest.mark.timeout(60)

# ---- constants from vhost-user.rst, typed in again on purpose ----------------------------------

GET_FEATURES, SET_FEATURES, SET_OWNER = 1, 2, 3
SET_LOG_BASE = 6
SET_VRING_NUM, SET_VRING_ADDR, SET_VRING_BASE, GET_VRING_BASE = 8, 9, 10, 11
SET_VRING_KICK, SET_VRING_CALL, SET_VRING_ERR = 12, 13, 14
GET_PROTOCOL_FEATURES, SET_PROTOCOL_FEATURES = 15, 16
SET_VRING_ENABLE = 18
GET_MAX_MEM_SLOTS, ADD_MEM_REG = 36, 37
SET_DEVICE_STATE_FD, CHECK_DEVICE_STATE = 42, 43
F_LOG_SHMFD, F_REPLY_ACK, F_MEM_SLOTS, F_DEVICE_STATE = 1 << 1, 1 << 3, 1 << 15, 1 << 19
QEMU10_PROTOCOL = F_LOG_SHMFD | F_REPLY_ACK | F_MEM_SLOTS | F_DEVICE_STATE  # 0x8800a
SAVE, LOAD, STOPPED = 0, 1, 0
REPLY = 0x5


class RawFrontend:
    """A minimal vhost-user front-end: one message at a time, replies read exactly."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(20)
        self.sock.connect(path)

    def close(self) -> None:
        self.sock.close()

    def send(self, request: int, payload: bytes = b"", *, flags: int = 1,
             fds: tuple[int, ...] = ()) -> None:
        data = struct.pack("<III", request, flags, len(payload)) + payload
        if fds:
            socket.send_fds(self.sock, [data], list(fds))
        else:
            self.sock.sendall(data)

    def recv(self) -> tuple[int, int, bytes, list[int]]:
        head, fds, _, _ = socket.recv_fds(self.sock, 12, 8)
        if not head:
            raise EOFError("back-end closed the connection")
        while len(head) < 12:
            head += self.sock.recv(12 - len(head))
        request, flags, size = struct.unpack("<III", head)
        body = b""
        while len(body) < size:
            body += self.sock.recv(size - len(body))
        return request, flags, body, fds

    def u64(self, request: int, payload: bytes = b"", *, flags: int = 1,
            fds: tuple[int, ...] = ()) -> tuple[int, list[int]]:
        self.send(request, payload, flags=flags, fds=fds)
        req, fl, body, got = self.recv()
        assert (req, fl, len(body)) == (request, REPLY, 8), (req, fl, body)
        return struct.unpack("<Q", body)[0], got

    def closed(self) -> bool:
        """True if the back-end closed the connection (EOF)."""
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:
            return True

    def negotiate(self, protocol: int = QEMU10_PROTOCOL) -> None:
        """QEMU 10's start-up sequence (spec/vhost-user-qemu10.md section 1)."""
        features, _ = self.u64(GET_FEATURES)
        assert features == 0x144000000
        offered, _ = self.u64(GET_PROTOCOL_FEATURES)
        assert offered == QEMU10_PROTOCOL
        self.send(SET_PROTOCOL_FEATURES, struct.pack("<Q", protocol))
        if protocol & F_MEM_SLOTS:
            assert self.u64(GET_MAX_MEM_SLOTS)[0] == 32
        self.send(SET_OWNER)
        assert self.u64(GET_FEATURES)[0] == 0x144000000
        for index in (0, 1):
            for req in (SET_VRING_CALL, SET_VRING_ERR):
                efd = os.eventfd(0)
                self.send(req, struct.pack("<Q", index), fds=(efd,))
                os.close(efd)

    def start_transfer(self, direction: int, phase: int = STOPPED) -> tuple[int, int | None]:
        """SET_DEVICE_STATE_FD; (reply u64, the pipe end to use or None if refused)."""
        r, w = os.pipe()
        mine, theirs = (r, w) if direction == SAVE else (w, r)
        value, fds = self.u64(SET_DEVICE_STATE_FD, struct.pack("<II", direction, phase),
                              fds=(theirs,))
        os.close(theirs)
        if value & 0xFF:
            assert fds == []
            os.close(mine)
            return value, None
        if not value & 0x100:
            assert len(fds) == 1, "reply without bit 8 must carry an fd"
            os.close(mine)
            return value, fds[0]
        assert fds == []
        return value, mine

    def save(self) -> tuple[bytes, int]:
        value, fd = self.start_transfer(SAVE)
        assert fd is not None, f"SAVE refused: {value:#x}"
        out = bytearray()
        while chunk := os.read(fd, 1 << 20):
            out += chunk
        os.close(fd)
        return bytes(out), self.u64(CHECK_DEVICE_STATE)[0]

    def load(self, data: bytes) -> int:
        value, fd = self.start_transfer(LOAD)
        assert fd is not None, f"LOAD refused: {value:#x}"
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
        except BrokenPipeError:
            pass
        os.close(fd)
        return self.u64(CHECK_DEVICE_STATE)[0]


class Served:
    """A BackendServer on a thread, shut down and joined at the end of the test."""

    def __init__(self, backend: FsBackend, path: str, reply_fd: bool = False) -> None:
        self.backend = backend
        self.path = path
        self.server = BackendServer(backend, socket_path=path, reply_fd=reply_fd)
        self.error: BaseException | None = None
        self.frontends: list[RawFrontend] = []
        self.thread = threading.Thread(target=self._run, name=f"backend {path}")
        self.thread.start()

    def _run(self) -> None:
        try:
            self.server.serve_forever()
        except BaseException as e:  # noqa: BLE001 - re-raised by stop()
            self.error = e

    def connect(self) -> RawFrontend:
        f = RawFrontend(self.path)
        self.frontends.append(f)
        return f

    def stop(self) -> None:
        for f in self.frontends:
            f.close()
        self.server.shutdown()
        self.thread.join(30)
        assert not self.thread.is_alive(), "back-end server thread did not stop"
        if self.error is not None:
            raise self.error


@pytest.fixture
def serve(workdir: Path) -> Iterator[object]:
    started: list[Served] = []

    def start(seed: int | None = None, *, reply_fd: bool = False, **kw: object) -> Served:
        s = Served(FsBackend(seed, **kw), str(workdir / f"vu{len(started)}.sock"), reply_fd)
        started.append(s)
        return s

    yield start
    for s in started:
        s.stop()


def _open_fds() -> dict[str, str]:
    """Open descriptors and what they point to (the directory listing's own fd, gone by
    the time it is read back, is left out)."""
    out = {}
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            out[fd] = os.readlink(f"/proc/self/fd/{fd}")
    return out


# ---- protocol -------------------------------------------------------------------------------


@pytest.mark.parametrize("reply_fd", [False, True], ids=["front-end pipe", "reply fd"])
def test_negotiate_save_load_check(serve, reply_fd: bool) -> None:
    src, dst = serve(11, reply_fd=reply_fd), serve(reply_fd=reply_fd)
    a, b = src.connect(), dst.connect()
    a.negotiate()
    b.negotiate()
    state, check = a.save()
    assert check == 0
    assert state == src.backend.state and len(state) > 3 * 65536
    assert b.load(state) == 0
    assert dst.backend.state == state
    again, check = b.save()
    assert (again, check) == (state, 0)
    assert dst.backend.info().loads == 1 and src.backend.info().saves == 1
    a.close()
    b.close()


def test_reply_fd_variant_answers_zero_with_an_fd(serve) -> None:
    s = serve(1, reply_fd=True)
    f = s.connect()
    f.negotiate()
    value, fd = f.start_transfer(SAVE)
    assert value == 0 and fd is not None
    data = b""
    while chunk := os.read(fd, 65536):
        data += chunk
    os.close(fd)
    assert data == s.backend.state
    assert f.u64(CHECK_DEVICE_STATE)[0] == 0


def test_front_end_pipe_answers_0x100(serve) -> None:
    s = serve(1)
    f = s.connect()
    f.negotiate()
    value, fd = f.start_transfer(SAVE)
    assert value == 0x100 and fd is not None
    while os.read(fd, 65536):
        pass
    os.close(fd)
    assert f.u64(CHECK_DEVICE_STATE)[0] == 0


@pytest.mark.parametrize("damage", ["garbage", "flipped byte", "truncated", "trailing",
                                    "empty"])
def test_bad_state_fails_check_and_keeps_old_state(serve, damage: str) -> None:
    s = serve(3)
    before = s.backend.state
    good = serialize(seeded_payload(99, 100_000))
    data = {"garbage": os.urandom(300_000),
            "flipped byte": good[:5000] + bytes([good[5000] ^ 1]) + good[5001:],
            "truncated": good[:-1],
            "trailing": good + b"\0",
            "empty": b""}[damage]
    f = s.connect()
    f.negotiate()
    assert f.load(data) != 0
    assert s.backend.state == before
    assert s.backend.info().failed_loads == 1
    # the connection and the device carry on: its old state saves, a good state loads
    assert f.save() == (before, 0)
    assert f.load(good) == 0
    assert s.backend.state == good


def test_big_state_is_streamed(serve) -> None:
    s, d = serve(5, state_size=3 << 20), serve()
    a, b = s.connect(), d.connect()
    a.negotiate()
    b.negotiate()
    state, check = a.save()
    assert check == 0 and len(state) > 3 << 20
    assert b.load(state) == 0 and d.backend.state == state


@pytest.mark.parametrize(("direction", "phase"), [(2, STOPPED), (SAVE, 1), (0xFFFFFFFF, 7)])
def test_unknown_direction_or_phase_refused(serve, direction: int, phase: int) -> None:
    s = serve(2)
    f = s.connect()
    f.negotiate()
    value, fd = f.start_transfer(direction, phase)
    assert value & 0xFF and value & 0x100 and fd is None
    assert f.save() == (s.backend.state, 0)  # still usable


def test_device_state_fd_without_fd_refused(serve) -> None:
    s = serve(2)
    f = s.connect()
    f.negotiate()
    value, fds = f.u64(SET_DEVICE_STATE_FD, struct.pack("<II", SAVE, STOPPED))
    assert value & 0xFF and fds == []
    assert f.save()[1] == 0


def test_device_state_without_feature_refused(serve) -> None:
    s = serve(2)
    f = s.connect()
    f.negotiate(QEMU10_PROTOCOL & ~F_DEVICE_STATE)
    r, w = os.pipe()
    value, fds = f.u64(SET_DEVICE_STATE_FD, struct.pack("<II", SAVE, STOPPED), fds=(w,))
    os.close(w)
    assert value & 0xFF and fds == []
    assert f.closed()
    assert os.read(r, 1) == b""  # the back-end kept no copy of the write end
    os.close(r)
    # the back-end keeps running: the next front-end is served
    g = s.connect()
    g.negotiate()
    assert g.save() == (s.backend.state, 0)


def test_out_of_order_refused(serve) -> None:
    s = serve(2)
    f = s.connect()
    efd = os.eventfd(0)
    f.send(SET_VRING_CALL, struct.pack("<Q", 0), fds=(efd,))  # before SET_OWNER
    os.close(efd)
    assert f.closed()
    f = s.connect()
    f.negotiate()
    value, _ = f.u64(CHECK_DEVICE_STATE)  # no transfer started
    assert value != 0
    assert f.closed()
    f = s.connect()
    f.negotiate()
    r, w = os.pipe()
    f.u64(SET_DEVICE_STATE_FD, struct.pack("<II", LOAD, STOPPED), fds=(r,))
    os.close(r)
    f.send(SET_FEATURES, struct.pack("<Q", 0x140000000))  # in the middle of a transfer
    os.close(w)
    assert f.closed()
    f = s.connect()
    f.negotiate()
    assert f.save() == (s.backend.state, 0)


def test_started_device_sequence_and_acks(serve) -> None:
    """The messages QEMU 10 sends when a driver starts the device and then migrates it
    (spec section 3), with the replies it waits for."""
    s = serve(4)
    f = s.connect()
    f.negotiate()
    f.send(SET_FEATURES, struct.pack("<Q", 0x140000000))
    mem = os.memfd_create("guest")
    os.ftruncate(mem, 1 << 20)
    assert f.u64(ADD_MEM_REG, struct.pack("<QQQQQ", 0, 0, 1 << 20, 0x7F0000000000, 0),
                 flags=0x9, fds=(mem,))[0] == 0
    os.close(mem)
    for i, base in ((0, 7), (1, 9)):
        f.send(SET_VRING_NUM, struct.pack("<II", i, 128))
        f.send(SET_VRING_BASE, struct.pack("<II", i, base))
        f.send(SET_VRING_ADDR, struct.pack("<IIQQQQ", i, 0, 1, 2, 3, 0x102000))
        efd = os.eventfd(0)
        f.send(SET_VRING_KICK, struct.pack("<Q", i), fds=(efd,))
        os.close(efd)
    for i in (0, 1):
        assert f.u64(SET_VRING_ENABLE, struct.pack("<II", i, 1), flags=0x9)[0] == 0
    log = os.memfd_create("log")
    os.ftruncate(log, 8192)
    f.send(SET_LOG_BASE, struct.pack("<QQ", 8192, 0), fds=(log,))
    os.close(log)
    req, flags, body, _ = f.recv()  # QEMU waits for this reply although NEED_REPLY is clear
    assert (req, flags, body) == (SET_LOG_BASE, REPLY, struct.pack("<Q", 0))
    assert f.u64(SET_FEATURES, struct.pack("<Q", 0x144000000), flags=0x9)[0] == 0
    for i in (0, 1):
        assert f.u64(SET_VRING_ENABLE, struct.pack("<II", i, 0), flags=0x9)[0] == 0
    for i, base in ((0, 7), (1, 9)):
        f.send(GET_VRING_BASE, struct.pack("<II", i, 0))
        req, flags, body, _ = f.recv()
        assert (req, flags, struct.unpack("<II", body)) == (GET_VRING_BASE, REPLY, (i, base))
    assert f.save() == (s.backend.state, 0)


def test_descriptors_are_closed_with_the_connection(serve) -> None:
    s = serve(4)
    before = _open_fds()
    f = s.connect()
    f.negotiate()
    mem = os.memfd_create("guest")
    f.u64(ADD_MEM_REG, struct.pack("<QQQQQ", 0, 0, 4096, 0x1000, 0), flags=0x9, fds=(mem,))
    os.close(mem)
    f.save()
    f.close()
    deadline = time.monotonic() + 10
    while _open_fds() != before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _open_fds() == before


def test_hostile_size_closes_connection_backend_survives(serve) -> None:
    s = serve(4)
    f = s.connect()
    f.sock.sendall(struct.pack("<III", GET_FEATURES, 1, 1 << 30))
    assert f.closed()
    g = s.connect()
    g.negotiate()
    assert g.save()[1] == 0


# ---- livemig's front-end against the back-end -----------------------------------------------


@pytest.mark.parametrize("reply_fd", [False, True], ids=["front-end pipe", "reply fd"])
def test_frontend_save_and_load(serve, reply_fd: bool) -> None:
    src, dst = serve(21, reply_fd=reply_fd), serve(reply_fd=reply_fd)
    with VhostUserFrontend(src.path) as a, VhostUserFrontend(dst.path) as b:
        assert a.supports_device_state and a.max_mem_slots == 32
        chunks = list(a.save_state())
        assert b"".join(chunks) == src.backend.state
        assert b.load_state(chunks) == 0
        assert dst.backend.state == src.backend.state
        assert b.load_state([b"not a state"]) != 0
        assert dst.backend.state == src.backend.state
        # through the stream framing, re-chunked
        framed = b"".join(frame_chunks(a.save_state()))
        reader = ChunkReader()
        got = [c for i in range(0, len(framed), 1000) for c in reader.feed(framed[i:i + 1000])]
        assert reader.done and b.load_state(got) == 0


def test_frontend_save_failure_raises(serve) -> None:
    s = serve(1)

    def broken(writer: object) -> None:
        raise OSError("device on fire")

    s.backend.save_state = broken  # type: ignore[method-assign]
    with VhostUserFrontend(s.path) as f, pytest.raises(PeerError, match="answered 1"):
        list(f.save_state())


def test_chunk_reader_limits() -> None:
    with pytest.raises(LimitExceeded):
        ChunkReader().feed(struct.pack(">I", (1 << 20) + 1))
    r = ChunkReader(limit=10)
    with pytest.raises(LimitExceeded):
        r.feed(struct.pack(">I", 11) + b"x" * 11)
    r = ChunkReader()
    assert r.feed(struct.pack(">I", 2) + b"ab" + struct.pack(">I", 0) + b"rest") == [b"ab"]
    assert r.done and r.rest == b"rest" and r.consumed == 10


# ---- the program ------------------------------------------------------------------------------


def test_print_capabilities() -> None:
    r = run_cli(["vhost-user-backend", "--print-capabilities"], timeout=30)
    assert r.rc == 0, r.stderr
    assert json.loads(r.stdout) == {"type": "fs"}


def test_program_serves_and_exits_0_on_sigterm(workdir: Path) -> None:
    sock, state = workdir / "p.sock", workdir / "p.json"
    p = subprocess.Popen([*LIVEMIG, "vhost-user-backend", "--socket-path", str(sock), "--seed",
                          "8", "--state-file", str(state)], env=livemig_env(),
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                         start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while not sock.exists():
            assert p.poll() is None, p.stderr.read() if p.stderr else ""
            assert time.monotonic() < deadline, "no socket within 30 s"
            time.sleep(0.02)
        info = json.loads(state.read_text())
        f = RawFrontend(str(sock))
        f.negotiate()
        data, check = f.save()
        assert check == 0
        import hashlib
        assert hashlib.sha256(data).hexdigest() == info["sha256"]
        # SIGTERM while a save is blocked on a pipe nobody reads: still a prompt exit 0
        _, fd = f.start_transfer(SAVE)
        assert fd is not None
        p.send_signal(signal.SIGTERM)
        t0 = time.monotonic()
        assert p.wait(30) == 0
        assert time.monotonic() - t0 < 10
        assert not sock.exists()
        os.close(fd)
        f.close()
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(10)
        if p.stderr:
            p.stderr.close()


# -- issue 12 item 6: a LOAD whose fd never reaches EOF does not wedge the back-end ---------


def _load_with_fd(f: RawFrontend, theirs: int) -> int:
    """SET_DEVICE_STATE_FD LOAD with ``theirs`` as the state fd (the back-end uses ours)."""
    value, fds = f.u64(SET_DEVICE_STATE_FD, struct.pack("<II", LOAD, STOPPED), fds=(theirs,))
    assert value == 0x100 and fds == [], value
    return f.u64(CHECK_DEVICE_STATE)[0]


def test_load_from_endless_fd_fails_at_once(serve) -> None:
    """/dev/zero as the state: the device refuses it, the transfer ends without reading
    on (it used to drain /dev/zero until the 300 s join timeout), CHECK answers failure
    and the connection goes on."""
    s = serve(4)
    before = s.backend.state
    f = s.connect()
    f.negotiate()
    zero = os.open("/dev/zero", os.O_RDONLY)
    try:
        assert _load_with_fd(f, zero) == 1  # within the front-end's 20 s socket timeout
    finally:
        os.close(zero)
    assert s.backend.state == before
    assert f.save() == (before, 0)


@pytest.mark.parametrize("what", ["refused", "good"])
def test_load_from_pipe_held_open(serve, what: str) -> None:
    """The front-end writes a state and keeps its end of the pipe open: a refused state
    fails at once; a good one loads once CHECK says nothing more comes."""
    s = serve(4)
    before = s.backend.state
    good = serialize(seeded_payload(7, 1000))
    f = s.connect()
    f.negotiate()
    r, w = os.pipe()
    try:
        os.write(w, os.urandom(3000) if what == "refused" else good)
        assert _load_with_fd(f, r) == (1 if what == "refused" else 0)
    finally:
        os.close(r)
        os.close(w)
    assert s.backend.state == (before if what == "refused" else good)
    assert f.save()[1] == 0  # still served
