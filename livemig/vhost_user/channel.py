"""One vhost-user connection's I/O: messages with their descriptors over a Unix socket.

Both sides use this. Reads never go past the message in progress
(:meth:`MessageDecoder.wanted`), so the SCM_RIGHTS descriptors the peer sent with a
message's first byte arrive with the read that carries that byte, and nothing of the
next message is consumed early. Descriptors received here are owned here until a
message hands them to its caller; everything still held is closed by :meth:`close`.
"""

from __future__ import annotations

import array
import contextlib
import os
import socket
from collections.abc import Sequence

from livemig.errors import TransportError, TruncatedStream, VhostUserError
from livemig.limits import MAX_VHOST_USER_FDS
from livemig.wire.vhost_user import NEED_DATA, Message, MessageDecoder, encode_message

_FD = array.array("i")

#: recvmsg's ancillary buffer: room for the most descriptors one message may carry. A
#: peer sending more gets MSG_CTRUNC (the kernel closes the excess) and an error here.
ANCILLARY_BUFFER = socket.CMSG_SPACE(MAX_VHOST_USER_FDS * _FD.itemsize)


def close_fds(fds: Sequence[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def _fds_from(ancdata: list[tuple[int, int, bytes]]) -> list[int]:
    fds: list[int] = []
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            a = array.array("i")
            a.frombytes(data[:len(data) - len(data) % a.itemsize])
            fds.extend(a)
    return fds


class MessageChannel:
    """Messages over one connected Unix stream socket (owned: :meth:`close` closes it)."""

    def __init__(self, sock: socket.socket, *, replies: bool, where: str) -> None:
        self.sock = sock
        self.where = where
        self.decoder = MessageDecoder(replies=replies, where=where)

    def receive(self) -> Message | None:
        """The next message, or None when the peer closed between messages."""
        while True:
            msg = self.decoder.next_message()
            if msg is not NEED_DATA:
                assert isinstance(msg, Message)
                return msg
            want = self.decoder.wanted()
            try:
                data, ancdata, flags, _ = self.sock.recvmsg(want, ANCILLARY_BUFFER,
                                                            socket.MSG_CMSG_CLOEXEC)
            except OSError as e:
                raise TransportError(f"{self.where}: receive failed: {e}") from e
            fds = _fds_from(ancdata)
            if flags & socket.MSG_CTRUNC:
                close_fds(fds)
                raise VhostUserError(f"more than {MAX_VHOST_USER_FDS} file descriptors "
                                     "with one message", offset=self.decoder.offset,
                                     where=self.where)
            if not data:
                close_fds(fds)
                if self.decoder.buffered:
                    raise TruncatedStream(f"peer closed {self.decoder.buffered} bytes into a "
                                          "message", offset=self.decoder.offset,
                                          where=self.where)
                return None
            try:
                self.decoder.feed(data, fds)
            except VhostUserError:
                close_fds(fds)
                raise

    def send(self, msg: Message, data: bytes | None = None) -> None:
        """Send ``msg`` (or its already encoded ``data``) with its fds on the first byte."""
        payload = encode_message(msg) if data is None else data
        try:
            if msg.fds:
                fds = array.array("i", msg.fds)
                n = self.sock.sendmsg([payload], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                                   fds.tobytes())])
                if n < len(payload):
                    self.sock.sendall(payload[n:])
            else:
                self.sock.sendall(payload)
        except OSError as e:
            raise TransportError(f"{self.where}: send of {msg.describe()} failed: {e}") from e

    def close(self) -> None:
        close_fds(self.decoder.take_fds())
        with contextlib.suppress(OSError):
            self.sock.close()
