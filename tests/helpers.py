"""What the tests share besides fixtures: starting the ``livemig`` command line, telling
whether something listens, and waiting for a CLI process with a deadline.

Fixtures live in ``conftest.py``; test modules and the other helper modules
(``conftest_sendrelay.py``, ``hostile_source.py``, ``peers.py``) import from here::

    from helpers import LIVEMIG, livemig_env, run_cli, uri_listening

* :data:`LIVEMIG` / :func:`livemig_env`: the command line and the environment that make
  a subprocess run this tree's livemig.
* :func:`uri_listening`: whether a tcp:/unix: URI is being listened on, without
  connecting (livemig would take the connection for a migration channel).
* :func:`run_cli` (:func:`start_cli` + :func:`finish_cli`): one short command to
  completion; :class:`LivemigCli`: one long-running command with its output in files;
  :class:`ThreadedReceive`: :func:`livemig.receive` in a thread.

Every wait has a deadline: a hung livemig fails the test, it never hangs the run.
"""

from __future__ import annotations

import contextlib
import os
import re
import resource
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: How the CLI is started: the interpreter running the tests, so the venv's livemig is used.
LIVEMIG = [sys.executable, "-m", "livemig.cli.main"]

#: The project root. Subprocesses get it first on PYTHONPATH, so they import this tree's
#: livemig whatever their working directory (the editable install's import hook alone
#: resolves ``livemig`` to a namespace package when run from another directory).
ROOT = Path(__file__).resolve().parent.parent

#: What ``livemig receive`` and ``relay`` print on stderr once they listen (not with
#: --json or -q).
LISTENING_RE = re.compile(r"waiting for a migration on (\S+)")

LISTEN_TIMEOUT = 30.0  # seconds from exec until the socket accepts connections
CLI_TIMEOUT = 120.0  # seconds for one inspect / extract / finished receive, send, relay


def livemig_env(**extra: str) -> dict[str, str]:
    """The environment for a livemig subprocess: this tree first on the path, plus
    ``extra`` variables."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    env.update(extra)
    return env


# --------------------------------------------------------------------------------------------
# Is something listening? (without connecting: livemig takes every connection as a channel)
# --------------------------------------------------------------------------------------------


def rss_bytes() -> int:
    """This process's resident set size now, from ``/proc/self/statm``."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def tcp_listening(port: int) -> bool:
    """True if a TCP socket on ``port`` (any address, v4 or v6) is in the listening state."""
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


def unix_listening(path: str) -> bool:
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
    """True if the tcp:/unix: ``uri`` is being listened on right now (``tcp:HOST:0`` never
    is: its real port is only in livemig's stderr)."""
    scheme, _, rest = uri.partition(":")
    if scheme == "tcp":
        port = int(rest.rsplit(":", 1)[1])
        return port != 0 and tcp_listening(port)
    if scheme == "unix":
        # livemig listens under a temporary name and renames the socket into place
        # once it listens, so a socket at the path means it accepts connections.
        path = os.path.abspath(rest)
        try:
            if stat.S_ISSOCK(os.stat(path).st_mode):
                return True
        except OSError:
            pass
        return unix_listening(path)
    raise ValueError(f"not a listening URI: {uri}")


# --------------------------------------------------------------------------------------------
# A short command to completion
# --------------------------------------------------------------------------------------------


@dataclass
class CliResult:
    """How a livemig command ended: exit status, its output, and how long it took."""

    rc: int
    stdout: str
    stderr: str
    seconds: float
    args: list[str] = field(default_factory=list)


def _limit_address_space(limit: int) -> Callable[[], None]:
    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    return apply


def start_cli(args: Sequence[str | os.PathLike[str]], *, address_space: int | None = None
              ) -> subprocess.Popen[bytes]:
    """``livemig ARGS...`` with its output in pipes, in its own session (so that what it
    starts goes with it), optionally under an address-space limit. One BLAS thread, so
    that such a limit measures livemig rather than OpenBLAS's per-thread buffers."""
    return subprocess.Popen(
        [*LIVEMIG, *map(os.fspath, args)], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, env=livemig_env(OPENBLAS_NUM_THREADS="1"), cwd=str(ROOT),
        start_new_session=True,
        # the one way to limit the child before it runs; the callable only calls setrlimit
        preexec_fn=_limit_address_space(address_space) if address_space else None)  # noqa: PLW1509


