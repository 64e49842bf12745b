"""The channels a migration source opens: the main channel and its return path.

Only :class:`~livemig.migration.source.outgoing_stream.OutgoingStream` uses
these; commands never open a source channel themselves.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
import time
from collections.abc import Callable

from livemig.errors import ConfigError, StreamFormatError, TransportError
from livemig.io.tls import TlsSettings, connect_tls, refused
from livemig.io.uri import TcpUri, UnixUri, Uri
from livemig.migration.common.failure import FailureLatch
from livemig.wire.constants import ReturnPathMessage

#: Main-channel bytes gathered before one send.
MAIN_FLUSH_BYTES = 1 << 20
#: Seconds a tcp: destination gets to accept the main channel before the multifd
#: channels connect: QEMU 7.2 takes the first connection it accepts as the main one,
#: and over TCP a later connection can reach its accept queue first.
MAIN_FIRST_DELAY = 0.05
#: Seconds a source keeps trying to connect to a unix: path that does not exist yet
#: (a destination started at the same moment creates it once it listens). A tcp:
#: connection refused is final at once, as in QEMU.
CONNECT_RETRY_SECONDS = 10.0
#: Pause between two connection attempts.
CONNECT_RETRY_INTERVAL = 0.1
#: The longest return-path message we accept (QEMU's are at most a few bytes,
#: REQ_PAGES with a block name being the longest at ~270).
MAX_RETURN_PATH_MESSAGE = 512

Buffer = bytes | bytearray | memoryview


class MainWriter:
    """The main channel's send buffer.

    Several threads may write (a relay's incoming channels write pages while
    its loader writes sections): :attr:`lock` is re-entrant so that a caller
    can hold it across a decision and the writes it makes.
    """

    def __init__(self, write: Callable[[Buffer], object], name: str) -> None:
        self._write = write
        self.name = name
        self.lock = threading.RLock()
        self.buf = bytearray()
        self.sent = 0

    def put(self, data: Buffer) -> None:
        with self.lock:
            self.buf += data
            if len(self.buf) >= MAIN_FLUSH_BYTES:
                self._flush()

    def flush(self) -> None:
        with self.lock:
            self._flush()

    @property
    def written(self) -> int:
        """Bytes sent plus bytes buffered."""
        return self.sent + len(self.buf)

    def _flush(self) -> None:
        if self.buf:
            try:
                self._write(self.buf)
            except OSError as e:
                tls = refused(self.name, e)
                if tls is not None:
                    raise tls from e
                raise TransportError(f"{self.name}: send failed: {e.strerror or e} (did the "
                                     "destination close the connection?)") from e
            self.sent += len(self.buf)
            self.buf = bytearray()


class ReturnPath:
    """Reads the destination's messages (PONG, SWITCHOVER_ACK, SHUT) in a thread
    of the stream's group; :attr:`done` is set when it ends, with :attr:`shut`
    holding SHUT's status if one came."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.shut: int | None = None
        self.done = threading.Event()

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
                    return
                kind, n = struct.unpack(">HH", hdr)
                if n > MAX_RETURN_PATH_MESSAGE:
                    raise StreamFormatError(f"return path message {kind} of {n} bytes",
                                            where="return path")
                payload = self._read(n) if n else b""
                if payload is None:
                    return
                if kind == ReturnPathMessage.SHUT and n == 4:
                    self.shut = struct.unpack(">I", payload)[0]
                    return
                if kind in (ReturnPathMessage.PONG, ReturnPathMessage.SWITCHOVER_ACK):
                    continue
                raise StreamFormatError(f"unexpected return path message {kind} (length {n})",
                                        where="return path")
        finally:
            self.done.set()


def let_main_channel_lead(u: Uri) -> None:
    """Before connecting multifd channels after the main channel: a unix: listener's
    accept queue is in connect order, so the main channel is accepted first anyway;
    over tcp: wait MAIN_FIRST_DELAY."""
    if isinstance(u, TcpUri):
        time.sleep(MAIN_FIRST_DELAY)


def connect_channel(u: Uri, latch: FailureLatch, timeout: float = CONNECT_RETRY_SECONDS,
                    *, tls: TlsSettings | None = None, name: str = "main channel",
                    ) -> socket.socket:
    """Connect, retrying for ``timeout`` seconds while the destination may still appear
    (a unix: path that does not exist yet: the destination creates it once it listens);
    a failure of ``latch`` (a cancel) ends the retries at once. Any other error, such as
    a tcp: connection refused (nothing listens on that port), fails at once, as QEMU's
    ``migrate`` does. With ``tls``, the channel (``name`` in errors) makes its TLS
    handshake before it is returned."""
    if not isinstance(u, (TcpUri, UnixUri)):
        raise ConfigError(f"a migration channel needs a tcp: or unix: URI, not {u}")
    ctx, server_name = None, ""
    if tls is not None:
        ctx = tls.client_context()
        server_name = tls.server_name(u.host if isinstance(u, TcpUri) else None)
    deadline = time.monotonic() + timeout
    wake = threading.Event()
    latch.on_failure(wake.set)
    while True:
        s: socket.socket | None = None
        try:
            if isinstance(u, TcpUri):
                s = socket.create_connection((u.host, u.port), timeout=10)
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            else:
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                s.settimeout(10)
                s.connect(u.path)
            s.settimeout(None)
            with contextlib.suppress(OSError):  # a smaller buffer only costs speed
                s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
            if ctx is not None:  # (a failed handshake raises TransportError: no retry)
                return connect_tls(s, ctx, server_name, f"{name} to {u}")
            return s
        except OSError as e:
            if s is not None:
                s.close()  # the error's traceback would keep the descriptor open
            latch.raise_if_failed()
            if not isinstance(e, FileNotFoundError) or time.monotonic() > deadline:
                raise TransportError(f"cannot connect to the destination {u}: "
                                     f"{e.strerror or e}") from e
            wake.wait(CONNECT_RETRY_INTERVAL)
            latch.raise_if_failed()


__all__ = ["MAIN_FLUSH_BYTES", "MainWriter", "ReturnPath", "connect_channel",
           "let_main_channel_lead"]
