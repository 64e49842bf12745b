"""The front-end side of vhost-user, for saving and loading a back-end's state.

A livemig machine that hosts a vhost-user device connects to its back-end with
:class:`VhostUserFrontend`, which negotiates as QEMU 10 does at device creation
(``vhost_user_backend_init``: features, protocol features, memory slots, owner), then
moves the back-end's state as QEMU's ``vhost_save_backend_state`` /
``vhost_load_backend_state`` do:

* :meth:`~VhostUserFrontend.save_state` yields the state in chunks (each one read of
  the pipe, at most :data:`CHUNK` bytes), then sends CHECK_DEVICE_STATE and raises
  :class:`~livemig.errors.PeerError` if the back-end reports failure;
* :meth:`~VhostUserFrontend.load_state` writes chunks into the pipe, closes it, and
  returns CHECK_DEVICE_STATE's answer (0 = the back-end accepted the state).

In QEMU's migration stream the state is the back-end field of the device's
subsection, framed as ``be32 length + bytes`` chunks ending with ``be32 0``; the
chunks carry no meaning and a writer may re-frame them (:func:`frame_chunks`,
:class:`ChunkReader`).
"""

from __future__ import annotations

import os
import select
import socket
import struct
import time
from collections.abc import Iterable, Iterator
from typing import BinaryIO, Self

from livemig.errors import (
    ConfigError,
    LimitExceeded,
    PeerError,
    StreamFormatError,
    TransportError,
    TruncatedStream,
    VhostUserError,
)
from livemig.limits import MAX_VHOST_USER_DEVICE_STATE
from livemig.vhost_user.channel import MessageChannel, close_fds
from livemig.wire.vhost_user import (
    DEVICE_STATE_ERROR_MASK,
    DEVICE_STATE_NOFD_MASK,
    U64,
    DeviceStateDirection,
    DeviceStatePhase,
    DeviceStateTransfer,
    FrontendSession,
    Message,
    ProtocolFeature,
    Request,
    VirtioFeature,
)

R = Request

#: One read of the state pipe, as QEMU's ``chunk_size`` in vhost_save_backend_state.
CHUNK = 1 << 20

#: Seconds to wait for the back-end: one reply, or progress on the state pipe. A back-end
#: that stalls longer has failed (QEMU would wait forever; livemig does not).
IO_TIMEOUT = 60.0

#: Seconds to wait for the back-end's socket to accept a connection.
CONNECT_TIMEOUT = 10.0

#: The protocol features this front-end can use; the rest of an offer is not enabled.
SUPPORTED_PROTOCOL_FEATURES = (ProtocolFeature.LOG_SHMFD.mask | ProtocolFeature.REPLY_ACK.mask
                               | ProtocolFeature.CONFIGURE_MEM_SLOTS.mask
                               | ProtocolFeature.DEVICE_STATE.mask)


