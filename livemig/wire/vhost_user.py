"""vhost-user messages and sessions, sans-I/O.

Mirrors QEMU's ``docs/interop/vhost-user.rst`` and ``hw/virtio/vhost-user.c``
(10.0), plus what a real QEMU 10 front-end was seen to send
(``spec/vhost-user-qemu10.md``).

Theory of operation
-------------------
A message is a 12-byte header (``u32 request``, ``u32 flags``, ``u32 size``)
and ``size`` bytes of payload, in the machine's byte order. livemig runs on
x86 only, so the codec writes and reads little-endian explicitly.

File descriptors travel next to the bytes, as SCM_RIGHTS ancillary data of
the ``sendmsg`` that carried the message's **first byte**. The I/O layer
hands them to :meth:`MessageDecoder.feed` with the chunk they arrived with;
the decoder attaches them to the message that starts at that chunk's first
byte, and refuses descriptors that arrived in the middle of a message. The
descriptors are plain integers here: the codec never touches them, the I/O
layer owns (and closes) them.

Which messages may come when is a table per side (:data:`TRANSITIONS`, shared
by :class:`BackendSession` and :class:`FrontendSession`, since both enforce
the same protocol), plus one table of the protocol features each request
needs (:data:`REQUIRED_PROTOCOL_FEATURE`). A message whose pair is not in the
table is a :class:`~livemig.errors.VhostUserError` and poisons the session.

The back-end state transfer (``SET_DEVICE_STATE_FD`` 42 and
``CHECK_DEVICE_STATE`` 43, protocol feature 19) is the part livemig exists
for: the front-end passes one end of a pipe, the back-end answers whether it
uses it (``0x100``) or sends its own end back (``0``, one fd), the state
moves through the pipe until EOF, and ``CHECK_DEVICE_STATE`` reports whether
the back-end saved or loaded it (``0`` = success).
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final, NoReturn

from livemig.errors import LimitExceeded, StreamFormatError, VhostUserError
from livemig.limits import (
    MAX_VHOST_USER_CONFIG,
    MAX_VHOST_USER_FDS,
    MAX_VHOST_USER_MEM_REGIONS,
    MAX_VHOST_USER_PAYLOAD,
)

__all__ = [
    "HEADER_SIZE",
    "NEED_DATA",
    "TRANSITIONS",
    "U64",
    "BackendSession",
    "DeviceConfig",
    "DeviceStateDirection",
    "DeviceStatePhase",
    "DeviceStateTransfer",
    "FrontendSession",
    "LogDescription",
    "MemoryRegion",
    "MemoryTable",
    "Message",
    "MessageDecoder",
    "ProtocolFeature",
    "RawPayload",
    "Request",
    "SessionState",
    "SingleMemoryRegion",
    "VirtioFeature",
    "VringAddress",
    "VringState",
    "encode_message",
    "reply",
]


# --------------------------------------------------------------------------------------------
# Constants (hw/virtio/vhost-user.c, docs/interop/vhost-user.rst)
# --------------------------------------------------------------------------------------------


class Request(enum.IntEnum):
    """Front-end requests (``VhostUserRequest`` in hw/virtio/vhost-user.c)."""

    GET_FEATURES = 1
    SET_FEATURES = 2
    SET_OWNER = 3
    RESET_OWNER = 4
    SET_MEM_TABLE = 5
    SET_LOG_BASE = 6
    SET_LOG_FD = 7
    SET_VRING_NUM = 8
    SET_VRING_ADDR = 9
    SET_VRING_BASE = 10
    GET_VRING_BASE = 11
    SET_VRING_KICK = 12
    SET_VRING_CALL = 13
    SET_VRING_ERR = 14
    GET_PROTOCOL_FEATURES = 15
    SET_PROTOCOL_FEATURES = 16
    GET_QUEUE_NUM = 17
    SET_VRING_ENABLE = 18
    SEND_RARP = 19
    NET_SET_MTU = 20
    SET_BACKEND_REQ_FD = 21
    IOTLB_MSG = 22
    SET_VRING_ENDIAN = 23
    GET_CONFIG = 24
    SET_CONFIG = 25
    CREATE_CRYPTO_SESSION = 26
    CLOSE_CRYPTO_SESSION = 27
    POSTCOPY_ADVISE = 28
    POSTCOPY_LISTEN = 29
    POSTCOPY_END = 30
    GET_INFLIGHT_FD = 31
    SET_INFLIGHT_FD = 32
    GPU_SET_SOCKET = 33
    RESET_DEVICE = 34
    VRING_KICK = 35
    GET_MAX_MEM_SLOTS = 36
    ADD_MEM_REG = 37
    REM_MEM_REG = 38
    SET_STATUS = 39
    GET_STATUS = 40
    GET_SHARED_OBJECT = 41
    SET_DEVICE_STATE_FD = 42
    CHECK_DEVICE_STATE = 43


class ProtocolFeature(enum.IntEnum):
    """``VHOST_USER_PROTOCOL_F_*`` bit numbers (hw/virtio/vhost-user.c)."""

    MQ = 0
    LOG_SHMFD = 1
    RARP = 2
    REPLY_ACK = 3
    NET_MTU = 4
    BACKEND_REQ = 5
    CROSS_ENDIAN = 6
    CRYPTO_SESSION = 7
    PAGEFAULT = 8
    CONFIG = 9
    BACKEND_SEND_FD = 10
    HOST_NOTIFIER = 11
    INFLIGHT_SHMFD = 12
    RESET_DEVICE = 13
    INBAND_NOTIFICATIONS = 14
    CONFIGURE_MEM_SLOTS = 15
    STATUS = 16
    XEN_MMAP = 17
    SHARED_OBJECT = 18
    DEVICE_STATE = 19

    @property
    def mask(self) -> int:
        return 1 << self.value


#: Every protocol feature bit QEMU 10 knows; others are refused in SET_PROTOCOL_FEATURES.
KNOWN_PROTOCOL_FEATURES: Final = sum(1 << f for f in ProtocolFeature)


class VirtioFeature(enum.IntEnum):
    """The virtio / vhost feature bits (GET/SET_FEATURES) vhost-user itself uses."""

    VHOST_F_LOG_ALL = 26  # include/standard-headers/linux/vhost_types.h
    VHOST_USER_F_PROTOCOL_FEATURES = 30  # hw/virtio/vhost-user.c
    VIRTIO_F_VERSION_1 = 32  # include/standard-headers/linux/virtio_config.h

    @property
    def mask(self) -> int:
        return 1 << self.value


class DeviceStateDirection(enum.IntEnum):
    """``VhostDeviceStateDirection`` (include/hw/virtio/vhost-backend.h)."""

    SAVE = 0  # back-end -> front-end (migration source)
    LOAD = 1  # front-end -> back-end (migration destination)


class DeviceStatePhase(enum.IntEnum):
    """``VhostDeviceStatePhase``: only STOPPED is defined (device suspended, rings stopped)."""

    STOPPED = 0


#: Header flags: the low two bits are the version, which must be 1.
VHOST_USER_VERSION: Final = 0x1
VHOST_USER_VERSION_MASK: Final = 0x3
VHOST_USER_REPLY_MASK: Final = 0x4
VHOST_USER_NEED_REPLY_MASK: Final = 0x8
#: Flag bits defined by the protocol; a message with any other bit set is refused.
KNOWN_FLAGS: Final = VHOST_USER_VERSION_MASK | VHOST_USER_REPLY_MASK | VHOST_USER_NEED_REPLY_MASK
#: The flags of every reply (QEMU's vhost_user_read() wants exactly this).
REPLY_FLAGS: Final = VHOST_USER_VERSION | VHOST_USER_REPLY_MASK

#: SET_VRING_KICK/CALL/ERR u64: bits 0-7 are the ring index, bit 8 = no fd passed.
VHOST_USER_VRING_IDX_MASK: Final = 0xFF
VHOST_USER_VRING_NOFD_MASK: Final = 0x100
#: SET_DEVICE_STATE_FD reply: bits 0-7 are the error (0 = accepted), bit 8 = no fd returned.
DEVICE_STATE_ERROR_MASK: Final = 0xFF
DEVICE_STATE_NOFD_MASK: Final = 0x100
#: SET_VRING_ADDR flags: log the used ring (VHOST_VRING_F_LOG).
VHOST_VRING_F_LOG: Final = 0x1

_HEADER = struct.Struct("<III")
HEADER_SIZE: Final = _HEADER.size
_U64 = struct.Struct("<Q")
_VRING_STATE = struct.Struct("<II")
_VRING_ADDR = struct.Struct("<IIQQQQ")
_REGION = struct.Struct("<QQQQ")
_MEM_HEADER = struct.Struct("<II")  # nregions, padding
_LOG = struct.Struct("<QQ")
_CONFIG_HEADER = struct.Struct("<III")  # offset, size, flags
_DEVICE_STATE = struct.Struct("<II")


# --------------------------------------------------------------------------------------------
# Payloads
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class U64:
    """A single 64-bit integer (features, ring index + flags, replies)."""

    value: int


@dataclass(frozen=True, slots=True)
class VringState:
    """``struct vhost_vring_state``: ring index and a number (size, base, enable)."""

    index: int
    num: int


@dataclass(frozen=True, slots=True)
class VringAddress:
    """``struct vhost_vring_addr`` (40 bytes; the ``size`` column in vhost-user.rst is not on
    the wire)."""

    index: int
    flags: int
    desc: int
    used: int
    avail: int
    log: int


@dataclass(frozen=True, slots=True)
class MemoryRegion:
    """``VhostUserMemoryRegion``: guest-physical address, size, QEMU's address, fd offset."""

    guest_addr: int
    size: int
    user_addr: int
    mmap_offset: int


