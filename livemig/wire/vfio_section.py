"""VFIO device data in the main migration stream (QEMU ``hw/vfio/migration.c``).

Theory of operation
-------------------
A VFIO device registers one live handler (idstr ``<qdev path>/vfio``, version 1).
Its section bodies are sequences of be64 markers (:class:`VfioMigFlag`), some with
data after them (``spec/device-state.md`` (b)):

=========  ===========================================================================
START      ``DEV_SETUP_STATE END_OF_STATE``
PART       [``DEV_DATA_STATE be64:n <n bytes>``] then ``DEV_INIT_DATA_SENT`` (once, with
           switchover-ack, when the initial precopy data is out) or ``END_OF_STATE``
END        (``DEV_DATA_STATE be64:n <n bytes>``)* ``END_OF_STATE``; with multifd
           transfer just ``END_OF_STATE``
FULL       ``DEV_CONFIG_STATE <config> END_OF_STATE``; with multifd transfer just
           ``END_OF_STATE``
=========  ===========================================================================

The loader accepts the same grammar whatever the section type, as QEMU's
``vfio_load_state()`` does: read tags until ``END_OF_STATE``; ``DEV_SETUP_STATE``
must be followed by ``END_OF_STATE``; ``DEV_DATA_STATE`` is followed by a size and
that many bytes for the device's data fd (any number of them, any size including
0 as 7.2 writes); ``DEV_INIT_DATA_SENT`` ends the body in place of ``END_OF_STATE``;
``DEV_CONFIG_STATE`` is followed by the config state and ``END_OF_STATE`` and ends
the body. Anything else is an error, and so is ``DEV_CONFIG_STATE`` when the
device does its final transfer over multifd (QEMU 10.0 refuses it too).

:class:`VfioSectionDecoder` is sans-I/O like the main-stream decoder: the caller
hands it ``buf[start:end]`` and gets events plus the position it reached. Device
data never passes through it: :class:`VfioData` events are memoryviews of the
caller's buffer, to be written to the data fd before the buffer is reused. A
marker or size cut by the end of the buffer is left unconsumed.

The config state has no length on the wire (QEMU's config loader knows its
vmstate). The decoder takes it either as ``config_size`` bytes, when the device
model knows its size, or as everything up to the closing ``END_OF_STATE`` of a
body whose end the caller knows (``final=True``; the main stream splits FULL
sections with the JSON description, and a multifd config packet is one buffer).

Errors are :class:`~livemig.errors.StreamFormatError` with the stream offset of
the offending marker; after one the decoder is poisoned.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Iterable
from dataclasses import dataclass

from livemig.errors import ConfigError, LimitExceeded, StreamFormatError, TruncatedStream

__all__ = [
    "MAX_VFIO_CONFIG_STATE",
    "MAX_VFIO_DATA_CHUNK",
    "VFIO_SECTION_VERSION",
    "VfioConfig",
    "VfioData",
    "VfioDataHeader",
    "VfioEndOfState",
    "VfioEvent",
    "VfioInitDataSent",
    "VfioMigFlag",
    "VfioSectionDecoder",
    "VfioSetup",
    "decode_config_blob",
    "encode_complete",
    "encode_config",
    "encode_config_blob",
    "encode_data",
    "encode_end_of_state",
    "encode_iterate",
    "encode_setup",
    "iterable_body_length",
]

Buffer = bytes | bytearray | memoryview


class VfioMigFlag(enum.IntEnum):
    """``VFIO_MIG_FLAG_*`` (QEMU 10.0 ``include/hw/vfio/vfio-common.h``; 7.2 ``migration.c``)."""

    END_OF_STATE = 0xFFFFFFFFEF100001
    DEV_CONFIG_STATE = 0xFFFFFFFFEF100002
    DEV_SETUP_STATE = 0xFFFFFFFFEF100003
    DEV_DATA_STATE = 0xFFFFFFFFEF100004
    DEV_INIT_DATA_SENT = 0xFFFFFFFFEF100005  # 8.1+ (switchover-ack)
    #: Only in the 2024 multifd RFC; no released QEMU writes it, so it is refused.
    DEV_DATA_STATE_COMPLETE = 0xFFFFFFFFEF100006


#: The version QEMU registers the VFIO handler with (``register_savevm_live(..., 1, ...)``).
VFIO_SECTION_VERSION = 1

#: One ``DEV_DATA_STATE`` chunk. QEMU 10.0 writes one read of the data fd, at most
#: its data buffer (1 MiB by default); 7.2's v1 protocol wrote one migration-region
#: window (tens of MiB at most). The bytes stream to the device without being
#: buffered, so this only has to catch garbage lengths: 256 MiB does.
MAX_VFIO_DATA_CHUNK = 256 << 20

#: The config state (PCI config space, MSI-X table and the like in QEMU; a few
#: hundred bytes to a few KiB). It is held in memory whole, so it is bounded
#: tightly: 16 MiB is far above any device's config.
MAX_VFIO_CONFIG_STATE = 16 << 20

_BE64 = struct.Struct(">Q")
_MARK = 8


@dataclass(frozen=True, slots=True)
class VfioSetup:
    """``DEV_SETUP_STATE END_OF_STATE``: the device is set up; the body is complete."""

    offset: int = 0


@dataclass(frozen=True, slots=True)
class VfioDataHeader:
    """``DEV_DATA_STATE be64:size``: ``size`` bytes for the data fd follow as :class:`VfioData`."""

    size: int
    offset: int = 0


@dataclass(frozen=True, slots=True)
class VfioData:
    """A piece of the current data chunk: a view of the caller's buffer (no copy)."""

    data: memoryview
    offset: int = 0


