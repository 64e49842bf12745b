"""``livemig receive``: take a migration from a QEMU source into a snapshot."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from livemig.io.channels import DEFAULT_ACCEPT_TIMEOUT
from livemig.io.snapshot import SnapshotWriter
from livemig.io.uri import Uri, parse_uri
from livemig.migration.failure import FailureLatch
from livemig.migration.incoming import IncomingMigration, multifd_settings
from livemig.migration.loader import LoadResult
from livemig.migration.stats import TransferStats
from livemig.wire.constants import MultifdCompression


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
            on_listening: Callable[[str], None] | None = None) -> ReceiveResult:
    """Receive one migration on ``uri`` and write it to ``output`` as a mapped-ram snapshot.

    ``multifd_channels`` and ``multifd_compression`` mirror QEMU's parameters
    and must match the source's. Returns once the snapshot is on disk; on any
    failure nothing is left at ``output`` and the first cause is raised.
    """
    u = parse_uri(uri) if isinstance(uri, str) else uri
    comp = multifd_settings(multifd_channels, multifd_compression)
    stats = stats or TransferStats()
    latch = FailureLatch()
    writer = SnapshotWriter(output)
    incoming = IncomingMigration(u, multifd_channels, comp, writer, latch, stats)
    try:
        incoming.connect(accept_timeout=accept_timeout, on_listening=on_listening)
        stats.phase = "receiving"
        result = incoming.load()
        stats.phase = "writing the snapshot"
        size = writer.commit(device_sections=[s.raw for s in result.device_sections],
                             vmdesc_json=result.vmdesc_json,
                             switchover_start=result.switchover_start)
        incoming.confirm()
        stats.phase = "completed"
        return ReceiveResult(writer.path, size, result, stats)
    except BaseException as e:
        incoming.refuse()  # first, so that the source fails and keeps running
        latch.fail(e)
        incoming.abort()
        writer.abort()
        stats.phase = "failed"
        first = latch.error
        if first is not e and isinstance(first, BaseException):
            raise first from None
        raise
    finally:
        incoming.close()


__all__ = ["ReceiveResult", "receive"]
