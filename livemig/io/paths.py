"""The paths livemig opens or creates, and the checks that keep it from harming what is there.

* An input file (``file:``, a snapshot) must be a regular file: a FIFO would block
  ``open`` until a writer comes, and neither a pipe nor a device can be read at an
  offset. :func:`open_regular_file` opens without blocking and checks before use.
* An output is written under a temporary name and renamed into place once complete.
  :func:`create_part_file` creates that name new (``O_EXCL|O_NOFOLLOW``): a file or a
  symbolic link planted there is neither followed nor overwritten.
* A unix socket path livemig listens on may replace a stale socket, nothing else:
  :func:`check_socket_path` refuses a path that exists and is not a socket (a regular
  file there would be replaced by the socket and removed on exit).
"""

from __future__ import annotations

import os
import stat

from livemig.errors import ConfigError

#: How many names :func:`create_part_file` tries before it gives up: the first is the
#: usual ``.NAME.part-PID``, the others add a random suffix (a stale file of a process
#: that had our PID, or one planted there, is left alone).
PART_FILE_ATTEMPTS = 8


def open_regular_file(path: str) -> int:
    """``path`` opened read-only; a :class:`~livemig.errors.ConfigError` naming it if it
    cannot be opened or is not a regular file (opened with ``O_NONBLOCK``, so a FIFO
    without a writer is refused rather than waited for)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        raise ConfigError(f"cannot open {path}: {e.strerror}") from e
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise ConfigError(f"{path} is not a regular file ({_kind(mode)}); livemig reads "
                              "streams and snapshots from files")
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def create_part_file(out_path: str, access: int) -> tuple[int, str]:
    """Create the temporary file that becomes ``out_path`` once complete: a new file
    (``O_EXCL|O_NOFOLLOW``: never an existing file, never through a symbolic link) in
    ``out_path``'s folder, readable by the owner only (it holds guest memory). Returns
    the descriptor and the temporary name; the caller renames it into place or unlinks
    it. ``access`` is ``os.O_RDWR`` or ``os.O_WRONLY``."""
    path = os.path.abspath(out_path)
    folder, name = os.path.split(path)
    flags = access | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    for attempt in range(PART_FILE_ATTEMPTS):
        suffix = "" if attempt == 0 else f"-{os.urandom(4).hex()}"
        tmp = os.path.join(folder, f".{name}.part-{os.getpid()}{suffix}")
        try:
            return os.open(tmp, flags, 0o600), tmp
        except FileExistsError:
            continue
        except OSError as e:
            raise ConfigError(f"cannot create {tmp}: {e.strerror}") from e
    raise ConfigError(f"cannot create a temporary file for {out_path} in {folder}: "
                      f"{PART_FILE_ATTEMPTS} names taken")


def check_socket_path(path: str, what: str) -> None:
    """Refuse to listen on ``path`` when something other than a socket is there (a
    stale socket may be replaced). ``what`` names the socket in the message ("QMP
    socket", "migration socket")."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    except OSError as e:
        raise ConfigError(f"{what} path {path}: {e.strerror}") from e
    if not stat.S_ISSOCK(mode):
        raise ConfigError(f"{what} path {path} exists and is not a socket ({_kind(mode)}); "
                          "not replacing it")


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"),
                       (stat.S_ISLNK, "a symbolic link"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISREG, "a regular file")):
        if test(mode):
            return name
    return f"file type {stat.S_IFMT(mode):#o}"
