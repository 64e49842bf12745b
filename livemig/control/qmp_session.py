"""One QMP client's protocol state: the greeting, capabilities negotiation, commands.

Pure: no sockets, threads or clocks. The server feeds it what
:class:`~livemig.control.qmp_json.QmpInputParser` produced and sends back
what it returns; command handlers run inside :meth:`QmpSession.handle`.

Every reply has the shape, the key order and, where QEMU's is fixed, the text
of QEMU 10's (``monitor/qmp.c``, ``qapi/qmp-dispatch.c``, ``qapi/qmp-registry.c``):
``{"return": R, "id": I}`` and ``{"id": I, "error": {"class", "desc"}}``, with
``id`` echoed whatever its JSON type (``null`` included) and left out when the
request had none.

The run states and what each accepts (a command not in the table of the
current state gets QEMU's CommandNotFound text for that state):

================  ==========================================  ===============
state             commands                                    next
================  ==========================================  ===============
NEGOTIATION       ``qmp_capabilities``                        COMMAND
COMMAND           the command table and the built-ins;        COMMAND
                  ``qmp_capabilities`` is refused
================  ==========================================  ===============
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from enum import Enum
from typing import Any

from livemig.control.qmp_json import InputTooLarge, Message, ParsedItem, ParseFailure
from livemig.errors import ConfigError

Handler = Callable[[dict[str, Any]], Any]


class QmpError(Exception):
    """Raised by a command handler: the client gets ``{"error": {"class", "desc"}}``.

    ``error_class`` is one of QEMU's QapiErrorClass names (``GenericError``,
    ``CommandNotFound``, ``DeviceNotActive``, ``DeviceNotFound``,
    ``KVMMissingCap``); clients such as libvirt branch on it, so keep QEMU's.
    """

    def __init__(self, desc: str, error_class: str = "GenericError") -> None:
        super().__init__(desc)
        self.desc = desc
        self.error_class = error_class


class SessionState(Enum):
    NEGOTIATION = "capabilities negotiation"
    COMMAND = "command mode"


#: The capabilities a client may enable with qmp_capabilities (QAPI QMPCapability).
QMP_CAPABILITIES = ("oob",)

_NO_ID = object()

_JSON_TYPE_NAMES = {
    "string": (str,),
    "integer": (int,),
    "number": (int, float),
    "boolean": (bool,),
    "object": (dict,),
    "array": (list,),
}


def check_arguments(arguments: Mapping[str, Any], schema: Mapping[str, str]) -> None:
    """Check a command's arguments the way QEMU's generated code does, with its texts.

    ``schema`` maps member names to ``string``, ``integer``, ``number``,
    ``boolean``, ``object``, ``array`` or ``any``; a leading ``*`` marks an
    optional member, as in QAPI (``{"uri": "string", "*detach": "boolean"}``).
    Members are checked in schema order (missing, then type), unknown members
    last, so the first complaint is the one QEMU would make.
    """
    for spec, type_name in schema.items():
        name = spec.removeprefix("*")
        if name not in arguments:
            if not spec.startswith("*"):
                raise QmpError(f"Parameter '{name}' is missing")
            continue
        if type_name == "any":
            continue
        value = arguments[name]
        wrong_bool = isinstance(value, bool) and type_name in ("integer", "number")
        if wrong_bool or not isinstance(value, _JSON_TYPE_NAMES[type_name]):
            raise QmpError(f"Invalid parameter type for '{name}', expected: {type_name}")
    known = {spec.removeprefix("*") for spec in schema}
    for name in arguments:
        if name not in known:
            raise QmpError(f"Parameter '{name}' is unexpected")


class QmpSession:
    """The protocol of one connection, from greeting to the last reply.

    ``commands`` is the server's table; ``query-version`` and
    ``query-commands`` are built in unless the table has its own, and
    ``qmp_capabilities`` is always the session's (negotiation is its state).
    """

    def __init__(self, commands: Mapping[str, Handler], version: tuple[int, int, int],
                 package: str) -> None:
        if "qmp_capabilities" in commands:
            raise ConfigError("the QMP command table must not define qmp_capabilities "
                              "(the server negotiates capabilities itself)")
        major, minor, micro = version
        self._version = {"qemu": {"micro": micro, "minor": minor, "major": major},
                         "package": package}
        builtins: dict[str, Handler] = {
            "query-version": self._query_version,
            "query-commands": self._query_commands,
        }
        self._commands: dict[str, Handler] = {**builtins, **commands,
                                              "qmp_capabilities": self._qmp_capabilities}
        self.state = SessionState.NEGOTIATION
        self.oob = False

    @property
    def negotiated(self) -> bool:
        """True once events may be sent (QEMU sends none before qmp_capabilities)."""
        return self.state is SessionState.COMMAND

    def greeting(self) -> dict[str, Any]:
        return {"QMP": {"version": self._version, "capabilities": list(QMP_CAPABILITIES)}}

    def handle(self, item: ParsedItem) -> dict[str, Any]:
        """The reply to one parsed item (every item gets exactly one)."""
        if isinstance(item, (ParseFailure, InputTooLarge)):
            return _error(_NO_ID, "GenericError", item.desc)
        assert isinstance(item, Message)
        request = item.value
        if not isinstance(request, dict):
            return _error(_NO_ID, "GenericError", "QMP input must be a JSON object")
        req_id = request.get("id", _NO_ID)
        try:
            return _success(req_id, self._dispatch(request))
        except QmpError as e:
            return _error(req_id, e.error_class, e.desc)
        except Exception as e:  # noqa: BLE001 - a handler's bug is the client's error reply
            return _error(req_id, "GenericError", str(e) or type(e).__name__)

    def _dispatch(self, request: dict[str, Any]) -> Any:
        # qmp_dispatch_check_obj: members in the order the client wrote them.
        for member, value in request.items():
            if member == "execute" or (member == "exec-oob" and self.oob):
                if not isinstance(value, str):
                    raise QmpError(f"QMP input member '{member}' must be a string")
            elif member == "arguments":
                if not isinstance(value, dict):
                    raise QmpError("QMP input member 'arguments' must be an object")
            elif member != "id":
                raise QmpError(f"QMP input member '{member}' is unexpected")
        if "execute" in request and "exec-oob" in request:
            raise QmpError("QMP input member 'execute' clashes with 'exec-oob'")
        oob = "exec-oob" in request
        name = request["exec-oob"] if oob else request.get("execute")
        if name is None:
            raise QmpError("QMP input lacks member 'execute'")
        handler = self._commands.get(name)
        if self.state is SessionState.NEGOTIATION and name != "qmp_capabilities":
            raise QmpError("Expecting capabilities negotiation with 'qmp_capabilities'",
                           "CommandNotFound")
        if handler is None:
            raise QmpError(f"The command {name} has not been found", "CommandNotFound")
        if oob:
            raise QmpError(f"The command {name} does not support OOB")
        return handler(request.get("arguments", {}))

    # ---- built-in commands ----------------------------------------------------------------

    def _qmp_capabilities(self, arguments: dict[str, Any]) -> None:
        if self.state is not SessionState.NEGOTIATION:
            raise QmpError("Capabilities negotiation is already complete, command ignored",
                           "CommandNotFound")
        check_arguments(arguments, {"*enable": "array"})
        enable = arguments.get("enable", [])
        for i, cap in enumerate(enable):
            if not isinstance(cap, str):
                raise QmpError(f"Invalid parameter type for 'enable[{i}]', expected: string")
            if cap not in QMP_CAPABILITIES:
                # QEMU 10's words, 'null' included (the list element has no name).
                raise QmpError(f"Parameter 'null' does not accept value '{cap}'")
        self.oob = "oob" in enable
        self.state = SessionState.COMMAND

    def _query_version(self, arguments: dict[str, Any]) -> dict[str, Any]:
        check_arguments(arguments, {})
        return self._version

    def _query_commands(self, arguments: dict[str, Any]) -> list[dict[str, str]]:
        check_arguments(arguments, {})
        return [{"name": name} for name in self._commands]


def _success(req_id: object, value: Any) -> dict[str, Any]:
    reply: dict[str, Any] = {"return": {} if value is None else value}
    if req_id is not _NO_ID:
        reply["id"] = req_id
    return reply


def _error(req_id: object, error_class: str, desc: str) -> dict[str, Any]:
    reply: dict[str, Any] = {} if req_id is _NO_ID else {"id": req_id}
    reply["error"] = {"class": error_class, "desc": desc}
    return reply
