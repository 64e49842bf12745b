"""Layer 2: the byte channels a migration arrives on.

A destination listens on ``tcp:`` or ``unix:`` and accepts the main channel
plus one connection per multifd channel. QEMU 8.0+ connects them in no fixed
order (multifd initial packets may even arrive before the main stream's first
byte), so every connection is classified by peeking at its first four bytes:
``QEVM`` is the main channel, anything else a multifd channel. QEMU 7.2
connects the main channel first, which the same rule handles.

``exec:`` reads the stream from a command's stdout; ``file:`` reads a file
(seekable, which mapped-ram files need).
"""

from __future__ import annotations

import math
import os
import select
import signal
import socket
import stat
import subprocess
import threading
import time
from collections.abc import Callable
from typing import Protocol, runtime_checkable

from livemig.errors import ConfigError, StreamFormatError, TransportError
from livemig.io.paths import check_socket_path, open_regular_file
from livemig.io.tls import REFUSED_AFTER_HANDSHAKE, TlsSettings, TlsSocket, accept_tls
from livemig.io.uri import ExecUri, FileUri, TcpUri, UnixUri, Uri
from livemig.wire.device_state_trailer import FOOTER_SIZE, trailer_from_footer

QEVM = b"QEVM"

#: Seconds to wait for the source to connect at all; a migration that never
#: starts must not hang a script forever.
DEFAULT_ACCEPT_TIMEOUT = 3600.0

#: Seconds to wait for the next multifd connection once the main channel is there:
#: QEMU opens all of its channels at once (milliseconds apart), so a gap this long
#: means no more are coming -- a mismatched multifd-channels setting, reported then
#: instead of after a long wait (QEMU itself would wait forever here). Each new
#: connection starts the gap again.
MULTIFD_CONNECT_GAP = 5.0
#: Seconds a connection gets to say what it is (its first bytes).
MULTIFD_CONNECT_TIMEOUT = 30.0


#: The first two bytes of a TLS record that carries a handshake (a ClientHello): a
#: QEMU source with tls-creds talking to a plain listener. No migration channel starts
#: so (``QEVM``, multifd magic 0x11223344).
TLS_HANDSHAKE_RECORD = b"\x16\x03"

#: Seconds between two looks, while TLS connections are awaited, at those already
#: there: QEMU refuses a session (its hostname check) by closing the connection after
#: the handshake, and then opens no other channel.
TLS_REFUSAL_CHECK = 0.1


class ByteSource(Protocol):
    """What the main-channel loop reads from.

    ``readinto`` returns 0 at the end of the stream; ``seek`` moves the read
    position (a mapped-ram stream skips its page areas), and a source that
    cannot seek raises ``ConfigError``. What a source can do beyond this is
    declared by the capability protocols below, which the loader asks for with
    ``isinstance``.
    """

    name: str

    def readinto(self, view: memoryview) -> int: ...
    def seek(self, offset: int) -> None: ...
    def close(self) -> None: ...


@runtime_checkable
class SeekableSource(Protocol):
    """A :class:`ByteSource` over a regular file (``file:``, a snapshot).

    ``file_fd`` may be read at any offset (``pread``, ``copy_file_range``) while
    the stream is read: that is how a mapped-ram stream's pages are taken, since
    they are not in the stream but at fixed places in the file. Sockets and pipes
    (``exec:``) have no such descriptor.
    """

    @property
    def file_fd(self) -> int: ...


@runtime_checkable
class LivenessSource(Protocol):
    """A :class:`ByteSource` that can tell, without reading, whether its peer is gone.

    ``alive()`` is False once the peer closed its side; it consumes no data. The
    multifd sync barrier asks it while it waits, so that a source that died does
    not leave the destination waiting for ``SYNC_TIMEOUT``.
    """

    def alive(self) -> bool: ...


