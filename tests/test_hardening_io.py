"""Issue 12, the I/O edges: what livemig does to paths it is pointed at, bad sizes, the
commands it starts, and failures that must come at once and say what is wrong.

Every test states the behaviour, not a timing: a refusal is a one-line error with exit
status 1, a file that must survive is compared byte for byte, a wait that must not
happen is bounded by the helpers' deadline (which fails the test, it never passes it).
"""

from __future__ import annotations

import os
import select
import signal
import socket
import stat
import struct
import threading
from pathlib import Path

import pytest
from helpers import CLI_TIMEOUT, CliResult, LivemigCli, run_cli
from peers import read_capture

import livemig
from livemig.engine.controller import MachineController
from livemig.engine.machine import Machine

VICTIM = b"precious data, not guest memory\n"


def one_line_error(r: CliResult, command: str, *needles: str) -> str:
    """``livemig COMMAND`` failed with status 1 and one line, ``error: ...``, holding each
    of ``needles``."""
    assert "Traceback" not in r.stderr, r.stderr
    assert r.rc == 1, f"status {r.rc}: {r.stderr}"
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith(f"livemig {command}: error: "), lines[0]
    for n in needles:
        assert n in lines[0], f"{n!r} not in {lines[0]!r}"
    return lines[0]


@pytest.fixture
def stream(tmp_path: Path) -> Path:
    """A real QEMU 10.0 precopy stream in a file."""
    p = tmp_path / "vm.stream"
    p.write_bytes(read_capture("qemu10.0-precopy.stream"))
    return p


@pytest.fixture
def victim(tmp_path: Path) -> Path:
    p = tmp_path / "victim"
    p.write_bytes(VICTIM)
    return p


# -- item 2: a unix: path that is not a socket is refused, and left as it was ----------------


@pytest.mark.parametrize("command", [
    ["receive", "unix:{path}", "-o", "{tmp}/out.snap"],
    ["relay", "unix:{path}", "tcp:127.0.0.1:1"],
    ["vhost-user-backend", "--socket-path", "{path}"],
])
def test_listening_refuses_a_path_that_is_not_a_socket(tmp_path: Path, victim: Path,
                                                       command: list[str]) -> None:
    args = [a.format(path=victim, tmp=tmp_path) for a in command]
    r = run_cli(args)
    one_line_error(r, args[0], str(victim), "is not a socket")
    assert victim.read_bytes() == VICTIM and stat.S_ISREG(victim.lstat().st_mode)


def test_run_incoming_leaves_a_regular_file_alone(victim: Path) -> None:
    """``run --incoming unix:PATH``: the incoming migration fails naming the path; the
    file is neither replaced by the socket nor removed at exit."""
    machine = Machine(1 << 20)
    ctl = MachineController(machine, incoming=f"unix:{victim}")
    try:
        ctl.start()
        assert ctl.incoming is not None
        assert ctl.incoming.join(timeout=30), "the incoming migration is still waiting"
        assert ctl.incoming.status == "failed"
        assert "is not a socket" in (ctl.incoming.error_desc or "")
    finally:
        ctl.close()
    assert victim.read_bytes() == VICTIM


def test_listening_still_replaces_a_stale_socket(tmp_path: Path, stream: Path) -> None:
    """The other side of the check: a socket left behind is replaced (and removed at the
    end, since it is then ours)."""
    path = tmp_path / "stale.sock"
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(path))
    s.close()
    seen: list[str] = []
    with pytest.raises(livemig.MigrationError, match="timed out"):
        livemig.receive(f"unix:{path}", str(tmp_path / "out.snap"), accept_timeout=0,
                        on_listening=seen.append)
    assert seen == [f"unix:{path}"]
    assert not path.exists()


# -- items 3 and 11: temporary files are created new, never through a link, mode 0600 --------


def test_receive_does_not_follow_a_planted_link(tmp_path: Path, stream: Path,
                                                victim: Path) -> None:
    out = tmp_path / "out.snap"
    planted = tmp_path / f".out.snap.part-{os.getpid()}"
    planted.symlink_to(victim)
    res = livemig.receive(f"file:{stream}", str(out))
    assert res.snapshot == str(out)
    assert victim.read_bytes() == VICTIM
    assert planted.is_symlink() and os.readlink(planted) == str(victim)
    assert stat.S_IMODE(out.stat().st_mode) == 0o600


