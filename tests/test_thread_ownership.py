"""Every thread has an owner that joins it, on every path (issue 11, "Owned threads").

The destination side over real sockets (unix sockets and socketpairs), fed by a tiny
hand-built stream (the fake source of ``hostile_source``) or by real QEMU captures:

* a receive that succeeds, fifty times over: threads and descriptors back where they
  started after each one;
* faults (a multifd channel closed mid-packet, a stalled source and a cancel, a cancel
  while waiting for the source or for a silent connection, a stream that never sends
  the RAM block list): every receive thread ends within :data:`PROMPT` seconds and the
  error is the first cause;
* the multifd receive channel's state table, and the sync barrier's wake-up on a main
  channel hang-up (no polling);
* the QMP server's and the vhost-user back-end's threads: no daemons, joined by close.

Waits are for events, each with a deadline that only turns a hang into a failure.
"""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers import livemig_env
from hostile_source import (
    EOS,
    FakeSource,
    init_packet,
    main_prefix,
    pages_packet,
    ram_word,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from peers import read_capture

from livemig.commands.receive import receive
from livemig.control import QmpServer
from livemig.errors import (
    ChannelError,
    ConfigError,
    MigrationError,
    StreamFormatError,
    TransportError,
    TruncatedStream,
)
from livemig.io.channels import SocketSource
from livemig.io.snapshot import SnapshotWriter
from livemig.io.uri import UnixUri
from livemig.migration.common.failure import FailureLatch
from livemig.migration.common.stats import TransferStats
from livemig.migration.destination import multifd_receiver
from livemig.migration.destination.incoming_stream import IncomingMigration
from livemig.migration.destination.multifd_receiver import MultifdReceiver, SyncBarrier
from livemig.wire.constants import MultifdCompression, RamFlag, SectionType
from livemig.wire.multifd import encode_device_state_header, encode_sync_packet
from livemig.wire.multifd_channel import (
    RECV_CHANNEL_TRANSITIONS,
    ChannelInput,
    ChannelState,
    RecvChannel,
)
from livemig.wire.stream import encode_configuration, encode_file_header

PS = 4096
BLOCKS = [("pc.ram", 1 << 20)]
#: Seconds in which every thread of a failed or cancelled receive must have ended.
PROMPT = 2.0
#: Deadline that turns a hung step into a failure (never expected to be reached).
HANG = 30.0


def be32(v: int) -> bytes:
    return struct.pack(">I", v)


FOOTER = b"\x7e" + be32(2)


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.fixture
def sockdir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="lmt-", dir="/tmp"))  # short: unix paths <= 107 bytes
    yield d
    for p in d.iterdir():
        p.unlink()
    d.rmdir()


class Owned:
    """A function run in a thread the test owns; ``done`` is set when it returned."""

    def __init__(self, fn: Callable[[], Any], name: str) -> None:
        self.result: Any = None
        self.error: BaseException | None = None
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(fn,), name=name)
        self.thread.start()

    def _run(self, fn: Callable[[], Any]) -> None:
        try:
            self.result = fn()
        except BaseException as e:  # noqa: BLE001 - the test looks at it
            self.error = e
        finally:
            self.done.set()

    def join(self, timeout: float = HANG) -> None:
        assert self.done.wait(timeout), f"{self.thread.name} did not end within {timeout} s"
        self.thread.join()


def receive_owned(path: Path, out: Path, listening: threading.Event,
                  channels: int = 2) -> Owned:
    return Owned(lambda: receive(f"unix:{path}", str(out), multifd_channels=channels,
                                 accept_timeout=HANG,
                                 on_listening=lambda _: listening.set()),
                 "test receive")


def play_complete(src: FakeSource) -> None:
    """A small but complete migration: two sync rounds, pages on both channels."""
    src.send_main(main_prefix(BLOCKS) + ram_word(0, RamFlag.MULTIFD_FLUSH) + EOS + FOOTER)
    src.send_chan(0, init_packet(0) + encode_sync_packet(1)
                  + pages_packet([0, PS], packet_num=2) + encode_sync_packet(3))
    src.send_chan(1, init_packet(1) + encode_sync_packet(1)
                  + pages_packet([8 * PS], packet_num=2) + encode_sync_packet(3))
    src.send_main(b"\x03" + be32(2) + ram_word(0, RamFlag.MULTIFD_FLUSH) + EOS + FOOTER
                  + bytes([SectionType.EOF]))
    src.close()  # no JSON follows: the stream ends here


