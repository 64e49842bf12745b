"""Kernel-assisted dirty page tracking against the real kernel (no mocks).

The kernel must have uffd-wp async + PAGEMAP_SCAN (Linux 6.7+): the first
test asserts it, so a CI machine without it fails loudly instead of skipping.
Only the "unavailable" tests replace kernel calls, to see the reasons users get.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import gc
import mmap
import os
import threading
import time
import warnings
from collections.abc import Iterator

import numpy as np
import pytest

from livemig.errors import ConfigError, KernelTrackingUnavailable, StateError, TransportError
from livemig.io import dirty_kernel
from livemig.io.dirty_kernel import (
    KernelDirtyTracker,
    Syscalls,
    TrackerState,
    address_of,
    kernel_tracking_unavailable,
)

PS = mmap.PAGESIZE
PAGES = 256
HUGE = 2 << 20  # x86-64 transparent huge page

libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
libc.memset.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                      ctypes.c_int, ctypes.c_long]
libc.mmap.restype = ctypes.c_void_p
MAP_FIXED = 0x10  # include/uapi/asm-generic/mman-common.h


def anon(pages: int, *, private: bool) -> mmap.mmap:
    flags = (mmap.MAP_PRIVATE if private else mmap.MAP_SHARED) | mmap.MAP_ANONYMOUS
    return mmap.mmap(-1, pages * PS, flags=flags)


def release(buf: mmap.mmap) -> None:
    """Unmap, unless a test's numpy view still holds it (then the GC unmaps it)."""
    with contextlib.suppress(BufferError):
        buf.close()


def written(tracker: KernelDirtyTracker) -> list[int]:
    return np.flatnonzero(tracker.collect()).tolist()


@pytest.fixture(params=["private", "shared"])
def ram(request: pytest.FixtureRequest) -> Iterator[tuple[mmap.mmap, KernelDirtyTracker]]:
    """A fresh, never touched anonymous mapping of PAGES pages, tracked and started."""
    buf = anon(PAGES, private=request.param == "private")
    tracker = KernelDirtyTracker(address_of(buf), len(buf))
    tracker.start()
    yield buf, tracker
    tracker.close()
    release(buf)


def test_available_here() -> None:
    assert kernel_tracking_unavailable() is None


def test_ioctl_numbers_match_the_uapi_headers() -> None:
    # The values C compilers produce from linux/userfaultfd.h and linux/fs.h on x86-64.
    assert dirty_kernel.UFFDIO_API == 0xC018AA3F
    assert dirty_kernel.UFFDIO_REGISTER == 0xC020AA00
    assert dirty_kernel.UFFDIO_UNREGISTER == 0x8010AA01
    assert dirty_kernel.UFFDIO_WRITEPROTECT == 0xC018AA06
    assert dirty_kernel.PAGEMAP_SCAN == 0xC0606610


def test_untouched_pages_are_not_reported(ram: tuple[mmap.mmap, KernelDirtyTracker]) -> None:
    _, tracker = ram
    assert written(tracker) == []
    assert tracker.collect().shape == (PAGES,)


def test_numpy_writes_never_populated_pages(ram: tuple[mmap.mmap, KernelDirtyTracker]) -> None:
    # Nothing was populated before start(): these writes hit PTE markers.
    buf, tracker = ram
    mem = np.frombuffer(buf, np.uint8)
    mem[3 * PS] = 1
    mem[10 * PS + 100: 12 * PS + 5] = 7  # pages 10, 11, 12
    mem[(PAGES - 1) * PS + PS - 1] = 1
    assert written(tracker) == [3, 10, 11, 12, PAGES - 1]


def test_read_faults_are_not_reported(ram: tuple[mmap.mmap, KernelDirtyTracker]) -> None:
    buf, tracker = ram
    mem = np.frombuffer(buf, np.uint8)
    assert int(mem[::PS].sum()) == 0  # populates every page by reading it
    assert bytes(buf[5 * PS: 6 * PS]) == bytes(PS)
    assert written(tracker) == []
    mem[7 * PS] = 1  # a page first read, then written
    assert written(tracker) == [7]


