"""x509 TLS on every channel against real QEMU 10.0, both directions.

The scenarios are the x509 ones of QEMU's own suite (``tests/qtest/migration/tls-tests.c``),
each as QEMU 10 (and 7.2) -> :func:`livemig.receive` and :func:`livemig.send` -> QEMU 10, precopy
and multifd with 2 channels:

* override-host: the client checks ``tls-hostname`` (the certificate's DNS name): works.
* default-host over unix: no hostname to check against: the client refuses.
* default-host over tcp: the certificate names 127.0.0.1, the URI's host: works.
* mismatch-host: ``tls-hostname`` is not in the certificate: the client refuses (QEMU
  only after the handshake, with no alert: livemig says the source refused the session).
* friendly client: ``tls-authz`` lists the client's DN: works; hostile client: refused.
* anonymous client (no certificate): let in by a server with ``verify-peer`` off,
  refused by one with it on.

A success compares guest RAM byte for byte (QEMU's pmemsave of the source against the
snapshot, or of the destination against the source); a failure leaves a QEMU source
``failed`` and running and no snapshot behind. A plain-text peer on a TLS endpoint (and
the reverse) ends with a one-line error.

Certificates are made here with the ``openssl`` command, in QEMU's tls-creds-x509
layout; one directory per client identity, all signed by one CA.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from helpers import LivemigReceive, ThreadedReceive
from peers import QemuPeer, free_tcp_port, make_blob
from tls_certs import FRIEND, SERVER_NAME, Creds, have_openssl, make_creds, qemu_tls

import livemig

pytestmark = [pytest.mark.qemu, pytest.mark.timeout(120)]

MEMORY = "32M"
MEMORY_BYTES = 32 << 20
HIGH_RAM = (0x100000, MEMORY_BYTES)  # plain pc.ram in the guest-physical view
BLOB_ADDR = 0x100000
BLOB_SIZE = (3 << 20) + 77
MIGRATION_TIMEOUT = 60.0


@pytest.fixture(scope="module")
def creds(tmp_path_factory: pytest.TempPathFactory) -> Creds:
    if not have_openssl():
        pytest.skip("needs the openssl command")
    return make_creds(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def blob(tmp_path_factory: pytest.TempPathFactory) -> Path:
    p = tmp_path_factory.mktemp("blob") / "blob.bin"
    make_blob(p, BLOB_SIZE, 41)
    return p


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    return tmp_path


def _uri(transport: str, workdir: Path) -> str:
    if transport == "unix":
        return f"unix:{workdir}/mig.sock"
    return f"tcp:127.0.0.1:{free_tcp_port()}"


def _multifd(q: QemuPeer, channels: int) -> None:
    if channels:
        q.set_caps({"multifd": True})
        q.set_params(**{"multifd-channels": channels})


def _source(blob: Path, workdir: Path, name: str = "source", version: str = "10.0",
            ) -> QemuPeer:
    return QemuPeer(version, memory=MEMORY, blobs=[(blob, BLOB_ADDR)], paused=True,
                    workdir=workdir, name=name)


def _high_ram(q: QemuPeer) -> bytes:
    return q.read_memory(HIGH_RAM[0], HIGH_RAM[1] - HIGH_RAM[0])


def _snapshot_high_ram(snap: Path, workdir: Path) -> bytes:
    raw = workdir / "pc.ram.raw"
    livemig.extract(str(snap), "pc.ram", str(raw))
    data = raw.read_bytes()
    raw.unlink()
    return data[HIGH_RAM[0]:HIGH_RAM[1]]


def _one_line(e: BaseException) -> str:
    text = str(e)
    assert "\n" not in text, text
    return text


@dataclass(frozen=True)
class Scenario:
    """One of QEMU's x509 scenarios: the client's directory and hostname, the server's
    authz and verify-peer; ``error`` is a piece of the message livemig must give (None:
    the migration works)."""

    name: str
    transport: str
    client: str
    hostname: str | None = None
    authz: str | None = None
    verify_peer: bool = True
    error: str | None = None


SCENARIOS = [
    Scenario("override-host", "unix", "friendly", hostname=SERVER_NAME),
    Scenario("default-host-unix", "unix", "friendly", error="hostname"),
    Scenario("default-host-tcp", "tcp", "friendly"),
    Scenario("mismatch-host", "unix", "friendly", hostname="wrong.test", error="mismatch"),
    Scenario("friendly-client", "tcp", "friendly", authz=FRIEND),
    Scenario("hostile-client", "tcp", "hostile", authz=FRIEND, error="authz"),
    Scenario("anon-client-allowed", "tcp", "anon", verify_peer=False),
    Scenario("anon-client-refused", "tcp", "anon", error="certificate"),
    Scenario("unknown-ca", "tcp", "stranger", error="certificate"),
]


def _cases(versions: tuple[str, ...]) -> Iterator[Any]:
    for v in versions:
        for s in SCENARIOS:
            for ch in (0, 2):
                yield pytest.param(v, s, ch,
                                   id=f"{v}-{s.name}-{'multifd2' if ch else 'precopy'}")


# --------------------------------------------------------------------------------------------
# QEMU 10 -> livemig receive
# --------------------------------------------------------------------------------------------

#: What livemig says, as the server, for each failing scenario (QEMU's client checks the
#: name after the handshake, then closes without an alert).
RECEIVE_ERRORS = {
    "default-host-unix": "refused the session",
    "mismatch-host": "refused the session",
    "hostile-client": "is not in tls-authz",
    "anon-client-refused": "TLS handshake failed",
    "unknown-ca": "certificate verify failed",
}


@pytest.mark.parametrize(("version", "sc", "channels"), list(_cases(("10.0", "7.2"))))
def test_qemu_to_receive(version: str, sc: Scenario, channels: int, creds: Creds, blob: Path,
                         workdir: Path) -> None:
    uri = _uri(sc.transport, workdir)
    snap = workdir / "vm.snap"
    with _source(blob, workdir, version=version) as q:
        _multifd(q, channels)
        qemu_tls(q, "client", creds[sc.client], hostname=sc.hostname)
        expected = _high_ram(q)
        rx = ThreadedReceive(uri, snap, accept_timeout=30.0,
                             multifd_channels=channels, tls_creds=creds["friendly"],
                             tls_authz=(sc.authz,) if sc.authz else (),
                             tls_verify_peer=sc.verify_peer)
        q.migrate(rx.wait_listening())
        if sc.error is None:
            q.wait_migration(MIGRATION_TIMEOUT)
            rx.join()
            assert _snapshot_high_ram(snap, workdir) == expected
            return
        info = q.wait_migration(MIGRATION_TIMEOUT, expect=("failed",))
        with pytest.raises(livemig.MigrationError) as ei:
            rx.join()
        line = _one_line(ei.value)
        assert RECEIVE_ERRORS[sc.name] in line, line
        assert info["status"] == "failed"
        assert q.is_running()
        assert q.status()["status"] in ("prelaunch", "paused"), q.status()
        assert not snap.exists()
        assert not list(workdir.glob("vm.snap*")), list(workdir.iterdir())


# --------------------------------------------------------------------------------------------
# livemig send -> QEMU 10
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Snapshot:
    path: Path
    ram: bytes  # the source's guest RAM over HIGH_RAM


@pytest.fixture(scope="module")
def snapshot(blob: Path, tmp_path_factory: pytest.TempPathFactory) -> Snapshot:
    d = tmp_path_factory.mktemp("snap")
    snap = d / "vm.snap"
    with _source(blob, d) as q:
        ram = _high_ram(q)
        rx = ThreadedReceive(f"unix:{d}/in.sock", snap, accept_timeout=30.0)
        q.migrate(rx.wait_listening())
        q.wait_migration(MIGRATION_TIMEOUT)
        rx.join()
    return Snapshot(snap, ram)


#: What livemig says, as the client, for each failing scenario.
SEND_ERRORS = {
    "default-host-unix": "needs a tls-hostname",
    "mismatch-host": "Hostname mismatch",
    "hostile-client": "refused this side's client certificate",
    "anon-client-refused": "refused this side's client certificate",
    "unknown-ca": "certificate verify failed",
}


@pytest.mark.parametrize(("version", "sc", "channels"), list(_cases(("10.0",))))
def test_send_to_qemu(version: str, sc: Scenario, channels: int, creds: Creds, snapshot: Snapshot,
                      workdir: Path) -> None:
    uri = _uri(sc.transport, workdir)
    with QemuPeer(version, memory=MEMORY, incoming="defer", paused=False, workdir=workdir,
                  name="dest") as q:
        _multifd(q, channels)
        qemu_tls(q, "server", creds["friendly"], authz=sc.authz, verify_peer=sc.verify_peer)
        q.migrate_incoming(uri)
        kwargs: dict[str, Any] = {"multifd_channels": channels,
                                  "tls_creds": creds[sc.client], "tls_hostname": sc.hostname}
        if sc.error is None:
            livemig.send(str(snapshot.path), uri, **kwargs)
            assert _high_ram(q) == snapshot.ram
            return
        with pytest.raises(livemig.MigrationError) as ei:
            livemig.send(str(snapshot.path), uri, **kwargs)
        line = _one_line(ei.value)
        assert SEND_ERRORS[sc.name] in line, line


# --------------------------------------------------------------------------------------------
# Plain text against TLS
# --------------------------------------------------------------------------------------------


def test_plain_source_to_tls_receive(creds: Creds, blob: Path, workdir: Path) -> None:
    """A QEMU without TLS against ``livemig receive --tls-creds``: one line each side."""
    uri = _uri("unix", workdir)
    snap = workdir / "vm.snap"
    rx = LivemigReceive(["receive", uri, "-o", str(snap), "--tls-creds", creds["friendly"],
                         "--accept-timeout", "20"], workdir, uri)
    with _source(blob, workdir) as q:
        q.migrate(rx.wait_listening())
        info = q.wait_migration(MIGRATION_TIMEOUT, expect=("failed",))
        r = rx.wait(20)
        lines = [x for x in r.stderr.splitlines() if x.strip() and "waiting for" not in x]
        assert r.rc == 1 and len(lines) == 1, r.stderr
        assert "TLS handshake failed" in lines[0] and "does the source use TLS" in lines[0], \
            lines[0]
        assert info.get("error-desc"), info
        assert q.is_running()
    assert not snap.exists()


def test_tls_send_to_plain_qemu(snapshot: Snapshot, workdir: Path, creds: Creds) -> None:
    """``livemig send --tls-creds`` against a QEMU without TLS: a one-line error."""
    uri = _uri("unix", workdir)
    with QemuPeer("10.0", memory=MEMORY, incoming=uri, paused=False, workdir=workdir,
                  name="dest") as q:
        with pytest.raises(livemig.MigrationError) as ei:
            livemig.send(str(snapshot.path), uri, tls_creds=creds["friendly"],
                         tls_hostname=SERVER_NAME)
        line = _one_line(ei.value)
        assert "TLS handshake failed" in line, line
        assert q.wait_exit() != 0  # QEMU refuses the stream too (and exits, as always)


def test_dn_format() -> None:
    """The client DN in tls-authz is written as QEMU (GnuTLS) writes it: in the
    certificate's order."""
    from livemig.io.tls import distinguished_name
    cert = {"subject": ((("organizationName", "livemig tests"),),
                        (("commonName", "a,b"),))}
    assert distinguished_name(cert) == "O=livemig tests,CN=a\\,b"


