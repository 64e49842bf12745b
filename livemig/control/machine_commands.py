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


_QAPI_TYPES: dict[type, str] = {str: "string", int: "integer", bool: "boolean",
                                list: "array", dict: "object"}


def _object(value: object, path: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise QmpError(f"Invalid parameter type for '{path}', expected: object")
    return value


def _member(obj: dict[str, Any], path: str, name: str, kind: type) -> Any:
    """A mandatory member, checked as QEMU's QAPI input visitor checks it (its texts
    name the member by its full path: ``channels[0].addr.host``)."""
    full = f"{path}.{name}"
    if name not in obj:
        raise QmpError(f"Parameter '{full}' is missing")
    value = obj[name]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise QmpError(f"Invalid parameter type for '{full}', expected: {_QAPI_TYPES[kind]}")
    return value


def _enum(obj: dict[str, Any], path: str, name: str, values: tuple[str, ...]) -> str:
    value: str = _member(obj, path, name, str)
    if value not in values:
        raise QmpError(f"Parameter '{path}.{name}' does not accept value '{value}'")
    return value


def _only(obj: dict[str, Any], path: str, names: tuple[str, ...]) -> None:
    for name in obj:
        if name not in names:
            raise QmpError(f"Parameter '{path}.{name}' is unexpected")


#: QEMU 10's MigrationAddress transports and SocketAddress types (qapi/migration.json,
#: qapi/sockets.json); livemig migrates over the socket ones it listed.
_TRANSPORTS = ("socket", "exec", "rdma", "file")
_SOCKET_TYPES = ("inet", "unix", "vsock", "fd")


def _channel_uri(chans: list[Any]) -> str:
    """QEMU 9's ``channels``: checked member by member with QEMU's texts, then the
    one ``main`` socket channel livemig takes, as a URI."""
    uri: str | None = None
    for i, raw in enumerate(chans):
        path = f"channels[{i}]"
        chan = _object(raw, path)
        ctype = _enum(chan, path, "channel-type", ("main", "cpr"))
        addr = _object(_member(chan, path, "addr", dict), f"{path}.addr")
        _only(chan, path, ("channel-type", "addr"))
        apath = f"{path}.addr"
        transport = _enum(addr, apath, "transport", _TRANSPORTS)
        if ctype != "main" or uri is not None:
            raise QmpError("livemig takes exactly one 'main' channel")
        if transport != "socket":
            raise QmpError(f"channel transport '{transport}' is not supported by livemig "
                           "(socket inet or unix only)")
        kind = _enum(addr, apath, "type", _SOCKET_TYPES)
        if kind == "inet":
            host = _member(addr, apath, "host", str)
            port = _member(addr, apath, "port", str)  # QAPI's InetSocketAddress: a string
            uri = f"tcp:{host}:{port}"
        elif kind == "unix":
            uri = f"unix:{_member(addr, apath, 'path', str)}"
        else:
            raise QmpError(f"socket address type '{kind}' is not supported by livemig "
                           "(inet or unix only)")
    if uri is None:
        raise QmpError("livemig takes exactly one 'main' channel")
    return uri


def _migrate_uri(args: dict[str, Any]) -> str:
    """``migrate``'s destination: ``uri``, or QEMU 9+'s one-entry ``channels`` list."""
    # QEMU 10's schema: 'blk' and 'inc' (block migration) were removed in QEMU 9.1
    _args(args, {}, {"uri": str, "channels": list, "detach": bool, "resume": bool})
    if args.get("resume"):
        raise QmpError("migrate resume (postcopy recovery) is not supported by livemig")
    return _uri_or_channels(args)


def _uri_or_channels(args: dict[str, Any]) -> str:
    if ("uri" in args) == ("channels" in args):
        raise QmpError("need either 'uri' or 'channels' argument")
    if "uri" in args:
        return str(args["uri"])
    return _channel_uri(args["channels"])


def _migrate_incoming_uri(args: dict[str, Any]) -> str:
    _args(args, {}, {"uri": str, "channels": list, "exit-on-error": bool})
    return _uri_or_channels(args)


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
        "migrate-incoming": _wrap(lambda a: ctl.migrate_incoming(_migrate_incoming_uri(a))),
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
