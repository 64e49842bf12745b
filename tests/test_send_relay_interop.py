"""``livemig send`` and ``livemig relay`` against real QEMU 7.2 and 10.0, end to end.

* Round trip: QEMU A -> ``livemig receive`` -> snapshot -> ``livemig send`` -> a fresh
  QEMU B started without ``-S``. B's guest RAM equals A's byte for byte (pmemsave over
  guest-physical [0, 0xA0000) and [0x100000, end of RAM), which hold the loader blobs), and
  B ends in the run state A had at switchover, as QEMU itself does from QEMU to QEMU
  (checked by hand on 7.2 and 10.0: a running source gives 'running', a stopped one
  'paused', one started with -S and never resumed 'prelaunch'). A running guest is SeaBIOS
  idling after finding nothing to boot: it only changes the BIOS tick counter (BDA 0x46C),
  which is left out of the comparison for running guests and must have advanced on B.
* Cross-version: a QEMU 7.2 snapshot (pc-i440fx-7.2) into QEMU 10 with the same machine
  type, and into QEMU 7.2.
* ``--dest-qmp``: livemig sets the destination's capabilities and parameters and starts
  ``migrate-incoming`` itself; a destination that cannot take the snapshot (RAM size,
  machine type) is refused before any byte is sent and stays in its incoming state.
* Relay: QEMU -> ``livemig relay`` -> QEMU with different multifd settings per hop, a
  guest that keeps dirtying a working set while the source's bandwidth is capped (several
  RAM passes), ``--record``.
* Faults: destination killed mid-send, source killed mid-relay, destinations that refuse
  the stream (send and relay), a device-set mismatch reported with QEMU's own error text.

Every wait has a deadline; every QEMU and livemig process is killed at teardown.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import struct
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest_sendrelay import (
    PASS_COUNTER,
    Launcher,
    LivemigProcess,
    assert_one_line_error,
    assert_same,
    bda_ticks,
    check_counters,
    counter_mask,
    dirty_kernel,
    dword,
    multifd_args,
    page_counters,
    prepare_incoming,
    read_ram,
    set_multifd,
    tick_mask,
    wait_incoming_active,
    wait_seabios_idle,
    wait_status,
)
from helpers import LivemigReceive
from peers import QemuPeer, RecordingSink, blob_bytes, free_tcp_port, make_blob
from tls_certs import FRIEND, SERVER_NAME, have_openssl, make_creds, qemu_tls

pytestmark = [pytest.mark.qemu, pytest.mark.timeout(150)]

MEMORY = "64M"
MEMORY_BYTES = 64 << 20
#: Guest-physical ranges that show pc.ram itself (0xA0000-0xFFFFF is VGA / BIOS shadow).
RANGES = ((0, 0xA0000), (0x100000, MEMORY_BYTES))
BANDWIDTH = 10 << 30  # bytes/s: no throttling where the test does not ask for it

MIGRATION_TIMEOUT = 90.0
SEND_TIMEOUT = 90.0
FAIL_DEADLINE = 60.0  # seconds for livemig to give up after a fault

M72 = {"pc": "pc-i440fx-7.2", "q35": "pc-q35-7.2"}


@dataclass(frozen=True)
class Blob:
    addr: int
    size: int
    seed: int


#: Random data at reset: one below 640 KiB (odd size), one large above 1 MiB, one not page
#: aligned; the rest of RAM stays zero (zero pages on the wire).
BLOBS = (
    Blob(0x30000, 24 * 1024 + 321, 21),
    Blob(0x100000, 6 << 20, 22),
    Blob(0x1800000 + 0x800, (3 << 20) + 5, 23),
)


@pytest.fixture
def livemig_bg(workdir: Path) -> Iterator[Launcher]:
    """``livemig_bg(*args)`` starts ``livemig ARGS...`` in the background; killed at
    teardown."""
    with Launcher(workdir) as launch:
        yield launch


@pytest.fixture(scope="module")
def blob_files(tmp_path_factory: pytest.TempPathFactory) -> dict[Blob, Path]:
    d = tmp_path_factory.mktemp("sr-blobs")
    out = {}
    for b in BLOBS:
        out[b] = d / f"blob-{b.seed}.bin"
        make_blob(out[b], b.size, b.seed)
    return out


def source_peer(version: str, machine: str, blob_files: dict[Blob, Path], workdir: Path, *,
                paused: bool, extra: tuple[str, ...] = (), name: str = "A") -> QemuPeer:
    return QemuPeer(version, machine=machine, memory=MEMORY, paused=paused,
                    blobs=[(blob_files[b], b.addr) for b in BLOBS], extra_args=list(extra),
                    workdir=workdir, name=name)


def bring_to_state(a: QemuPeer, state: str) -> None:
    """'prelaunch': A was started with -S and stays so; 'running': SeaBIOS runs until it
    idles; 'paused': SeaBIOS ran for a moment, then 'stop'."""
    if state == "running":
        wait_seabios_idle(a, RANGES)
    elif state == "paused":
        time.sleep(0.3)
        a.stop()
    assert a.status()["status"] == state


def capture(a: QemuPeer, snap: Path, workdir: Path, channels: int, compression: str,
            start_receive: Callable[..., Any]) -> tuple[dict[str, Any], list[np.ndarray]]:
    """Migrate A into ``livemig receive``; return A's query-migrate and final RAM."""
    a.set_params(**{"max-bandwidth": BANDWIDTH})
    set_multifd(a, channels, compression)
    p = start_receive(f"unix:{workdir / 'recv.sock'}", snap, multifd_channels=channels,
                      multifd_compression=compression if channels else None)
    a.migrate(p.address)
    info = a.wait_migration(timeout=MIGRATION_TIMEOUT)
    ram = read_ram(a, RANGES)
    p.wait_ok(60)
    return info, ram


