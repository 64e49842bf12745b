"""A virtio-fs vhost-user back-end that serves no files but migrates a state.

QEMU's ``vhost-user-fs-pci`` fronts it like virtiofsd: it offers what QEMU 10 needs to
create and migrate the device (spec/vhost-user-qemu10.md section 5) and carries an
opaque internal state through ``SET_DEVICE_STATE_FD``. Its purpose is testing
migration: the state is derived from a seed, framed so that any damage is detected,
and its digest is published after every save and load.

State format (big-endian), :data:`STATE_MAGIC` version 1::

    8   magic "LMVUFS\\0\\1"
    4   version (1)
    4   flags (0)
    8   payload length N
    N   payload
    32  sha256 of everything above

The digest tests compare is the sha256 of these whole serialized bytes: a destination
that loaded the source's state serializes it again to identical bytes.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import threading
from dataclasses import dataclass
from typing import Any, BinaryIO, Protocol

from livemig.errors import LimitExceeded, StreamFormatError, TruncatedStream
from livemig.limits import MAX_VHOST_USER_DEVICE_STATE
from livemig.vhost_user.backend import VhostUserBackend

#: virtio device id of a file system device (virtio spec 5.11).
VIRTIO_ID_FS = 26
STATE_MAGIC = b"LMVUFS\x00\x01"
STATE_VERSION = 1
_HEADER = struct.Struct(">8sIIQ")
_DIGEST = hashlib.sha256().digest_size
#: The largest payload a load accepts: the state limit minus its framing.
MAX_PAYLOAD = MAX_VHOST_USER_DEVICE_STATE - _HEADER.size - _DIGEST
#: Payload size of a seeded state unless --state-size says otherwise: three 64 KiB pipe
#: buffers and a bit, so a transfer that is not streamed deadlocks in tests.
DEFAULT_SEEDED_SIZE = 200_000
#: Bytes per write into the pipe on save.
WRITE_CHUNK = 64 << 10


def seeded_payload(seed: int, size: int) -> bytes:
    """``size`` bytes derived from ``seed``: sha256(seed || counter) blocks."""
    out = bytearray()
    prefix = seed.to_bytes(8, "big", signed=False)
    i = 0
    while len(out) < size:
        out += hashlib.sha256(prefix + i.to_bytes(8, "big")).digest()
        i += 1
    return bytes(out[:size])


def serialize(payload: bytes) -> bytes:
    head = _HEADER.pack(STATE_MAGIC, STATE_VERSION, 0, len(payload)) + payload
    return head + hashlib.sha256(head).digest()


class StateReader(Protocol):
    """What a state is read from: the pipe of SET_DEVICE_STATE_FD as a buffered file.
    A pipe end the front-end left non-blocking answers ``None`` instead of waiting."""

    def read(self, n: int, /) -> bytes | None: ...


def _read_exactly(reader: StateReader, n: int, what: str, offset: int) -> bytes:
    data = reader.read(n)
    if data is None or len(data) != n:
        got = 0 if data is None else len(data)
        raise TruncatedStream(f"state ends in the {what}: {got} of {n} bytes",
                              offset=offset + got, where="virtio-fs state")
    return data


def parse(reader: StateReader) -> bytes:
    """Read one whole serialized state up to EOF; its payload, or a livemig error."""
    head = _read_exactly(reader, _HEADER.size, "header", 0)
    magic, version, flags, length = _HEADER.unpack(head)
    where = "virtio-fs state"
    if magic != STATE_MAGIC:
        raise StreamFormatError(f"bad magic {magic!r}", offset=0, where=where, raw=head)
    if version != STATE_VERSION:
        raise StreamFormatError(f"version {version}, expected {STATE_VERSION}", offset=8,
                                where=where, raw=head)
    if flags:
        raise StreamFormatError(f"unknown flags {flags:#x}", offset=12, where=where)
    if length > MAX_PAYLOAD:
        raise LimitExceeded(f"payload of {length} bytes exceeds the limit {MAX_PAYLOAD}",
                            offset=16, where=where)
    payload = _read_exactly(reader, length, "payload", _HEADER.size)
    digest = _read_exactly(reader, _DIGEST, "checksum", _HEADER.size + length)
    if hashlib.sha256(head + payload).digest() != digest:
        raise StreamFormatError("sha256 mismatch: the state was damaged",
                                offset=_HEADER.size + length, where=where)
    if reader.read(1):
        raise StreamFormatError("bytes after the checksum", where=where,
                                offset=_HEADER.size + length + _DIGEST)
    return payload


@dataclass(frozen=True)
class StateInfo:
    """What ``--state-file`` holds (JSON): digest and size of the serialized state and
    the counts of saves, loads and rejected loads so far."""

    sha256: str
    size: int
    payload_size: int
    saves: int
    loads: int
    failed_loads: int

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class FsBackend(VhostUserBackend):
    """virtio-fs as far as QEMU's vhost-user-fs-pci sees it, with a migratable state."""

    backend_type = "fs"
    device_id = VIRTIO_ID_FS

    def __init__(self, seed: int | None = None, *, state_size: int | None = None,
                 state_file: str | None = None) -> None:
        if seed is None:
            payload = b""
        else:
            size = DEFAULT_SEEDED_SIZE + seed % 1000 if state_size is None else state_size
            if not 0 <= size <= MAX_PAYLOAD:
                raise ValueError(f"state size {size} outside 0..{MAX_PAYLOAD}")
            payload = seeded_payload(seed, size)
        self._lock = threading.Lock()
        self._state = serialize(payload)
        self._payload_size = len(payload)
        self.state_file = state_file
        self.saves = self.loads = self.failed_loads = 0
        self._publish()

    @property
    def state(self) -> bytes:
        """The serialized state (what a save writes)."""
        with self._lock:
            return self._state

    def info(self) -> StateInfo:
        with self._lock:
            return StateInfo(hashlib.sha256(self._state).hexdigest(), len(self._state),
                             self._payload_size, self.saves, self.loads, self.failed_loads)

    def _publish(self) -> None:
        """Write :meth:`info` to the state file atomically (write, fsync, rename)."""
        if self.state_file is None:
            return
        tmp = f"{self.state_file}.tmp"
        with open(tmp, "w") as f:
            json.dump(self.info().as_dict(), f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.state_file)

    def save_state(self, writer: BinaryIO) -> None:
        data = memoryview(self.state)
        writer.writelines(data[i:i + WRITE_CHUNK] for i in range(0, len(data), WRITE_CHUNK))
        writer.flush()
        with self._lock:
            self.saves += 1
        self._publish()

    def load_state(self, reader: BinaryIO) -> None:
        try:
            payload = parse(reader)
        except BaseException:
            with self._lock:
                self.failed_loads += 1
            self._publish()
            raise
        with self._lock:
            self._state = serialize(payload)
            self._payload_size = len(payload)
            self.loads += 1
        self._publish()
