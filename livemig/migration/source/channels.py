"""The channels a migration source opens: the main channel and its return path.

Shared by ``livemig send`` (snapshot -> QEMU) and the engine's outgoing
migration (livemig machine -> livemig or QEMU-compatible destination).
"""

from __future__ import annotations

import socket
import struct
import threading
import time
from collections.abc import Callable

from livemig.errors import MigrationError, StreamFormatError, TransportError
from livemig.io.uri import TcpUri, UnixUri, Uri
from livemig.migration.common.failure import FailureLatch
from livemig.wire.constants import ReturnPathMessage

#: Main-channel bytes gathered before one send.
MAIN_FLUSH_BYTES = 1 << 20
#: Seconds a tcp: destination gets to accept the main channel before the multifd
#: channels connect: QEMU 7.2 takes the first connection it accepts as the main one,
#: and over TCP a later connection can reach its accept queue first.
MAIN_FIRST_DELAY = 0.05


class MainWriter:
    def __init__(self, write: Callable[[bytes | bytearray], object], name: str) -> None:
        self._write = write
        self.name = name
        self.buf = bytearray()
        self.sent = 0

    def put(self, data: bytes | bytearray | memoryview) -> None:
        self.buf += data
        if len(self.buf) >= MAIN_FLUSH_BYTES:
            self.flush()

    def flush(self) -> None:
        if self.buf:
            try:
                self._write(self.buf)
            except OSError as e:
                raise TransportError(f"{self.name}: send failed: {e.strerror or e} (did the "
                                     "destination close the connection?)") from e
            self.sent += len(self.buf)
            self.buf = bytearray()


class ReturnPath(threading.Thread):
    """Reads the destination's messages: PONG, SHUT, SWITCHOVER_ACK."""

    def __init__(self, sock: socket.socket, latch: FailureLatch) -> None:
        super().__init__(name="return-path")
        self.sock = sock
        self.latch = latch
        self.shut: int | None = None
        self.done = threading.Event()
        self.closed = False

    def _read(self, n: int) -> bytes | None:
        out = bytearray()
        while len(out) < n:
            try:
                chunk = self.sock.recv(n - len(out))
            except OSError:
                return None
            if not chunk:
                return None
            out += chunk
        return bytes(out)

    def run(self) -> None:
        try:
            while True:
                hdr = self._read(4)
                if hdr is None:
                    self.closed = True
                    return
                kind, n = struct.unpack(">HH", hdr)
                if n > 512:
                    raise StreamFormatError(f"return path message {kind} of {n} bytes")
                payload = self._read(n) if n else b""
                if payload is None:
                    self.closed = True
                    return
                if kind == ReturnPathMessage.SHUT and n == 4:
                    self.shut = struct.unpack(">I", payload)[0]
                    return
                if kind in (ReturnPathMessage.PONG, ReturnPathMessage.SWITCHOVER_ACK):
                    continue
                raise StreamFormatError(f"unexpected return path message {kind} (length {n})")
        except MigrationError as e:
            self.latch.fail(e)
        finally:
            self.done.set()


def let_main_channel_lead(u: Uri) -> None:
    """Before connecting multifd channels after the main channel: a unix: listener's
    accept queue is in connect order, so the main channel is accepted first anyway;
    over tcp: wait MAIN_FIRST_DELAY."""
    if isinstance(u, TcpUri):
        time.sleep(MAIN_FIRST_DELAY)


def connect_channel(u: Uri, timeout: float = 10.0,
                    latch: FailureLatch | None = None) -> socket.socket:
    """Connect, retrying for ``timeout`` seconds while the destination does not listen
    yet; a failure of ``latch`` (a cancel) ends the retries at once."""
    deadline = time.monotonic() + timeout
    while True:
        s: socket.socket | None = None
        try:
            if isinstance(u, TcpUri):
                s = socket.create_connection((u.host, u.port), timeout=10)
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            else:
                assert isinstance(u, UnixUri)
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                s.settimeout(10)
                s.connect(u.path)
            s.settimeout(None)
            try:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
            except OSError:
                pass
            return s
        except OSError as e:
            if s is not None:
                s.close()  # the error's traceback would keep the descriptor open
            if latch is not None:
                latch.raise_if_failed()
            if time.monotonic() > deadline:
                raise TransportError(f"cannot connect to the destination {u}: "
                                     f"{e.strerror or e}") from e
            time.sleep(0.1)