def assert_blobs(what: str, ram: list[np.ndarray], *, low_too: bool) -> None:
    """The loader blobs are in ``ram`` (SeaBIOS may reuse memory below 1 MiB once it ran)."""
    for b in BLOBS:
        if b.addr < RANGES[1][0] and not low_too:
            continue
        i = 0 if b.addr < RANGES[1][0] else 1
        off = b.addr - RANGES[i][0]
        assert_same(f"{what}: blob at {b.addr:#x}",
                    np.frombuffer(blob_bytes(b.size, b.seed), np.uint8),
                    ram[i][off:off + b.size], b.addr)


def assert_guest_equal(what: str, a_ram: list[np.ndarray], b_ram: list[np.ndarray], *,
                       running: bool) -> None:
    for r, x, y in zip(RANGES, a_ram, b_ram, strict=True):
        assert_same(f"{what} [{r[0]:#x}, {r[1]:#x})", x, y, r[0],
                    ignore=tick_mask(r) if running else None)


def dest_peer(version: str, machine: str, workdir: Path, *, memory: str = MEMORY,
              incoming: str = "defer", extra: tuple[str, ...] = (),
              name: str = "B") -> QemuPeer:
    """A destination started WITHOUT -S."""
    return QemuPeer(version, machine=machine, memory=memory, paused=False, incoming=incoming,
                    extra_args=list(extra), workdir=workdir, name=name)


def finish_on_b(b: QemuPeer, expected_state: str) -> tuple[list[np.ndarray], dict[str, Any]]:
    """After a send: B completed, is in ``expected_state``; for a running guest let it run
    0.3 s (the BIOS ticks advance), then stop it. Returns B's RAM and its query-status."""
    b.wait_migration(timeout=MIGRATION_TIMEOUT)
    status = b.status()
    assert status["status"] == expected_state, \
        f"QEMU {b.version} destination is '{status['status']}', expected '{expected_state}'"
    if expected_state == "running":
        time.sleep(0.3)
        b.stop()
    return read_ram(b, RANGES), status


# --------------------------------------------------------------------------------------------
# Round trip: QEMU -> receive -> snapshot -> send -> QEMU
# --------------------------------------------------------------------------------------------

# (version, machine, receive (channels, compression), send (channels, compression), state,
#  send transport)
ROUND_TRIPS = [
    ("7.2", M72["pc"], (0, "none"), (0, "none"), "prelaunch", "tcp"),
    ("7.2", M72["q35"], (4, "zstd"), (1, "zlib"), "running", "unix"),
    ("7.2", M72["pc"], (1, "none"), (4, "zstd"), "paused", "tcp"),
    ("7.2", M72["pc"], (0, "none"), (4, "none"), "running", "unix"),
    ("10.0", "pc", (2, "zlib"), (0, "none"), "running", "tcp"),
    ("10.0", "q35", (0, "none"), (1, "zstd"), "paused", "unix"),
    ("10.0", "pc", (1, "zstd"), (1, "none"), "prelaunch", "unix"),
    ("10.0", "q35", (4, "none"), (4, "zlib"), "running", "tcp"),
]


def mig_uri(transport: str, workdir: Path, name: str) -> str:
    if transport == "tcp":
        return f"tcp:127.0.0.1:{free_tcp_port()}"
    return f"unix:{workdir / name}.sock"


def _mode(ch: int, comp: str) -> str:
    return f"multifd{ch}-{comp}" if ch else "precopy"


def _rt_id(c: tuple[Any, ...]) -> str:
    version, machine, rx, tx, state, transport = c
    return f"{version}-{machine}-recv-{_mode(*rx)}-send-{_mode(*tx)}-{transport}-{state}"


@pytest.mark.parametrize("case", ROUND_TRIPS, ids=[_rt_id(c) for c in ROUND_TRIPS])
def test_round_trip(case: tuple[Any, ...], workdir: Path, blob_files: dict[Blob, Path],
                    livemig_receive: Callable[..., LivemigReceive],
                    livemig_cli: Callable[..., Any]) -> None:
    version, machine, (rx_ch, rx_comp), (tx_ch, tx_comp), state, transport = case
    snap = workdir / "vm.snap"
    with source_peer(version, machine, blob_files, workdir, paused=state == "prelaunch") as a:
        bring_to_state(a, state)
        _, a_ram = capture(a, snap, workdir, rx_ch, rx_comp, livemig_receive)
    assert_blobs("A", a_ram, low_too=state == "prelaunch")

    with dest_peer(version, machine, workdir) as b:
        uri = mig_uri(transport, workdir, "send")
        prepare_incoming(b, uri, tx_ch, tx_comp)
        r = livemig_cli("send", str(snap), uri, *multifd_args("", tx_ch, tx_comp), "--json",
                        timeout=SEND_TIMEOUT)
        summary = json.loads(r.stdout)
        assert summary["verdict"] == "confirmed by the destination", summary
        b_ram, _ = finish_on_b(b, state)

    assert_guest_equal(f"QEMU {version} B vs A", a_ram, b_ram, running=state == "running")
    assert_blobs("B", b_ram, low_too=state == "prelaunch")
    if state == "running":
        # B's SeaBIOS went on from A's state: its tick counter advanced from A's
        assert bda_ticks(b_ram[0]) > bda_ticks(a_ram[0]), (bda_ticks(a_ram[0]),
                                                           bda_ticks(b_ram[0]))


