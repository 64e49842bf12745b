"""``vfio-sim``: a simulated VFIO device that migrates like a real one (uAPI v2).

Theory of operation
-------------------
The device has *memory* (its internal state, a numpy array of 64 MiB .. 1 GiB),
cut into chunks for dirty tracking, and a small *config state* (the part QEMU
itself saves, like PCI config space: ``DEV_CONFIG_STATE`` on the wire). A
workload calls :meth:`VfioSimDevice.mutate` while the device runs; it changes
random chunks and marks them dirty.

Migration follows the kernel's ``VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE``
contract (:mod:`livemig.vfio.state_machine`): :meth:`VfioSimDevice.set_state`
walks the arcs and returns a *data fd* when the request started a session:

* **saving** (RUNNING -> PRE_COPY, RUNNING_P2P -> PRE_COPY_P2P, STOP -> STOP_COPY):
  the read end of a real pipe. A feeder thread of the device writes the stream
  (:mod:`livemig.vfio.sim_format`): a HEADER, every chunk once (the *initial*
  data), then chunks dirtied since they were sent. In PRE_COPY the fd is
  non-blocking and a read at the *temporary end* (nothing pending) fails with
  ``EAGAIN`` -- a pipe cannot return the kernel's ``ENOMSG``, so the sim uses
  ``EAGAIN`` in its place (:func:`read_data` maps it to ``b""`` as QEMU maps
  ``ENOMSG`` to 0 bytes). :meth:`precopy_info` answers
  ``VFIO_MIG_GET_PRECOPY_INFO``: ``(initial_bytes, dirty_bytes)``, both counting
  what is queued in the pipe and not read yet. Entering STOP_COPY (the device is
  stopped now) makes the fd blocking; the feeder sends the rest, an END record
  with digests, and closes its end, so ``read()`` returns 0 at the end of the
  data. Leaving the saving group (-> STOP, RUNNING, RUNNING_P2P) ends the session.
* **resuming** (STOP -> RESUMING): the write end of a pipe; a consumer thread
  parses the stream and applies the chunks. RESUMING -> STOP drains what was
  written and validates: the stream must be complete (END read) and the memory
  must match the source's digest, else the request fails and the device is in
  ERROR (the header allows a driver to do that). If the stream is malformed
  the consumer closes its end, so the writer gets ``EPIPE`` at once.

:attr:`VfioSimDevice.verified` says whether memory *and* config equal the
source's at the time it stopped (the END record carries both digests).

Threads: the feeder and consumer are owned by the session that started them and
joined when the session ends (:meth:`set_state`, :meth:`reset`, :meth:`close`);
an error in one is kept and raised by the transition that ends the session. They
never poll: the feeder waits on the device's condition (notified by every change
it looks at) and both wait in ``select`` with the session's wake-up pipe, which
ending the session writes to; so that join has no time limit.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import select
import termios
import threading
from collections.abc import Callable, Iterable
from typing import Self

import numpy as np

from livemig.errors import ConfigError, MigrationError, StateError, StreamFormatError
from livemig.vfio import sim_format as fmt
from livemig.vfio.state_machine import (
    RUNNING_STATES,
    SAVING_GROUP,
    DeviceState,
    MigrationFlag,
    VfioStateMachine,
)

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "MAX_SIM_MEMORY",
    "MIN_SIM_MEMORY",
    "VfioSimDevice",
    "read_data",
]

S = DeviceState

#: Dirty-tracking granularity and the size of one CHUNK record. 64 KiB keeps a
#: 1 GiB device at 16384 chunks (one numpy bool each) while a workload touching a
#: few bytes re-sends little.
DEFAULT_CHUNK_SIZE = 64 << 10
#: Device memory sizes accepted (the issue asks for 64 MiB .. 1 GiB; smaller ones
#: are allowed for tests).
MIN_SIM_MEMORY = 64 << 10
MAX_SIM_MEMORY = 1 << 30
#: Config state bytes (PCI config space is 256 bytes; 4 KiB with extended space).
DEFAULT_CONFIG_SIZE = 256
MAX_CONFIG_SIZE = 64 << 10
#: The pipe's capacity (F_SETPIPE_SZ): 1 MiB, QEMU's data buffer size, so one
#: read can return a full buffer. Without the privilege to raise it the default
#: 64 KiB is kept.
PIPE_SIZE = 1 << 20
#: The consumer's read size.
_READ_SIZE = 1 << 20
_F_SETPIPE_SZ = 1031


def read_data(fd: int, n: int) -> bytes:
    """``read()`` of a data fd, with the temporary end of precopy read as ``b""``.

    In PRE_COPY the kernel fails the read with ``ENOMSG`` when nothing is pending;
    the sim's pipe fails with ``EAGAIN`` instead. In STOP_COPY ``b""`` is the end.
    """
    try:
        return os.read(fd, n)
    except BlockingIOError:
        return b""


def _set_nonblocking(fd: int, on: bool) -> None:
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    fcntl.fcntl(fd, fcntl.F_SETFL, flags | os.O_NONBLOCK if on else flags & ~os.O_NONBLOCK)


def _pipe() -> tuple[int, int]:
    r, w = os.pipe()
    with contextlib.suppress(OSError):
        fcntl.fcntl(w, _F_SETPIPE_SZ, PIPE_SIZE)
    return r, w


def _unread(fd: int) -> int:
    buf = bytearray(4)
    fcntl.ioctl(fd, termios.FIONREAD, buf)
    return int.from_bytes(buf, "little")


class _Session:
    """One data transfer session: a pipe, a device thread, a wake-up pipe."""

    def __init__(self, saving: bool) -> None:
        self.saving = saving
        self.r, self.w = _pipe()
        self.wake_r, self.wake_w = os.pipe()
        self.user_fd = self.r if saving else self.w
        # The device keeps its own reference to the user's end: to switch its
        # blocking mode (saving) and to count unread bytes.
        self.user_dup = os.dup(self.user_fd)
        self.dev_fd: int | None = self.w if saving else self.r
        self.thread: threading.Thread | None = None
        self.stop = False
        self.cancelled = False
        self.error: BaseException | None = None

    def wake(self) -> None:
        self.stop = True
        with contextlib.suppress(OSError):
            os.write(self.wake_w, b"x")

    def close_dev_end(self) -> None:
        if self.dev_fd is not None:
            os.close(self.dev_fd)
            self.dev_fd = None

    def end(self) -> None:
        self.wake()
        if self.thread is not None and self.thread is not threading.current_thread():
            self.thread.join()  # it waits only where the wake-up reaches it
        self.close_dev_end()
        for fd in (self.user_dup, self.wake_r, self.wake_w):
            os.close(fd)


class VfioSimDevice:
    """A simulated VFIO device (see the module doc for the data fd contract).

    ``features``: ``VFIO_MIGRATION_*`` flags (STOP_COPY is mandatory). ``seed``
    fills the memory with reproducible random bytes (None: zeros).
    """

    def __init__(self, name: str = "vfio-sim0", *, mem_size: int = 64 << 20,
                 chunk_size: int = DEFAULT_CHUNK_SIZE,
                 features: int = MigrationFlag.STOP_COPY | MigrationFlag.P2P
                 | MigrationFlag.PRE_COPY,
                 config_size: int = DEFAULT_CONFIG_SIZE, seed: int | None = 0) -> None:
        if not MIN_SIM_MEMORY <= mem_size <= MAX_SIM_MEMORY:
            raise ConfigError(f"vfio-sim memory {mem_size} outside "
                              f"{MIN_SIM_MEMORY}..{MAX_SIM_MEMORY}")
        if not 0 < chunk_size <= fmt.MAX_SIM_CHUNK or mem_size % chunk_size:
            raise ConfigError(f"vfio-sim chunk size {chunk_size} must divide the memory "
                              f"size {mem_size} and be at most {fmt.MAX_SIM_CHUNK}")
        if not 0 < config_size <= MAX_CONFIG_SIZE:
            raise ConfigError(f"vfio-sim config size {config_size} outside 1..{MAX_CONFIG_SIZE}")
        self.name = name
        self.mem_size = mem_size
        self.chunk_size = chunk_size
        self.nchunks = mem_size // chunk_size
        rng = np.random.default_rng(seed)
        self.memory = (rng.integers(0, 256, mem_size, dtype=np.uint8) if seed is not None
                       else np.zeros(mem_size, dtype=np.uint8))
        self.config = bytearray(rng.integers(0, 256, config_size, dtype=np.uint8).tobytes()
                                if seed is not None else bytes(config_size))
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        # Per chunk, its SHA-256 and the CRC of the record that carries it, kept
        # current by the workload's writes on the source and by each applied record
        # on the destination (its CRC, checked anyway): the END record's digests and
        # the destination's check then cost a hash of these, not a pass over all of
        # memory while the machine is stopped. Zero CRCs on a destination: a chunk
        # that never arrived fails the check.
        self._chunk_hash = np.zeros((self.nchunks, 32), dtype=np.uint8)
        self._chunk_crc = np.zeros(self.nchunks, dtype=">u4")
        if seed is not None:
            self._hash_chunks(range(self.nchunks))
        else:
            zero = hashlib.sha256(bytes(chunk_size)).digest()
            self._chunk_hash[:] = np.frombuffer(zero, dtype=np.uint8)
        self.dirty = np.zeros(self.nchunks, dtype=bool)
        self._initial = np.zeros(self.nchunks, dtype=bool)
        self._rng = np.random.default_rng(None if seed is None else seed + 1)
        self._generation = 0  # bumps on every change of memory or config
        self._session: _Session | None = None
        self._running = True  # the device starts in RUNNING
        # saving-session accounting (stream bytes)
        self._stop_copy = False
        self._written = 0
        self._initial_end: int | None = None
        self._in_hand = (0, 0)  # (initial, dirty) bytes taken out of the bitmaps, not written
        self._header_pending = False
        self._chunks_sent = 0
        self._queue: list[int] = []  # chunks to send, last one first
        self._queue_initial = False
        # resuming
        self._decoder: fmt.SimStreamDecoder | None = None
        self._expected: fmt.SimEnd | None = None
        self._verified_cache: tuple[int, bool] | None = None
        self.machine = VfioStateMachine(features, name=name, on_arc=self._on_arc)

    # ------------------------------------------------------------------ uAPI

    @property
    def features(self) -> MigrationFlag:
        """``VFIO_DEVICE_FEATURE_MIGRATION``."""
        return self.machine.features

    @property
    def state(self) -> DeviceState:
        """``VFIO_DEVICE_FEATURE_GET`` of ``MIG_DEVICE_STATE``."""
        return self.machine.state

    def set_state(self, new_state: int) -> int | None:
        """``VFIO_DEVICE_FEATURE_SET`` of ``MIG_DEVICE_STATE``: the new data fd, or None.

        The fd belongs to the caller, who closes it. Refused requests raise
        :class:`~livemig.vfio.state_machine.IllegalTransition` without moving; a
        failed arc (e.g. resumed data that does not validate) leaves the device
        in ERROR and raises.
        """
        before = self._session
        self.machine.request(new_state)
        after = self._session
        return after.user_fd if after is not None and after is not before else None

    def precopy_info(self) -> tuple[int, int]:
        """``VFIO_MIG_GET_PRECOPY_INFO``: ``(initial_bytes, dirty_bytes)`` (PRE_COPY states)."""
        self.machine.require({S.PRE_COPY, S.PRE_COPY_P2P}, "VFIO_MIG_GET_PRECOPY_INFO")
        with self._lock:
            return self._precopy_info()

    def stop_copy_size(self) -> int:
        """``VFIO_DEVICE_FEATURE_MIG_DATA_SIZE``: bytes STOP_COPY would still produce."""
        with self._lock:
            rec = fmt.record_size(self.chunk_size)
            if self._session is not None and self._session.saving:
                pending = int(np.count_nonzero(self.dirty)) * rec + sum(self._in_hand)
                unread = self._written - self._consumed()
            else:
                pending = self.nchunks * rec + fmt.record_size(8)
                unread = 0
            return pending + unread + fmt.record_size(64)

    def reset(self) -> None:
        """``VFIO_DEVICE_RESET``: end any session, back to RUNNING (also from ERROR)."""
        with self.machine._lock:
            self._end_session(check=False)
            self.machine.reset()
            with self._lock:
                self._running = True

    def close(self) -> None:
        """End any session and its thread; the device cannot migrate afterwards."""
        with self.machine._lock:
            self._end_session(check=False)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ workload and config

    def mutate(self, fraction: float = 0.01, *, rng: np.random.Generator | None = None) -> int:
        """Change ``fraction`` of the chunks (at least one) and mark them dirty.

        Only while the device runs (RUNNING, RUNNING_P2P, PRE_COPY, PRE_COPY_P2P);
        otherwise :class:`~livemig.errors.StateError` -- a stopped device does not
        change. Returns the number of chunks changed.
        """
        if not 0 <= fraction <= 1:
            raise ConfigError(f"mutate fraction {fraction} outside 0..1")
        gen = rng or self._rng
        k = max(1, round(fraction * self.nchunks))
        idx = gen.choice(self.nchunks, size=k, replace=False)
        width = min(64, self.chunk_size)
        values = gen.integers(0, 256, (k, width), dtype=np.uint8)
        with self._lock:
            if not self._running:
                raise StateError(self.machine.state.name, "a running state (RUNNING, "
                                 "RUNNING_P2P, PRE_COPY, PRE_COPY_P2P) for mutate")
            self.memory.reshape(self.nchunks, self.chunk_size)[idx, :width] = values
            self._hash_chunks(idx.tolist())
            self.config[0] = (self.config[0] + 1) & 0xFF
            self.dirty[idx] = True
            self._generation += 1
            self._changed.notify_all()
        return k

    def save_config(self) -> bytes:
        """The config state (what goes between ``DEV_CONFIG_STATE`` and ``END_OF_STATE``)."""
        with self._lock:
            return bytes(self.config)

    def load_config(self, data: bytes | bytearray | memoryview) -> None:
        """Load the config state on the destination (RESUMING or STOP)."""
        if len(data) != len(self.config):
            raise StreamFormatError(f"{self.name}: config state of {len(data)} bytes, the "
                                    f"device has {len(self.config)}", where=self.name)
        with self._lock:
            self.machine.require({S.RESUMING, S.STOP}, "loading the config state")
            self.config[:] = data
            self._generation += 1

    def digest(self) -> bytes:
        """SHA-256 over the chunks' SHA-256 and the config: equal on both ends after a
        migration."""
        with self._lock:
            return self._state_digest()

    def matches_source(self) -> bool:
        """Resuming ended with memory whose chunk CRCs match the source's (the check
        RESUMING -> STOP makes, without a pass over memory); :attr:`verified` is the
        full check."""
        with self._lock:
            return self._expected is not None

    @property
    def verified(self) -> bool:
        """Memory and config equal what the source had when it stopped (from its END record).

        Rehashes all of memory (the kept chunk hashes are not trusted here), so
        this checks the bytes themselves; it runs after the migration, not in
        its downtime.
        """
        with self._lock:
            if self._expected is None:
                return False
            if self._verified_cache is None or self._verified_cache[0] != self._generation:
                self._hash_chunks(range(self.nchunks))
                ok = self._state_digest() == self._expected.state_digest
                self._verified_cache = (self._generation, ok)
            return self._verified_cache[1]

    def load_target(self, data_fd: int) -> LoadTarget:
        """A :class:`~livemig.migration.destination.device_state_reassembly.DeviceLoadTarget`
        for ``data_fd``."""
        return LoadTarget(self, data_fd)

    # ------------------------------------------------------------------ arcs

    def _on_arc(self, a: DeviceState, b: DeviceState) -> None:
        with self._lock:  # before anything else: no mutation once a stop begins
            self._running = b in RUNNING_STATES
        if b in SAVING_GROUP and a not in SAVING_GROUP:
            self._start_saving(stop_copy=b == S.STOP_COPY)
        elif a in SAVING_GROUP and b == S.STOP_COPY:
            with self._lock:
                self._stop_copy = True
                self._changed.notify_all()
            assert self._session is not None
            _set_nonblocking(self._session.user_dup, False)
        elif a in SAVING_GROUP and b not in SAVING_GROUP:
            self._end_session(check=True)
        elif b == S.RESUMING:
            self._start_resuming()
        elif a == S.RESUMING:
            self._finish_resuming()

    def _start_saving(self, stop_copy: bool) -> None:
        sess = _Session(saving=True)
        _set_nonblocking(sess.w, True)
        _set_nonblocking(sess.user_fd, not stop_copy)
        with self._lock:
            self._stop_copy = stop_copy
            self.dirty[:] = True
            self._initial[:] = not stop_copy
            self._written = 0
            self._initial_end = None
            self._in_hand = (0, 0)
            self._header_pending = True
            self._chunks_sent = 0
            self._queue.clear()
            self._session = sess
        sess.thread = threading.Thread(target=self._feed, args=(sess,),
                                       name=f"vfio-sim feeder {self.name}")
        sess.thread.start()

    def _start_resuming(self) -> None:
        sess = _Session(saving=False)
        _set_nonblocking(sess.r, True)
        with self._lock:
            self._decoder = fmt.SimStreamDecoder(self.mem_size, self.chunk_size,
                                                 where=f"{self.name} data stream")
            self._expected = None
            self._verified_cache = None
            self._session = sess
        sess.thread = threading.Thread(target=self._consume, args=(sess,),
                                       name=f"vfio-sim consumer {self.name}")
        sess.thread.start()

    def _finish_resuming(self) -> None:
        sess = self._session
        assert sess is not None and not sess.saving
        self._end_session(check=True)
        dec = self._decoder
        assert dec is not None
        if dec.end is None:
            raise StreamFormatError(f"{self.name}: the data stream ended before its END "
                                    f"record ({dec.chunks} chunks received)", where=self.name)
        with self._lock:
            if self._memory_digest() != dec.end.memory_digest:
                raise StreamFormatError(f"{self.name}: device memory after resuming does not "
                                        "match the source's digest", where=self.name)
            self._expected = dec.end
            self._generation += 1

    def _end_session(self, check: bool) -> None:
        sess = self._session
        if sess is None:
            return
        with self._lock:
            self._session = None
            sess.stop = True  # before the notify, so a waiting feeder leaves at once
            self._changed.notify_all()
        sess.end()
        if check and sess.error is not None:
            err = sess.error
            if isinstance(err, MigrationError):
                raise err
            raise MigrationError(f"{self.name}: data thread failed: {err}") from err

    # ------------------------------------------------------------------ threads

    def _consumed(self) -> int:
        """Stream bytes the user has read (lock held)."""
        sess = self._session
        if sess is None or not sess.saving:
            return self._written
        return self._written - _unread(sess.user_dup)

    def _precopy_info(self) -> tuple[int, int]:
        rec = fmt.record_size(self.chunk_size)
        consumed = self._consumed()
        written = self._written
        init_end = self._initial_end if self._initial_end is not None else written
        initial = (int(np.count_nonzero(self._initial)) * rec + self._in_hand[0]
                   + (fmt.record_size(8) if self._header_pending else 0)
                   + max(0, min(written, init_end) - consumed))
        dirty = (int(np.count_nonzero(self.dirty & ~self._initial)) * rec + self._in_hand[1]
                 + max(0, written - max(consumed, init_end)))
        return initial, dirty

    def _take(self) -> tuple[bytes | list[bytes | memoryview], bool, bool] | None:
        """The next record to write, whether it is initial data and whether it is the
        END, or None when nothing is pending (lock held)."""
        if self._header_pending:
            self._header_pending = False
            data = fmt.encode_header(self.mem_size, self.chunk_size)
            self._in_hand = (len(data), 0)
            return data, True, False
        found = self._next_pending()
        if found is None:
            if not self._stop_copy:
                return None
            data = fmt.encode_end(self._chunks_sent, self._memory_digest(), self._state_digest())
            self._in_hand = (0, len(data))
            return data, False, True
        i, initial = found
        self._initial[i] = False
        self.dirty[i] = False
        a = i * self.chunk_size
        view = self.memory.data[a:a + self.chunk_size]
        # a stopped device does not change: its memory goes out as it is
        head, body = fmt.encode_chunk(a, view if self._stop_copy else view.tobytes())
        self._chunks_sent += 1
        n = len(head) + len(body)
        self._in_hand = (n, 0) if initial else (0, n)
        return [head, body], initial, False

    def _next_pending(self) -> tuple[int, bool] | None:
        """The next chunk to send and whether it is initial data (lock held).

        Initial data first, then dirty chunks, each in address order. The bitmap
        is scanned once per sweep (a list of candidates), not once per chunk;
        a candidate whose bit was cleared since is skipped, one set since is
        found by the next sweep.
        """
        queue = self._queue
        while True:
            while queue:
                i = queue.pop()
                bits = self._initial if self._queue_initial else self.dirty
                if bits[i]:
                    return i, self._queue_initial
            pending = np.flatnonzero(self._initial)
            self._queue_initial = pending.size > 0
            if not self._queue_initial:
                pending = np.flatnonzero(self.dirty)
                if pending.size == 0:
                    return None
            queue[:] = pending[::-1].tolist()

    def _feed(self, sess: _Session) -> None:
        try:
            while True:
                with self._lock:
                    while not sess.stop and (item := self._take()) is None:
                        self._changed.wait()  # mutate, STOP_COPY and the session's end notify
                    if sess.stop:
                        return
                    assert item is not None
                    data, initial, last = item
                bufs = [memoryview(b) for b in data] if isinstance(data, list) \
                    else [memoryview(data)]
                if not self._write_all(sess, bufs):
                    return
                with self._lock:
                    self._written += sum(len(b) for b in bufs)
                    self._in_hand = (0, 0)
                    if initial and self._initial_end is None and not self._initial.any():
                        self._initial_end = self._written
                if last:
                    with self._lock:
                        sess.close_dev_end()  # read() now returns 0 after the data
                    return
        except BaseException as e:  # noqa: BLE001 - raised by the transition ending the session
            sess.error = e

    def _write_all(self, sess: _Session, bufs: list[memoryview]) -> bool:
        assert sess.dev_fd is not None
        while bufs:
            try:
                n = os.writev(sess.dev_fd, bufs)
            except BlockingIOError:
                ready, _, _ = select.select([sess.wake_r], [sess.dev_fd], [])
                if sess.wake_r in ready:
                    return False
                continue
            while bufs and n >= len(bufs[0]):
                n -= len(bufs[0])
                bufs = bufs[1:]
            if n:
                bufs = [bufs[0][n:], *bufs[1:]]
        return True

    def _consume(self, sess: _Session) -> None:
        dec = self._decoder
        assert dec is not None and sess.dev_fd is not None
        # room for a read and the part of a record the previous read left
        buf = bytearray(_READ_SIZE + fmt.record_size(max(self.chunk_size, 64)))
        view = memoryview(buf)
        end = base = 0
        try:
            while True:
                if sess.cancelled:
                    return
                draining = sess.stop
                if not draining:
                    select.select([sess.dev_fd, sess.wake_r], [], [])
                try:
                    n = os.readv(sess.dev_fd, [view[end:end + _READ_SIZE]])
                except BlockingIOError:
                    if draining:
                        return  # everything written before the request is in
                    continue
                if not n:
                    return  # the user closed the fd
                end += n
                records, pos = dec.parse(buf, 0, end, base)
                if records:
                    self._apply(records)
                del records  # its chunk views pin ``buf``
                if end - pos > len(buf) - _READ_SIZE:
                    raise StreamFormatError(f"{self.name}: a record larger than a chunk",
                                            offset=base + pos, where=self.name)
                buf[:end - pos] = buf[pos:end]
                end -= pos
                base += pos
        except BaseException as e:  # noqa: BLE001 - raised by RESUMING -> STOP
            if sess.error is None:  # a cancel came first
                sess.error = e
        finally:
            if sess.error is not None:
                with self._lock:
                    sess.close_dev_end()  # the writer gets EPIPE instead of blocking

    def _apply(self, records: list[fmt.SimRecord]) -> None:
        with self._lock:
            for r in records:
                if isinstance(r, fmt.SimChunk):
                    n = len(r.data)
                    self.memory[r.address:r.address + n] = np.frombuffer(r.data, np.uint8)
                    self._chunk_crc[r.address // self.chunk_size] = r.crc
            self._generation += 1

    def _hash_chunks(self, chunks: Iterable[int]) -> None:
        """Rehash the given chunks (lock held, or during construction)."""
        cs = self.chunk_size
        data = self.memory.data
        out, crcs = self._chunk_hash, self._chunk_crc
        for i in chunks:
            view = data[i * cs:(i + 1) * cs]
            out[i] = np.frombuffer(hashlib.sha256(view).digest(), np.uint8)
            crcs[i] = fmt.chunk_crc(i * cs, view)

    def _memory_digest(self) -> bytes:
        return hashlib.sha256(self._chunk_crc.tobytes()).digest()

    def _state_digest(self) -> bytes:
        h = hashlib.sha256(self._chunk_hash.data)
        h.update(self.config)
        return h.digest()


class LoadTarget:
    """Feeds a :class:`VfioSimDevice` in RESUMING from a multifd reassembler's load thread."""

    def __init__(self, device: VfioSimDevice, data_fd: int) -> None:
        self.device = device
        self.data_fd = data_fd
        self._write: Callable[[int, memoryview], int] = os.write

    def write_data(self, data: memoryview) -> None:
        view = data
        while view:
            view = view[self._write(self.data_fd, view):]

    def load_config(self, config: memoryview) -> None:
        self.device.load_config(config)

    def cancel(self) -> None:
        """Unblock a writer: the device stops reading (its end of the pipe closes)."""
        sess = self.device._session
        if sess is not None and not sess.saving:
            sess.error = sess.error or MigrationError(f"{self.device.name}: loading cancelled")
            sess.cancelled = True
            sess.wake()  # the consumer closes its end and leaves