def run_receive(sockdir: Path, tmp_path: Path, play: Callable[[FakeSource], None],
                name: str = "out.snap") -> Owned:
    """One receive on a unix socket fed by ``play``; returns after it ended."""
    path = sockdir / "m.sock"
    listening = threading.Event()
    r = receive_owned(path, tmp_path / name, listening)
    assert listening.wait(HANG)
    src = FakeSource(str(path), 2)
    try:
        play(src)
        r.join()
    finally:
        src.close()
    return r


def receive_threads() -> list[str]:
    return [t.name for t in threading.enumerate()
            if t.name.startswith(("incoming/", "multifd-recv", "snapshot-writeback"))]


# --------------------------------------------------------------------------------------------
# Clean runs: nothing left behind
# --------------------------------------------------------------------------------------------


def test_fifty_receives_leave_no_thread_and_no_descriptor(sockdir: Path, tmp_path: Path) -> None:
    run_receive(sockdir, tmp_path, play_complete, "warm-up.snap")  # lazy imports, caches
    threads, fds = threading.active_count(), open_fds()
    for i in range(50):
        r = run_receive(sockdir, tmp_path, play_complete, f"{i}.snap")
        assert r.error is None, r.error
        assert r.result.load.multifd_sync_mode == "per-round"
        assert (threading.active_count(), open_fds()) == (threads, fds), f"run {i}"
    assert receive_threads() == []


@pytest.mark.parametrize("capture", ["qemu7.2-multifd-none-2ch", "qemu10.0-multifd-none-2ch"])
def test_replayed_qemu_capture_leaves_nothing_behind(capture: str, sockdir: Path,
                                                     tmp_path: Path) -> None:
    """Real QEMU bytes (both sync modes), one connection per recorded one, each written
    by a thread of its own as QEMU's channels are."""
    conns = [read_capture(f"{capture}/conn{i}.bin") for i in range(3)]
    threads, fds = threading.active_count(), open_fds()
    path = sockdir / "m.sock"
    listening = threading.Event()
    r = receive_owned(path, tmp_path / "out.snap", listening)
    assert listening.wait(HANG)
    socks = []
    for _ in conns:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(HANG)
        s.connect(str(path))
        socks.append(s)
    writers = [Owned(lambda s=s, data=data: s.sendall(data), f"conn{i}")
               for i, (s, data) in enumerate(zip(socks, conns, strict=True))]
    for w in writers:
        w.join()
        assert w.error is None, w.error
    for s in socks:
        s.shutdown(socket.SHUT_WR)
    r.join()
    for s in socks:
        s.close()
    assert r.error is None, r.error
    assert r.result.snapshot_bytes > 0
    assert (threading.active_count(), open_fds()) == (threads, fds)


# --------------------------------------------------------------------------------------------
# Faults: every thread ends promptly, the first cause is what the caller gets
# --------------------------------------------------------------------------------------------


def test_channel_closed_mid_packet_ends_every_thread_with_the_cause(sockdir: Path,
                                                                   tmp_path: Path) -> None:
    threads, fds = threading.active_count(), open_fds()
    path = sockdir / "m.sock"
    listening = threading.Event()
    r = receive_owned(path, tmp_path / "out.snap", listening)
    assert listening.wait(HANG)
    src = FakeSource(str(path), 2)
    try:
        src.send_main(main_prefix(BLOCKS))
        src.send_chan(0, init_packet(0))
        src.send_chan(1, init_packet(1) + pages_packet([0, PS])[:1344 + 5000])
        src.close_chan(1)  # the fault; the other connections stay open and silent
        assert r.done.wait(PROMPT), "receive threads still running after the fault"
        r.join()
    finally:
        src.close()
    assert isinstance(r.error, TruncatedStream)
    assert str(r.error) == ("multifd channel 1, offset 0x40: the source closed the channel in "
                            "the middle of packet 0's pages (5000 of 8192 bytes)")
    assert receive_threads() == []
    assert (threading.active_count(), open_fds()) == (threads, fds)
    assert not (tmp_path / "out.snap").exists()


class LayoutSignal(SnapshotWriter):
    """A snapshot writer that says when the RAM block list has arrived."""

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self.layout = threading.Event()

    def set_layout(self, *args: Any) -> None:
        super().set_layout(*args)
        self.layout.set()