class SocketSource:
    """The main channel of a tcp: or unix: migration: a :class:`LivenessSource` that
    also carries the return path (``send``)."""

    def __init__(self, sock: socket.socket, name: str = "main channel") -> None:
        self.sock = sock
        self.name = name

    def readinto(self, view: memoryview) -> int:
        try:
            return self.sock.recv_into(view)
        except OSError as e:
            raise TransportError(f"{self.name}: receive failed: {e}") from e

    def seek(self, offset: int) -> None:
        raise ConfigError(f"{self.name}: a mapped-ram stream can only be read from a file")

    def fileno(self) -> int:
        """The socket, for a caller that polls it for the peer's hang-up (``POLLRDHUP``)."""
        return self.sock.fileno()

    def alive(self) -> bool:
        """False once the peer has closed its side and nothing it sent is left unread
        (no data is consumed)."""
        if isinstance(self.sock, TlsSocket):
            return not self.sock.peer_closed()
        try:
            return self.sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) != b""
        except BlockingIOError:
            return True
        except OSError:
            return False

    def send(self, data: bytes) -> None:
        try:
            self.sock.sendall(data)
        except OSError as e:
            raise TransportError(f"{self.name}: return path send failed: {e}") from e

    def close(self) -> None:
        _close_socket(self.sock)


class FileSource:
    """A migration stream in a file (``file:PATH[,offset=N]``): a :class:`SeekableSource`.

    A snapshot's device-state trailer is not part of the stream: reading ends
    where it starts (``trailer``).
    """

    def __init__(self, path: str, offset: int = 0) -> None:
        self.fd = open_regular_file(path)
        self.name = path
        self.pos = offset
        self.size = os.fstat(self.fd).st_size
        if offset > self.size:
            self.close()
            raise ConfigError(f"file:{path},offset={offset}: the offset is past the end of "
                              f"{path} ({self.size} bytes)")
        #: Where a snapshot's device-state trailer starts; the stream ends there.
        self.trailer: int | None = None
        self.end = self.size
        if self.size >= FOOTER_SIZE:
            try:
                self.trailer = trailer_from_footer(
                    os.pread(self.fd, FOOTER_SIZE, self.size - FOOTER_SIZE), self.size)
            except StreamFormatError as e:
                self.close()
                raise e.locate(path)
            except OSError as e:
                self.close()
                raise TransportError(f"{path}: read failed: {e}") from e
            if self.trailer is not None:
                self.end = self.trailer

    def readinto(self, view: memoryview) -> int:
        if self.pos + len(view) > self.end:
            view = view[:max(0, self.end - self.pos)]
        try:
            n = os.preadv(self.fd, [view], self.pos)
        except OSError as e:
            raise TransportError(f"{self.name}: read failed at offset {self.pos:#x}: {e}") from e
        self.pos += n
        return n

    def seek(self, offset: int) -> None:
        self.pos = offset

    @property
    def file_fd(self) -> int:
        """The file, for positional reads (:class:`SeekableSource`)."""
        return self.fd

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def start_command(command: str, *, stdin: int = subprocess.DEVNULL,
                  stdout: int | None = None) -> subprocess.Popen[bytes]:
    """``/bin/sh -c COMMAND`` for an exec: migration, in a process group of its own so
    that :func:`end_command` can end everything it started."""
    try:
        return subprocess.Popen(["/bin/sh", "-c", command], stdin=stdin, stdout=stdout,
                                process_group=0)
    except OSError as e:
        raise TransportError(f"cannot start exec:{command}: {e}") from e


def end_command(proc: subprocess.Popen[bytes]) -> None:
    """Kill what is left of a :func:`start_command` process group and reap the shell.
    After a complete migration the shell has normally exited already and only leftovers
    (a command's background children) are killed."""
    try:  # the group outlives the shell while any member is left; none left: ESRCH
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


class ExecSource:
    """The stdout of ``sh -c COMMAND`` (QEMU's exec: migration).

    The command runs in a process group of its own, and :meth:`close` ends that whole
    group: whatever the command started (``sleep 60; cat vm`` runs ``sleep`` as a child
    of the shell) must not outlive livemig and hold its stderr open.
    """

    def __init__(self, command: str) -> None:
        self.name = f"exec:{command}"
        self.proc = start_command(command, stdout=subprocess.PIPE)
        assert self.proc.stdout is not None
        self.fd = self.proc.stdout.fileno()

    def readinto(self, view: memoryview) -> int:
        try:
            return os.readv(self.fd, [view])
        except OSError as e:
            raise TransportError(f"{self.name}: read failed: {e.strerror or e}") from e

    def seek(self, offset: int) -> None:
        raise ConfigError(f"{self.name}: a mapped-ram stream can only be read from a file")

    def close(self) -> None:
        """End the command's process group (after a complete stream it has normally
        exited already, and only leftovers are killed) and reap the shell."""
        if self.proc.stdout:
            self.proc.stdout.close()
        end_command(self.proc)

    def check_exit(self) -> None:
        rc = self.proc.wait(timeout=30)
        if rc != 0:
            raise TransportError(f"{self.name} exited with status {rc}")


