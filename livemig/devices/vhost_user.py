"""A vhost-user device of a livemig machine: the front-end side of state transfer.

The device's data path lives in a back-end process (``livemig
vhost-user-backend`` or any back-end offering
``VHOST_USER_PROTOCOL_F_DEVICE_STATE``); its internal state is only
reachable through the back-end. At switchover the source asks its back-end
for the state (SET_DEVICE_STATE_FD, save, CHECK) and writes it into the
device's section with QEMU's framing for it (``be32 length + bytes`` chunks
ended by a zero-length chunk, as in the ``vhost-user-fs-backend``
subsection), followed by a sha256 of the state; the destination feeds it to
its own back-end (load, CHECK) and fails the migration with the back-end's
answer if the back-end refuses it.

A back-end without the feature is a migration blocker, as in QEMU: the
migration refuses to start and says which device and why.
"""

from __future__ import annotations

import hashlib
import struct
from typing import Any

from livemig.engine.handlers import DeviceHandler, SectionOut
from livemig.errors import LimitExceeded, PeerError, StreamFormatError
from livemig.limits import MAX_VHOST_USER_DEVICE_STATE
from livemig.vhost_user.frontend import MAX_STREAM_CHUNK, VhostUserFrontend, frame_chunks
from livemig.wire.cursor import Incomplete

_BE32 = struct.Struct(">I")
DIGEST = 32


def framed_length(buf: memoryview, pos: int, end: int) -> int:
    """Length of the framed chunks plus the digest at ``buf[pos:]`` (sans-I/O)."""
    at = pos
    total = 0
    while True:
        if end - at < 4:
            raise Incomplete
        (n,) = _BE32.unpack_from(buf, at)
        if n == 0:
            at += 4
            break
        if n > MAX_STREAM_CHUNK:
            raise LimitExceeded(f"back-end state chunk of {n} bytes is above the limit of "
                                f"{MAX_STREAM_CHUNK}")
        total += n
        if total > MAX_VHOST_USER_DEVICE_STATE:
            raise LimitExceeded(f"back-end state beyond {MAX_VHOST_USER_DEVICE_STATE} bytes")
        at += 4 + n
    if end - at < DIGEST:
        raise Incomplete
    return at + DIGEST - pos


def _chunks(body: memoryview) -> list[memoryview]:
    out: list[memoryview] = []
    at = 0
    while True:
        (n,) = _BE32.unpack_from(body, at)
        at += 4
        if n == 0:
            return out
        out.append(body[at:at + n])
        at += n


class VhostUserDevice(DeviceHandler):
    kind = "vhost-user"

    def __init__(self, socket_path: str, index: int = 0) -> None:
        self.idstr = f"livemig-vhost-user/{index}"
        self.socket_path = socket_path
        self.frontend = VhostUserFrontend(socket_path)
        self.state_bytes = 0
        self.verified: bool | None = None

    def section_length(self, buf: memoryview, pos: int, end: int) -> int:
        return framed_length(buf, pos, end)

    def describe(self, body_size: int) -> dict[str, Any]:
        return {"name": self.idstr, "instance_id": self.instance_id, "section_id": 0,
                "version": self.version_id,
                "fields": [{"name": "backend-state", "type": "buffer",
                            "size": body_size - DIGEST},
                           {"name": "sha256", "type": "buffer", "size": DIGEST}]}

    def migration_blocker(self) -> str | None:
        if not self.frontend.supports_device_state:
            return (f"its back-end at {self.socket_path} does not offer "
                    "VHOST_USER_PROTOCOL_F_DEVICE_STATE (bit 19), so its state cannot migrate")
        return None

    def save_state(self, out: SectionOut) -> None:
        digest = hashlib.sha256()
        n = 0
        chunks = list(self.frontend.save_state())  # raises if the back-end fails or dies
        for c in chunks:
            digest.update(c)
            n += len(c)
        for framed in frame_chunks(chunks):
            out.write(framed)
        out.write(digest.digest())
        self.state_bytes = n

    def load_state(self, body: memoryview, version_id: int, kind: str) -> None:
        chunks = _chunks(body[:-DIGEST])
        digest = hashlib.sha256()
        for c in chunks:
            digest.update(c)
        if digest.digest() != bytes(body[-DIGEST:]):
            raise StreamFormatError(f"device {self.idstr}: back-end state does not match its "
                                    "sha256")
        self.state_bytes = sum(len(c) for c in chunks)
        result = self.frontend.load_state(chunks)
        if result:
            self.verified = False
            raise PeerError(f"device {self.idstr}: the back-end at {self.socket_path} refused "
                            f"the state (CHECK_DEVICE_STATE answered {result})")
        self.verified = True

    def summary(self) -> dict[str, Any]:
        return {"name": self.idstr, "kind": self.kind, "state_bytes": self.state_bytes,
                "verified": self.verified, "socket": self.socket_path}

    def close(self) -> None:
        self.frontend.close()
