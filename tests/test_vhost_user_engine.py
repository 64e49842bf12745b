"""vhost-user devices of livemig machines: the front-end side of issue 6.

Real processes throughout: two ``livemig run`` machines, each with its own
``livemig vhost-user-backend`` processes, driven over QMP.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import LIVEMIG, livemig_env, run_cli

from livemig.engine.machine import Machine
from livemig.io.qmp_peer import QmpPeer
from livemig.vhost_user.backend import BackendServer, VhostUserBackend
from livemig.wire.vhost_user import ProtocolFeature

DEADLINE = 60.0


class Procs:
    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.procs: list[subprocess.Popen[bytes]] = []
        self.peers: list[QmpPeer] = []

    def backend(self, name: str, seed: int | None = None, size: int = 0) -> tuple[str, str]:
        sock = str(self.workdir / f"{name}.sock")
        state = str(self.workdir / f"{name}.json")
        argv = [*LIVEMIG, "vhost-user-backend", "--socket-path", sock, "--state-file", state]
        if seed is not None:
            argv += ["--seed", str(seed)] + (["--state-size", str(size)] if size else [])
        p = subprocess.Popen(argv, env=livemig_env(), stderr=subprocess.DEVNULL)
        self.procs.append(p)
        deadline = time.monotonic() + DEADLINE
        while not os.path.exists(sock):
            assert p.poll() is None, f"back-end {name} exited with {p.returncode}"
            assert time.monotonic() < deadline, f"back-end {name} did not listen"
            time.sleep(0.02)
        return sock, state

    def machine(self, name: str, *args: str) -> QmpPeer:
        qmp = f"unix:{self.workdir}/{name}.qmp"
        with open(self.workdir / f"{name}.log", "wb") as log:
            p = subprocess.Popen([*LIVEMIG, "run", "--print-ready", "--qmp", qmp, *args],
                                 env=livemig_env(), stdout=subprocess.PIPE, stderr=log)
        self.procs.append(p)
        stdout = p.stdout
        assert stdout is not None
        line: list[bytes] = []
        t = threading.Thread(target=lambda: line.append(stdout.readline()))
        t.start()
        t.join(DEADLINE)
        assert line and line[0], (f"{name} did not start: "
                                  f"{(self.workdir / f'{name}.log').read_text()[-2000:]}")
        peer = QmpPeer(json.loads(line[0])["qmp"], peer=name)
        self.peers.append(peer)
        return peer

    def close(self) -> None:
        for q in self.peers:
            q.close()
        for p in self.procs:
            if p.poll() is None:
                p.kill()
            p.wait()
            if p.stdout is not None:
                p.stdout.close()


@pytest.fixture
def procs(workdir: Path) -> Iterator[Procs]:
    p = Procs(workdir)
    yield p
    p.close()


def digest(state_file: str) -> str:
    with open(state_file) as f:
        return str(json.load(f)["sha256"])


def wait_status(q: QmpPeer, want: set[str], timeout: float = DEADLINE) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        m = q.cmd("query-migrate")
        if m.get("status") in want:
            return dict(m)
        assert time.monotonic() < deadline, f"status {m.get('status')}, waiting for {want}"
        time.sleep(0.02)


def setup_pair(procs: Procs, src_vu: list[str], dst_vu: list[str]) -> tuple[QmpPeer, QmpPeer]:
    dst = procs.machine("dst", "--memory", "32M", "--incoming", "defer", "--workload",
                        "dirty-pages",
                        *[a for s in dst_vu for a in ("--vhost-user", s)])
    src = procs.machine("src", "--memory", "32M", "--workload", "dirty-pages",
                        *[a for s in src_vu for a in ("--vhost-user", s)])
    for q in (src, dst):
        q.cmd("migrate-set-capabilities", capabilities=[{"capability": "multifd",
                                                         "state": True}])
        q.cmd("migrate-set-parameters", **{"multifd-channels": 2})
    src.cmd("migrate-set-parameters", **{"max-bandwidth": 0})
    return src, dst


def test_two_backends_migrate(procs: Procs) -> None:
    src_b = [procs.backend(f"vs{i}", seed=10 + i) for i in range(2)]
    dst_b = [procs.backend(f"vd{i}") for i in range(2)]
    assert digest(src_b[0][1]) != digest(dst_b[0][1])
    src, dst = setup_pair(procs, [s for s, _ in src_b], [s for s, _ in dst_b])
    uri = f"unix:{procs.workdir}/mig.sock"
    dst.cmd("migrate-incoming", uri=uri)
    src.cmd("migrate", uri=uri)
    assert wait_status(src, {"completed", "failed"})["status"] == "completed"
    assert wait_status(dst, {"completed", "failed"})["status"] == "completed"
    for (_, s_state), (_, d_state) in zip(src_b, dst_b, strict=True):
        assert digest(s_state) == digest(d_state)
    devs = {d["name"]: d for d in dst.cmd("x-query-livemig-devices")}
    for i in range(2):
        d = devs[f"livemig-vhost-user/{i}"]
        assert d["kind"] == "vhost-user" and d["verified"] is True and d["state_bytes"] > 0
    assert dst.cmd("x-query-workload")["verified"] is True


def test_backend_killed_during_save(procs: Procs) -> None:
    """A source back-end dies while the machine is stopped for switchover: the
    migration fails naming the device, the source runs again, the destination fails."""
    big = 200 << 20  # a state that takes a while to move through the pipe
    src_b = [procs.backend("vs0", seed=1), procs.backend("vs1", seed=2, size=big)]
    dst_b = [procs.backend(f"vd{i}") for i in range(2)]
    src, dst = setup_pair(procs, [s for s, _ in src_b], [s for s, _ in dst_b])
    uri = f"unix:{procs.workdir}/mig.sock"
    dst.cmd("migrate-incoming", uri=uri)
    victim = procs.procs[1]  # the big back-end
    src.cmd("migrate", uri=uri)
    deadline = time.monotonic() + DEADLINE
    while src.cmd("query-status")["status"] != "finish-migrate":
        assert src.cmd("query-migrate")["status"] not in ("completed", "failed"), \
            "the migration ended before the save started"
        assert time.monotonic() < deadline
        time.sleep(0.002)
    os.kill(victim.pid, signal.SIGKILL)
    m = wait_status(src, {"completed", "failed"})
    assert m["status"] == "failed", m
    assert "vhost-user" in m["error-desc"] or "back-end" in m["error-desc"], m["error-desc"]
    d = wait_status(dst, {"completed", "failed"})
    assert d["status"] == "failed"
    deadline = time.monotonic() + 10
    while src.cmd("query-status")["status"] != "running":
        assert time.monotonic() < deadline
        time.sleep(0.02)
    passes = src.cmd("x-query-workload")["passes"]
    deadline = time.monotonic() + 20
    while src.cmd("x-query-workload")["passes"] <= passes:
        assert time.monotonic() < deadline, "the source's workload does not run again"
        time.sleep(0.05)


class NoStateBackend(VhostUserBackend):
    """A back-end that never offers VHOST_USER_PROTOCOL_F_DEVICE_STATE."""

    protocol_features = VhostUserBackend.protocol_features & ~ProtocolFeature.DEVICE_STATE.mask

    def save_state(self, writer: Any) -> None:
        raise AssertionError("never asked")

    def load_state(self, reader: Any) -> None:
        raise AssertionError("never asked")


def test_backend_without_the_feature_blocks_migration(workdir: Path) -> None:
    from livemig.devices.vhost_user import VhostUserDevice
    from livemig.engine.controller import CommandError, MachineController

    path = str(workdir / "nostate.sock")
    server = BackendServer(NoStateBackend(), socket_path=path)
    t = threading.Thread(target=server.serve_forever)
    t.start()
    m = Machine(8 << 20)
    try:
        m.add_device(VhostUserDevice(path, 0))
        ctl = MachineController(m)
        with pytest.raises(CommandError) as e:
            ctl.migrate(f"unix:{workdir}/nowhere.sock")
        assert "livemig-vhost-user/0" in str(e.value) and "bit 19" in str(e.value)
        assert ctl.outgoing is None
    finally:
        m.close()
        server.shutdown()
        t.join(10)


def test_demo_with_backends() -> None:
    r = run_cli(["demo", "--json", "--memory", "64M", "--vhost-user-backends", "2"],
                timeout=120)
    assert r.rc == 0, r.stderr[-2000:]
    s = json.loads(r.stdout.strip().splitlines()[-1])
    vu = [d for d in s["devices"] if d["kind"] == "vhost-user"]
    assert len(vu) == 2 and all(d["verified"] and d["state_bytes"] > 0 for d in vu)
    assert s["verified"] is True