def incoming_owned(inc: IncomingMigration, writer: SnapshotWriter) -> Owned:
    """What ``receive`` does with an IncomingMigration, with the latch in the test's hands."""
    def run() -> None:
        try:
            inc.connect(accept_timeout=HANG)
            inc.load()
        except BaseException as e:  # noqa: BLE001 - re-raised below (its first cause)
            inc.latch.fail(e)
            inc.abort()
            writer.abort()
            first = inc.latch.error
            raise first if first is not None else e from None
        finally:
            inc.close()
    return Owned(run, "test incoming")


def test_stalled_source_and_cancel(sockdir: Path, tmp_path: Path) -> None:
    """The source stops sending after the block list (every thread blocked in a read);
    a cancel ends the main channel, both channel threads and the listener's watch."""
    threads, fds = threading.active_count(), open_fds()
    latch = FailureLatch()
    writer = LayoutSignal(str(tmp_path / "out.snap"))
    inc = IncomingMigration(UnixUri(str(sockdir / "m.sock")), 2, MultifdCompression.NONE,
                            writer, latch, TransferStats())
    r = incoming_owned(inc, writer)
    src = FakeSource(str(sockdir / "m.sock"), 2)
    try:
        src.send_main(main_prefix(BLOCKS))
        src.send_chan(0, init_packet(0) + pages_packet([0])[:100])
        src.send_chan(1, init_packet(1))
        assert writer.layout.wait(HANG)
        cancel = MigrationError("cancelled by the test")
        latch.fail(cancel)
        assert r.done.wait(PROMPT), "receive threads still running after the cancel"
        r.join()
    finally:
        src.close()
    assert r.error is cancel
    assert inc.multifd is not None
    assert inc.multifd.channel_states() == [ChannelState.ENDED, ChannelState.ENDED]
    assert (threading.active_count(), open_fds()) == (threads, fds)


def test_cancel_while_waiting_for_the_source(sockdir: Path, tmp_path: Path) -> None:
    """No source ever connects: the cancel wakes the accept (no accept timeout needed)."""
    threads, fds = threading.active_count(), open_fds()
    latch = FailureLatch()
    writer = SnapshotWriter(str(tmp_path / "out.snap"))
    listening = threading.Event()
    inc = IncomingMigration(UnixUri(str(sockdir / "m.sock")), 2, MultifdCompression.NONE,
                            writer, latch, TransferStats())

    def run() -> None:
        try:
            inc.connect(accept_timeout=HANG, on_listening=lambda _: listening.set())
        finally:
            inc.close()
            writer.abort()

    r = Owned(run, "test incoming")
    assert listening.wait(HANG)
    latch.fail(MigrationError("cancelled while listening"))
    assert r.done.wait(PROMPT), "still waiting for the source after the cancel"
    r.join()
    assert isinstance(r.error, TransportError)
    assert not (sockdir / "m.sock").exists()
    assert (threading.active_count(), open_fds()) == (threads, fds)


def test_cancel_while_a_connection_stays_silent(sockdir: Path, tmp_path: Path) -> None:
    """A connection that sends nothing is being classified (up to 30 s): a cancel ends
    that wait too."""
    threads, fds = threading.active_count(), open_fds()
    latch = FailureLatch()
    writer = SnapshotWriter(str(tmp_path / "out.snap"))
    listening = threading.Event()
    accepted = threading.Event()
    inc = IncomingMigration(UnixUri(str(sockdir / "m.sock")), 2, MultifdCompression.NONE,
                            writer, latch, TransferStats())
    add_socket = latch.add_socket

    def spy(sock: socket.socket) -> None:  # the listener hands each connection here
        add_socket(sock)
        accepted.set()

    latch.add_socket = spy  # type: ignore[method-assign]

    def run() -> None:
        try:
            inc.connect(accept_timeout=HANG, on_listening=lambda _: listening.set())
        finally:
            inc.close()
            writer.abort()

    r = Owned(run, "test incoming")
    assert listening.wait(HANG)
    silent = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        silent.connect(str(sockdir / "m.sock"))
        assert accepted.wait(HANG)
        latch.fail(MigrationError("cancelled"))
        assert r.done.wait(PROMPT), "still classifying the silent connection after the cancel"
        r.join()
    finally:
        silent.close()
    assert isinstance(r.error, TransportError)
    assert (threading.active_count(), open_fds()) == (threads, fds)


