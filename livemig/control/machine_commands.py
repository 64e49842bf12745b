"""The QMP commands of a livemig machine: QEMU's names and argument shapes.

Each entry turns one QMP request into one :class:`MachineController` call,
checking arguments the way QEMU's generated marshallers do (a missing
argument, an unexpected one, a wrong type: ``GenericError`` with QEMU's
wording), so that a management tool sees the same errors from livemig as
from QEMU.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from livemig.control.qmp_session import Handler, QmpError
from livemig.engine.controller import MachineController
from livemig.errors import MigrationError


def _args(args: dict[str, Any], required: Mapping[str, type], optional: Mapping[str, type] = {},
          ) -> dict[str, Any]:
    for name in args:
        if name not in required and name not in optional:
            raise QmpError(f"Parameter '{name}' is unexpected")
    for name, kind in required.items():
        if name not in args:
            raise QmpError(f"Parameter '{name}' is missing")
    for name, value in args.items():
        kind = required.get(name) or optional[name]
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            want = {str: "string", int: "integer", bool: "boolean", list: "array",
                    dict: "object"}[kind]
            raise QmpError(f"Invalid parameter type for '{name}', expected: {want}")
    return args


def _wrap(fn: Callable[[dict[str, Any]], Any]) -> Handler:
    def handler(args: dict[str, Any]) -> Any:
        try:
            return fn(args)
        except MigrationError as e:
            raise QmpError(str(e)) from e
    return handler


def _migrate_uri(args: dict[str, Any]) -> str:
    """``migrate``'s destination: ``uri``, or QEMU 9+'s one-entry ``channels`` list."""
    # QEMU 10's schema: 'blk' and 'inc' (block migration) were removed in QEMU 9.1
    _args(args, {}, {"uri": str, "channels": list, "detach": bool, "resume": bool})
    if args.get("resume"):
        raise QmpError("migrate resume (postcopy recovery) is not supported by livemig")
    if "uri" in args and "channels" in args:
        raise QmpError("need either 'uri' or 'channels' argument")
    if "uri" in args:
        return str(args["uri"])
    chans = args.get("channels")
    if not chans:
        raise QmpError("need either 'uri' or 'channels' argument")
    if len(chans) != 1 or not isinstance(chans[0], dict) or \
            chans[0].get("channel-type", "main") != "main":
        raise QmpError("livemig takes exactly one 'main' channel")
    addr = chans[0].get("addr", {})
    kind = addr.get("transport")
    if kind == "socket":
        sa = addr
        if sa.get("type") == "inet":
            return f"tcp:{sa['host']}:{sa['port']}"
        if sa.get("type") == "unix":
            return f"unix:{sa['path']}"
    raise QmpError(f"channel address {addr!r} is not supported (socket inet or unix only)")


def machine_commands(ctl: MachineController) -> dict[str, Handler]:
    """The command table handed to :class:`~livemig.control.qmp_server.QmpServer`."""

    def none(fn: Callable[[], Any]) -> Handler:
        return _wrap(lambda a: (_args(a, {}), fn())[1])

    def migrate_cancel(a: dict[str, Any]) -> None:
        _args(a, {})
        ctl.migrate_cancel()

    def set_params(a: dict[str, Any]) -> None:
        ctl.migrate_set_parameters(**a)

    table: dict[str, Handler] = {
        "query-status": none(ctl.query_status),
        "stop": none(ctl.stop),
        "cont": none(ctl.cont),
        "quit": none(ctl.quit),
        "migrate": _wrap(lambda a: ctl.migrate(_migrate_uri(a))),
        "migrate-incoming": _wrap(lambda a: ctl.migrate_incoming(
            _args(a, {}, {"uri": str, "channels": list, "exit-on-error": bool}).get("uri")
            or _migrate_uri({"channels": a.get("channels")}))),
        "migrate_cancel": _wrap(migrate_cancel),
        "migrate-cancel": _wrap(migrate_cancel),
        "migrate-set-capabilities": _wrap(lambda a: ctl.migrate_set_capabilities(
            _args(a, {"capabilities": list})["capabilities"])),
        "query-migrate-capabilities": none(ctl.query_migrate_capabilities),
        "migrate-set-parameters": _wrap(set_params),
        "query-migrate-parameters": none(ctl.query_migrate_parameters),
        "query-migrate": none(ctl.query_migrate),
        "x-query-workload": none(ctl.query_workload),
        # livemig's own (x- like QEMU's unstable commands): every device's summary
        "x-query-livemig-devices": none(lambda: [d.summary() for d in ctl.machine.devices]),
    }
    return table
