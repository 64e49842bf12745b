"""Layer 2: x509 TLS on migration channels, as QEMU's ``tls-creds-x509`` does it.

The destination is the TLS server and the source the TLS client on every
channel; the main channel and each multifd channel make their own full
handshake, and a channel is TLS from its first byte (``../shared/spec/tls.md``).

Credentials come from a directory in QEMU's ``tls-creds-x509`` layout, so one
directory can serve QEMU and livemig alike: ``ca-cert.pem``; ``server-cert.pem``
and ``server-key.pem`` for the server; ``client-cert.pem`` and ``client-key.pem``
for the client.

A TLS channel is a :class:`TlsSocket`: an :class:`ssl.SSLSocket` that also does
what the plain channel code asks of a socket (``sendmsg`` of several buffers,
``recvmsg_into`` several views, ``recv_into`` with ``MSG_WAITALL``) one buffer at a
time, since ``ssl`` has no vectored calls; and it can hand back the bytes the
listener read to classify the connection (``MSG_PEEK`` does not exist for TLS).
So the plain path keeps its vectored calls and pays nothing for TLS: the choice
is made once per channel, by the socket's class. What cannot be delegated that
way (``os.sendfile``, which would bypass the encryption) asks :func:`is_tls`.

Two traps from QEMU (see the spec): a server must not send TLS 1.3 session
tickets (``num_tickets = 0``), and a QEMU client checks the server's name only
after the handshake and then closes without an alert, which a server sees as
EOF right after a successful handshake (:data:`REFUSED_AFTER_HANDSHAKE`).
"""

from __future__ import annotations

import contextlib
import os
import socket
import ssl
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from livemig.errors import ConfigError, TlsSessionRefused, TransportError

CA_CERT = "ca-cert.pem"
SERVER_CERT = "server-cert.pem"
SERVER_KEY = "server-key.pem"
CLIENT_CERT = "client-cert.pem"
CLIENT_KEY = "client-key.pem"

#: Seconds a TLS handshake may take: QEMU answers at once, so a peer that stays
#: silent this long is not speaking TLS to us (or not at all).
HANDSHAKE_TIMEOUT = 10.0

#: What a server tells when a client closes right after a successful handshake.
REFUSED_AFTER_HANDSHAKE = (
    "the TLS handshake succeeded, then the source closed the connection: it refused "
    "the session (most likely this server's certificate does not match the source's "
    "tls-hostname, or the host it connected to)")

#: X.509 attribute names as QEMU (GnuTLS) prints them in a distinguished name.
_DN_KEYS = {
    "commonName": "CN", "countryName": "C", "localityName": "L",
    "stateOrProvinceName": "ST", "organizationName": "O",
    "organizationalUnitName": "OU", "emailAddress": "EMAIL", "domainComponent": "DC",
    "streetAddress": "STREET", "userId": "UID", "serialNumber": "serialNumber",
}


