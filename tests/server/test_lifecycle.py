from __future__ import annotations

import pytest

from lmfleet.server.lifecycle import InvalidTransition, Lifecycle, ReplicaState

S = ReplicaState


def test_starts_starting_and_walks_the_happy_path():
    seen = []
    lc = Lifecycle(on_change=lambda old, new: seen.append((old, new)))
    assert lc.state is S.STARTING and not lc.ready and not lc.accepting
    lc.to(S.READY)
    assert lc.ready and lc.accepting
    lc.to(S.ASLEEP)
    assert not lc.accepting
    lc.to(S.READY)
    lc.to(S.DRAINING)
    assert not lc.accepting
    lc.to(S.STOPPED)
    assert seen == [
        (S.STARTING, S.READY),
        (S.READY, S.ASLEEP),
        (S.ASLEEP, S.READY),
        (S.READY, S.DRAINING),
        (S.DRAINING, S.STOPPED),
    ]


@pytest.mark.parametrize(
    ("path", "bad"),
    [
        ([], S.DRAINING),  # starting: stop, don't drain
        ([], S.ASLEEP),
        ([S.READY], S.STOPPED),  # ready must drain first
        ([S.READY], S.STARTING),
        ([S.READY, S.DRAINING], S.READY),  # no way back from draining
        ([S.READY, S.DRAINING], S.ASLEEP),
        ([S.READY, S.DRAINING, S.STOPPED], S.READY),
        ([S.READY, S.ASLEEP], S.STOPPED),
    ],
)
def test_forbidden_moves_raise_and_keep_the_state(path, bad):
    lc = Lifecycle()
    for s in path:
        lc.to(s)
    before = lc.state
    assert not lc.can(bad)
    with pytest.raises(InvalidTransition, match=f"from {before.value} to {bad.value}"):
        lc.to(bad)
    assert lc.state is before


def test_load_failure_and_asleep_drain_paths():
    lc = Lifecycle()
    lc.to(S.STOPPED)  # failed load or stop while starting
    assert lc.state is S.STOPPED
    lc = Lifecycle()
    lc.to(S.READY)
    lc.to(S.ASLEEP)
    lc.to(S.DRAINING)
    lc.to(S.STOPPED)


def test_seconds_in_state_uses_the_clock():
    now = [100.0]
    lc = Lifecycle(clock=lambda: now[0])
    now[0] = 103.5
    assert lc.seconds_in_state == pytest.approx(3.5)
    lc.to(S.READY)
    assert lc.seconds_in_state == 0.0
    assert str(S.READY) == "ready"