def test_extract_does_not_follow_a_planted_link_and_writes_0600(tmp_path: Path, stream: Path,
                                                                victim: Path) -> None:
    snap = tmp_path / "vm.snap"
    livemig.receive(f"file:{stream}", str(snap))
    raw = tmp_path / "ram.raw"
    planted = tmp_path / f".ram.raw.part-{os.getpid()}"
    planted.symlink_to(victim)
    old = os.umask(0o022)
    try:
        n = livemig.extract(str(snap), "pc.ram", str(raw))
    finally:
        os.umask(old)
    assert raw.stat().st_size == n
    assert victim.read_bytes() == VICTIM and planted.is_symlink()
    assert stat.S_IMODE(raw.stat().st_mode) == 0o600
    assert stat.S_IMODE(snap.stat().st_mode) == 0o600


# -- item 9: sizes and offsets that are not numbers of bytes ---------------------------------


@pytest.mark.parametrize("offset", ["nan", "inf", "1e400", "1e20", "9223372036854775807"])
def test_receive_file_offset_is_refused(tmp_path: Path, stream: Path, offset: str) -> None:
    r = run_cli(["receive", f"file:{stream},offset={offset}", "-o", tmp_path / "o.snap"])
    one_line_error(r, "receive", "offset", offset)
    assert not (tmp_path / "o.snap").exists()


@pytest.mark.parametrize(("option", "value"), [
    ("--memory", "nan"), ("--memory", "1e400"), ("--workload-rate", "inf"),
])
def test_run_size_options_are_refused(option: str, value: str) -> None:
    r = run_cli(["run", option, value])
    one_line_error(r, "run", option, repr(value))


def test_parse_size_is_exact_for_long_numbers() -> None:
    from livemig.io.uri import MAX_SIZE, parse_size
    assert parse_size(str(MAX_SIZE)) == MAX_SIZE
    assert parse_size("9007199254740993") == 9007199254740993  # not a float's 2**53 + 2
    assert parse_size("1.5K") == 1536


# -- item 14e: a path that is not a regular file is refused, not waited on --------------------


@pytest.mark.parametrize("command", [
    ["inspect", "{fifo}"],
    ["extract", "{fifo}", "--block", "pc.ram", "-o", "{tmp}/ram.raw"],
    ["send", "{fifo}", "tcp:127.0.0.1:1"],
    ["receive", "file:{fifo}", "-o", "{tmp}/out.snap"],
])
def test_a_fifo_without_a_writer_is_refused(tmp_path: Path, command: list[str]) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    args = [a.format(fifo=fifo, tmp=tmp_path) for a in command]
    r = run_cli(args)
    one_line_error(r, args[0], str(fifo), "not a regular file")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fifo"]


# -- item 10: an exec: command's process group ends with livemig -----------------------------


@pytest.mark.parametrize("command", ["receive", "send"])
def test_sigterm_ends_the_exec_commands_process_group(tmp_path: Path, stream: Path,
                                                      command: str) -> None:
    """The command starts a child of its own (``sleep``) and tells its pid through a FIFO;
    SIGTERM to livemig must end that child too, not leave it holding livemig's stderr."""
    fifo = tmp_path / "pid"
    os.mkfifo(fifo)
    cmd = f"exec:sleep 1000 & echo $! > {fifo}; wait"
    if command == "receive":
        args = ["receive", cmd, "-o", str(tmp_path / "out.snap")]
    else:
        snap = tmp_path / "vm.snap"
        livemig.receive(f"file:{stream}", str(snap))
        args = ["send", str(snap), cmd]
    cli = LivemigCli(args, tmp_path)
    try:
        with open(fifo) as f:  # blocks until the command has started its child
            child = int(f.read())
        pidfd = os.pidfd_open(child)
        try:
            os.kill(cli.proc.pid, signal.SIGTERM)
            assert cli.wait().rc in (1, 143), cli.stderr()
            # readable once the child has ended
            ready, _, _ = select.select([pidfd], [], [], CLI_TIMEOUT)
            assert ready, f"the exec: command's child {child} is still running"
        finally:
            os.close(pidfd)
    finally:
        cli.kill()


# -- item 14a: a refused tcp: connection fails at once; a missing unix: path is waited for ---


class _Connect:
    """``connect_channel(URI)`` in a thread, allowed to retry for an hour; :meth:`join`
    fails the test if it is still connecting at the deadline (and ends it then)."""

    def __init__(self, uri: str) -> None:
        from livemig.io.uri import parse_uri
        from livemig.migration.common.failure import FailureLatch
        from livemig.migration.source.channels import connect_channel

        self.latch = FailureLatch()
        self.out: list[object] = []

        def run() -> None:
            try:
                self.out.append(connect_channel(parse_uri(uri), self.latch, timeout=3600))
            except livemig.MigrationError as e:
                self.out.append(e)
        self.thread = threading.Thread(target=run, name="connect")
        self.thread.start()

    def join(self) -> object:
        self.thread.join(CLI_TIMEOUT)
        if self.thread.is_alive():
            self.latch.fail(livemig.MigrationError("test deadline"))
            self.thread.join()
            raise AssertionError("connect_channel is still retrying")
        return self.out[0]