@dataclass(frozen=True, slots=True)
class MemoryTable:
    """SET_MEM_TABLE: up to 8 regions, one fd each in the same order."""

    regions: tuple[MemoryRegion, ...]


@dataclass(frozen=True, slots=True)
class SingleMemoryRegion:
    """ADD_MEM_REG / REM_MEM_REG: one region after 8 bytes of padding."""

    region: MemoryRegion


@dataclass(frozen=True, slots=True)
class LogDescription:
    """SET_LOG_BASE with LOG_SHMFD: size of the dirty log and its offset in the fd."""

    size: int
    offset: int


@dataclass(frozen=True, slots=True)
class DeviceConfig:
    """GET_CONFIG / SET_CONFIG: an access to the virtio config space."""

    offset: int
    flags: int
    data: bytes


@dataclass(frozen=True, slots=True)
class DeviceStateTransfer:
    """SET_DEVICE_STATE_FD: direction and phase (values checked by the session, so that a
    back-end can refuse an unknown one with a reply instead of dropping the connection)."""

    direction: int
    phase: int


@dataclass(frozen=True, slots=True)
class RawPayload:
    """The payload of a request livemig parses no further (IOTLB, crypto, inflight...)."""

    data: bytes


Payload = (None | U64 | VringState | VringAddress | MemoryTable | SingleMemoryRegion
           | LogDescription | DeviceConfig | DeviceStateTransfer | RawPayload)


