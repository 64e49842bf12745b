"""The VFIO migration uAPI v2 device state machine (Linux ``include/uapi/linux/vfio.h``).

Theory of operation
-------------------
A VFIO device that can migrate has a ``device_state`` (:class:`DeviceState`). The
kernel header documents a small set of *arcs* (:data:`ARCS`) -- the only
transitions a driver implements -- and says that every other request is a
*combination* of those arcs, chosen by two rules: take the shortest path, and
never pass *through* a state of the saving group (PRE_COPY, PRE_COPY_P2P,
STOP_COPY; they may only start or end a path). The kernel computes the next hop
with a table in ``vfio_mig_get_next_state()`` (``drivers/vfio/vfio_main.c``);
:data:`NEXT_HOP` is that table, and :func:`next_hop` applies it the way the
kernel does, skipping the optional states a device does not support
(:class:`MigrationFlag` ``P2P`` and ``PRE_COPY``). A device without P2P behaves
as if RUNNING_P2P were RUNNING and PRE_COPY_P2P were PRE_COPY, which is why the
driver of such a device sees arcs like RUNNING -> STOP (:func:`driver_arcs`).

Requests the kernel refuses with ``-EINVAL`` are refused here with
:class:`IllegalTransition` (which names from, to and why) before anything moves:
requesting ERROR, requesting or leaving a state the device's features do not
include, anything from ERROR (only a reset leaves it), and STOP_COPY -> PRE_COPY
or PRE_COPY_P2P (blocked by the header). One kernel detail is deliberately not
copied: before a fix posted in 2026 ("vfio: ... next_fsm != ERROR" in the skip
loop), the kernel's skip loop never ends when the table's hop is ERROR
(``state_flags_table[ERROR]`` is ``~0U``, never "supported"), i.e. on the
blocked STOP_COPY -> PRE_COPY requests; we return the intended ``-EINVAL``.

:class:`VfioStateMachine` holds one device's state and walks a path arc by arc,
calling the device's action for each arc. If an action fails, the device is in
ERROR (the header allows any state along the path or ERROR; ERROR is the honest
answer for a simulated device) and the action's exception propagates.

No I/O here: the data fd semantics live with the device (:mod:`livemig.vfio.sim_device`).
"""

from __future__ import annotations

import enum
import threading
from collections.abc import Callable, Iterable

from livemig.errors import ConfigError, StateError

__all__ = [
    "ARCS",
    "BLOCKED_ARCS",
    "NEXT_HOP",
    "RUNNING_STATES",
    "SAVING_GROUP",
    "STATE_NEEDS",
    "Arc",
    "DeviceState",
    "IllegalTransition",
    "MigrationFlag",
    "VfioStateMachine",
    "driver_arcs",
    "next_hop",
    "supported_states",
    "transition_path",
]


class DeviceState(enum.IntEnum):
    """``enum vfio_device_mig_state`` (Linux ``include/uapi/linux/vfio.h``)."""

    ERROR = 0
    STOP = 1
    RUNNING = 2
    STOP_COPY = 3
    RESUMING = 4
    RUNNING_P2P = 5
    PRE_COPY = 6
    PRE_COPY_P2P = 7


class MigrationFlag(enum.IntFlag):
    """``VFIO_MIGRATION_*``: what ``VFIO_DEVICE_FEATURE_MIGRATION`` reports (vfio.h)."""

    STOP_COPY = 1 << 0  # mandatory
    P2P = 1 << 1
    PRE_COPY = 1 << 2


_ALL_FLAGS = MigrationFlag.STOP_COPY | MigrationFlag.P2P | MigrationFlag.PRE_COPY

S = DeviceState
#: An arc: (from, to).
Arc = tuple[DeviceState, DeviceState]

#: The states that share one data transfer session (one data fd).
SAVING_GROUP: frozenset[DeviceState] = frozenset({S.PRE_COPY, S.PRE_COPY_P2P, S.STOP_COPY})

#: States in which the device runs and may change its internal state.
RUNNING_STATES: frozenset[DeviceState] = frozenset(
    {S.RUNNING, S.RUNNING_P2P, S.PRE_COPY, S.PRE_COPY_P2P})

