"""Shared fixtures for tests that run ``livemig`` against real QEMU peers.

* ``workdir``: a short, private temporary directory (unix socket paths are limited to
  107 bytes, so pytest's long ``tmp_path`` is not used for sockets).
* ``livemig_receive``: starts ``livemig receive`` as a subprocess (the real CLI, through
  ``python -m livemig.cli.main``) and waits until it listens; every process it started is
  killed at teardown, so a failing test never leaves one behind.
* ``livemig_cli``: runs one short ``livemig`` command (inspect, extract) with a deadline.
* ``receive_in_thread``: the Python API (:func:`livemig.receive`) in a background thread,
  with a deadline on both the listening and the result.

Every wait here has a timeout: a hung livemig fails the test, it never hangs the run.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

#: How the CLI is started: the interpreter running the tests, so the venv's livemig is used.
LIVEMIG = [sys.executable, "-m", "livemig.cli.main"]

#: The project root. Subprocesses get it first on PYTHONPATH, so they import this tree's
#: livemig whatever their working directory (the editable install's import hook alone
#: resolves ``livemig`` to a namespace package when run from another directory).
ROOT = Path(__file__).resolve().parent.parent


def livemig_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    return env

#: What ``livemig receive`` prints on stderr once it listens (not with --json or -q).
LISTENING_RE = re.compile(r"waiting for a migration on (\S+)")

LISTEN_TIMEOUT = 30.0  # seconds from exec until the socket accepts connections
CLI_TIMEOUT = 120.0  # seconds for one inspect / extract / finished receive


# --------------------------------------------------------------------------------------------
# Directories
# --------------------------------------------------------------------------------------------


@pytest.fixture
def workdir() -> Iterator[Path]:
    """A short private temporary directory, removed afterwards."""
    d = tempfile.mkdtemp(prefix="lmr-", dir="/tmp" if os.path.isdir("/tmp") else None)
    try:
        yield Path(d)
    finally:
        shutil.rmtree(d, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# Is something listening? (without connecting: livemig takes every connection as a channel)
# --------------------------------------------------------------------------------------------


def _tcp_listening(port: int) -> bool:
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            f = line.split()
            if len(f) > 3 and f[3] == "0A" and int(f[1].rsplit(":", 1)[1], 16) == port:
                return True
    return False


def _unix_listening(path: str) -> bool:
    """True if a unix stream socket bound to ``path`` is in the listening state."""
    try:
        lines = Path("/proc/net/unix").read_text().splitlines()[1:]
    except OSError:
        return False
    for line in lines:
        f = line.split(None, 7)
        # Num RefCount Protocol Flags Type St Inode Path; Flags 00010000 = __SO_ACCEPTCON
        if len(f) == 8 and f[7] == path and int(f[3], 16) & 0x10000:
            return True
    return False


def uri_listening(uri: str) -> bool:
    """True if the tcp:/unix: ``uri`` is being listened on right now."""
    scheme, _, rest = uri.partition(":")
    if scheme == "tcp":
        return _tcp_listening(int(rest.rsplit(":", 1)[1]))
    if scheme == "unix":
        # livemig listens under a temporary name and renames the socket into place
        # once it listens, so the path existing means it accepts connections.
        path = os.path.abspath(rest)
        return os.path.exists(path) or _unix_listening(path)
    raise ValueError(f"not a listening URI: {uri}")


# --------------------------------------------------------------------------------------------
# livemig receive as a subprocess
# --------------------------------------------------------------------------------------------


@dataclass
class Finished:
    rc: int
    stdout: str
    stderr: str
    seconds: float


class LivemigCli:
    """One ``livemig`` CLI process; stdout and stderr go to files in ``logdir``, and every
    wait has a deadline (the process is killed and the test fails after it)."""

    def __init__(self, args: Sequence[str], logdir: Path, prefix: str = "livemig") -> None:
        self.args = [*LIVEMIG, *args]
        self.command = " ".join(str(a) for a in args[:1])
        n = len(list(logdir.glob(f"{prefix}-*.stdout")))
        self.stdout_path = logdir / f"{prefix}-{n}.stdout"
        self.stderr_path = logdir / f"{prefix}-{n}.stderr"
        self.started = time.monotonic()
        with open(self.stdout_path, "wb") as out, open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen(self.args, stdin=subprocess.DEVNULL, stdout=out,
                                         stderr=err, start_new_session=True, env=livemig_env())
        self.result: Finished | None = None

    def stderr(self) -> str:
        return self.stderr_path.read_bytes().decode("utf-8", "replace")

    def stdout(self) -> str:
        return self.stdout_path.read_bytes().decode("utf-8", "replace")

    def running(self) -> bool:
        return self.proc.poll() is None

    def wait(self, timeout: float = CLI_TIMEOUT) -> Finished:
        """Wait for livemig to exit (killing it and failing the test after ``timeout``)."""
        if self.result is not None:
            return self.result
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"livemig {self.command} still running after {timeout}s "
                                 f"(killed): {' '.join(self.args)}\nstderr:\n{self.stderr()}"
                                 ) from None
        self.result = Finished(rc, self.stdout(), self.stderr(), time.monotonic() - self.started)
        return self.result

    def wait_ok(self, timeout: float = CLI_TIMEOUT) -> Finished:
        r = self.wait(timeout)
        assert r.rc == 0, (f"livemig {' '.join(self.args[3:])} failed with status {r.rc}:\n"
                           f"{r.stderr}")
        return r

    def kill(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except OSError:
                pass
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass


class LivemigReceive(LivemigCli):
    """A ``livemig receive`` process that knows the URI it listens on."""

    def __init__(self, args: Sequence[str], logdir: Path, uri: str) -> None:
        super().__init__(args, logdir)
        self.uri = uri
        #: The URI the source must use (for tcp:HOST:0, the port livemig actually bound).
        self.address: str = uri

    def wait_listening(self, timeout: float = LISTEN_TIMEOUT) -> str:
        """Wait until livemig accepts connections; return the URI to migrate to.

        Ready when stderr says "waiting for a migration on URI" (that line also tells the
        real port of tcp:HOST:0), or, with --json / -q, when the socket listens.
        """
        deadline = time.monotonic() + timeout
        port_zero = self.uri.startswith("tcp:") and self.uri.endswith(":0")
        while True:
            m = LISTENING_RE.search(self.stderr())
            if m:
                self.address = m.group(1)
                return self.address
            if not port_zero and uri_listening(self.uri):
                return self.address
            rc = self.proc.poll()
            if rc is not None:
                raise AssertionError(f"livemig receive exited with status {rc} before "
                                     f"listening on {self.uri}:\n{self.stderr()}")
            if time.monotonic() > deadline:
                self.kill()
                raise AssertionError(f"livemig receive did not listen on {self.uri} within "
                                     f"{timeout}s; stderr:\n{self.stderr()}")
            time.sleep(0.02)


ReceiveFactory = Callable[..., LivemigReceive]


@pytest.fixture
def livemig_receive(workdir: Path) -> Iterator[ReceiveFactory]:
    """Factory: ``livemig_receive(uri, output, multifd_channels=0, multifd_compression=None,
    json=False, quiet=False, extra=(), wait=True)`` starts ``livemig receive`` and (for
    tcp:/unix: with ``wait``) returns once it listens; ``.address`` is the URI for QEMU.
    Pass ``tcp:127.0.0.1:0`` to let livemig pick a free port (needs its stderr line, so
    not with ``json``/``quiet``)."""
    started: list[LivemigReceive] = []

    def start(uri: str, output: str | os.PathLike[str], *, multifd_channels: int = 0,
              multifd_compression: str | None = None, json: bool = False,
              quiet: bool = False, extra: Sequence[str] = (), wait: bool = True,
              ) -> LivemigReceive:
        args = ["receive", uri, "-o", os.fspath(output)]
        if multifd_channels:
            args += ["--multifd-channels", str(multifd_channels)]
        if multifd_compression is not None:
            args += ["--multifd-compression", multifd_compression]
        if json:
            args.append("--json")
        if quiet:
            args.append("-q")
        args += list(extra)
        p = LivemigReceive(args, workdir, uri)
        started.append(p)
        if wait and uri.split(":", 1)[0] in ("tcp", "unix"):
            p.wait_listening()
        return p

    yield start
    for p in started:
        p.kill()


@pytest.fixture
def livemig_cli() -> Callable[..., subprocess.CompletedProcess[str]]:
    """Run ``livemig ARGS...`` to completion (with a deadline); check=True by default."""

    def run(*args: str, timeout: float = CLI_TIMEOUT,
            check: bool = True) -> subprocess.CompletedProcess[str]:
        try:
            r = subprocess.run([*LIVEMIG, *args], check=False, capture_output=True, text=True,
                               timeout=timeout, stdin=subprocess.DEVNULL,
                               env=livemig_env())
        except subprocess.TimeoutExpired:
            raise AssertionError(f"livemig {' '.join(args)} still running after {timeout}s") \
                from None
        if check and r.returncode != 0:
            raise AssertionError(f"livemig {' '.join(args)} failed with status "
                                 f"{r.returncode}:\n{r.stderr}")
        return r

    return run


# --------------------------------------------------------------------------------------------
# livemig.receive in a thread
# --------------------------------------------------------------------------------------------


class ThreadedReceive:
    """:func:`livemig.receive` running in a daemon thread."""

    def __init__(self, uri: str, output: str | os.PathLike[str], accept_timeout: float,
                 **kwargs: Any) -> None:
        import livemig

        self.listening = threading.Event()
        self.address: str | None = None
        self.result: Any = None
        self.error: BaseException | None = None

        def on_listening(addr: str) -> None:
            self.address = addr
            self.listening.set()

        def run() -> None:
            try:
                self.result = livemig.receive(uri, os.fspath(output), on_listening=on_listening,
                                              accept_timeout=accept_timeout, **kwargs)
            except BaseException as e:  # noqa: BLE001 - reported by join()
                self.error = e
            finally:
                self.listening.set()

        self.thread = threading.Thread(target=run, name="livemig-receive", daemon=True)
        self.thread.start()

    def wait_listening(self, timeout: float = LISTEN_TIMEOUT) -> str:
        if not self.listening.wait(timeout):
            raise AssertionError(f"livemig.receive did not listen within {timeout}s")
        if self.address is None:
            raise AssertionError(f"livemig.receive failed before listening: {self.error!r}")
        return self.address

    def join(self, timeout: float = CLI_TIMEOUT) -> Any:
        """The ReceiveResult; re-raises livemig's exception; fails after ``timeout``."""
        self.thread.join(timeout)
        if self.thread.is_alive():
            raise AssertionError(f"livemig.receive still running after {timeout}s")
        if self.error is not None:
            raise self.error
        return self.result


@pytest.fixture
def receive_in_thread() -> Callable[..., ThreadedReceive]:
    """Factory: ``receive_in_thread(uri, output, **receive_kwargs)``; an ``accept_timeout``
    (default 60 s) bounds how long the thread can wait for a source that never comes."""

    def start(uri: str, output: str | os.PathLike[str], *, accept_timeout: float = 60.0,
              **kwargs: Any) -> ThreadedReceive:
        return ThreadedReceive(uri, output, accept_timeout, **kwargs)

    return start
