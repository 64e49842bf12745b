"""Helpers and fixtures for tests/test_send_relay_interop.py (``livemig send`` and
``livemig relay`` against real QEMU 7.2 and 10.0).

Not loaded by pytest on its own (the name is not ``conftest.py``); the test module imports
what it needs from here.

* :class:`LivemigProcess`: one ``livemig`` subprocess (the real CLI) with its output in
  files and a deadline on every wait; :class:`Launcher` starts them and kills them all on
  exit.
* :func:`prepare_incoming`: a destination QEMU started with ``-incoming defer`` gets its
  multifd capability and parameters, then ``migrate-incoming`` (QEMU 10 wants multifd set
  before the incoming side starts).
* :func:`wait_seabios_idle`: waits until a running SeaBIOS guest (nothing to boot) only
  changes its BIOS tick counter, so that a destination resumed from it can be compared
  byte for byte.
* :func:`dirty_kernel` / :func:`check_counters`: a 128-byte multiboot guest that keeps
  incrementing the first dword of every page of a working set (adapted from the team's
  dirty-guest tool: the same idea and counter check, written for these tests).
* RAM comparison helpers that name the first differing pages instead of dumping bytes.
"""

from __future__ import annotations

import os
import struct
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Self

import numpy as np
import pytest
from helpers import LISTENING_RE, CliResult, LivemigCli
from peers import QemuPeer

PAGE = 4096

#: The BIOS data area's timer tick counter (dword at 0x46C, incremented by SeaBIOS's IRQ0
#: handler 18.2 times a second) and the midnight flag after it: the only bytes an idle
#: SeaBIOS guest keeps changing.
BDA_TICKS = 0x46C
BDA_TICK_BYTES = (0x46C, 0x471)


# --------------------------------------------------------------------------------------------
# livemig send / relay as subprocesses
# --------------------------------------------------------------------------------------------


class LivemigProcess(LivemigCli):
    """One livemig CLI process (send, relay, receive) for these tests; its
    ``wait_listening(uri)`` is for relay and receive."""

    def __init__(self, args: Sequence[str], logdir: Path) -> None:
        super().__init__(args, logdir, prefix="lm")


class Launcher:
    """``Launcher(logdir)(*args)`` starts ``livemig ARGS...`` in the background; leaving the
    ``with`` block kills every process it started (the test module's ``livemig_bg``
    fixture wraps it)."""

    def __init__(self, logdir: Path) -> None:
        self.logdir = logdir
        self.started: list[LivemigProcess] = []

    def __call__(self, *args: str | os.PathLike[str]) -> LivemigProcess:
        p = LivemigProcess([os.fspath(a) for a in args], self.logdir)
        self.started.append(p)
        return p

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        for p in self.started:
            p.kill()


def multifd_args(prefix: str, channels: int, compression: str) -> list[str]:
    """``--multifd-channels N --multifd-compression C`` (``prefix`` "in-"/"out-" for relay);
    nothing for precopy."""
    if not channels:
        return []
    return [f"--{prefix}multifd-channels", str(channels),
            f"--{prefix}multifd-compression", compression]


def assert_one_line_error(r: CliResult, command: str) -> str:
    """A failed livemig run: status 1 and exactly one line on stderr besides relay's
    "waiting for a migration" line: livemig's own error, no traceback. Returns that line."""
    lines = [x for x in r.stderr.splitlines()
             if x.strip() and not LISTENING_RE.search(x)]
    assert r.rc == 1, f"livemig {command}: status {r.rc}, expected 1:\n{r.stderr}"
    assert "Traceback" not in r.stderr, r.stderr
    assert len(lines) == 1, f"livemig {command}: expected one error line, got:\n{r.stderr}"
    assert lines[0].startswith(f"livemig {command}: error: "), lines[0]
    return lines[0]


# --------------------------------------------------------------------------------------------
# QEMU helpers
# --------------------------------------------------------------------------------------------


def set_multifd(q: QemuPeer, channels: int, compression: str = "none") -> None:
    if channels:
        q.set_caps({"multifd": True})
        q.set_params(**{"multifd-channels": channels, "multifd-compression": compression})


def prepare_incoming(q: QemuPeer, uri: str, channels: int = 0, compression: str = "none", *,
                     keep_on_error: bool = False) -> None:
    """Multifd settings, then ``migrate-incoming URI``. ``keep_on_error`` (QEMU >= 9.1):
    ``exit-on-error=false``, so that a failed incoming migration leaves QEMU alive in state
    'failed' with its error-desc."""
    set_multifd(q, channels, compression)
    if keep_on_error:
        q.qmp("migrate-incoming", uri=uri, **{"exit-on-error": False})
    else:
        q.migrate_incoming(uri)


def wait_incoming_active(q: QemuPeer, timeout: float = 30.0) -> None:
    """Until the destination's incoming migration is 'active' (the source connected)."""
    deadline = time.monotonic() + timeout
    while True:
        st = q.query_migrate().get("status")
        if st == "active":
            return
        assert st not in ("completed", "failed"), f"incoming migration already {st}"
        assert time.monotonic() < deadline, f"incoming migration still {st!r} after {timeout}s"
        time.sleep(0.005)


def wait_status(q: QemuPeer, wanted: Iterable[str], timeout: float = 30.0) -> dict[str, Any]:
    """query-migrate until its status is one of ``wanted``."""
    wanted = tuple(wanted)
    deadline = time.monotonic() + timeout
    while True:
        info = q.query_migrate()
        if info.get("status") in wanted:
            return info
        assert time.monotonic() < deadline, \
            f"QEMU {q.version}: migration {info.get('status')!r}, wanted {wanted}: {info}"
        time.sleep(0.02)


