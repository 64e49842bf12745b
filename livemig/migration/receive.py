"""``livemig receive``: take a migration from a QEMU source into a snapshot."""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass

from livemig import limits
from livemig.errors import ConfigError, MigrationError, TransportError
from livemig.io.channels import (
    DEFAULT_ACCEPT_TIMEOUT,
    ExecSource,
    Listener,
    SocketSource,
    open_source,
)
from livemig.io.snapshot import SnapshotWriter
from livemig.io.uri import ExecUri, FileUri, TcpUri, UnixUri, Uri, parse_uri
from livemig.migration.failure import FailureLatch
from livemig.migration.loader import LoadResult, MainChannelLoader, rp_message
from livemig.migration.multifd_recv import MultifdReceiver
from livemig.migration.stats import TransferStats
from livemig.wire.constants import MultifdCompression, ReturnPathMessage


@dataclass
class ReceiveResult:
    snapshot: str
    snapshot_bytes: int
    load: LoadResult
    stats: TransferStats


def receive(uri: str | Uri, output: str, *, multifd_channels: int = 0,
            multifd_compression: str | MultifdCompression = "none",
            stats: TransferStats | None = None,
            accept_timeout: float = DEFAULT_ACCEPT_TIMEOUT,
            on_listening: object = None) -> ReceiveResult:
    """Receive one migration on ``uri`` and write it to ``output`` as a mapped-ram snapshot.

    ``multifd_channels`` and ``multifd_compression`` mirror QEMU's parameters
    and must match the source's. Returns once the snapshot is on disk; on any
    failure nothing is left at ``output`` and the first cause is raised.
    """
    u = parse_uri(uri) if isinstance(uri, str) else uri
    try:
        comp = MultifdCompression(multifd_compression)
    except ValueError:
        raise ConfigError(f"unknown multifd compression {multifd_compression!r} "
                          "(none, zlib or zstd)") from None
    if not 0 <= multifd_channels <= limits.MAX_MULTIFD_CHANNELS:
        raise ConfigError(f"multifd-channels must be 1..{limits.MAX_MULTIFD_CHANNELS}, "
                          f"not {multifd_channels}")
    if multifd_channels and not isinstance(u, (TcpUri, UnixUri)):
        raise ConfigError(f"multifd needs a tcp: or unix: URI, not {u}")
    if comp is not MultifdCompression.NONE and not multifd_channels:
        raise ConfigError("--multifd-compression needs --multifd-channels")
    stats = stats or TransferStats()
    latch = FailureLatch()
    writer = SnapshotWriter(output)
    listener = None
    source = None
    multifd = None
    send_rp = None
    result: LoadResult | None = None
    loader: MainChannelLoader | None = None
    try:
        if isinstance(u, (TcpUri, UnixUri)):
            listener = Listener(u)
            if callable(on_listening):
                on_listening(listener.address)
            main, chans = listener.accept_migration(multifd_channels, timeout=accept_timeout)
            stats.started = time.monotonic()
            listener.watch_for_extra(lambda msg: latch.fail(TransportError(msg)))
            latch.add_socket(main)
            sock_source = SocketSource(main)
            source = sock_source
            send_rp = sock_source.send
            if chans:
                multifd = MultifdReceiver(chans, comp, writer, latch, stats)
                multifd.start()
        elif isinstance(u, (ExecUri, FileUri)):
            source = open_source(u)
        stats.phase = "receiving"
        loader = MainChannelLoader(source, writer, stats=stats, latch=latch, multifd=multifd,
                                   send_return_path=send_rp)
        result = loader.run()
        if multifd is not None:
            multifd.finish()
            latch.raise_if_failed()
        if isinstance(source, ExecSource):
            source.check_exit()
        if listener is not None:
            listener.close()
            listener = None
        latch.raise_if_failed()
        stats.phase = "writing the snapshot"
        size = writer.commit(device_sections=[s.raw for s in result.device_sections],
                             vmdesc_json=result.vmdesc_json,
                             switchover_start=result.switchover_start)
        if result.return_path and send_rp is not None:
            send_rp(rp_message(ReturnPathMessage.SHUT, b"\x00\x00\x00\x00"))
        stats.phase = "completed"
        return ReceiveResult(writer.path, size, result, stats)
    except BaseException as e:
        # Tell the source first: with a return path it then fails and keeps running.
        if send_rp is not None and loader is not None and loader.result.return_path:
            try:
                send_rp(rp_message(ReturnPathMessage.SHUT, b"\x00\x00\x00\x01"))
            except MigrationError:
                pass
        latch.fail(e)
        if multifd is not None:
            multifd.finishing = True
            multifd.barrier.release_all()
            multifd.join()
        writer.abort()
        stats.phase = "failed"
        first = latch.error
        if first is not e and isinstance(first, BaseException):
            raise first from None
        raise
    finally:
        if listener is not None:
            listener.close()
        if source is not None:
            source.close()


__all__ = ["ReceiveResult", "receive", "socket"]
