"""x509 credentials for TLS tests, made with the ``openssl`` command in QEMU's
``tls-creds-x509`` layout (``ca-cert.pem``, ``server-*.pem``, ``client-*.pem``).

The server certificate names :data:`SERVER_NAME` and 127.0.0.1; the client certificates
carry the usages QEMU (GnuTLS) checks for. Keys are RSA 2048: what QEMU's own tests use.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from peers import QemuPeer

SERVER_NAME = "livemig.test"
#: The friendly client's subject as QEMU's authz-simple writes it (certificate order).
FRIEND = "O=livemig tests,CN=livemig-client"

_USAGE = ("basicConstraints=critical,CA:FALSE\n"
          "keyUsage=critical,digitalSignature,keyEncipherment\n")


def have_openssl() -> bool:
    return shutil.which("openssl") is not None


def _openssl(cwd: Path, *args: str) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def _ca(d: Path) -> None:
    _openssl(d, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca-key.pem",
             "-out", "ca-cert.pem", "-days", "2", "-subj", "/CN=livemig test CA",
             "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign")


def _leaf(d: Path, name: str, subject: str, ext: str) -> None:
    (d / f"{name}.ext").write_text(ext)
    _openssl(d, "req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}-key.pem",
             "-out", f"{name}.csr", "-subj", subject)
    _openssl(d, "x509", "-req", "-in", f"{name}.csr", "-CA", "ca-cert.pem", "-CAkey",
             "ca-key.pem", "-CAcreateserial", "-out", f"{name}-cert.pem", "-days", "2",
             "-extfile", f"{name}.ext")


@dataclass(frozen=True)
class Creds:
    """tls-creds-x509 directories: each has the CA and the server's pair; ``friendly`` and
    ``hostile`` add a client pair, ``anon`` none; ``stranger`` has only a client pair and
    the CA that signed it, another one."""

    friendly: Path
    hostile: Path
    anon: Path
    stranger: Path

    def __getitem__(self, name: str) -> str:
        return str(getattr(self, name))


def make_creds(d: Path) -> Creds:
    """All of :class:`Creds` under ``d``."""
    _ca(d)
    _leaf(d, "server", f"/O=livemig tests/CN={SERVER_NAME}", _USAGE
          + f"extendedKeyUsage=serverAuth\nsubjectAltName=DNS:{SERVER_NAME},IP:127.0.0.1\n")
    _leaf(d, "friendly", "/O=livemig tests/CN=livemig-client",
          _USAGE + "extendedKeyUsage=clientAuth\n")
    _leaf(d, "hostile", "/O=livemig tests/CN=hostile-client",
          _USAGE + "extendedKeyUsage=clientAuth\n")
    dirs = {}
    for who in ("friendly", "hostile", "anon"):
        out = d / who
        out.mkdir()
        for f in ("ca-cert.pem", "server-cert.pem", "server-key.pem"):
            shutil.copy(d / f, out / f)
        if who != "anon":
            shutil.copy(d / f"{who}-cert.pem", out / "client-cert.pem")
            shutil.copy(d / f"{who}-key.pem", out / "client-key.pem")
        dirs[who] = out
    stranger = d / "stranger"
    stranger.mkdir()
    _ca(stranger)  # the same name as ours, another key
    _leaf(stranger, "client", "/O=livemig tests/CN=livemig-client",
          _USAGE + "extendedKeyUsage=clientAuth\n")
    return Creds(**dirs, stranger=stranger)


def qemu_tls(q: QemuPeer, endpoint: str, creds_dir: str, *, hostname: str | None = None,
             authz: str | None = None, verify_peer: bool = True) -> None:
    """QEMU's way: a tls-creds-x509 object (and authz-simple), then the parameters."""
    q.qmp("object-add", **{"qom-type": "tls-creds-x509", "id": "tls0", "dir": creds_dir,
                           "endpoint": endpoint, "verify-peer": verify_peer})
    params: dict[str, Any] = {"tls-creds": "tls0"}
    if hostname is not None:
        params["tls-hostname"] = hostname
    if authz is not None:
        q.qmp("object-add", **{"qom-type": "authz-simple", "id": "authz0", "identity": authz})
        params["tls-authz"] = "authz0"
    q.set_params(**params)
