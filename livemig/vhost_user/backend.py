"""A vhost-user back-end library: subclass :class:`VhostUserBackend`, serve a socket.

The library owns the Unix socket, the descriptors the front-end passes (memory
regions, ring eventfds, the dirty log, the state pipe), the negotiation, and the
back-end state transfer. A device supplies its features, :meth:`~VhostUserBackend.save_state`
and :meth:`~VhostUserBackend.load_state`, and optionally hooks for rings and config.

State transfer (vhost-user.rst "Migrating back-end state"): ``SET_DEVICE_STATE_FD``
brings one end of a pipe. The back-end answers first (``0x100``: "I use your pipe",
or ``0`` plus its own pipe end with ``reply_fd=True``), then a worker thread runs the
device's save (write the state, then close: EOF ends it) or load (read to EOF). The
thread must run beside the message loop: QEMU reads (SAVE) or writes (LOAD) the pipe
only after the reply, and writes synchronously, so a back-end that moved the data
before replying, or only when CHECK_DEVICE_STATE comes, would deadlock on any state
bigger than the pipe buffer. ``CHECK_DEVICE_STATE`` joins the thread and answers 0,
or 1 if the save or load failed (a load that fails validation leaves the device with
its previous state: that is the device's contract, see :meth:`load_state`).

The worker belongs to its connection, which always joins it. Its end of the pipe is
non-blocking and every wait on it also watches a cancel eventfd, so a transfer whose
front-end stopped reading or writing can be ended: at once when the server shuts
down, after :data:`TRANSFER_JOIN_TIMEOUT` otherwise (the device then sees an
``OSError`` from the pipe, and the transfer counts as failed). A load never waits
for an EOF that may not come: a refused state closes the pipe at once, trailing
bytes are detected with one bounded read, and after CHECK_DEVICE_STATE an empty
pipe counts as the end even if the front-end holds it open (an endless fd such as
``/dev/zero`` is refused by the device's own size limit).

One connection is served at a time (a front-end owns the back-end); when it ends,
every descriptor it brought is closed and the server accepts the next one.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import select
import socket
import stat
import threading
from dataclasses import dataclass, field
from typing import Any, BinaryIO

from livemig.errors import MigrationError, StreamFormatError, VhostUserError
from livemig.io.paths import check_socket_path
from livemig.vhost_user.channel import MessageChannel, close_fds
from livemig.wire.vhost_user import (
    DEVICE_STATE_NOFD_MASK,
    U64,
    VHOST_USER_VRING_IDX_MASK,
    VHOST_USER_VRING_NOFD_MASK,
    DeviceConfig,
    DeviceStateDirection,
    DeviceStateTransfer,
    LogDescription,
    MemoryRegion,
    MemoryTable,
    Message,
    ProtocolFeature,
    Request,
    SingleMemoryRegion,
    VirtioFeature,
    VringAddress,
    VringState,
    reply,
)
from livemig.wire.vhost_user import BackendSession as _Session

log = logging.getLogger("livemig.vhost_user")

R = Request

#: Buffer of the file objects over the state pipe: one 1 MiB read is QEMU's own chunk
#: (``vhost_save_backend_state``), so the pipe is drained in large reads.
TRANSFER_BUFFER = 1 << 20

#: How long CHECK_DEVICE_STATE (or the end of a connection) waits for the save/load
#: thread before cancelling it. QEMU sends CHECK only after EOF on the pipe, so the
#: thread is nearly done; a device that takes longer than this has failed. (A
#: connection closed by a shutdown, SIGTERM, cancels at once: the program conventions
#: ask for a prompt exit, and the front-end is being abandoned anyway.)
TRANSFER_JOIN_TIMEOUT = 300.0

#: Bytes read after a loaded state to tell whether more follow: any is an error, so one
#: read decides; the rest is never read (our end is closed, the front-end's writes fail).
#: A front-end feeding an endless fd (/dev/zero) must not keep a thread reading it.
MAX_TRAILING_READ = TRANSFER_BUFFER

#: Rings a back-end accepts: the ring index is 8 bits in SET_VRING_KICK/CALL/ERR.
MAX_VRINGS = VHOST_USER_VRING_IDX_MASK + 1

#: The listening socket's backlog: one front-end at a time, one waiting.
LISTEN_BACKLOG = 1

#: CHECK_DEVICE_STATE answer for a failed save or load, and the SET_DEVICE_STATE_FD /
#: REPLY_ACK error code (any non-zero value means failure to QEMU).
FAILED = 1


@dataclass
class Vring:
    """What the front-end told the back-end about one ring (fds owned by the connection)."""

    num: int = 0
    base: int = 0
    address: VringAddress | None = None
    enabled: bool = False
    started: bool = False
    kick: int | None = None
    call: int | None = None
    err: int | None = None


@dataclass
class ConnectionState:
    """Per-connection device view: memory regions, rings, log, status (fds owned here)."""

    regions: list[tuple[MemoryRegion, int]] = field(default_factory=list)
    vrings: dict[int, Vring] = field(default_factory=dict)
    log_fd: int | None = None
    log: LogDescription | None = None
    backend_req_fd: int | None = None
    status: int = 0

    def vring(self, index: int) -> Vring:
        if not 0 <= index < MAX_VRINGS:
            raise VhostUserError(f"ring index {index} out of range (at most {MAX_VRINGS})")
        return self.vrings.setdefault(index, Vring())

    def close(self) -> None:
        fds = [fd for _, fd in self.regions]
        for v in self.vrings.values():
            fds += [fd for fd in (v.kick, v.call, v.err) if fd is not None]
        fds += [fd for fd in (self.log_fd, self.backend_req_fd) if fd is not None]
        close_fds(fds)
        self.regions.clear()
        self.vrings.clear()
        self.log_fd = self.backend_req_fd = None


class VhostUserBackend:
    """Base class of a vhost-user device. Override the class attributes and the two state
    methods; the ring hooks are optional (the default device processes no requests).

    ``save_state`` and ``load_state`` run in a worker thread while the message loop waits
    for CHECK_DEVICE_STATE; the front-end sends nothing else in between.
    """

    #: The ``type`` of vhost-user.json's capabilities ("fs", "net", "blk", ...).
    backend_type: str = ""
    #: virtio device id (virtio spec 5: 26 = file system device).
    device_id: int = 0
    #: Virtio features offered by GET_FEATURES. QEMU 10 needs VERSION_1 (modern-only
    #: devices), the protocol-features bit (else no memory slots) and LOG_ALL (else no
    #: migration): spec/vhost-user-qemu10.md section 5.
    features: int = (VirtioFeature.VIRTIO_F_VERSION_1.mask
                     | VirtioFeature.VHOST_USER_F_PROTOCOL_FEATURES.mask
                     | VirtioFeature.VHOST_F_LOG_ALL.mask)
    #: Protocol features offered: the dirty log as shared memory (QEMU refuses to migrate
    #: without it), acks, memory slots, and the state transfer.
    protocol_features: int = (ProtocolFeature.LOG_SHMFD.mask | ProtocolFeature.REPLY_ACK.mask
                              | ProtocolFeature.CONFIGURE_MEM_SLOTS.mask
                              | ProtocolFeature.DEVICE_STATE.mask)
    #: GET_QUEUE_NUM (only with protocol feature MQ).
    num_queues: int = 2
    #: GET_MAX_MEM_SLOTS: how many ADD_MEM_REG regions the back-end keeps.
    max_mem_slots: int = 32

    # ---- state transfer (override) ------------------------------------------------------

    def save_state(self, writer: BinaryIO) -> None:
        """Write the device state to ``writer`` (any size, streamed); raise on failure.

        The library closes the pipe afterwards, which is the end of the state for the
        front-end. An exception makes CHECK_DEVICE_STATE report failure.
        """
        raise NotImplementedError

    def load_state(self, reader: BinaryIO) -> None:
        """Read the state from ``reader`` until EOF, validate it, and only then apply it.

        Raise to reject it: CHECK_DEVICE_STATE then reports failure and the device must
        still hold its previous state; the library closes its end of the pipe at once
        and reads nothing more. Bytes left unread after a normal return count as a
        failure (they were part of the state); the library looks for them with one read,
        it does not read them all. The reader ends (EOF) when the front-end closes its
        end, or, once CHECK_DEVICE_STATE came, when the pipe is empty.
        """
        raise NotImplementedError

    # ---- optional hooks -----------------------------------------------------------------

    def capabilities(self) -> dict[str, Any]:
        """The JSON object ``--print-capabilities`` prints (vhost-user.json)."""
        return {"type": self.backend_type}

    def get_config(self, offset: int, size: int) -> bytes | None:
        """GET_CONFIG (only with protocol feature CONFIG); None answers an error."""
        return None

    def set_config(self, config: DeviceConfig) -> bool:
        """SET_CONFIG; False answers an error (with REPLY_ACK)."""
        return False

    def vring_started(self, index: int, vring: Vring) -> None:
        """Called when a ring gets its kick fd: the device may start processing it."""

    def vring_stopped(self, index: int, vring: Vring) -> int:
        """Called on GET_VRING_BASE: stop the ring, return its next available index."""
        return vring.base


class TransferCancelled(OSError):
    """The transfer was cancelled while it waited on the state pipe."""


class _CancellablePipe(io.RawIOBase):
    """The back-end's end of the state pipe for a worker thread: non-blocking, and every
    wait for it to become readable or writable also waits for ``cancel_fd``, after
    which each read or write raises :class:`TransferCancelled`, and (reading) for
    ``done_fd``: once the front-end said it has written everything (CHECK_DEVICE_STATE),
    an empty pipe reads as EOF even if the front-end still holds its end open."""

    def __init__(self, fd: int, cancel_fd: int, *, writing: bool,
                 done_fd: int | None = None) -> None:
        super().__init__()
        os.set_blocking(fd, False)
        self._fd = fd
        self._writing = writing
        self._poller = select.poll()
        self._poller.register(fd, select.POLLOUT if writing else select.POLLIN)
        self._poller.register(cancel_fd, select.POLLIN)
        self._cancel_fd = cancel_fd
        self._done_fd = done_fd
        self._writer_done = False
        if done_fd is not None:
            self._poller.register(done_fd, select.POLLIN)

    def readable(self) -> bool:
        return not self._writing

    def writable(self) -> bool:
        return self._writing

    def fileno(self) -> int:
        return self._fd

    def _wait(self) -> None:
        for fd, _ in self._poller.poll():
            if fd == self._cancel_fd:
                raise TransferCancelled("device state transfer cancelled")
            if fd == self._done_fd:
                self._writer_done = True
                assert self._done_fd is not None
                self._poller.unregister(self._done_fd)

    def readinto(self, b: Any) -> int:
        while True:
            try:
                return os.readv(self._fd, [b])
            except BlockingIOError:
                if self._writer_done:
                    return 0  # nothing more will come: the front-end said so
                self._wait()

    def write(self, b: Any) -> int:
        while True:
            try:
                return os.write(self._fd, b)
            except BlockingIOError:
                self._wait()

    def close(self) -> None:
        if not self.closed:
            os.close(self._fd)
        super().close()


class _Transfer:
    """One save or load running in a worker thread owned by the connection."""

    def __init__(self, backend: VhostUserBackend, direction: DeviceStateDirection,
                 fd: int, where: str) -> None:
        self.backend = backend
        self.direction = direction
        self.fd = fd
        self.error: BaseException | None = None
        self.done = threading.Event()
        self._cancel = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        #: LOAD: written when CHECK_DEVICE_STATE says the front-end wrote everything
        self._writer_done = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._lock = threading.Lock()  # cancel() against the eventfds' close
        self._joined = False
        self.thread = threading.Thread(target=self._run, name=f"{where} {direction.name}")
        try:
            self.thread.start()
        except BaseException:
            close_fds([fd, self._cancel, self._writer_done])
            raise

    def _run(self) -> None:
        fd = self.fd
        try:
            if self.direction is DeviceStateDirection.SAVE:
                raw = _CancellablePipe(fd, self._cancel, writing=True)
                fd = -1
                with io.BufferedWriter(raw, TRANSFER_BUFFER) as w:
                    self.backend.save_state(w)
            else:
                raw = _CancellablePipe(fd, self._cancel, writing=False,
                                       done_fd=self._writer_done)
                fd = -1
                # A refused state ends the transfer here: our end closes at once (the
                # front-end's further writes fail) instead of reading it to an EOF
                # that an endless fd or a pipe held open never gives.
                with io.BufferedReader(raw, TRANSFER_BUFFER) as r:
                    self.backend.load_state(r)
                    left = len(r.read1(MAX_TRAILING_READ))
                    if left:
                        raise StreamFormatError(f"bytes after the end of the state (at "
                                                f"least {left})")
        except BaseException as e:  # noqa: BLE001 - reported by CHECK_DEVICE_STATE
            self.error = e
        finally:
            if fd >= 0:
                close_fds([fd])
            self.done.set()

    def cancel(self) -> None:
        """Make the worker's next wait on the pipe fail (any thread, any time; also a
        signal handler, so the lock is only tried: whoever holds it is joining the
        transfer or cancelling it already)."""
        if self._lock.acquire(blocking=False):
            try:
                if not self._joined:
                    os.eventfd_write(self._cancel, 1)
            finally:
                self._lock.release()

    def writer_done(self) -> None:
        """CHECK_DEVICE_STATE came: the front-end has written all of a LOAD's state, so
        an empty pipe is its end even if the front-end still holds the pipe open."""
        with self._lock:
            if not self._joined:
                os.eventfd_write(self._writer_done, 1)

    def join(self, timeout: float) -> BaseException | None:
        """Wait up to ``timeout`` seconds for the transfer, then cancel it, join the
        thread and return its error (a timeout is one)."""
        late = not self.done.wait(timeout)
        if late:
            self.cancel()
        self.thread.join()  # a cancelled worker leaves its next wait on the pipe at once
        with self._lock:
            if not self._joined:
                self._joined = True
                close_fds([self._cancel, self._writer_done])
        if late:
            return TimeoutError(f"device state {self.direction.name.lower()} still running "
                                f"after {timeout:.0f} s (cancelled)")
        return self.error


class BackendConnection:
    """Serves one connected front-end until it disconnects (:meth:`run`)."""

    def __init__(self, backend: VhostUserBackend, sock: socket.socket, *,
                 reply_fd: bool = False, where: str = "vhost-user front-end",
                 stopping: threading.Event | None = None) -> None:
        self.backend = backend
        self.stopping = stopping or threading.Event()
        self.reply_fd = reply_fd
        self.where = where
        self.channel = MessageChannel(sock, replies=False, where=where)
        self.session = _Session(backend.features, backend.protocol_features, where=where)
        self.state = ConnectionState()
        self.transfer: _Transfer | None = None
        #: Results of finished transfers, for tests and logs: (direction, error or None).
        self.transfers: list[tuple[DeviceStateDirection, BaseException | None]] = []

    def run(self) -> None:
        """Handle messages until the front-end closes; a protocol error ends the connection
        (after an error reply if one was due) and is raised."""
        try:
            while True:
                offset = self.channel.decoder.offset
                msg = self.channel.receive()
                if msg is None:
                    return
                try:
                    self._handle(msg, offset)
                finally:
                    close_fds(msg.fds)  # whatever a handler kept, it duplicated
        finally:
            self.close()

    def stop(self) -> None:
        """End the connection now (any thread, or a signal handler): a running save or
        load is cancelled, and the message loop sees the connection end."""
        self.stopping.set()
        t = self.transfer
        if t is not None:
            t.cancel()
        with contextlib.suppress(OSError):
            self.channel.sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        t = self.transfer
        if t is not None:
            # (self.transfer stays set until joined: a shutdown meanwhile cancels it)
            if self.stopping.is_set():
                t.cancel()
            err = t.join(TRANSFER_JOIN_TIMEOUT)
            self.transfer = None
            self.transfers.append((t.direction, err))
            if err is not None:
                log.warning("%s: %s without CHECK_DEVICE_STATE failed: %s", self.where,
                            t.direction.name, err)
        self.state.close()
        self.session.close()
        self.channel.close()

    # ---- dispatch -----------------------------------------------------------------------

    def _reply(self, msg: Message, payload: Any, fds: tuple[int, ...] = ()) -> None:
        self.channel.send(reply(msg.request, payload, fds))

    def _handle(self, msg: Message, offset: int) -> None:
        log.debug("%s: %s flags %#x %r fds %d", self.where, msg.describe(), msg.flags,
                  msg.payload, len(msg.fds))
        try:
            refusal = self.session.receive(msg, offset)
        except VhostUserError:
            if self.session.reply_expected(msg):
                code = FAILED | DEVICE_STATE_NOFD_MASK \
                    if msg.request == R.SET_DEVICE_STATE_FD else FAILED
                with contextlib.suppress(MigrationError):
                    self._reply(msg, U64(code))
            raise
        if refusal is not None:
            log.warning("%s: SET_DEVICE_STATE_FD refused: %s", self.where, refusal)
            self._reply(msg, U64(FAILED | DEVICE_STATE_NOFD_MASK))
            return
        handler = getattr(self, f"_on_{msg.request.name.lower()}", None)
        if handler is None:
            raise VhostUserError(f"{msg.describe()} is not supported by this back-end",
                                 offset=offset, where=self.where)
        result = handler(msg)
        if self.session.reply_expected(msg) and msg.request not in _ANSWERED_BY_HANDLER:
            self._reply(msg, U64(0 if result is not False else FAILED))

    # negotiation

    def _on_get_features(self, msg: Message) -> None:
        self._reply(msg, U64(self.backend.features))

    def _on_get_protocol_features(self, msg: Message) -> None:
        self._reply(msg, U64(self.backend.protocol_features))

    def _on_set_protocol_features(self, msg: Message) -> None:
        pass  # recorded by the session

    def _on_set_features(self, msg: Message) -> None:
        pass  # recorded by the session (LOG_ALL on/off needs nothing: no ring is processed)

    def _on_get_queue_num(self, msg: Message) -> None:
        self._reply(msg, U64(self.backend.num_queues))

    def _on_get_max_mem_slots(self, msg: Message) -> None:
        self._reply(msg, U64(self.backend.max_mem_slots))

    def _on_set_owner(self, msg: Message) -> None:
        pass

    def _on_reset_owner(self, msg: Message) -> None:
        self._reset_rings()

    def _on_reset_device(self, msg: Message) -> None:
        self._reset_rings()
        self.state.status = 0

    def _reset_rings(self) -> None:
        rings = self.state.vrings
        close_fds([fd for v in rings.values() for fd in (v.kick, v.call, v.err)
                   if fd is not None])
        rings.clear()

    # memory

    def _on_set_mem_table(self, msg: Message) -> None:
        assert isinstance(msg.payload, MemoryTable)
        close_fds([fd for _, fd in self.state.regions])
        self.state.regions = [(r, os.dup(fd)) for r, fd in zip(msg.payload.regions, msg.fds,
                                                                strict=True)]

    def _on_add_mem_reg(self, msg: Message) -> bool:
        assert isinstance(msg.payload, SingleMemoryRegion)
        if len(self.state.regions) >= self.backend.max_mem_slots:
            log.warning("%s: ADD_MEM_REG beyond %d slots", self.where,
                        self.backend.max_mem_slots)
            return False
        self.state.regions.append((msg.payload.region, os.dup(msg.fds[0])))
        return True

    def _on_rem_mem_reg(self, msg: Message) -> bool:
        assert isinstance(msg.payload, SingleMemoryRegion)
        r = msg.payload.region
        for i, (have, fd) in enumerate(self.state.regions):
            if (have.guest_addr, have.size, have.user_addr) == (r.guest_addr, r.size,
                                                                r.user_addr):
                del self.state.regions[i]
                close_fds([fd])
                return True
        return False

    def _on_set_log_base(self, msg: Message) -> None:
        assert isinstance(msg.payload, LogDescription)
        if self.state.log_fd is not None:
            close_fds([self.state.log_fd])
        self.state.log_fd = os.dup(msg.fds[0])
        self.state.log = msg.payload

    def _on_set_log_fd(self, msg: Message) -> None:
        pass  # an eventfd to signal log changes: this back-end never writes the log

    def _on_set_backend_req_fd(self, msg: Message) -> None:
        if self.state.backend_req_fd is not None:
            close_fds([self.state.backend_req_fd])
        self.state.backend_req_fd = os.dup(msg.fds[0])

    # rings

    def _state_payload(self, msg: Message) -> tuple[VringState, Vring]:
        assert isinstance(msg.payload, VringState)
        return msg.payload, self.state.vring(msg.payload.index)

    def _on_set_vring_num(self, msg: Message) -> None:
        p, v = self._state_payload(msg)
        v.num = p.num

    def _on_set_vring_base(self, msg: Message) -> None:
        p, v = self._state_payload(msg)
        v.base = p.num

    def _on_set_vring_enable(self, msg: Message) -> None:
        p, v = self._state_payload(msg)
        v.enabled = bool(p.num)

    def _on_set_vring_endian(self, msg: Message) -> None:
        pass

    def _on_get_vring_base(self, msg: Message) -> None:
        p, v = self._state_payload(msg)
        base = self.backend.vring_stopped(p.index, v) if v.started else v.base
        v.started = False
        v.base = base
        if v.kick is not None:
            close_fds([v.kick])
            v.kick = None
        self._reply(msg, VringState(p.index, base))

    def _on_set_vring_addr(self, msg: Message) -> None:
        assert isinstance(msg.payload, VringAddress)
        self.state.vring(msg.payload.index).address = msg.payload

    def _ring_fd(self, msg: Message, attr: str) -> Vring:
        assert isinstance(msg.payload, U64)
        v = self.state.vring(msg.payload.value & VHOST_USER_VRING_IDX_MASK)
        old = getattr(v, attr)
        if old is not None:
            close_fds([old])
        new = None if msg.payload.value & VHOST_USER_VRING_NOFD_MASK else os.dup(msg.fds[0])
        setattr(v, attr, new)
        return v

    def _on_set_vring_kick(self, msg: Message) -> None:
        v = self._ring_fd(msg, "kick")
        assert isinstance(msg.payload, U64)
        v.started = True
        self.backend.vring_started(msg.payload.value & VHOST_USER_VRING_IDX_MASK, v)

    def _on_set_vring_call(self, msg: Message) -> None:
        self._ring_fd(msg, "call")

    def _on_set_vring_err(self, msg: Message) -> None:
        self._ring_fd(msg, "err")

    # config and status

    def _on_get_config(self, msg: Message) -> None:
        assert isinstance(msg.payload, DeviceConfig)
        data = self.backend.get_config(msg.payload.offset, len(msg.payload.data))
        if data is None or len(data) != len(msg.payload.data):
            self._reply(msg, None)  # an empty reply is the error answer
        else:
            self._reply(msg, DeviceConfig(msg.payload.offset, msg.payload.flags, data))

    def _on_set_config(self, msg: Message) -> bool:
        assert isinstance(msg.payload, DeviceConfig)
        return self.backend.set_config(msg.payload)

    def _on_set_status(self, msg: Message) -> None:
        assert isinstance(msg.payload, U64)
        self.state.status = msg.payload.value & 0xFF

    def _on_get_status(self, msg: Message) -> None:
        self._reply(msg, U64(self.state.status))

    # state transfer

    def _on_set_device_state_fd(self, msg: Message) -> None:
        assert isinstance(msg.payload, DeviceStateTransfer)
        direction = DeviceStateDirection(msg.payload.direction)
        if self.reply_fd:
            r, w = os.pipe2(os.O_CLOEXEC)
            mine, theirs = (w, r) if direction is DeviceStateDirection.SAVE else (r, w)
            try:
                self._reply(msg, U64(0), (theirs,))
            except BaseException:
                close_fds([mine])
                raise
            finally:
                close_fds([theirs])
        else:
            mine = os.dup(msg.fds[0])
            try:
                self._reply(msg, U64(DEVICE_STATE_NOFD_MASK))
            except BaseException:
                close_fds([mine])
                raise
        self.transfer = _Transfer(self.backend, direction, mine, self.where)

    def _on_check_device_state(self, msg: Message) -> None:
        t = self.transfer
        assert t is not None
        if t.direction is DeviceStateDirection.LOAD:
            t.writer_done()
        err = t.join(TRANSFER_JOIN_TIMEOUT)
        self.transfer = None
        self.transfers.append((t.direction, err))
        if err is not None:
            log.warning("%s: device state %s failed: %s", self.where,
                        t.direction.name.lower(), err)
        else:
            log.info("%s: device state %s done", self.where, t.direction.name.lower())
        self._reply(msg, U64(0 if err is None else FAILED))


#: Requests whose handler sends its own reply.
_ANSWERED_BY_HANDLER = frozenset({
    R.GET_FEATURES, R.GET_PROTOCOL_FEATURES, R.GET_QUEUE_NUM, R.GET_MAX_MEM_SLOTS,
    R.GET_VRING_BASE, R.GET_CONFIG, R.GET_STATUS, R.SET_DEVICE_STATE_FD,
    R.CHECK_DEVICE_STATE,
})


def _is_listening(sock: socket.socket) -> bool:
    return bool(sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN))


class BackendServer:
    """Listens on ``socket_path`` (or uses an inherited socket ``fd``: a listening socket is
    accepted on, a connected one is served once) and serves one front-end at a time.

    The socket path is bound under a temporary name and renamed into place once it listens,
    so a front-end that sees the path can connect.
    """

    def __init__(self, backend: VhostUserBackend, *, socket_path: str | None = None,
                 fd: int | None = None, reply_fd: bool = False) -> None:
        if (socket_path is None) == (fd is None):
            raise ValueError("give exactly one of socket_path and fd")
        self.backend = backend
        self.reply_fd = reply_fd
        self.socket_path = socket_path
        self._stop = threading.Event()
        self.connection: BackendConnection | None = None
        self.connections = 0
        if fd is not None:
            if not stat.S_ISSOCK(os.fstat(fd).st_mode):
                raise OSError(f"--fd {fd} is not a socket")
            self.sock = socket.socket(fileno=fd)
        else:
            assert socket_path is not None
            self.sock = self._listen(socket_path)

    @staticmethod
    def _listen(path: str) -> socket.socket:
        check_socket_path(path, "vhost-user socket")
        tmp = f"{path}.{os.getpid()}.tmp"
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            s.bind(tmp)
            s.listen(LISTEN_BACKLOG)
            os.replace(tmp, path)
        except BaseException:
            s.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        return s

    def serve_forever(self) -> None:
        """Serve front-ends until :meth:`shutdown` (or, for an inherited connected socket,
        until that connection ends). A connection that breaks the protocol is logged and
        dropped; the server carries on."""
        if not _is_listening(self.sock):
            self._serve(self.sock)
            return
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                if self._stop.is_set():
                    return
                raise
            self._serve(conn)

    def _serve(self, conn: socket.socket) -> None:
        self.connections += 1
        where = f"vhost-user front-end #{self.connections}"
        c = self.connection = BackendConnection(self.backend, conn, reply_fd=self.reply_fd,
                                                where=where, stopping=self._stop)
        if self._stop.is_set():  # a shutdown that came before self.connection was set
            c.stop()
        try:
            c.run()
            log.info("%s: disconnected", where)
        except MigrationError as e:
            log.error("%s: connection closed: %s", where, e)
        finally:
            self.connection = None

    def shutdown(self) -> None:
        """Stop accepting (from a signal handler or another thread) and remove the path.
        A connection being served ends at once: its socket is shut down and a transfer
        still running is cancelled (its worker leaves its next wait on the pipe); the
        thread in :meth:`serve_forever` then joins that worker and returns."""
        self._stop.set()
        c = self.connection
        if c is not None:
            c.stop()
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(OSError):
            self.sock.close()
        if self.socket_path is not None:
            with contextlib.suppress(OSError):
                os.unlink(self.socket_path)
