"""livemig: a live-migration engine for virtual machines that speaks QEMU's protocol.

The public API; everything else may move between releases.
"""

from livemig.errors import (
    ChannelError,
    ConfigError,
    KernelTrackingUnavailable,
    LimitExceeded,
    MigrationError,
    PeerError,
    StateError,
    StreamFormatError,
    TransportError,
    TruncatedStream,
)

__version__ = "0.1.0"


def receive(*args, **kwargs):  # type: ignore[no-untyped-def]
    """Receive a migration into a snapshot; see :func:`livemig.commands.receive.receive`."""
    from livemig.commands.receive import receive as _receive

    return _receive(*args, **kwargs)


def send(*args, **kwargs):  # type: ignore[no-untyped-def]
    """Migrate a snapshot into a QEMU destination; see :func:`livemig.commands.send.send`."""
    from livemig.commands.send import send as _send

    return _send(*args, **kwargs)


def relay(*args, **kwargs):  # type: ignore[no-untyped-def]
    """Relay a live migration between two QEMUs; see :func:`livemig.commands.relay.relay`."""
    from livemig.commands.relay import relay as _relay

    return _relay(*args, **kwargs)


def inspect(path: str, *, fields: bool = False) -> dict:  # type: ignore[type-arg]
    """Describe a snapshot or stream file; see :func:`livemig.commands.inspect.inspect_file`."""
    from livemig.commands.inspect import inspect_file

    return inspect_file(path, fields=fields)


def extract(snapshot: str, block: str, output: str) -> int:
    """Write one RAM block of a snapshot as a raw image."""
    from livemig.commands.inspect import extract as _extract

    return _extract(snapshot, block, output)


__all__ = [
    "ChannelError",
    "ConfigError",
    "KernelTrackingUnavailable",
    "LimitExceeded",
    "MigrationError",
    "PeerError",
    "StateError",
    "StreamFormatError",
    "TransportError",
    "TruncatedStream",
    "__version__",
    "extract",
    "inspect",
    "receive",
    "relay",
    "send",
]
