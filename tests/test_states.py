"""The sandbox state table: every (src, dst) pair, action sets, and how a run's end is recorded."""

from __future__ import annotations

import itertools
import signal

import pytest

from msbd import states
from msbd.errors import Conflict, RpcCode
from msbd.model import LIVE_STATES, Reason, State

# Written out by hand, independently of states.TRANSITIONS.
LEGAL = {
    ("created", "starting"),
    ("starting", "running"),
    ("starting", "failed"),
    ("starting", "stopping"),
    ("starting", "stopped"),
    ("running", "stopping"),
    ("running", "stopped"),
    ("running", "failed"),
    ("running", "paused"),
    ("paused", "running"),
    ("paused", "stopping"),
    ("paused", "stopped"),
    ("stopping", "stopped"),
    ("stopped", "starting"),
    ("failed", "starting"),
}

ALL_PAIRS = list(itertools.product(State, State))


def test_every_state_is_covered() -> None:
    assert {s.value for s in State} == {
        "created", "starting", "running", "paused", "stopping", "stopped", "failed"}
    assert len(ALL_PAIRS) == 49


@pytest.mark.parametrize(("src", "dst"), ALL_PAIRS, ids=[f"{s}->{d}" for s, d in ALL_PAIRS])
def test_transition_table(src: State, dst: State) -> None:
    legal = (src.value, dst.value) in LEGAL
    assert states.can_transition(src, dst) is legal
    if legal:
        states.check_transition(src, dst)
        assert src in states.sources(dst)
    else:
        with pytest.raises(Conflict) as info:
            states.check_transition(src, dst, name="box1")
        err = info.value
        assert err.code == RpcCode.CONFLICT
        assert str(err) == f"sandbox 'box1' cannot go from {src} to {dst}"
        assert err.data == {"sandbox": "box1", "state": src.value, "to": dst.value}
        assert src not in states.sources(dst)


def test_conflict_without_a_name() -> None:
    with pytest.raises(Conflict, match=r"^a sandbox cannot go from running to starting$"):
        states.check_transition(State.RUNNING, State.STARTING)


@pytest.mark.parametrize(("dst", "expected"), [
    (State.CREATED, set()),
    (State.STARTING, {"created", "stopped", "failed"}),
    (State.RUNNING, {"starting", "paused"}),
    (State.PAUSED, {"running"}),
    (State.STOPPING, {"starting", "running", "paused"}),
    (State.STOPPED, {"starting", "running", "paused", "stopping"}),
    (State.FAILED, {"starting", "running"}),
])
def test_sources(dst: State, expected: set[str]) -> None:
    got = states.sources(dst)
    assert isinstance(got, frozenset)
    assert {s.value for s in got} == expected


def test_nothing_moves_to_itself_or_back_to_created() -> None:
    for s in State:
        assert not states.can_transition(s, s)
        assert not states.can_transition(s, State.CREATED)


def test_action_sets() -> None:
    assert {s.value for s in states.startable} == {"created", "stopped", "failed"}
    assert {s.value for s in states.stoppable} == {"starting", "running", "paused", "stopping"}
    assert {s.value for s in states.pausable} == {"running"}
    assert {s.value for s in states.resumable} == {"paused"}
    assert {s.value for s in states.removable} == {"created", "stopped", "failed"}
    # A live sandbox is never removed as it is; each startable state may start.
    assert not (states.removable & LIVE_STATES)
    assert all(states.can_transition(s, State.STARTING) for s in states.startable)


Status = dict[str, int | None]
_CRASH: Status = {"exit_code": None, "signal": int(signal.SIGSEGV)}
_KILL9: Status = {"exit_code": None, "signal": int(signal.SIGKILL)}
_TERM: Status = {"exit_code": None, "signal": int(signal.SIGTERM)}


def _exit(code: int) -> Status:
    return {"exit_code": code, "signal": None}


# (requested, status, entered, worker wrote `error`, expected)
END_CASES: list[tuple[Reason | None, Status, bool, bool, Reason]] = [
    # The daemon's decision wins, whatever the process did.
    (Reason.STOP_REQUESTED, _exit(0), True, False, Reason.STOP_REQUESTED),
    (Reason.STOP_REQUESTED, _TERM, True, False, Reason.STOP_REQUESTED),
    (Reason.STOP_REQUESTED, _exit(3), False, True, Reason.STOP_REQUESTED),
    (Reason.STOP_REQUESTED, _exit(5), True, True, Reason.STOP_REQUESTED),
    (Reason.KILLED, _KILL9, True, False, Reason.KILLED),
    (Reason.KILLED, _KILL9, False, False, Reason.KILLED),
    (Reason.IDLE_TIMEOUT, _exit(143), True, False, Reason.IDLE_TIMEOUT),
    (Reason.MAX_DURATION, _KILL9, True, False, Reason.MAX_DURATION),
    (Reason.HEARTBEAT_LOST, _KILL9, True, False, Reason.HEARTBEAT_LOST),
    (Reason.HEARTBEAT_LOST, _exit(0), False, False, Reason.HEARTBEAT_LOST),
    # Never wrote `entering`: launch statuses are a failed launch, anything else a crash.
    (None, _exit(2), False, True, Reason.LAUNCH_FAILED),
    (None, _exit(2), False, False, Reason.LAUNCH_FAILED),  # bad command line: no error line
    (None, _exit(3), False, True, Reason.LAUNCH_FAILED),
    (None, _exit(4), False, True, Reason.LAUNCH_FAILED),
    (None, _exit(5), False, True, Reason.LAUNCH_FAILED),
    (None, _exit(0), False, False, Reason.WORKER_CRASHED),
    (None, _exit(1), False, False, Reason.WORKER_CRASHED),
    (None, _exit(6), False, False, Reason.WORKER_CRASHED),
    (None, _exit(143), False, False, Reason.WORKER_CRASHED),
    (None, _CRASH, False, False, Reason.WORKER_CRASHED),
    (None, _KILL9, False, False, Reason.WORKER_CRASHED),
    (None, _KILL9, False, True, Reason.WORKER_CRASHED),
    # Entered: a launch status with an `error` line is still a failed launch;
    # without one it is the workload's status. An unrequested signal is a crash.
    (None, _exit(5), True, True, Reason.LAUNCH_FAILED),
    (None, _exit(5), True, False, Reason.EXITED),
    (None, _exit(2), True, False, Reason.EXITED),
    (None, _exit(0), True, False, Reason.EXITED),
    (None, _exit(1), True, False, Reason.EXITED),
    (None, _exit(143), True, False, Reason.EXITED),  # a SIGTERM the daemon did not send
    (None, _exit(255), True, False, Reason.EXITED),
    (None, _exit(0), True, True, Reason.EXITED),
    (None, _CRASH, True, False, Reason.WORKER_CRASHED),
    (None, _KILL9, True, False, Reason.WORKER_CRASHED),
]


