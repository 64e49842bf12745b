"""Shared fixtures for tests that run ``livemig`` against real QEMU peers.

* ``workdir``: a short, private temporary directory (unix socket paths are limited to
  107 bytes, so pytest's long ``tmp_path`` is not used for sockets).
* ``livemig_receive``: starts ``livemig receive`` as a subprocess (the real CLI, through
  ``python -m livemig.cli.main``) and waits until it listens; every process it started is
  killed at teardown, so a failing test never leaves one behind.
* ``livemig_cli``: runs one short ``livemig`` command (inspect, extract) with a deadline.
* ``receive_in_thread``: the Python API (:func:`livemig.receive`) in a background thread,
  with a deadline on both the listening and the result.

The helpers behind them (and everything else tests share that is not a fixture) are in
``helpers.py``; import them from there. Every wait has a timeout: a hung livemig fails the
test, it never hangs the run.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from helpers import (
    CLI_TIMEOUT,
    CliResult,
    LivemigReceive,
    ReceiveFactory,
    ThreadedReceive,
    run_cli,
)

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
# livemig receive as a subprocess
# --------------------------------------------------------------------------------------------


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
def livemig_cli() -> Callable[..., CliResult]:
    """Run ``livemig ARGS...`` to completion (with a deadline); check=True by default."""

    def run(*args: str, timeout: float = CLI_TIMEOUT, check: bool = True) -> CliResult:
        return run_cli(args, timeout=timeout, check=check)

    return run


# --------------------------------------------------------------------------------------------
# livemig.receive in a thread
# --------------------------------------------------------------------------------------------


@pytest.fixture
def receive_in_thread() -> Callable[..., ThreadedReceive]:
    """Factory: ``receive_in_thread(uri, output, **receive_kwargs)``; an ``accept_timeout``
    (default 60 s) bounds how long the thread can wait for a source that never comes."""

    def start(uri: str, output: str | os.PathLike[str], *, accept_timeout: float = 60.0,
              **kwargs: Any) -> ThreadedReceive:
        return ThreadedReceive(uri, output, accept_timeout, **kwargs)

    return start
