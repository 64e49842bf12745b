"""Migration URIs as QEMU spells them: tcp:, unix:, exec:, file:."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TypeAlias

from livemig.errors import ConfigError


@dataclass(frozen=True)
class TcpUri:
    host: str
    port: int

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"tcp:{host}:{self.port}"


@dataclass(frozen=True)
class UnixUri:
    path: str

    def __str__(self) -> str:
        return f"unix:{self.path}"


@dataclass(frozen=True)
class ExecUri:
    command: str

    def __str__(self) -> str:
        return f"exec:{self.command}"


@dataclass(frozen=True)
class FileUri:
    path: str
    offset: int = 0

    def __str__(self) -> str:
        return f"file:{self.path}" + (f",offset={self.offset}" if self.offset else "")


Uri: TypeAlias = TcpUri | UnixUri | ExecUri | FileUri

_SUFFIX = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}

#: The largest size or offset livemig takes: a file offset (``off_t``) holds no more,
#: and no RAM size or rate comes near it.
MAX_SIZE = (1 << 63) - 1


def parse_size(text: str, what: str | None = None) -> int:
    """``4096``, ``64M``, ``1G`` (binary units, as QEMU's qemu_strtosz), at most
    :data:`MAX_SIZE`. A :class:`~livemig.errors.ConfigError` for anything else (``nan``,
    ``inf``, ``1e400``, fractions of a byte), naming ``what`` (the option) if given."""
    where = f"{what}: " if what else ""
    t = text.strip().lower().removesuffix("b").removesuffix("i")
    unit = t[-1:] if t[-1:] in _SUFFIX and not t[-1:].isdigit() else ""
    num = t[: len(t) - len(unit)] if unit else t
    value: int | float
    if num.isascii() and num.isdigit():
        value = int(num) * _SUFFIX[unit]  # exact, however many digits
    else:
        try:
            value = float(num) * _SUFFIX[unit]
        except ValueError:
            raise ConfigError(f"{where}not a size: {text!r} (examples: 4096, 64M, 1G)"
                              ) from None
        if not math.isfinite(value) or value < 0 or value != int(value):
            raise ConfigError(f"{where}not a size: {text!r} (a whole number of bytes, "
                              "for example 4096, 64M, 1G)")
    if value > MAX_SIZE:
        raise ConfigError(f"{where}{text!r} is too large (at most {MAX_SIZE})")
    return int(value)


def parse_uri(text: str) -> Uri:
    """Parse a migration URI, refusing anything QEMU would not accept either."""
    scheme, sep, rest = text.partition(":")
    if not sep or not rest:
        raise ConfigError(f"bad migration URI {text!r}: expected tcp:HOST:PORT, unix:PATH, "
                          "exec:COMMAND or file:PATH")
    if scheme == "tcp":
        if rest.startswith("//"):
            raise ConfigError(f"bad tcp URI {text!r}: QEMU's form is tcp:HOST:PORT "
                              "(no '//')")
        if rest.startswith("["):
            host, sep2, port = rest[1:].partition("]:")
        else:
            host, sep2, port = rest.rpartition(":")
        if not sep2 or not port:
            raise ConfigError(f"bad tcp URI {text!r}: expected tcp:HOST:PORT")
        try:
            port_n = int(port.split(",")[0])
        except ValueError:
            raise ConfigError(f"bad tcp URI {text!r}: port {port!r} is not a number") from None
        if not 0 <= port_n <= 65535:
            raise ConfigError(f"bad tcp URI {text!r}: port {port_n} out of range")
        return TcpUri(host or "0.0.0.0", port_n)
    if scheme == "unix":
        if len(rest.encode()) > 107:
            raise ConfigError(f"unix socket path too long ({len(rest)} bytes, at most 107): "
                              f"{rest}")
        return UnixUri(rest)
    if scheme == "exec":
        return ExecUri(rest)
    if scheme == "file":
        path, _, opts = rest.partition(",")
        offset = 0
        if opts:
            key, _, val = opts.partition("=")
            if key != "offset" or not val:
                raise ConfigError(f"bad file URI {text!r}: the only option is offset=N")
            try:
                offset = parse_size(val, "offset")
            except ConfigError as e:
                raise ConfigError(f"bad file URI {text!r}: {e}") from None
        return FileUri(path, offset)
    raise ConfigError(f"unsupported migration URI scheme {scheme!r} in {text!r} "
                      "(livemig speaks tcp:, unix:, exec: and file:)")