class VhostUserFrontend:
    """One connection to a vhost-user back-end, negotiated and ready for state transfer.

    Use as a context manager or call :meth:`close`. Not thread-safe: one caller at a time.
    """

    def __init__(self, socket_path: str | None = None, *, sock: socket.socket | None = None,
                 timeout: float = IO_TIMEOUT, connect_timeout: float = CONNECT_TIMEOUT) -> None:
        if (socket_path is None) == (sock is None):
            raise ConfigError("give exactly one of socket_path and sock")
        self.timeout = timeout
        where = f"vhost-user back-end {socket_path or 'socket'}"
        if sock is None:
            assert socket_path is not None
            sock = _connect(socket_path, connect_timeout)
        sock.settimeout(timeout)
        self.channel = MessageChannel(sock, replies=True, where=where)
        self.session = FrontendSession(where=where)
        self.where = where
        #: GET_MAX_MEM_SLOTS answer (None if not offered).
        self.max_mem_slots: int | None = None
        try:
            self._negotiate()
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.session.close()
        self.channel.close()

    # ---- messages -----------------------------------------------------------------------

    def _call(self, msg: Message) -> Message | None:
        """Send ``msg``; return its reply if one is due."""
        data = self.session.send(msg)
        self.channel.send(msg, data)
        if self.session.awaiting is None:
            return None
        offset = self.channel.decoder.offset
        try:
            rep = self.channel.receive()
        except TimeoutError as e:
            raise TransportError(f"{self.where}: no reply to {msg.describe()} within "
                                 f"{self.timeout:.0f} s") from e
        if rep is None:
            raise TruncatedStream(f"back-end closed the connection instead of answering "
                                  f"{msg.describe()}", offset=offset, where=self.where)
        return self.session.receive_reply(rep, offset)

    def _u64(self, msg: Message) -> int:
        rep = self._call(msg)
        if rep is None or not isinstance(rep.payload, U64):
            raise VhostUserError(f"{msg.describe()}: reply without a u64", where=self.where)
        return rep.payload.value

    def _negotiate(self) -> None:
        features = self._u64(Message(R.GET_FEATURES))
        if not features & VirtioFeature.VHOST_USER_F_PROTOCOL_FEATURES.mask:
            raise ConfigError(f"{self.where}: offers no protocol features (features "
                              f"{features:#x}), so no state transfer")
        offered = self._u64(Message(R.GET_PROTOCOL_FEATURES))
        self._call(Message(R.SET_PROTOCOL_FEATURES, payload=U64(
            offered & SUPPORTED_PROTOCOL_FEATURES)))
        if self.session.has(ProtocolFeature.CONFIGURE_MEM_SLOTS):
            self.max_mem_slots = self._u64(Message(R.GET_MAX_MEM_SLOTS))
        self._call(Message(R.SET_OWNER))
        self.features = self._u64(Message(R.GET_FEATURES))

    @property
    def supports_device_state(self) -> bool:
        return self.session.has(ProtocolFeature.DEVICE_STATE)

    def _require_device_state(self) -> None:
        if not self.supports_device_state:
            raise ConfigError(f"{self.where}: does not offer VHOST_USER_PROTOCOL_F_DEVICE_STATE "
                              "(bit 19): its state cannot migrate")

    def _start_transfer(self, direction: DeviceStateDirection) -> int:
        """SET_DEVICE_STATE_FD; returns the pipe end to use (ours, or the back-end's)."""
        r, w = os.pipe2(os.O_CLOEXEC)
        mine, theirs = (r, w) if direction is DeviceStateDirection.SAVE else (w, r)
        try:
            rep = self._call(Message(R.SET_DEVICE_STATE_FD, payload=DeviceStateTransfer(
                direction, DeviceStatePhase.STOPPED), fds=(theirs,)))
        except BaseException:
            close_fds([mine])
            raise
        finally:
            close_fds([theirs])
        assert rep is not None and isinstance(rep.payload, U64)
        code = rep.payload.value
        if code & DEVICE_STATE_ERROR_MASK:
            close_fds([mine])
            close_fds(list(rep.fds))
            raise PeerError(f"{self.where}: did not accept the state transfer "
                            f"({direction.name}): error {code & DEVICE_STATE_ERROR_MASK}")
        if not code & DEVICE_STATE_NOFD_MASK:
            close_fds([mine])  # the back-end's own pipe replaces ours
            mine = rep.fds[0]
        os.set_blocking(mine, False)
        return mine

    def _check(self) -> int:
        return self._u64(Message(R.CHECK_DEVICE_STATE))

    # ---- state transfer -----------------------------------------------------------------

    def save_state(self) -> Iterator[bytes]:
        """The back-end's state as chunks (the device must be stopped). Raises PeerError
        if CHECK_DEVICE_STATE reports failure after the last chunk. Abandoning the
        iterator early leaves the connection unusable (no CHECK was sent): close it."""
        self._require_device_state()
        fd = self._start_transfer(DeviceStateDirection.SAVE)
        total = 0
        try:
            while True:
                _wait(fd, select.POLLIN, self.timeout, self.where, "state")
                chunk = os.read(fd, CHUNK)
                if not chunk:
                    break
                total += len(chunk)
                if total > MAX_VHOST_USER_DEVICE_STATE:
                    raise LimitExceeded(f"back-end state beyond {MAX_VHOST_USER_DEVICE_STATE}"
                                        " bytes", where=self.where, offset=total)
                yield chunk
        finally:
            close_fds([fd])
        result = self._check()
        if result:
            raise PeerError(f"{self.where}: CHECK_DEVICE_STATE after save answered {result} "
                            f"({total} bytes read)")

    def save_state_into(self, writer: BinaryIO) -> int:
        """Write the state to ``writer``; the number of bytes."""
        n = 0
        for chunk in self.save_state():
            writer.write(chunk)
            n += len(chunk)
        return n

    def load_state(self, chunks: Iterable[bytes | memoryview]) -> int:
        """Write the state into the back-end; CHECK_DEVICE_STATE's answer (0 = accepted).

        A back-end that stops reading (it failed early) is not waited for beyond the
        point where it closed its end: the rest is dropped and CHECK reports the failure.
        """
        self._require_device_state()
        fd = self._start_transfer(DeviceStateDirection.LOAD)
        try:
            _write_chunks(fd, chunks, self.timeout, self.where)
        finally:
            close_fds([fd])
        return self._check()