@dataclass(frozen=True, slots=True)
class VfioInitDataSent:
    """``DEV_INIT_DATA_SENT``: initial precopy data is out (switchover-ack); body complete."""

    offset: int = 0


@dataclass(frozen=True, slots=True)
class VfioConfig:
    """``DEV_CONFIG_STATE <config> END_OF_STATE``: the config state; body complete."""

    data: memoryview
    offset: int = 0


@dataclass(frozen=True, slots=True)
class VfioEndOfState:
    """``END_OF_STATE`` closing a body of data chunks (or an empty one)."""

    offset: int = 0


VfioEvent = (VfioSetup | VfioDataHeader | VfioData | VfioInitDataSent | VfioConfig
             | VfioEndOfState)


class _St(enum.Enum):
    TAG = "a VFIO marker"
    SETUP_END = "END_OF_STATE after DEV_SETUP_STATE"
    DATA_SIZE = "the size after DEV_DATA_STATE"
    DATA = "device data"
    CONFIG = "the config state"
    DONE = "nothing (the body is complete)"
    POISONED = "nothing (an earlier error)"


def _tag_name(tag: int) -> str:
    try:
        return VfioMigFlag(tag).name
    except ValueError:
        return f"{tag:#018x}"


class VfioSectionDecoder:
    """Decodes one VFIO section body (START, PART, END or FULL) into events.

    ``multifd_transfer``: the device's final data and config travel over multifd,
    so a ``DEV_CONFIG_STATE`` here is an error. ``config_size``: the config state's
    length, if the device model knows it; otherwise the config runs to the end of
    a body the caller passes whole with ``final=True``. ``where`` names the section
    in errors (e.g. ``"section 0000:00:04.0/vfio (id 3)"``).
    """

    def __init__(self, *, multifd_transfer: bool = False, config_size: int | None = None,
                 where: str = "VFIO section") -> None:
        if config_size is not None and not 0 <= config_size <= MAX_VFIO_CONFIG_STATE:
            raise ConfigError(f"config_size {config_size} outside 0..{MAX_VFIO_CONFIG_STATE}")
        self.multifd_transfer = multifd_transfer
        self.config_size = config_size
        self.where = where
        self._state = _St.TAG
        self._remaining = 0
        self._config_at = 0
        self._error: StreamFormatError | None = None
        #: Device data bytes seen in this body.
        self.data_bytes = 0

    @property
    def done(self) -> bool:
        """The body is complete; bytes after it are not the decoder's."""
        return self._state is _St.DONE

    @property
    def in_config(self) -> bool:
        """Inside a config state whose end only the body's end can tell."""
        return self._state is _St.CONFIG

    def parse(self, buf: Buffer, start: int = 0, end: int | None = None, base: int = 0, *,
              final: bool = False) -> tuple[list[VfioEvent], int]:
        """Decode from ``buf[start:end]``; ``base`` is the stream offset of ``buf[0]``.

        Returns the events and the buffer position reached. ``final``: the body ends
        at ``end`` (no more bytes will come); a body cut short is then a
        :class:`~livemig.errors.TruncatedStream`.
        """
        if self._error is not None:
            raise self._error
        end = len(buf) if end is None else end
        try:
            events, pos = self._parse(memoryview(buf), start, end, base, final)
        except StreamFormatError as e:
            self._state = _St.POISONED
            if e.where is None:
                e.where = self.where
            self._error = e
            raise
        if final and self._state is not _St.DONE:
            err = TruncatedStream(f"body ends inside {self._state.value}", offset=base + pos,
                                  where=self.where)
            self._state, self._error = _St.POISONED, err
            raise err
        return events, pos

    def _fail(self, message: str, at: int, buf: memoryview, base: int,
              cls: type[StreamFormatError] = StreamFormatError) -> StreamFormatError:
        return cls(message, offset=base + at, raw=bytes(buf[at:at + 16]))

    def _parse(self, buf: memoryview, pos: int, end: int, base: int,
               final: bool) -> tuple[list[VfioEvent], int]:
        out: list[VfioEvent] = []
        while True:
            st = self._state
            if st is _St.DONE:
                return out, pos
            if st is _St.DATA:
                if self._remaining == 0:
                    self._state = _St.TAG
                    continue
                n = min(self._remaining, end - pos)
                if n <= 0:
                    return out, pos
                out.append(VfioData(buf[pos:pos + n], base + pos))
                self._remaining -= n
                pos += n
                continue
            if st is _St.CONFIG:
                got = self._config(buf, pos, end, base, final)
                if got is None:
                    return out, pos
                out.append(got[0])
                pos = got[1]
                self._state = _St.DONE
                continue
            if end - pos < _MARK:
                return out, pos
            (word,) = _BE64.unpack_from(buf, pos)
            at, pos = pos, pos + _MARK
            if st is _St.SETUP_END:
                if word != VfioMigFlag.END_OF_STATE:
                    raise self._fail(f"DEV_SETUP_STATE is followed by {_tag_name(word)}, "
                                     "not END_OF_STATE", at, buf, base)
                out.append(VfioSetup(base + at - _MARK))
                self._state = _St.DONE
            elif st is _St.DATA_SIZE:
                if word > MAX_VFIO_DATA_CHUNK:
                    raise self._fail(f"DEV_DATA_STATE size {word} exceeds the limit "
                                     f"{MAX_VFIO_DATA_CHUNK}", at, buf, base, LimitExceeded)
                out.append(VfioDataHeader(word, base + at - _MARK))
                self.data_bytes += word
                self._remaining = word
                self._state = _St.DATA
            elif word == VfioMigFlag.END_OF_STATE:
                out.append(VfioEndOfState(base + at))
                self._state = _St.DONE
            elif word == VfioMigFlag.DEV_SETUP_STATE:
                self._state = _St.SETUP_END
            elif word == VfioMigFlag.DEV_DATA_STATE:
                self._state = _St.DATA_SIZE
            elif word == VfioMigFlag.DEV_INIT_DATA_SENT:
                out.append(VfioInitDataSent(base + at))
                self._state = _St.DONE
            elif word == VfioMigFlag.DEV_CONFIG_STATE:
                if self.multifd_transfer:
                    raise self._fail("DEV_CONFIG_STATE in the main stream, but the device's "
                                     "config travels over multifd", at, buf, base)
                self._config_at = at
                self._state = _St.CONFIG
            elif word == VfioMigFlag.DEV_DATA_STATE_COMPLETE:
                raise self._fail("DEV_DATA_STATE_COMPLETE is the 2024 RFC's marker; no QEMU "
                                 "release writes it", at, buf, base)
            else:
                raise self._fail(f"unknown VFIO marker {word:#018x}", at, buf, base)

    def _config(self, buf: memoryview, pos: int, end: int, base: int,
                final: bool) -> tuple[VfioConfig, int] | None:
        at = self._config_at
        if self.config_size is not None:
            size = self.config_size
            if end - pos < size + _MARK:
                return None
        else:
            if not final:
                return None  # the config runs to the end of the body; wait for all of it
            size = end - pos - _MARK
            if size < 0:
                return None
            if size > MAX_VFIO_CONFIG_STATE:
                raise self._fail(f"config state of {size} bytes exceeds the limit "
                                 f"{MAX_VFIO_CONFIG_STATE}", at, buf, base, LimitExceeded)
        (word,) = _BE64.unpack_from(buf, pos + size)
        if word != VfioMigFlag.END_OF_STATE:
            raise self._fail(f"config state of {size} bytes is followed by {_tag_name(word)}, "
                             "not END_OF_STATE", pos + size, buf, base)
        return VfioConfig(buf[pos:pos + size], base + at), pos + size + _MARK


