"""Tests for livemig.vfio.state_machine: the arcs, the combination rule, refusals.

The expected facts below are written out again from the comments of Linux
``include/uapi/linux/vfio.h`` and ``drivers/vfio/vfio_main.c``, independently of the
tables in the module, and the module is checked against them.
"""

from __future__ import annotations

import itertools
from collections import deque

import pytest
from hypothesis import given
from hypothesis import strategies as st

from livemig.errors import ConfigError, StateError
from livemig.vfio.state_machine import (
    ARCS,
    BLOCKED_ARCS,
    DeviceState,
    IllegalTransition,
    MigrationFlag,
    VfioStateMachine,
    driver_arcs,
    supported_states,
    transition_path,
)

S = DeviceState
F = MigrationFlag

# The arcs as the uapi header lists them, one line per arc ("The driver implements the
# following behavior for the FSM arcs").
HEADER_ARCS_TEXT = """
RUNNING_P2P -> STOP
STOP_COPY -> STOP
RESUMING -> STOP
PRE_COPY -> RUNNING
RUNNING_P2P -> RUNNING
PRE_COPY_P2P -> RUNNING_P2P
RUNNING -> RUNNING_P2P
STOP -> RUNNING_P2P
RUNNING -> PRE_COPY
RUNNING_P2P -> PRE_COPY_P2P
STOP -> STOP_COPY
PRE_COPY -> PRE_COPY_P2P
PRE_COPY_P2P -> PRE_COPY
PRE_COPY_P2P -> STOP_COPY
STOP -> RESUMING
"""
HEADER_BLOCKED_TEXT = """
STOP_COPY -> PRE_COPY
STOP_COPY -> PRE_COPY_P2P
"""

# vfio_main.c: the combination transitions the coding steps through when every
# optional feature is supported.
KERNEL_COMBINATIONS_TEXT = """
PRE_COPY -> PRE_COPY_P2P -> STOP_COPY
PRE_COPY -> RUNNING -> RUNNING_P2P
PRE_COPY -> RUNNING -> RUNNING_P2P -> STOP
PRE_COPY -> RUNNING -> RUNNING_P2P -> STOP -> RESUMING
PRE_COPY_P2P -> RUNNING_P2P -> RUNNING
PRE_COPY_P2P -> RUNNING_P2P -> STOP
PRE_COPY_P2P -> RUNNING_P2P -> STOP -> RESUMING
RESUMING -> STOP -> RUNNING_P2P
RESUMING -> STOP -> RUNNING_P2P -> PRE_COPY_P2P
RESUMING -> STOP -> RUNNING_P2P -> RUNNING
RESUMING -> STOP -> RUNNING_P2P -> RUNNING -> PRE_COPY
RESUMING -> STOP -> STOP_COPY
RUNNING -> RUNNING_P2P -> PRE_COPY_P2P
RUNNING -> RUNNING_P2P -> STOP
RUNNING -> RUNNING_P2P -> STOP -> RESUMING
RUNNING -> RUNNING_P2P -> STOP -> STOP_COPY
RUNNING_P2P -> RUNNING -> PRE_COPY
RUNNING_P2P -> STOP -> RESUMING
RUNNING_P2P -> STOP -> STOP_COPY
STOP -> RUNNING_P2P -> PRE_COPY_P2P
STOP -> RUNNING_P2P -> RUNNING
STOP -> RUNNING_P2P -> RUNNING -> PRE_COPY
STOP_COPY -> STOP -> RESUMING
STOP_COPY -> STOP -> RUNNING_P2P
STOP_COPY -> STOP -> RUNNING_P2P -> RUNNING
"""

# vfio_main.c: arcs a driver must implement per feature set.
KERNEL_REQUIRED = {
    F.STOP_COPY: "RESUMING -> STOP; STOP -> RESUMING; STOP -> STOP_COPY; STOP_COPY -> STOP; "
                 "RUNNING -> STOP; STOP -> RUNNING",
    F.STOP_COPY | F.P2P: "RESUMING -> STOP; STOP -> RESUMING; STOP -> STOP_COPY; "
                         "STOP_COPY -> STOP; RUNNING -> RUNNING_P2P; RUNNING_P2P -> RUNNING; "
                         "RUNNING_P2P -> STOP; STOP -> RUNNING_P2P",
    F.STOP_COPY | F.PRE_COPY: "RESUMING -> STOP; STOP -> RESUMING; STOP -> STOP_COPY; "
                              "STOP_COPY -> STOP; RUNNING -> STOP; STOP -> RUNNING; "
                              "RUNNING -> PRE_COPY; PRE_COPY -> RUNNING; PRE_COPY -> STOP_COPY",
}

