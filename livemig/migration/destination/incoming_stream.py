"""The accepting side of a migration, shared by ``receive`` and ``relay``.

It owns the listener (or the exec:/file: source), the main channel, the
multifd receiver and the source's return path, and knows the order things
must happen in: accept and classify the channels, keep watching for extra
connections, load, end the channels, and only then give the source its
verdict (SHUT 0 once everything is safe; SHUT 1 on any failure, so that a
source with a return path fails and keeps running).
"""

from __future__ import annotations

import time
from collections.abc import Callable

from livemig import limits
from livemig.errors import ConfigError, MigrationError, TransportError
from livemig.io.channels import ByteSource, ExecSource, Listener, SocketSource, open_source
from livemig.io.interrupts import deferred
from livemig.io.tls import TlsSettings
from livemig.io.uri import ExecUri, FileUri, TcpUri, UnixUri, Uri
from livemig.migration.common.failure import FailureLatch
from livemig.migration.common.stats import TransferStats
from livemig.migration.common.thread_group import ThreadGroup
from livemig.migration.destination.loader import LoadResult, MainChannelLoader, rp_message
from livemig.migration.destination.multifd_receiver import DeviceStateCallback, MultifdReceiver
from livemig.migration.destination.sinks import RamSink
from livemig.wire.constants import MultifdCompression, ReturnPathMessage
from livemig.wire.stream import SectionLengths

_SHUT_OK = rp_message(ReturnPathMessage.SHUT, b"\x00\x00\x00\x00")
_SHUT_FAILED = rp_message(ReturnPathMessage.SHUT, b"\x00\x00\x00\x01")


def multifd_settings(channels: int, compression: str | MultifdCompression,
                     option: str = "--multifd") -> MultifdCompression:
    """Check a multifd-channels / multifd-compression pair the way QEMU would."""
    try:
        comp = MultifdCompression(compression)
    except ValueError:
        raise ConfigError(f"unknown multifd compression {compression!r} "
                          "(none, zlib or zstd)") from None
    if not 0 <= channels <= limits.MAX_MULTIFD_CHANNELS:
        raise ConfigError(f"{option}-channels must be 0..{limits.MAX_MULTIFD_CHANNELS}, "
                          f"not {channels}")
    if comp is not MultifdCompression.NONE and not channels:
        raise ConfigError(f"{option}-compression needs {option}-channels")
    return comp


