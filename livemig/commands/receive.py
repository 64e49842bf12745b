"""``livemig receive``: take a migration from a QEMU source into a snapshot."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from livemig import limits
from livemig.io.channels import DEFAULT_ACCEPT_TIMEOUT, FileSource
from livemig.io.tls import settings_from
from livemig.io.snapshot import SnapshotWriter, trailer_packets, trailer_payload
from livemig.io.uri import Uri, parse_uri
from livemig.migration.common.failure import FailureLatch
from livemig.migration.common.stats import TransferStats
from livemig.migration.destination.device_state_capture import (
    DEVICE_STATE_DRAIN,
    DeviceStateRecorder,
    multifd_devices,
)
from livemig.migration.destination.incoming_stream import IncomingMigration, multifd_settings
from livemig.migration.destination.loader import LoadResult
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
            device_state_drain: float = DEVICE_STATE_DRAIN,
            on_listening: Callable[[str], None] | None = None,
            max_ram: int = limits.DEFAULT_MAX_GUEST_RAM,
            tls_creds: str | None = None, tls_authz: Sequence[str] = (),
            tls_verify_peer: bool = True) -> ReceiveResult:
    """Receive one migration on ``uri`` and write it to ``output`` as a mapped-ram snapshot.

    ``multifd_channels`` and ``multifd_compression`` mirror QEMU's parameters
    and must match the source's. ``max_ram`` is the most guest RAM the
    source may declare (a larger VM is refused before anything is sized for
    it). ``tls_creds`` (a directory laid out as QEMU's ``tls-creds-x509``) makes
    every channel TLS, this side the server: ``tls_verify_peer`` requires a client
    certificate signed by the CA, ``tls_authz`` lists the client distinguished names
    let in (``O=...,CN=...``, as QEMU writes them). Returns once the snapshot is on disk; on any
    failure nothing is left at ``output`` and the first cause is raised.
    """
    u = parse_uri(uri) if isinstance(uri, str) else uri
    tls = settings_from(tls_creds, None, tls_authz, tls_verify_peer)
    comp = multifd_settings(multifd_channels, multifd_compression)
    stats = stats or TransferStats()
    latch = FailureLatch()
    writer = SnapshotWriter(output)
    devices = DeviceStateRecorder(writer.store_device_state)
    latch.on_failure(devices.wake)
    try:
        incoming = IncomingMigration(u, multifd_channels, comp, writer, latch, stats,
                                     on_device_state=devices.on_packet,
                                     on_channels_ended=devices.channels_ended,
                                     max_ram=max_ram, tls=tls)
    except BaseException:
        writer.abort()  # (its writeback thread too)
        raise
    try:
        incoming.connect(accept_timeout=accept_timeout, on_listening=on_listening)
        stats.phase = "receiving"

        def drain(result: LoadResult) -> None:
            devices.wait_complete(multifd_devices(result.device_sections),
                                  device_state_drain, lambda: latch.failed)

        result = incoming.load(drain=drain if incoming.multifd is not None else None)
        _copy_trailer(incoming.source, devices)
        devices.finish()
        stats.phase = "writing the snapshot"
        size = writer.commit(device_sections=[s.raw for s in result.device_sections],
                             vmdesc_json=result.vmdesc_json,
                             switchover_start=result.switchover_start,
                             switchover_at=result.switchover_at)
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


def _copy_trailer(source: object, devices: DeviceStateRecorder) -> None:
    """A snapshot read with file: keeps its multifd device state in the new one."""
    if not isinstance(source, FileSource) or source.trailer is None:
        return
    for p in trailer_packets(source.fd, source.trailer):
        devices.on_packet(p.idstr, p.instance_id, memoryview(trailer_payload(source.fd, p)))


__all__ = ["ReceiveResult", "receive"]
