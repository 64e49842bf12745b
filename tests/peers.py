"""Drive real QEMU peers (7.2 and 10.0) from tests, with a synchronous API.

Not a test module: a helper that tests import (``from peers import QemuPeer``).

* :data:`QEMU_BINARIES` and :func:`require_qemu` find the two QEMU builds installed by
  ``scripts/install-qemu-peers.sh``; a missing or wrong binary *fails* the test (it is
  never silently skipped).
* :func:`make_blob` writes deterministic random bytes for ``-device loader`` blobs.
* :class:`QemuPeer` starts one QEMU (TCG, no default devices, no display) with a QMP
  socket, talks QMP through ``qemu.qmp`` on a private event loop running in a background
  thread, and always kills the process and removes its temporary files on exit.
* :func:`capture_info`, :func:`read_capture` and :func:`expected_guest_ram` read the
  recorded migrations in tests/data (see tests/data/README.md).
* :class:`RecordingSink` accepts any number of connections on a unix or TCP socket and
  records each connection's bytes separately (e.g. the main and multifd channels of a
  migration whose source needs nothing back).

Every wait has a timeout, so a misbehaving QEMU fails a test instead of hanging it.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import lzma
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import weakref
from collections import deque
from collections.abc import Awaitable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Self, TypeVar

import numpy as np
import pytest
from qemu.qmp import ExecuteError, QMPClient

__all__ = [
    "DATA_DIR",
    "INSTALL_SCRIPT",
    "MIGRATION_TERMINAL_STATES",
    "QEMU_BINARIES",
    "QemuPeer",
    "QemuPeerError",
    "QmpCommandError",
    "RecordingSink",
    "blob_bytes",
    "capture_info",
    "capture_names",
    "expected_guest_ram",
    "free_tcp_port",
    "make_blob",
    "parse_size",
    "qemu_version",
    "read_capture",
    "require_qemu",
]

#: The two QEMU builds the interoperability tests run against.
QEMU_BINARIES: dict[str, str] = {
    "7.2": "qemu-system-x86_64",
    "10.0": "/opt/qemu-10.0/bin/qemu-system-x86_64",
}

#: The script that installs them (relative to the project root).
INSTALL_SCRIPT = "scripts/install-qemu-peers.sh"

#: query-migrate states after which nothing changes any more.
MIGRATION_TERMINAL_STATES = frozenset({"completed", "failed", "cancelled"})

START_TIMEOUT = 30.0  # seconds from exec to a working QMP connection
QMP_TIMEOUT = 60.0  # seconds for one QMP command
EXIT_TIMEOUT = 10.0  # seconds for QEMU to exit after "quit"

_UNIX_PATH_MAX = 107  # sun_path is 108 bytes including the NUL

T = TypeVar("T")


class QemuPeerError(RuntimeError):
    """A QEMU peer could not be started, died, or did not answer in time."""


class QmpCommandError(QemuPeerError):
    """QEMU answered a QMP command with an error."""

    def __init__(self, version: str, command: str, error_class: str, desc: str) -> None:
        super().__init__(f"QEMU {version}: QMP '{command}' failed: {error_class}: {desc}")
        self.command = command
        self.error_class = error_class
        self.desc = desc


# --------------------------------------------------------------------------------------------
# Binaries
# --------------------------------------------------------------------------------------------


@functools.cache
def qemu_version(binary: str) -> str | None:
    """The full version ("7.2.22") that ``binary --version`` reports, or None."""
    path = shutil.which(binary)
    if path is None:
        return None
    try:
        out = subprocess.run(
            [path, "--version"], capture_output=True, text=True, timeout=30, check=False
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    m = re.search(r"QEMU emulator version (\d+\.\d+\.\d+)", out)
    return m.group(1) if m else None


def require_qemu(version: str) -> str:
    """Return the binary for QEMU ``version`` ("7.2" or "10.0"), or fail the calling test.

    Uses ``pytest.fail`` (not skip): these peers are part of the test environment, and a
    test that silently skips them proves nothing.
    """
    if version not in QEMU_BINARIES:
        pytest.fail(f"unknown QEMU peer version {version!r}; known: {sorted(QEMU_BINARIES)}")
    binary = QEMU_BINARIES[version]
    found = qemu_version(binary)
    if found is None:
        pytest.fail(
            f"QEMU {version} binary '{binary}' is missing or does not run; "
            f"install the peers with: sudo {INSTALL_SCRIPT}"
        )
    if not (found == version or found.startswith(version + ".")):
        pytest.fail(
            f"QEMU binary '{binary}' reports version {found}, expected {version}.x; "
            f"reinstall the peers with: sudo {INSTALL_SCRIPT}"
        )
    return binary


# --------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------


def blob_bytes(size: int, seed: int) -> bytes:
    """``size`` deterministic pseudo-random bytes for ``seed``.

    The raw 64-bit outputs of ``numpy.random.default_rng(seed)``'s bit generator (PCG64),
    little-endian, truncated to ``size``: a fixed algorithm, independent of numpy's
    distribution code.
    """
    if size < 0:
        raise ValueError(f"negative blob size {size}")
    words = np.random.default_rng(seed).bit_generator.random_raw((size + 7) // 8)
    return np.asarray(words, dtype="<u8").tobytes()[:size]


def make_blob(path: str | os.PathLike[str] | None, size: int, seed: int) -> bytes:
    """Write :func:`blob_bytes` ``(size, seed)`` to ``path`` (if given) and return them."""
    data = blob_bytes(size, seed)
    if path is not None:
        Path(path).write_bytes(data)
    return data


_SIZE_UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str | int) -> int:
    """Bytes in a QEMU-style size: 4096, "64M", "1G", "512K"."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+)\s*([KMGTB]?)\s*", text.upper())
    if not m:
        raise ValueError(f"not a size: {text!r}")
    return int(m.group(1)) * _SIZE_UNITS[m.group(2)]


