"""The thread group: every thread ends before the owner goes on; the first error wins."""

from __future__ import annotations

import socket
import threading

import pytest

from livemig.errors import ChannelError
from livemig.migration.common.failure import FailureLatch
from livemig.migration.common.sync import SyncMode
from livemig.migration.common.thread_group import ThreadGroup


def test_first_error_cancels_siblings_and_is_reraised() -> None:
    a, b = socket.socketpair()
    latch = FailureLatch()
    latch.add_socket(a)
    started = threading.Event()

    def blocked() -> None:
        started.set()
        assert a.recv(1) == b""  # woken by the shutdown, not by data

    def failing() -> None:
        started.wait()
        raise ChannelError("multifd channel 1: boom")

    g = ThreadGroup("t", latch)

    def run() -> None:
        with g:
            g.start(blocked, name="blocked")
            g.start(failing, name="failing")

    with pytest.raises(ChannelError, match="boom"):
        run()
    assert g.alive == 0
    a.close()
    b.close()


def test_body_error_wins_and_threads_are_joined() -> None:
    latch = FailureLatch()
    stop = threading.Event()
    latch.on_failure(stop.set)
    g = ThreadGroup("t", latch)

    def run() -> None:
        with g:
            g.start(stop.wait, name="waiter")
            raise KeyError("body")

    with pytest.raises(KeyError):
        run()
    assert g.alive == 0
    assert isinstance(latch.error, KeyError)


def test_no_thread_after_the_block() -> None:
    with ThreadGroup("t") as g:
        g.start(lambda: None, name="x")
    with pytest.raises(RuntimeError):
        g.start(lambda: None, name="late")


def test_threads_started_while_joining_are_joined() -> None:
    done = []
    with ThreadGroup("t") as g:
        def parent() -> None:
            g.start(lambda: done.append(1), name="child")
        g.start(parent, name="parent")
    assert done == [1]


@pytest.mark.parametrize(("machine", "mode"), [("pc-i440fx-7.2", SyncMode.PER_SECTION),
                                          ("pc-q35-8.0", SyncMode.PER_SECTION),
                                          ("pc-q35-8.1", SyncMode.PER_ROUND),
                                          ("pc-i440fx-10.0", SyncMode.PER_ROUND),
                                          ("livemig", SyncMode.PER_ROUND)])
def test_sync_mode_for_machine(machine: str, mode: SyncMode) -> None:
    assert SyncMode.for_machine(machine) is mode