def test_populated_pages_read_after_start_are_not_reported() -> None:
    buf = anon(PAGES, private=True)
    mem = np.frombuffer(buf, np.uint8)
    mem[:] = 9
    with KernelDirtyTracker(address_of(buf), len(buf)) as tracker:
        tracker.start()
        assert int(mem.sum()) == 9 * PAGES * PS
        assert written(tracker) == []
    del mem
    release(buf)


def test_memmove_writes(ram: tuple[mmap.mmap, KernelDirtyTracker]) -> None:
    buf, tracker = ram
    src = b"x" * (PS + 2)
    ctypes.memmove(address_of(buf) + 20 * PS - 1, src, len(src))  # pages 19, 20, 21
    assert written(tracker) == [19, 20, 21]


def test_c_library_writes(ram: tuple[mmap.mmap, KernelDirtyTracker]) -> None:
    buf, tracker = ram
    libc.memset(address_of(buf) + 40 * PS, 0xAB, 3 * PS)
    assert written(tracker) == [40, 41, 42]


def test_kernel_writes(ram: tuple[mmap.mmap, KernelDirtyTracker]) -> None:
    # The kernel copying into tracked memory (recv_into, preadv) faults like user code.
    buf, tracker = ram
    rfd, wfd = os.pipe()
    try:
        os.write(wfd, b"k" * 100)
        view = memoryview(buf)[50 * PS + 10: 50 * PS + 110]
        assert os.readv(rfd, [view]) == 100
        view.release()
    finally:
        os.close(rfd)
        os.close(wfd)
    assert written(tracker) == [50]


def test_writes_from_another_thread(ram: tuple[mmap.mmap, KernelDirtyTracker]) -> None:
    buf, tracker = ram
    base = address_of(buf)

    def write() -> None:
        for page in (2, 60, 61):
            libc.memset(base + page * PS + 8, 1, 8)

    thread = threading.Thread(target=write)
    thread.start()
    thread.join()
    assert written(tracker) == [2, 60, 61]


def test_collect_rearms(ram: tuple[mmap.mmap, KernelDirtyTracker]) -> None:
    buf, tracker = ram
    mem = np.frombuffer(buf, np.uint8)
    mem[4 * PS] = 1
    assert written(tracker) == [4]
    assert written(tracker) == []
    mem[4 * PS] = 2  # the same page again
    mem[5 * PS] = 2
    assert written(tracker) == [4, 5]
    assert written(tracker) == []


def test_output_array(ram: tuple[mmap.mmap, KernelDirtyTracker]) -> None:
    buf, tracker = ram
    np.frombuffer(buf, np.uint8)[9 * PS] = 1
    out = np.ones(PAGES, dtype=bool)
    assert tracker.collect(out) is out
    assert np.flatnonzero(out).tolist() == [9]
    out8 = np.full(PAGES, 5, dtype=np.uint8)
    tracker.collect(out8)
    assert not out8.any()
    for bad in (np.zeros(PAGES - 1, np.uint8), np.zeros(PAGES, np.int32),
                np.zeros(2 * PAGES, np.uint8)[::2]):
        with pytest.raises(ConfigError):
            tracker.collect(bad)


def test_many_regions_take_several_scans(monkeypatch: pytest.MonkeyPatch) -> None:
    # A small vector forces the walk_end loop; the result must equal the pattern.
    monkeypatch.setattr(dirty_kernel, "SCAN_VEC_LEN", 16)
    pages = 4096
    buf = anon(pages, private=True)
    mem = np.frombuffer(buf, np.uint8)
    rng = np.random.default_rng(7)
    with KernelDirtyTracker(address_of(buf), len(buf)) as tracker:
        tracker.start()
        for fraction in (0.01, 0.5, 1.0):
            expect = np.flatnonzero(rng.random(pages) < fraction)
            mem[expect * PS] += 1
            assert np.array_equal(np.flatnonzero(tracker.collect()), expect)
    del mem
    release(buf)