@dataclass(frozen=True, slots=True)
class Message:
    """One vhost-user message. ``fds`` are the descriptors that came with it (never encoded:
    the I/O layer sends them as SCM_RIGHTS with the first byte)."""

    request: Request
    flags: int = VHOST_USER_VERSION
    payload: Payload = None
    fds: tuple[int, ...] = ()

    @property
    def is_reply(self) -> bool:
        return bool(self.flags & VHOST_USER_REPLY_MASK)

    @property
    def need_reply(self) -> bool:
        return bool(self.flags & VHOST_USER_NEED_REPLY_MASK)

    def describe(self) -> str:
        kind = "reply to " if self.is_reply else ""
        return f"{kind}{self.request.name} ({int(self.request)})"


def reply(request: Request, payload: Payload, fds: tuple[int, ...] = ()) -> Message:
    """A back-end reply (flags exactly version | reply, as QEMU requires)."""
    return Message(request, REPLY_FLAGS, payload, fds)


class _Kind(enum.Enum):
    NONE = "none"
    U64 = "u64"
    STATE = "vring state"
    ADDR = "vring address"
    MEM_TABLE = "memory table"
    REGION = "single memory region"
    LOG = "log description"
    CONFIG = "device config"
    DEVICE_STATE = "device state transfer"
    RAW = "raw"


_FIXED_SIZE: dict[_Kind, int] = {
    _Kind.NONE: 0,
    _Kind.U64: _U64.size,
    _Kind.STATE: _VRING_STATE.size,
    _Kind.ADDR: _VRING_ADDR.size,
    _Kind.REGION: 8 + _REGION.size,
    _Kind.LOG: _LOG.size,
    _Kind.DEVICE_STATE: _DEVICE_STATE.size,
}

R = Request

#: What a front-end request carries (vhost-user.rst "Front-end message types").
REQUEST_PAYLOAD: Final[dict[Request, _Kind]] = {
    **dict.fromkeys((
        R.GET_FEATURES, R.GET_PROTOCOL_FEATURES, R.SET_OWNER, R.RESET_OWNER, R.GET_QUEUE_NUM,
        R.GET_MAX_MEM_SLOTS, R.CHECK_DEVICE_STATE, R.GET_STATUS, R.RESET_DEVICE,
        R.SET_BACKEND_REQ_FD, R.SET_LOG_FD, R.POSTCOPY_ADVISE, R.POSTCOPY_LISTEN,
        R.POSTCOPY_END, R.GPU_SET_SOCKET), _Kind.NONE),
    **dict.fromkeys((
        R.SET_FEATURES, R.SET_PROTOCOL_FEATURES, R.SET_VRING_KICK, R.SET_VRING_CALL,
        R.SET_VRING_ERR, R.SET_STATUS, R.SEND_RARP, R.NET_SET_MTU, R.CLOSE_CRYPTO_SESSION),
        _Kind.U64),
    **dict.fromkeys((
        R.SET_VRING_NUM, R.SET_VRING_BASE, R.GET_VRING_BASE, R.SET_VRING_ENABLE,
        R.SET_VRING_ENDIAN, R.VRING_KICK), _Kind.STATE),
    R.SET_VRING_ADDR: _Kind.ADDR,
    R.SET_MEM_TABLE: _Kind.MEM_TABLE,
    R.ADD_MEM_REG: _Kind.REGION,
    R.REM_MEM_REG: _Kind.REGION,
    R.SET_LOG_BASE: _Kind.LOG,
    R.GET_CONFIG: _Kind.CONFIG,
    R.SET_CONFIG: _Kind.CONFIG,
    R.SET_DEVICE_STATE_FD: _Kind.DEVICE_STATE,
    **dict.fromkeys((
        R.IOTLB_MSG, R.CREATE_CRYPTO_SESSION, R.GET_INFLIGHT_FD, R.SET_INFLIGHT_FD,
        R.GET_SHARED_OBJECT), _Kind.RAW),
}

#: What a back-end reply carries; a request not named here is answered (REPLY_ACK, or the
#: SET_LOG_BASE acknowledgement) with a u64.
REPLY_PAYLOAD: Final[dict[Request, _Kind]] = {
    R.GET_VRING_BASE: _Kind.STATE,
    R.GET_CONFIG: _Kind.CONFIG,
    R.GET_INFLIGHT_FD: _Kind.RAW,
    R.CREATE_CRYPTO_SESSION: _Kind.RAW,
    R.SET_MEM_TABLE: _Kind.RAW,  # postcopy only
    R.ADD_MEM_REG: _Kind.RAW,  # postcopy only; otherwise a u64 REPLY_ACK (size 8)
}

#: Requests whose reply always comes, REPLY_ACK or not (SET_LOG_BASE: with LOG_SHMFD).
EXPLICIT_REPLY: Final = frozenset({
    R.GET_FEATURES, R.GET_PROTOCOL_FEATURES, R.GET_VRING_BASE, R.GET_QUEUE_NUM,
    R.GET_MAX_MEM_SLOTS, R.GET_CONFIG, R.GET_STATUS, R.SET_DEVICE_STATE_FD,
    R.CHECK_DEVICE_STATE, R.IOTLB_MSG, R.POSTCOPY_ADVISE, R.POSTCOPY_END, R.GET_INFLIGHT_FD,
    R.CREATE_CRYPTO_SESSION, R.GET_SHARED_OBJECT,
})


