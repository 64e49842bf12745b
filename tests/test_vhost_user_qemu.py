"""``livemig vhost-user-backend`` behind a real QEMU 10 ``vhost-user-fs-pci`` device.

(a) QEMU 10 -> QEMU 10 live migration: the destination's fresh back-end ends with the
    source back-end's state;
(b) QEMU 10 -> ``livemig receive`` -> snapshot -> ``livemig send`` -> QEMU 10 with a fresh
    back-end: the same.

"The same" is checked twice: the sha256 the destination back-end publishes after its load
(``--state-file``) equals the source's, and after the destination QEMU quits, livemig's
own front-end saves the state again from the destination back-end and gets identical
bytes. Command line as in spec/vhost-user-qemu10.md (memfd guest RAM, shared).
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import LivemigCli
from peers import QemuPeer

from livemig.vhost_user.frontend import VhostUserFrontend

pytestmark = [pytest.mark.qemu, pytest.mark.timeout(240)]

MEMORY = "64M"
BACKEND_START_TIMEOUT = 30.0
STATE_TIMEOUT = 30.0


class Backend:
    """One ``livemig vhost-user-backend`` process with its socket and state file."""

    def __init__(self, workdir: Path, name: str, seed: int | None,
                 reply_fd: bool = False) -> None:
        self.sock = workdir / f"{name}.sock"
        self.state_file = workdir / f"{name}.json"
        args = ["vhost-user-backend", "--socket-path", str(self.sock), "--state-file",
                str(self.state_file)]
        if seed is not None:
            args += ["--seed", str(seed)]
        if reply_fd:
            args.append("--reply-fd")
        self.proc = LivemigCli(args, workdir, prefix=f"vub-{name}")
        deadline = time.monotonic() + BACKEND_START_TIMEOUT
        while not self.sock.exists():
            if not self.proc.running():
                raise AssertionError(f"vhost-user-backend {name} exited: {self.proc.stderr()}")
            if time.monotonic() > deadline:
                self.proc.kill()
                raise AssertionError(f"vhost-user-backend {name}: no socket within "
                                     f"{BACKEND_START_TIMEOUT} s: {self.proc.stderr()}")
            time.sleep(0.02)

    def info(self) -> dict[str, object]:
        return dict(json.loads(self.state_file.read_text()))

    def wait_loaded(self) -> dict[str, object]:
        deadline = time.monotonic() + STATE_TIMEOUT
        while True:
            info = self.info()
            if info["loads"] or info["failed_loads"]:
                return info
            assert time.monotonic() < deadline, f"no load within {STATE_TIMEOUT} s: {info}"
            time.sleep(0.05)

    def save_again(self) -> bytes:
        """The state, saved by livemig's front-end (QEMU must have disconnected)."""
        with VhostUserFrontend(str(self.sock), timeout=30) as f:
            return b"".join(f.save_state())

    def stop(self) -> None:
        """SIGTERM; the program convention is a prompt exit with status 0."""
        if self.proc.running():
            os.killpg(self.proc.proc.pid, signal.SIGTERM)
        r = self.proc.wait(30)
        assert r.rc == 0, f"vhost-user-backend exited {r.rc} on SIGTERM: {r.stderr}"


def fs_qemu(workdir: Path, name: str, backend: Backend, *, incoming: str | None = None,
            paused: bool = True) -> QemuPeer:
    return QemuPeer("10.0", machine="pc,memory-backend=mem", memory=MEMORY, incoming=incoming,
                    paused=paused, workdir=workdir, name=name, extra_args=[
                        "-object", f"memory-backend-memfd,id=mem,size={MEMORY},share=on",
                        "-chardev", f"socket,id=vu0,path={backend.sock}",
                        "-device", "vhost-user-fs-pci,chardev=vu0,tag=myfs"])


@pytest.fixture
def backends(workdir: Path) -> Iterator[object]:
    started: list[Backend] = []

    def start(name: str, seed: int | None = None, reply_fd: bool = False) -> Backend:
        b = Backend(workdir, name, seed, reply_fd)
        started.append(b)
        return b

    yield start
    for b in started:
        b.proc.kill()


def check_same_state(src: Backend, dst: Backend, src_info: dict[str, object]) -> None:
    got = dst.wait_loaded()
    assert got["failed_loads"] == 0, got
    assert got["loads"] == 1
    assert got["sha256"] == src_info["sha256"] and got["size"] == src_info["size"]
    assert src.info()["saves"] == 1
    again = dst.save_again()
    assert hashlib.sha256(again).hexdigest() == src_info["sha256"]