@pytest.mark.parametrize("version", ["7.2", "10.0"])
def test_qemu_to_qemu_run_state_reference(version: str, workdir: Path,
                                          blob_files: dict[Blob, Path]) -> None:
    """The reference the round trips are held to: QEMU migrating straight to QEMU (B
    started without -S) leaves B in the run state A had at switchover, 'prelaunch'
    included (the global-state section carries it)."""
    machine = M72["pc"] if version == "7.2" else "pc"
    for state in ("prelaunch", "paused", "running"):
        with source_peer(version, machine, blob_files, workdir,
                         paused=state == "prelaunch") as a, \
                dest_peer(version, machine, workdir) as b:
            if state == "paused":
                time.sleep(0.3)
                a.stop()
            assert a.status()["status"] == state
            uri = f"unix:{workdir / 'direct.sock'}"
            prepare_incoming(b, uri)
            a.migrate(uri)
            a.wait_migration(timeout=MIGRATION_TIMEOUT)
            b.wait_migration(timeout=MIGRATION_TIMEOUT)
            assert b.status()["status"] == state, f"A was {state}: {b.status()}"


# --------------------------------------------------------------------------------------------
# A QEMU 7.2 snapshot (shared by the cross-version, --dest-qmp and refusal tests)
# --------------------------------------------------------------------------------------------


@dataclass
class Snapshot:
    path: Path
    machine: str
    ram: list[np.ndarray]  # A's RAM at switchover
    state: str  # A's run state at switchover


@pytest.fixture(scope="module")
def snapshot72(blob_files: dict[Blob, Path]) -> Iterator[Snapshot]:
    """A running pc-i440fx-7.2 guest on QEMU 7.2, captured over 2 zstd multifd channels."""
    d = Path(tempfile.mkdtemp(prefix="lms72-", dir="/tmp"))
    try:
        snap = d / "vm72.snap"
        with source_peer("7.2", M72["pc"], blob_files, d, paused=False) as a:
            bring_to_state(a, "running")

            def start_receive(uri: str, out: Path, *, multifd_channels: int,
                              multifd_compression: str | None) -> Any:
                args = ["receive", uri, "-o", str(out), "-q",
                        *multifd_args("", multifd_channels, multifd_compression or "none")]
                p = LivemigProcess(args, d)
                p.wait_listening(uri)
                return p

            _, ram = capture(a, snap, d, 2, "zstd", start_receive)
        yield Snapshot(snap, M72["pc"], ram, "running")
    finally:
        shutil.rmtree(d, ignore_errors=True)


def second_qmp(workdir: Path) -> tuple[str, tuple[str, ...]]:
    """A second QMP monitor for livemig (QEMU serves one client per monitor)."""
    path = str(workdir / "qmp2.sock")
    return f"unix:{path}", ("-qmp", f"unix:{path},server=on,wait=off")


# (destination version, send channels, compression, with --dest-qmp)
CROSS = [
    ("10.0", 2, "zstd", True),
    ("10.0", 0, "none", False),
    ("7.2", 4, "zlib", True),
]


@pytest.mark.parametrize(("dest_version", "channels", "compression", "dest_qmp"), CROSS,
                         ids=[f"into-{v}-{_mode(c, z)}-{'dest-qmp' if q else 'plain'}"
                              for v, c, z, q in CROSS])
def test_qemu72_snapshot_into_qemu10_and_72(dest_version: str, channels: int,
                                            compression: str, dest_qmp: bool, workdir: Path,
                                            snapshot72: Snapshot,
                                            livemig_cli: Callable[..., Any]) -> None:
    """The 7.2 snapshot into QEMU 10 started with -M pc-i440fx-7.2 (the multifd sync is the
    per-section one of that machine type), and back into QEMU 7.2. With --dest-qmp the
    destination is only started with -incoming defer: livemig sets multifd itself and
    starts migrate-incoming."""
    uri = f"unix:{workdir / 'send.sock'}"
    qmp_uri, qmp_args = second_qmp(workdir)
    with dest_peer(dest_version, snapshot72.machine, workdir,
                   extra=qmp_args if dest_qmp else ()) as b:
        extra: list[str] = []
        if dest_qmp:
            extra = ["--dest-qmp", qmp_uri]
        else:
            prepare_incoming(b, uri, channels, compression)
        livemig_cli("send", str(snapshot72.path), uri, *multifd_args("", channels, compression),
                    *extra, "-q", timeout=SEND_TIMEOUT)
        if dest_qmp:  # what livemig set through its own monitor
            assert b.query_caps()["multifd"] is bool(channels)
            params = b.query_params()
            assert (params["multifd-channels"], params["multifd-compression"]) == \
                (channels, compression)
        b_ram, _ = finish_on_b(b, snapshot72.state)
    assert_guest_equal(f"QEMU {dest_version} from the 7.2 snapshot vs the 7.2 source",
                       snapshot72.ram, b_ram, running=True)
    assert bda_ticks(b_ram[0]) > bda_ticks(snapshot72.ram[0])


# --------------------------------------------------------------------------------------------
# --dest-qmp refuses a destination that cannot take the snapshot
# --------------------------------------------------------------------------------------------

# (destination version, its machine type, its memory, words the message must contain)
MISMATCHES = [
    ("7.2", M72["pc"], "128M", ("64 MiB", "128 MiB")),
    ("10.0", "pc-i440fx-10.0", MEMORY, ("machine type", "pc-i440fx-7.2")),
    ("10.0", M72["q35"], MEMORY, ("machine type", "pc-i440fx-7.2", "pc-q35-7.2")),
]


@pytest.mark.parametrize(("dest_version", "machine", "memory", "words"), MISMATCHES,
                         ids=["7.2-ram-128M", "10.0-machine-i440fx-10.0", "10.0-machine-q35"])
