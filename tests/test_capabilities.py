"""The optional capabilities of sources, sinks and load targets are declared protocols.

Which class has which capability is fixed here, so that a class that loses (or
gains) a member by accident fails a test instead of silently changing what the
loader does. Then the loader is shown to act on the capability, not on a
similarly named attribute: an ``exec:`` source has a file descriptor, but only
a file can give a mapped-ram stream's pages.
"""

from __future__ import annotations

import lzma
import os
import shlex
import socket
from pathlib import Path

import pytest

from livemig.commands.inspect import CountingSink, load_file
from livemig.engine.incoming_migration import MachineSink
from livemig.engine.machine import Machine
from livemig.errors import ConfigError
from livemig.io.channels import (
    ExecSource,
    FileSource,
    Listener,
    LivenessSource,
    SeekableSource,
    SocketSource,
)
from livemig.io.snapshot import SnapshotWriter
from livemig.io.uri import parse_uri
from livemig.migration.common.failure import FailureLatch
from livemig.migration.common.stats import TransferStats
from livemig.migration.destination.device_state_reassembly import (
    CancellableLoadTarget,
    DeviceLoadTarget,
    FdLoadTarget,
)
from livemig.migration.destination.loader import MainChannelLoader
from livemig.migration.destination.sinks import PageViewSink, RamSink, SnapshotSink
from livemig.vfio.sim_device import LoadTarget

DATA = Path(__file__).parent / "data"


def test_sources(tmp_path: Path) -> None:
    path = tmp_path / "stream"
    path.write_bytes(b"QEVM")
    f = FileSource(str(path))
    e = ExecSource("true")
    a, b = socket.socketpair()
    s = SocketSource(a)
    try:
        assert isinstance(f, SeekableSource) and not isinstance(f, LivenessSource)
        assert f.file_fd == f.fd
        # the pipe's descriptor is not one to read at an offset
        assert not isinstance(e, SeekableSource) and not isinstance(e, LivenessSource)
        assert isinstance(s, LivenessSource) and not isinstance(s, SeekableSource)
        assert s.alive()
        b.close()
        assert not s.alive()
    finally:
        f.close()
        e.close()
        s.close()


def test_sinks(tmp_path: Path) -> None:
    w = SnapshotWriter(str(tmp_path / "snap"))
    m = Machine(1 << 16)
    try:
        sinks: list[RamSink] = [w, MachineSink(m), CountingSink()]
        assert [isinstance(x, SnapshotSink) for x in sinks] == [True, False, False]
        assert [isinstance(x, PageViewSink) for x in sinks] == [False, True, False]
    finally:
        w.abort()
        m.close()


class PlainTarget:
    def write_data(self, data: memoryview) -> None:
        pass

    def load_config(self, config: memoryview) -> None:
        pass


def test_load_targets() -> None:
    targets: list[DeviceLoadTarget] = [PlainTarget(), FdLoadTarget(-1, lambda c: None)]
    assert [isinstance(t, CancellableLoadTarget) for t in targets] == [False, True]
    assert issubclass(LoadTarget, CancellableLoadTarget)


def test_listener_closes_without_a_watch_thread(tmp_path: Path) -> None:
    lst = Listener(parse_uri(f"unix:{tmp_path}/l.sock"))
    lst.close()
    assert not os.path.exists(tmp_path / "l.sock")


@pytest.fixture
def mapped_ram_file(tmp_path: Path) -> Path:
    path = tmp_path / "mapped-ram.bin"
    path.write_bytes(lzma.decompress((DATA / "qemu10.0-mapped-ram.bin.xz").read_bytes()))
    return path


def test_mapped_ram_needs_a_seekable_source(mapped_ram_file: Path) -> None:
    result, sink = load_file(str(mapped_ram_file))  # a file: the pages are found
    assert sink.mapped_ram and result.blocks
    src = ExecSource(f"cat {shlex.quote(str(mapped_ram_file))}")
    try:
        loader = MainChannelLoader(src, CountingSink(), stats=TransferStats(),
                                   latch=FailureLatch())
        with pytest.raises(ConfigError, match=r"^exec:cat .*: a mapped-ram stream can only be "
                           r"read from a file$"):
            loader.run()
    finally:
        src.close()