#: The FSM arcs the header documents for a device with every optional feature.
ARCS: frozenset[Arc] = frozenset({
    (S.RUNNING_P2P, S.STOP),
    (S.STOP_COPY, S.STOP),
    (S.RESUMING, S.STOP),
    (S.PRE_COPY, S.RUNNING),
    (S.RUNNING_P2P, S.RUNNING),
    (S.PRE_COPY_P2P, S.RUNNING_P2P),
    (S.RUNNING, S.RUNNING_P2P),
    (S.STOP, S.RUNNING_P2P),
    (S.RUNNING, S.PRE_COPY),
    (S.RUNNING_P2P, S.PRE_COPY_P2P),
    (S.STOP, S.STOP_COPY),
    (S.PRE_COPY, S.PRE_COPY_P2P),
    (S.PRE_COPY_P2P, S.PRE_COPY),
    (S.PRE_COPY_P2P, S.STOP_COPY),
    (S.STOP, S.RESUMING),
})

#: Arcs the header names and forbids ("not permitted and return error").
BLOCKED_ARCS: frozenset[Arc] = frozenset({(S.STOP_COPY, S.PRE_COPY), (S.STOP_COPY, S.PRE_COPY_P2P)})

#: ``state_flags_table``: the features a state needs. ERROR is never requestable.
STATE_NEEDS: dict[DeviceState, MigrationFlag] = {
    S.STOP: MigrationFlag.STOP_COPY,
    S.RUNNING: MigrationFlag.STOP_COPY,
    S.STOP_COPY: MigrationFlag.STOP_COPY,
    S.RESUMING: MigrationFlag.STOP_COPY,
    S.RUNNING_P2P: MigrationFlag.STOP_COPY | MigrationFlag.P2P,
    S.PRE_COPY: MigrationFlag.STOP_COPY | MigrationFlag.PRE_COPY,
    S.PRE_COPY_P2P: MigrationFlag.STOP_COPY | MigrationFlag.P2P | MigrationFlag.PRE_COPY,
}


def _row(stop: S, running: S, stop_copy: S, resuming: S, running_p2p: S, pre_copy: S,
         pre_copy_p2p: S) -> dict[DeviceState, DeviceState]:
    return {S.STOP: stop, S.RUNNING: running, S.STOP_COPY: stop_copy, S.RESUMING: resuming,
            S.RUNNING_P2P: running_p2p, S.PRE_COPY: pre_copy, S.PRE_COPY_P2P: pre_copy_p2p,
            S.ERROR: S.ERROR}


#: ``vfio_from_fsm_table``: NEXT_HOP[current][requested] is the next state on the way,
#: for a device with every optional feature (ERROR = no way). Columns, left to right:
#: requested STOP, RUNNING, STOP_COPY, RESUMING, RUNNING_P2P, PRE_COPY, PRE_COPY_P2P.
NEXT_HOP: dict[DeviceState, dict[DeviceState, DeviceState]] = {
    S.STOP: _row(S.STOP, S.RUNNING_P2P, S.STOP_COPY, S.RESUMING, S.RUNNING_P2P,
                 S.RUNNING_P2P, S.RUNNING_P2P),
    S.RUNNING: _row(S.RUNNING_P2P, S.RUNNING, S.RUNNING_P2P, S.RUNNING_P2P, S.RUNNING_P2P,
                    S.PRE_COPY, S.RUNNING_P2P),
    S.STOP_COPY: _row(S.STOP, S.STOP, S.STOP_COPY, S.STOP, S.STOP, S.ERROR, S.ERROR),
    S.RESUMING: _row(S.STOP, S.STOP, S.STOP, S.RESUMING, S.STOP, S.STOP, S.STOP),
    S.RUNNING_P2P: _row(S.STOP, S.RUNNING, S.STOP, S.STOP, S.RUNNING_P2P, S.RUNNING,
                        S.PRE_COPY_P2P),
    S.PRE_COPY: _row(S.RUNNING, S.RUNNING, S.PRE_COPY_P2P, S.RUNNING, S.RUNNING, S.PRE_COPY,
                     S.PRE_COPY_P2P),
    S.PRE_COPY_P2P: _row(S.RUNNING_P2P, S.RUNNING_P2P, S.STOP_COPY, S.RUNNING_P2P,
                         S.RUNNING_P2P, S.PRE_COPY, S.PRE_COPY_P2P),
    S.ERROR: dict.fromkeys(S, S.ERROR),
}