def _vring_fd_count(payload: Payload) -> tuple[int, int]:
    if isinstance(payload, U64) and payload.value & VHOST_USER_VRING_NOFD_MASK:
        return (0, 0)
    return (1, 1)


def fd_range(msg: Message) -> tuple[int, int]:
    """How many descriptors ``msg`` may carry (inclusive bounds).

    SET_DEVICE_STATE_FD may arrive without its fd as far as the codec is concerned: the
    session refuses it with a reply, which a front-end can act on.
    """
    r = msg.request
    if msg.is_reply:
        if r == R.SET_DEVICE_STATE_FD and isinstance(msg.payload, U64):
            v = msg.payload.value
            if v & (DEVICE_STATE_ERROR_MASK | DEVICE_STATE_NOFD_MASK):
                return (0, 0)
            return (1, 1)
        if r in (R.GET_INFLIGHT_FD, R.POSTCOPY_ADVISE):
            return (1, 1)
        return (0, 0)
    if r in (R.SET_VRING_KICK, R.SET_VRING_CALL, R.SET_VRING_ERR):
        return _vring_fd_count(msg.payload)
    if r == R.SET_MEM_TABLE and isinstance(msg.payload, MemoryTable):
        n = len(msg.payload.regions)
        return (n, n)
    if r in (R.ADD_MEM_REG, R.SET_LOG_BASE, R.SET_LOG_FD, R.SET_BACKEND_REQ_FD,
             R.SET_INFLIGHT_FD, R.GPU_SET_SOCKET):
        return (1, 1)
    if r in (R.REM_MEM_REG, R.SET_DEVICE_STATE_FD):
        return (0, 1)  # REM_MEM_REG: vhost-user.rst lets old front-ends pass one
    return (0, 0)


# --------------------------------------------------------------------------------------------
# Encoding
# --------------------------------------------------------------------------------------------


def _check_u32(v: int, what: str) -> None:
    if not 0 <= v <= 0xFFFFFFFF:
        raise ValueError(f"{what} {v} does not fit in a u32")


def _check_u64(v: int, what: str) -> None:
    if not 0 <= v <= 0xFFFFFFFFFFFFFFFF:
        raise ValueError(f"{what} {v} does not fit in a u64")


def encode_payload(payload: Payload) -> bytes:
    """The payload bytes of one message (no header)."""
    if payload is None:
        return b""
    if isinstance(payload, U64):
        _check_u64(payload.value, "u64")
        return _U64.pack(payload.value)
    if isinstance(payload, VringState):
        return _VRING_STATE.pack(payload.index, payload.num)
    if isinstance(payload, VringAddress):
        return _VRING_ADDR.pack(payload.index, payload.flags, payload.desc, payload.used,
                                payload.avail, payload.log)
    if isinstance(payload, MemoryTable):
        if len(payload.regions) > MAX_VHOST_USER_MEM_REGIONS:
            raise ValueError(f"{len(payload.regions)} memory regions; at most "
                             f"{MAX_VHOST_USER_MEM_REGIONS} fit in SET_MEM_TABLE")
        return _MEM_HEADER.pack(len(payload.regions), 0) + b"".join(
            _REGION.pack(r.guest_addr, r.size, r.user_addr, r.mmap_offset)
            for r in payload.regions)
    if isinstance(payload, SingleMemoryRegion):
        r = payload.region
        return _U64.pack(0) + _REGION.pack(r.guest_addr, r.size, r.user_addr, r.mmap_offset)
    if isinstance(payload, LogDescription):
        return _LOG.pack(payload.size, payload.offset)
    if isinstance(payload, DeviceConfig):
        if len(payload.data) > MAX_VHOST_USER_CONFIG:
            raise ValueError(f"config access of {len(payload.data)} bytes; at most "
                             f"{MAX_VHOST_USER_CONFIG}")
        return _CONFIG_HEADER.pack(payload.offset, len(payload.data), payload.flags) + \
            payload.data
    if isinstance(payload, DeviceStateTransfer):
        return _DEVICE_STATE.pack(payload.direction, payload.phase)
    if isinstance(payload, RawPayload):
        return bytes(payload.data)
    raise TypeError(f"not a vhost-user payload: {payload!r}")


def encode_message(msg: Message) -> bytes:
    """Header and payload of ``msg``; its ``fds`` go beside it as SCM_RIGHTS."""
    body = encode_payload(msg.payload)
    if len(body) > MAX_VHOST_USER_PAYLOAD:
        raise ValueError(f"{msg.describe()}: payload of {len(body)} bytes exceeds "
                         f"{MAX_VHOST_USER_PAYLOAD}")
    _check_u32(msg.flags, "flags")
    return _HEADER.pack(int(msg.request), msg.flags, len(body)) + body


# --------------------------------------------------------------------------------------------
# Decoding
# --------------------------------------------------------------------------------------------


class _NeedData(enum.Enum):
    NEED_DATA = "need data"


#: :meth:`MessageDecoder.next_message` returns this when the buffer ends inside a message.
NEED_DATA: Final = _NeedData.NEED_DATA