def test_a_refused_tcp_connection_is_not_retried() -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        c = _Connect(f"tcp:127.0.0.1:{s.getsockname()[1]}")
        res = c.join()
    assert isinstance(res, livemig.TransportError) and "refused" in str(res), res


def test_a_missing_unix_path_is_still_waited_for(tmp_path: Path) -> None:
    path = tmp_path / "later.sock"
    c = _Connect(f"unix:{path}")
    with socket.socket(socket.AF_UNIX) as lsock:
        lsock.bind(str(path))
        lsock.listen(1)
        res = c.join()
        assert isinstance(res, socket.socket), res
        res.close()


def test_send_to_a_closed_port_fails_with_one_line(tmp_path: Path, stream: Path) -> None:
    snap = tmp_path / "vm.snap"
    livemig.receive(f"file:{stream}", str(snap))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        r = run_cli(["send", snap, f"tcp:127.0.0.1:{s.getsockname()[1]}"])
    one_line_error(r, "send", "Connection refused")


# -- item 14d: tcp://HOST:PORT names QEMU's form ----------------------------------------------


@pytest.mark.parametrize("command", [["send", "{snap}", "tcp://127.0.0.1:4444"],
                                     ["receive", "tcp://127.0.0.1:0", "-o", "{tmp}/o.snap"]])
def test_tcp_url_form_names_qemus_form(tmp_path: Path, stream: Path, command: list[str]) -> None:
    snap = tmp_path / "vm.snap"
    livemig.receive(f"file:{stream}", str(snap))
    args = [a.format(snap=snap, tmp=tmp_path) for a in command]
    r = run_cli(args)
    one_line_error(r, args[0], "tcp:HOST:PORT", "tcp://127.0.0.1")


# -- item 14c: an accept timeout with nothing connected says so --------------------------------


def test_accept_timeout_with_nothing_connected(tmp_path: Path) -> None:
    r = run_cli(["receive", f"unix:{tmp_path}/m.sock", "-o", tmp_path / "o.snap",
                 "--multifd-channels", "2", "--accept-timeout", "0", "-q"])
    line = one_line_error(r, "receive", "nothing connected")
    assert "multifd-channels" not in line


# -- item 14f: a mapped-ram bitmap offset inside the file header is refused ------------------


def test_bitmap_offset_over_the_header_is_refused(tmp_path: Path, stream: Path) -> None:
    from livemig.wire.constants import MAPPED_RAM_HDR_VERSION
    snap = tmp_path / "vm.snap"
    livemig.receive(f"file:{stream}", str(snap))
    data = bytearray(snap.read_bytes())
    name = data.index(b"pc.ram")
    hdr = data.index(struct.pack(">IQ", MAPPED_RAM_HDR_VERSION, 4096), name)
    struct.pack_into(">Q", data, hdr + 12, 0x10)  # the bitmap offset
    bad = tmp_path / "bad.snap"
    bad.write_bytes(data)
    for command in (["inspect", bad], ["extract", bad, "--block", "pc.ram", "-o",
                                       tmp_path / "ram.raw"]):
        r = run_cli(command)
        one_line_error(r, str(command[0]), "pc.ram", "bitmap offset 0x10", "file header")
    assert not (tmp_path / "ram.raw").exists()


# -- item 14b: fewer multifd channels than expected: the message says the counts differ ------


@pytest.mark.parametrize("accept_timeout", ["5", "3600"])
def test_fewer_multifd_channels_says_the_counts_differ(tmp_path: Path,
                                                       accept_timeout: str) -> None:
    """Also with an hour to accept: once the main channel is there, a gap of
    MULTIFD_CONNECT_GAP without a connection ends the wait (it took 30 s before; the
    wait below fails the test after 20 s)."""
    path = tmp_path / "m.sock"
    cli = LivemigCli(["receive", f"unix:{path}", "-o", str(tmp_path / "o.snap"), "-q",
                      "--multifd-channels", "3", "--accept-timeout", accept_timeout],
                     tmp_path, uri=f"unix:{path}")
    socks = []
    try:
        cli.wait_listening()
        for first in (b"QEVM", b"\x11\x22\x33\x44"):  # the main channel and one multifd
            s = socket.socket(socket.AF_UNIX)
            s.connect(str(path))
            s.sendall(first)
            socks.append(s)
        r = cli.wait(timeout=20)
    finally:
        for s in socks:
            s.close()
        cli.kill()
    one_line_error(r, "receive", "counts differ", "connected 1 multifd channels",
                   "expects 3")