def test_stream_without_ram_ends_the_channels(sockdir: Path, tmp_path: Path) -> None:
    """The main stream ends without ever sending the RAM block list, which the channel
    threads wait for before their first packet: ending the migration ends them too."""
    threads, fds = threading.active_count(), open_fds()

    def play(src: FakeSource) -> None:
        src.send_chan(0, init_packet(0))
        src.send_chan(1, init_packet(1))
        src.send_main(encode_file_header() + encode_configuration("pc-i440fx-7.2")
                      + bytes([SectionType.EOF]))
        src.close_main()  # no JSON follows: the stream ends here

    r = run_receive(sockdir, tmp_path, play)
    assert r.error is None or isinstance(r.error, MigrationError), r.error
    assert receive_threads() == []
    assert (threading.active_count(), open_fds()) == (threads, fds)


def test_bad_options_leave_no_thread(tmp_path: Path) -> None:
    """multifd over exec: is refused after the snapshot was opened: its writeback thread
    must not outlive the error (it would keep the process from exiting)."""
    threads, fds = threading.active_count(), open_fds()
    with pytest.raises(ConfigError, match="multifd needs a tcp: or unix: URI"):
        receive("exec:true", str(tmp_path / "out.snap"), multifd_channels=2)
    assert (threading.active_count(), open_fds()) == (threads, fds)
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------------------------
# The multifd receiver: constructor callbacks, state table
# --------------------------------------------------------------------------------------------


class MemorySink:
    def __init__(self) -> None:
        self.pages: dict[tuple[str, int], bytes] = {}

    def write_pages(self, block: str, offsets: np.ndarray, data: np.ndarray) -> None:
        for off, page in zip(offsets.tolist(), data, strict=True):
            self.pages[(block, off)] = page.tobytes()

    def zero_pages(self, block: str, offsets: np.ndarray, fill: int = 0) -> None:
        for off in offsets.tolist():
            self.pages[(block, off)] = bytes([fill]) * PS


def test_receiver_over_socketpairs_with_constructor_callbacks() -> None:
    threads, fds = threading.active_count(), open_fds()
    pairs = [socket.socketpair() for _ in range(2)]
    got: list[tuple[str, int, bytes, int]] = []
    ended = threading.Event()
    latch = FailureLatch()
    rx = MultifdReceiver([a for a, _ in pairs], MultifdCompression.NONE, MemorySink(), latch,
                         TransferStats(),
                         on_device_state=lambda i, n, p, ch: got.append((i, n, bytes(p), ch)),
                         on_channels_ended=ended.set)
    rx.start()
    try:
        payload = b"device state"
        pairs[0][1].sendall(init_packet(0) + pages_packet([0])
                            + encode_device_state_header("dev/vfio", 3, len(payload)) + payload)
        pairs[1][1].sendall(init_packet(1) + pages_packet([PS]))
        rx.set_blocks(dict(BLOCKS))
        for _, b in pairs:
            b.shutdown(socket.SHUT_WR)  # the source closes both channels, between packets
        assert ended.wait(HANG)
        rx.finish()
    finally:
        for _, b in pairs:
            b.close()
    latch.raise_if_failed()
    assert got == [("dev/vfio", 3, payload, 0)]
    assert rx.channel_states() == [ChannelState.ENDED, ChannelState.ENDED]
    assert [c.packets for c in rx.channels] == [2, 1]
    assert rx.sink.pages.keys() == {("pc.ram", 0), ("pc.ram", PS)}
    assert (threading.active_count(), open_fds()) == (threads, fds)


def test_incoming_migration_passes_its_callbacks_on(sockdir: Path, tmp_path: Path) -> None:
    seen: list[str] = []
    inc = IncomingMigration(UnixUri(str(sockdir / "m.sock")), 2, MultifdCompression.NONE,
                            MemorySink(), FailureLatch(), TransferStats(),  # type: ignore[arg-type]
                            on_device_state=lambda *a: seen.append("packet"),
                            on_channels_ended=lambda: seen.append("ended"))
    r = Owned(lambda: inc.connect(accept_timeout=HANG), "test connect")
    src = FakeSource(str(sockdir / "m.sock"), 2)
    try:
        src.send_main(main_prefix(BLOCKS))  # the first bytes classify the connections
        src.send_chan(0, init_packet(0))
        src.send_chan(1, init_packet(1))
        r.join()
        assert r.error is None, r.error
        assert inc.multifd is not None
        assert inc.multifd.on_device_state is inc.on_device_state
        assert inc.multifd.on_channels_ended is inc.on_channels_ended
    finally:
        src.close()
        inc.abort()
        inc.close()


