"""A QEMU peer's QMP socket, for ``--dest-qmp``: ask before sending, explain after failing.

A small synchronous client over a plain socket, with a timeout on every read:
QEMU's monitor serves one client at a time, so a socket that someone else
holds must give a clear error after a while, not hang livemig.
"""

from __future__ import annotations

import contextlib
import json
import re
import socket
from typing import Any

from livemig.errors import ConfigError, PeerError, TransportError
from livemig.io.uri import TcpUri, UnixUri, parse_uri

#: Seconds for the greeting and for each command's answer.
QMP_TIMEOUT = 30.0
#: A QMP answer larger than this is not one livemig asked for.
MAX_QMP_LINE = 16 << 20


class QmpPeer:
    def __init__(self, address: str, timeout: float = QMP_TIMEOUT, *,
                 peer: str = "destination QEMU") -> None:
        self.peer = peer
        u = parse_uri(address) if ":" in address else UnixUri(address)
        self.address = address
        try:
            if isinstance(u, UnixUri):
                self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                self.sock.settimeout(timeout)
                self.sock.connect(u.path)
            elif isinstance(u, TcpUri):
                self.sock = socket.create_connection((u.host, u.port), timeout=timeout)
            else:
                raise ConfigError(f"--dest-qmp needs unix:PATH or tcp:HOST:PORT, not {address}")
        except OSError as e:
            raise TransportError(f"cannot connect to the {peer}'s QMP socket {address}: "
                                 f"{e.strerror or e}") from e
        self._buf = bytearray()
        greeting = self._read_message("the QMP greeting")
        if "QMP" not in greeting:
            raise TransportError(f"{address} is not a QMP socket (no greeting)")
        self.cmd("qmp_capabilities")

    def _read_message(self, what: str) -> dict[str, Any]:
        while True:
            nl = self._buf.find(b"\n")
            if nl >= 0:
                line = bytes(self._buf[:nl])
                del self._buf[:nl + 1]
                if not line.strip():
                    continue
                try:
                    msg = json.loads(line)
                except ValueError:
                    raise TransportError(f"{self.address}: not QMP: {line[:80]!r}") from None
                if isinstance(msg, dict):
                    return msg
                continue
            try:
                chunk = self.sock.recv(65536)
            except TimeoutError:
                raise TransportError(f"{self.address}: no answer for {what} (is another client "
                                     "connected to this monitor? QEMU serves one at a time)"
                                     ) from None
            except OSError as e:
                raise TransportError(f"{self.address}: {e.strerror or e}") from e
            if not chunk:
                raise TransportError(f"{self.address}: the QMP connection closed while waiting "
                                     f"for {what}")
            self._buf += chunk
            if len(self._buf) > MAX_QMP_LINE:
                raise TransportError(f"{self.address}: QMP message too large")

    def cmd(self, name: str, **args: Any) -> Any:
        req: dict[str, Any] = {"execute": name}
        if args:
            req["arguments"] = args
        try:
            self.sock.sendall(json.dumps(req).encode() + b"\n")
        except OSError as e:
            raise TransportError(f"{self.address}: {e.strerror or e}") from e
        while True:
            msg = self._read_message(name)
            if "event" in msg:
                continue
            if "error" in msg:
                err = msg["error"]
                desc = err.get("desc") if isinstance(err, dict) else None
                if not isinstance(desc, str):
                    desc = f"an error of unexpected shape: {_excerpt(err)}"
                raise PeerError(f"{self.peer} refused {name}: {desc}")
            if "return" in msg:
                return msg["return"]

    def unexpected(self, name: str, reply: object, want: str) -> PeerError:
        """The error for a reply that is not the shape QEMU gives: it names the command,
        shows (the start of) the reply and says what was expected."""
        return PeerError(f"{self.peer} answered {name} with {_excerpt(reply)}; expected {want}")

    def cmd_object(self, name: str, **args: Any) -> dict[str, Any]:
        """A command whose ``return`` is a JSON object."""
        r = self.cmd(name, **args)
        if not isinstance(r, dict):
            raise self.unexpected(name, r, "an object")
        return r

    def cmd_list(self, name: str, **args: Any) -> list[Any]:
        """A command whose ``return`` is a JSON array."""
        r = self.cmd(name, **args)
        if not isinstance(r, list):
            raise self.unexpected(name, r, "an array")
        return r

    def version(self) -> tuple[int, int]:
        r = self.cmd_object("query-version")
        q = r.get("qemu")
        if not isinstance(q, dict) or not all(_is_int(q.get(k)) for k in ("major", "minor")):
            raise self.unexpected("query-version", r, 'an object with "qemu": {"major": '
                                  'INT, "minor": INT, ...}')
        return int(q["major"]), int(q["minor"])

    def machine_type(self) -> str:
        t = self.cmd("qom-get", path="/machine", property="type")
        if not isinstance(t, str):
            raise self.unexpected("qom-get /machine type", t, "a string")
        return re.sub(r"-machine$", "", t)

    def migration_error(self) -> str | None:
        try:
            info = self.cmd("query-migrate")
        except (TransportError, PeerError):
            return None
        if isinstance(info, dict) and info.get("status") == "failed":
            return str(info.get("error-desc") or "failed (no error description)")
        return None

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


#: Characters of an unexpected reply quoted in an error message.
REPLY_EXCERPT = 120


def _excerpt(value: object) -> str:
    text = json.dumps(value, default=repr)
    return text if len(text) <= REPLY_EXCERPT else text[:REPLY_EXCERPT] + "..."


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)