def iterable_body_length(buf: memoryview, pos: int, end: int) -> int:
    """Length of a START/PART/END body at ``buf[pos:end]``, for a reader without the device.

    A tool that captures or relays a stream (``receive``, ``relay``, ``inspect``)
    splits VFIO sections by their markers; the JSON description covers only FULL
    sections. A config state inside an iterable section has no length on the wire,
    so it is refused here. Raises :class:`~livemig.wire.cursor.Incomplete` while the
    body is not all in the buffer.
    """
    from livemig.wire.cursor import Incomplete

    dec = VfioSectionDecoder(where="VFIO section")
    _, at = dec.parse(buf, pos, end)
    if dec.in_config:
        raise StreamFormatError("DEV_CONFIG_STATE in an iterable (START/PART/END) section: "
                                "its length is known only to the device", offset=pos)
    if not dec.done:
        raise Incomplete
    return at - pos


# --------------------------------------------------------------------------
# encoders: each returns the buffers to send (device data is not copied)

_END = _BE64.pack(VfioMigFlag.END_OF_STATE)


def encode_end_of_state() -> bytes:
    """``END_OF_STATE`` alone: the END and FULL bodies of a multifd-transfer device."""
    return _END


def encode_setup() -> bytes:
    """The START section body."""
    return _BE64.pack(VfioMigFlag.DEV_SETUP_STATE) + _END


