"""The engine: live migration between two livemig machines, in one process.

Both machines are real (mmap'd RAM, real sockets, real threads); only the
process boundary is missing, which ``tests/test_engine_processes.py`` adds
for the faults that need a kill. Every migration has a deadline.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import run_cli

from livemig.engine.controller import MachineController
from livemig.engine.handlers import BlobDevice, SectionOut
from livemig.engine.machine import Machine
from livemig.engine.workload import DirtyPagesWorkload
from livemig.io.dirty_kernel import kernel_tracking_unavailable

MIB = 1 << 20
DEADLINE = 60.0


class Pair:
    def __init__(self, workdir: Path, mem: int, *, rate: float | None, fill: bool = True,
                 tracking: str = "software", mark: bool = True, workers: int = 1,
                 extra_src: list[Any] | None = None, extra_dst: list[Any] | None = None) -> None:
        self.uri = f"unix:{workdir}/mig.sock"
        self.events: dict[str, list[tuple[str, Any]]] = {"src": [], "dst": []}
        self.src_m = Machine(mem)
        if fill:
            self.src_m.blocks["pc.ram"].fill_random(1)
        self.src_w = DirtyPagesWorkload(self.src_m, rate=rate, mark_dirty=mark, workers=workers)
        self.src_m.add_device(self.src_w)
        for d in extra_src or []:
            self.src_m.add_device(d)
        self.dst_m = Machine(mem)
        self.dst_w = DirtyPagesWorkload(self.dst_m, workers=workers)
        self.dst_m.add_device(self.dst_w)
        for d in extra_dst or []:
            self.dst_m.add_device(d)
        self.src = MachineController(self.src_m, dirty_tracking=tracking,
                                     emit=lambda n, d: self.events["src"].append((n, d)))
        self.dst = MachineController(self.dst_m, incoming="defer",
                                     emit=lambda n, d: self.events["dst"].append((n, d)))
        self.src.start()
        self.dst.start()

    def configure(self, channels: int, compression: str = "none", **params: Any) -> None:
        caps = [{"capability": "multifd", "state": channels > 0},
                {"capability": "events", "state": True}]
        for c in (self.src, self.dst):
            c.migrate_set_capabilities(caps)
            if channels:
                c.migrate_set_parameters(**{"multifd-channels": channels,
                                            "multifd-compression": compression})
        if params:
            self.src.migrate_set_parameters(**params)

    def migrate(self) -> dict[str, Any]:
        self.dst.migrate_incoming(self.uri)
        self.src.migrate(self.uri)
        assert self.src.wait_migration(DEADLINE) in ("completed", "failed", "cancelled")
        assert self.dst.wait_migration(DEADLINE) in ("completed", "failed")
        return self.src.query_migrate()

    def close(self) -> None:
        for c in (self.src, self.dst):
            c.close()
        self.src_m.close()
        self.dst_m.close()


@pytest.fixture
def pairs(workdir: Path) -> Iterator[list[Pair]]:
    made: list[Pair] = []
    yield made
    for p in made:
        p.close()


def make_pair(pairs: list[Pair], workdir: Path, mem: int = 64 * MIB, **kw: Any) -> Pair:
    p = Pair(workdir, mem, **kw)
    pairs.append(p)
    return p


def wait_passes(w: DirtyPagesWorkload, n: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while w.passes < n:
        assert time.monotonic() < deadline, f"workload made {w.passes} passes, not {n}"
        time.sleep(0.01)


@pytest.mark.parametrize(("channels", "compression"), [(1, "none"), (4, "none"), (1, "zstd"),
                                                  (4, "zstd"), (0, "none"), (2, "zlib")])
def test_live_migration_with_workload(pairs: list[Pair], workdir: Path, channels: int,
                                      compression: str) -> None:
    mem = 64 * MIB
    # compressing random pages is slow here: dirty well below what the link carries
    p = make_pair(pairs, workdir, mem, rate=(200 if compression == "none" else 10) * MIB)
    p.configure(channels, compression, **{"max-bandwidth": 400 * MIB})
    wait_passes(p.src_w, 1)
    q = p.migrate()
    assert q["status"] == "completed", q
    assert p.dst.query_migrate()["status"] == "completed"
    ram = q["ram"]
    assert ram["total"] == mem
    # random RAM: every page goes at least once with its data
    assert ram["normal"] * 4096 >= mem
    assert ram["transferred"] >= mem
    assert ram["dirty-sync-count"] >= 2 and ram["remaining"] == 0
    if channels:
        assert ram["multifd-bytes"] > mem * 0.9
    assert q["downtime"] >= 0 and q["setup-time"] >= 0 and q["total-time"] >= q["downtime"]
    assert p.dst_w.verified is True, p.dst_w.first_error
    assert p.dst_m.state == "running" and p.src_m.state == "postmigrate"
    passes = p.dst_w.passes
    wait_passes(p.dst_w, passes + 1)  # the destination's workload carries on
    names = [n for n, _ in p.events["src"]]
    assert "MIGRATION_PASS" in names and "STOP" in names
    statuses = [d["status"] for n, d in p.events["src"] if n == "MIGRATION"]
    assert statuses == ["setup", "active", "completed"]
    # the destination's RAM equals the source's, byte for byte, counters aside
    src = p.src_m.blocks["pc.ram"].pages[:, 1:]
    dst = p.dst_m.blocks["pc.ram"].pages[:, 1:]
    assert (src == dst).all()


def test_iterations_happen_while_dirtying(pairs: list[Pair], workdir: Path) -> None:
    p = make_pair(pairs, workdir, 64 * MIB, rate=100 * MIB)
    p.configure(2, **{"max-bandwidth": 300 * MIB, "downtime-limit": 20})
    wait_passes(p.src_w, 1)
    q = p.migrate()
    assert q["status"] == "completed"
    passes = [d["pass"] for n, d in p.events["src"] if n == "MIGRATION_PASS"]
    assert len(passes) >= 2 and passes == list(range(1, len(passes) + 1))
    assert q["ram"]["transferred"] > 64 * MIB  # pages went more than once
    assert p.dst_w.verified is True, p.dst_w.first_error


def test_lost_page_is_detected(pairs: list[Pair], workdir: Path) -> None:
    """Without any dirty tracking, pages go stale: the check must see it (a test
    of the test: verification can fail)."""
    p = make_pair(pairs, workdir, 32 * MIB, rate=200 * MIB, mark=False)
    p.configure(2, **{"max-bandwidth": 200 * MIB})
    wait_passes(p.src_w, 1)
    q = p.migrate()
    assert q["status"] == "completed"
    assert p.dst_w.verified is False and p.dst_w.errors > 0


def test_kernel_dirty_tracking(pairs: list[Pair], workdir: Path) -> None:
    """The workload marks nothing; the kernel (uffd-wp async + PAGEMAP_SCAN) sees its writes."""
    assert kernel_tracking_unavailable() is None
    p = make_pair(pairs, workdir, 32 * MIB, rate=200 * MIB, mark=False, tracking="kernel")
    p.configure(2, **{"max-bandwidth": 200 * MIB})
    wait_passes(p.src_w, 1)
    q = p.migrate()
    assert q["status"] == "completed" and q["ram"]["dirty-sync-count"] >= 2
    assert p.dst_w.verified is True, p.dst_w.first_error


def test_convergence_needs_auto_converge(pairs: list[Pair], workdir: Path) -> None:
    """Dirtying faster than max-bandwidth never converges without auto-converge, and
    converges with it (the throttle shows in query-migrate)."""
    bw = 16 * MIB
    p = make_pair(pairs, workdir, 16 * MIB, rate=64 * MIB, workers=1)
    p.configure(1, **{"max-bandwidth": bw, "downtime-limit": 50})
    wait_passes(p.src_w, 1)
    p.dst.migrate_incoming(p.uri)
    p.src.migrate(p.uri)
    deadline = time.monotonic() + 30
    while p.src.query_migrate()["ram"]["dirty-sync-count"] < 6 if \
            "ram" in p.src.query_migrate() else True:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    q = p.src.query_migrate()
    assert q["status"] == "active", q
    assert "cpu-throttle-percentage" not in q
    p.src.migrate_cancel()
    assert p.src.wait_migration(DEADLINE) == "cancelled"
    assert p.src_m.state == "running"

    (workdir / "b").mkdir()
    p2 = make_pair(pairs, workdir / "b", 16 * MIB, rate=64 * MIB)
    p2.configure(1, **{"max-bandwidth": bw, "downtime-limit": 50,
                       "cpu-throttle-initial": 30, "cpu-throttle-increment": 20})
    p2.src.migrate_set_capabilities([{"capability": "auto-converge", "state": True}])
    wait_passes(p2.src_w, 1)
    p2.dst.migrate_incoming(p2.uri)
    p2.src.migrate(p2.uri)
    top = 0
    deadline = time.monotonic() + DEADLINE
    while p2.src.query_migrate()["status"] not in ("completed", "failed"):
        assert time.monotonic() < deadline
        top = max(top, p2.src.query_migrate().get("cpu-throttle-percentage", 0))
        time.sleep(0.02)
    assert p2.src.query_migrate()["status"] == "completed"
    assert top >= 30
    p2.dst.wait_migration(DEADLINE)
    assert p2.dst_w.verified is True


class SlowSave(BlobDevice):
    """Blocks in its save handler until released: a migration stuck in completion."""

    def __init__(self) -> None:
        super().__init__("slow-device", b"x" * 100)
        self.entered = threading.Event()
        self.release = threading.Event()

    def save_state(self, out: SectionOut) -> None:
        self.entered.set()
        self.release.wait(DEADLINE)
        super().save_state(out)


def _counts() -> tuple[int, int]:
    return threading.active_count(), len(os.listdir("/proc/self/fd"))


@pytest.mark.parametrize("phase", ["setup", "iteration", "completion"])
def test_cancel(pairs: list[Pair], workdir: Path, phase: str) -> None:
    slow = SlowSave()
    p = make_pair(pairs, workdir, 16 * MIB, rate=50 * MIB, extra_src=[slow],
                  extra_dst=[BlobDevice("slow-device")])
    p.configure(2, **{"max-bandwidth": 4 * MIB if phase == "iteration" else 0})
    wait_passes(p.src_w, 1)
    p.dst.migrate_incoming(p.uri)
    p.src.migrate(p.uri)
    if phase == "iteration":
        # in iteration: a second pass has begun (its MIGRATION_PASS event was sent)
        deadline = time.monotonic() + 20
        while ("MIGRATION_PASS", {"pass": 2}) not in p.events["src"]:
            assert time.monotonic() < deadline, p.events["src"]
            time.sleep(0.005)
        assert p.src.query_migrate()["status"] == "active"
    elif phase == "completion":
        assert slow.entered.wait(20)
        assert p.src_m.state == "finish-migrate"
    p.src.migrate_cancel()
    slow.release.set()
    assert p.src.wait_migration(DEADLINE) == "cancelled"
    assert p.dst.wait_migration(DEADLINE) == "failed"
    assert p.src_m.state == "running"
    before = p.src_w.passes
    wait_passes(p.src_w, before + 1)
    p.src.stop()
    assert p.src_w.verify(), p.src_w.first_error


def test_fifty_cancelled_migrations_leak_nothing(pairs: list[Pair], workdir: Path) -> None:
    p = make_pair(pairs, workdir, 8 * MIB, rate=20 * MIB, fill=False)
    p.configure(2, **{"max-bandwidth": 2 * MIB})
    wait_passes(p.src_w, 1)
    threads0, fds0 = _counts()
    for i in range(50):
        dst = Machine(8 * MIB)
        dst.add_device(DirtyPagesWorkload(dst))
        ctl = MachineController(dst, incoming="defer")
        ctl.start()
        ctl.migrate_set_capabilities([{"capability": "multifd", "state": True}])
        ctl.migrate_set_parameters(**{"multifd-channels": 2})
        ctl.migrate_incoming(p.uri)
        p.src.outgoing = None
        p.src.migrate(p.uri)
        time.sleep(0.01 * (i % 5))
        p.src.migrate_cancel()
        assert p.src.wait_migration(DEADLINE) == "cancelled"
        assert ctl.wait_migration(DEADLINE) == "failed"
        ctl.close()
        dst.close()
    deadline = time.monotonic() + 10
    while _counts() != (threads0, fds0) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _counts() == (threads0, fds0)
    assert p.src_m.state == "running"
    p.src.stop()
    assert p.src_w.verify()


def test_switchover_when_pending_fits_the_limit(pairs: list[Pair], workdir: Path) -> None:
    """The source switches over once what is pending fits the downtime limit by its own
    figures (pending bytes over the switchover bandwidth, ``expected-downtime``), and
    reports the downtime it had. How close the measured downtime stays to the limit
    is a timing question for ``benchmarks/bench_downtime.py``, not for a test."""
    limit = 100
    p = make_pair(pairs, workdir, 32 * MIB, rate=40 * MIB)
    p.configure(2, **{"max-bandwidth": 100 * MIB, "downtime-limit": limit})
    wait_passes(p.src_w, 1)
    q = p.migrate()
    assert q["status"] == "completed", q
    assert p.dst_w.verified is True
    mig = p.src.outgoing
    assert mig is not None and mig.passes >= 1
    # the last pass's estimate is what let it stop: it fit the limit
    assert mig.expected_downtime_ms is not None and mig.expected_downtime_ms <= limit, \
        (mig.expected_downtime_ms, mig.remaining)
    assert isinstance(q["downtime"], int) and q["downtime"] >= 0
    assert "expected-downtime" not in q  # a completed migration reports its real downtime


def test_device_missing_on_destination_fails_fast(pairs: list[Pair], workdir: Path) -> None:
    """A section for a device the destination does not have ends the migration with a
    message naming it (it used to wait for more of the stream forever)."""
    p = make_pair(pairs, workdir, 8 * MIB, rate=10 * MIB, fill=False,
                  extra_src=[BlobDevice("only-on-source", b"abc")])
    p.configure(1)
    t0 = time.monotonic()
    q = p.migrate()
    assert time.monotonic() - t0 < 20
    assert q["status"] == "failed"
    d = p.dst.query_migrate()
    assert d["status"] == "failed" and "only-on-source" in d["error-desc"], d
    assert p.src_m.state == "running"


def test_failed_destination_does_not_run(pairs: list[Pair], workdir: Path) -> None:
    """After a failed incoming migration the destination's RAM is incomplete: cont is
    refused (QEMU's destination would not run either)."""
    from livemig.engine.controller import CommandError

    p = make_pair(pairs, workdir, 8 * MIB, rate=10 * MIB, fill=False,
                  extra_src=[BlobDevice("only-on-source", b"abc")])
    p.configure(1)
    assert p.migrate()["status"] == "failed"
    with pytest.raises(CommandError, match="incoming migration failed"):
        p.dst.cont()
    assert p.dst_m.state == "paused"


@pytest.mark.parametrize(("args", "expect"), [
    (["--memory", "1Q"], "not a size: '1Q'"),
    (["--qmp", "/no/such/dir/x.sock"], "--qmp '/no/such/dir/x.sock'"),
    (["--qmp", "unix:/no/such/dir/x.sock"], "cannot listen for QMP"),
    (["--incoming", "bogus:x"], "unsupported migration URI scheme 'bogus'"),
])
def test_run_bad_arguments(args: list[str], expect: str) -> None:
    r = run_cli(["run", *args], timeout=60)
    err = r.stderr
    assert r.rc == 1 and expect in err and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1, err
