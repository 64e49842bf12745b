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

import socket
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from livemig import limits
from livemig.errors import ChannelError, ConfigError, PeerError, StreamFormatError, TransportError
from livemig.io.channels import DEFAULT_ACCEPT_TIMEOUT
from livemig.io.snapshot import SnapshotWriter
from livemig.io.uri import TcpUri, UnixUri, Uri, parse_uri
from livemig.migration.destination.device_state_capture import DeviceStateRecorder
from livemig.migration.common.failure import FailureLatch
from livemig.migration.destination.incoming_stream import IncomingMigration, multifd_settings
from livemig.migration.destination.loader import LoadResult
from livemig.migration.source.multifd_sender import sendmsg_all
from livemig.commands.send import VERDICT_TIMEOUT, sync_mode_for_machine
from livemig.migration.source.channels import ReturnPath, connect_channel, let_main_channel_lead
from livemig.migration.common.stats import TransferStats
from livemig.wire.constants import (
    Command,
    MultifdCompression,
    RamFlag,
    SectionType,
)
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
from livemig.wire.multifd import (
    InitPacket,
    encode_device_state_header,
    encode_ram_packet,
    encode_sync_packet,
    make_compressor,
)
from livemig.wire.ram import (
    encode_block_list,
    encode_eos,
    encode_multifd_flush,
    encode_named_record,
    encode_zero_records,
    page_record_headers,
)
from livemig.wire.stream import (
    encode_command,
    encode_file_header,
    encode_footer,
    encode_section_header,
    encode_vmdescription,
)

PS = limits.TARGET_PAGE_SIZE
PER_PACKET = limits.MULTIFD_PAGES_PER_PACKET
#: Pages of one address chunk always use the same outgoing channel.
CHUNK_PAGES = PER_PACKET


class _OutMain:
    """The destination's main channel; shared by the loader thread and, for
    pages and zero pages, the incoming channel threads (hence the lock)."""

    def __init__(self, sock: socket.socket, stats: TransferStats, latch: FailureLatch) -> None:
        self.sock = sock
        # Re-entrant: the forwarder holds it across a whole decision about section
        # bodies (is one open? close it, write the next header) while the helpers
        # it calls take it again.
        self.lock = threading.RLock()
        # Page and ZERO records may only go inside a RAM section body. Incoming
        # channels deliver pages at any time (QEMU's source keeps its own PART
        # header buffered while its channels run), so the relay opens a PART
        # section of its own when pages arrive between sections.
        self.body_open = False
        self.section_id = 0
        self.latch = latch
        self.buf = bytearray()
        self.last_block: str | None = None
        self.stats = stats
        self.sent = 0

    def put(self, data: bytes | bytearray | memoryview) -> None:
        with self.lock:
            self.buf += data
            if len(self.buf) >= 1 << 20:
                self._flush()

    def flush(self) -> None:
        with self.lock:
            self._flush()

    def set_body(self, is_open: bool, data: bytes = b"") -> None:
        """Write ``data`` (a section header or an EOS) and open or close the body with it."""
        with self.lock:
            self.buf += data
            self.body_open = is_open
            self.last_block = None

    def _await_body(self) -> None:
        if not self.body_open:
            self.buf += encode_section_header(SectionType.SECTION_PART, self.section_id)
            self.body_open = True
            self.last_block = None

    def _flush(self) -> None:
        if self.buf:
            try:
                self.sock.sendall(self.buf)
            except OSError as e:
                raise TransportError(f"destination main channel: send failed: "
                                     f"{e.strerror or e}") from e
            self.sent += len(self.buf)
            self.buf = bytearray()

    def zero_records(self, block: str, offsets: np.ndarray) -> None:
        with self.lock:
            self._await_body()
            self.buf += encode_zero_records(block, offsets, name_first=self.last_block != block)
            self.last_block = block
            if len(self.buf) >= 1 << 20:
                self._flush()

    def page_records(self, block: str, offsets: np.ndarray, data: np.ndarray) -> None:
        n = len(offsets)
        with self.lock:
            self._await_body()
            start = 0
            if self.last_block != block:
                self.buf += encode_named_record(block, int(offsets[0]), RamFlag.PAGE)
                self.buf += memoryview(np.ascontiguousarray(data[0])).cast("B")
                self.last_block = block
                start = 1
            if n > start:
                k = n - start
                rec = np.empty((k, 8 + PS), dtype=np.uint8)
                rec[:, :8] = page_record_headers(offsets[start:]).view(np.uint8).reshape(k, 8)
                rec[:, 8:] = data[start:]
                self.buf += memoryview(rec).cast("B")
            if len(self.buf) >= 1 << 20:
                self._flush()


