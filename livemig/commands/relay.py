"""``livemig relay``: pass a live migration from a QEMU source to a QEMU destination.

Everything is forwarded as it arrives; nothing holds the whole VM. The
incoming side is ``receive``'s loader and multifd receiver; what they
deliver goes straight out:

* records of the main stream (configuration, RAM section headers, block
  list, device sections, EOF, JSON) are re-encoded or copied to the
  destination's main channel in order;
* pages go out on the destination's multifd channels (or as PAGE records
  when the outgoing hop has no multifd); zero pages always as ZERO records
  on the main channel, which every QEMU destination understands.

Ordering. A page can be sent several times (one copy per precopy pass), and
the two copies may arrive on different channels. Two rules keep the newest
copy last at the destination: (1) a page always leaves on the same outgoing
channel (chosen by its address), so copies on the outgoing side cannot
overtake each other; (2) every incoming sync point and every RAM section end
becomes an outgoing sync point (SYNC on every channel, then the marker the
destination's machine type expects), so records on the main channel (a ZERO
for a page that had data before) are ordered against the channels as well.

Verdict. The relay opens a return path to the destination and answers the
source's return path itself: the source gets SHUT(0) only after the
destination confirmed, and SHUT(1) (so it fails and keeps running) if
anything goes wrong on either hop.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from livemig import limits
from livemig.commands.dest_check import check_machine as check_machine_type
from livemig.commands.dest_check import (
    check_ram,
    explain_destination_failure,
    prepare_incoming,
)
from livemig.errors import ConfigError, StreamFormatError, TransportError
from livemig.io.channels import DEFAULT_ACCEPT_TIMEOUT
from livemig.io.qmp_peer import QmpPeer
from livemig.io.snapshot import SnapshotWriter
from livemig.io.tls import TlsSettings, settings_from
from livemig.io.uri import TcpUri, UnixUri, Uri, parse_uri
from livemig.migration.common.failure import FailureLatch
from livemig.migration.common.stats import TransferStats
from livemig.migration.common.sync import SyncMode
from livemig.migration.destination.device_state_capture import DeviceStateRecorder
from livemig.migration.destination.incoming_stream import IncomingMigration, multifd_settings
from livemig.migration.destination.loader import LoadResult
from livemig.migration.source.outgoing_stream import OutgoingStream
from livemig.migration.source.payloads import EncodedPacket, ForwardedPages
from livemig.wire.constants import Command, MultifdCompression, SectionType
from livemig.wire.events import (
    CommandRecord,
    Configuration,
    DeviceSection,
    EndOfStream,
    FileHeader,
    RamBlockInfo,
    RamEndOfSection,
    RamMultifdFlush,
    SectionHeader,
    VmDescriptionRecord,
)
from livemig.wire.multifd import encode_device_state_header
from livemig.wire.ram import encode_block_list
from livemig.wire.stream import encode_file_header, encode_vmdescription

PS = limits.TARGET_PAGE_SIZE
#: Pages of one address chunk always use the same outgoing channel.
CHUNK_PAGES = limits.MULTIFD_PAGES_PER_PACKET


class _RelaySink:
    """RamSink/PageSink of the incoming side: forwards pages, optionally records them."""

    def __init__(self, out: OutgoingStream, record: SnapshotWriter | None) -> None:
        self.out = out
        self.record = record
        #: The source's RAM blocks (name -> bytes), once its block list arrived.
        self.ram: dict[str, int] = {}
        #: ``--dest-qmp``: checks the block list against the destination first.
        self.check_ram: Callable[[dict[str, int]], None] | None = None

    def set_layout(self, config: Configuration | None, ram_section_id: int,
                   blocks: tuple[RamBlockInfo, ...]) -> None:
        self.ram = {b.name: b.length for b in blocks}
        if self.check_ram is not None:
            self.check_ram(self.ram)
        # Forwarded here, before the incoming channels are let go: no page may
        # reach the destination before the block list.
        self.out.ram_section_id = ram_section_id
        self.out.put(encode_block_list(blocks))
        if self.record is not None:
            self.record.set_layout(config, ram_section_id, blocks)

    def write_pages(self, block: str, offsets: np.ndarray, data: np.ndarray) -> None:
        if self.record is not None:
            self.record.write_pages(block, offsets, data)
        sender = self.out.sender
        if sender is None:
            self.out.send_pages(ForwardedPages(block, offsets, data))
            return
        # a page always leaves on the channel its address chunk maps to (ordering
        # rule 1 of the module docstring)
        key = (offsets // np.uint64(PS * CHUNK_PAGES)).astype(np.int64)
        order = np.argsort(key, kind="stable")
        bounds = np.flatnonzero(np.diff(key[order])) + 1
        for part in np.split(order, bounds):
            self.out.send_pages(ForwardedPages(block, offsets[part], data[part]),
                                channel=int(key[part[0]]))

    def write_page_bytes(self, block: str, offset: int, page: bytes | bytearray) -> None:
        arr = np.frombuffer(bytes(page), dtype=np.uint8).reshape(1, PS)
        self.write_pages(block, np.array([offset], dtype=np.uint64), arr)

    def zero_pages(self, block: str, offsets: np.ndarray, fill: int = 0) -> None:
        if fill:
            self.write_pages(block, offsets, np.full((len(offsets), PS), fill, dtype=np.uint8))
            return
        if self.record is not None:
            self.record.zero_pages(block, offsets)
        self.out.zero_records(block, offsets)

    def read_page(self, block: str, offset: int) -> bytearray:
        if self.record is not None:
            return self.record.read_page(block, offset)
        raise ConfigError("the source uses XBZRLE, which livemig relay only supports with "
                          "--record (it needs the previous page contents)")

    def copy_mapped_ram_block(self, src_fd: int, info: RamBlockInfo) -> int:
        raise ConfigError("relay takes a live migration, not a mapped-ram file")


@dataclass
class RelayResult:
    load: LoadResult
    stats: TransferStats
    recorded: str | None


class _Forwarder:
    """Turns the incoming main stream's records into the outgoing one."""

    def __init__(self, out: OutgoingStream, sink: _RelaySink) -> None:
        self.out = out
        self.sink = sink
        self.device_sections: list[bytes] = []
        self.switchover_start = False
        self.switchover_at: int | None = None
        #: Checks and records multifd device state when recording (else None).
        self.recorder: DeviceStateRecorder | None = None
        self.pending_eof = False
        self.configured = False
        #: The source's uuid as its own channels announced it (when the
        #: configuration carries none).
        self.uuid_source: Callable[[], bytes | None] | None = None
        #: ``--dest-qmp``: checks and prepares the destination for this machine type
        #: before the relay connects to it (the connection waits for the configuration).
        self.check_machine: Callable[[str], None] | None = None
        #: The source's machine type, once its configuration arrived.
        self.machine: str | None = None

    def _connect(self) -> None:
        self.out.connect()
        self.out.put(encode_file_header())

    def __call__(self, ev: object) -> None:
        out = self.out
        if isinstance(ev, FileHeader):
            if self.check_machine is None:
                self._connect()
        elif isinstance(ev, Configuration):
            if "mapped-ram" in ev.capabilities:
                raise ConfigError("relay takes a live migration, not a mapped-ram stream")
            self.machine = ev.machine
            if self.check_machine is not None:
                self.check_machine(ev.machine)
                self._connect()
            out.sync_mode = SyncMode.for_machine(ev.machine)
            out.put(ev.raw)
            out.open_return_path()
            self.configured = True
            uuid = ev.uuid
            if uuid is None and self.uuid_source is not None:
                uuid = self.uuid_source()  # the source's -uuid, from its own channels
            out.connect_multifd(uuid)
        elif isinstance(ev, CommandRecord):
            if ev.cmd == Command.SWITCHOVER_START:
                self.switchover_start = True
                with out.main.lock:
                    if out.body_open:  # a PART the relay opened for late pages
                        self._sync_point(mid_section=False)
                    # at once: the destination's devices load their multifd state
                    # from here on, and may hold their channels until then
                    out.command(Command.SWITCHOVER_START, flush=True)
                self.switchover_at = len(self.device_sections)
        elif isinstance(ev, SectionHeader):
            if not self.configured:
                raise ConfigError("the source sent no configuration section; livemig relay "
                                  "needs it (QEMU's send-configuration is on by default)")
            # Channel threads may open a PART of their own at any moment: decide and
            # write under the lock, so that no header lands inside an open body.
            with out.main.lock:
                if ev.kind == SectionType.SECTION_PART and out.body_open:
                    return  # the relay already opened a PART for early pages: go on in it
                if out.body_open:  # END after a PART the relay opened itself
                    self._sync_point(mid_section=False)
                out.ram_section_id = ev.section_id
                # (the decoder's section headers are the RAM section's START/PART/END)
                out.section_header(ev.kind, ev.section_id, ev.idstr, ev.instance_id,
                                   ev.version_id)
        elif isinstance(ev, RamMultifdFlush):
            self._sync_point(mid_section=True)
        elif isinstance(ev, RamEndOfSection):
            self._sync_point(mid_section=False)
        elif isinstance(ev, DeviceSection):
            self.device_sections.append(ev.raw)
            out.put(ev.raw)
        elif isinstance(ev, EndOfStream):
            # Held back: the destination completes (and runs the VM) once it has EOF,
            # so everything that can still fail on this side happens first.
            self.pending_eof = True
        elif isinstance(ev, VmDescriptionRecord):
            self._release_eof(ev.raw_json)

    def device_state(self, idstr: str, instance_id: int, payload: memoryview,
                     channel: int) -> None:
        """A multifd device-state packet from the source, passed on as it came."""
        if self.recorder is not None:
            self.recorder.on_packet(idstr, instance_id, payload, channel)
        if self.out.sender is None:
            raise StreamFormatError(f"device-state packet for {idstr} instance {instance_id}: "
                                    "the outgoing hop has no multifd channels to carry it "
                                    "(use --out-multifd-channels)",
                                    where=f"multifd channel {channel}")
        hdr = encode_device_state_header(idstr, instance_id, len(payload))
        self.out.dispatch(EncodedPacket((hdr, payload)))

    def _sync_point(self, *, mid_section: bool) -> None:
        """Every incoming sync point becomes an outgoing one (ordering rule 2)."""
        out = self.out
        with out.main.lock:
            if not mid_section:
                out.round_done(only_if_pending=True)
                out.end_ram_section()
            elif out.sender is not None and out.sync_mode.syncs_at_section_end:
                # per-section destinations sync at EOS: close this section here
                out.end_ram_section()
                out.section_header(SectionType.SECTION_PART, out.ram_section_id)
            else:
                out.round_done()
            out.flush()

    def _release_eof(self, raw_json: bytes | None) -> None:
        if not self.pending_eof:
            return
        writer = self.sink.record
        if writer is not None:
            if self.recorder is not None:
                self.recorder.finish()
            writer.commit(device_sections=self.device_sections, vmdesc_json=raw_json,
                          switchover_start=self.switchover_start,
                          switchover_at=self.switchover_at)
        self.out.put(bytes([SectionType.EOF]))
        if raw_json is not None:
            self.out.put(encode_vmdescription(raw_json))
        self.pending_eof = False

    def finish(self) -> str:
        if not self.configured:
            raise TransportError("the source's migration ended before it started")
        self._release_eof(None)
        self.out.finish()
        return self.out.await_verdict()


