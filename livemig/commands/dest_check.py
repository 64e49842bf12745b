"""``--dest-qmp``: check and prepare a QEMU destination before any byte is sent.

A mismatch livemig can see (machine type, RAM size, capabilities) is refused
with a plain message; the capabilities and parameters that must match are set.
"""

from __future__ import annotations

from livemig.errors import ConfigError, PeerError
from livemig.io.qmp_peer import QmpPeer
from livemig.io.uri import Uri
from livemig.migration.destination.loader import LoadResult
from livemig.wire.constants import MultifdCompression


def preflight(qmp: QmpPeer, load: LoadResult, uri: Uri, channels: int,
              comp: MultifdCompression) -> None:
    cfg = load.configuration
    assert cfg is not None
    major, minor = qmp.version()
    machine = qmp.machine_type()
    # QEMU compares the received name as a prefix of its own (strncmp over its length).
    if not machine.startswith(cfg.machine):
        raise ConfigError(f"the snapshot is for machine type {cfg.machine}, but the destination "
                          f"QEMU {major}.{minor} runs {machine}; start it with -M {cfg.machine}")
    mem = qmp.cmd_object("query-memory-size-summary")
    base = mem.get("base-memory", 0)
    if not isinstance(base, int) or isinstance(base, bool):
        raise qmp.unexpected("query-memory-size-summary", mem,
                             'an object with "base-memory": INT')
    ram = {b.name: b.length for b in load.blocks}
    if "pc.ram" in ram and base and base != ram["pc.ram"]:
        raise ConfigError(f"the snapshot has {ram['pc.ram'] >> 20} MiB of RAM (pc.ram), the "
                          f"destination {base >> 20} MiB; start it with -m "
                          f"{ram['pc.ram'] >> 20}M")
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