# --------------------------------------------------------------------------------------------
# relay: each hop its own TLS
# --------------------------------------------------------------------------------------------


class _ThreadedRelay:
    """:func:`livemig.relay` in a thread (its error re-raised by :meth:`join`)."""

    def __init__(self, listen: str, dest: str, **kwargs: Any) -> None:
        import threading
        self.listening = threading.Event()
        self.address = ""
        self.error: BaseException | None = None

        def on_listening(addr: str) -> None:
            self.address = addr
            self.listening.set()

        def run() -> None:
            try:
                livemig.relay(listen, dest, on_listening=on_listening, accept_timeout=30.0,
                              **kwargs)
            except BaseException as e:  # noqa: BLE001 - re-raised by join()
                self.error = e
            finally:
                self.listening.set()

        self.thread = threading.Thread(target=run, name="livemig-relay", daemon=True)
        self.thread.start()

    def join(self, timeout: float = 60.0) -> None:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), f"livemig.relay still running after {timeout}s"
        if self.error is not None:
            raise self.error


@pytest.mark.parametrize("tls_hop", ["in", "out"])
def test_relay_tls_one_hop(tls_hop: str, creds: Creds, blob: Path, workdir: Path) -> None:
    """QEMU 10 -> relay -> QEMU 10, TLS on one hop, plain multifd on the other."""
    in_uri, out_uri = f"unix:{workdir}/in.sock", f"tcp:127.0.0.1:{free_tcp_port()}"
    with _source(blob, workdir) as a, \
            QemuPeer("10.0", memory=MEMORY, incoming="defer", paused=False, workdir=workdir,
                     name="dest") as b:
        expected = _high_ram(a)
        a.set_caps({"return-path": True})
        _multifd(a, 2)
        _multifd(b, 2)
        kwargs: dict[str, Any] = {"in_multifd_channels": 2, "out_multifd_channels": 2}
        if tls_hop == "in":
            qemu_tls(a, "client", creds["friendly"], hostname=SERVER_NAME)
            kwargs.update(in_tls_creds=creds["friendly"], in_tls_authz=(FRIEND,))
        else:
            qemu_tls(b, "server", creds["friendly"], authz=FRIEND)
            kwargs.update(out_tls_creds=creds["friendly"])  # checks 127.0.0.1
        b.migrate_incoming(out_uri)
        relay = _ThreadedRelay(in_uri, out_uri, **kwargs)
        assert relay.listening.wait(30) and relay.address, relay.error
        a.migrate(relay.address)
        a.wait_migration(MIGRATION_TIMEOUT)
        relay.join()
        assert _high_ram(b) == expected