def relay(listen: str | Uri, dest: str | Uri, *, in_multifd_channels: int = 0,
          in_multifd_compression: str = "none", out_multifd_channels: int = 0,
          out_multifd_compression: str = "none", record: str | None = None,
          stats: TransferStats | None = None, accept_timeout: float = DEFAULT_ACCEPT_TIMEOUT,
          on_listening: Callable[[str], None] | None = None,
          dest_qmp: str | None = None,
          max_ram: int = limits.DEFAULT_MAX_GUEST_RAM,
          in_tls_creds: str | None = None, in_tls_authz: Sequence[str] = (),
          in_tls_verify_peer: bool = True, out_tls_creds: str | None = None,
          out_tls_hostname: str | None = None, out_tls_verify_peer: bool = True,
          ) -> RelayResult:
    """Accept a migration on ``listen`` and forward it to the QEMU listening at ``dest``.

    With ``dest_qmp`` (the destination's QMP socket), the destination is checked and
    prepared as ``send`` does it: its machine type once the source's configuration
    arrives, before the relay connects to it; its RAM once the source's block list
    arrives, before the block list is forwarded. A failure adds QEMU's own reason.
    ``max_ram`` is the most guest RAM the source may declare (as for ``receive``).
    ``in_tls_*`` and ``out_tls_*`` set each hop's TLS as ``receive`` and ``send`` do."""
    lu = parse_uri(listen) if isinstance(listen, str) else listen
    in_tls = settings_from(in_tls_creds, None, in_tls_authz, in_tls_verify_peer)
    out_tls = settings_from(out_tls_creds, out_tls_hostname, (), out_tls_verify_peer)
    du = parse_uri(dest) if isinstance(dest, str) else dest
    if not isinstance(lu, (TcpUri, UnixUri)) or not isinstance(du, (TcpUri, UnixUri)):
        raise ConfigError("relay needs tcp: or unix: URIs on both sides")
    in_comp = multifd_settings(in_multifd_channels, in_multifd_compression, "--in-multifd")
    out_comp = multifd_settings(out_multifd_channels, out_multifd_compression,
                                "--out-multifd")
    qmp: QmpPeer | None = None
    if dest_qmp:
        qmp = QmpPeer(dest_qmp)  # reachable now, or the relay does not start listening
    try:
        return _relay(lu, du, in_multifd_channels, in_comp, out_multifd_channels, out_comp,
                      record, stats or TransferStats(), accept_timeout, on_listening, qmp,
                      max_ram, in_tls, out_tls)
    finally:
        if qmp is not None:
            qmp.close()