def _decode_payload(kind: _Kind, body: bytes, request: Request, at: int,
                    where: str) -> Payload:
    def bad(text: str) -> VhostUserError:
        return VhostUserError(f"{request.name}: {text}", offset=at, where=where,
                              raw=body[:16])

    fixed = _FIXED_SIZE.get(kind)
    if fixed is not None and len(body) != fixed:
        raise bad(f"{kind.value} payload of {len(body)} bytes, expected {fixed}")
    if kind is _Kind.NONE:
        return None
    if kind is _Kind.U64:
        return U64(_U64.unpack(body)[0])
    if kind is _Kind.STATE:
        return VringState(*_VRING_STATE.unpack(body))
    if kind is _Kind.ADDR:
        return VringAddress(*_VRING_ADDR.unpack(body))
    if kind is _Kind.REGION:
        return SingleMemoryRegion(MemoryRegion(*_REGION.unpack_from(body, 8)))
    if kind is _Kind.LOG:
        return LogDescription(*_LOG.unpack(body))
    if kind is _Kind.DEVICE_STATE:
        return DeviceStateTransfer(*_DEVICE_STATE.unpack(body))
    if kind is _Kind.MEM_TABLE:
        if len(body) < _MEM_HEADER.size:
            raise bad(f"memory table of {len(body)} bytes has no region count")
        n, _padding = _MEM_HEADER.unpack_from(body)
        if n > MAX_VHOST_USER_MEM_REGIONS:
            raise LimitExceeded(f"{request.name}: {n} memory regions exceeds the limit "
                                f"{MAX_VHOST_USER_MEM_REGIONS}", offset=at, where=where,
                                raw=body[:16])
        if len(body) != _MEM_HEADER.size + n * _REGION.size:
            raise bad(f"memory table of {len(body)} bytes for {n} regions")
        return MemoryTable(tuple(
            MemoryRegion(*_REGION.unpack_from(body, _MEM_HEADER.size + i * _REGION.size))
            for i in range(n)))
    if kind is _Kind.CONFIG:
        if len(body) < _CONFIG_HEADER.size:
            raise bad(f"config access of {len(body)} bytes has no header")
        offset, size, flags = _CONFIG_HEADER.unpack_from(body)
        if size > MAX_VHOST_USER_CONFIG:
            raise LimitExceeded(f"{request.name}: config access of {size} bytes exceeds "
                                f"the limit {MAX_VHOST_USER_CONFIG}", offset=at, where=where,
                                raw=body[:16])
        if len(body) != _CONFIG_HEADER.size + size:
            raise bad(f"config access says {size} bytes, payload has "
                      f"{len(body) - _CONFIG_HEADER.size}")
        return DeviceConfig(offset, flags, bytes(body[_CONFIG_HEADER.size:]))
    return RawPayload(bytes(body))