def test_channel_table_legal_life() -> None:
    ch = RecvChannel(1)
    assert ch.where == "multifd connection 1"
    ch.receive(ChannelInput.INIT_PACKET, channel_id=0)
    assert ch.where == "multifd channel 0"
    for ev in (ChannelInput.LAYOUT, ChannelInput.RAM_PACKET, ChannelInput.DEVICE_STATE_PACKET,
               ChannelInput.SYNC_PACKET):
        ch.receive(ev)
    assert ch.state is ChannelState.AT_SYNC
    ch.receive(ChannelInput.RELEASED)
    assert ch.receive(ChannelInput.SOURCE_CLOSED) is ChannelState.ENDED
    assert ch.packets == 3


def test_channel_table_refuses_and_poisons() -> None:
    ch = RecvChannel(0)
    ch.receive(ChannelInput.INIT_PACKET, channel_id=2)
    ch.receive(ChannelInput.LAYOUT)
    ch.receive(ChannelInput.RAM_PACKET)
    ch.receive(ChannelInput.SYNC_PACKET)
    with pytest.raises(StreamFormatError) as info:
        ch.receive(ChannelInput.SYNC_PACKET)
    assert str(info.value) == ("multifd channel 2: packet 2: a RAM packet with SYNC while the "
                               "channel is waiting at a sync point")
    with pytest.raises(StreamFormatError) as again:
        ch.receive(ChannelInput.RELEASED)
    assert again.value is info.value


@given(st.lists(st.sampled_from(list(ChannelInput)), max_size=12))
@settings(max_examples=200, deadline=None)
def test_channel_table_any_input_sequence(inputs: list[ChannelInput]) -> None:
    """Follow the table, or raise our error naming channel and packet; nothing else."""
    ch = RecvChannel(5)
    state = ChannelState.HANDSHAKE
    for ev in inputs:
        nxt = RECV_CHANNEL_TRANSITIONS.get((state, ev))
        if nxt is None:
            with pytest.raises(StreamFormatError) as info:
                ch.receive(ev, channel_id=7)
            assert info.value.where in ("multifd connection 5", "multifd channel 7")
            assert info.value.message.startswith(f"packet {ch.packets}: {ev.value} while ")
            return
        assert ch.receive(ev, channel_id=7) is nxt
        state = nxt


# --------------------------------------------------------------------------------------------
# The sync barrier: woken by the main channel's hang-up, not by a poll
# --------------------------------------------------------------------------------------------


class Watch(SocketSource):
    """The main channel, counting how often the barrier asks whether the peer is there."""

    def __init__(self, sock: socket.socket) -> None:
        super().__init__(sock)
        self.asked = 0

    def alive(self) -> bool:
        self.asked += 1
        return super().alive()


def barrier_and_main() -> tuple[SyncBarrier, FailureLatch, Watch, socket.socket]:
    latch = FailureLatch()
    ours, theirs = socket.socketpair()
    return SyncBarrier(2, latch), latch, Watch(ours), theirs