def test_dest_qmp_refuses_mismatch_before_sending(dest_version: str, machine: str,
                                                  memory: str, words: tuple[str, ...],
                                                  workdir: Path, snapshot72: Snapshot,
                                                  livemig_cli: Callable[..., Any]) -> None:
    qmp_uri, qmp_args = second_qmp(workdir)
    with RecordingSink(str(workdir / "send.sock")) as sink, \
            dest_peer(dest_version, machine, workdir, memory=memory, extra=qmp_args) as b:
        r = livemig_cli("send", str(snapshot72.path), sink.uri, "--dest-qmp", qmp_uri,
                        "--multifd-channels", "2", check=False, timeout=FAIL_DEADLINE)
        line = assert_one_line_error(r, "send")
        for w in words:
            assert w in line, f"{w!r} not in: {line}"
        time.sleep(0.2)
        assert sink.info() == [], f"livemig connected to the destination: {sink.info()}"
        assert b.is_running()
        assert b.query_migrate().get("status") in (None, "none"), b.query_migrate()
        assert b.status()["status"] == "inmigrate"
        assert b.query_caps()["multifd"] is False  # nothing was changed either


# --------------------------------------------------------------------------------------------
# Relay: QEMU -> livemig relay -> QEMU, guest dirtying RAM during the migration
# --------------------------------------------------------------------------------------------

RELAY_MEMORY = "128M"
RELAY_MEMORY_BYTES = 128 << 20
RELAY_RANGES = ((0, 0xA0000), (0x100000, RELAY_MEMORY_BYTES))
WSS_START, WSS_BYTES = 0x2000000, 4 << 20  # the working set the guest keeps dirtying
RELAY_BLOB = Blob(0x4000000, 16 << 20, 31)  # 0.5 s of the first pass at 32 MiB/s
RELAY_BANDWIDTH = 32 << 20


@pytest.fixture(scope="module")
def relay_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("sr-relay")
    kernel = d / "dirty.bin"
    kernel.write_bytes(dirty_kernel(WSS_START, WSS_BYTES))
    blob = d / "relay-blob.bin"
    make_blob(blob, RELAY_BLOB.size, RELAY_BLOB.seed)
    return {"kernel": kernel, "blob": blob}


def pass_counter(q: QemuPeer) -> int:
    return int(struct.unpack("<I", q.read_memory(PASS_COUNTER, 4))[0])


def dirty_source(version: str, machine: str, files: dict[str, Path], workdir: Path,
                 blob: bool = True, name: str = "A") -> QemuPeer:
    return QemuPeer(version, machine=machine, memory=RELAY_MEMORY, paused=False,
                    blobs=[(files["blob"], RELAY_BLOB.addr)] if blob else [],
                    extra_args=["-kernel", str(files["kernel"])], workdir=workdir, name=name)


def wait_dirtying(a: QemuPeer, timeout: float = 30.0) -> int:
    """Until the multiboot guest runs (its pass counter moves); returns the counter."""
    deadline = time.monotonic() + timeout
    first = pass_counter(a)
    while True:
        time.sleep(0.05)
        now = pass_counter(a)
        if now > first > 0:
            return now
        first = now
        assert time.monotonic() < deadline, "the dirtying guest does not run"


def start_relay(launch: Launcher, in_uri: str, out_uri: str, rx: tuple[int, str],
                tx: tuple[int, str], *extra: str) -> LivemigProcess:
    p = launch("relay", in_uri, out_uri, *multifd_args("in-", *rx),
               *multifd_args("out-", *tx), *extra)
    p.wait_listening(in_uri)
    return p


def start_source_migration(a: QemuPeer, in_uri: str, rx: tuple[int, str],
                           bandwidth: int) -> None:
    a.set_caps({"return-path": True})
    set_multifd(a, *rx)
    a.set_params(**{"max-bandwidth": bandwidth})
    a.migrate(in_uri)


# (version, machine, incoming hop, outgoing hop, --record, transports in/out)
RELAYS = [
    ("10.0", "pc", (4, "none"), (2, "zstd"), False, ("unix", "tcp")),
    ("7.2", M72["pc"], (2, "zlib"), (0, "none"), False, ("tcp", "unix")),
    ("10.0", "q35", (0, "none"), (4, "zlib"), True, ("unix", "unix")),
    ("7.2", M72["q35"], (4, "zstd"), (1, "none"), True, ("tcp", "tcp")),
]


@pytest.mark.parametrize("case", RELAYS, ids=[
    f"{v}-{m}-in-{_mode(*i)}-{t[0]}-out-{_mode(*o)}-{t[1]}{'-record' if r else ''}"
    for v, m, i, o, r, t in RELAYS])
def test_relay_running_guest(case: tuple[Any, ...], workdir: Path,
                             relay_files: dict[str, Path],
                             livemig_bg: Launcher) -> None:
    """The guest increments the first dword of each of 1024 pages over and over while the
    source sends at 32 MiB/s: QEMU syncs its dirty bitmap several times and sends the
    working set again each time. Afterwards B runs, its RAM equals A's final RAM except the
    counters the guest kept incrementing on B, and those show no stale page and one common
    number of passes since A stopped. The recorded snapshot restores into QEMU 10 with
    exactly A's final RAM."""
    relay_running_guest(case, workdir, relay_files, livemig_bg)


# (TLS hop, source version, machine, incoming hop, outgoing hop, transports in/out); the
# destination is QEMU 10 with the source's machine type
RELAYS_TLS = [
    ("in", "7.2", M72["pc"], (2, "none"), (2, "zstd"), ("tcp", "unix")),
    ("out", "7.2", M72["pc"], (2, "zstd"), (2, "none"), ("unix", "tcp")),
]


