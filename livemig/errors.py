"""The error tree of livemig.

One root, :class:`MigrationError`, split by who is to blame, so that a caller
can decide what to do without parsing messages:

* the peer sent something wrong -> :class:`StreamFormatError` (with the stream
  offset, the channel and the section it happened in);
* the caller asked for something impossible -> :class:`ConfigError`,
  :class:`StateError`;
* the environment broke -> :class:`TransportError` / :class:`ChannelError`
  (the OS error is kept as ``__cause__``).

The command line prints ``str(error)`` on one line and exits non-zero; the
message therefore has to say what was wrong and where on its own.
"""

from __future__ import annotations

_CONTROL_ESCAPES = {c: f"\\x{c:02x}" for c in (*range(32), 127)}


class MigrationError(Exception):
    """Root of every error livemig raises on purpose."""


class StreamFormatError(MigrationError):
    """The peer's bytes do not follow the wire format.

    ``offset`` is the position in the named stream (main channel, multifd
    channel N, snapshot file) where the offending record starts.
    """

    def __init__(
        self,
        message: str,
        *,
        offset: int | None = None,
        where: str | None = None,
        raw: bytes | None = None,
    ) -> None:
        self.message = message
        self.offset = offset
        self.where = where
        self.raw = raw
        super().__init__(message)

    def locate(self, where: str, base_offset: int = 0, *,
               record_offset: int | None = None) -> StreamFormatError:
        """Attach the stream name and turn a buffer offset into a stream offset.

        ``record_offset`` is used when the error has no offset of its own (it
        came from a layer that does not see the stream, e.g. a decompressor).
        """
        if self.where is None:
            self.where = where
        if self.offset is not None and base_offset:
            self.offset += base_offset
        elif self.offset is None and record_offset is not None:
            self.offset = record_offset
        return self

    def __str__(self) -> str:
        parts = []
        if self.where:
            parts.append(self.where)
        if self.offset is not None:
            parts.append(f"offset {self.offset:#x}")
        prefix = ", ".join(parts)
        text = f"{prefix}: {self.message}" if prefix else self.message
        # names from the stream (RAM block names, idstrs) may hold any byte: the
        # error stays one line, with control characters escaped
        return text.translate(_CONTROL_ESCAPES)


class TruncatedStream(StreamFormatError):
    """The peer closed (or the file ended) in the middle of a record."""


class LimitExceeded(StreamFormatError):
    """A length read from the wire is above the limit livemig accepts."""


class VhostUserError(StreamFormatError):
    """A vhost-user peer sent a message that is malformed, out of order, or
    needs a feature that was not negotiated (``where`` names the connection,
    ``offset`` the message's first byte on it)."""


class ConfigError(MigrationError):
    """The caller asked for something that cannot work (bad URI, bad option)."""


class StateError(MigrationError):
    """An operation was called in a run state that does not allow it."""

    def __init__(self, state: object, required: object) -> None:
        self.state = state
        self.required = required
        super().__init__(f"operation needs state {required}, but the state is {state}")


class TransportError(MigrationError):
    """A channel could not be opened, or it broke (the OS error is the cause)."""


class ChannelError(TransportError):
    """One multifd channel failed; names the channel."""


class TlsSessionRefused(TransportError):
    """A TLS peer ended the session right after the handshake: how a QEMU destination
    refuses this side's client certificate (TLS 1.3 finishes the client's handshake
    before the server has judged its certificate)."""


class PeerError(MigrationError):
    """The peer reported a failure of its own (QEMU's error text is kept)."""


class OutOfMemory(MigrationError):
    """The host refused memory that livemig asked for within its limits.

    The message names what was being allocated and how much, so that the user
    can tell a host limit (``ulimit -v``, a cgroup) from a bug.
    """


class allocating:  # noqa: N801 (used as ``with allocating(...)``, like a function)
    """``with allocating("per-page state of pc.ram", size):`` turns a MemoryError
    inside into :class:`OutOfMemory` naming what and how much."""

    __slots__ = ("size", "what")

    def __init__(self, what: str, size: int) -> None:
        self.what = what
        self.size = size

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 tb: object) -> None:
        if kind is not None and issubclass(kind, MemoryError):
            raise OutOfMemory(f"out of memory allocating {self.what} "
                              f"({_bytes(self.size)})") from None


def _bytes(n: int) -> str:
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift:
            return f"{n / (1 << shift):.1f} {unit}"
    return f"{n} bytes"


class KernelTrackingUnavailable(TransportError):
    """This kernel cannot track written pages for livemig (uffd-wp async + PAGEMAP_SCAN).

    The message is one line naming the call that failed and the likely reason
    (``"PAGEMAP_SCAN: ENOTTY (Linux < 6.7)"``); the OS error, if any, is the cause.
    """