def test_hang_up_at_a_sync_point_ends_the_wait(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(multifd_receiver, "MAIN_HANGUP_GRACE", 0.05)
    barrier, _, main, theirs = barrier_and_main()
    theirs.close()
    try:
        with pytest.raises(TruncatedStream, match=r"closed the main channel while the multifd "
                                                  r"channels were at a sync point \(0 of 2"):
            barrier.main_sync("main channel", main)
    finally:
        main.close()
        barrier.close()
    assert main.asked == 1  # once, when the hang-up woke it


def test_channels_arriving_after_a_hang_up_are_fine(monkeypatch: pytest.MonkeyPatch) -> None:
    """A source without a return path closes its main channel right after the last byte;
    its channels' SYNC packets may arrive after that."""
    monkeypatch.setattr(multifd_receiver, "MAIN_HANGUP_GRACE", HANG)
    barrier, _, main, theirs = barrier_and_main()
    theirs.close()
    sync = Owned(lambda: barrier.main_sync("main channel", main), "main")
    channels = [Owned(barrier.channel_reached, f"channel {i}") for i in range(2)]
    try:
        sync.join()
        for c in channels:
            c.join()
    finally:
        main.close()
        barrier.close()
    assert sync.error is None and all(c.error is None for c in channels)
    assert main.asked <= 1


def test_hang_up_after_more_data_is_not_a_dead_source(monkeypatch: pytest.MonkeyPatch) -> None:
    """Closed after sending more than the main thread has read: the channels are waited
    for (here until the sync timeout), the hang-up looked at once only."""
    monkeypatch.setattr(multifd_receiver, "MAIN_HANGUP_GRACE", 0.0)
    monkeypatch.setattr(multifd_receiver, "SYNC_TIMEOUT", 0.2)
    barrier, _, main, theirs = barrier_and_main()
    theirs.sendall(b"\x02")
    theirs.close()
    try:
        with pytest.raises(ChannelError, match="did not reach the sync point"):
            barrier.main_sync("main channel", main)
    finally:
        main.close()
        barrier.close()
    assert main.asked == 1


def test_failure_wakes_the_waiting_main_thread() -> None:
    barrier, latch, main, theirs = barrier_and_main()
    cause = ChannelError("multifd channel 1: broken")
    sync = Owned(lambda: barrier.main_sync("main channel", main), "main")
    latch.fail(cause)
    try:
        assert sync.done.wait(PROMPT)
        sync.join()
    finally:
        theirs.close()
        main.close()
        barrier.close()
    assert sync.error is cause
    assert main.asked == 0


# --------------------------------------------------------------------------------------------
# QMP server and vhost-user back-end
# --------------------------------------------------------------------------------------------


def _qmp_client(address: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(HANG)
    s.connect(address.removeprefix("unix:"))
    buf = b""
    while b"\n" not in buf:
        chunk = s.recv(4096)
        assert chunk, "no greeting"
        buf += chunk
    return s


def test_qmp_server_threads_are_owned_not_daemons(sockdir: Path) -> None:
    before = set(threading.enumerate())
    srv = QmpServer(f"unix:{sockdir / 'q.sock'}", {})
    srv.start()
    clients = [_qmp_client(srv.address) for _ in range(3)]
    try:
        mine = set(threading.enumerate()) - before
        assert len(mine) == 4  # accept + one per client
        assert not [t.name for t in mine if t.daemon]
    finally:
        srv.close()
        for c in clients:
            c.close()
    assert not [t.name for t in mine if t.is_alive()]
    assert set(threading.enumerate()) == before


def test_process_with_a_closed_qmp_server_exits(sockdir: Path) -> None:
    """Without daemon threads, close() is what lets the process end: a client still
    connected and idle does not keep it alive."""
    script = f"""
import socket
from livemig.control import QmpServer
srv = QmpServer("unix:{sockdir / 'q.sock'}", {{}})
srv.start()
c = socket.socket(socket.AF_UNIX)
c.connect("{sockdir / 'q.sock'}")
assert c.recv(4096)
srv.close()
print("closed", flush=True)
"""
    p = subprocess.run([sys.executable, "-c", script], env=livemig_env(), capture_output=True,
                       text=True, timeout=HANG, check=False)
    assert (p.returncode, p.stdout) == (0, "closed\n"), p.stderr


def test_vhost_user_transfer_thread_is_joined_on_shutdown(sockdir: Path) -> None:
    """A save blocked on a pipe that nobody reads, then the server shuts down: the
    transfer is cancelled and its thread joined (it used to be left running)."""
    from test_vhost_user_backend import SAVE, RawFrontend

    from livemig.vhost_user.backend import BackendServer, TransferCancelled
    from livemig.vhost_user.fs_backend import FsBackend

    threads, fds = threading.active_count(), open_fds()
    server = BackendServer(FsBackend(5, state_size=4 << 20), socket_path=str(sockdir / "vu"))
    served = Owned(server.serve_forever, "test backend server")
    f = RawFrontend(str(sockdir / "vu"))
    pipe = None
    try:
        f.negotiate()
        _, pipe = f.start_transfer(SAVE)
        assert pipe is not None
        conn = server.connection
        assert conn is not None
        server.shutdown()  # (SIGTERM does this)
        f.close()  # the front-end goes, its end of the pipe still open and unread
        served.join()
    finally:
        f.close()
        if pipe is not None:
            os.close(pipe)
    assert served.error is None, served.error
    assert [(d.name, type(e)) for d, e in conn.transfers] == [("SAVE", TransferCancelled)]
    assert (threading.active_count(), open_fds()) == (threads, fds)