def test_worst_pattern_with_the_real_vector() -> None:
    # Every other page written: more regions than one PAGEMAP_SCAN call returns.
    pages = 4 * dirty_kernel.SCAN_VEC_LEN + 6
    buf = anon(pages, private=True)
    mem = np.frombuffer(buf, np.uint8)
    expect = np.arange(1, pages, 2)
    with KernelDirtyTracker(address_of(buf), len(buf)) as tracker:
        tracker.start()
        mem[expect * PS] = 1
        assert np.array_equal(np.flatnonzero(tracker.collect()), expect)
        assert written(tracker) == []
    del mem
    release(buf)


def test_fork_keeps_tracking_in_the_parent() -> None:
    # livemig starts processes (QEMU, exec: commands); a fork must not blind the tracker.
    buf = anon(16, private=True)
    buf[:] = b"\1" * len(buf)
    with KernelDirtyTracker(address_of(buf), len(buf)) as tracker:
        tracker.start()
        buf[3 * PS] = 2
        with warnings.catch_warnings():  # Python 3.12+ warns on fork with threads
            warnings.simplefilter("ignore", DeprecationWarning)
            pid = os.fork()
        if pid == 0:
            buf[5 * PS] = 9  # the child's own copy
            os._exit(0)
        assert os.waitpid(pid, 0)[1] == 0
        assert written(tracker) == [3]
        buf[3 * PS] = 4
        buf[7 * PS] = 4
        assert written(tracker) == [3, 7]
    release(buf)