def finish_cli(proc: subprocess.Popen[bytes], args: Sequence[str | os.PathLike[str]],
               started: float, timeout: float) -> CliResult:
    """Wait for a :func:`start_cli` process until ``started + timeout`` (killing it and
    everything in its session, and failing the test, after that)."""
    args = [os.fspath(a) for a in args]
    try:
        out, err = proc.communicate(timeout=max(0.1, started + timeout - time.monotonic()))
    except subprocess.TimeoutExpired:
        with contextlib.suppress(OSError):
            os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError(f"livemig {' '.join(args)} still running after {timeout} s "
                             f"(killed); stderr: {err.decode(errors='replace')}") from None
    finally:
        with contextlib.suppress(OSError):
            os.killpg(proc.pid, signal.SIGKILL)  # anything it left behind
    return CliResult(proc.returncode, out.decode(errors="replace"),
                     err.decode(errors="replace"), time.monotonic() - started, list(args))


def run_cli(args: Sequence[str | os.PathLike[str]], *, timeout: float = 60.0,
            check: bool = False, address_space: int | None = None) -> CliResult:
    """Run ``livemig ARGS...`` to completion within ``timeout`` seconds; with ``check``,
    fail the test unless it exits 0."""
    started = time.monotonic()
    r = finish_cli(start_cli(args, address_space=address_space), args, started, timeout)
    if check and r.rc != 0:
        raise AssertionError(f"livemig {' '.join(r.args)} failed with status {r.rc}:\n"
                             f"{r.stderr}")
    return r


# --------------------------------------------------------------------------------------------
# A long-running command in the background
# --------------------------------------------------------------------------------------------


class LivemigCli:
    """One ``livemig`` CLI process; stdout and stderr go to files in ``logdir``, and every
    wait has a deadline (the process is killed and the test fails after it). ``uri`` is
    where it listens, for :meth:`wait_listening`."""

    def __init__(self, args: Sequence[str], logdir: Path, prefix: str = "livemig",
                 uri: str | None = None) -> None:
        self.args = [*LIVEMIG, *args]
        self.command = " ".join(str(a) for a in args[:1])
        self.uri = uri
        #: The URI the source must use (for tcp:HOST:0, the port livemig actually bound).
        self.address: str | None = uri
        n = len(list(logdir.glob(f"{prefix}-*.stdout")))
        self.stdout_path = logdir / f"{prefix}-{n}.stdout"
        self.stderr_path = logdir / f"{prefix}-{n}.stderr"
        self.started = time.monotonic()
        with open(self.stdout_path, "wb") as out, open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen(self.args, stdin=subprocess.DEVNULL, stdout=out,
                                         stderr=err, start_new_session=True, env=livemig_env())
        self.result: CliResult | None = None

    def stderr(self) -> str:
        return self.stderr_path.read_bytes().decode("utf-8", "replace")

    def stdout(self) -> str:
        return self.stdout_path.read_bytes().decode("utf-8", "replace")

    def running(self) -> bool:
        return self.proc.poll() is None

    def wait_listening(self, uri: str | None = None, timeout: float = LISTEN_TIMEOUT) -> str:
        """Wait until livemig accepts connections on ``uri`` (default: the one it was
        started for); return the URI to migrate to, also kept in :attr:`address`.

        Ready when stderr says "waiting for a migration on URI" (that line also tells the
        real port of tcp:HOST:0), or, with --json / -q, when the socket listens.
        """
        uri = uri or self.uri
        if uri is None:
            raise TypeError("wait_listening needs the URI livemig listens on")
        deadline = time.monotonic() + timeout
        while True:
            m = LISTENING_RE.search(self.stderr())
            if m:
                self.address = m.group(1)
                return self.address
            if uri_listening(uri):
                self.address = uri
                return uri
            rc = self.proc.poll()
            if rc is not None:
                raise AssertionError(f"livemig {self.command} exited with status {rc} before "
                                     f"listening on {uri}:\n{self.stderr()}")
            if time.monotonic() > deadline:
                self.kill()
                raise AssertionError(f"livemig {self.command} did not listen on {uri} within "
                                     f"{timeout}s; stderr:\n{self.stderr()}")
            time.sleep(0.02)

    def wait(self, timeout: float = CLI_TIMEOUT) -> CliResult:
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
        self.result = CliResult(rc, self.stdout(), self.stderr(),
                                time.monotonic() - self.started, self.args[len(LIVEMIG):])
        return self.result

    def wait_ok(self, timeout: float = CLI_TIMEOUT) -> CliResult:
        r = self.wait(timeout)
        assert r.rc == 0, (f"livemig {' '.join(self.args[len(LIVEMIG):])} failed with "
                           f"status {r.rc}:\n{r.stderr}")
        return r

    def kill(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(OSError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=10)


class LivemigReceive(LivemigCli):
    """A ``livemig receive`` process that knows the URI it listens on."""

    def __init__(self, args: Sequence[str], logdir: Path, uri: str) -> None:
        super().__init__(args, logdir, uri=uri)


#: The ``livemig_receive`` fixture: ``(uri, output, **options) -> LivemigReceive``.
ReceiveFactory = Callable[..., LivemigReceive]


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
