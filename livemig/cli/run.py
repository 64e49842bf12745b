"""``livemig run``: a livemig machine in this process, the way qemu-system runs one.

The process lives until QMP ``quit``, SIGTERM or Ctrl-C. With ``--incoming``
it waits for a migration (``defer``: until QMP ``migrate-incoming``),
otherwise the machine runs at once (``-S``: paused, like QEMU).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING

from livemig.errors import ConfigError
from livemig.io.uri import parse_size

if TYPE_CHECKING:
    from livemig.control.qmp_server import QmpServer

#: How often the main thread looks at the quit flag and the incoming migration.
POLL_SECONDS = 0.1


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    r = sub.add_parser(
        "run", help="run a livemig machine with a QMP control socket",
        description="Run a machine hosted by livemig (guest RAM + Python devices) with a "
                    "QMP-compatible control socket, the way qemu-system-x86_64 runs a VM. "
                    "Drive it with the QMP commands QEMU has: migrate, migrate-incoming, "
                    "query-migrate, migrate-set-capabilities/-parameters, stop, cont, quit.",
        epilog="Example: livemig run --memory 1G --incoming defer --qmp unix:/tmp/dst.qmp & "
               "livemig run --memory 1G --workload dirty-pages --qmp unix:/tmp/src.qmp")
    r.add_argument("--memory", "-m", default="512M", metavar="SIZE",
                   help="guest RAM size (block pc.ram), e.g. 512M, 4G (default 512M)")
    r.add_argument("--workload", choices=["none", "dirty-pages"], default="none",
                   help="built-in workload: dirty-pages increments a byte in every page, "
                        "again and again, and is checked after a migration")
    r.add_argument("--workload-rate", default="64M", metavar="BYTES_PER_S",
                   help="how fast the workload dirties pages (default 64M per second; "
                        "0 = as fast as it can)")
    r.add_argument("--workload-workers", type=int, default=1, metavar="N")
    r.add_argument("--fill", choices=["zero", "random"], default="zero",
                   help="initial RAM contents (random: every page has data)")
    r.add_argument("--qmp", metavar="unix:PATH|tcp:HOST:PORT",
                   help="QMP control socket (server)")
    r.add_argument("--incoming", metavar="defer|URI",
                   help="wait for an incoming migration on URI (or, with 'defer', "
                        "for QMP migrate-incoming)")
    r.add_argument("-S", dest="paused", action="store_true",
                   help="do not start the machine (QEMU's -S); also: stay paused after an "
                        "incoming migration")
    r.add_argument("--dirty-tracking", choices=["software", "kernel"], default="software",
                   help="how writes to guest RAM are tracked during migration: software "
                        "(writes through livemig helpers) or kernel (uffd-wp + PAGEMAP_SCAN, "
                        "any writer)")
    r.add_argument("--vhost-user", action="append", default=[], metavar="SOCKET",
                   help="add a vhost-user device whose back-end listens on SOCKET (its state "
                        "migrates with the machine); may be repeated")
    add_vfio_options(r, "add N vfio-sim devices (simulated VFIO devices with device memory "
                        "that changes while the machine runs)")
    r.add_argument("--print-ready", action="store_true",
                   help="print one JSON line on stdout once the QMP socket listens")


def add_vfio_options(p: argparse.ArgumentParser, devices_help: str) -> None:
    """The vfio-sim options ``run`` and ``demo`` share (``demo`` passes them on)."""
    p.add_argument("--vfio-devices", type=int, default=0, metavar="N", help=devices_help)
    p.add_argument("--vfio-state-size", default="64M", metavar="SIZE",
                   help="device memory of each vfio-sim device (default 64M)")
    p.add_argument("--vfio-precopy", choices=["on", "off"], default="on",
                   help="vfio-sim devices support PRE_COPY (default on: most state moves while "
                        "the machine runs); off: all of it moves at switchover")
    p.add_argument("--device-state-transfer", choices=["main", "multifd", "auto"],
                   default="auto",
                   help="how vfio-sim state moves at switchover: on the main channel, or as "
                        "multifd device-state packets (QEMU's x-migration-multifd-transfer; "
                        "auto = multifd when multifd is on)")


def vfio_arguments(args: argparse.Namespace) -> list[str]:
    """Those options as ``livemig run`` arguments (none without devices)."""
    if not args.vfio_devices:
        return []
    return ["--vfio-devices", str(args.vfio_devices), "--vfio-state-size", args.vfio_state_size,
            "--vfio-precopy", args.vfio_precopy,
            "--device-state-transfer", args.device_state_transfer]


def cmd_run(args: argparse.Namespace) -> int:
    from livemig.control.machine_commands import machine_commands
    from livemig.control.qmp_server import QmpServer
    from livemig.engine.controller import MachineController
    from livemig.engine.machine import Machine
    from livemig.engine.workload import DirtyPagesWorkload

    memory = parse_size(args.memory, "--memory")
    rate = parse_size(args.workload_rate, "--workload-rate")
    machine = Machine(memory)
    server: QmpServer | None = None
    ctl: MachineController | None = None
    try:
        if args.fill == "random":
            machine.blocks["pc.ram"].fill_random(0)
        if args.workload == "dirty-pages":
            machine.add_device(DirtyPagesWorkload(machine, rate=rate or None,
                                                  workers=args.workload_workers,
                                                  mark_dirty=args.dirty_tracking == "software"))
        for i, path in enumerate(args.vhost_user):
            from livemig.devices.vhost_user import VhostUserDevice
            machine.add_device(VhostUserDevice(path, i))
        if args.vfio_devices:
            from livemig.devices.vfio import VfioSimHandler
            size = parse_size(args.vfio_state_size, "--vfio-state-size")
            for i in range(args.vfio_devices):
                machine.add_device(VfioSimHandler(machine, i, state_size=size,
                                                  transfer=args.device_state_transfer,
                                                  source=args.incoming is None,
                                                  precopy=args.vfio_precopy == "on"))
        ctl = MachineController(machine, dirty_tracking=args.dirty_tracking,
                                incoming=args.incoming, autostart=not args.paused,
                                emit=lambda name, data: server.emit(name, data) if server else None)
        if args.qmp:
            if not args.qmp.startswith(("unix:", "tcp:")):
                raise ConfigError(f"--qmp {args.qmp!r}: a QMP server listens on unix:PATH or "
                                  "tcp:HOST:PORT")
            server = QmpServer(args.qmp, machine_commands(ctl))
            server.start()
        ctl.start()
        ready = {"qmp": server.address if server else None, "status": machine.state.value,
                 "memory": memory}
        if ctl.incoming is not None and ctl.incoming.address:
            ready["incoming"] = ctl.incoming.address
        if args.print_ready:
            print(json.dumps(ready), flush=True)
        else:
            print(f"livemig run: machine {machine.state}, {memory >> 20} MiB"
                  + (f", QMP on {server.address}" if server else ""), file=sys.stderr)
        while not ctl.quit_requested.wait(POLL_SECONDS):
            pass
        _shutdown_event(server, "host-qmp-quit")
        return 0
    except BaseException as e:
        if not isinstance(e, Exception):  # SIGTERM (unwinds as a BaseException), Ctrl-C
            _shutdown_event(server, "host-signal")
        raise
    finally:
        if ctl is not None:
            ctl.close()
        if server is not None:
            server.close()
        machine.close()


def _shutdown_event(server: QmpServer | None, reason: str) -> None:
    """QEMU's ``SHUTDOWN`` as the process ends, before a migration is cancelled
    (``qemu_system_shutdown`` runs before ``qemu_cleanup``). ``close()`` lets each
    client take it."""
    if server is not None:
        server.emit("SHUTDOWN", {"guest": False, "reason": reason})