SAVING = {S.PRE_COPY, S.PRE_COPY_P2P, S.STOP_COPY}
FEATURE_SETS = [F.STOP_COPY, F.STOP_COPY | F.P2P, F.STOP_COPY | F.PRE_COPY,
                F.STOP_COPY | F.P2P | F.PRE_COPY]


def parse_arcs(text: str) -> set[tuple[DeviceState, DeviceState]]:
    out = set()
    for line in text.replace(";", "\n").splitlines():
        if line.strip():
            a, b = (x.strip() for x in line.split("->"))
            out.add((S[a], S[b]))
    return out


def needs(state: DeviceState) -> int:
    return {S.RUNNING_P2P: F.P2P, S.PRE_COPY: F.PRE_COPY,
            S.PRE_COPY_P2P: F.P2P | F.PRE_COPY}.get(state, 0) | F.STOP_COPY


def ok(state: DeviceState, features: int) -> bool:
    return state != S.ERROR and needs(state) & features == needs(state)


def shortest(frm: DeviceState, to: DeviceState, arcs: set) -> int | None:
    """BFS length of the shortest path whose interior avoids the saving group."""
    seen = {frm: 0}
    queue = deque([frm])
    while queue:
        s = queue.popleft()
        if s == to:
            return seen[s]
        if s != frm and s in SAVING and not (frm in SAVING and to in SAVING):
            continue  # may end here, not pass through (unless the path stays in the group)
        for a, b in arcs:
            if a == s and b not in seen:
                seen[b] = seen[s] + 1
                queue.append(b)
    return None


def kernel_refuses(frm: DeviceState, to: DeviceState, features: int) -> bool:
    return (S.ERROR in (frm, to) or not ok(frm, features) or not ok(to, features)
            or (frm == S.STOP_COPY and to in (S.PRE_COPY, S.PRE_COPY_P2P)))


def test_arc_table_is_the_header_list() -> None:
    assert set(ARCS) == parse_arcs(HEADER_ARCS_TEXT)
    assert set(BLOCKED_ARCS) == parse_arcs(HEADER_BLOCKED_TEXT)
    assert not set(ARCS) & set(BLOCKED_ARCS)


def test_state_values_are_the_header_enum() -> None:
    assert [(s.name, s.value) for s in S] == [
        ("ERROR", 0), ("STOP", 1), ("RUNNING", 2), ("STOP_COPY", 3), ("RESUMING", 4),
        ("RUNNING_P2P", 5), ("PRE_COPY", 6), ("PRE_COPY_P2P", 7)]
    assert (F.STOP_COPY, F.P2P, F.PRE_COPY) == (1, 2, 4)


def test_driver_arcs_full_features_are_the_header_arcs() -> None:
    assert driver_arcs(F.STOP_COPY | F.P2P | F.PRE_COPY) == ARCS


@pytest.mark.parametrize("features", sorted(KERNEL_REQUIRED))
def test_driver_arcs_match_kernel_required_arcs(features: int) -> None:
    assert driver_arcs(features) == parse_arcs(KERNEL_REQUIRED[features])


def test_kernel_combination_examples() -> None:
    full = F.STOP_COPY | F.P2P | F.PRE_COPY
    for line in KERNEL_COMBINATIONS_TEXT.strip().splitlines():
        states = [S[x.strip()] for x in line.split("->")]
        path = transition_path(states[0], states[-1], full)
        assert [b for _, b in path] == states[1:], line


@given(st.sampled_from(list(S)), st.sampled_from(list(S)), st.sampled_from(FEATURE_SETS))
def test_every_request_is_legal_and_shortest_or_refused(frm: DeviceState, to: DeviceState,
                                                        features: int) -> None:
    check_request(frm, to, features)