def read_ram(q: QemuPeer, ranges: Sequence[tuple[int, int]]) -> list[np.ndarray]:
    """pmemsave of each [start, end) as a uint8 array."""
    return [np.frombuffer(q.read_memory(a, b - a), np.uint8) for a, b in ranges]


def wait_seabios_idle(q: QemuPeer, ranges: Sequence[tuple[int, int]],
                      timeout: float = 30.0) -> None:
    """Until two pmemsaves 0.15 s apart differ in nothing but the BIOS tick counter: SeaBIOS
    found nothing to boot and waits (it retries after 60 s, far beyond these tests)."""
    deadline = time.monotonic() + timeout
    before = read_ram(q, ranges)
    while True:
        time.sleep(0.15)
        after = read_ram(q, ranges)
        masks = [tick_mask(r) for r in ranges]
        if all(np.array_equal(x[~m], y[~m]) for x, y, m in zip(before, after, masks,
                                                                 strict=True)):
            return
        assert time.monotonic() < deadline, f"SeaBIOS still changing RAM after {timeout}s"
        before = after


def tick_mask(r: tuple[int, int]) -> np.ndarray:
    """True on the BDA tick bytes inside range ``r``."""
    a, b = r
    m = np.zeros(b - a, dtype=bool)
    lo, hi = max(a, BDA_TICK_BYTES[0]), min(b, BDA_TICK_BYTES[1])
    if lo < hi:
        m[lo - a:hi - a] = True
    return m


def dword(ram: np.ndarray, offset: int) -> int:
    """The little-endian dword at ``offset`` of a pmemsave array."""
    return int(ram[offset:offset + 4].view("<u4")[0])


def bda_ticks(low: np.ndarray) -> int:
    """The BDA tick counter out of a pmemsave that starts at guest-physical 0."""
    return dword(low, BDA_TICKS)


# --------------------------------------------------------------------------------------------
# RAM comparison
# --------------------------------------------------------------------------------------------


def assert_same(what: str, expected: np.ndarray, got: np.ndarray, base: int,
                ignore: np.ndarray | None = None) -> None:
    """Byte-for-byte equality (except where ``ignore`` is True), reported as pages."""
    assert expected.shape == got.shape, f"{what}: {got.size} bytes, expected {expected.size}"
    diff = expected != got
    if ignore is not None:
        diff &= ~ignore
    if not diff.any():
        return
    idx = np.flatnonzero(diff)
    pages = np.unique(idx // PAGE)
    pytest.fail(f"{what}: {idx.size} bytes differ in {pages.size} pages; first at "
                f"guest-physical {[hex(base + int(i)) for i in idx[:6]]}")


# --------------------------------------------------------------------------------------------
# The dirtying guest
# --------------------------------------------------------------------------------------------

KERNEL_LOAD = 0x100000  # multiboot load address (1 MiB)
KERNEL_ENTRY = KERNEL_LOAD + 32
PASS_COUNTER = KERNEL_LOAD + 64  # dword: completed passes over the working set


def dirty_kernel(wss_start: int, wss_bytes: int) -> bytes:
    """A 128-byte multiboot image (a.out kludge, loaded at 1 MiB) that runs, with interrupts
    off, forever::

        outer: mov esi, wss_start ; mov ecx, pages
        inner: inc dword [esi] ; add esi, 4096 ; dec ecx ; jnz inner
               inc dword [PASS_COUNTER] ; jmp outer

    so the first dword of each working-set page counts the passes that reached it, and
    nothing else in RAM changes (no interrupts, no stack)."""
    pages = wss_bytes // PAGE
    magic, flags = 0x1BADB002, 0x00010000
    header = struct.pack("<8I", magic, flags, (-(magic + flags)) & 0xFFFFFFFF,
                         KERNEL_LOAD, KERNEL_LOAD, KERNEL_LOAD + 128, 0, KERNEL_ENTRY)
    code = (b"\xFA"
            + b"\xBE" + struct.pack("<I", wss_start)
            + b"\xB9" + struct.pack("<I", pages)
            + b"\xFF\x06"
            + b"\x81\xC6\x00\x10\x00\x00"
            + b"\x49"
            + b"\x75\xF5"
            + b"\xFF\x05" + struct.pack("<I", PASS_COUNTER)
            + b"\xEB\xE3")
    image = header + code
    assert len(image) <= 128
    return image + bytes(128 - len(image))


def page_counters(ram: np.ndarray, base: int, wss_start: int, wss_bytes: int) -> np.ndarray:
    """The first dword of every working-set page, out of a pmemsave starting at ``base``."""
    off = wss_start - base
    return ram[off:off + wss_bytes].view("<u4")[::PAGE // 4].astype(np.int64)


def check_counters(counters: np.ndarray) -> str | None:
    """None if the per-page counters are what one CPU walking the pages in order leaves
    behind (N+1, ..., N+1, N, ..., N), else where the pattern breaks: a page that reached
    the destination stale breaks it."""
    d = counters[:-1] - counters[1:]
    bad = np.flatnonzero((d != 0) & (d != 1))
    if bad.size:
        i = int(bad[0]) + 1
        return f"page {i}: counter {counters[i]} after {counters[i - 1]}"
    if int(d.sum()) > 1:
        return f"{int(d.sum())} steps in one pass: a page is stale"
    return None


def counter_mask(base: int, size: int, wss_start: int, wss_bytes: int) -> np.ndarray:
    """True on the bytes the dirtying guest writes: each page's first dword in the working
    set, and the pass counter."""
    m = np.zeros(size, dtype=bool)
    off = wss_start - base
    for p in range(off, off + wss_bytes, PAGE):
        if 0 <= p < size:
            m[p:p + 4] = True
    pc = PASS_COUNTER - base
    if 0 <= pc < size:
        m[pc:pc + 4] = True
    return m