def _write_chunks(fd: int, chunks: Iterable[bytes | memoryview], timeout: float,
                  where: str) -> None:
    """Write every chunk into the non-blocking pipe ``fd``; stop quietly if the reader
    closed its end (its failure is what CHECK_DEVICE_STATE reports)."""
    for chunk in chunks:
        view = memoryview(chunk)
        while view:
            _wait(fd, select.POLLOUT, timeout, where, "state")
            try:
                n = os.write(fd, view)
            except BlockingIOError:
                continue
            except BrokenPipeError:
                return
            view = view[n:]


def _connect(path: str, timeout: float) -> socket.socket:
    deadline = time.monotonic() + timeout
    while True:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            s.connect(path)
            return s
        except (FileNotFoundError, ConnectionRefusedError) as e:
            s.close()
            if time.monotonic() > deadline:
                raise TransportError(f"vhost-user back-end {path}: cannot connect within "
                                     f"{timeout:.0f} s: {e}") from e
            time.sleep(0.02)
        except OSError as e:
            s.close()
            raise TransportError(f"vhost-user back-end {path}: cannot connect: {e}") from e


def _wait(fd: int, event: int, timeout: float, where: str, what: str) -> None:
    p = select.poll()
    p.register(fd, event)
    if not p.poll(timeout * 1000):
        raise TransportError(f"{where}: no progress on the {what} pipe within {timeout:.0f} s")


# ---- framing in QEMU's migration stream -------------------------------------------------------

_BE32 = struct.Struct(">I")

#: The largest chunk livemig writes into a stream (QEMU's own reads are at most 1 MiB) and
#: accepts from one: QEMU bounds nothing on load, livemig does.
MAX_STREAM_CHUNK = 1 << 20


def frame_chunks(chunks: Iterable[bytes]) -> Iterator[bytes]:
    """``be32 length + bytes`` per chunk (empty chunks skipped, large ones split), then
    ``be32 0``: the back-end field of ``vhost-user-fs-backend`` in QEMU's stream."""
    for chunk in chunks:
        view = memoryview(chunk)
        for i in range(0, len(view), MAX_STREAM_CHUNK):
            part = view[i:i + MAX_STREAM_CHUNK]
            yield _BE32.pack(len(part)) + bytes(part)
    yield _BE32.pack(0)


class ChunkReader:
    """Parses the framed back-end field from a buffer, sans-I/O: :meth:`feed` bytes, take
    :meth:`chunks`; :attr:`done` once the zero-length chunk was seen (:attr:`consumed`
    says where the field ended)."""

    def __init__(self, limit: int = MAX_VHOST_USER_DEVICE_STATE) -> None:
        self.limit = limit
        self._buf = bytearray()
        self.total = 0
        self.consumed = 0
        self.done = False

    def feed(self, data: bytes) -> list[bytes]:
        if self.done:
            raise StreamFormatError("back-end state after its end marker")
        self._buf += data
        out: list[bytes] = []
        while len(self._buf) >= 4:
            (n,) = _BE32.unpack_from(self._buf)
            if n == 0:
                del self._buf[:4]
                self.consumed += 4
                self.done = True
                break
            if n > MAX_STREAM_CHUNK:
                raise LimitExceeded(f"back-end state chunk of {n} bytes exceeds the limit "
                                    f"{MAX_STREAM_CHUNK}", offset=self.consumed)
            if self.total + n > self.limit:
                raise LimitExceeded(f"back-end state beyond {self.limit} bytes",
                                    offset=self.consumed)
            if len(self._buf) < 4 + n:
                break
            out.append(bytes(self._buf[4:4 + n]))
            del self._buf[:4 + n]
            self.consumed += 4 + n
            self.total += n
        return out

    @property
    def rest(self) -> bytes:
        """Bytes fed after the end marker (they belong to what follows in the stream)."""
        return bytes(self._buf) if self.done else b""