@pytest.mark.parametrize("case", RELAYS_TLS, ids=[
    f"tls-{h}-{v}-in-{_mode(*i)}-{t[0]}-out-{_mode(*o)}-{t[1]}-to-10.0"
    for h, v, m, i, o, t in RELAYS_TLS])
def test_relay_running_guest_tls(case: tuple[Any, ...], workdir: Path,
                                 relay_files: dict[str, Path], livemig_bg: Launcher,
                                 tmp_path_factory: pytest.TempPathFactory) -> None:
    """As :func:`test_relay_running_guest`, from QEMU 7.2 to QEMU 10, with x509 TLS on one
    hop (``--in-tls-*`` or ``--out-tls-*``) and plain multifd on the other."""
    if not have_openssl():
        pytest.skip("needs the openssl command")
    hop, version, machine, rx, tx, transports = case
    creds = make_creds(tmp_path_factory.mktemp("pki"))["friendly"]
    relay_running_guest((version, machine, rx, tx, False, transports), workdir, relay_files,
                        livemig_bg, dest_version="10.0", tls=(hop, creds))


def relay_running_guest(case: tuple[Any, ...], workdir: Path, relay_files: dict[str, Path],
                        livemig_bg: Launcher, *, dest_version: str | None = None,
                        tls: tuple[str, str] | None = None) -> None:
    """The body of the relay tests: ``tls`` is (the hop, "in" or "out"; credentials)."""
    version, machine, rx, tx, record, (t_in, t_out) = case
    in_uri, out_uri = mig_uri(t_in, workdir, "in"), mig_uri(t_out, workdir, "out")
    rec = workdir / "relay.snap"
    kernel = ("-kernel", str(relay_files["kernel"]))
    tls_args: tuple[str, ...] = ()
    with dest_peer(dest_version or version, machine, workdir, memory=RELAY_MEMORY,
                   extra=kernel) as b, \
            dirty_source(version, machine, relay_files, workdir) as a:
        if tls is not None and tls[0] == "in":
            qemu_tls(a, "client", tls[1], hostname=SERVER_NAME)
            tls_args = ("--in-tls-creds", tls[1], "--in-tls-authz", FRIEND)
        elif tls is not None:
            qemu_tls(b, "server", tls[1], authz=FRIEND)
            tls_args = ("--out-tls-creds", tls[1], "--out-tls-hostname", SERVER_NAME)
        prepare_incoming(b, out_uri, *tx)
        p = start_relay(livemig_bg, in_uri, out_uri, rx, tx, "--json", *tls_args,
                        *(("--record", str(rec)) if record else ()))
        c0 = wait_dirtying(a)
        start_source_migration(a, in_uri, rx, RELAY_BANDWIDTH)
        info = a.wait_migration(timeout=MIGRATION_TIMEOUT)
        summary = json.loads(p.wait_ok(60).stdout)
        b.wait_migration(timeout=MIGRATION_TIMEOUT)
        assert b.status()["status"] == "running"
        a_ram = read_ram(a, RELAY_RANGES)
        time.sleep(0.3)
        b.stop()
        b_ram = read_ram(b, RELAY_RANGES)

    assert summary["verdict"] == "completed: confirmed by the destination", summary
    ram = info["ram"]
    assert ram["dirty-sync-count"] >= 2, ram
    blob_pages, wss_pages = RELAY_BLOB.size // 4096, WSS_BYTES // 4096
    assert ram["normal"] >= blob_pages + 2 * wss_pages, ram  # the working set went again
    assert summary["normal_pages"] >= ram["normal"], (summary, ram)

    hi = RELAY_RANGES[1]
    ca = page_counters(a_ram[1], hi[0], WSS_START, WSS_BYTES)
    cb = page_counters(b_ram[1], hi[0], WSS_START, WSS_BYTES)
    a_passes = dword(a_ram[1], PASS_COUNTER - hi[0])
    b_passes = dword(b_ram[1], PASS_COUNTER - hi[0])
    assert a_passes > c0, "the guest did not run during the migration"
    assert check_counters(ca) is None, f"A: {check_counters(ca)}"
    assert check_counters(cb) is None, f"B: {check_counters(cb)}"
    d = cb - ca  # every page went through the same number of passes on B (+-1)
    assert b_passes > a_passes and d.min() >= 1 and d.max() - d.min() <= 1, \
        (a_passes, b_passes, int(d.min()), int(d.max()))
    for r, x, y in zip(RELAY_RANGES, a_ram, b_ram, strict=True):
        assert_same(f"B vs A [{r[0]:#x}, {r[1]:#x})", x, y, r[0],
                    ignore=counter_mask(r[0], r[1] - r[0], WSS_START, WSS_BYTES))
    off = RELAY_BLOB.addr - hi[0]
    assert_same("B: relay blob", np.frombuffer(blob_bytes(RELAY_BLOB.size, RELAY_BLOB.seed),
                                               np.uint8),
                b_ram[1][off:off + RELAY_BLOB.size], RELAY_BLOB.addr)

    if record:
        assert summary["recorded"] == str(rec) or Path(summary["recorded"]) == rec, summary
        with QemuPeer("10.0", machine=machine, memory=RELAY_MEMORY, incoming="defer",
                      extra_args=list(kernel), workdir=workdir, name="restore") as q:
            q.set_caps({"mapped-ram": True})
            q.migrate_incoming(f"file:{rec}")
            q.wait_migration(timeout=MIGRATION_TIMEOUT)
            restored = read_ram(q, RELAY_RANGES)
        for r, x, y in zip(RELAY_RANGES, a_ram, restored, strict=True):
            assert_same(f"QEMU 10 restored from --record vs A [{r[0]:#x}, {r[1]:#x})", x, y,
                        r[0])


