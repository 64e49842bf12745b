"""The QEMU peer harness (tests/peers.py) works against both real QEMU versions."""

from __future__ import annotations

import json
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from peers import (
    QemuPeer,
    QemuPeerError,
    QmpCommandError,
    RecordingSink,
    blob_bytes,
    capture_info,
    capture_names,
    expected_guest_ram,
    free_tcp_port,
    make_blob,
    parse_size,
    read_capture,
    require_qemu,
)

VERSIONS = ["7.2", "10.0"]
BLOB_ADDR = 0x100000
PAGE = 4096  # x86 target page size


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A short temporary directory, for unix socket paths (limited to 107 bytes)."""
    d = tempfile.mkdtemp(prefix="lmt-")
    try:
        yield Path(d)
    finally:
        shutil.rmtree(d, ignore_errors=True)


# ---- helpers without QEMU -------------------------------------------------------------------


def test_make_blob_is_deterministic(tmp_path: Path) -> None:
    a = make_blob(tmp_path / "a.bin", 10_000, seed=7)
    assert (tmp_path / "a.bin").read_bytes() == a
    assert len(a) == 10_000
    assert blob_bytes(10_000, 7) == a
    assert blob_bytes(13, 7) == a[:13]
    assert blob_bytes(10_000, 8) != a
    assert make_blob(None, 0, 1) == b""


def test_parse_size() -> None:
    assert parse_size("64M") == 64 << 20
    assert parse_size("16k") == 16 << 10
    assert parse_size(4096) == 4096
    with pytest.raises(ValueError, match="not a size"):
        parse_size("lots")


def test_require_qemu_fails_for_unknown_version() -> None:
    with pytest.raises(pytest.fail.Exception, match="unknown QEMU peer version"):
        require_qemu("1.0")


def _send_all(address: str | tuple[str, int], family: socket.AddressFamily, payload: bytes) -> None:
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.connect(address)
        s.sendall(payload)


@pytest.mark.parametrize("kind", ["unix", "tcp"])
def test_recording_sink_keeps_connections_apart(kind: str, short_tmp: Path) -> None:
    if kind == "unix":
        sink = RecordingSink(short_tmp / "sink.sock")
        address: str | tuple[str, int] = str(short_tmp / "sink.sock")
        family = socket.AF_UNIX
        assert sink.uri == f"unix:{address}"
    else:
        sink = RecordingSink(tcp_port=0)
        assert sink.port is not None
        address = ("127.0.0.1", sink.port)
        family = socket.AF_INET
        assert sink.uri == f"tcp:127.0.0.1:{sink.port}"
    with sink:
        payloads = [b"QEVM" + bytes(range(256)) * 1000, b"", b"second", b"x" * 3_000_000]
        for p in payloads:  # one after the other: accept order is known
            _send_all(address, family, p)
            deadline = time.monotonic() + 10
            while len(sink.info()) < payloads.index(p) + 1 and time.monotonic() < deadline:
                time.sleep(0.005)
        assert sink.wait(count=len(payloads), timeout=10) == payloads
        info = sink.info()
        assert [i["nbytes"] for i in info] == [len(p) for p in payloads]
        assert all(i["eof_at"] is not None and i["error"] is None for i in info)
    assert sink.connections() == payloads  # still readable after close
    if kind == "unix":
        assert not (short_tmp / "sink.sock").exists()


def test_recording_sink_wait_times_out_and_close_ends_open_connections(short_tmp: Path) -> None:
    sink = RecordingSink(short_tmp / "s.sock")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(str(short_tmp / "s.sock"))
        s.sendall(b"abc")
        with pytest.raises(TimeoutError):
            sink.wait(count=1, timeout=0.3)
        t = threading.Thread(target=sink.close)
        t.start()
        t.join(10)
        assert not t.is_alive()
        assert sink.connections() == [b"abc"]
    finally:
        s.close()
        sink.close()


def test_free_tcp_port() -> None:
    port = free_tcp_port()
    assert 0 < port < 65536
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))


# ---- real QEMU ------------------------------------------------------------------------------


@pytest.mark.qemu
@pytest.mark.parametrize("version", VERSIONS)
def test_blob_roundtrip(version: str, tmp_path: Path) -> None:
    blob = make_blob(tmp_path / "blob.bin", 256 * 1024, seed=1)
    with QemuPeer(version, blobs=[(tmp_path / "blob.bin", BLOB_ADDR)], workdir=tmp_path) as vm:
        assert vm.status()["running"] is False
        out = vm.pmemsave(BLOB_ADDR, len(blob), tmp_path / "dump.bin")
        assert out.read_bytes() == blob
        # memory right after the blob was never written
        assert vm.read_memory(BLOB_ADDR + len(blob), 4096) == bytes(4096)
        pid = vm.pid
        assert pid is not None
    assert not Path(f"/proc/{pid}").exists() or _is_zombie_or_gone(pid)


def _is_zombie_or_gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"
    except OSError:
        return True


@pytest.mark.qemu
@pytest.mark.parametrize("version", VERSIONS)
def test_migrate_to_exec_cat(version: str, tmp_path: Path) -> None:
    make_blob(tmp_path / "blob.bin", 256 * 1024, seed=1)
    stream = tmp_path / "stream.bin"
    with QemuPeer(version, blobs=[(tmp_path / "blob.bin", BLOB_ADDR)], workdir=tmp_path) as vm:
        vm.migrate(f"exec:cat > {stream}")
        info = vm.wait_migration(timeout=60)
        assert info["status"] == "completed"
        assert info["ram"]["normal"] >= 64  # the blob's pages at least
        assert vm.status()["status"] == "postmigrate"
        assert vm.quit() == 0
    data = stream.read_bytes()
    assert data[:4] == b"QEVM"
    assert len(data) > 256 * 1024


@pytest.mark.qemu
@pytest.mark.parametrize("version", VERSIONS)
def test_qmp_errors_carry_qemu_description(version: str) -> None:
    with QemuPeer(version) as vm:
        with pytest.raises(QmpCommandError, match="CommandNotFound") as exc:
            vm.qmp("no-such-command")
        assert exc.value.command == "no-such-command"
        with pytest.raises(QmpCommandError, match=r"multifd[-_]channels"):
            vm.set_params(multifd_channels=0)
        vm.set_caps({"multifd": True})
        vm.set_params(multifd_channels=3, multifd_compression="zlib")
        assert vm.query_caps()["multifd"] is True
        assert vm.query_params()["multifd-channels"] == 3


@pytest.mark.qemu
def test_start_failure_is_reported_with_stderr() -> None:
    t0 = time.monotonic()
    with pytest.raises(QemuPeerError, match="exited with status") as exc:
        QemuPeer("7.2", extra_args=["-no-such-option"])
    assert "no-such-option" in str(exc.value)
    assert time.monotonic() - t0 < 20


@pytest.mark.qemu
def test_closed_peer_and_dead_peer_raise_clearly() -> None:
    vm = QemuPeer("10.0")
    vm.close()
    vm.close()  # idempotent
    with pytest.raises(QemuPeerError, match="closed"):
        vm.status()
    with QemuPeer("7.2") as vm2:
        vm2._proc.kill()  # type: ignore[union-attr]  # simulate a crash
        vm2._proc.wait()  # type: ignore[union-attr]
        with pytest.raises(QemuPeerError, match="killed by SIGKILL"):
            vm2.status()


@pytest.mark.qemu
def test_dimm_memory_is_addressable(tmp_path: Path) -> None:
    blob = make_blob(tmp_path / "d.bin", 8192, seed=3)
    with QemuPeer("10.0", dimm="16M", blobs=[(tmp_path / "d.bin", 1 << 32)]) as vm:
        assert vm.read_memory(1 << 32, len(blob)) == blob
        sizes = {d["data"]["size"] for d in vm.qmp("query-memory-devices")}
        assert sizes == {16 << 20}


@pytest.mark.qemu
@pytest.mark.parametrize(
    ("src", "dst", "machine"),
    [("7.2", "10.0", "pc-i440fx-7.2"), ("10.0", "7.2", "pc-i440fx-7.2"),
     ("10.0", "10.0", "q35")],
)
def test_migration_between_peers(src: str, dst: str, machine: str, tmp_path: Path,
                                 short_tmp: Path) -> None:
    blob = make_blob(tmp_path / "blob.bin", 256 * 1024, seed=5)
    uri = f"unix:{short_tmp / 'mig.sock'}"
    with QemuPeer(dst, machine=machine, incoming="defer", workdir=tmp_path, name="dst") as d, \
         QemuPeer(src, machine=machine, blobs=[(tmp_path / "blob.bin", BLOB_ADDR)],
                  workdir=tmp_path, name="src") as s:
        d.migrate_incoming(uri)
        s.migrate(uri)
        s.wait_migration(timeout=60)
        d.wait_migration(timeout=60)
        # the guest never ran on the source, so it arrives in "prelaunch", still stopped
        assert d.status()["running"] is False
        assert d.read_memory(BLOB_ADDR, len(blob)) == blob


@pytest.mark.qemu
@pytest.mark.parametrize("version", VERSIONS)
def test_multifd_into_recording_sink(version: str, short_tmp: Path) -> None:
    with RecordingSink(short_tmp / "mfd.sock") as sink, QemuPeer(version, memory="32M") as vm:
        vm.set_caps({"multifd": True})
        vm.set_params(multifd_channels=2)
        vm.migrate(sink.uri)
        info = vm.wait_migration(timeout=60)
        conns = sink.wait(count=3, timeout=30)
    assert len(conns) == 3, json.dumps(sink.info())
    main = [c for c in conns if c[:4] == b"QEVM"]
    channels = sorted(c[24] for c in conns if c[:4] == bytes.fromhex("11223344"))
    assert len(main) == 1 and channels == [0, 1]
    assert conns[0][:4] == b"QEVM"  # the main channel connects (and is accepted) first
    assert info["status"] == "completed"


# ---- recorded captures (tests/data) ---------------------------------------------------------


@pytest.mark.parametrize("name", capture_names())
def test_capture_files_match_the_index(name: str) -> None:
    entry = capture_info(name)
    assert entry["qemu_full_version"].startswith(entry["qemu_version"] + ".")
    query = json.loads(read_capture(entry["files"]["query_migrate"]))
    assert query["status"] == "completed"
    blob_pages = sum(b["size"] for b in entry["blobs"]) // PAGE
    assert query["ram"]["normal"] >= blob_pages
    sizes = entry["uncompressed_size"]
    if entry["kind"] == "multifd":
        conns = [read_capture(f"{name}/{c['file']}") for c in entry["connections"]]
        assert [len(c) for c in conns] == [sizes[c["file"]] for c in entry["connections"]]
        for data, c in zip(conns, entry["connections"], strict=True):
            if c["role"] == "main":
                assert data[:4] == b"QEVM"
            else:
                assert data[:4] == bytes.fromhex("11223344") and data[24] == c["channel_id"]
        assert sorted(c["channel_id"] for c in entry["connections"] if c["role"] != "main") \
            == list(range(entry["multifd"]["channels"]))
        streams = conns if entry["multifd"]["compression"] == "none" else []
    else:
        stored = entry["files"]["stream" if entry["kind"] == "precopy" else "file"]
        data = read_capture(stored)
        assert len(data) == sizes[stored]
        assert data[:4] == b"QEVM"
        streams = [data]
    # uncompressed captures carry every blob page verbatim
    ram = expected_guest_ram(entry, 8 << 20)
    for b in entry["blobs"] if streams else []:
        step = 1 if entry["kind"] != "mapped-ram" else b["size"] // PAGE  # first page only
        for addr in range(b["addr"], b["addr"] + b["size"], PAGE * step):
            page = ram[addr:addr + PAGE]
            assert any(page in s for s in streams), f"page {addr:#x} missing"


def test_expected_guest_ram_places_blobs() -> None:
    entry = {"memory_bytes": 1 << 20, "blobs": [{"addr": 0x1000, "size": 100, "seed": 4}]}
    ram = expected_guest_ram(entry)
    assert len(ram) == 1 << 20
    assert ram[0x1000:0x1064] == blob_bytes(100, 4)
    assert ram[:0x1000] == bytes(0x1000) and ram[0x1064:] == bytes(len(ram) - 0x1064)
    assert expected_guest_ram(entry, 0x1010) == ram[:0x1010]