def free_tcp_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (prefer ``RecordingSink(tcp_port=0)``)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _opt_escape(value: str) -> str:
    """Escape a value for a QEMU comma-separated option list."""
    return value.replace(",", ",,")


def _tail(text: str, lines: int = 30) -> str:
    return "\n".join(text.rstrip().splitlines()[-lines:])


def _unix_listening(path: str) -> bool:
    """True if something accepts connections on unix socket ``path`` (probes once)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(1.0)
        try:
            s.connect(path)
        except OSError:
            return False
    return True


def _kill_and_reap(proc: subprocess.Popen[bytes]) -> None:
    """Kill ``proc`` if it still runs and wait (bounded) for it to go."""
    if proc.poll() is None:
        with contextlib.suppress(OSError):
            proc.kill()
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=EXIT_TIMEOUT)


def _kill_process(proc: subprocess.Popen[bytes], private_dir: str) -> None:
    """Finalizer: make sure QEMU is gone and its private directory removed."""
    _kill_and_reap(proc)
    shutil.rmtree(private_dir, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# Recorded captures (tests/data, made by tests/data/make_captures.py)
# --------------------------------------------------------------------------------------------

DATA_DIR = Path(__file__).resolve().parent / "data"


@functools.cache
def _capture_index() -> dict[str, Any]:
    return dict(json.loads((DATA_DIR / "captures.json").read_text()))


def capture_info(name: str) -> dict[str, Any]:
    """The captures.json entry of capture ``name`` (e.g. "qemu7.2-multifd-zlib-2ch")."""
    for entry in _capture_index()["captures"]:
        if entry["name"] == name:
            return dict(entry)
    known = [e["name"] for e in _capture_index()["captures"]]
    raise KeyError(f"no capture {name!r} in {DATA_DIR / 'captures.json'}; known: {known}")


def capture_names() -> list[str]:
    return [e["name"] for e in _capture_index()["captures"]]


def read_capture(relpath: str | os.PathLike[str]) -> bytes:
    """Bytes of a file under tests/data, decompressed if it is stored as ``.xz``.

    ``relpath`` may name the stored file ("qemu7.2-precopy.stream.xz") or the logical one
    ("qemu7.2-precopy.stream"); both return the uncompressed bytes.
    """
    path = DATA_DIR / relpath
    if not path.exists() and path.with_name(path.name + ".xz").exists():
        path = path.with_name(path.name + ".xz")
    data = path.read_bytes()
    return lzma.decompress(data) if path.name.endswith(".xz") else data


def expected_guest_ram(entry: Mapping[str, Any], size: int | None = None) -> bytes:
    """The first ``size`` bytes (default: all) of the capture source's pc.ram: zeros with
    the entry's blobs placed at their addresses."""
    total = int(entry["memory_bytes"]) if size is None else size
    ram = bytearray(total)
    for b in entry["blobs"]:
        addr, data = int(b["addr"]), blob_bytes(int(b["size"]), int(b["seed"]))
        if addr < total:
            ram[addr:min(total, addr + len(data))] = data[: total - addr]
    return bytes(ram)