# --------------------------------------------------------------------------------------------
# Faults
# --------------------------------------------------------------------------------------------

BIG_MEMORY = "512M"
BIG_BLOB = Blob(0x1000000, 256 << 20, 41)


@pytest.fixture(scope="module")
def big_snapshot() -> Iterator[Path]:
    """A 512M QEMU 10 guest with 256M of random data, captured (paused) over 4 channels."""
    d = Path(tempfile.mkdtemp(prefix="lmbig-", dir="/tmp"))
    try:
        blob = d / "big.bin"
        make_blob(blob, BIG_BLOB.size, BIG_BLOB.seed)
        snap = d / "big.snap"
        with QemuPeer("10.0", machine="pc", memory=BIG_MEMORY, blobs=[(blob, BIG_BLOB.addr)],
                      workdir=d, name="big") as a:
            a.set_params(**{"max-bandwidth": BANDWIDTH})
            set_multifd(a, 4, "none")
            uri = f"unix:{d / 'recv.sock'}"
            p = LivemigProcess(["receive", uri, "-o", str(snap), "-q",
                                "--multifd-channels", "4"], d)
            try:
                p.wait_listening(uri)
                a.migrate(uri)
                a.wait_migration(timeout=MIGRATION_TIMEOUT)
                p.wait_ok(60)
            finally:
                p.kill()
        blob.unlink()
        yield snap
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.mark.parametrize(("channels", "compression"), [(0, "none"), (4, "zstd")],
                         ids=["precopy", "multifd4-zstd"])
def test_send_destination_killed_mid_send(channels: int, compression: str, workdir: Path,
                                          big_snapshot: Path,
                                          livemig_bg: Launcher) -> None:
    uri = f"unix:{workdir / 'send.sock'}"
    with dest_peer("10.0", "pc", workdir, memory=BIG_MEMORY) as b:
        prepare_incoming(b, uri, channels, compression)
        p = livemig_bg("send", str(big_snapshot), uri, *multifd_args("", channels, compression))
        wait_incoming_active(b)
        assert p.running(), f"livemig send finished before the kill:\n{p.stderr()}"
        assert b.pid is not None
        os.kill(b.pid, signal.SIGKILL)
        r = p.wait(FAIL_DEADLINE)
    line = assert_one_line_error(r, "send")
    assert "destination" in line or "channel" in line, line


@pytest.mark.parametrize(("version", "machine"), [("10.0", "pc"), ("7.2", M72["pc"])])
def test_relay_source_killed_mid_relay(version: str, machine: str, workdir: Path,
                                       relay_files: dict[str, Path],
                                       livemig_bg: Launcher) -> None:
    """The source dies while its first pass is going through the relay: the relay fails
    with one line, and the destination does not complete (QEMU 10 is kept alive with
    exit-on-error=false and ends 'failed'; QEMU 7.2 exits, as it does on any incoming
    failure)."""
    in_uri, out_uri = f"unix:{workdir / 'in.sock'}", f"unix:{workdir / 'out.sock'}"
    rx, tx = (2, "none"), (2, "zstd")
    kernel = ("-kernel", str(relay_files["kernel"]))
    with dest_peer(version, machine, workdir, memory=RELAY_MEMORY, extra=kernel) as b, \
            dirty_source(version, machine, relay_files, workdir) as a:
        prepare_incoming(b, out_uri, *tx, keep_on_error=version != "7.2")
        p = start_relay(livemig_bg, in_uri, out_uri, rx, tx)
        wait_dirtying(a)
        start_source_migration(a, in_uri, rx, 8 << 20)  # 16 MiB blob: about 2 s
        wait_status(a, ["active"])
        deadline = time.monotonic() + 30
        while a.query_migrate().get("ram", {}).get("transferred", 0) < 2 << 20:
            assert time.monotonic() < deadline, a.query_migrate()
            time.sleep(0.02)
        assert a.pid is not None
        os.kill(a.pid, signal.SIGKILL)
        r = p.wait(FAIL_DEADLINE)
        line = assert_one_line_error(r, "relay")
        assert "source" in line or "main channel" in line, line
        if version == "7.2":
            assert b.wait_exit(30) == 1, "QEMU 7.2 should exit on the failed migration"
            assert "load of migration failed" in b.stderr_text()
        else:
            info = wait_status(b, ["failed", "completed"], timeout=FAIL_DEADLINE)
            assert info["status"] == "failed", info
            assert b.status()["status"] != "running"


@pytest.mark.parametrize(("version", "channels"), [("7.2", 0), ("10.0", 2)])
def test_send_destination_refuses_wrong_ram_size(version: str, channels: int, workdir: Path,
                                                 snapshot72: Snapshot,
                                                 livemig_cli: Callable[..., Any]) -> None:
    """No --dest-qmp: QEMU (128M) refuses the 64M snapshot's RAM; livemig says so."""
    uri = f"unix:{workdir / 'send.sock'}"
    with dest_peer(version, snapshot72.machine, workdir, memory="128M") as b:
        prepare_incoming(b, uri, channels, "none")
        r = livemig_cli("send", str(snapshot72.path), uri, *multifd_args("", channels, "none"),
                        check=False, timeout=FAIL_DEADLINE)
        line = assert_one_line_error(r, "send")
        assert "destination" in line and ("failed" in line or "refused" in line), line
        b.wait_exit(30)  # QEMU exits on a failed incoming migration
    assert "Size mismatch" in b.stderr_text()


