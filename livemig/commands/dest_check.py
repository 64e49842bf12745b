"""What livemig knows and asks about a QEMU destination, for ``send`` and ``relay``.

With ``--dest-qmp``, a mismatch livemig can see (machine type, RAM size,
capabilities) is refused with a plain message before any byte is sent, and the
capabilities and parameters that must match are set; after a failure, QEMU's
own ``error-desc`` is added to the message. Advice names only what the
destination can do: a machine type is suggested only if the destination QEMU
has it (``query-machines``). Without a monitor, a failure says what livemig
knows of the stream and that ``--dest-qmp`` would tell more.
"""

from __future__ import annotations

import re
import time

from livemig.errors import (
    ConfigError,
    MigrationError,
    PeerError,
    TlsSessionRefused,
    TransportError,
)
from livemig.io.qmp_peer import QmpPeer
from livemig.io.uri import Uri
from livemig.migration.destination.loader import LoadResult
from livemig.wire.constants import MultifdCompression

#: Seconds to wait, after a failed transfer, for the destination's query-migrate to say
#: 'failed' (QEMU notices a broken stream a moment after livemig does).
FAILURE_REASON_WAIT = 3.0

#: Machine types of the same family listed in advice at most.
MAX_SUGGESTED_MACHINES = 3


def preflight(qmp: QmpPeer, load: LoadResult, uri: Uri, channels: int,
              comp: MultifdCompression) -> None:
    """All of ``send``'s checks and preparation, before it connects."""
    cfg = load.configuration
    assert cfg is not None
    check_machine(qmp, cfg.machine, "snapshot")
    check_ram(qmp, {b.name: b.length for b in load.blocks}, "snapshot")
    prepare_incoming(qmp, uri, channels, comp)


def _machine_names(qmp: QmpPeer) -> list[str] | None:
    """The machine types (and aliases) the destination QEMU has; None if it cannot say."""
    try:
        listed = qmp.cmd_list("query-machines")
    except PeerError:
        return None
    names: list[str] = []
    for m in listed:
        if isinstance(m, dict):
            names += [v for k in ("name", "alias") if isinstance(v := m.get(k), str)]
    return names


def _version_key(name: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", name))


def check_machine(qmp: QmpPeer, machine: str, what: str) -> None:
    """The destination must run ``machine`` (QEMU compares the received name as a prefix of
    its own: strncmp over the received length)."""
    major, minor = qmp.version()
    running = qmp.machine_type()
    if running.startswith(machine):
        return
    head = (f"the {what} is for machine type {machine}, but the destination QEMU "
            f"{major}.{minor} runs {running}")
    names = _machine_names(qmp)
    if names is None or any(n.startswith(machine) for n in names):
        raise ConfigError(f"{head}; start it with -M {machine}")
    family = re.sub(r"-?\d+(\.\d+)*$", "", machine)
    same = sorted({n for n in names if family and n.startswith(family + "-")
                   and re.search(r"\d", n[len(family):])}, key=_version_key, reverse=True)
    has = (f" (its newest {family} types: {', '.join(same[:MAX_SUGGESTED_MACHINES])}"
           f"{', ...' if len(same) > MAX_SUGGESTED_MACHINES else ''})") if same else ""
    raise ConfigError(f"{head}, and QEMU {major}.{minor} has no machine type {machine}{has}: "
                      f"migrate to a QEMU that has {machine}")


def check_ram(qmp: QmpPeer, ram: dict[str, int], what: str) -> None:
    mem = qmp.cmd_object("query-memory-size-summary")
    base = mem.get("base-memory", 0)
    if not isinstance(base, int) or isinstance(base, bool):
        raise qmp.unexpected("query-memory-size-summary", mem,
                             'an object with "base-memory": INT')
    if "pc.ram" in ram and base and base != ram["pc.ram"]:
        raise ConfigError(f"the {what} has {ram['pc.ram'] >> 20} MiB of RAM (pc.ram), the "
                          f"destination {base >> 20} MiB; start it with -m "
                          f"{ram['pc.ram'] >> 20}M")


def prepare_incoming(qmp: QmpPeer, uri: Uri, channels: int, comp: MultifdCompression) -> None:
    """A fresh destination: the capabilities and parameters that must match, then
    ``migrate-incoming`` (unless it was started with ``-incoming URI``)."""
    major, minor = qmp.version()
    status = qmp.cmd_object("query-migrate").get("status")
    if status in ("active", "completed", "failed"):
        raise ConfigError(f"the destination's migration state is '{status}'; it needs a fresh "
                          "QEMU started with -incoming")
    listed = qmp.cmd_list("query-migrate-capabilities")
    caps: dict[str, bool] = {}
    for c in listed:
        if not (isinstance(c, dict) and isinstance(c.get("capability"), str)
                and isinstance(c.get("state"), bool)):
            raise qmp.unexpected("query-migrate-capabilities", c,
                                 'entries {"capability": STRING, "state": BOOL}')
        caps[c["capability"]] = c["state"]
    want = {"multifd": bool(channels), "mapped-ram": False, "x-ignore-shared": False,
            "postcopy-ram": False}
    change = [{"capability": k, "state": v} for k, v in want.items()
              if k in caps and caps[k] != v]
    if change:
        qmp.cmd("migrate-set-capabilities", capabilities=change)
    if channels:
        qmp.cmd("migrate-set-parameters", **{"multifd-channels": channels,
                                              "multifd-compression": comp.value})
    args: dict[str, object] = {"uri": str(uri)}
    if (major, minor) >= (9, 1):
        # keep the destination alive after a failed load, so its error can be read
        args["exit-on-error"] = False
    try:
        qmp.cmd("migrate-incoming", **args)
    except PeerError as e:
        if "already" not in str(e).lower() and "incoming" not in str(e).lower():
            raise


def qmp_failure_reason(qmp: QmpPeer | None) -> str:
    """QEMU's own error-desc ("; QEMU says: ..."), which says more than a closed channel
    does; "" when there is no monitor or it does not report a failure."""
    if qmp is None:
        return ""
    deadline = time.monotonic() + FAILURE_REASON_WAIT
    while time.monotonic() < deadline:
        try:
            err = qmp.migration_error()
        except MigrationError:
            return ""
        if err:
            return f"; QEMU says: {err}"
        time.sleep(0.1)
    return ""


def explain_destination_failure(first: BaseException, qmp: QmpPeer | None,
                                known: str, *, connected: bool) -> MigrationError | None:
    """A clearer error for a transfer the destination ended, or None to keep ``first``.

    With a monitor: ``first`` plus QEMU's own reason. Without one: ``first`` plus what
    livemig knows of the stream (``known``: machine type, RAM) and that ``--dest-qmp``
    would check the destination first and report QEMU's reason. A destination that was
    never reached (``connected`` false) gets no such guess."""
    if not isinstance(first, (TransportError, PeerError)) or isinstance(first,
                                                                          TlsSessionRefused):
        return None  # (a refused TLS session is not about the VM)
    if qmp is not None:
        reason = qmp_failure_reason(qmp)
        return PeerError(str(first) + reason) if reason else None
    if not connected:
        return None
    return PeerError(f"{first}; {known}: is the destination QEMU started with the same "
                     "machine type, RAM and devices? (--dest-qmp ADDRESS lets livemig check "
                     "the destination before sending and report QEMU's own reason)")
