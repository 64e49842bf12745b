"""A QMP control socket that management code written for QEMU drives unchanged.

The protocol lives in :mod:`~livemig.control.qmp_json` (QEMU's JSON
streaming, errors included) and :mod:`~livemig.control.qmp_session`
(negotiation, dispatch, replies); this module owns the sockets and threads.

Threads and ownership
---------------------
:meth:`QmpServer.start` starts one accept thread; it starts one thread per
client. All of them run in the server's
:class:`~livemig.migration.common.thread_group.ThreadGroup` and none is a daemon:
:meth:`QmpServer.close` wakes them (an eventfd each), joins them and then
re-raises the first unexpected error any of them met, so a process that closes
its server (``livemig run`` does on every way out: ``quit``, SIGTERM, Ctrl-C, an
error) exits at once. A handler's exception is not such an error: it becomes the
client's error reply, as in QEMU; an unexpected error of one client's thread
does not stop the others either (it is kept for :meth:`QmpServer.close`).

Output never blocks a caller on a client
----------------------------------------
Every byte for a client goes through its output buffer, written with
non-blocking sends by whichever thread adds to it (under the client's lock);
what the socket does not take waits in the buffer and the client thread sends
it when poll says it can. :meth:`QmpServer.emit` therefore costs each client
one non-blocking send at most. A client whose unread output would pass
:data:`MAX_CLIENT_BACKLOG` is dropped, so a client that never reads cannot
hold memory or the emitting thread.

The client thread reads the next command only once the replies to the earlier
ones are sent (QEMU likewise stops reading a monitor whose queue is full): a
client that pipelines commands and reads nothing stalls only itself.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import socket
import threading
import time
from collections import deque
from collections.abc import Mapping
from types import TracebackType
from typing import Any, Self

from livemig import __version__
from livemig.control.qmp_json import InputTooLarge, ParsedItem, QmpInputParser
from livemig.control.qmp_session import Handler, QmpError, QmpSession, check_arguments
from livemig.errors import ConfigError, StateError, TransportError
from livemig.io.paths import check_socket_path
from livemig.io.uri import TcpUri, UnixUri, parse_uri
from livemig.migration.common.thread_group import ThreadGroup

__all__ = ["Handler", "QmpError", "QmpServer", "check_arguments"]

#: Clients served at once. QEMU serves one per monitor; a few more let a
#: management tool and a person with a debugging client share livemig. Past
#: this, a connection is answered at once with :data:`TOO_MANY_CLIENTS` and
#: closed (a QEMU monitor leaves a second client waiting in the listen backlog
#: without a word, which idle clients turn into a lock-out nobody can diagnose).
#: Bounds threads and buffers.
MAX_QMP_CLIENTS = 16

#: What a connection past :data:`MAX_QMP_CLIENTS` reads instead of the greeting.
TOO_MANY_CLIENTS = ("too many QMP clients: {n} are connected, the most livemig serves at "
                    "once; try again when one disconnects")

#: Bytes of output a client may leave unread before it is dropped. Replies are
#: small (a query-migrate is ~2 KiB, query-commands ~8 KiB) and events ~200 bytes:
#: 1 MiB is thousands of events that a live client would have read long ago.
MAX_CLIENT_BACKLOG = 1 << 20

#: One recv: a whole pipelined batch of commands in one call, little memory.
RECV_CHUNK = 64 << 10

#: Pending connections the kernel holds for us (see MAX_QMP_CLIENTS).
LISTEN_BACKLOG = 16

#: Seconds close() lets a client take its last replies and events (the answer
#: to the "quit" that made the engine close the server, say).
CLOSE_FLUSH_TIMEOUT = 1.0

#: Seconds close() waits for the server's threads before it reports the ones still
#: running (they stay the server's: calling close() again waits for them again). A
#: client thread ends at once unless a command handler is still running, and
#: handlers may block only briefly.
THREAD_JOIN_TIMEOUT = 10.0

#: Seconds the accept thread pauses when accept() fails for lack of
#: descriptors or memory, instead of spinning on a ready listener.
ACCEPT_RETRY_DELAY = 0.1

_UNIX_PATH_MAX = 107  # sun_path is 108 bytes with the NUL


def _encode(message: Mapping[str, Any]) -> bytes:
    """One QMP message as QEMU writes it: JSON, then CRLF."""
    try:
        text = json.dumps(message, allow_nan=False)
    except RecursionError:  # an id nested deeper than Python's json module goes
        text = _dumps_deep(message)
    return (text + "\r\n").encode()


def _dumps_deep(value: Any) -> str:
    """``json.dumps`` without recursion, for the deeply nested values the parser
    accepts (MAX_QMP_NESTING is above Python's recursion limit)."""
    out: list[str] = []
    todo: list[tuple[bool, Any]] = [(False, value)]  # (is literal text, item)
    while todo:
        literal, item = todo.pop()
        if literal:
            out.append(item)
            continue
        if isinstance(item, dict):
            parts: list[tuple[bool, Any]] = [(True, "{")]
            for i, (key, member) in enumerate(item.items()):
                parts += [(True, (", " if i else "") + json.dumps(str(key)) + ": "),
                          (False, member)]
            parts.append((True, "}"))
        elif isinstance(item, (list, tuple)):
            parts = [(True, "[")]
            for i, member in enumerate(item):
                parts += [(True, ", ")] if i else []
                parts.append((False, member))
            parts.append((True, "]"))
        else:
            out.append(json.dumps(item, allow_nan=False))
            continue
        todo.extend(reversed(parts))
    return "".join(out)


def _encode_reply(reply: dict[str, Any]) -> bytes:
    """A reply; one whose value JSON cannot carry becomes an error reply instead."""
    try:
        return _encode(reply)
    except (TypeError, ValueError) as e:
        fallback: dict[str, Any] = {"id": reply["id"]} if "id" in reply else {}
        fallback["error"] = {"class": "GenericError",
                             "desc": f"the reply cannot be written as JSON: {e}"}
        try:
            return _encode(fallback)
        except (TypeError, ValueError):  # the id itself (a huge number read as inf)
            del fallback["id"]
            return _encode(fallback)


def _drain(eventfd: int) -> None:
    try:
        os.eventfd_read(eventfd)
    except BlockingIOError:
        pass


class _Client:
    """One connection. Its socket and eventfd are touched by other threads (emit,
    close) only under ``lock`` and only while ``closed`` is false, so a number
    the kernel has handed to a newer descriptor is never written to."""

    def __init__(self, sock: socket.socket, name: str, session: QmpSession) -> None:
        self.sock = sock
        self.name = name
        self.session = session
        self.wake = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.lock = threading.Lock()
        self.out = bytearray()
        self.events_on = False
        self.dropped: str | None = None
        self.closed = False

    def push(self, data: bytes, *, event: bool, negotiated: bool = False) -> None:
        """Queue ``data`` and send what the socket takes now. An event is only for a
        negotiated client and drops the client instead of growing past the limit; a
        reply also records whether the session is past negotiation, in the same step,
        so that no event overtakes the reply to qmp_capabilities."""
        with self.lock:
            if self.closed or self.dropped is not None:
                return
            if event:
                if not self.events_on:
                    return
                if len(self.out) + len(data) > MAX_CLIENT_BACKLOG:
                    self._drop_locked(f"more than {MAX_CLIENT_BACKLOG} bytes of output unread")
                    return
            else:
                self.events_on = negotiated
            self.out += data
            self.flush_locked()
            if self.out and event:
                os.eventfd_write(self.wake, 1)  # its thread must wait for POLLOUT

    def flush_locked(self) -> None:
        while self.out:
            try:
                sent = self.sock.send(self.out, socket.MSG_NOSIGNAL)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                self._drop_locked(f"send failed: {e.strerror or e}")
                return
            del self.out[:sent]

    def _drop_locked(self, why: str) -> None:
        self.dropped = why
        self.out.clear()
        os.eventfd_write(self.wake, 1)

    def wakeup(self) -> None:
        with self.lock:
            if not self.closed:
                os.eventfd_write(self.wake, 1)

    def backlog(self) -> int:
        with self.lock:
            return len(self.out)

    def close(self) -> None:
        with self.lock:
            self.closed = True
            self.sock.close()
            os.close(self.wake)


class QmpServer:
    """A QMP server on ``unix:PATH`` or ``tcp:HOST:PORT`` serving ``commands``.

    The socket is bound (and ``address`` resolved: a tcp port 0 becomes the
    real port) when the server is made; :meth:`start` begins accepting. Used as
    a context manager it starts on entry and closes on exit.

    ``commands`` maps a command name to a handler that gets the request's
    ``arguments`` (``{}`` when absent) and returns the ``return`` value
    (``None`` means ``{}``); it runs in the client's thread, may block briefly,
    and raises :class:`QmpError` for an error reply. ``version`` and
    ``package`` are what the greeting and ``query-version`` report.
    """

    def __init__(self, address: str, commands: Mapping[str, Handler], *,
                 version: tuple[int, int, int] = (10, 0, 0),
                 package: str = f"livemig {__version__}") -> None:
        QmpSession(commands, version, package)  # refuse a bad table now, not per client
        self._commands = dict(commands)
        self._version = version
        self._package = package
        self._lock = threading.Lock()
        self._state = "bound"
        self._closing = False
        self._threads = ThreadGroup("qmp")
        self._clients: dict[_Client, threading.Thread] = {}
        self._finished: list[threading.Thread] = []
        self._errors: list[BaseException] = []
        self._accept_thread: threading.Thread | None = None
        self._unix_path: str | None = None
        self._unix_id: tuple[int, int] | None = None
        self._serial = 0
        self._wake = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        try:
            self._sock = self._bind(address)
        except BaseException:
            os.close(self._wake)
            raise

    # ---- binding --------------------------------------------------------------------------

    def _bind(self, address: str) -> socket.socket:
        uri = parse_uri(address)
        if isinstance(uri, TcpUri):
            return self._bind_tcp(uri)
        if isinstance(uri, UnixUri):
            return self._bind_unix(uri.path)
        raise ConfigError(f"a QMP server listens on unix:PATH or tcp:HOST:PORT, not {address}")

    def _bind_tcp(self, uri: TcpUri) -> socket.socket:
        try:
            family, kind, proto, _, sockaddr = socket.getaddrinfo(
                uri.host, uri.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
        except socket.gaierror as e:
            raise ConfigError(f"QMP server address {uri}: {e.strerror}") from e
        sock = socket.socket(family, kind, proto)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(sockaddr)
            sock.listen(LISTEN_BACKLOG)
            sock.setblocking(False)
        except OSError as e:
            sock.close()
            raise TransportError(f"cannot listen for QMP on {uri}: {e.strerror or e}") from e
        host, port = sock.getsockname()[:2]
        self.address = str(TcpUri(host, port))
        return sock

    def _bind_unix(self, path: str) -> socket.socket:
        """Bind under a temporary name, listen, then rename over ``path``: a stale socket
        is replaced in one step and nobody finds ``path`` before it accepts. Anything at
        ``path`` that is not a socket is left alone."""
        check_socket_path(path, "QMP socket")
        tmp = f"{path}.{os.urandom(4).hex()}.tmp"
        direct = len(os.fsencode(tmp)) > _UNIX_PATH_MAX
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            if direct:  # no room for the temporary name: replace the old socket in two steps
                try:
                    os.unlink(path)
                except FileNotFoundError:
                    pass
            sock.bind(path if direct else tmp)
            sock.listen(LISTEN_BACKLOG)
            sock.setblocking(False)
            if not direct:
                os.rename(tmp, path)
            st = os.lstat(path)
        except OSError as e:
            sock.close()
            if not direct:
                try:
                    os.unlink(tmp)
                except OSError:
                    pass
            raise TransportError(f"cannot listen for QMP on unix:{path}: "
                                 f"{e.strerror or e}") from e
        self._unix_path = path
        self._unix_id = (st.st_dev, st.st_ino)
        self.address = f"unix:{path}"
        return sock

    # ---- life cycle -----------------------------------------------------------------------

    def start(self) -> None:
        """Start accepting clients (one thread, which starts one per client)."""
        with self._lock:
            if self._state != "bound":
                raise StateError(self._state, "bound")
            self._state = "serving"
            self._accept_thread = self._threads.start(self._run_owned, self._accept_loop,
                                                      name=f"accept {self.address}")

    def close(self) -> None:
        """Stop accepting, let clients take their last output, close every socket, join
        every thread, remove the unix socket; then raise the first error a server thread
        met, if any. Calling it again does nothing. Not from a command handler (it would
        wait for its own thread): signal another thread to close the server instead.

        A thread still running after :data:`THREAD_JOIN_TIMEOUT` (a command handler that
        does not return) is named in a :class:`~livemig.errors.TransportError`; the
        server then stays "closing" and a later close() waits for it again."""
        with self._lock:
            if self._state == "closed":
                return
            own = {self._accept_thread, *self._clients.values()}
            if threading.current_thread() in own:
                raise StateError("inside a QMP server thread", "a thread of the server's owner")
            self._state = "closing"
            self._closing = True
            clients = list(self._clients)
        os.eventfd_write(self._wake, 1)
        for client in clients:
            client.wakeup()
        stuck = self._join_threads(time.monotonic() + THREAD_JOIN_TIMEOUT)
        if stuck:  # they may still use the sockets: those stay open for them
            raise TransportError(f"QMP server threads did not end within "
                                 f"{THREAD_JOIN_TIMEOUT:.0f}s (a command handler still "
                                 f"running?): {', '.join(stuck)}")
        self._threads.join(close=True)  # all have ended; and no thread can start any more
        with self._lock:
            self._state = "closed"
        self._sock.close()
        os.close(self._wake)
        self._unlink_unix()
        if self._errors:
            raise self._errors[0]

    def _join_threads(self, deadline: float) -> list[str]:
        """Join the accept thread, then every client thread, until ``deadline``; the
        names of those still running."""
        stuck: list[str] = []
        if self._accept_thread is not None:
            self._accept_thread.join(max(0.0, deadline - time.monotonic()))
            if self._accept_thread.is_alive():
                return [self._accept_thread.name]
        with self._lock:  # the accept thread has ended: no client thread is added now
            threads = [*self._clients.values(), *self._finished]
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
            if thread.is_alive():
                stuck.append(thread.name)
        if not stuck:
            with self._lock:
                self._finished.clear()
        return stuck

    def _unlink_unix(self) -> None:
        """Remove our socket file, unless another server has replaced it since."""
        if self._unix_path is None:
            return
        try:
            st = os.lstat(self._unix_path)
            if (st.st_dev, st.st_ino) == self._unix_id:
                os.unlink(self._unix_path)
        except FileNotFoundError:
            pass
        self._unix_path = None

    def __enter__(self) -> Self:
        if self._state == "bound":
            self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    @property
    def client_count(self) -> int:
        """Clients connected now (negotiated or not)."""
        with self._lock:
            return len(self._clients)

    def __repr__(self) -> str:
        return f"<QmpServer {self.address} {self._state}, {self.client_count} clients>"

    # ---- events ---------------------------------------------------------------------------

    def emit(self, event: str, data: dict[str, Any] | None = None) -> None:
        """Send an event to every client past negotiation, stamped with the wall clock as
        QEMU stamps it. Thread-safe; costs each client one non-blocking send at most, and
        drops a client whose unread output would grow too large. ``data`` must be JSON
        (``TypeError`` / ``ValueError`` otherwise)."""
        now = time.time_ns() // 1000
        message: dict[str, Any] = {
            "timestamp": {"seconds": now // 1_000_000, "microseconds": now % 1_000_000},
            "event": event,
        }
        if data is not None:
            message["data"] = data
        line = _encode(message)
        with self._lock:
            clients = list(self._clients)
        for client in clients:
            client.push(line, event=True)

    # ---- threads --------------------------------------------------------------------------

    def _run_owned(self, body: Any, *args: Any) -> None:
        """A server thread's body: its first unexpected error is kept for close()."""
        try:
            body(*args)
        except BaseException as e:  # noqa: BLE001 - re-raised by close()
            with self._lock:
                self._errors.append(e)

    def _accept_loop(self) -> None:
        poller = select.poll()
        poller.register(self._wake, select.POLLIN)
        poller.register(self._sock, select.POLLIN)
        retry_at = 0.0
        while not self._closing:
            self._reap()
            pause = max(0.0, retry_at - time.monotonic())
            poller.modify(self._sock, 0 if pause else select.POLLIN)
            for fd, _ in poller.poll(pause * 1000 if pause else None):
                if fd == self._wake:
                    _drain(self._wake)
                elif not self._closing and not self._accept_one():
                    retry_at = time.monotonic() + ACCEPT_RETRY_DELAY

    def _accept_one(self) -> bool:
        """Accept one client; False when the system is out of descriptors or memory."""
        try:
            conn, peer = self._sock.accept()
        except (BlockingIOError, InterruptedError, ConnectionAbortedError):
            return True
        except OSError:  # EMFILE, ENFILE, ENOBUFS, ENOMEM: try again shortly
            return False
        with self._lock:
            full = len(self._clients) >= MAX_QMP_CLIENTS
        if full:
            _refuse_client(conn, len(self._clients))
            return True
        conn.setblocking(False)
        self._serial += 1
        name = f"client-{self._serial} {peer or self.address}"
        try:
            client = _Client(conn, name, QmpSession(self._commands, self._version,
                                                    self._package))
        except OSError:  # no descriptor for the eventfd
            conn.close()
            return False
        with self._lock:
            # (under the lock: _serve looks its own thread up here as soon as it ends)
            thread = self._threads.start(self._run_owned, self._serve, client, name=name)
            self._clients[client] = thread
        return True

    def _reap(self) -> None:
        """Join the threads of clients that have left (each ends right after it says so)."""
        with self._lock:
            done, self._finished = self._finished, []
        for thread in done:
            thread.join()

    def _serve(self, client: _Client) -> None:
        try:
            self._converse(client)
        finally:
            client.close()
            with self._lock:
                thread = self._clients.pop(client)
                self._finished.append(thread)
            if not self._closing:
                os.eventfd_write(self._wake, 1)  # a free slot; and reap this thread

    def _converse(self, client: _Client) -> None:
        """Greeting, then: read, parse, answer one message at a time, until the client
        leaves, is dropped, sends too much, or the server closes."""
        parser = QmpInputParser()
        pending: deque[ParsedItem] = deque()
        session = client.session
        sock_fd = client.sock.fileno()
        poller = select.poll()
        poller.register(client.wake, select.POLLIN)
        poller.register(sock_fd, 0)
        client.push(_encode(session.greeting()), event=False)
        while not self._closing and client.dropped is None:
            backlog = client.backlog()
            if pending and not backlog:
                item = pending.popleft()
                client.push(_encode_reply(session.handle(item)), event=False,
                            negotiated=session.negotiated)
                if isinstance(item, InputTooLarge):
                    # The rest of that message would only parse as errors.
                    self._finish(client, poller, sock_fd, linger=True)
                    return
                continue
            # Here: output is waiting, or nothing is (then no command is either).
            want_input = not backlog
            poller.modify(sock_fd, select.POLLOUT if backlog else select.POLLIN)
            for fd, ev in poller.poll():
                if fd == client.wake:
                    _drain(client.wake)
                elif ev & select.POLLOUT:
                    with client.lock:
                        client.flush_locked()
                elif want_input and ev & (select.POLLIN | select.POLLHUP | select.POLLERR):
                    try:
                        data = client.sock.recv(RECV_CHUNK)
                    except (BlockingIOError, InterruptedError):
                        continue
                    except OSError:  # reset by the peer
                        return
                    if not data:
                        return
                    pending.extend(parser.feed(data))
                elif ev & (select.POLLHUP | select.POLLERR | select.POLLNVAL):
                    return
        self._finish(client, poller, sock_fd, linger=False)

    @staticmethod
    def _finish(client: _Client, poller: select.poll, sock_fd: int, *, linger: bool) -> None:
        """Send what is left, within CLOSE_FLUSH_TIMEOUT. With ``linger`` (the client sent
        more than we read), then half-close and read to its EOF, discarding: closing a
        socket that holds unread input makes the kernel reset the connection, and the
        client would lose the error reply that explains why it was cut off."""
        deadline = time.monotonic() + CLOSE_FLUSH_TIMEOUT
        poller.modify(sock_fd, select.POLLOUT)
        while client.dropped is None and client.backlog():
            left = deadline - time.monotonic()
            if left <= 0:
                return
            for fd, ev in poller.poll(left * 1000):
                if fd == client.wake:
                    _drain(client.wake)
                elif ev & (select.POLLHUP | select.POLLERR | select.POLLNVAL):
                    return
                else:
                    with client.lock:
                        client.flush_locked()
        if not linger or client.dropped is not None:
            return
        try:
            client.sock.shutdown(socket.SHUT_WR)
        except OSError:
            return
        poller.modify(sock_fd, select.POLLIN)
        while (left := deadline - time.monotonic()) > 0:
            if not poller.poll(left * 1000):
                continue
            try:
                if not client.sock.recv(RECV_CHUNK):
                    return
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                return


def _refuse_client(conn: socket.socket, connected: int) -> None:
    """Tell a client past :data:`MAX_QMP_CLIENTS` why it is not served, and close.

    The reply is one short line into an empty socket buffer: a non-blocking send takes it
    whole, and a client that is gone already costs nothing."""
    reply = {"error": {"class": "GenericError",
                       "desc": TOO_MANY_CLIENTS.format(n=connected)}}
    with conn, contextlib.suppress(OSError):
        conn.setblocking(False)
        conn.send(json.dumps(reply).encode() + b"\r\n")
        conn.shutdown(socket.SHUT_WR)
        conn.recv(RECV_CHUNK)  # what it sent already: unread input would reset the line