REFUSAL_MESSAGE_BUG = (
    "livemig bug: when the destination refuses the stream, QEMU sends SHUT(1) on the return "
    "path and closes; livemig's return-path thread does receive that SHUT(1), but the main "
    "writer's EPIPE is raised first and reported as 'main channel: send failed: Broken pipe "
    "(did the destination close the connection?)'; the except path of send() "
    "(livemig/commands/send.py:309-318) never looks at "
    "rp.shut, so the destination's verdict is lost whenever the snapshot is larger than what "
    "fits in the socket buffers (always for this 256 MiB one, by chance for small ones)")


def test_send_refusal_says_destination_failed_to_load(workdir: Path, big_snapshot: Path,
                                                      livemig_cli: Callable[..., Any]) -> None:
    """The 512M snapshot into a 1G QEMU 10 (no --dest-qmp): QEMU refuses the RAM at the
    block list, long before livemig has written everything. The message must say that the
    destination failed to load the migration, not only that a write failed."""
    uri = f"unix:{workdir / 'send.sock'}"
    with dest_peer("10.0", "pc", workdir, memory="1G") as b:
        prepare_incoming(b, uri)
        r = livemig_cli("send", str(big_snapshot), uri, check=False, timeout=FAIL_DEADLINE)
        line = assert_one_line_error(r, "send")
        b.wait_exit(30)
    assert "Size mismatch" in b.stderr_text()
    assert "failed to load" in line, line


@pytest.fixture(scope="module")
def rng_snapshot(blob_files: dict[Blob, Path]) -> Iterator[Path]:
    """A QEMU 10 guest with a virtio-rng-pci device (its destinations will not have it)."""
    d = Path(tempfile.mkdtemp(prefix="lmrng-", dir="/tmp"))
    try:
        snap = d / "rng.snap"
        with source_peer("10.0", "pc", blob_files, d, paused=True,
                         extra=("-device", "virtio-rng-pci")) as a:
            uri = f"unix:{d / 'recv.sock'}"
            p = LivemigProcess(["receive", uri, "-o", str(snap), "-q"], d)
            try:
                p.wait_listening(uri)
                a.migrate(uri)
                a.wait_migration(timeout=MIGRATION_TIMEOUT)
                p.wait_ok(60)
            finally:
                p.kill()
        yield snap
    finally:
        shutil.rmtree(d, ignore_errors=True)


def _device_mismatch(workdir: Path, snap: Path, livemig_cli: Callable[..., Any],
                     incoming_by_test: bool) -> None:
    info: dict[str, Any] = {}
    uri = f"unix:{workdir / 'send.sock'}"
    qmp_uri, qmp_args = second_qmp(workdir)
    with dest_peer("10.0", "pc", workdir, extra=qmp_args) as b:
        if incoming_by_test:
            prepare_incoming(b, uri, keep_on_error=True)
        r = livemig_cli("send", str(snap), uri, "--dest-qmp", qmp_uri, check=False,
                        timeout=FAIL_DEADLINE)
        line = assert_one_line_error(r, "send")
        if b.is_running():
            info = wait_status(b, ["failed"])
            desc = info.get("error-desc")
        else:
            # QEMU exited; what query-migrate says in this case (seen with a destination
            # kept alive by exit-on-error=false, the test below)
            desc = "load of migration failed: Invalid argument"
    assert desc, info
    assert desc in line, f"QEMU's error-desc {desc!r} not in livemig's message: {line}"


def test_dest_qmp_device_mismatch_reports_qemu_error(workdir: Path, rng_snapshot: Path,
                                                     livemig_cli: Callable[..., Any]) -> None:
    """The snapshot has a virtio-rng-pci the destination lacks. The destination's incoming
    side was started (by the test) with exit-on-error=false, so QEMU stays up and livemig
    reads QEMU's error-desc through --dest-qmp."""
    _device_mismatch(workdir, rng_snapshot, livemig_cli, incoming_by_test=True)


DEST_QMP_EXIT_BUG = (
    "livemig bug: with --dest-qmp, livemig starts the destination's migrate-incoming itself "
    "(livemig/commands/dest_check.py:48, end of preflight) without exit-on-error=false, so a "
    "QEMU >= 9.1 destination exits as soon as the load fails and livemig cannot read "
    "query-migrate's error-desc: the message is only 'the destination QEMU failed to load "
    "the migration (status 1)', without QEMU's text")


def test_dest_qmp_device_mismatch_livemig_starts_incoming(
        workdir: Path, rng_snapshot: Path, livemig_cli: Callable[..., Any]) -> None:
    """Same mismatch, the destination only started with -incoming defer: livemig starts
    migrate-incoming, and its message must still carry QEMU's error-desc."""
    _device_mismatch(workdir, rng_snapshot, livemig_cli, incoming_by_test=False)


@pytest.mark.parametrize(("version", "machine", "rx", "tx"), [
    ("7.2", M72["pc"], (0, "none"), (0, "none")),
    ("10.0", "pc", (2, "none"), (2, "zlib")),
], ids=["7.2-precopy", "10.0-in-multifd2-none-out-multifd2-zlib"])
def test_relay_destination_refuses(version: str, machine: str, rx: tuple[int, str],
                                   tx: tuple[int, str], workdir: Path,
                                   blob_files: dict[Blob, Path],
                                   livemig_bg: Launcher) -> None:
    """B has 128M, the running source 64M: B refuses the RAM; the relay fails with one line
    and the source, told through its return path, ends 'failed' and keeps running."""
    in_uri, out_uri = f"unix:{workdir / 'in.sock'}", f"unix:{workdir / 'out.sock'}"
    with dest_peer(version, machine, workdir, memory="128M") as b, \
            source_peer(version, machine, blob_files, workdir, paused=False) as a:
        prepare_incoming(b, out_uri, *tx)
        p = start_relay(livemig_bg, in_uri, out_uri, rx, tx)
        assert a.status()["status"] == "running"
        start_source_migration(a, in_uri, rx, BANDWIDTH)
        info = a.wait_migration(timeout=MIGRATION_TIMEOUT, expect=("failed",))
        r = p.wait(FAIL_DEADLINE)
        line = assert_one_line_error(r, "relay")
        assert "destination" in line, line
        time.sleep(0.3)
        status = a.status()
        assert status["status"] == "running" and status["running"], (status, info)
        assert a.query_migrate()["status"] == "failed"
    assert "Size mismatch" in b.stderr_text()