class _OutChannels:
    """The destination's multifd channels, written directly by whichever thread
    has pages (one lock per channel keeps packets whole and in order)."""

    def __init__(self, socks: list[socket.socket], compression: MultifdCompression,
                 uuid: bytes | None, stats: TransferStats) -> None:
        self.socks = socks
        self.n = len(socks)
        self.locks = [threading.Lock() for _ in socks]
        self.comps = [make_compressor(compression) if compression is not MultifdCompression.NONE
                      else None for _ in socks]
        self.flag = int(compression.flag)
        self.stats = stats
        self._num = 0
        self._rr = 0
        self._num_lock = threading.Lock()
        self.sent = [0] * self.n
        for i, s in enumerate(socks):
            self._send(i, [InitPacket(uuid or bytes(16), i).encode()])

    def _next_num(self) -> int:
        with self._num_lock:
            n = self._num
            self._num += 1
            return n

    def _send(self, ch: int, bufs: list) -> None:
        try:
            sendmsg_all(self.socks[ch], bufs)
        except OSError as e:
            raise ChannelError(f"destination multifd channel {ch}: send failed: "
                               f"{e.strerror or e}") from e
        self.sent[ch] += sum(len(memoryview(b).cast("B")) for b in bufs)

    def send_pages(self, block: str, offsets: np.ndarray, data: np.ndarray) -> None:
        key = (offsets // np.uint64(PS * CHUNK_PAGES)).astype(np.int64)
        order = np.argsort(key, kind="stable")
        keys = key[order]
        bounds = np.flatnonzero(np.diff(keys)) + 1
        for part in np.split(order, bounds):
            ch = int(key[part[0]]) % self.n
            offs = offsets[part]
            pages = data[part]
            if not pages.flags.c_contiguous:
                pages = np.ascontiguousarray(pages)
            with self.locks[ch]:
                payload: bytes | memoryview = memoryview(pages).cast("B")
                comp = self.comps[ch]
                if comp is not None:
                    payload = comp.compress([payload])
                hdr = encode_ram_packet(flags=self.flag, ramblock=block, normal_offsets=offs,
                                        zero_offsets=None, packet_num=self._next_num(),
                                        payload_size=len(payload))
                self._send(ch, [hdr, payload])

    def send_device_state(self, idstr: str, instance_id: int, payload: memoryview) -> None:
        with self._num_lock:
            ch = self._rr
            self._rr = (ch + 1) % self.n
        hdr = encode_device_state_header(idstr, instance_id, len(payload))
        with self.locks[ch]:
            self._send(ch, [hdr, payload])

    def sync(self) -> None:
        for ch in range(self.n):
            with self.locks[ch]:
                self._send(ch, [encode_sync_packet(self._next_num())])


class _RelaySink:
    """RamSink/PageSink of the incoming side: forwards pages, optionally records them."""

    def __init__(self) -> None:
        self.main: _OutMain | None = None
        self.channels: _OutChannels | None = None
        self.record: SnapshotWriter | None = None

    def set_layout(self, config: Configuration | None, ram_section_id: int,
                   blocks: tuple[RamBlockInfo, ...]) -> None:
        # Forwarded here, before the incoming channels are let go: no page may
        # reach the destination before the block list.
        assert self.main is not None
        self.main.section_id = ram_section_id
        self.main.put(encode_block_list(blocks))
        if self.record is not None:
            self.record.set_layout(config, ram_section_id, blocks)

    def write_pages(self, block: str, offsets: np.ndarray, data: np.ndarray) -> None:
        if self.record is not None:
            self.record.write_pages(block, offsets, data)
        if self.channels is not None:
            self.channels.send_pages(block, offsets, data)
        else:
            assert self.main is not None
            self.main.page_records(block, offsets, data)

    def write_page_bytes(self, block: str, offset: int, page: bytes | bytearray) -> None:
        arr = np.frombuffer(bytes(page), dtype=np.uint8).reshape(1, PS)
        self.write_pages(block, np.array([offset], dtype=np.uint64), arr)

    def zero_pages(self, block: str, offsets: np.ndarray, fill: int = 0) -> None:
        if fill:
            self.write_pages(block, offsets, np.full((len(offsets), PS), fill, dtype=np.uint8))
            return
        if self.record is not None:
            self.record.zero_pages(block, offsets)
        assert self.main is not None
        self.main.zero_records(block, offsets)

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

    def __init__(self, sink: _RelaySink, dest: Uri, out_channels: int,
                 out_comp: MultifdCompression, latch: FailureLatch, stats: TransferStats) -> None:
        self.sink = sink
        self.dest = dest
        self.out_n = out_channels
        self.out_comp = out_comp
        self.latch = latch
        self.stats = stats
        self.mode = "per-round"
        self.sid: int | None = None
        self.kind: SectionType | None = None
        self.rp: ReturnPath | None = None
        self.main_sock: socket.socket | None = None
        self.chan_socks: list[socket.socket] = []
        self.device_sections: list[bytes] = []
        self.switchover_start = False
        self.switchover_at: int | None = None
        #: Checks and records multifd device state when recording (else None).
        self.recorder: DeviceStateRecorder | None = None
        self.pending_eof = False
        self.uuid_source: object = None  # callable giving the incoming channels' uuid

    def __call__(self, ev: object) -> None:
        t = type(ev)
        if t is CommandRecord and ev.cmd == Command.SWITCHOVER_START:  # type: ignore
            self.switchover_start = True
        if t is FileHeader:
            self._connect()
            self._main.put(encode_file_header())
        elif t is Configuration:
            cfg: Configuration = ev  # type: ignore[assignment]
            if "mapped-ram" in cfg.capabilities:
                raise ConfigError("relay takes a live migration, not a mapped-ram stream")
            self.mode = sync_mode_for_machine(cfg.machine)
            self._main.put(cfg.raw)
            self._main.put(encode_command(Command.OPEN_RETURN_PATH))
            self._main.put(encode_command(Command.PING, struct.pack(">I", 1)))
            self._main.flush()
            self.rp = ReturnPath(self.main_sock, self.latch)  # type: ignore[arg-type]
            self.rp.start()
            if self.out_n:
                let_main_channel_lead(self.dest)
                self.chan_socks = [connect_channel(self.dest) for _ in range(self.out_n)]
                for s in self.chan_socks:
                    self.latch.add_socket(s)
                uuid = cfg.uuid
                if uuid is None and callable(self.uuid_source):
                    uuid = self.uuid_source()  # the source's -uuid, from its own channels
                self.sink.channels = _OutChannels(self.chan_socks, self.out_comp,
                                                  uuid, self.stats)
        elif t is CommandRecord:
            if ev.cmd == Command.SWITCHOVER_START:  # type: ignore[attr-defined]
                main = self._main
                with main.lock:
                    if main.body_open:  # a PART the relay opened for late pages
                        self._sync_point(mid_section=False)
                    main.put(encode_command(Command.SWITCHOVER_START))
                    # at once: the destination's devices load their multifd state
                    # from here on, and may hold their channels until then
                    main.flush()
                self.switchover_at = len(self.device_sections)
        elif t is SectionHeader:
            if self.rp is None:
                raise ConfigError("the source sent no configuration section; livemig relay "
                                  "needs it (QEMU's send-configuration is on by default)")
            h: SectionHeader = ev  # type: ignore[assignment]
            self.sid, self.kind = h.section_id, h.kind
            main = self._main
            # Channel threads may open a PART of their own at any moment: decide and
            # write under the lock, so that no header lands inside an open body.
            with main.lock:
                if h.kind == SectionType.SECTION_PART and main.body_open:
                    pass  # the relay already opened a PART for early pages: go on in it
                else:
                    if main.body_open:  # END after a PART the relay opened itself
                        self._sync_point(mid_section=False)
                    main.set_body(True, encode_section_header(h.kind, h.section_id, h.idstr,
                                                              h.instance_id, h.version_id))
        elif t is RamMultifdFlush:
            self._sync_point(mid_section=True)
        elif t is RamEndOfSection:
            self._sync_point(mid_section=False)
        elif t is DeviceSection:
            self.device_sections.append(ev.raw)  # type: ignore[attr-defined]
            self._main.put(ev.raw)  # type: ignore[attr-defined]
        elif t is EndOfStream:
            # Held back: the destination completes (and runs the VM) once it has EOF,
            # so everything that can still fail on this side happens first.
            self.pending_eof = True
        elif t is VmDescriptionRecord:
            self._release_eof(ev.raw_json)  # type: ignore[attr-defined]

    def device_state(self, idstr: str, instance_id: int, payload: memoryview,
                     channel: int) -> None:
        """A multifd device-state packet from the source, passed on as it came."""
        if self.recorder is not None:
            self.recorder.on_packet(idstr, instance_id, payload, channel)
        chans = self.sink.channels
        if chans is None:
            raise StreamFormatError(f"device-state packet for {idstr} instance {instance_id}: "
                                    "the outgoing hop has no multifd channels to carry it "
                                    "(use --out-multifd-channels)",
                                    where=f"multifd channel {channel}")
        chans.send_device_state(idstr, instance_id, payload)

    @property
    def _main(self) -> _OutMain:
        assert self.sink.main is not None
        return self.sink.main

    def _connect(self) -> None:
        self.main_sock = connect_channel(self.dest)
        self.latch.add_socket(self.main_sock)
        self.sink.main = _OutMain(self.main_sock, self.stats, self.latch)

    def _sync_point(self, *, mid_section: bool) -> None:
        with self._main.lock:
            self._sync_point_locked(mid_section=mid_section)

    def _sync_point_locked(self, *, mid_section: bool) -> None:
        chans = self.sink.channels
        if chans is not None:
            self._main.flush()
            chans.sync()
            if self.mode == "per-round":
                self._main.put(encode_multifd_flush())
            elif mid_section:
                assert self.sid is not None
                # per-section destinations sync at EOS: close this section here
                self._main.set_body(True, encode_eos() + encode_footer(self.sid)
                                    + encode_section_header(SectionType.SECTION_PART, self.sid))
        if not mid_section:
            assert self.sid is not None
            self._main.set_body(False, encode_eos() + encode_footer(self.sid))
        self._main.flush()

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
        self._main.put(bytes([SectionType.EOF]))
        if raw_json is not None:
            self._main.put(encode_vmdescription(raw_json))
        self.pending_eof = False

    def finish(self) -> str:
        self._release_eof(None)
        self._main.flush()
        if self.main_sock is None or self.rp is None:
            raise TransportError("the source's migration ended before it started")
        if not self.rp.done.wait(VERDICT_TIMEOUT):
            raise PeerError(f"the destination did not confirm within {VERDICT_TIMEOUT:.0f} s")
        self.latch.raise_if_failed()
        if self.rp.shut is None:
            raise PeerError("the destination closed its connection without confirming the "
                            "migration")
        if self.rp.shut != 0:
            raise PeerError(f"the destination QEMU failed to load the migration (status "
                            f"{self.rp.shut})")
        return "confirmed by the destination"

    def close(self) -> None:
        for s in self.chan_socks + ([self.main_sock] if self.main_sock else []):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if self.rp is not None:
            self.rp.join(timeout=5)
        for s in self.chan_socks + ([self.main_sock] if self.main_sock else []):
            s.close()


def relay(listen: str | Uri, dest: str | Uri, *, in_multifd_channels: int = 0,
          in_multifd_compression: str = "none", out_multifd_channels: int = 0,
          out_multifd_compression: str = "none", record: str | None = None,
          stats: TransferStats | None = None, accept_timeout: float = DEFAULT_ACCEPT_TIMEOUT,
          on_listening: Callable[[str], None] | None = None) -> RelayResult:
    """Accept a migration on ``listen`` and forward it to the QEMU listening at ``dest``."""
    lu = parse_uri(listen) if isinstance(listen, str) else listen
    du = parse_uri(dest) if isinstance(dest, str) else dest
    if not isinstance(lu, (TcpUri, UnixUri)) or not isinstance(du, (TcpUri, UnixUri)):
        raise ConfigError("relay needs tcp: or unix: URIs on both sides")
    in_comp = multifd_settings(in_multifd_channels, in_multifd_compression, "--in-multifd")
    out_comp = multifd_settings(out_multifd_channels, out_multifd_compression,
                                "--out-multifd")
    stats = stats or TransferStats()
    latch = FailureLatch()
    sink = _RelaySink()
    writer = SnapshotWriter(record) if record else None
    sink.record = writer
    fwd = _Forwarder(sink, du, out_multifd_channels, out_comp, latch, stats)
    incoming = IncomingMigration(lu, in_multifd_channels, in_comp, sink, latch, stats,
                                 main_name="source main channel")
    try:
        incoming.connect(accept_timeout=accept_timeout, on_listening=on_listening)
        if incoming.multifd is not None:
            fwd.uuid_source = incoming.multifd.source_uuid
            incoming.multifd.on_device_state = fwd.device_state
            if writer is not None:
                fwd.recorder = DeviceStateRecorder(writer.store_device_state)
        stats.phase = "relaying"
        result = incoming.load(observer=fwd)
        stats.phase = "waiting for the destination"
        verdict = fwd.finish()
        incoming.confirm()
        stats.phase = "completed: " + verdict
        return RelayResult(result, stats, writer.path if writer else None)
    except BaseException as e:
        first: BaseException = latch.error or e
        if isinstance(first, TransportError) and fwd.rp is not None:
            fwd.rp.done.wait(2.0)  # a refusing destination says so before it closes
            if fwd.rp.shut:
                first = PeerError(f"the destination QEMU failed to load the migration (status "
                                  f"{fwd.rp.shut})")
        incoming.refuse()  # first, so that the source fails and keeps running
        latch.fail(first)
        incoming.abort()
        if writer is not None:
            writer.abort()
        stats.phase = "failed"
        if first is e:
            raise
        raise first from None
    finally:
        incoming.close()
        fwd.close()


__all__ = ["RelayResult", "relay"]