def _features(flags: int) -> MigrationFlag:
    unknown = int(flags) & ~int(_ALL_FLAGS)
    if unknown:
        raise ConfigError(f"unknown VFIO migration flag bits {unknown:#x}")
    features = MigrationFlag(flags)
    if not features & MigrationFlag.STOP_COPY:
        raise ConfigError("a migratable VFIO device must support STOP_COPY "
                          f"(features {_names(features)})")
    return features


def _names(flags: MigrationFlag) -> str:
    return "|".join(f.name or "?" for f in MigrationFlag if f & flags) or "none"


def _supported(state: DeviceState, features: MigrationFlag) -> bool:
    need = STATE_NEEDS.get(state)
    return need is not None and need & features == need


def supported_states(features: int) -> frozenset[DeviceState]:
    """The states a device with these ``VFIO_MIGRATION_*`` flags can be put in (not ERROR)."""
    f = _features(features)
    return frozenset(s for s in S if _supported(s, f))


def _collapse(state: DeviceState, features: MigrationFlag) -> DeviceState:
    """Without P2P, a P2P state behaves as its fully running counterpart (vfio.h)."""
    if not features & MigrationFlag.P2P:
        return {S.RUNNING_P2P: S.RUNNING, S.PRE_COPY_P2P: S.PRE_COPY}.get(state, state)
    return state


def driver_arcs(features: int) -> frozenset[Arc]:
    """The arcs the driver of a device with these features implements and sees.

    :data:`ARCS` with each unsupported P2P state replaced by its running counterpart
    (so RUNNING_P2P -> STOP becomes RUNNING -> STOP), loops dropped, and without
    PRE_COPY every arc touching a PRE_COPY state removed ("Arcs touching PRE_COPY and
    PRE_COPY_P2P are removed if support for PRE_COPY is not present").
    """
    f = _features(features)
    out = set()
    for a, b in ARCS:
        a2, b2 = _collapse(a, f), _collapse(b, f)
        if a2 != b2 and _supported(a2, f) and _supported(b2, f):
            out.add((a2, b2))
    return frozenset(out)


class IllegalTransition(StateError):
    """A requested device state the uAPI refuses (``-EINVAL``); the device did not move."""

    def __init__(self, from_state: DeviceState, to_state: int, why: str, *,
                 device: str | None = None) -> None:
        self.from_state = from_state
        self.to_state = to_state
        self.why = why
        self.device = device
        # StateError's fields, for callers that only know the base class.
        self.state = from_state
        self.required = to_state
        to_name = DeviceState(to_state).name if to_state in DeviceState._value2member_map_ \
            else str(to_state)
        who = f"VFIO device {device}: " if device else ""
        Exception.__init__(self, f"{who}cannot go from {from_state.name} to {to_name}: {why}")


def next_hop(current: DeviceState, requested: int, features: int) -> DeviceState:
    """The next state on the way from ``current`` to ``requested``, as the kernel computes it.

    Raises :class:`IllegalTransition` where ``vfio_mig_get_next_state()`` returns
    ``-EINVAL``. ``requested == current`` returns ``current`` (nothing to do).
    """
    f = _features(features)
    if requested not in DeviceState._value2member_map_:
        raise IllegalTransition(current, requested, f"{requested} is not a device state")
    to = DeviceState(requested)
    if current == S.ERROR:
        raise IllegalTransition(current, to, "the device is in ERROR; only a device reset "
                                "(VFIO_DEVICE_RESET) leaves it")
    if not _supported(current, f):
        raise IllegalTransition(current, to, f"the current state needs features the device "
                                f"lacks ({_names(f)})")
    if to == S.ERROR:
        raise IllegalTransition(current, to, "ERROR cannot be requested")
    if not _supported(to, f):
        missing = MigrationFlag(int(STATE_NEEDS[to]) & ~int(f))
        raise IllegalTransition(current, to, f"{to.name} needs {_names(missing)}, which the "
                                f"device does not support (features {_names(f)})")
    hop = NEXT_HOP[current][to]
    while hop != S.ERROR and not _supported(hop, f):
        hop = NEXT_HOP[hop][to]
    if hop == S.ERROR:
        raise IllegalTransition(current, to, f"{current.name} -> {to.name} is blocked by the "
                                "uAPI (a saving session cannot return to precopy)")
    return hop