@pytest.mark.parametrize("reply_fd", [False, True], ids=["qemu pipe", "backend pipe"])
def test_qemu10_to_qemu10_fresh_backend(workdir: Path, backends, reply_fd: bool) -> None:
    """With ``reply_fd`` both back-ends answer SET_DEVICE_STATE_FD with their own pipe."""
    src_b = backends("src", seed=17, reply_fd=reply_fd)
    dst_b = backends("dst", reply_fd=reply_fd)
    src_info = src_b.info()
    assert dst_b.info()["sha256"] != src_info["sha256"]
    mig = f"unix:{workdir}/mig.sock"
    with fs_qemu(workdir, "dst", dst_b, incoming=mig) as dst, \
            fs_qemu(workdir, "src", src_b, paused=False) as src:
        src.migrate(mig)
        src.wait_migration(timeout=120)
        deadline = time.monotonic() + 30
        while dst.status()["status"] == "inmigrate":
            assert time.monotonic() < deadline, dst.status()
            time.sleep(0.05)
        dst_b.wait_loaded()
        dst.quit()
        src.quit()
    check_same_state(src_b, dst_b, src_info)
    src_b.stop()
    dst_b.stop()


def test_qemu10_receive_snapshot_send_fresh_backend(workdir: Path, backends,
                                                    livemig_receive) -> None:
    src_b, dst_b = backends("src", seed=23), backends("dst")
    src_info = src_b.info()
    snap = workdir / "vm.snap"
    rx = livemig_receive(f"unix:{workdir}/rx.sock", snap)
    with fs_qemu(workdir, "src", src_b, paused=False) as src:
        src.migrate(rx.address)
        src.wait_migration(timeout=120)
        rx.wait_ok()
        src.quit()
    assert src_b.info()["saves"] == 1
    mig = f"unix:{workdir}/tx.sock"
    with fs_qemu(workdir, "dst", dst_b, incoming=mig) as dst:
        send = LivemigCli(["send", str(snap), mig], workdir, prefix="send")
        send.wait_ok()
        dst_b.wait_loaded()
        deadline = time.monotonic() + 30
        while dst.status()["status"] == "inmigrate":
            assert time.monotonic() < deadline, dst.status()
            time.sleep(0.05)
        dst.quit()
    check_same_state(src_b, dst_b, src_info)
    src_b.stop()
    dst_b.stop()


def test_damaged_state_in_snapshot_fails_and_backend_keeps_its_state(
        workdir: Path, backends, livemig_receive) -> None:
    """One payload byte of the back-end state flipped in the snapshot: the destination
    back-end's checksum fails, CHECK_DEVICE_STATE answers 1, QEMU fails the load, and the
    back-end keeps running with the state it had."""
    src_b, dst_b = backends("src", seed=29), backends("dst", seed=3)
    dst_before = dst_b.info()
    snap = workdir / "vm.snap"
    rx = livemig_receive(f"unix:{workdir}/rx.sock", snap)
    with fs_qemu(workdir, "src", src_b) as src:
        src.migrate(rx.address)
        src.wait_migration(timeout=120)
        rx.wait_ok()
        src.quit()
    data = bytearray(snap.read_bytes())
    at = data.find(b"LMVUFS\x00\x01")
    assert at >= 0 and data.find(b"LMVUFS\x00\x01", at + 1) < 0, "state not found once"
    data[at + 24 + 1000] ^= 0x01
    snap.write_bytes(bytes(data))
    mig = f"unix:{workdir}/tx.sock"
    with fs_qemu(workdir, "dst", dst_b, incoming=mig) as dst:
        send = LivemigCli(["send", str(snap), mig], workdir, prefix="send")
        r = send.wait(120)
        assert r.rc != 0, "send succeeded with a damaged back-end state"
        got = dst_b.wait_loaded()
        assert got["failed_loads"] == 1 and got["loads"] == 0
        assert got["sha256"] == dst_before["sha256"]
        dst.wait_exit(30)
        assert "Back-end failed to process its internal state" in dst.stderr_text()
    assert hashlib.sha256(dst_b.save_again()).hexdigest() == dst_before["sha256"]
    src_b.stop()
    dst_b.stop()
