"""The source side of one migration, written once: the mirror of ``incoming_stream``.

``send`` (a snapshot into QEMU), ``relay`` (a live migration passed on) and
the engine (a livemig machine migrating) all compose an
:class:`OutgoingStream`; none of them touches a socket. It owns:

* the **main channel** (a socket, or a command's stdin for ``exec:``) and its
  send buffer;
* the **return path** (a reader thread for PONG and SHUT) and so the
  destination's **verdict** (:meth:`await_verdict`, one timeout for all);
* the **multifd channels**, one :class:`MultifdSender` whose payload is chosen
  per use (:mod:`.payloads`);
* the **sync points**: callers say "a round of the dirty scan ended"
  (:meth:`round_done`) and "the RAM section ends" (:meth:`end_ram_section`);
  QEMU's per-section / per-round rules (:class:`SyncMode`) decide what goes
  on the wire;
* the RAM section body on the main channel (PAGE/ZERO records, which block
  was named last, a PART opened for pages that arrive between sections);
* **one failure latch and one thread group**: the first error of any thread
  shuts every channel; :meth:`close` (the end of the ``with`` block) joins
  every thread and closes every descriptor, whatever happened.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import subprocess
from types import TracebackType
from typing import Self

import numpy as np

from livemig.errors import ConfigError, PeerError, TransportError
from livemig.io.channels import end_command, start_command
from livemig.io.interrupts import deferred
from livemig.io.tls import TlsSettings, refused
from livemig.io.uri import ExecUri, TcpUri, UnixUri, Uri
from livemig.migration.common.failure import FailureLatch
from livemig.migration.common.stats import TransferStats
from livemig.migration.common.sync import SyncMode
from livemig.migration.common.thread_group import ThreadGroup
from livemig.migration.source.channels import (
    Buffer,
    MainWriter,
    ReturnPath,
    connect_channel,
    let_main_channel_lead,
)
from livemig.migration.source.multifd_sender import MultifdSender, PacketJob
from livemig.migration.source.payloads import PagePayload
from livemig.wire.constants import Command, MultifdCompression, SectionType
from livemig.wire.multifd import InitPacket
from livemig.wire.ram import PageRecords, encode_eos, encode_multifd_flush, encode_zero_records
from livemig.wire.stream import encode_command, encode_footer, encode_section_header

#: Seconds to wait for the destination's verdict (SHUT) after the last byte: a
#: destination loads its last device state and RAM END before it answers.
VERDICT_TIMEOUT = 300.0
#: Seconds a failed write waits for the verdict that most often explains it (a
#: destination that refused the stream says SHUT(1) before it closes).
VERDICT_AFTER_FAILURE = 2.0

__all__ = ["VERDICT_TIMEOUT", "OutgoingStream", "PacketJob", "SyncMode"]


class OutgoingStream:
    """See the module docstring. Use it as a context manager.

    ``peer`` names the destination in errors ("the destination QEMU").
    ``direct`` makes the multifd channels direct (written by the caller's
    threads, as a relay needs) instead of queued to channel threads.
    ``auto_part`` lets pages arrive while no RAM section body is open (the
    relay): a PART of the RAM section is opened for them.
    """

    def __init__(self, uri: Uri, *, sync_mode: SyncMode, stats: TransferStats,
                 channels: int = 0, compression: MultifdCompression = MultifdCompression.NONE,
                 latch: FailureLatch | None = None, peer: str = "the destination",
                 direct: bool = False, auto_part: bool = False,
                 main_name: str = "main channel", tls: TlsSettings | None = None) -> None:
        if channels and not isinstance(uri, (TcpUri, UnixUri)):
            raise ConfigError("multifd needs a tcp: or unix: destination")
        self.uri = uri
        self.sync_mode = sync_mode
        self.stats = stats
        self.channels = channels
        self.compression = compression
        self.group = ThreadGroup("source", latch)
        self.latch = self.group.latch
        self.peer = peer
        self._direct = direct
        self._auto_part = auto_part
        self._main_name = main_name
        self.tls = tls
        if tls is not None and not isinstance(uri, (TcpUri, UnixUri)):
            raise ConfigError(f"TLS needs a tcp: or unix: destination, not {uri}")
        self._sock: socket.socket | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._sockets: list[socket.socket] = []
        self._main: MainWriter | None = None
        self._rp: ReturnPath | None = None
        self.sender: MultifdSender | None = None
        # the RAM section on the main channel
        self.ram_section_id = 0
        self.body_open = False
        self._last_block: str | None = None
        # pages or records went out since the last sync point; before the first one
        # there is always something to sync: a QEMU destination's channel threads may
        # take pages before its RAM setup is done unless a sync holds them (QEMU syncs
        # at setup for that reason)
        self._pending = True

    # -- life cycle ------------------------------------------------------------
    def __enter__(self) -> Self:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc is not None:
            self.latch.fail(exc)
        self.close()

    @property
    def connected(self) -> bool:
        """The main channel was opened: a later failure is the peer's answer to the stream,
        not a destination that could not be reached."""
        return self._main is not None

    def connect(self) -> None:
        """Open the main channel."""
        if isinstance(self.uri, ExecUri):
            with deferred():  # the child is kept before SIGTERM may unwind
                proc = start_command(self.uri.command, stdin=subprocess.PIPE)
                self._proc = proc
            pipe = proc.stdin
            assert pipe is not None

            def write(b: Buffer) -> None:
                pipe.write(b)
                pipe.flush()
            self._main = MainWriter(write, str(self.uri))
            return
        sock = connect_channel(self.uri, self.latch, tls=self.tls, name=self._main_name)
        self._sockets.append(sock)
        self.latch.add_socket(sock)
        self._sock = sock
        self._main = MainWriter(sock.sendall, self._main_name)

    def open_return_path(self) -> None:
        """OPEN_RETURN_PATH and a PING, then read the destination's answers."""
        if self._sock is None:
            return  # exec: has no way back
        self.put(encode_command(Command.OPEN_RETURN_PATH))
        self.put(encode_command(Command.PING, struct.pack(">I", 1)))
        self.flush()
        self._rp = ReturnPath(self._sock)
        self.group.start(self._rp.run, name="return-path")

    def connect_multifd(self, uuid: bytes | None) -> None:
        """Connect the multifd channels (after the main channel) and start them."""
        if not self.channels:
            return
        self.flush()
        let_main_channel_lead(self.uri)
        socks = []
        for i in range(self.channels):  # each one closed at the end, even if a later fails
            s = connect_channel(self.uri, self.latch, tls=self.tls, name=f"multifd channel {i}")
            self._sockets.append(s)
            socks.append(s)
            if self.tls is not None:
                # QEMU reads a channel's initial packet (blocking its main loop) before it
                # takes part in the next channel's TLS handshake: send it at once
                try:
                    s.sendall(InitPacket(uuid or bytes(16), i).encode())
                except OSError as e:
                    tls = refused(f"multifd channel {i}", e)
                    if tls is not None:
                        raise tls from e
                    raise TransportError(f"multifd channel {i}: send failed: "
                                         f"{e.strerror or e}") from e
        self.sender = MultifdSender(socks, self.compression, uuid, self.latch, self.stats,
                                    group=None if self._direct else self.group,
                                    name="destination multifd channel" if self._direct
                                    else "multifd channel", init_sent=self.tls is not None)

    def close(self) -> None:
        """Join every thread and close every descriptor (idempotent)."""
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.shutdown(socket.SHUT_RDWR)  # ends the return path's read
        self.group.join()
        for s in self._sockets:
            s.close()
        self._sockets.clear()
        proc = self._proc
        if proc is not None:
            if proc.stdin is not None:
                with contextlib.suppress(OSError):  # the command may be gone already
                    proc.stdin.close()
            end_command(proc)
            self._proc = None

    # -- the main channel ------------------------------------------------------
    @property
    def main(self) -> MainWriter:
        if self._main is None:
            raise TransportError("the main channel is not connected")
        return self._main

    @property
    def lock(self) -> object:
        """Held across a decision about the main channel and the writes it makes."""
        return self.main.lock

    def put(self, data: Buffer) -> None:
        self.main.put(data)

    def flush(self) -> None:
        self.main.flush()
        self.stats.main_bytes = self.main.sent

    @property
    def bytes_written(self) -> int:
        """Main channel (sent and buffered) plus every multifd channel."""
        return self.main.written + sum(self.stats.multifd_bytes)

    def section_header(self, kind: SectionType, section_id: int, idstr: str = "",
                       instance_id: int = 0, version_id: int = 0) -> None:
        """A section header; a START/PART/END opens a body that records may go into."""
        with self.main.lock:
            self.put(encode_section_header(kind, section_id, idstr, instance_id, version_id))
            self.body_open = kind in (SectionType.SECTION_START, SectionType.SECTION_PART,
                                      SectionType.SECTION_END)
            self._last_block = None

    def command(self, cmd: Command, payload: bytes = b"", *, flush: bool = False) -> None:
        self.put(encode_command(cmd, payload))
        if flush:
            self.flush()

    # -- RAM records (payloads.RecordSink) ------------------------------------
    def _await_body(self) -> None:
        if not self.body_open:
            if not self._auto_part:
                raise TransportError("RAM records outside a RAM section (a bug in the source)")
            self.section_header(SectionType.SECTION_PART, self.ram_section_id)

    def zero_records(self, block: str, offsets: np.ndarray) -> None:
        with self.main.lock:
            self._await_body()
            self.put(encode_zero_records(block, offsets, name_first=self._last_block != block))
            self._last_block = block
            self._pending = True

    def page_records(self, block: str, offsets: np.ndarray) -> PageRecords:
        with self.main.lock:
            return PageRecords(block, offsets, name_first=self._last_block != block)

    def put_records(self, records: PageRecords) -> None:
        # The naming decision of page_records() holds only if nothing else was
        # written to the body in between: callers that share the stream
        # between threads hold :attr:`lock` across page_records/put_records.
        with self.main.lock:
            self._await_body()
            for b in records.buffers():
                self.put(b)
            self._last_block = records.block
            self._pending = True

    # -- pages and packets ----------------------------------------------------
    def send_pages(self, job: PagePayload, channel: int | None = None) -> None:
        """Pages on a multifd channel if there are any, else records on the main one."""
        self._pending = True
        if self.sender is not None:
            if self.sender.queued:
                self.flush()  # never hold main-channel records while blocking on a channel
            self.sender.dispatch(job, channel)
            return
        with self.main.lock:
            job.write_records(self)

    def dispatch(self, job: PacketJob, channel: int | None = None) -> None:
        """A packet that only multifd can carry (device state)."""
        if self.sender is None:
            raise ConfigError("device state over multifd needs multifd channels")
        self.sender.dispatch(job, channel)

    # -- sync points -----------------------------------------------------------
    def _sync_channels(self) -> None:
        assert self.sender is not None
        # the destination pairs the channels' SYNC with the marker on the main
        # channel: what precedes the marker must be out before we wait
        self.flush()
        self.sender.sync()
        self._pending = False

    def round_done(self, *, only_if_pending: bool = False) -> None:
        """The dirty-page scan wrapped (or setup ended): per round, a sync point.

        With ``only_if_pending`` it is left out when nothing went out since the
        last one (a relay passing on a source's EOS right after its FLUSH).
        """
        if self.sender is None or not self.sync_mode.syncs_at_round_end:
            return
        if only_if_pending and not self._pending:
            return
        with self.main.lock:
            self._sync_channels()
            self.put(encode_multifd_flush())
            # the destination's channels wait at their SYNC until the main channel
            # reaches this marker: it must not sit in our buffer
            self.flush()

    def end_ram_section(self) -> None:
        """EOS and footer of the open RAM section; per section, a sync point before."""
        with self.main.lock:
            if self.sender is not None and self.sync_mode.syncs_at_section_end:
                self._sync_channels()
            self.put(encode_eos() + encode_footer(self.ram_section_id))
            self.body_open = False
            self._last_block = None
            if self.sender is not None:
                self.flush()

    # -- the end -------------------------------------------------------------
    def finish(self) -> None:
        """Everything written: main channel flushed, channels stopped."""
        self.flush()
        if self.sender is not None:
            self.sender.finish()
        self.latch.raise_if_failed()

    def await_verdict(self, timeout: float = VERDICT_TIMEOUT) -> str:
        """The destination's verdict: ``"sent"`` where there is no return path."""
        proc = self._proc
        if proc is not None:
            assert proc.stdin is not None
            proc.stdin.close()
            try:
                rc = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                raise TransportError(f"{self.uri} did not exit within {timeout:.0f} s "
                                     "after the stream ended") from None
            if rc != 0:
                raise TransportError(f"{self.uri} exited with status {rc}")
            return "sent"
        rp = self._rp
        if rp is None:
            return "sent"
        if not rp.done.wait(timeout):
            raise PeerError(f"the destination did not confirm the migration within "
                            f"{timeout:.0f} s")
        self.latch.raise_if_failed()
        if rp.shut is None:
            raise PeerError("the destination closed the connection without confirming the "
                            "migration")
        if rp.shut != 0:
            raise PeerError(f"{self.peer} failed to load the migration (status {rp.shut})")
        return "confirmed by the destination"

    @property
    def refused(self) -> int | None:
        """SHUT's status if the destination sent one."""
        return self._rp.shut if self._rp is not None else None

    def failure(self, exc: BaseException) -> BaseException:
        """The error to report for a run that raised ``exc``: the first cause of the
        whole group, or the destination's refusal when a write failed because of it."""
        self.latch.fail(exc)
        first = self.latch.error
        assert first is not None
        rp = self._rp
        if isinstance(first, TransportError) and rp is not None:
            rp.done.wait(VERDICT_AFTER_FAILURE)
            if rp.shut:
                return PeerError(f"{self.peer} failed to load the migration (status "
                                 f"{rp.shut})")
        return first