def _relay(lu: Uri, du: Uri, in_multifd_channels: int, in_comp: MultifdCompression,
           out_multifd_channels: int, out_comp: MultifdCompression, record: str | None,
           stats: TransferStats, accept_timeout: float,
           on_listening: Callable[[str], None] | None, qmp: QmpPeer | None,
           max_ram: int, in_tls: TlsSettings | None,
           out_tls: TlsSettings | None) -> RelayResult:
    latch = FailureLatch()
    writer = SnapshotWriter(record) if record else None
    # the outgoing hop counts its own bytes: ``stats`` shows what arrives
    out = OutgoingStream(du, sync_mode=SyncMode.PER_ROUND, stats=TransferStats(),
                         channels=out_multifd_channels, compression=out_comp, latch=latch,
                         peer="the destination QEMU", direct=True, auto_part=True,
                         main_name="destination main channel", tls=out_tls)
    sink = _RelaySink(out, writer)
    fwd = _Forwarder(out, sink)
    if qmp is not None:
        peer = qmp

        def check_machine(machine: str) -> None:
            check_machine_type(peer, machine, "source")
            prepare_incoming(peer, du, out_multifd_channels, out_comp)

        fwd.check_machine = check_machine
        sink.check_ram = lambda ram: check_ram(peer, ram, "source")
    if writer is not None and in_multifd_channels:
        fwd.recorder = DeviceStateRecorder(writer.store_device_state)
    incoming = IncomingMigration(lu, in_multifd_channels, in_comp, sink, latch, stats,
                                 main_name="source main channel",
                                 on_device_state=fwd.device_state, max_ram=max_ram,
                                 tls=in_tls)
    try:
        incoming.connect(accept_timeout=accept_timeout, on_listening=on_listening)
        if incoming.multifd is not None:
            fwd.uuid_source = incoming.multifd.source_uuid
        stats.phase = "relaying"
        result = incoming.load(observer=fwd)
        stats.phase = "waiting for the destination"
        verdict = fwd.finish()
        incoming.confirm()
        stats.phase = "completed: " + verdict
        return RelayResult(result, stats, writer.path if writer else None)
    except BaseException as e:
        first = out.failure(e)
        incoming.refuse()  # first, so that the source fails and keeps running
        incoming.abort()
        if writer is not None:
            writer.abort()
        stats.phase = "failed"
        if out.connected and "destination" in str(first):
            ram = sink.ram.get("pc.ram")
            known = (f"the source's machine type is {fwd.machine or 'not known yet'}"
                     + (f", with {ram >> 20} MiB of RAM (pc.ram)" if ram else ""))
            better = explain_destination_failure(first, qmp, known, connected=True)
            if better is not None:
                raise better from None
        if first is e:
            raise
        raise first from None
    finally:
        incoming.close()
        out.close()


__all__ = ["RelayResult", "relay"]
