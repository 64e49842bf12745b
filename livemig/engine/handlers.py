"""The device handler protocol: what makes a Python device migratable.

It follows QEMU's ``SaveVMHandlers`` (``include/migration/register.h``), so
that a reader who knows QEMU finds the same life cycle, and so that every
device's state travels in QEMU's framing (a section per device, START / PART
/ END for iterable devices, FULL for the others) where ``livemig inspect``
and QEMU's own tools can see it.

Source side, in the order the engine calls it::

    save_setup(out)                 # once, in the SECTION_START (iterable devices)
    state_pending() -> (precopy, stopcopy)   # bytes still to send, every iteration
    save_live_iterate(out, budget)  # a SECTION_PART with at most ~budget bytes
    save_live_complete_precopy(out) # the SECTION_END, machine stopped
    save_state(out)                 # non-iterable devices: the one SECTION_FULL
    save_cleanup()                  # always, success or not

Destination side::

    load_setup()
    load_state(body, version_id, kind)   # one section body, as the source wrote it
    load_state_buffer(data)              # device state that came over multifd
    load_finish() -> None                # raise if the device cannot run
    load_cleanup()

Sections must be self-delimiting on the wire, because the destination has
to know where a section ends before it has the JSON description QEMU
appends after EOF. :meth:`DeviceHandler.section_length` says how long a body
is; the default framing (a be32 length, then that many bytes) is what
:class:`BlobDevice` uses, and a device with a format of its own (VFIO's
markers) overrides it.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from typing import Any

from livemig.errors import StreamFormatError
from livemig.wire.cursor import Incomplete

#: Bytes of one section body of a Python device. A device with more state
#: than this belongs on the iterable path (several PART sections) or on
#: multifd device-state packets.
MAX_DEVICE_SECTION = 64 << 20


class SectionOut:
    """Where a handler writes one section body (a list of buffers, no copy)."""

    def __init__(self) -> None:
        self.parts: list[bytes | bytearray | memoryview] = []
        self.size = 0

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.parts.append(data)
        self.size += len(data)

    def write_blob(self, data: bytes | bytearray | memoryview) -> None:
        """The default framing: be32 length, then the bytes."""
        if len(data) > MAX_DEVICE_SECTION:
            raise ValueError(f"device section of {len(data)} bytes is above "
                             f"{MAX_DEVICE_SECTION}")
        self.write(struct.pack(">I", len(data)))
        self.write(data)


def blob_length(buf: memoryview, pos: int, end: int) -> int:
    """Body length of a default-framed section starting at ``buf[pos]``."""
    if end - pos < 4:
        raise Incomplete
    n: int
    (n,) = struct.unpack_from(">I", buf, pos)
    if n > MAX_DEVICE_SECTION:
        raise StreamFormatError(f"device section of {n} bytes is above the limit of "
                                f"{MAX_DEVICE_SECTION}")
    if end - pos < 4 + n:
        raise Incomplete
    return 4 + n


def blob_payload(body: memoryview) -> memoryview:
    return body[4:]


class DeviceHandler:
    """Base class with the no-op defaults QEMU's optional handlers have.

    ``idstr`` / ``instance_id`` / ``version_id`` name the section as QEMU's
    ``register_savevm_live()`` does. ``kind`` is what summaries show.
    """

    idstr: str = "device"
    instance_id: int = 0
    version_id: int = 1
    iterable: bool = False
    kind: str = "device"

    # -- wire framing --------------------------------------------------------
    def section_length(self, buf: memoryview, pos: int, end: int) -> int:
        """Body length at ``buf[pos:end]``; raise ``Incomplete`` if more bytes are needed."""
        return blob_length(buf, pos, end)

    def describe(self, body_size: int) -> dict[str, Any]:
        """The vmstate JSON entry for a FULL section of ``body_size`` bytes."""
        return {"name": self.idstr, "instance_id": self.instance_id,
                "section_id": 0, "version": self.version_id,
                "fields": [{"name": "length", "type": "uint32", "size": 4},
                           {"name": "state", "type": "buffer", "size": body_size - 4}]}

    def configure_migration(self, channels: int) -> None:
        """A migration is about to start with ``channels`` multifd channels (0: none)."""

    @property
    def full_state(self) -> bool:
        """Whether the device has a FULL section (non-iterable state, saved stopped)."""
        return not self.iterable

    def device_state_packets(self) -> Iterator[Any] | None:
        """At completion, the device's state as multifd device-state packets
        (``OutgoingDeviceStatePacket``), or None to use the main channel only."""
        return None

    def load_target(self) -> Any:
        """Where multifd device-state packets for this device are loaded
        (a ``DeviceLoadTarget``), or None if it takes none."""
        return None

    # -- source --------------------------------------------------------------
    def migration_blocker(self) -> str | None:
        """Why this device cannot migrate now (QEMU's migration blockers), or None."""
        return None

    def save_setup(self, out: SectionOut) -> None:
        pass

    def state_pending(self) -> tuple[int, int]:
        """(bytes that can go during precopy, bytes only the stop-copy phase can send)."""
        return (0, 0)

    def save_live_iterate(self, out: SectionOut, budget: int) -> bool:
        """Write up to about ``budget`` bytes; True once nothing is left for now."""
        return True

    def save_live_complete_precopy(self, out: SectionOut) -> None:
        pass

    def save_state(self, out: SectionOut) -> None:
        pass

    def save_cleanup(self) -> None:
        pass

    # -- destination ---------------------------------------------------------
    def load_setup(self) -> None:
        pass

    def load_state(self, body: memoryview, version_id: int, kind: str) -> None:
        """``kind`` is the section type name: START, PART, END or FULL."""

    def load_state_buffer(self, data: memoryview) -> None:
        raise StreamFormatError(f"device {self.idstr}: no device state is expected over "
                                "multifd")

    def load_finish(self) -> None:
        pass

    def load_cleanup(self) -> None:
        pass

    # -- machine life --------------------------------------------------------
    def on_run_state(self, running: bool) -> None:
        """The machine starts or stops (a device with workers parks them here)."""

    def summary(self) -> dict[str, Any]:
        return {"name": self.idstr, "kind": self.kind, "state_bytes": 0, "verified": None}

    def close(self) -> None:
        """The machine goes away: release what the device holds (sockets, threads)."""


class BlobDevice(DeviceHandler):
    """A non-iterable device whose whole state is one bytes value.

    The simplest migratable device, and an example: subclass it and override
    :meth:`get_state` / :meth:`set_state`.
    """

    kind = "blob"

    def __init__(self, idstr: str, state: bytes = b"", instance_id: int = 0) -> None:
        self.idstr = idstr
        self.instance_id = instance_id
        self.state = state
        self.loaded = False

    def get_state(self) -> bytes:
        return self.state

    def set_state(self, data: bytes) -> None:
        self.state = data

    def save_state(self, out: SectionOut) -> None:
        out.write_blob(self.get_state())

    def load_state(self, body: memoryview, version_id: int, kind: str) -> None:
        self.set_state(bytes(blob_payload(body)))
        self.loaded = True

    def summary(self) -> dict[str, Any]:
        return {"name": self.idstr, "kind": self.kind, "state_bytes": len(self.state),
                "verified": self.loaded or None}