class MessageDecoder:
    """Parses messages from bytes fed in any pieces, with the fds that came with each piece.

    ``replies=False`` decodes a front-end's requests (a back-end's view), ``replies=True`` a
    back-end's replies (a front-end's view). After an error the decoder is poisoned: every
    later call raises the same error. Descriptors not yet handed out in a message stay in
    the decoder until :meth:`take_fds`, so that the I/O layer can close them.
    """

    def __init__(self, *, replies: bool, where: str = "vhost-user") -> None:
        self.replies = replies
        self.where = where
        self._buf = bytearray()
        self._base = 0  # stream offset of _buf[0]
        self._fed = 0  # stream offset just past the last byte fed
        self._fds: list[tuple[int, list[int]]] = []  # (stream offset of the chunk, fds)
        self._error: StreamFormatError | None = None

    @property
    def offset(self) -> int:
        """Stream offset of the next message's first byte."""
        return self._base

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def wanted(self) -> int:
        """How many more bytes complete the message in progress (the header first).

        An I/O layer that never reads more than this keeps every message's descriptors
        on the read that carries its first byte.
        """
        if len(self._buf) < HEADER_SIZE:
            return HEADER_SIZE - len(self._buf)
        size = int(struct.unpack_from("<I", self._buf, 8)[0])
        return max(HEADER_SIZE + min(size, MAX_VHOST_USER_PAYLOAD + 1) - len(self._buf), 1)

    def feed(self, data: bytes | bytearray | memoryview, fds: Sequence[int] = ()) -> None:
        """Add bytes received from the peer; ``fds`` arrived with ``data[0]``."""
        if self._error is not None:
            raise self._error
        if fds:
            if len(fds) > MAX_VHOST_USER_FDS:
                self._fail(LimitExceeded(
                    f"{len(fds)} file descriptors in one message exceeds the limit "
                    f"{MAX_VHOST_USER_FDS}", offset=self._fed, where=self.where))
            self._fds.append((self._fed, list(fds)))
        self._buf += data
        self._fed += len(data)

    def take_fds(self) -> list[int]:
        """Every descriptor received but not handed out in a message (the caller closes
        them: after an error, or when the connection ends)."""
        out = [fd for _, fds in self._fds for fd in fds]
        self._fds.clear()
        return out

    def _fail(self, err: StreamFormatError) -> NoReturn:
        if err.where is None:
            err.where = self.where
        self._error = err
        raise err

    def next_message(self) -> Message | _NeedData:
        """The next whole message, or :data:`NEED_DATA` (the buffer is left as it was)."""
        if self._error is not None:
            raise self._error
        if len(self._buf) < HEADER_SIZE:
            self._check_fds_boundary(self._base + len(self._buf))
            return NEED_DATA
        at = self._base
        request, flags, size = _HEADER.unpack_from(self._buf)
        raw = bytes(self._buf[:HEADER_SIZE])
        if size > MAX_VHOST_USER_PAYLOAD:
            self._fail(LimitExceeded(f"message {request} says {size} payload bytes, above "
                                     f"the limit {MAX_VHOST_USER_PAYLOAD}", offset=at,
                                     where=self.where, raw=raw))
        try:
            req = Request(request)
        except ValueError:
            self._fail(VhostUserError(f"unknown request {request}", offset=at,
                                      where=self.where, raw=raw))
        if flags & ~KNOWN_FLAGS:
            self._fail(VhostUserError(f"{req.name}: unknown flag bits {flags & ~KNOWN_FLAGS:#x}"
                                      f" in flags {flags:#x}", offset=at, where=self.where,
                                      raw=raw))
        if flags & VHOST_USER_VERSION_MASK != VHOST_USER_VERSION:
            self._fail(VhostUserError(f"{req.name}: protocol version "
                                      f"{flags & VHOST_USER_VERSION_MASK}, expected 1",
                                      offset=at, where=self.where, raw=raw))
        is_reply = bool(flags & VHOST_USER_REPLY_MASK)
        if is_reply != self.replies:
            what = "a reply" if is_reply else "a request"
            self._fail(VhostUserError(f"{req.name}: {what} where the "
                                      f"{'back-end' if self.replies else 'front-end'} speaks"
                                      f" (flags {flags:#x})", offset=at, where=self.where,
                                      raw=raw))
        end = HEADER_SIZE + size
        if len(self._buf) < end:
            self._check_fds_boundary(self._base + len(self._buf))
            return NEED_DATA
        self._check_fds_boundary(at + end)
        body = bytes(self._buf[HEADER_SIZE:end])
        if self.replies:
            kind = REPLY_PAYLOAD.get(req, _Kind.U64)
            if req == R.GET_CONFIG and size == 0:
                kind = _Kind.NONE  # an empty GET_CONFIG reply is the back-end's error
            if req in (R.SET_MEM_TABLE, R.ADD_MEM_REG) and size == _U64.size:
                kind = _Kind.U64
        else:
            kind = REQUEST_PAYLOAD[req]
        try:
            payload = _decode_payload(kind, body, req, at, self.where)
        except VhostUserError as e:
            self._fail(e)
        fds: list[int] = []
        if self._fds and self._fds[0][0] == at:
            fds = self._fds.pop(0)[1]
        msg = Message(req, flags, payload, tuple(fds))
        lo, hi = fd_range(msg)
        if not lo <= len(fds) <= hi:
            self._fds.insert(0, (at, fds))  # still ours to report, the caller closes them
            want = str(lo) if lo == hi else f"{lo} to {hi}"
            self._fail(VhostUserError(f"{msg.describe()} came with {len(fds)} file "
                                      f"descriptors, expected {want}", offset=at,
                                      where=self.where, raw=raw))
        del self._buf[:end]
        self._base += end
        return msg

    def _check_fds_boundary(self, upto: int) -> None:
        """Refuse descriptors that arrived with a byte inside a message (before ``upto``)."""
        for off, _ in self._fds:
            if self._base < off < upto:
                self._fail(VhostUserError(
                    f"file descriptors arrived {off - self._base} bytes into a message; "
                    "they must come with its first byte", offset=self._base,
                    where=self.where))


# --------------------------------------------------------------------------------------------
# Sessions: which request may come when
# --------------------------------------------------------------------------------------------


class SessionState(enum.Enum):
    """The run state of one vhost-user connection (the same on both sides)."""

    AWAIT_OWNER = "awaiting SET_OWNER"  # feature negotiation only
    READY = "owned"  # set-up, rings, memory, logging; a state transfer may start
    TRANSFER = "state transfer"  # SET_DEVICE_STATE_FD accepted; only CHECK_DEVICE_STATE
    CLOSED = "closed"


S = SessionState

#: Before SET_OWNER: what QEMU's vhost_user_backend_init() sends (features, protocol
#: features, queue and slot counts).
_NEGOTIATION: Final = frozenset({
    R.GET_FEATURES, R.GET_PROTOCOL_FEATURES, R.SET_PROTOCOL_FEATURES, R.GET_QUEUE_NUM,
    R.GET_MAX_MEM_SLOTS,
})
#: After SET_OWNER: device set-up, rings, memory table, dirty logging, config, status.
_OWNED: Final = frozenset({
    R.SET_FEATURES, R.SET_MEM_TABLE, R.ADD_MEM_REG, R.REM_MEM_REG, R.SET_LOG_BASE,
    R.SET_LOG_FD, R.SET_VRING_NUM, R.SET_VRING_ADDR, R.SET_VRING_BASE, R.GET_VRING_BASE,
    R.SET_VRING_KICK, R.SET_VRING_CALL, R.SET_VRING_ERR, R.SET_VRING_ENABLE,
    R.SET_BACKEND_REQ_FD, R.SET_STATUS, R.GET_STATUS, R.GET_CONFIG, R.SET_CONFIG,
    R.RESET_DEVICE, R.SET_VRING_ENDIAN,
})

