"""Kernel-assisted dirty page tracking: uffd-wp in async mode + PAGEMAP_SCAN.

livemig's guest RAM is anonymous memory mapped into this process. Writes made
through livemig's own helpers are marked in numpy bitmaps, but a migration
must also see what any other code writes there: numpy, a C extension,
another thread, or the kernel itself (``recv_into``, ``preadv``). This module
asks the kernel which pages were written.

Theory of operation (Linux 6.7+):

1. A userfaultfd is created and configured (``UFFDIO_API``) with
   ``UFFD_FEATURE_WP_ASYNC`` and ``UFFD_FEATURE_WP_UNPOPULATED``.
2. :meth:`KernelDirtyTracker.start` registers the range in write-protect
   mode (``UFFDIO_REGISTER``, ``UFFDIO_REGISTER_MODE_WP``) and
   write-protects every page of it (``UFFDIO_WRITEPROTECT``). Thanks to
   ``WP_UNPOPULATED`` even pages never touched get a PTE marker that carries
   the protection, so their first write is seen too.
3. A write to a protected page faults; in async mode the kernel resolves the
   fault itself by clearing the page's uffd-wp bit. No message is queued and
   no thread of ours runs: the writer pays one minor fault per page per
   round and continues.
4. :meth:`KernelDirtyTracker.collect` calls the ``PAGEMAP_SCAN`` ioctl on
   ``/proc/self/pagemap`` with ``PM_SCAN_WP_MATCHING``: the kernel returns
   the ranges whose uffd-wp bit is clear (category ``PAGE_IS_WRITTEN``) and
   sets the bit again, under the page-table lock of each range. A write
   racing with a collect therefore lands either before the page is looked
   at (it is in this result) or after it was protected again (it faults and
   is in the next one); it is never lost. ``PM_SCAN_CHECK_WPASYNC`` makes
   the scan fail instead of silently reporting nothing when part of the
   range is no longer registered (unmapped, remapped).

Reads do not clear the bit: a page only read (even one first populated by
the read, which maps the shared zero page) is not reported.

Discards: ``MADV_DONTNEED`` on tracked private anonymous memory drops the
page (it reads back as zeros) and the page is reported as written, because
its protection went with it (measured on Linux 6.18; the tests hold it). On
shared anonymous memory (``mmap.mmap(-1, n)``) it drops nothing.

What the kernel cannot see: an unmapped range reports nothing (there is no
memory to migrate); a range mapped again over a tracked one (``MAP_FIXED``)
is not registered, and :meth:`KernelDirtyTracker.collect` fails on it.

Availability is probed once per process by :func:`kernel_tracking_unavailable`
(a four-page mapping, one write, one read, two collects) and reported as
one line naming the call that failed. ``docs/dirty-tracking.md`` has the
kernel requirements and the measured costs.

Struct layouts and numbers come from the kernel uAPI headers, named at each
constant: ``include/uapi/linux/userfaultfd.h``, ``include/uapi/linux/fs.h``
(PAGEMAP_SCAN, Linux 6.7+) and ``include/uapi/asm-generic/ioctl.h``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import enum
import errno
import functools
import mmap
import os
import platform
import threading
import weakref
from collections.abc import Callable
from typing import Self

import numpy as np

from livemig.errors import ConfigError, KernelTrackingUnavailable, StateError, TransportError

__all__ = [
    "KernelDirtyTracker",
    "Syscalls",
    "address_of",
    "kernel_tracking_unavailable",
]

# --- ioctl request numbers: include/uapi/asm-generic/ioctl.h -----------------

_IOC_NRSHIFT = 0
_IOC_TYPESHIFT = 8  # _IOC_NRSHIFT + _IOC_NRBITS (8)
_IOC_SIZESHIFT = 16  # _IOC_TYPESHIFT + _IOC_TYPEBITS (8)
_IOC_DIRSHIFT = 30  # _IOC_SIZESHIFT + _IOC_SIZEBITS (14)
_IOC_WRITE = 1  # userland writes, the kernel reads
_IOC_READ = 2  # userland reads, the kernel writes


def _ioc(direction: int, kind: int, nr: int, size: int) -> int:
    return (
        (direction << _IOC_DIRSHIFT)
        | (kind << _IOC_TYPESHIFT)
        | (nr << _IOC_NRSHIFT)
        | (size << _IOC_SIZESHIFT)
    )


# --- structures: include/uapi/linux/userfaultfd.h, include/uapi/linux/fs.h ---

_u64 = ctypes.c_uint64


class UffdioApi(ctypes.Structure):
    """``struct uffdio_api`` (userfaultfd.h)."""

    _fields_ = [("api", _u64), ("features", _u64), ("ioctls", _u64)]


class UffdioRange(ctypes.Structure):
    """``struct uffdio_range`` (userfaultfd.h)."""

    _fields_ = [("start", _u64), ("len", _u64)]


class UffdioRegister(ctypes.Structure):
    """``struct uffdio_register`` (userfaultfd.h); ``ioctls`` is written by the kernel."""

    _fields_ = [("range", UffdioRange), ("mode", _u64), ("ioctls", _u64)]


class UffdioWriteprotect(ctypes.Structure):
    """``struct uffdio_writeprotect`` (userfaultfd.h)."""

    _fields_ = [("range", UffdioRange), ("mode", _u64)]


class PmScanArg(ctypes.Structure):
    """``struct pm_scan_arg`` (fs.h); ``walk_end`` is written by the kernel."""

    _fields_ = [
        ("size", _u64),
        ("flags", _u64),
        ("start", _u64),
        ("end", _u64),
        ("walk_end", _u64),
        ("vec", _u64),
        ("vec_len", _u64),
        ("max_pages", _u64),
        ("category_inverted", _u64),
        ("category_mask", _u64),
        ("category_anyof_mask", _u64),
        ("return_mask", _u64),
    ]


#: ``struct page_region {__u64 start, end, categories;}`` (fs.h), as numpy sees
#: one row of the vector PAGEMAP_SCAN fills: start, end (exclusive), categories.
_PAGE_REGION_FIELDS = 3

# --- constants -----------------------------------------------------------------

#: ``UFFD_API`` (userfaultfd.h): the only API version there is.
UFFD_API = 0xAA
#: ``UFFDIO`` (userfaultfd.h): the ioctl type byte of userfaultfd.
UFFDIO = 0xAA
#: ``UFFD_USER_MODE_ONLY`` (userfaultfd.h, flag of the syscall, Linux 5.11+):
#: allowed without privilege even when vm.unprivileged_userfaultfd is 0. It
#: only changes faults that would be delivered to us, and async write-protect
#: faults never are: the kernel's own writes into tracked memory still work.
UFFD_USER_MODE_ONLY = 1


class UffdIoctlNr(enum.IntEnum):
    """``_UFFDIO_*`` command numbers (userfaultfd.h); also bit positions in ``ioctls``."""

    REGISTER = 0x00
    UNREGISTER = 0x01
    WRITEPROTECT = 0x06
    API = 0x3F


#: Request numbers (userfaultfd.h): ``UFFDIO_API`` and ``UFFDIO_REGISTER`` are
#: ``_IOWR``, ``UFFDIO_UNREGISTER`` is ``_IOR`` (see the header's comment on
#: why), ``UFFDIO_WRITEPROTECT`` is ``_IOWR``.
UFFDIO_API = _ioc(_IOC_READ | _IOC_WRITE, UFFDIO, UffdIoctlNr.API, ctypes.sizeof(UffdioApi))
UFFDIO_REGISTER = _ioc(
    _IOC_READ | _IOC_WRITE, UFFDIO, UffdIoctlNr.REGISTER, ctypes.sizeof(UffdioRegister)
)
UFFDIO_UNREGISTER = _ioc(_IOC_READ, UFFDIO, UffdIoctlNr.UNREGISTER, ctypes.sizeof(UffdioRange))
UFFDIO_WRITEPROTECT = _ioc(
    _IOC_READ | _IOC_WRITE, UFFDIO, UffdIoctlNr.WRITEPROTECT, ctypes.sizeof(UffdioWriteprotect)
)
#: ``PAGEMAP_SCAN = _IOWR('f', 16, struct pm_scan_arg)`` (fs.h, Linux 6.7+).
PAGEMAP_SCAN = _ioc(_IOC_READ | _IOC_WRITE, ord("f"), 16, ctypes.sizeof(PmScanArg))


class UffdFeature(enum.IntFlag):
    """``UFFD_FEATURE_*`` bits of ``uffdio_api.features`` (userfaultfd.h) that we use."""

    #: Write-protect also pages never populated, with a PTE marker (Linux 6.4+).
    WP_UNPOPULATED = 1 << 13
    #: The kernel resolves write-protect faults itself, clearing the bit (Linux 6.7+).
    WP_ASYNC = 1 << 15


#: ``UFFDIO_REGISTER_MODE_WP`` (userfaultfd.h): register for write-protect faults.
UFFDIO_REGISTER_MODE_WP = 1 << 1
#: ``UFFDIO_WRITEPROTECT_MODE_WP`` (userfaultfd.h): set (not clear) the protection.
UFFDIO_WRITEPROTECT_MODE_WP = 1 << 0


class PageCategory(enum.IntFlag):
    """``PAGE_IS_*`` categories of PAGEMAP_SCAN (fs.h)."""

    WPALLOWED = 1 << 0
    WRITTEN = 1 << 1
    FILE = 1 << 2
    PRESENT = 1 << 3
    SWAPPED = 1 << 4
    PFNZERO = 1 << 5
    HUGE = 1 << 6
    SOFT_DIRTY = 1 << 7


class PmScanFlag(enum.IntFlag):
    """``PM_SCAN_*`` flags of PAGEMAP_SCAN (fs.h)."""

    #: Write-protect the pages that matched, atomically with reporting them.
    WP_MATCHING = 1 << 0
    #: Fail (EPERM) on a page that is not async-write-protect enabled.
    CHECK_WPASYNC = 1 << 1


#: ``__NR_userfaultfd`` by machine: arch/x86/entry/syscalls/syscall_64.tbl (323)
#: and include/uapi/asm-generic/unistd.h (282), which arm64 and riscv64 use.
USERFAULTFD_SYSCALL = {"x86_64": 323, "aarch64": 282, "arm64": 282, "riscv64": 282}

#: Regions one PAGEMAP_SCAN call may return (24 bytes each, 192 KiB). The worst
#: pattern, every other page written, gives length / 8 KiB regions: a 1 GiB
#: block then takes 16 calls that resume where the last stopped, so the cost
#: stays linear while the buffer stays small for every tracker.
SCAN_VEC_LEN = 8192

#: Pages of the mapping the availability probe writes, reads and scans.
_PROBE_PAGES = 4

_WANTED_FEATURES = UffdFeature.WP_ASYNC | UffdFeature.WP_UNPOPULATED
_SCAN_FLAGS = PmScanFlag.WP_MATCHING | PmScanFlag.CHECK_WPASYNC
_PAGEMAP = "/proc/self/pagemap"

#: Hints for the reason string, by (call, errno).
_HINTS: dict[tuple[str, int], str] = {
    ("userfaultfd", errno.ENOSYS): "kernel built without CONFIG_USERFAULTFD",
    ("userfaultfd", errno.EPERM): "not allowed: vm.unprivileged_userfaultfd or seccomp",
    ("userfaultfd", errno.EINVAL): "UFFD_USER_MODE_ONLY unknown (Linux < 5.11)",
    ("UFFDIO_API", errno.EINVAL): (
        "UFFD_FEATURE_WP_ASYNC/WP_UNPOPULATED unknown "
        "(Linux < 6.7 or CONFIG_PTE_MARKER_UFFD_WP off)"
    ),
    ("UFFDIO_REGISTER", errno.EINVAL): "this memory does not support uffd write-protect",
    ("UFFDIO_REGISTER", errno.EBUSY): "range already registered with another userfaultfd",
    ("PAGEMAP_SCAN", errno.ENOTTY): "Linux < 6.7",
    ("PAGEMAP_SCAN", errno.EPERM): "part of the range is not registered: mapped again?",
    (_PAGEMAP, errno.ENOENT): "no procfs, or CONFIG_PROC_PAGE_MONITOR off",
}


def _reason(call: str, error: OSError) -> str:
    code = errno.errorcode.get(error.errno or 0, str(error.errno))
    hint = _HINTS.get((call, error.errno or 0), os.strerror(error.errno or 0))
    return f"{call}: {code} ({hint})"


class Syscalls:
    """The kernel calls a tracker makes, through libc (ctypes releases the GIL).

    Each raises :class:`OSError` with the errno. Tests substitute a subclass
    that fails one call, to see the reason a user would get.
    """

    def __init__(self) -> None:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        self._syscall = libc.syscall
        self._syscall.restype = ctypes.c_long
        self._ioctl = libc.ioctl
        self._ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]
        self._ioctl.restype = ctypes.c_int

    def userfaultfd(self, flags: int) -> int:
        nr = USERFAULTFD_SYSCALL.get(platform.machine())
        if nr is None:
            raise OSError(errno.ENOSYS, f"no userfaultfd syscall number for {platform.machine()}")
        fd = self._syscall(ctypes.c_long(nr), ctypes.c_long(flags))
        if fd < 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
        return int(fd)

    def ioctl(self, fd: int, request: int, arg: ctypes.Structure) -> int:
        ret = self._ioctl(fd, request, ctypes.addressof(arg))
        if ret < 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
        return int(ret)

    def open_pagemap(self) -> int:
        return os.open(_PAGEMAP, os.O_RDONLY | os.O_CLOEXEC)

    def close(self, fd: int) -> None:
        os.close(fd)


@functools.cache
def _libc_syscalls() -> Syscalls:
    return Syscalls()


def address_of(buf: mmap.mmap | bytearray | memoryview | np.ndarray) -> int:
    """The address of the first byte of a writable buffer (an ``mmap.mmap``, numpy array).

    The buffer is not kept alive or pinned by this: the caller keeps it open
    for as long as the address is used (a closed mmap makes the address
    point at nothing, or at someone else's memory).
    """
    try:
        return ctypes.addressof(ctypes.c_char.from_buffer(buf))  # type: ignore[arg-type]
    except TypeError as exc:
        raise ConfigError(f"need a writable buffer, got {type(buf).__name__}: {exc}") from exc


class TrackerState(enum.Enum):
    READY = "ready"  # the userfaultfd is configured, nothing registered
    TRACKING = "tracking"  # registered and write-protected: writes are recorded
    FAILED = "failed"  # a collect() failed half-way: what it had read is lost
    CLOSED = "closed"


#: (state, operation) -> next state; a pair not here is a StateError.
_TRANSITIONS: dict[tuple[TrackerState, str], TrackerState] = {
    (TrackerState.READY, "start"): TrackerState.TRACKING,
    (TrackerState.TRACKING, "collect"): TrackerState.TRACKING,
    (TrackerState.TRACKING, "stop"): TrackerState.READY,
    (TrackerState.READY, "stop"): TrackerState.READY,
}


def _close_fds(syscalls: Syscalls, fds: list[int]) -> None:
    while fds:
        syscalls.close(fds.pop())


class KernelDirtyTracker:
    """Which pages of ``[addr, addr + length)`` were written since the last look.

    Owns a userfaultfd and a descriptor of ``/proc/self/pagemap``; both are
    closed by :meth:`close` (or the context manager's exit, or when the
    object is collected). Entering the context does not start tracking.

    Methods are serialised by a lock, so :meth:`collect` may run in one thread
    while others write the memory and another calls :meth:`close`. The
    memory must stay mapped until :meth:`stop` or :meth:`close`: an unmapped
    part reports nothing, and a part mapped again (``MAP_FIXED``) makes
    :meth:`collect` raise :class:`TransportError` and the tracker FAILED.

    ``syscalls`` replaces the libc calls (tests); given explicitly, it also
    skips the cached :func:`kernel_tracking_unavailable` check, which the
    probe itself needs.
    """

    name = "uffd-wp-async+pagemap-scan"

    def __init__(
        self, addr: int, length: int, page_size: int = 4096, *, syscalls: Syscalls | None = None
    ) -> None:
        if page_size != mmap.PAGESIZE:
            raise ConfigError(
                f"page size {page_size}: the kernel reports written pages at its page "
                f"size, {mmap.PAGESIZE}"
            )
        if addr <= 0 or addr % page_size:
            raise ConfigError(f"address {addr:#x} is not page aligned ({page_size})")
        if length <= 0 or length % page_size:
            raise ConfigError(f"length {length:#x} is not a positive multiple of {page_size}")
        if syscalls is None:
            reason = kernel_tracking_unavailable()
            if reason is not None:
                raise KernelTrackingUnavailable(reason)
            syscalls = _libc_syscalls()
        self.addr = addr
        self.length = length
        self.page_size = page_size
        self.pages = length // page_size
        self._sys = syscalls
        self._lock = threading.Lock()
        self._state = TrackerState.READY
        self._fds: list[int] = []
        self._closer = weakref.finalize(self, _close_fds, syscalls, self._fds)
        try:
            self._uffd = self._call("userfaultfd", syscalls.userfaultfd,
                                    os.O_CLOEXEC | os.O_NONBLOCK | UFFD_USER_MODE_ONLY)
            self._fds.append(self._uffd)
            self._pagemap = self._call(_PAGEMAP, syscalls.open_pagemap)
            self._fds.append(self._pagemap)
            api = UffdioApi(api=UFFD_API, features=_WANTED_FEATURES)
            self._ioctl("UFFDIO_API", self._uffd, UFFDIO_API, api)
            if api.features & _WANTED_FEATURES != _WANTED_FEATURES:
                missing = UffdFeature(_WANTED_FEATURES & ~api.features)
                raise KernelTrackingUnavailable(
                    f"UFFDIO_API: features {missing!r} not granted (Linux < 6.7?)"
                )
        except BaseException:
            self._closer()
            raise
        self._regions = np.zeros((SCAN_VEC_LEN, _PAGE_REGION_FIELDS), dtype=np.uint64)
        self._scan = PmScanArg(
            size=ctypes.sizeof(PmScanArg),
            flags=_SCAN_FLAGS,
            end=addr + length,
            vec=self._regions.ctypes.data,
            vec_len=len(self._regions),
            category_mask=PageCategory.WRITTEN,
            return_mask=PageCategory.WRITTEN,
        )

    # --- kernel calls with reasons ------------------------------------------

    def _call(self, what: str, fn: Callable[..., int], *args: int) -> int:
        try:
            return fn(*args)
        except OSError as exc:
            raise KernelTrackingUnavailable(_reason(what, exc)) from exc

    def _ioctl(self, what: str, fd: int, request: int, arg: ctypes.Structure) -> int:
        try:
            return self._sys.ioctl(fd, request, arg)
        except OSError as exc:
            where = f"{self.addr:#x}+{self.length:#x}"
            if (what, exc.errno) == ("PAGEMAP_SCAN", errno.ENOTTY) or what == "UFFDIO_API":
                raise KernelTrackingUnavailable(_reason(what, exc)) from exc
            raise TransportError(f"dirty tracking of {where}: {_reason(what, exc)}") from exc

    def _advance(self, operation: str) -> None:
        nxt = _TRANSITIONS.get((self._state, operation))
        if nxt is None:
            required = sorted({s.value for (s, op) in _TRANSITIONS if op == operation})
            raise StateError(self._state.value, " or ".join(required))
        self._state = nxt

    # --- the API -------------------------------------------------------------

    @property
    def state(self) -> TrackerState:
        return self._state

    def start(self) -> None:
        """Register the range and write-protect all of it: from now on writes are recorded.

        Writes made while this runs may or may not be reported: start before
        the first full copy of the memory, not after.
        """
        with self._lock:
            self._advance("start")
            rng = UffdioRange(start=self.addr, len=self.length)
            reg = UffdioRegister(range=rng, mode=UFFDIO_REGISTER_MODE_WP)
            try:
                self._ioctl("UFFDIO_REGISTER", self._uffd, UFFDIO_REGISTER, reg)
                if not reg.ioctls & (1 << UffdIoctlNr.WRITEPROTECT):
                    raise KernelTrackingUnavailable(
                        "UFFDIO_REGISTER: the range does not offer UFFDIO_WRITEPROTECT"
                    )
                wp = UffdioWriteprotect(range=rng, mode=UFFDIO_WRITEPROTECT_MODE_WP)
                self._ioctl("UFFDIO_WRITEPROTECT", self._uffd, UFFDIO_WRITEPROTECT, wp)
            except BaseException:
                self._state = TrackerState.READY
                self._unregister(quiet=True)
                raise

    def collect(self, out: np.ndarray | None = None) -> np.ndarray:
        """One entry per page, 1 where the page was written since start() or the last collect().

        The written pages are write-protected again in the same kernel call,
        so a write that races with this is reported now or by the next call.
        ``out``, if given, is a C-contiguous uint8 or bool array of
        :attr:`pages` entries and is overwritten and returned.
        """
        out = self._output(out)
        flat = out.view(np.uint8)
        with self._lock:
            self._advance("collect")
            flat.fill(0)
            try:
                self._scan_all(flat)
            except BaseException:
                # Pages already scanned were protected again: their writes are
                # known only to the lost result. Refuse to go on as if complete.
                self._state = TrackerState.FAILED
                raise
        # Each region added +1 at its first page and -1 (mod 256) after its
        # last; the running sum is then 1 inside regions, 0 outside.
        np.cumsum(flat, dtype=np.uint8, out=flat)
        return out

    def _scan_all(self, flat: np.ndarray) -> None:
        scan = self._scan
        end = self.addr + self.length
        cursor = self.addr
        while True:
            scan.start = cursor
            scan.walk_end = 0
            found = self._ioctl("PAGEMAP_SCAN", self._pagemap, PAGEMAP_SCAN, scan)
            if found:
                self._mark(flat, found)
            if scan.walk_end >= end:
                return
            if scan.walk_end <= cursor:
                raise TransportError(
                    f"dirty tracking of {self.addr:#x}+{self.length:#x}: PAGEMAP_SCAN "
                    f"stopped at {scan.walk_end:#x}, not after {cursor:#x}"
                )
            cursor = scan.walk_end

    def _mark(self, flat: np.ndarray, found: int) -> None:
        regions = self._regions[:found]
        low, high = int(regions[0, 0]), int(regions[-1, 1])
        if found > len(self._regions) or low < self.addr or high > self.addr + self.length:
            raise TransportError(
                f"dirty tracking of {self.addr:#x}+{self.length:#x}: PAGEMAP_SCAN returned "
                f"{found} regions, {low:#x}..{high:#x}, not inside the range"
            )
        first = (regions[:, 0] - self.addr) // self.page_size
        after = (regions[:, 1] - self.addr) // self.page_size
        # Regions are disjoint and non-empty, so neither index array repeats
        # itself and each fancy-indexed update touches an entry once.
        flat[first] += np.uint8(1)
        after = after[after < self.pages]
        flat[after] -= np.uint8(1)

    def _output(self, out: np.ndarray | None) -> np.ndarray:
        if out is None:
            return np.zeros(self.pages, dtype=np.uint8)
        if (
            out.dtype not in (np.uint8, np.bool_)
            or out.shape != (self.pages,)
            or not out.flags.c_contiguous
            or not out.flags.writeable
        ):
            raise ConfigError(
                f"collect(out=...) needs a writable contiguous uint8/bool array of {self.pages} "
                f"entries, got {out.dtype} {out.shape}"
            )
        return out

    def stop(self) -> None:
        """Stop recording writes (unregister the range); start() may be called again."""
        with self._lock:
            was = self._state
            self._advance("stop")
            if was is TrackerState.TRACKING:
                self._unregister(quiet=False)

    def _unregister(self, *, quiet: bool) -> None:
        rng = UffdioRange(start=self.addr, len=self.length)
        try:
            self._ioctl("UFFDIO_UNREGISTER", self._uffd, UFFDIO_UNREGISTER, rng)
        except TransportError:
            if not quiet:
                raise

    def close(self) -> None:
        """Close both descriptors; closing the userfaultfd also ends the registration.

        Idempotent, and allowed in any state.
        """
        with self._lock:
            self._state = TrackerState.CLOSED
            self._closer()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"<KernelDirtyTracker {self.addr:#x}+{self.length:#x} "
            f"({self.pages} pages) {self._state.value}>"
        )


def _probe(syscalls: Syscalls) -> str | None:
    """Track a small mapping for real; the reason it does not work, or None."""
    ps = mmap.PAGESIZE
    buf = mmap.mmap(-1, _PROBE_PAGES * ps, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    try:
        with KernelDirtyTracker(address_of(buf), len(buf), ps, syscalls=syscalls) as tracker:
            tracker.start()
            buf[ps] = 1  # page 1 written
            buf[2 * ps]  # page 2 populated by a read; pages 0 and 3 untouched
            written = np.flatnonzero(tracker.collect()).tolist()
            if written != [1]:
                return f"probe: wrote page 1 of 4, PAGEMAP_SCAN reported pages {written}"
            again = np.flatnonzero(tracker.collect()).tolist()
            if again:
                return f"probe: PAGEMAP_SCAN did not write-protect again: pages {again}"
            tracker.stop()
    except TransportError as exc:
        return str(exc)
    finally:
        buf.close()
    return None


@functools.cache
def kernel_tracking_unavailable() -> str | None:
    """None if uffd-wp async + PAGEMAP_SCAN work here, else a one-line reason.

    Probed once per process with a small test mapping; the answer is cached.
    """
    return _probe(_libc_syscalls())
