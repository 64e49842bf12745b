"""QEMU's migration status and run states, each with its arcs in a table.

Theory of operation
-------------------
Two state machines describe a machine that migrates, and both are QEMU's, under
QEMU's names, because management software reads them:

* :class:`MigrationStatus` is what ``query-migrate`` and the ``MIGRATION`` event
  say about one migration (``qapi/migration.json``). It moves only along
  :data:`STATUS_ARCS`, the arcs QEMU's ``migrate_set_state()`` callers take
  (``migration/migration.c``).
* :class:`RunState` is what ``query-status`` says about the machine
  (``qapi/run-state.json``). It moves only along :data:`RUN_STATE_ARCS`: QEMU's
  ``runstate_transitions_def`` (``system/runstate.c``) between the states a
  livemig machine has, plus one arc of livemig's own (``paused -> inmigrate``,
  below).

Both enums are :class:`enum.StrEnum`: a member *is* its QEMU string, so it
compares equal to it, hashes like it, and ``json.dumps`` and ``f"{x}"`` write
it unchanged. QMP replies and events therefore carry exactly QEMU's strings,
and code that still compares with ``"cancelling"`` keeps working.

A request for a pair that is not in its table raises :class:`TransitionError`
(a :class:`~livemig.errors.StateError`) naming the current state, the requested
one and the states that were allowed, before anything changes. Asking for the
state one is already in is not an arc; the holders of these states
(:class:`~livemig.engine.machine.Machine`,
:class:`~livemig.engine.migration_run.MigrationRun`) treat it as "nothing to
do", as QEMU's ``runstate_set()`` and ``migrate_set_state()`` do.

Nothing here does I/O or holds a lock: the holders do both.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from typing import Final, TypeVar

from livemig.errors import StateError

__all__ = [
    "FINISHED",
    "RUN_STATE_ARCS",
    "STATUS_ARCS",
    "MigrationStatus",
    "RunState",
    "RunStateArc",
    "StatusArc",
    "TransitionError",
    "next_run_state",
    "next_status",
]


class MigrationStatus(enum.StrEnum):
    """QEMU's ``MigrationStatus`` (``qapi/migration.json``), the values livemig can be in.

    livemig's engine enters ``none``, ``setup``, ``active``, ``cancelling`` and the
    three final values. ``pre-switchover`` and ``device`` (QEMU's
    ``pause-before-switchover`` capability) and ``wait-unplug`` (failover devices)
    are QEMU's and in the table so that a status read from a QEMU peer has a
    place, but the engine never enters them. Postcopy and COLO values are absent:
    livemig does neither.
    """

    NONE = "none"
    SETUP = "setup"
    WAIT_UNPLUG = "wait-unplug"
    ACTIVE = "active"
    PRE_SWITCHOVER = "pre-switchover"
    DEVICE = "device"
    CANCELLING = "cancelling"
    CANCELLED = "cancelled"
    COMPLETED = "completed"
    FAILED = "failed"


class RunState(enum.StrEnum):
    """QEMU's ``RunState`` (``qapi/run-state.json``), the states a livemig machine has.

    | state | when |
    | --- | --- |
    | ``running`` | the workers run |
    | ``paused`` | stopped (``stop``, ``-S``, a new machine, after a failed incoming migration) |
    | ``inmigrate`` | waiting for, or receiving, an incoming migration |
    | ``finish-migrate`` | the source during completion (stopped) |
    | ``postmigrate`` | the source after a completed migration (stopped) |
    | ``prelaunch``, ``shutdown`` | accepted, not entered by the engine |
    """

    PRELAUNCH = "prelaunch"
    RUNNING = "running"
    PAUSED = "paused"
    INMIGRATE = "inmigrate"
    FINISH_MIGRATE = "finish-migrate"
    POSTMIGRATE = "postmigrate"
    SHUTDOWN = "shutdown"


#: An arc of the migration status: (from, to).
StatusArc = tuple[MigrationStatus, MigrationStatus]
#: An arc of the run state: (from, to).
RunStateArc = tuple[RunState, RunState]

_S = TypeVar("_S", MigrationStatus, RunState)


def _arcs(rows: Mapping[_S, Iterable[_S]]) -> frozenset[tuple[_S, _S]]:
    return frozenset((a, b) for a, targets in rows.items() for b in targets)


M = MigrationStatus
#: The arcs of :class:`MigrationStatus`; a pair not here is refused. Every running
#: status may fail or be cancelled (``migrate_fd_cancel()``); ``cancelling`` ends
#: in ``cancelled``, or in ``failed`` when the cancel found a failure on its way.
STATUS_ARCS: Final[frozenset[StatusArc]] = _arcs({
    M.NONE: (M.SETUP, M.FAILED),  # a destination's load_setup() may fail before setup
    M.SETUP: (M.ACTIVE, M.WAIT_UNPLUG, M.FAILED, M.CANCELLING),
    M.WAIT_UNPLUG: (M.ACTIVE, M.FAILED, M.CANCELLING),
    M.ACTIVE: (M.PRE_SWITCHOVER, M.DEVICE, M.COMPLETED, M.FAILED, M.CANCELLING),
    M.PRE_SWITCHOVER: (M.DEVICE, M.FAILED, M.CANCELLING),
    M.DEVICE: (M.COMPLETED, M.FAILED, M.CANCELLING),
    M.CANCELLING: (M.CANCELLED, M.FAILED),
})

#: The statuses a migration ends in; none has an arc out.
FINISHED: Final[frozenset[MigrationStatus]] = frozenset({M.COMPLETED, M.FAILED, M.CANCELLED})

R = RunState
#: The arcs of :class:`RunState`: QEMU's ``runstate_transitions_def`` between these
#: states, plus ``paused -> inmigrate``. QEMU starts a machine in ``prelaunch`` and
#: takes ``migrate-incoming`` only after ``-incoming``; a livemig machine starts
#: ``paused`` and takes ``migrate-incoming`` there too (``-incoming defer`` is that
#: arc at start). ``inmigrate -> running`` is a completed incoming migration with
#: autostart, ``finish-migrate -> running``/``paused`` a source that resumes after
#: a failed or cancelled migration, ``postmigrate -> running`` a ``cont`` after one
#: that completed.
RUN_STATE_ARCS: Final[frozenset[RunStateArc]] = _arcs({
    R.PRELAUNCH: (R.INMIGRATE, R.RUNNING, R.FINISH_MIGRATE),
    R.RUNNING: (R.PAUSED, R.FINISH_MIGRATE, R.SHUTDOWN),
    R.PAUSED: (R.RUNNING, R.FINISH_MIGRATE, R.POSTMIGRATE, R.PRELAUNCH,
               R.INMIGRATE),  # livemig's arc
    R.INMIGRATE: (R.RUNNING, R.PAUSED, R.FINISH_MIGRATE, R.POSTMIGRATE, R.PRELAUNCH,
                  R.SHUTDOWN),
    R.FINISH_MIGRATE: (R.RUNNING, R.PAUSED, R.POSTMIGRATE, R.PRELAUNCH, R.SHUTDOWN),
    R.POSTMIGRATE: (R.RUNNING, R.FINISH_MIGRATE, R.PRELAUNCH),
    R.SHUTDOWN: (R.PAUSED, R.FINISH_MIGRATE, R.PRELAUNCH),
})


class TransitionError(StateError):
    """A state was asked to move along a pair that is not in its table.

    ``state`` is the current state, ``requested`` (also ``required``, the
    :class:`~livemig.errors.StateError` field) the one asked for: a member of the
    enum, or the string as given when it names no state. ``what`` says which
    machine refused ("migration status", "run state").
    """

    def __init__(self, what: str, state: object, requested: object, why: str) -> None:
        super().__init__(state, requested)
        self.what = what
        self.requested = requested
        self.why = why
        self.args = (f"{what} {state} cannot go to {requested}: {why}",)


def _next(kind: type[_S], table: frozenset[tuple[_S, _S]], what: str, current: _S,
          requested: _S | str) -> _S:
    try:
        to = kind(requested)
    except ValueError:
        names = ", ".join(s.value for s in kind)
        raise TransitionError(what, current, repr(requested),
                              f"not a {what} (one of {names})") from None
    if (current, to) not in table:
        allowed = sorted(b.value for a, b in table if a is current)
        why = (f"from {current} only to {', '.join(allowed)}" if allowed
               else f"{current} is final")
        raise TransitionError(what, current, to, why)
    return to


def next_status(current: MigrationStatus | str, requested: MigrationStatus | str
                ) -> MigrationStatus:
    """``requested`` as a :class:`MigrationStatus` if ``current -> requested`` is an arc.

    Raises :class:`TransitionError` otherwise (also for a string that names no
    status). A string for ``current`` is read as its status.
    """
    return _next(MigrationStatus, STATUS_ARCS, "migration status", MigrationStatus(current),
                 requested)


def next_run_state(current: RunState | str, requested: RunState | str) -> RunState:
    """``requested`` as a :class:`RunState` if ``current -> requested`` is an arc.

    Raises :class:`TransitionError` otherwise (also for a string that names no run
    state).
    """
    return _next(RunState, RUN_STATE_ARCS, "run state", RunState(current), requested)