def test_every_request_exhaustively() -> None:
    """The property above on all 256 cases, so that no run depends on what it sampled."""
    for features in FEATURE_SETS:
        for frm in S:
            for to in S:
                check_request(frm, to, features)


def check_request(frm: DeviceState, to: DeviceState, features: int) -> None:
    legal = parse_arcs(HEADER_ARCS_TEXT)
    if not features & F.P2P:  # P2P states behave as the running ones
        c = {S.RUNNING_P2P: S.RUNNING, S.PRE_COPY_P2P: S.PRE_COPY}
        legal = {(c.get(a, a), c.get(b, b)) for a, b in legal}
        legal = {(a, b) for a, b in legal if a != b}
    legal = {(a, b) for a, b in legal if ok(a, features) and ok(b, features)}
    if kernel_refuses(frm, to, features):
        with pytest.raises(IllegalTransition) as info:
            transition_path(frm, to, features)
        assert info.value.from_state == frm and info.value.to_state == to
        assert frm.name in str(info.value) and to.name in str(info.value)
        return
    path = transition_path(frm, to, features)
    assert all(arc in legal for arc in path), path
    assert (path[-1][1] if path else frm) == to
    for a, b in itertools.pairwise(path):
        assert a[1] == b[0]
    if not (frm in SAVING and to in SAVING):
        # a path may stay inside the saving group (PRE_COPY -> PRE_COPY_P2P -> STOP_COPY,
        # the kernel's own next hops), but never pass through it on the way elsewhere
        assert all(b not in SAVING for _, b in path[:-1]), "saving group state inside the path"
    assert len(path) == shortest(frm, to, legal)


def test_all_pairs_exhaustively() -> None:
    # The property above samples; this walks every case once so a regression names it.
    for features in FEATURE_SETS:
        for frm in S:
            for to in S:
                refused = kernel_refuses(frm, to, features)
                try:
                    transition_path(frm, to, features)
                except IllegalTransition:
                    assert refused, (frm, to, features)
                else:
                    assert not refused, (frm, to, features)


def test_machine_refusal_does_not_move() -> None:
    calls = []
    m = VfioStateMachine(F.STOP_COPY | F.PRE_COPY, name="dev0",
                         on_arc=lambda a, b: calls.append((a, b)))
    m.request(S.STOP_COPY)
    assert m.state == S.STOP_COPY
    assert calls == [(S.RUNNING, S.STOP), (S.STOP, S.STOP_COPY)]
    with pytest.raises(IllegalTransition, match=r"dev0.*STOP_COPY to PRE_COPY.*blocked"):
        m.request(S.PRE_COPY)
    assert m.state == S.STOP_COPY
    with pytest.raises(IllegalTransition, match="RUNNING_P2P needs P2P"):
        m.request(S.RUNNING_P2P)
    with pytest.raises(IllegalTransition, match="ERROR cannot be requested"):
        m.request(S.ERROR)
    with pytest.raises(IllegalTransition, match="99 is not a device state"):
        m.request(99)
    assert m.state == S.STOP_COPY
    assert isinstance(IllegalTransition(S.STOP, S.RUNNING, "x"), StateError)


def test_machine_failed_arc_goes_to_error_and_reset_recovers() -> None:
    def action(a: DeviceState, b: DeviceState) -> None:
        if b == S.STOP_COPY:
            raise OSError("device fell over")

    m = VfioStateMachine(F.STOP_COPY, on_arc=action)
    with pytest.raises(OSError, match="device fell over"):
        m.request(S.STOP_COPY)
    assert m.state == S.ERROR
    with pytest.raises(IllegalTransition, match="only a device reset"):
        m.request(S.RUNNING)
    m.reset()
    assert m.state == S.RUNNING


def test_features_checked() -> None:
    with pytest.raises(ConfigError, match="STOP_COPY"):
        VfioStateMachine(F.P2P)
    with pytest.raises(ConfigError, match="unknown"):
        VfioStateMachine(0x11)
    assert supported_states(F.STOP_COPY) == {S.STOP, S.RUNNING, S.STOP_COPY, S.RESUMING}


def test_require() -> None:
    m = VfioStateMachine(F.STOP_COPY, name="d")
    with pytest.raises(StateError, match="d: precopy info needs state"):
        m.require({S.PRE_COPY, S.PRE_COPY_P2P}, "precopy info")