def _close_socket(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()


class Listener:
    """A listening socket for tcp: or unix:, removed again on close.

    No thread here: :meth:`accept_migration` and :meth:`wait_for_extra` block, and
    their caller runs them in a thread it owns. :meth:`shutdown` (from any thread,
    e.g. as a :class:`~livemig.migration.common.failure.FailureLatch` callback) wakes
    either of them through an eventfd they wait on with the socket: ``shutdown(2)``
    alone does not wake a ``poll`` on a listening unix socket. :meth:`close` frees
    the socket once nothing waits on it any more.

    With ``tls``, every connection makes its TLS handshake (and passes ``tls-authz``)
    before it is classified, on its decrypted bytes.
    """

    def __init__(self, uri: Uri, tls: TlsSettings | None = None) -> None:
        self.uri = uri
        self.tls = tls
        self._tls_ctx = tls.server_context() if tls is not None else None
        self._unlink: str | None = None
        self._unlink_id = (0, 0)
        self._lock = threading.Lock()
        self._stopped = False
        self._closed = False
        try:
            if isinstance(uri, TcpUri):
                fam = socket.AF_INET6 if ":" in uri.host else socket.AF_INET
                self.sock = socket.socket(fam, socket.SOCK_STREAM)
            elif isinstance(uri, UnixUri):
                check_socket_path(uri.path, "migration socket")
                self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            else:
                raise ConfigError(f"cannot listen on {uri}")
        except OSError as e:
            raise TransportError(f"cannot listen on {uri}: {e.strerror or e}") from e
        try:
            if isinstance(uri, TcpUri):
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                self.sock.bind((uri.host, uri.port))
            else:
                assert isinstance(uri, UnixUri)
                # Listen under a temporary name and rename over a stale socket (nothing
                # else: checked above): the path appears only once connections are
                # accepted (no window of "connection refused").
                tmp = f"{uri.path}.{os.getpid()}.tmp"
                if len(tmp.encode()) > 107:
                    tmp = uri.path
                    if _is_socket(uri.path):
                        os.unlink(uri.path)
                self.sock.bind(tmp)
                self.sock.listen(256)
                if tmp != uri.path:
                    os.rename(tmp, uri.path)
                st = os.lstat(uri.path)
                self._unlink = uri.path
                self._unlink_id = (st.st_dev, st.st_ino)
            self.sock.listen(256)
            self.sock.setblocking(False)  # waits are in poll, with the wake-up
            self._wake = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        except OSError as e:
            self.sock.close()
            raise TransportError(f"cannot listen on {uri}: {e.strerror or e}") from e

    @property
    def address(self) -> str:
        if isinstance(self.uri, TcpUri):
            host, port = self.sock.getsockname()[:2]
            return str(TcpUri(host, port))
        return str(self.uri)

    def _accept(self, deadline: float | None) -> socket.socket | None:
        """One connection (blocking), or None at ``deadline``; a
        :class:`~livemig.errors.TransportError` once :meth:`shutdown` was called."""
        poller = select.poll()
        poller.register(self.sock, select.POLLIN)
        poller.register(self._wake, select.POLLIN)
        while True:
            if self._stopped:
                raise TransportError(f"{self.address}: stopped accepting connections")
            try:
                conn, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                pass
            except OSError as e:
                raise TransportError(f"{self.address}: accept failed: {e.strerror or e}") from e
            else:
                conn.setblocking(True)
                return conn
            if deadline is None:
                poller.poll()
                continue
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            poller.poll(math.ceil(left * 1000))

    def accept_migration(self, multifd_channels: int, *,
                         timeout: float = DEFAULT_ACCEPT_TIMEOUT,
                         on_accept: Callable[[socket.socket], None] | None = None,
                         ) -> tuple[socket.socket, list[socket.socket]]:
        """Accept the main channel and ``multifd_channels`` more, classified by content.

        ``on_accept`` sees each connection before its first bytes are awaited (an owner
        registers it with its failure latch, so that a cancel also ends the wait for a
        silent connection). :meth:`shutdown` ends the wait with a
        :class:`~livemig.errors.TransportError`.
        """
        if self.tls is not None:
            return self._accept_tls_migration(multifd_channels, timeout, on_accept)
        main: socket.socket | None = None
        multifd: list[socket.socket] = []
        overall = deadline = time.monotonic() + timeout
        try:
            while main is None or len(multifd) < multifd_channels:
                left = deadline - time.monotonic()
                conn = self._accept(deadline) if left > 0 else None
                if conn is None:
                    if main is None and not multifd:
                        raise TransportError(f"{self.address}: timed out waiting for the "
                                             f"migration: nothing connected within "
                                             f"{timeout:g} s")
                    if main is not None:
                        # QEMU opens all of its channels at once: the source has fewer
                        raise TransportError(
                            f"{self.address}: the multifd channel counts differ: the source "
                            f"connected {len(multifd)} multifd channels, this side expects "
                            f"{multifd_channels} (multifd-channels must be the same on both "
                            "sides" + ("; is multifd on at the source?)" if not multifd
                                       else ")"))
                    raise TransportError(f"{self.address}: timed out waiting for the migration "
                                         f"(the main channel missing, {len(multifd)} of "
                                         f"{multifd_channels} multifd channels connected)")
                if on_accept is not None:
                    on_accept(conn)
                _tune(conn)
                kind = _classify(conn, left, f"{self.address}: connection from {_peer(conn)}")
                if kind == "main":
                    if main is not None:
                        conn.close()
                        raise TransportError(f"{self.address}: a second main channel connected")
                    main = conn
                    deadline = min(overall, time.monotonic() + MULTIFD_CONNECT_GAP)
                else:
                    if len(multifd) >= multifd_channels:
                        conn.close()
                        raise TransportError(
                            f"{self.address}: more channels connected than expected "
                            f"(multifd-channels is {multifd_channels} here; is multifd "
                            "enabled with another channel count on the source?)")
                    multifd.append(conn)
                    if main is not None:
                        deadline = min(overall, time.monotonic() + MULTIFD_CONNECT_GAP)
        except BaseException:
            for s in multifd + ([main] if main else []):
                _close_socket(s)
            raise
        return main, multifd

    def _accept_tls_migration(self, multifd_channels: int, timeout: float,
                              on_accept: Callable[[socket.socket], None] | None,
                              ) -> tuple[socket.socket, list[socket.socket]]:
        """:meth:`accept_migration` over TLS: every connection makes its handshake first,
        and only once all of them have is any classified. QEMU 8.0+ sends nothing on
        the main channel before its multifd channels are set up, and over TLS that
        takes this side's part in each handshake: classifying (reading) the main channel
        first would wait for QEMU while QEMU waits for us."""
        assert self.tls is not None and self._tls_ctx is not None
        want = multifd_channels + 1
        conns: list[tuple[socket.socket, str]] = []
        deadline = time.monotonic() + timeout
        try:
            while len(conns) < want:
                left = deadline - time.monotonic()
                conn = self._accept(min(deadline, time.monotonic() + TLS_REFUSAL_CHECK)) \
                    if left > 0 else None
                for c, peer in conns:  # a source that refused the session opens no more
                    assert isinstance(c, TlsSocket)
                    if c.peer_closed():
                        raise TransportError(f"{peer}: {REFUSED_AFTER_HANDSHAKE}")
                if conn is None and left > 0 and time.monotonic() < deadline:
                    continue
                if conn is None:
                    raise TransportError(
                        f"{self.address}: timed out waiting for the migration ("
                        + (f"{len(conns)} of {want} TLS connections" if conns
                           else "no connection")
                        + "); do both sides use the same multifd-channels?")
                if on_accept is not None:
                    on_accept(conn)
                _tune(conn)
                peer = f"{self.address}: TLS connection from {_peer(conn)}"
                conn = accept_tls(conn, self._tls_ctx, self.tls, peer, left)
                if on_accept is not None:
                    on_accept(conn)  # the TLS socket replaced the plain one
                conns.append((conn, peer))
                deadline = min(deadline, time.monotonic() + MULTIFD_CONNECT_TIMEOUT)
            main: socket.socket | None = None
            multifd: list[socket.socket] = []
            for conn, peer in conns:
                if _classify(conn, max(0.0, deadline - time.monotonic()) + 1.0, peer) == "main":
                    if main is not None:
                        raise TransportError(f"{self.address}: a second main channel connected")
                    main = conn
                else:
                    multifd.append(conn)
            if main is None:
                raise TransportError(f"{self.address}: no main channel among {want} "
                                     "connections (is multifd enabled on the source "
                                     "with another channel count?)")
        except BaseException:
            for c, _ in conns:
                _close_socket(c)
            raise
        return main, multifd

    def wait_for_extra(self) -> str | None:
        """Keep accepting after the migration's channels arrived, until :meth:`shutdown`
        (then None). QEMU opens all of its channels at once, so one more connection means
        the source uses more multifd channels than we were told (the extra channel would
        otherwise just be ignored and the migration would fail later, for a less obvious
        reason): that connection is closed and the reason returned."""
        try:
            conn = self._accept(None)
        except TransportError:
            return None  # shut down: the migration's channels are all there is
        assert conn is not None
        conn.close()
        return (f"{self.address}: the source opened more connections than the main channel "
                "and the expected multifd channels (does it use more multifd-channels than "
                "this side, or multifd at all?)")

    def shutdown(self) -> None:
        """Stop accepting (any thread, any time): a blocked :meth:`accept_migration` or
        :meth:`wait_for_extra` returns, and no connection is accepted any more."""
        with self._lock:
            self._stopped = True
            if not self._closed:
                os.eventfd_write(self._wake, 1)
        try:
            self.sock.shutdown(socket.SHUT_RDWR)  # refuses connections from now on
        except OSError:
            pass

    def close(self) -> None:
        """Close the socket and remove a unix socket's path. Call it only once no thread
        waits in :meth:`accept_migration` or :meth:`wait_for_extra` (:meth:`shutdown`
        first, then join that thread)."""
        self.shutdown()
        with self._lock:
            if not self._closed:
                self._closed = True
                os.close(self._wake)
        self.sock.close()
        if self._unlink:
            try:  # ours only: another listener may have replaced it since
                st = os.lstat(self._unlink)
                if (st.st_dev, st.st_ino) == self._unlink_id:
                    os.unlink(self._unlink)
            except OSError:
                pass
            self._unlink = None


def _is_socket(path: str) -> bool:
    try:
        return stat.S_ISSOCK(os.lstat(path).st_mode)
    except OSError:
        return False


def _tune(conn: socket.socket) -> None:
    if conn.family in (socket.AF_INET, socket.AF_INET6):
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    except OSError:
        pass


def _peer(conn: socket.socket) -> str:
    try:
        name = conn.getpeername()
    except OSError:
        return "?"
    return f"{name[0]}:{name[1]}" if isinstance(name, tuple) else "a unix: client"


def _read_head(conn: TlsSocket) -> bytes:
    """A TLS channel's first 4 bytes, handed back to it (no MSG_PEEK for TLS)."""
    head = b""
    while len(head) < 4:
        chunk = conn.recv(4 - len(head))
        if not chunk:
            break
        head += chunk
    conn.give_back(head)
    return head


def _classify(conn: socket.socket, timeout: float, peer: str = "a connection") -> str:
    conn.settimeout(min(timeout, MULTIFD_CONNECT_TIMEOUT))
    try:
        if isinstance(conn, TlsSocket):
            head = _read_head(conn)
            if not head:
                conn.close()
                raise TransportError(f"{peer}: {REFUSED_AFTER_HANDSHAKE}")
        else:
            head = conn.recv(4, socket.MSG_PEEK | socket.MSG_WAITALL)
    except OSError as e:
        conn.close()
        raise TransportError(f"a connection failed before sending anything: {e}") from e
    finally:
        try:
            conn.settimeout(None)
        except OSError:
            pass
    if head[:2] == TLS_HANDSHAKE_RECORD:
        conn.close()
        raise TransportError(f"{peer}: the source speaks TLS (its first bytes are a TLS "
                             "handshake) and this side does not: give it --tls-creds")
    if len(head) < 4:
        conn.close()
        raise TransportError("a connection closed before sending 4 bytes (not a QEMU "
                             "migration?)")
    return "main" if head == QEVM else "multifd"


def open_source(uri: Uri) -> ByteSource:
    """exec: and file: sources (sockets go through :class:`Listener`)."""
    if isinstance(uri, FileUri):
        return FileSource(uri.path, uri.offset)
    if isinstance(uri, ExecUri):
        return ExecSource(uri.command)
    raise ConfigError(f"{uri} needs a listener")