# --------------------------------------------------------------------------------------------
# QEMU peer
# --------------------------------------------------------------------------------------------


class QemuPeer:
    """One QEMU process with a QMP connection. Use as a context manager.

    ``blobs`` are ``(path, guest_addr)`` pairs loaded into guest RAM at reset with
    ``-device loader``. ``dimm`` ("16M") cold-plugs a pc-dimm backed by
    ``memory-backend-ram`` ``mem1`` (it sits at 4 GiB guest-physical). ``incoming`` is
    ``"defer"`` or a URI. ``workdir`` receives the stderr log (kept after exit when the
    caller chose the directory); the QMP socket always lives in a short private
    directory under the system temp dir (unix socket paths are limited to 107 bytes).
    """

    def __init__(
        self,
        version: str,
        *,
        machine: str = "pc",
        memory: str = "64M",
        blobs: Iterable[tuple[str | os.PathLike[str], int]] = (),
        dimm: str | None = None,
        incoming: str | None = None,
        paused: bool = True,
        uuid: str | None = None,
        extra_args: Sequence[str] = (),
        workdir: str | os.PathLike[str] | None = None,
        name: str | None = None,
        start_timeout: float = START_TIMEOUT,
        qmp_timeout: float = QMP_TIMEOUT,
    ) -> None:
        self.version = version
        self.binary = require_qemu(version)
        self.machine = machine
        self.qmp_timeout = qmp_timeout
        self.name = name or f"qemu{version}"
        self._closed = False
        self._proc: subprocess.Popen[bytes] | None = None
        self._client: QMPClient | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: threading.Thread | None = None
        self._events: deque[dict[str, Any]] = deque(maxlen=10_000)
        self._stderr_final: str | None = None
        self._pmem_count = 0

        self._private = tempfile.mkdtemp(prefix="lmq-")
        self.workdir = Path(self._private if workdir is None else workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.qmp_path = os.path.join(self._private, "qmp.sock")
        self.stderr_path = self.workdir / f"{self.name}-{os.getpid()}-{id(self):x}.stderr"

        mem = f"{memory}"
        if dimm is not None:
            maxmem = parse_size(memory) + parse_size(dimm)
            mem += f",slots=2,maxmem={maxmem // (1 << 20)}M"
        args = [
            self.binary,
            "-nodefaults",
            "-no-user-config",
            "-display", "none",
            "-accel", "tcg",
            "-serial", "none",
            "-parallel", "none",
            "-monitor", "none",
            "-name", self.name,
            "-machine", machine,
            "-m", mem,
            "-chardev", f"socket,id=qmp0,path={_opt_escape(self.qmp_path)},server=on,wait=off",
            "-mon", "chardev=qmp0,mode=control",
        ]
        if dimm is not None:
            args += [
                "-object", f"memory-backend-ram,id=mem1,size={dimm}",
                "-device", "pc-dimm,id=dimm1,memdev=mem1",
            ]
        for blob, addr in blobs:
            path = os.path.abspath(blob)
            if not os.path.isfile(path):
                raise FileNotFoundError(f"blob {path} does not exist")
            args += [
                "-device",
                f"loader,file={_opt_escape(path)},addr={int(addr):#x},force-raw=on",
            ]
        if uuid is not None:
            args += ["-uuid", uuid]
        if paused:
            args.append("-S")
        if incoming is not None:
            args += ["-incoming", incoming]
        args += list(extra_args)
        self.args: list[str] = args

        try:
            self._start(start_timeout)
        except BaseException:
            self.close()
            raise

    # ---- life cycle ---------------------------------------------------------------------

    def _start(self, timeout: float) -> None:
        with open(self.stderr_path, "wb") as log:
            self._proc = subprocess.Popen(
                self.args,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                cwd=self.workdir,
                start_new_session=True,  # a Ctrl-C in the terminal is ours to handle
            )
        self._finalizer = weakref.finalize(self, _kill_process, self._proc, self._private)

        self._loop = asyncio.new_event_loop()
        self._loop_thread = threading.Thread(
            target=self._loop.run_forever, name=f"qmp-{self.name}", daemon=True
        )
        self._loop_thread.start()

        deadline = time.monotonic() + timeout
        last_error: BaseException | None = None
        while True:
            rc = self._proc.poll()
            if rc is not None:
                raise QemuPeerError(
                    f"QEMU {self.version} exited with status {rc} during start-up\n"
                    f"command: {' '.join(self.args)}\nstderr:\n{_tail(self.stderr_text())}"
                )
            if _unix_listening(self.qmp_path):
                try:
                    self._client = self._call(self._connect(), 5.0)
                    return
                except Exception as exc:  # noqa: BLE001 - not listening yet: ConnectError, OSError, timeout
                    last_error = exc
            if time.monotonic() > deadline:
                raise QemuPeerError(
                    f"QEMU {self.version} did not offer QMP within {timeout:.0f}s "
                    f"(last error: {last_error!r})\nstderr:\n{_tail(self.stderr_text())}"
                )
            time.sleep(0.02)

    async def _connect(self) -> QMPClient:
        client = QMPClient(self.name)
        try:
            await client.connect(self.qmp_path)
        except BaseException:
            await client.disconnect()
            raise
        return client

    def _call(self, coro: Awaitable[T], timeout: float) -> T:
        """Run ``coro`` on the private loop and wait for it at most ``timeout`` seconds."""
        assert self._loop is not None

        async def bounded() -> T:
            return await asyncio.wait_for(coro, timeout)

        fut = asyncio.run_coroutine_threadsafe(bounded(), self._loop)
        try:
            return fut.result(timeout + 5.0)
        except TimeoutError:  # concurrent.futures.TimeoutError is TimeoutError on 3.11
            fut.cancel()
            raise

    def _drain_events(self) -> None:
        client = self._client
        if client is None or self._loop is None or not self._loop.is_running():
            return

        async def take() -> list[Any]:
            return client.events.clear()

        try:
            for ev in self._call(take(), 5.0):
                self._events.append(dict(ev))
        except Exception:  # noqa: BLE001 - events are best effort; QEMU may be gone
            pass

    def close(self) -> None:
        """Kill QEMU (if still running), close QMP, remove temporary files. Idempotent."""
        if self._closed:
            return
        self._closed = True
        client, self._client = self._client, None
        loop = self._loop
        if client is not None and loop is not None and loop.is_running():
            # EOF or a dead peer: nothing to close
            with contextlib.suppress(Exception):
                self._call(client.disconnect(), 5.0)
        proc = self._proc
        if proc is not None:
            _kill_and_reap(proc)
        self._stderr_final = self._read_stderr()
        if loop is not None:
            if loop.is_running():

                async def cancel_all() -> None:
                    tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
                    for t in tasks:
                        t.cancel()
                    await asyncio.gather(*tasks, return_exceptions=True)

                with contextlib.suppress(Exception):  # the loop is stopped next anyway
                    self._call(cancel_all(), 5.0)
                loop.call_soon_threadsafe(loop.stop)
            if self._loop_thread is not None:
                self._loop_thread.join(timeout=10.0)
            if not loop.is_running():
                loop.close()
        # The private directory holds the QMP socket (and the stderr log when the caller
        # gave no workdir; its text stays available through stderr_text()).
        shutil.rmtree(self._private, ignore_errors=True)
        finalizer = getattr(self, "_finalizer", None)
        if finalizer is not None:
            finalizer.detach()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"pid {self.pid}"
        return f"<QemuPeer {self.version} {self.machine} {state}>"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def returncode(self) -> int | None:
        """The exit status once QEMU has exited, else None."""
        return self._proc.poll() if self._proc is not None else None

    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def wait_exit(self, timeout: float = EXIT_TIMEOUT) -> int:
        """Wait for QEMU to exit on its own; return its exit status."""
        assert self._proc is not None
        try:
            return self._proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise QemuPeerError(
                f"QEMU {self.version} did not exit within {timeout}s"
            ) from None

    def quit(self, timeout: float = EXIT_TIMEOUT) -> int | None:
        """Ask QEMU to quit; kill it if it does not exit within ``timeout``. Returns status."""
        if self._proc is None or self._closed:
            return self.returncode
        if self._proc.poll() is None:
            with contextlib.suppress(QemuPeerError):  # the reply can race with the close
                self.qmp("quit")
            try:
                self._proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(timeout=EXIT_TIMEOUT)
        rc = self._proc.returncode
        self.close()
        return rc

    # ---- output -------------------------------------------------------------------------

    def _read_stderr(self) -> str:
        try:
            return self.stderr_path.read_bytes().decode("utf-8", "replace")
        except OSError:
            return ""

    def stderr_text(self) -> str:
        """Everything QEMU wrote to stdout/stderr so far (also after close)."""
        if self._stderr_final is not None:
            return self._stderr_final
        return self._read_stderr()

    def _describe_death(self) -> str:
        rc = self.returncode
        if rc is None:
            return ""
        how = f"killed by {signal.Signals(-rc).name}" if rc < 0 else f"exit status {rc}"
        return f" (QEMU exited, {how}; stderr:\n{_tail(self.stderr_text())})"

    # ---- QMP ----------------------------------------------------------------------------

    def qmp(self, cmd: str, **args: Any) -> Any:
        """Execute a QMP command; return its "return" value.

        Argument names are passed as given (use ``**{"a-b": 1}`` for hyphenated names).
        Raises :class:`QmpCommandError` with QEMU's error description, or
        :class:`QemuPeerError` if QEMU died or did not answer within ``qmp_timeout``.
        """
        if self._closed or self._client is None:
            raise QemuPeerError(f"QEMU {self.version} peer is closed (QMP '{cmd}')")
        client = self._client
        try:
            result = self._call(client.execute(cmd, args or None), self.qmp_timeout)
        except ExecuteError as exc:
            raise QmpCommandError(self.version, cmd, exc.error_class, str(exc)) from None
        except TimeoutError:
            raise QemuPeerError(
                f"QEMU {self.version}: QMP '{cmd}' got no answer within "
                f"{self.qmp_timeout}s{self._describe_death()}"
            ) from None
        except Exception as exc:
            time.sleep(0.05)  # let a dying QEMU finish exiting, to report its status
            raise QemuPeerError(
                f"QEMU {self.version}: QMP '{cmd}' failed: {exc!r}{self._describe_death()}"
            ) from exc
        finally:
            self._drain_events()
        return result

    def events(self, clear: bool = True) -> list[dict[str, Any]]:
        """QMP events received so far (oldest first); by default forget them."""
        self._drain_events()
        evs = list(self._events)
        if clear:
            self._events.clear()
        return evs

    def status(self) -> dict[str, Any]:
        """query-status: {"status": "paused"|"running"|"inmigrate"|..., "running": bool}."""
        return dict(self.qmp("query-status"))

    def cont(self) -> None:
        self.qmp("cont")

    def stop(self) -> None:
        self.qmp("stop")

    # ---- migration ----------------------------------------------------------------------

    def set_caps(self, caps: Mapping[str, bool]) -> None:
        """migrate-set-capabilities; names may use '_' for '-'."""
        self.qmp(
            "migrate-set-capabilities",
            capabilities=[
                {"capability": k.replace("_", "-"), "state": bool(v)} for k, v in caps.items()
            ],
        )

    def set_params(self, **params: Any) -> None:
        """migrate-set-parameters; names may use '_' for '-' (multifd_channels=2)."""
        self.qmp("migrate-set-parameters", **{k.replace("_", "-"): v for k, v in params.items()})

    def query_caps(self) -> dict[str, bool]:
        return {c["capability"]: c["state"] for c in self.qmp("query-migrate-capabilities")}

    def query_params(self) -> dict[str, Any]:
        return dict(self.qmp("query-migrate-parameters"))

    def migrate(self, uri: str, **args: Any) -> None:
        """Start an outgoing migration (returns at once; see :meth:`wait_migration`)."""
        self.qmp("migrate", uri=uri, **args)

    def migrate_incoming(self, uri: str) -> None:
        """Start listening for an incoming migration (QEMU started with incoming="defer")."""
        self.qmp("migrate-incoming", uri=uri)

    def migrate_cancel(self) -> None:
        self.qmp("migrate_cancel")

    def query_migrate(self) -> dict[str, Any]:
        return dict(self.qmp("query-migrate"))

    def wait_migration(
        self,
        timeout: float = 60.0,
        expect: Iterable[str] = ("completed",),
        poll: float = 0.05,
    ) -> dict[str, Any]:
        """Poll query-migrate until the status is terminal; return that query-migrate dict.

        Raises AssertionError (with QEMU's error-desc and stderr) if the final status is
        not in ``expect``, if QEMU dies, or if no terminal status appears within ``timeout``.
        """
        expect = tuple(expect)
        deadline = time.monotonic() + timeout
        info: dict[str, Any] = {}
        while True:
            try:
                info = self.query_migrate()
            except QemuPeerError as exc:
                raise AssertionError(
                    f"QEMU {self.version}: lost while waiting for migration to reach "
                    f"{'/'.join(expect)} (last status {info.get('status', 'none')}): {exc}"
                ) from None
            status = info.get("status", "none")
            if status in MIGRATION_TERMINAL_STATES:
                if status not in expect:
                    desc = info.get("error-desc", "no error-desc")
                    raise AssertionError(
                        f"QEMU {self.version}: migration ended '{status}', expected "
                        f"{'/'.join(expect)}: {desc}\nstderr:\n{_tail(self.stderr_text())}"
                    )
                return info
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"QEMU {self.version}: migration still '{status}' after {timeout}s "
                    f"(expected {'/'.join(expect)}); query-migrate: {info}"
                )
            time.sleep(poll)

    # ---- memory -------------------------------------------------------------------------

    def pmemsave(
        self, addr: int, size: int, path: str | os.PathLike[str], timeout: float = 30.0
    ) -> Path:
        """Dump guest-physical memory [addr, addr+size) to ``path``; return the path once the
        file holds all ``size`` bytes."""
        path = Path(os.path.abspath(path))
        self.qmp("pmemsave", val=int(addr), size=int(size), filename=str(path))
        deadline = time.monotonic() + timeout
        while True:
            try:
                if path.stat().st_size >= size:
                    return path
            except FileNotFoundError:
                pass
            if time.monotonic() > deadline:
                raise QemuPeerError(
                    f"QEMU {self.version}: pmemsave to {path} incomplete after {timeout}s"
                )
            time.sleep(0.01)

    def read_memory(self, addr: int, size: int) -> bytes:
        """Guest-physical memory [addr, addr+size) as bytes (through pmemsave)."""
        self._pmem_count += 1
        tmp = os.path.join(self._private, f"pmem-{self._pmem_count}.bin")
        try:
            return self.pmemsave(addr, size, tmp).read_bytes()
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)