@dataclass(frozen=True)
class TlsSettings:
    """One endpoint's TLS: QEMU's ``tls-creds-x509`` object plus the migration's
    ``tls-hostname`` and ``tls-authz`` parameters.

    ``creds_dir`` is the credentials directory. ``hostname`` (client) is the name
    the server's certificate must carry; without it, the host of a ``tcp:`` URI.
    ``authz`` (server) lists the client distinguished names let in, formatted as
    QEMU does (``O=example,CN=livemig-client``: in certificate order); empty lets
    in any client the CA vouches for. ``verify_peer`` (QEMU's ``verify-peer``, on
    by default): a server requires a client certificate, a client checks the
    server's.
    """

    creds_dir: str
    hostname: str | None = None
    authz: tuple[str, ...] = field(default_factory=tuple)
    verify_peer: bool = True

    def __post_init__(self) -> None:
        if not os.path.isdir(self.creds_dir):
            raise ConfigError(f"TLS credentials directory {self.creds_dir}: not a directory")

    def _path(self, name: str) -> str:
        return os.path.join(self.creds_dir, name)

    def _need(self, *names: str) -> None:
        for n in names:
            if not os.path.isfile(self._path(n)):
                raise ConfigError(f"TLS credentials directory {self.creds_dir} has no {n}")

    def server_context(self) -> ssl.SSLContext:
        """The context a destination accepts channels with."""
        self._need(SERVER_CERT, SERVER_KEY, *((CA_CERT,) if self.verify_peer else ()))
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.num_tickets = 0  # QEMU never reads them: they would make it reset the channel
        try:
            ctx.load_cert_chain(self._path(SERVER_CERT), self._path(SERVER_KEY))
            if self.verify_peer:
                ctx.load_verify_locations(self._path(CA_CERT))
                ctx.verify_mode = ssl.CERT_REQUIRED
        except (OSError, ssl.SSLError) as e:
            raise ConfigError(f"TLS credentials in {self.creds_dir}: {_reason(e)}") from e
        ctx.sslsocket_class = TlsSocket
        return ctx

    def client_context(self) -> ssl.SSLContext:
        """The context a source connects channels with (its certificate only if the
        directory has one: an anonymous client is QEMU's too)."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        try:
            if self.verify_peer:
                self._need(CA_CERT)
                ctx.load_verify_locations(self._path(CA_CERT))
            else:
                ctx.check_hostname = False
                ctx.verify_mode = ssl.CERT_NONE
            if os.path.isfile(self._path(CLIENT_CERT)):
                self._need(CLIENT_KEY)
                ctx.load_cert_chain(self._path(CLIENT_CERT), self._path(CLIENT_KEY))
        except (OSError, ssl.SSLError) as e:
            raise ConfigError(f"TLS credentials in {self.creds_dir}: {_reason(e)}") from e
        ctx.sslsocket_class = TlsSocket
        return ctx

    def server_name(self, host: str | None) -> str:
        """The name a client checks the server's certificate against: ``hostname``, or
        ``host`` (a ``tcp:`` URI's); ``unix:`` without a hostname has nothing to check,
        which QEMU refuses too."""
        name = self.hostname or host
        if not name:
            raise ConfigError("TLS over a unix: socket needs a tls-hostname: there is no "
                              "host name to check the destination's certificate against")
        return name


class TlsSocket(ssl.SSLSocket):
    """A TLS channel that takes the plain channel code's calls (see the module head)."""

    _prefix = b""

    def give_back(self, data: bytes) -> None:
        """Make ``data`` (already read) the next bytes the channel returns."""
        self._prefix = data + self._prefix

    def recv_into(self, buffer: Any, nbytes: int | None = None, flags: int = 0) -> int:
        # MSG_WAITALL is only a hint to the plain path: every caller loops
        view = memoryview(buffer).cast("B")
        if nbytes:
            view = view[:nbytes]
        if self._prefix:
            n = min(len(view), len(self._prefix))
            view[:n] = self._prefix[:n]
            self._prefix = self._prefix[n:]
            return n
        return super().recv_into(view, len(view))

    def recv(self, buflen: int = 1024, flags: int = 0) -> bytes:
        if self._prefix:
            out, self._prefix = self._prefix[:buflen], self._prefix[buflen:]
            return out
        return super().recv(buflen)

    def recvmsg_into(self, buffers: Iterable[Any], ancbufsize: int = 0,  # type: ignore[override]
                     flags: int = 0) -> tuple[int, list[Any], int, Any]:
        """Fill the views in order, stopping at the first short read (as ``recvmsg``
        may); no ancillary data travels over TLS."""
        total = 0
        for b in buffers:
            view = memoryview(b).cast("B")
            n = self.recv_into(view)
            total += n
            if n < len(view):
                break
        return total, [], 0, None

    def sendmsg(self, buffers: Iterable[Any], ancdata: Iterable[Any] = (),  # type: ignore[override]
                flags: int = 0, address: Any = None) -> int:
        """Send every buffer (``sendall`` each: TLS has no vectored write)."""
        total = 0
        for b in buffers:
            view = memoryview(b).cast("B")
            self.sendall(view)
            total += len(view)
        return total

    def peer_closed(self) -> bool:
        """Whether the peer closed its side with nothing left to read (no data consumed):
        decrypted bytes or the raw socket's peek."""
        if self._prefix or self.pending():
            return False
        try:
            return socket.socket.recv(self, 1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
        except BlockingIOError:
            return False
        except OSError:
            return True


def is_tls(sock: socket.socket) -> bool:
    return isinstance(sock, ssl.SSLSocket)


def accept_tls(conn: socket.socket, ctx: ssl.SSLContext, settings: TlsSettings, where: str,
               timeout: float) -> TlsSocket:
    """The server's handshake on an accepted connection, then ``tls-authz``. Closes
    ``conn`` and raises :class:`TransportError` naming ``where`` and the reason."""
    conn.settimeout(min(timeout, HANDSHAKE_TIMEOUT))
    try:
        tls = ctx.wrap_socket(conn, server_side=True)
    except (OSError, ValueError) as e:
        conn.close()
        raise TransportError(f"{where}: TLS handshake failed: {_reason(e)}"
                             f"{_plain_hint(e, 'source')}") from e
    assert isinstance(tls, TlsSocket)
    try:
        tls.settimeout(None)
        if settings.authz and settings.verify_peer:
            dn = distinguished_name(tls.getpeercert())
            if dn not in settings.authz:
                raise TransportError(f"{where}: client certificate {dn!r} is not in tls-authz "
                                     f"({', '.join(settings.authz)}): refused")
    except BaseException:
        _close(tls)
        raise
    return tls


def connect_tls(sock: socket.socket, ctx: ssl.SSLContext, server_name: str, where: str,
                ) -> TlsSocket:
    """The client's handshake on a connected socket; closes it and raises
    :class:`TransportError` naming ``where`` and the reason on failure."""
    sock.settimeout(HANDSHAKE_TIMEOUT)
    try:
        tls = ctx.wrap_socket(sock, server_hostname=server_name)
        tls.settimeout(None)
    except (OSError, ValueError) as e:
        sock.close()
        raise TransportError(f"{where}: TLS handshake failed: {_reason(e)}"
                             f"{_plain_hint(e, 'destination')}") from e
    assert isinstance(tls, TlsSocket)
    return tls


def refused(where: str, e: OSError) -> TlsSessionRefused | None:
    """A send that failed because the TLS server ended the session (EOF without
    close_notify, or an alert), as :class:`TlsSessionRefused`; None for other errors."""
    if isinstance(e, ssl.SSLEOFError):
        why = "it closed the connection"
    elif isinstance(e, ssl.SSLError) and "ALERT" in (e.reason or "").upper():
        why = f"its alert: {_reason(e)}"
    else:
        return None
    return TlsSessionRefused(
        f"{where}: the destination ended the TLS session after the handshake ({why}): "
        "it refused this side's client certificate (check tls-creds against the "
        "destination's CA, verify-peer and tls-authz)")


def distinguished_name(cert: dict[str, Any] | None) -> str:
    """A certificate subject as QEMU prints it for ``tls-authz``: GnuTLS's
    ``gnutls_x509_crt_get_dn``, the RDNs in certificate order (not RFC 4514's reverse:
    ``O=example,CN=client``, as seen with QEMU 10), ``+`` between the parts of one RDN,
    RFC 4514 escapes."""
    if not cert or "subject" not in cert:
        return ""
    return ",".join("+".join(f"{_DN_KEYS.get(k, k)}={_escape(v)}" for k, v in rdn)
                    for rdn in cert["subject"])


def _escape(value: str) -> str:
    out = "".join("\\" + c if c in ',+"\\<>;=' else c for c in value)
    if out.startswith((" ", "#")):
        out = "\\" + out
    if out.endswith(" "):
        out = out[:-1] + "\\ "
    return out


def _reason(e: BaseException) -> str:
    if isinstance(e, ssl.SSLCertVerificationError):
        return f"certificate verify failed: {e.verify_message}"
    if isinstance(e, ssl.SSLError) and e.reason:
        return e.reason.lower().replace("_", " ")
    if isinstance(e, TimeoutError):
        return f"no answer in {HANDSHAKE_TIMEOUT:g} s"
    return str(e.strerror if isinstance(e, OSError) and e.strerror else e)


def _plain_hint(e: BaseException, peer: str) -> str:
    """The likely cause of a handshake that met something other than TLS."""
    if isinstance(e, ssl.SSLError) and not isinstance(e, ssl.SSLCertVerificationError):
        r = (e.reason or "").upper()
        if any(k in r for k in ("WRONG_VERSION", "HTTP", "RECORD", "PACKET_LENGTH",
                                "UNEXPECTED_EOF", "EOF")):
            return f" (does the {peer} use TLS?)"
    if isinstance(e, (ssl.SSLEOFError, ConnectionResetError, TimeoutError)):
        return f" (does the {peer} use TLS, and accept these credentials?)"
    return ""


def _close(s: socket.socket) -> None:
    with contextlib.suppress(OSError):
        s.shutdown(socket.SHUT_RDWR)
    s.close()


def settings_from(creds: str | None, hostname: str | None = None,
                  authz: Sequence[str] = (), verify_peer: bool | str = True,
                  ) -> TlsSettings | None:
    """The commands' keyword arguments as :class:`TlsSettings` (None without ``creds``)."""
    if isinstance(verify_peer, str):
        if verify_peer not in ("on", "off"):
            raise ConfigError(f"tls-verify-peer is on or off, not {verify_peer!r}")
        verify_peer = verify_peer == "on"
    if creds is None:
        if hostname or authz:
            raise ConfigError("tls-hostname and tls-authz need tls-creds")
        return None
    return TlsSettings(creds, hostname, tuple(authz), verify_peer)


__all__ = ["HANDSHAKE_TIMEOUT", "REFUSED_AFTER_HANDSHAKE", "TlsSettings", "TlsSocket",
           "accept_tls", "connect_tls", "distinguished_name", "is_tls", "refused",
           "settings_from"]
