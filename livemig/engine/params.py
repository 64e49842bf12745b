"""Migration capabilities and parameters, with QEMU's names and defaults.

The names are QEMU's (``qapi/migration.json``) so that management code
written for QEMU sets them unchanged; only the ones livemig's engine acts
on are accepted, and a capability or parameter QEMU has but livemig does
not implement is refused by name rather than silently ignored.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from livemig import limits
from livemig.errors import ConfigError

#: Capabilities livemig implements (value = default, as in QEMU).
CAPABILITIES: dict[str, bool] = {
    "multifd": False,
    "events": False,
    "auto-converge": False,
    "return-path": False,
}

#: Parameters livemig implements, with QEMU 10's defaults.
PARAMETERS: dict[str, Any] = {
    "multifd-channels": 2,
    "multifd-compression": "none",
    "downtime-limit": 300,  # ms
    "max-bandwidth": 128 << 20,  # bytes/s; QEMU's MAX_THROTTLE; 0 = no limit here
    "avail-switchover-bandwidth": 0,  # bytes/s; 0 = use the measured bandwidth
    "cpu-throttle-initial": 20,
    "cpu-throttle-increment": 10,
    "max-cpu-throttle": 99,
    "throttle-trigger-threshold": 50,
}

_INT_RANGES: dict[str, tuple[int, int]] = {
    "multifd-channels": (1, limits.MAX_MULTIFD_CHANNELS),
    "downtime-limit": (0, 2_000_000),
    "max-bandwidth": (0, 1 << 62),
    "avail-switchover-bandwidth": (0, 1 << 62),
    "cpu-throttle-initial": (1, 99),
    "cpu-throttle-increment": (1, 100),
    "max-cpu-throttle": (1, 99),
    "throttle-trigger-threshold": (1, 100),
}

@dataclass
class MigrationSettings:
    capabilities: dict[str, bool] = field(default_factory=lambda: dict(CAPABILITIES))
    parameters: dict[str, Any] = field(default_factory=lambda: dict(PARAMETERS))

    def set_capabilities(self, caps: list[dict[str, Any]]) -> None:
        """QMP ``migrate-set-capabilities``: ``[{"capability": name, "state": bool}]``."""
        staged = dict(self.capabilities)
        for c in caps:
            if not isinstance(c, dict) or set(c) != {"capability", "state"}:
                raise ConfigError(f"a capability is {{'capability': NAME, 'state': BOOL}}, "
                                  f"not {c!r}")
            name, state = c["capability"], c["state"]
            if name not in CAPABILITIES:
                raise ConfigError(f"capability {name!r} is not supported by livemig")
            if not isinstance(state, bool):
                raise ConfigError(f"capability {name}: state must be a boolean")
            staged[name] = state
        self.capabilities = staged

    def set_parameters(self, params: dict[str, Any]) -> None:
        """QMP ``migrate-set-parameters``: all or nothing, checked like QEMU checks them."""
        staged = dict(self.parameters)
        for name, value in params.items():
            if name not in PARAMETERS:
                raise ConfigError(f"parameter {name!r} is not supported by livemig")
            if name == "multifd-compression":
                if value not in ("none", "zlib", "zstd"):
                    raise ConfigError(f"multifd-compression {value!r}: none, zlib or zstd")
            else:
                lo, hi = _INT_RANGES[name]
                if not isinstance(value, int) or isinstance(value, bool) or \
                        not lo <= value <= hi:
                    raise ConfigError(f"Parameter '{name}' expects an integer in {lo}..{hi}")
            staged[name] = value
        if staged["cpu-throttle-initial"] > staged["max-cpu-throttle"]:
            raise ConfigError("cpu-throttle-initial is above max-cpu-throttle")
        self.parameters = staged

    def query_capabilities(self) -> list[dict[str, Any]]:
        return [{"capability": k, "state": v} for k, v in self.capabilities.items()]

    @property
    def channels(self) -> int:
        """Multifd channels in use (0 = plain precopy on the main channel)."""
        return int(self.parameters["multifd-channels"]) if self.capabilities["multifd"] else 0

    @property
    def compression(self) -> str:
        return str(self.parameters["multifd-compression"]) if self.channels else "none"