@pytest.mark.parametrize(("channels", "compression"), [(0, "none"), (2, "zstd")])
def test_livemig_send_to_livemig_receive(channels: int, compression: str, creds: Creds,
                                         snapshot: Snapshot, workdir: Path) -> None:
    """Both of livemig's sides at once (no QEMU): the same RAM arrives, compressed or not."""
    uri = f"unix:{workdir}/mig.sock"
    out = workdir / "copy.snap"
    rx = ThreadedReceive(uri, out, accept_timeout=30.0, multifd_channels=channels,
                         multifd_compression=compression, tls_creds=creds["friendly"],
                         tls_authz=(FRIEND,))
    rx.wait_listening()
    livemig.send(str(snapshot.path), uri, multifd_channels=channels,
                 multifd_compression=compression, tls_creds=creds["friendly"],
                 tls_hostname=SERVER_NAME)
    rx.join()
    assert _snapshot_high_ram(out, workdir) == snapshot.ram


def test_tls_source_to_plain_receive(creds: Creds, blob: Path, workdir: Path) -> None:
    """The reverse: a QEMU with TLS against a plain ``livemig receive``."""
    uri = _uri("unix", workdir)
    snap = workdir / "vm.snap"
    rx = LivemigReceive(["receive", uri, "-o", str(snap), "--accept-timeout", "20"], workdir,
                        uri)
    with _source(blob, workdir) as q:
        qemu_tls(q, "client", creds["friendly"], hostname=SERVER_NAME)
        q.migrate(rx.wait_listening())
        q.wait_migration(MIGRATION_TIMEOUT, expect=("failed",))
        r = rx.wait(20)
        lines = [x for x in r.stderr.splitlines() if x.strip() and "waiting for" not in x]
        assert r.rc == 1 and len(lines) == 1, r.stderr
        assert "the source speaks TLS" in lines[0], lines[0]
        assert q.is_running()
    assert not snap.exists()
