"""Issue 12, the I/O edges: what livemig does to paths it is pointed at, bad sizes, the
commands it starts, and failures that must come at once and say what is wrong.

Every test states the behaviour, not a timing: a refusal is a one-line error with exit
status 1, a file that must survive is compared byte for byte, a wait that must not
happen is bounded by the helpers' deadline (which fails the test, it never passes it).
"""

from __future__ import annotations

import os
import socket
import stat
from pathlib import Path

import pytest
from helpers import CliResult, run_cli
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