#: ``(state, request) -> next state``; a pair not in the table is a protocol error.
TRANSITIONS: Final[dict[tuple[SessionState, Request], SessionState]] = {
    **{(S.AWAIT_OWNER, r): S.AWAIT_OWNER for r in _NEGOTIATION},
    (S.AWAIT_OWNER, R.SET_OWNER): S.READY,
    **{(S.READY, r): S.READY for r in _NEGOTIATION | _OWNED},
    (S.READY, R.RESET_OWNER): S.AWAIT_OWNER,
    (S.READY, R.SET_DEVICE_STATE_FD): S.TRANSFER,
    (S.TRANSFER, R.CHECK_DEVICE_STATE): S.READY,
}

#: The protocol feature a request needs negotiated (vhost-user.rst, per message).
REQUIRED_PROTOCOL_FEATURE: Final[dict[Request, ProtocolFeature]] = {
    R.GET_QUEUE_NUM: ProtocolFeature.MQ,
    R.SET_LOG_BASE: ProtocolFeature.LOG_SHMFD,  # livemig takes the log as a shared fd only
    R.SET_BACKEND_REQ_FD: ProtocolFeature.BACKEND_REQ,
    R.SET_VRING_ENDIAN: ProtocolFeature.CROSS_ENDIAN,
    R.GET_CONFIG: ProtocolFeature.CONFIG,
    R.SET_CONFIG: ProtocolFeature.CONFIG,
    R.RESET_DEVICE: ProtocolFeature.RESET_DEVICE,
    R.GET_MAX_MEM_SLOTS: ProtocolFeature.CONFIGURE_MEM_SLOTS,
    R.ADD_MEM_REG: ProtocolFeature.CONFIGURE_MEM_SLOTS,
    R.REM_MEM_REG: ProtocolFeature.CONFIGURE_MEM_SLOTS,
    R.SET_STATUS: ProtocolFeature.STATUS,
    R.GET_STATUS: ProtocolFeature.STATUS,
    R.SET_DEVICE_STATE_FD: ProtocolFeature.DEVICE_STATE,
    R.CHECK_DEVICE_STATE: ProtocolFeature.DEVICE_STATE,
}

#: Requests that are legal only if the back-end offered VHOST_USER_F_PROTOCOL_FEATURES.
NEEDS_PROTOCOL_FEATURES_BIT: Final = frozenset({
    R.GET_PROTOCOL_FEATURES, R.SET_PROTOCOL_FEATURES, R.SET_VRING_ENABLE,
})


class _Session:
    """What both sides track: the run state, the offered and negotiated features."""

    def __init__(self, where: str) -> None:
        self.where = where
        self.state = S.AWAIT_OWNER
        #: virtio features the back-end offers (GET_FEATURES) and the front-end acked.
        self.offered_features: int | None = None
        self.acked_features = 0
        #: protocol features the back-end offers and those SET_PROTOCOL_FEATURES enabled.
        self.offered_protocol_features: int | None = None
        self.protocol_features = 0
        self.transfer: DeviceStateTransfer | None = None
        self._error: VhostUserError | None = None

    def has(self, feature: ProtocolFeature) -> bool:
        """True if ``feature`` was negotiated (SET_PROTOCOL_FEATURES)."""
        return bool(self.protocol_features & feature.mask)

    def _fail(self, text: str, *, offset: int | None = None) -> NoReturn:
        err = VhostUserError(f"{text} (session {self.state.value})", offset=offset,
                             where=self.where)
        self._error = err
        self.state = S.CLOSED
        raise err

    def _check(self, msg: Message, offset: int | None) -> SessionState:
        """Refuse ``msg`` if the table or the features do not allow it; the next state."""
        if self._error is not None:
            raise self._error
        nxt = TRANSITIONS.get((self.state, msg.request))
        if nxt is None:
            self._fail(f"{msg.describe()} is not allowed here", offset=offset)
        if msg.request in NEEDS_PROTOCOL_FEATURES_BIT and not (
                (self.offered_features or 0) & VirtioFeature.VHOST_USER_F_PROTOCOL_FEATURES.mask):
            self._fail(f"{msg.describe()} needs VHOST_USER_F_PROTOCOL_FEATURES (bit 30) "
                       "in GET_FEATURES", offset=offset)
        need = REQUIRED_PROTOCOL_FEATURE.get(msg.request)
        if need is not None and not self.has(need):
            self._fail(f"{msg.describe()} needs protocol feature {need.name} "
                       f"(bit {need.value}), which was not negotiated", offset=offset)
        if msg.need_reply and not self.has(ProtocolFeature.REPLY_ACK) \
                and msg.request != R.SET_PROTOCOL_FEATURES:
            self._fail(f"{msg.describe()} asks for a reply (NEED_REPLY) without "
                       "REPLY_ACK negotiated", offset=offset)
        return nxt

    def reply_expected(self, msg: Message) -> bool:
        """True if the back-end must answer ``msg`` (its own reply, REPLY_ACK, or the
        SET_LOG_BASE acknowledgement QEMU waits for when LOG_SHMFD is on)."""
        if msg.request in EXPLICIT_REPLY:
            return True
        if msg.request == R.SET_LOG_BASE and self.has(ProtocolFeature.LOG_SHMFD):
            return True
        return msg.need_reply and (self.has(ProtocolFeature.REPLY_ACK) or (
            msg.request == R.SET_PROTOCOL_FEATURES
            and isinstance(msg.payload, U64)
            and bool(msg.payload.value & ProtocolFeature.REPLY_ACK.mask)))

    def _apply_request(self, msg: Message, offset: int | None) -> str | None:
        """Record what a request negotiates; a reason string refuses a transfer."""
        r, p = msg.request, msg.payload
        if r == R.SET_PROTOCOL_FEATURES and isinstance(p, U64):
            offered = self.offered_protocol_features
            if offered is None:
                self._fail("SET_PROTOCOL_FEATURES before GET_PROTOCOL_FEATURES", offset=offset)
            if p.value & ~offered:
                self._fail(f"SET_PROTOCOL_FEATURES {p.value:#x} enables bits "
                           f"{p.value & ~offered:#x} that the back-end did not offer "
                           f"({offered:#x})", offset=offset)
            self.protocol_features = p.value
        elif r == R.SET_FEATURES and isinstance(p, U64):
            offered = self.offered_features
            if offered is None:
                self._fail("SET_FEATURES before GET_FEATURES", offset=offset)
            if p.value & ~offered:
                self._fail(f"SET_FEATURES {p.value:#x} acks bits {p.value & ~offered:#x} "
                           f"that the back-end did not offer ({offered:#x})", offset=offset)
            self.acked_features = p.value
        elif r == R.SET_DEVICE_STATE_FD and isinstance(p, DeviceStateTransfer):
            if p.direction not in {d.value for d in DeviceStateDirection}:
                return f"unknown transfer direction {p.direction}"
            if p.phase not in {ph.value for ph in DeviceStatePhase}:
                return f"unknown transfer phase {p.phase}"
            if len(msg.fds) != 1:
                return "no pipe file descriptor came with the request"
            self.transfer = p
        elif r == R.RESET_OWNER:
            self.acked_features = 0
        return None


