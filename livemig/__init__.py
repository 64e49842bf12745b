"""livemig: a live-migration engine for virtual machines that speaks QEMU's protocol.

The public API; everything else may move between releases.

The functions below import their machinery (numpy, sockets, threads) only when
called, so that ``import livemig`` stays cheap for the command line. Their
parameters are those of the functions in ``livemig/commands/`` they call;
``tests/test_public_api.py`` checks that the two stay the same.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from livemig import limits as _limits
from livemig.errors import (
    ChannelError,
    ConfigError,
    KernelTrackingUnavailable,
    LimitExceeded,
    MigrationError,
    OutOfMemory,
    PeerError,
    StateError,
    StreamFormatError,
    TlsSessionRefused,
    TransportError,
    TruncatedStream,
)

if TYPE_CHECKING:
    from livemig.commands.receive import ReceiveResult
    from livemig.commands.relay import RelayResult
    from livemig.commands.send import SendResult
    from livemig.io.uri import Uri
    from livemig.migration.common.stats import TransferStats
    from livemig.wire.constants import MultifdCompression

__version__ = "0.1.0"

# The defaults of the commands' own constants, spelled out so that this module does not
# import the machinery that defines them (the test above compares them):
#: livemig.io.channels.DEFAULT_ACCEPT_TIMEOUT -- seconds to wait for a source at all.
_ACCEPT_TIMEOUT = 3600.0
#: livemig.migration.destination.device_state_capture.DEVICE_STATE_DRAIN -- seconds the
#: multifd channels get, after the main stream's end, to deliver device state in flight.
_DEVICE_STATE_DRAIN = 10.0


def receive(uri: str | Uri, output: str, *, multifd_channels: int = 0,
            multifd_compression: str | MultifdCompression = "none",
            stats: TransferStats | None = None,
            accept_timeout: float = _ACCEPT_TIMEOUT,
            device_state_drain: float = _DEVICE_STATE_DRAIN,
            on_listening: Callable[[str], None] | None = None,
            max_ram: int = _limits.DEFAULT_MAX_GUEST_RAM,
            tls_creds: str | None = None, tls_authz: Sequence[str] = (),
            tls_verify_peer: bool = True) -> ReceiveResult:
    """Receive one migration on ``uri`` and write it to ``output`` as a mapped-ram snapshot.

    ``uri`` is where the source comes from: ``tcp:HOST:PORT`` or ``unix:PATH`` (livemig
    listens; port 0 picks a free one), ``exec:COMMAND`` (its stdout) or ``file:PATH``
    (a stream or snapshot QEMU or livemig wrote). ``multifd_channels`` and
    ``multifd_compression`` ("none", "zlib", "zstd") are QEMU's parameters of the same
    names and must match the source's; 0 channels means plain precopy.

    ``stats`` is updated while the migration runs (for a progress display),
    ``accept_timeout`` bounds the wait for the source to connect at all, and
    ``device_state_drain`` the wait, after the main stream has ended, for device state
    still in flight on the multifd channels. ``on_listening`` is called with the address
    once livemig accepts connections (for ``tcp:HOST:0``, the port it bound).
    ``max_ram`` is the most guest RAM the source may declare (256 GiB unless raised, at
    most 1 TiB): a larger VM is refused with :class:`LimitExceeded` before anything is
    sized for it.

    ``tls_creds`` is a directory laid out as QEMU's ``tls-creds-x509`` ``dir``
    (``ca-cert.pem``, ``server-cert.pem``, ``server-key.pem``): every channel is then
    TLS, livemig the server. ``tls_verify_peer`` requires a client certificate signed
    by that CA; ``tls_authz`` lets in only the listed client distinguished names,
    written as QEMU writes them (``O=example,CN=livemig-client``, certificate order).
    A refused handshake is a :class:`TransportError` naming the channel, the peer and
    the reason.

    Returns a :class:`~livemig.commands.receive.ReceiveResult` (``snapshot``,
    ``snapshot_bytes``, ``load``, ``stats``) once the snapshot is fsynced and renamed
    into place, and only then tells a source with a return path that all went well.

    On any failure the source is told first (SHUT with an error, so a QEMU source fails
    its migration and keeps running), nothing is left at ``output``, and the first cause
    is raised: :class:`StreamFormatError` (with :class:`TruncatedStream` and
    :class:`LimitExceeded`) for a stream that breaks the format, :class:`ConfigError`
    for settings that cannot work, :class:`TransportError` / :class:`ChannelError` when
    a socket, a file or the disk fails.
    """
    from livemig.commands.receive import receive as _receive

    return _receive(uri, output, multifd_channels=multifd_channels,
                    multifd_compression=multifd_compression, stats=stats,
                    accept_timeout=accept_timeout, device_state_drain=device_state_drain,
                    on_listening=on_listening, max_ram=max_ram, tls_creds=tls_creds,
                    tls_authz=tls_authz, tls_verify_peer=tls_verify_peer)


def send(snapshot: str, uri: str | Uri, *, multifd_channels: int = 0,
         multifd_compression: str | MultifdCompression = "none",
         dest_qmp: str | None = None, stats: TransferStats | None = None,
         sync_mode: str | None = None,
         tls_creds: str | None = None, tls_hostname: str | None = None,
         tls_verify_peer: bool = True) -> SendResult:
    """Migrate ``snapshot`` into the QEMU destination listening at ``uri``.

    The destination is a QEMU started with ``-incoming`` (``tcp:``, ``unix:``, or an
    ``exec:COMMAND`` that gets the stream on its stdin), with the same machine type and
    RAM as the snapshot; ``multifd_channels`` and ``multifd_compression`` must match
    what it was given. ``dest_qmp`` is a QMP monitor of that QEMU (``unix:PATH``,
    ``tcp:HOST:PORT`` or a socket path) of livemig's own: through it livemig checks and
    prepares the destination before sending anything, and reads QEMU's error message
    if the load fails. ``sync_mode`` ("per-section" or "per-round") overrides the
    multifd sync mode that the snapshot's machine type implies. ``stats`` is updated
    while the migration runs.

    ``tls_creds`` (a ``tls-creds-x509`` directory: ``ca-cert.pem``, and
    ``client-cert.pem`` + ``client-key.pem`` unless the client is anonymous) makes
    every channel TLS, livemig the client: the destination's certificate must name
    ``tls_hostname``, or the host of a ``tcp:`` URI (over ``unix:`` a
    ``tls_hostname`` is required, as QEMU requires it). ``tls_verify_peer=False``
    skips checking the destination's certificate.

    Returns a :class:`~livemig.commands.send.SendResult` (``bytes_sent``, ``stats``,
    ``verdict``) once the destination has confirmed the migration (for ``exec:``, once
    the command exited 0).

    Raises :class:`PeerError` if the destination refused or did not confirm,
    :class:`ConfigError` if the snapshot and the destination do not fit (or the
    snapshot is not one), :class:`TransportError` if a connection broke.
    """
    from livemig.commands.send import send as _send

    return _send(snapshot, uri, multifd_channels=multifd_channels,
                 multifd_compression=multifd_compression, dest_qmp=dest_qmp, stats=stats,
                 sync_mode=sync_mode, tls_creds=tls_creds, tls_hostname=tls_hostname,
                 tls_verify_peer=tls_verify_peer)


def relay(listen: str | Uri, dest: str | Uri, *, in_multifd_channels: int = 0,
          in_multifd_compression: str = "none", out_multifd_channels: int = 0,
          out_multifd_compression: str = "none", record: str | None = None,
          stats: TransferStats | None = None, accept_timeout: float = _ACCEPT_TIMEOUT,
          on_listening: Callable[[str], None] | None = None,
          dest_qmp: str | None = None,
          max_ram: int = _limits.DEFAULT_MAX_GUEST_RAM,
          in_tls_creds: str | None = None, in_tls_authz: Sequence[str] = (),
          in_tls_verify_peer: bool = True, out_tls_creds: str | None = None,
          out_tls_hostname: str | None = None, out_tls_verify_peer: bool = True,
          ) -> RelayResult:
    """Accept a live migration on ``listen`` and forward it to the QEMU listening at
    ``dest`` as it arrives.

    Both URIs are ``tcp:`` or ``unix:``. The ``in_`` multifd settings must match the
    source's, the ``out_`` ones the destination's; the two hops may differ (precopy in,
    multifd out, another compression). ``record`` also writes everything that passes
    into a snapshot at that path, which appears only once the destination has
    confirmed. ``stats``, ``accept_timeout`` and ``on_listening`` are as for
    :func:`receive`. ``dest_qmp`` (the destination's QMP socket) checks the destination
    against the source's machine type and RAM as they arrive, prepares it as
    :func:`send` does, and adds QEMU's own reason to a failure. ``in_tls_*`` set the
    incoming hop's TLS as for :func:`receive`, ``out_tls_*`` the outgoing hop's as for
    :func:`send`: each hop its own (TLS in and plain out is fine).

    Returns a :class:`~livemig.commands.relay.RelayResult` (``load``, ``stats``,
    ``recorded``) once the destination has confirmed and the source has been told so.

    On failure of either hop the source is told to fail its migration (so a QEMU source
    keeps running) and the first cause is raised: :class:`PeerError` when the
    destination refused the stream, :class:`StreamFormatError` when the source sent
    something wrong, :class:`ConfigError` or :class:`TransportError` as for
    :func:`receive`.
    """
    from livemig.commands.relay import relay as _relay

    return _relay(listen, dest, in_multifd_channels=in_multifd_channels,
                  in_multifd_compression=in_multifd_compression,
                  out_multifd_channels=out_multifd_channels,
                  out_multifd_compression=out_multifd_compression, record=record, stats=stats,
                  accept_timeout=accept_timeout, on_listening=on_listening,
                  dest_qmp=dest_qmp, max_ram=max_ram,
                  in_tls_creds=in_tls_creds, in_tls_authz=in_tls_authz,
                  in_tls_verify_peer=in_tls_verify_peer, out_tls_creds=out_tls_creds,
                  out_tls_hostname=out_tls_hostname, out_tls_verify_peer=out_tls_verify_peer)


def inspect(path: str, *, fields: bool = False,
            max_ram: int = _limits.DEFAULT_MAX_GUEST_RAM) -> dict[str, Any]:
    """Describe a snapshot or a single-channel stream file, as ``livemig inspect --json``.

    The result is JSON-ready: the machine type and capabilities, every RAM block with
    how many pages hold data, are zero, or (in a stream) were never sent, every device
    section with its size and SHA-256 (with ``fields``, also its vmstate fields decoded
    with the file's own JSON description), and the multifd device state a snapshot
    holds. A snapshot's pages are not read, only its bitmaps, piece by piece.
    ``max_ram``: the most guest RAM the file may declare (as for :func:`receive`).

    Raises :class:`StreamFormatError` for a damaged file (:class:`LimitExceeded` for
    more guest RAM than ``max_ram``), :class:`TransportError` if it cannot be read.
    """
    from livemig.commands.inspect import inspect_file

    return inspect_file(path, fields=fields, max_ram=max_ram)


def extract(snapshot: str, block: str, output: str, *,
            max_ram: int = _limits.DEFAULT_MAX_GUEST_RAM) -> int:
    """Write the RAM block named ``block`` (e.g. "pc.ram") of ``snapshot`` to ``output``
    as a raw image, pages that were never written as zeros; returns its size in bytes.

    Raises :class:`ConfigError` if ``snapshot`` is a stream rather than a snapshot or
    has no such block, :class:`StreamFormatError` for a damaged file (``max_ram`` as
    for :func:`inspect`).
    """
    from livemig.commands.inspect import extract as _extract

    return _extract(snapshot, block, output, max_ram=max_ram)


__all__ = [
    "ChannelError",
    "ConfigError",
    "KernelTrackingUnavailable",
    "LimitExceeded",
    "MigrationError",
    "OutOfMemory",
    "PeerError",
    "StateError",
    "StreamFormatError",
    "TlsSessionRefused",
    "TransportError",
    "TruncatedStream",
    "__version__",
    "extract",
    "inspect",
    "receive",
    "relay",
    "send",
]