class IncomingMigration:
    """The accepting side of one migration; owns its threads (see the module docstring).

    ``on_device_state`` and ``on_channels_ended`` go to the
    :class:`~livemig.migration.destination.multifd_receiver.MultifdReceiver` (multifd
    device-state packets, and the end of the last channel).

    Threads: the multifd channel threads and ``listener-watch`` (which fails the
    migration if the source opens one connection too many) run in :attr:`threads`,
    sharing ``latch``. :meth:`load` joins them on success, :meth:`abort` after a
    failure, and :meth:`close` in any case; the latch wakes them (it shuts the
    listening socket and every channel down).
    """

    def __init__(self, uri: Uri, channels: int, compression: MultifdCompression,
                 sink: RamSink, latch: FailureLatch, stats: TransferStats, *,
                 main_name: str = "main channel",
                 on_device_state: DeviceStateCallback | None = None,
                 on_channels_ended: Callable[[], None] | None = None,
                 max_ram: int = limits.DEFAULT_MAX_GUEST_RAM,
                 tls: TlsSettings | None = None) -> None:
        if channels and not isinstance(uri, (TcpUri, UnixUri)):
            raise ConfigError(f"multifd needs a tcp: or unix: URI, not {uri}")
        self.uri = uri
        self.channels = channels
        self.compression = compression
        self.sink = sink
        self.latch = latch
        self.stats = stats
        self.main_name = main_name
        self.on_device_state = on_device_state
        self.on_channels_ended = on_channels_ended
        self.threads = ThreadGroup("incoming", latch)
        self.max_ram = max_ram
        self.tls = tls
        if tls is not None and not isinstance(uri, (TcpUri, UnixUri)):
            raise ConfigError(f"TLS needs a tcp: or unix: URI, not {uri}")
        self.listener: Listener | None = None
        self.source: ByteSource | None = None
        self.multifd: MultifdReceiver | None = None
        self.loader: MainChannelLoader | None = None

    def connect(self, *, accept_timeout: float,
                on_listening: Callable[[str], None] | None = None) -> None:
        """Listen and accept (tcp:, unix:) or open (exec:, file:) the source.

        A failure of the latch (a cancel) ends the wait for the source at once.
        """
        u = self.uri
        if isinstance(u, (ExecUri, FileUri)):
            with deferred():  # a child command is kept before SIGTERM may unwind
                self.source = open_source(u)
            return
        self.listener = Listener(u, self.tls)
        self.latch.on_failure(self.listener.shutdown)  # a cancel wakes the accept
        if on_listening is not None:
            on_listening(self.listener.address)
        main, chans = self.listener.accept_migration(self.channels, timeout=accept_timeout,
                                                     on_accept=self.latch.add_socket)
        self.stats.started = time.monotonic()
        self.source = SocketSource(main, self.main_name)
        self.threads.start(self._watch_for_extra, self.listener, name="listener-watch")
        if chans:
            self.multifd = MultifdReceiver(chans, self.compression, self.sink, self.latch,
                                           self.stats, on_device_state=self.on_device_state,
                                           on_channels_ended=self.on_channels_ended,
                                           group=self.threads)
            self.multifd.start()

    @staticmethod
    def _watch_for_extra(listener: Listener) -> None:
        extra = listener.wait_for_extra()
        if extra is not None:
            raise TransportError(extra)  # the group fails the migration with it

    def load(self, observer: Callable[[object], None] | None = None,
             section_lengths: SectionLengths | None = None,
             drain: Callable[[LoadResult], None] | None = None) -> LoadResult:
        """Run the main channel to its end, then end the channels.

        ``drain`` runs between the two: multifd device-state packets are not
        fenced by any sync point, so they may still be arriving when the main
        stream ends; it waits for them (QEMU waits for its load threads there).
        """
        assert self.source is not None
        send_rp = self.source.send if isinstance(self.source, SocketSource) else None
        self.loader = MainChannelLoader(self.source, self.sink, stats=self.stats,
                                        latch=self.latch, multifd=self.multifd,
                                        send_return_path=send_rp, observer=observer,
                                        section_lengths=section_lengths,
                                        max_ram=self.max_ram)
        result = self.loader.run()
        if drain is not None:
            drain(result)
        self._stop_threads()
        if isinstance(self.source, ExecSource):
            self.source.check_exit()
        self.latch.raise_if_failed()
        return result

    def _stop_threads(self) -> None:
        """End the channel threads and the listener's watch, and join every thread."""
        if self.multifd is not None:
            self.multifd.finish()
        if self.listener is not None:
            self.listener.shutdown()
        self.threads.join()

    @property
    def _return_path(self) -> bool:
        return (self.loader is not None and self.loader.result.return_path
                and isinstance(self.source, SocketSource))

    def confirm(self) -> None:
        """Everything is safe: let the source complete."""
        if self._return_path:
            self.source.send(_SHUT_OK)  # type: ignore[union-attr]

    def refuse(self) -> None:
        """Tell a source with a return path that the migration failed (best effort)."""
        if self._return_path:
            try:
                self.source.send(_SHUT_FAILED)  # type: ignore[union-attr]
            except MigrationError:
                pass

    def abort(self) -> None:
        """After ``latch.fail``: end the threads and join them."""
        self._stop_threads()

    def close(self) -> None:
        """Join whatever still runs (nothing, after :meth:`load` or :meth:`abort`), then
        close the listener and the main channel."""
        self._stop_threads()
        self.threads.join(close=True)
        if self.listener is not None:
            self.listener.close()
        if self.source is not None:
            self.source.close()