# --------------------------------------------------------------------------------------------
# Recording sink
# --------------------------------------------------------------------------------------------


class _Recorded:
    __slots__ = ("accepted_at", "data", "eof_at", "error", "first_byte_at", "index", "sock")

    def __init__(self, index: int, sock: socket.socket, accepted_at: float) -> None:
        self.index = index
        self.sock = sock
        self.data = bytearray()
        self.accepted_at = accepted_at
        self.first_byte_at: float | None = None
        self.eof_at: float | None = None
        self.error: str | None = None


class RecordingSink:
    """Accepts connections and records each one's bytes until EOF, in background threads.

    ``RecordingSink("/tmp/x.sock")`` listens on a unix socket, ``RecordingSink(tcp_port=0)``
    on an ephemeral TCP port of ``host``. :attr:`uri` is the migration URI to give the
    source. Nothing is ever sent back.
    """

    def __init__(
        self,
        unix_path: str | os.PathLike[str] | None = None,
        *,
        tcp_port: int | None = None,
        host: str = "127.0.0.1",
        chunk: int = 1 << 20,
    ) -> None:
        if (unix_path is None) == (tcp_port is None):
            raise ValueError("give exactly one of unix_path and tcp_port")
        self._chunk = chunk
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._conns: list[_Recorded] = []
        self._threads: list[threading.Thread] = []
        self._closed = False
        self._t0 = time.monotonic()
        self.unix_path: str | None = None
        self.port: int | None = None
        if unix_path is not None:
            path = os.fspath(unix_path)
            if len(os.fsencode(path)) > _UNIX_PATH_MAX:
                raise ValueError(f"unix socket path too long ({len(path)} bytes): {path}")
            if os.path.exists(path):
                os.unlink(path)
            self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self._listener.bind(path)
            self.unix_path = path
            self.uri = f"unix:{path}"
        else:
            self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self._listener.bind((host, tcp_port))
            self.port = int(self._listener.getsockname()[1])
            self.uri = f"tcp:{host}:{self.port}"
        self._listener.listen(64)
        self._listener.settimeout(0.1)
        self._acceptor = threading.Thread(target=self._accept_loop, name="sink-accept",
                                          daemon=True)
        self._acceptor.start()

    def _accept_loop(self) -> None:
        while not self._closed:
            try:
                sock, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return  # listener closed
            sock.settimeout(None)
            with self._cond:
                if self._closed:
                    sock.close()
                    return
                rec = _Recorded(len(self._conns), sock, time.monotonic() - self._t0)
                self._conns.append(rec)
                t = threading.Thread(target=self._read_loop, args=(rec,),
                                     name=f"sink-conn{rec.index}", daemon=True)
                self._threads.append(t)
                t.start()
                self._cond.notify_all()

    def _read_loop(self, rec: _Recorded) -> None:
        buf = bytearray(self._chunk)
        view = memoryview(buf)
        try:
            while True:
                n = rec.sock.recv_into(view)
                if n == 0:
                    break
                with self._lock:
                    if rec.first_byte_at is None:
                        rec.first_byte_at = time.monotonic() - self._t0
                    rec.data += view[:n]
        except OSError as exc:
            rec.error = repr(exc)
        finally:
            with self._cond:
                rec.eof_at = time.monotonic() - self._t0
                self._cond.notify_all()

    def connections(self) -> list[bytes]:
        """Each connection's bytes so far, in accept order."""
        with self._lock:
            return [bytes(c.data) for c in self._conns]

    def info(self) -> list[dict[str, Any]]:
        """Per connection, in accept order: index, nbytes, and seconds since the sink was
        created at accept, first byte and EOF (None if not yet), plus any socket error."""
        with self._lock:
            return [
                {
                    "index": c.index,
                    "nbytes": len(c.data),
                    "accepted_at": c.accepted_at,
                    "first_byte_at": c.first_byte_at,
                    "eof_at": c.eof_at,
                    "error": c.error,
                }
                for c in self._conns
            ]

    def wait(self, count: int | None = None, timeout: float = 30.0) -> list[bytes]:
        """Wait until at least ``count`` connections (if given) were accepted and every
        accepted connection reached EOF; return :meth:`connections`."""
        deadline = time.monotonic() + timeout

        def done() -> bool:
            if count is not None and len(self._conns) < count:
                return False
            return all(c.eof_at is not None for c in self._conns)

        with self._cond:
            while not done():
                left = deadline - time.monotonic()
                if left <= 0:
                    states = [(c.index, len(c.data), c.eof_at is not None) for c in self._conns]
                    raise TimeoutError(
                        f"sink {self.uri}: wanted {count} connections closed, have "
                        f"(index, bytes, eof) {states} after {timeout}s"
                    )
                self._cond.wait(min(left, 0.5))
        return self.connections()

    def close(self) -> None:
        """Stop accepting, end all connections, join the threads. Idempotent."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            conns = list(self._conns)
        self._acceptor.join(timeout=5.0)
        self._listener.close()
        for c in conns:
            with contextlib.suppress(OSError):
                c.sock.shutdown(socket.SHUT_RDWR)
        for t in list(self._threads):
            t.join(timeout=5.0)
        for c in conns:
            c.sock.close()
        if self.unix_path is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.unix_path)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