def transition_path(current: DeviceState, requested: int, features: int) -> tuple[Arc, ...]:
    """Every arc from ``current`` to ``requested`` (empty if they are equal), or refuse."""
    path: list[Arc] = []
    state = current
    next_hop(current, requested, features)  # refuses even a request for the current state
    while state != requested:
        hop = next_hop(state, requested, features)
        path.append((state, hop))
        state = hop
        if len(path) > len(DeviceState):  # cannot happen with the table above
            raise AssertionError(f"no end to the path {current.name} -> {requested}")
    return tuple(path)


#: Called for each arc the machine takes: (from, to). It raises to fail the arc.
ArcAction = Callable[[DeviceState, DeviceState], None]


class VfioStateMachine:
    """One device's migration state; moves only along :func:`driver_arcs`.

    Thread-safe: one request runs at a time. ``on_arc`` is the device's action for
    an arc (start or end a data session, stop, validate resumed state); it runs
    with the machine's lock held and before the new state is published.
    """

    def __init__(self, features: int, *, name: str = "", on_arc: ArcAction | None = None,
                 initial: DeviceState = S.RUNNING) -> None:
        self.features = _features(features)
        self.name = name
        self._on_arc = on_arc
        self._lock = threading.RLock()
        if initial != S.ERROR and not _supported(initial, self.features):
            raise ConfigError(f"initial state {initial.name} needs features the device lacks")
        self._state = initial
        self.history: list[Arc] = []

    @property
    def state(self) -> DeviceState:
        return self._state

    def plan(self, requested: int) -> tuple[Arc, ...]:
        """The arcs :meth:`request` would take; raises :class:`IllegalTransition`."""
        try:
            return transition_path(self._state, requested, self.features)
        except IllegalTransition as e:
            if not self.name:
                raise
            raise IllegalTransition(e.from_state, e.to_state, e.why, device=self.name) from None

    def request(self, requested: int) -> tuple[Arc, ...]:
        """Move to ``requested`` (``VFIO_DEVICE_FEATURE_SET`` of ``MIG_DEVICE_STATE``).

        The whole path is checked first, so a refused request leaves the state as it
        was. Returns the arcs taken. If an arc's action raises, the state becomes
        ERROR and the exception propagates.
        """
        with self._lock:
            path = self.plan(requested)
            for a, b in path:
                if self._on_arc is not None:
                    try:
                        self._on_arc(a, b)
                    except BaseException:
                        self._state = S.ERROR
                        self.history.append((a, S.ERROR))
                        raise
                self._state = b
                self.history.append((a, b))
            return path

    def fail(self) -> None:
        """Put the device in ERROR (an arc failed outside :meth:`request`)."""
        with self._lock:
            if self._state != S.ERROR:
                self.history.append((self._state, S.ERROR))
            self._state = S.ERROR

    def reset(self) -> None:
        """``VFIO_DEVICE_RESET``: back to RUNNING from any state, ERROR included."""
        with self._lock:
            if self._state != S.RUNNING:
                self.history.append((self._state, S.RUNNING))
            self._state = S.RUNNING

    def require(self, states: Iterable[DeviceState], what: str) -> None:
        """Raise :class:`StateError` unless the device is in one of ``states``."""
        allowed = frozenset(states)
        if self._state not in allowed:
            names = "/".join(sorted(s.name for s in allowed))
            who = f"VFIO device {self.name}: " if self.name else ""
            err = StateError(self._state.name, names)
            message = f"{who}{what} needs state {names}, but the device is in {self._state.name}"
            err.args = (message,)
            raise err