@pytest.mark.parametrize(("requested", "status", "entered", "worker_error", "expected"),
                         END_CASES)
def test_end_reason(requested: Reason | None, status: Status, entered: bool,
                    worker_error: bool, expected: Reason) -> None:
    got = states.end_reason(requested=requested, exit_code=status["exit_code"],
                            signal=status["signal"], entered=entered, worker_error=worker_error)
    assert got is expected


# (requested, status, entered, expected) when the run's cgroup counted an OOM kill
OOM_CASES: list[tuple[Reason | None, Status, bool, Reason]] = [
    # The kernel killed the whole run (memory.oom.group): the VMM died of SIGKILL.
    (None, _KILL9, True, Reason.OOM_KILLED),
    (None, _KILL9, False, Reason.OOM_KILLED),  # before `entering`: still its memory
    # A thread of the guest's VMM was killed and the worker still exited with a status.
    (None, _exit(1), True, Reason.OOM_KILLED),
    # The daemon asked first: its reason stands, whatever the kernel did meanwhile.
    (Reason.STOP_REQUESTED, _KILL9, True, Reason.STOP_REQUESTED),
    (Reason.KILLED, _KILL9, True, Reason.KILLED),
    (Reason.MAX_DURATION, _KILL9, True, Reason.MAX_DURATION),
]


@pytest.mark.parametrize(("requested", "status", "entered", "expected"), OOM_CASES)
def test_end_reason_after_an_oom_kill(requested: Reason | None, status: Status, entered: bool,
                                      expected: Reason) -> None:
    got = states.end_reason(requested=requested, exit_code=status["exit_code"],
                            signal=status["signal"], entered=entered, oom_killed=True)
    assert got is expected
    assert states.final_state(got) is State.STOPPED


def test_end_reason_worker_error_defaults_to_false() -> None:
    assert states.end_reason(requested=None, exit_code=5, signal=None,
                             entered=True) is Reason.EXITED


@pytest.mark.parametrize("requested", [Reason.EXITED, Reason.LAUNCH_FAILED,
                                       Reason.WORKER_CRASHED, Reason.DAEMON_LOST])
def test_end_reason_refuses_reasons_the_daemon_cannot_request(requested: Reason) -> None:
    with pytest.raises(ValueError, match="not a reason the daemon can request"):
        states.end_reason(requested=requested, exit_code=0, signal=None, entered=True)


@pytest.mark.parametrize(("exit_code", "sig"), [(None, None), (0, 9)])
def test_end_reason_needs_exactly_one_of_exit_code_and_signal(exit_code: int | None,
                                                              sig: int | None) -> None:
    with pytest.raises(ValueError, match="exactly one"):
        states.end_reason(requested=None, exit_code=exit_code, signal=sig, entered=True)


FINAL = {
    "exited": "stopped",
    "stop_requested": "stopped",
    "killed": "stopped",
    "idle_timeout": "stopped",
    "max_duration": "stopped",
    "heartbeat_lost": "stopped",
    "launch_failed": "failed",
    "worker_crashed": "stopped",
    "daemon_lost": "stopped",
    "oom_killed": "stopped",
}


@pytest.mark.parametrize("reason", list(Reason))
def test_final_state(reason: Reason) -> None:
    assert states.final_state(reason).value == FINAL[reason.value]


def test_final_state_is_reachable_from_where_the_reason_can_arise() -> None:
    """Every recorded end lands on a legal transition from the state it ends in."""
    for requested in sorted(states.REQUESTED_REASONS):
        # A requested end always passes through `stopping`.
        assert states.can_transition(State.STOPPING, states.final_state(requested))
    statuses = (_exit(0), _exit(1), _exit(2), _exit(5), _exit(6), _CRASH, _KILL9)
    for (entered, src), status, error in itertools.product(
            ((False, State.STARTING), (True, State.RUNNING)), statuses, (False, True)):
        reason = states.end_reason(requested=None, exit_code=status["exit_code"],
                                   signal=status["signal"], entered=entered, worker_error=error)
        assert states.can_transition(src, states.final_state(reason)), (src, reason)
    # A run that ends while frozen (SIGKILL, cgroup.kill) and was not asked to end.
    for status in (_KILL9, _exit(137)):
        reason = states.end_reason(requested=None, exit_code=status["exit_code"],
                                   signal=status["signal"], entered=True)
        assert states.can_transition(State.PAUSED, states.final_state(reason)), reason
    for src in LIVE_STATES:  # reconciliation after a daemon restart
        assert states.can_transition(src, states.final_state(Reason.DAEMON_LOST))