# --------------------------------------------------------------------------------------------
# Destination failures one can act on (issue 12 item 15)
# --------------------------------------------------------------------------------------------


def test_send_without_dest_qmp_says_what_it_knows(workdir: Path, snapshot72: Snapshot,
                                                  livemig_cli: Callable[..., Any]) -> None:
    """The 7.2 snapshot into a QEMU 10 running another machine type, no monitor: the one
    line names the snapshot's machine type and RAM and points to --dest-qmp (it used to
    say only "send failed: Broken pipe")."""
    uri = f"unix:{workdir / 'send.sock'}"
    with dest_peer("10.0", "pc-i440fx-10.0", workdir) as b:
        prepare_incoming(b, uri, keep_on_error=True)
        r = livemig_cli("send", str(snapshot72.path), uri, check=False, timeout=FAIL_DEADLINE)
        line = assert_one_line_error(r, "send")
        assert "machine type pc-i440fx-7.2" in line and "64 MiB" in line, line
        assert "--dest-qmp" in line, line
        assert wait_status(b, ["failed"], timeout=FAIL_DEADLINE)["status"] == "failed"


def test_dest_qmp_advice_names_only_what_the_destination_has(
        workdir: Path, rng_snapshot: Path, livemig_cli: Callable[..., Any]) -> None:
    """A QEMU 10 snapshot (pc-i440fx-10.0) for a QEMU 7.2 destination: "start it with
    -M pc-i440fx-10.0" would be impossible; the message says 7.2 has no such type and
    which of that family it has."""
    qmp_uri, qmp_args = second_qmp(workdir)
    with RecordingSink(str(workdir / "send.sock")) as sink, \
            dest_peer("7.2", M72["q35"], workdir, extra=qmp_args):
        r = livemig_cli("send", str(rng_snapshot), sink.uri, "--dest-qmp", qmp_uri,
                        check=False, timeout=FAIL_DEADLINE)
        line = assert_one_line_error(r, "send")
        assert "QEMU 7.2 has no machine type pc-i440fx-10.0" in line, line
        assert "pc-i440fx-7.2" in line, line  # what it has instead
        assert "start it with -M" not in line, line
        assert sink.info() == [], f"livemig connected to the destination: {sink.info()}"


def _paused_source_into_relay(a: QemuPeer, in_uri: str) -> None:
    a.set_caps({"return-path": True})
    a.set_params(**{"max-bandwidth": BANDWIDTH})
    a.migrate(in_uri)


def test_relay_dest_qmp_prepares_the_destination(workdir: Path, blob_files: dict[Blob, Path],
                                                 livemig_bg: Launcher) -> None:
    """relay --dest-qmp into a QEMU 7.2 started with -incoming defer only: livemig sets
    multifd and starts migrate-incoming itself once the source's machine type is known."""
    in_uri, out_uri = f"unix:{workdir / 'in.sock'}", f"unix:{workdir / 'out.sock'}"
    qmp_uri, qmp_args = second_qmp(workdir)
    with dest_peer("7.2", M72["pc"], workdir, extra=qmp_args) as b, \
            source_peer("7.2", M72["pc"], blob_files, workdir, paused=True) as a:
        p = start_relay(livemig_bg, in_uri, out_uri, (0, "none"), (2, "zlib"),
                        "--dest-qmp", qmp_uri)
        _paused_source_into_relay(a, in_uri)
        a.wait_migration(timeout=MIGRATION_TIMEOUT)
        p.wait_ok(FAIL_DEADLINE)
        b.wait_migration(timeout=MIGRATION_TIMEOUT)
        assert b.query_caps()["multifd"] is True
        params = b.query_params()
        assert (params["multifd-channels"], params["multifd-compression"]) == (2, "zlib")
        assert_blobs("QEMU 7.2 behind relay --dest-qmp", read_ram(b, RANGES), low_too=True)


def test_relay_dest_qmp_refuses_machine_mismatch(workdir: Path, blob_files: dict[Blob, Path],
                                                 livemig_bg: Launcher) -> None:
    """The destination runs another machine type: relay --dest-qmp refuses before it
    connects to it, with one line naming both types; the source fails and keeps running."""
    in_uri = f"unix:{workdir / 'in.sock'}"
    qmp_uri, qmp_args = second_qmp(workdir)
    with RecordingSink(str(workdir / "out.sock")) as sink, \
            dest_peer("10.0", "pc-i440fx-10.0", workdir, extra=qmp_args), \
            source_peer("7.2", M72["pc"], blob_files, workdir, paused=True) as a:
        p = start_relay(livemig_bg, in_uri, sink.uri, (0, "none"), (0, "none"),
                        "--dest-qmp", qmp_uri)
        _paused_source_into_relay(a, in_uri)
        r = p.wait(FAIL_DEADLINE)
        line = assert_one_line_error(r, "relay")
        assert "source is for machine type pc-i440fx-7.2" in line, line
        assert "pc-i440fx-10.0" in line and "start it with -M pc-i440fx-7.2" in line, line
        a.wait_migration(timeout=FAIL_DEADLINE, expect=("failed",))
        assert a.is_running()
        assert sink.info() == [], f"the relay connected to the destination: {sink.info()}"