def test_huge_pages_populated_before_start_report_single_pages() -> None:
    # A THP written before start() is split on its first tracked write, not
    # reported as 512 pages.
    outer = anon(3 * HUGE // PS, private=True)
    outer.madvise(mmap.MADV_HUGEPAGE)
    skip = -address_of(outer) % HUGE
    mem = np.frombuffer(outer, np.uint8)[skip: skip + HUGE]
    mem[:] = 1
    with KernelDirtyTracker(address_of(mem), HUGE) as tracker:
        tracker.start()
        assert written(tracker) == []
        mem[300 * PS] = 2
        assert written(tracker) == [300]
    del mem
    release(outer)


def test_discarded_private_page_is_reported() -> None:
    # MADV_DONTNEED makes the page read as zeros; the change must not be silent.
    buf = anon(16, private=True)
    mem = np.frombuffer(buf, np.uint8)
    mem[:] = 3
    with KernelDirtyTracker(address_of(buf), len(buf)) as tracker:
        tracker.start()
        buf.madvise(mmap.MADV_DONTNEED, 5 * PS, PS)
        assert mem[5 * PS] == 0
        assert written(tracker) == [5]
    del mem
    release(buf)


def test_two_trackers_at_once() -> None:
    a, b = anon(64, private=True), anon(32, private=False)
    with (KernelDirtyTracker(address_of(a), len(a)) as ta,
          KernelDirtyTracker(address_of(b), len(b)) as tb):
        ta.start()
        tb.start()
        a[10 * PS] = 1
        b[20 * PS] = 1
        b[31 * PS] = 1
        assert written(ta) == [10]
        assert written(tb) == [20, 31]
        assert written(ta) == written(tb) == []
    release(a)
    release(b)


def test_second_tracker_on_a_tracked_range_is_refused(
    ram: tuple[mmap.mmap, KernelDirtyTracker],
) -> None:
    buf, _ = ram
    with KernelDirtyTracker(address_of(buf), len(buf)) as other:
        with pytest.raises(TransportError, match="UFFDIO_REGISTER: EBUSY"):
            other.start()
        assert other.state is TrackerState.READY


def test_stop_and_start_again(ram: tuple[mmap.mmap, KernelDirtyTracker]) -> None:
    buf, tracker = ram
    buf[1 * PS] = 1
    tracker.stop()
    tracker.stop()  # already stopped: nothing to do
    with pytest.raises(StateError):
        tracker.collect()
    buf[2 * PS] = 1  # not tracked
    tracker.start()
    assert written(tracker) == []
    buf[3 * PS] = 1
    assert written(tracker) == [3]


def test_run_states(ram: tuple[mmap.mmap, KernelDirtyTracker]) -> None:
    _, tracker = ram
    with pytest.raises(StateError):
        tracker.start()
    tracker.close()
    assert tracker.state is TrackerState.CLOSED
    for call in (tracker.start, tracker.collect, tracker.stop):
        with pytest.raises(StateError):
            call()


def test_remapped_range_fails_and_poisons() -> None:
    buf = anon(16, private=True)
    base = address_of(buf)
    with KernelDirtyTracker(base, len(buf)) as tracker:
        tracker.start()
        got = libc.mmap(base + 4 * PS, 2 * PS, mmap.PROT_READ | mmap.PROT_WRITE,
                        mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | MAP_FIXED, -1, 0)
        assert got == base + 4 * PS
        with pytest.raises(TransportError, match="PAGEMAP_SCAN: EPERM"):
            tracker.collect()
        assert tracker.state is TrackerState.FAILED
        with pytest.raises(StateError):
            tracker.collect()
    release(buf)


def test_bad_arguments() -> None:
    buf = anon(4, private=True)
    base = address_of(buf)
    for args in ((base + 1, PS), (base, PS + 1), (base, 0), (base, PS, 8192)):
        with pytest.raises(ConfigError):
            KernelDirtyTracker(*args)
    with pytest.raises(ConfigError):
        address_of(b"read-only bytes")  # type: ignore[arg-type]
    release(buf)


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_close_is_idempotent_and_releases_descriptors() -> None:
    buf = anon(8, private=True)
    before = open_fds()
    trackers = []
    for i in range(50):
        tracker = KernelDirtyTracker(address_of(buf), len(buf))
        if i == 0:
            tracker.start()  # one range can be registered with one userfaultfd at a time
        trackers.append(tracker)
    assert open_fds() == before + 2 * 50
    for tracker in trackers:
        tracker.close()
        tracker.close()
    assert open_fds() == before
    release(buf)


def test_forgotten_tracker_releases_descriptors() -> None:
    buf = anon(8, private=True)
    before = open_fds()
    tracker = KernelDirtyTracker(address_of(buf), len(buf))
    tracker.start()
    del tracker
    gc.collect()
    assert open_fds() == before
    release(buf)


def test_concurrent_writer_never_loses_a_write() -> None:
    """Copy what collect() reports while a C-speed writer thread runs; the copy must converge.

    The writer stores a counter in random pages through libc (the GIL is
    released), so its writes race with the scans. After it stops, one more
    collect and copy must leave the shadow equal to the memory, byte for byte.
    """
    pages = 128
    buf = anon(pages, private=True)
    base = address_of(buf)
    mem = np.frombuffer(buf, np.uint8).reshape(pages, PS)
    mem[:] = 0xEE  # populated before start, like a running guest's RAM
    shadow = np.zeros_like(mem)
    stop = threading.Event()
    errors: list[BaseException] = []
    writes = [0]

    def writer() -> None:
        rng = np.random.default_rng(11)
        try:
            while not stop.is_set():
                for page, offset in rng.integers(0, [pages, PS - 64], size=(256, 2)):
                    writes[0] += 1
                    libc.memset(base + int(page) * PS + int(offset), writes[0] & 0xFF, 64)
        except Exception as exc:  # noqa: BLE001 - re-raised by the thread that owns this one
            errors.append(exc)

    with KernelDirtyTracker(base, len(buf)) as tracker:
        tracker.start()
        shadow[:] = mem  # the first full copy, after start()
        thread = threading.Thread(target=writer, name="dirty-writer")
        thread.start()
        try:
            rounds = 0
            deadline = time.monotonic() + 1.0
            dirty = np.zeros(pages, np.uint8)
            while time.monotonic() < deadline:
                tracker.collect(dirty)
                mask = dirty.view(bool)
                shadow[mask] = mem[mask]
                rounds += 1
        finally:
            stop.set()
            thread.join(timeout=10)
        assert not thread.is_alive()
        if errors:
            raise errors[0]
        tracker.collect(dirty)
        mask = dirty.view(bool)
        shadow[mask] = mem[mask]
        assert writes[0] > 1000 and rounds > 10, (writes[0], rounds)
        assert np.array_equal(shadow, mem)
    del mem
    release(buf)


# --- the reason a user gets when the kernel lacks something ----------------------


class FailingSyscalls(Syscalls):
    """The real calls, except that one named call fails with one errno."""

    def __init__(self, call: str, err: int) -> None:
        super().__init__()
        self.call = call
        self.err = err

    def _fail(self, call: str) -> None:
        if call == self.call:
            raise OSError(self.err, os.strerror(self.err))

    def userfaultfd(self, flags: int) -> int:
        self._fail("userfaultfd")
        return super().userfaultfd(flags)

    def open_pagemap(self) -> int:
        self._fail("pagemap")
        return super().open_pagemap()

    def ioctl(self, fd: int, request: int, arg: ctypes.Structure) -> int:
        names = {dirty_kernel.UFFDIO_API: "UFFDIO_API",
                 dirty_kernel.UFFDIO_REGISTER: "UFFDIO_REGISTER",
                 dirty_kernel.PAGEMAP_SCAN: "PAGEMAP_SCAN"}
        self._fail(names.get(request, ""))
        return super().ioctl(fd, request, arg)


class SilentScan(Syscalls):
    """A PAGEMAP_SCAN that finds nothing, as a kernel ignoring WP_ASYNC would."""

    def ioctl(self, fd: int, request: int, arg: ctypes.Structure) -> int:
        if request == dirty_kernel.PAGEMAP_SCAN:
            arg.walk_end = arg.end  # type: ignore[attr-defined]
            return 0
        return super().ioctl(fd, request, arg)


@pytest.mark.parametrize(("call", "err", "reason"), [
    ("PAGEMAP_SCAN", errno.ENOTTY, "PAGEMAP_SCAN: ENOTTY (Linux < 6.7)"),
    ("UFFDIO_API", errno.EINVAL, "UFFDIO_API: EINVAL (UFFD_FEATURE_WP_ASYNC/WP_UNPOPULATED"),
    ("userfaultfd", errno.ENOSYS, "userfaultfd: ENOSYS (kernel built without CONFIG_USERFAULTFD)"),
    ("userfaultfd", errno.EPERM, "userfaultfd: EPERM (not allowed"),
    ("pagemap", errno.ENOENT, "/proc/self/pagemap: ENOENT (no procfs"),
    ("UFFDIO_REGISTER", errno.EINVAL, "UFFDIO_REGISTER: EINVAL (this memory does not support"),
])
def test_unavailable_reason(call: str, err: int, reason: str) -> None:
    before = open_fds()
    got = dirty_kernel._probe(FailingSyscalls(call, err))
    assert got is not None and reason in got, got
    assert "\n" not in got
    assert open_fds() == before


def test_unavailable_when_the_scan_sees_no_write() -> None:
    got = dirty_kernel._probe(SilentScan())
    assert got == "probe: wrote page 1 of 4, PAGEMAP_SCAN reported pages []"


def test_constructor_raises_the_reason() -> None:
    buf = anon(4, private=True)
    tracker = KernelDirtyTracker(address_of(buf), len(buf),
                                 syscalls=FailingSyscalls("PAGEMAP_SCAN", errno.ENOTTY))
    with tracker:
        tracker.start()
        with pytest.raises(KernelTrackingUnavailable, match=r"^PAGEMAP_SCAN: ENOTTY") as info:
            tracker.collect()
    assert isinstance(info.value.__cause__, OSError)
    with pytest.raises(KernelTrackingUnavailable, match=r"^UFFDIO_API: EINVAL"):
        KernelDirtyTracker(address_of(buf), len(buf),
                           syscalls=FailingSyscalls("UFFDIO_API", errno.EINVAL))
    release(buf)