def encode_data(chunks: Iterable[Buffer]) -> list[Buffer]:
    """``DEV_DATA_STATE be64:n <n bytes>`` per chunk; empty chunks are skipped as QEMU does."""
    out: list[Buffer] = []
    for chunk in chunks:
        n = len(memoryview(chunk).cast("B"))
        if n == 0:
            continue
        if n > MAX_VFIO_DATA_CHUNK:
            raise ConfigError(f"VFIO data chunk of {n} bytes exceeds {MAX_VFIO_DATA_CHUNK}")
        out.append(_BE64.pack(VfioMigFlag.DEV_DATA_STATE) + _BE64.pack(n))
        out.append(chunk)
    return out


def encode_iterate(chunks: Iterable[Buffer], *, init_data_sent: bool = False) -> list[Buffer]:
    """A PART body: data, then ``DEV_INIT_DATA_SENT`` (once) or ``END_OF_STATE``."""
    tail = _BE64.pack(VfioMigFlag.DEV_INIT_DATA_SENT) if init_data_sent else _END
    return [*encode_data(chunks), tail]


def encode_complete(chunks: Iterable[Buffer]) -> list[Buffer]:
    """An END body: all remaining data, then ``END_OF_STATE``."""
    return [*encode_data(chunks), _END]


def encode_config_blob(config: Buffer) -> bytes:
    """``DEV_CONFIG_STATE <config> END_OF_STATE``: a FULL body, and a multifd config
    packet's data."""
    if len(config) > MAX_VFIO_CONFIG_STATE:
        raise ConfigError(f"config state of {len(config)} bytes exceeds {MAX_VFIO_CONFIG_STATE}")
    return _BE64.pack(VfioMigFlag.DEV_CONFIG_STATE) + bytes(config) + _END


def encode_config(config: Buffer) -> list[Buffer]:
    """The FULL body as buffers."""
    return [encode_config_blob(config)]


def decode_config_blob(buf: Buffer, *, where: str = "VFIO config state",
                       config_size: int | None = None) -> memoryview:
    """The config state in a whole ``DEV_CONFIG_STATE <config> END_OF_STATE`` buffer.

    Used for the multifd config packet, which QEMU requires to start with
    ``DEV_CONFIG_STATE``. Bytes after the closing ``END_OF_STATE`` are an error.
    """
    view = memoryview(buf).cast("B")
    if len(view) < _MARK:
        raise StreamFormatError(f"config state of {len(view)} bytes is shorter than its "
                                "DEV_CONFIG_STATE marker", offset=0, where=where,
                                raw=bytes(view[:16]))
    (tag,) = _BE64.unpack_from(view, 0)
    if tag != VfioMigFlag.DEV_CONFIG_STATE:
        raise StreamFormatError(f"expected DEV_CONFIG_STATE, got {_tag_name(tag)}", offset=0,
                                where=where, raw=bytes(view[:16]))
    dec = VfioSectionDecoder(config_size=config_size, where=where)
    events, pos = dec.parse(view, 0, len(view), final=True)
    if pos != len(view):
        raise StreamFormatError(f"{len(view) - pos} bytes after the config state's "
                                "END_OF_STATE", offset=pos, where=where,
                                raw=bytes(view[pos:pos + 16]))
    config = events[-1]
    assert isinstance(config, VfioConfig)
    return config.data