class BackendSession(_Session):
    """The back-end's view: validates each request from the front-end.

    :meth:`receive` raises :class:`~livemig.errors.VhostUserError` (and poisons the session)
    for a request out of order or without its feature; it returns a reason string when a
    ``SET_DEVICE_STATE_FD`` is well-formed but cannot be accepted (unknown direction or
    phase, no fd), which the back-end answers with an error reply and carries on.
    """

    def __init__(self, features: int, protocol_features: int,
                 where: str = "vhost-user front-end") -> None:
        super().__init__(where)
        if protocol_features & ~KNOWN_PROTOCOL_FEATURES:
            raise ValueError(f"unknown protocol feature bits "
                             f"{protocol_features & ~KNOWN_PROTOCOL_FEATURES:#x}")
        self.offered_features = features
        self.offered_protocol_features = protocol_features

    def receive(self, msg: Message, offset: int | None = None) -> str | None:
        nxt = self._check(msg, offset)
        refusal = self._apply_request(msg, offset)
        if refusal is None:
            self.state = nxt
            if msg.request == R.CHECK_DEVICE_STATE:
                self.transfer = None
        return refusal

    def close(self) -> None:
        self.state = S.CLOSED


class FrontendSession(_Session):
    """The front-end's view: checks what it sends against the table and every reply
    against the request it answers (request id, flags exactly 0x5, payload shape)."""

    def __init__(self, where: str = "vhost-user back-end") -> None:
        super().__init__(where)
        self._pending: Message | None = None

    @property
    def awaiting(self) -> Message | None:
        """The request whose reply has not come yet."""
        return self._pending

    def send(self, msg: Message) -> bytes:
        """Validate and encode ``msg``; remember it if a reply is due."""
        if self._pending is not None:
            raise VhostUserError(f"{msg.describe()} sent while the reply to "
                                 f"{self._pending.describe()} is outstanding", where=self.where)
        nxt = self._check(msg, None)
        refusal = self._apply_request(msg, None)
        if refusal is not None:
            raise ValueError(refusal)
        data = encode_message(msg)
        if self.reply_expected(msg):
            self._pending = msg
            if msg.request != R.SET_DEVICE_STATE_FD:
                self.state = nxt
        else:
            self.state = nxt
        return data

    def receive_reply(self, msg: Message, offset: int | None = None) -> Message:
        """Check a reply; returns it. A SET_DEVICE_STATE_FD refusal leaves the session READY."""
        if self._error is not None:
            raise self._error
        req = self._pending
        if req is None:
            self._fail(f"unexpected {msg.describe()}: no request is waiting for a reply",
                       offset=offset)
        if msg.request != req.request:
            self._fail(f"{msg.describe()} while waiting for the reply to {req.describe()}",
                       offset=offset)
        if msg.flags != REPLY_FLAGS:
            self._fail(f"{msg.describe()} has flags {msg.flags:#x}, expected "
                       f"{REPLY_FLAGS:#x}", offset=offset)
        self._pending = None
        p = msg.payload
        if req.request == R.GET_FEATURES and isinstance(p, U64):
            self.offered_features = p.value
        elif req.request == R.GET_PROTOCOL_FEATURES and isinstance(p, U64):
            self.offered_protocol_features = p.value
        elif req.request == R.SET_DEVICE_STATE_FD and isinstance(p, U64):
            if p.value & DEVICE_STATE_ERROR_MASK:
                self.transfer = None  # refused: no transfer, still READY
            elif p.value & ~(DEVICE_STATE_ERROR_MASK | DEVICE_STATE_NOFD_MASK):
                self._fail(f"SET_DEVICE_STATE_FD reply {p.value:#x} has unknown bits",
                           offset=offset)
            else:
                self.state = S.TRANSFER
        elif req.request == R.CHECK_DEVICE_STATE:
            self.transfer = None
        return msg

    def close(self) -> None:
        self.state = S.CLOSED
