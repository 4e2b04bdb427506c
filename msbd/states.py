"""The sandbox state table: which state changes are legal, and how a run's end is recorded.

How it works
------------
States: `created` (recorded, never started), `starting` (a worker is spawned
and has not yet written `entering`), `running` (the worker wrote `entering`
and is inside libkrun), `paused` (the run's cgroup is frozen: the VMM and
its guest are stopped in place, holding their memory), `stopping` (the
daemon asked the run to end: a stop, a kill or a timer), `stopped` (the run
ended for any reason other than a failed launch) and `failed` (the launch
never got a VM running: the worker gave up before libkrun, or
`krun_start_enter` returned right after `entering`).

What moves them: the API (`sandbox.start`, `stop`, `kill`, `pause`,
`resume`, `remove`), the worker's status pipe (`entering`), the timers
(idle, max duration, missed heartbeats) and the worker's exit seen through
its pidfd, which `end_reason` turns into one `Reason` and `final_state`
into `stopped` or `failed`. Daemon restart closes a live run as
`daemon_lost` (-> `stopped`).

`paused` is entered only from `running` and left to `running` (resume),
`stopping` (a stop, a kill or a timer: the daemon thaws the run first, so
its worker can act on SIGTERM) or `stopped` (the run ended while frozen:
SIGKILL and `cgroup.kill` reach frozen processes, and so does the kernel's
OOM killer). A paused run never `fails`: it got as far as running.

What never happens: a state moving to itself; anything moving back to
`created`; `stopping` moving to `failed` (once the daemon asked a run to
end, it ends as `stopped`, whatever the worker did) or back to `running`
or `paused`; `starting` moving to `paused` (there is no guest to freeze
yet); a live sandbox (`starting`, `running`, `paused`, `stopping`) being
removed without being stopped first. Removal is not a transition: the row
goes away.

Pure: no I/O, no clock. This table is the law at run time: the store
checks every transition against it (`check_transition`) inside the
transaction that applies it, so an illegal move raises `Conflict` and
writes nothing, whoever asked for it.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Final, assert_never

from msbd.contract import LAUNCH_FAILURES
from msbd.errors import Conflict
from msbd.model import LIVE_STATES, Reason, State

_S = State

TRANSITIONS: Final[Mapping[State, frozenset[State]]] = MappingProxyType({
    _S.CREATED: frozenset({_S.STARTING}),
    # `entering` read; launch never reached libkrun; a stop during start is
    # honoured; the worker crashed (or the daemon was lost) before `entering`.
    _S.STARTING: frozenset({_S.RUNNING, _S.FAILED, _S.STOPPING, _S.STOPPED}),
    # A stop, a kill or a timer; the workload exited by itself or the worker
    # crashed; krun_start_enter returned right after `entering` (launch_failed).
    _S.RUNNING: frozenset({_S.PAUSED, _S.STOPPING, _S.STOPPED, _S.FAILED}),
    # Resumed; a stop, a kill or a timer (thawed first); ended while frozen (a SIGKILL,
    # `cgroup.kill`, the OOM killer).
    _S.PAUSED: frozenset({_S.RUNNING, _S.STOPPING, _S.STOPPED}),
    _S.STOPPING: frozenset({_S.STOPPED}),
    # Starting again is a new run.
    _S.STOPPED: frozenset({_S.STARTING}),
    _S.FAILED: frozenset({_S.STARTING}),
})
"""Legal transitions: source state -> the states it may move to."""

_SOURCES: Final[Mapping[State, frozenset[State]]] = MappingProxyType({
    dst: frozenset(src for src, dsts in TRANSITIONS.items() if dst in dsts) for dst in State
})

startable: Final = _SOURCES[State.STARTING]
"""States `sandbox.start` (and `run` after create) accepts: those that may move to
`starting`."""

stoppable: Final = LIVE_STATES
"""States `sandbox.stop` / `kill` accept. `stopping` is included: a second
stop joins the one in progress (and a kill escalates it); `paused` too (the
run is thawed first)."""

pausable: Final = _SOURCES[State.PAUSED]
"""States `sandbox.pause` accepts: only `running`."""

resumable: Final = frozenset({State.PAUSED})
"""States `sandbox.resume` accepts: only `paused`."""

removable: Final = frozenset({State.CREATED, State.STOPPED, State.FAILED})
"""States `sandbox.remove` accepts as they are. With `force`, a live
sandbox is stopped first (`stoppable`), then removed once `stopped`."""

REQUESTED_REASONS: Final = frozenset({
    Reason.STOP_REQUESTED, Reason.KILLED, Reason.IDLE_TIMEOUT,
    Reason.MAX_DURATION, Reason.HEARTBEAT_LOST,
})
"""Reasons the daemon can decide before the worker ends (`end_reason`'s `requested`)."""

def can_transition(src: State, dst: State) -> bool:
    """True if a sandbox in `src` may move to `dst`."""
    return dst in TRANSITIONS[src]


def check_transition(src: State, dst: State, *, name: str | None = None) -> None:
    """Raise `Conflict` naming both states (and the sandbox) unless `src -> dst` is legal."""
    if can_transition(src, dst):
        return
    who = f"sandbox {name!r}" if name is not None else "a sandbox"
    data: dict[str, object] = {"state": str(src), "to": str(dst)}
    if name is not None:
        data["sandbox"] = name
    raise Conflict(f"{who} cannot go from {src} to {dst}", data=data)


def sources(dst: State) -> frozenset[State]:
    """The states that may move to `dst`: the `expect` set of a store transition.

    Empty for `created`, which is only ever inserted.
    """
    return _SOURCES[dst]


def end_reason(*, requested: Reason | None, exit_code: int | None, signal: int | None,
               entered: bool, worker_error: bool = False, oom_killed: bool = False) -> Reason:
    """Decide the reason recorded when a worker process ends.

    `requested` is the reason the daemon decided before the end (a stop, a
    kill, a timer), or None. Exactly one of `exit_code` (0-255) and `signal`
    (the number that killed the worker) is set. `entered` says whether the
    worker wrote `entering`, `worker_error` whether it wrote an `error`
    line; the caller reads the status pipe to EOF first. `oom_killed` says
    that the kernel's OOM killer ended a process of the run's cgroup.

    A daemon decision wins, whatever the process did meanwhile. Then an OOM
    kill: the run used all the memory its cgroup allows. Otherwise a
    worker that never entered libkrun failed its launch if it exited with one
    of its launch statuses (2-5), and crashed if it died any other way (a
    signal, a Python traceback's status 1, a bare exit before `entering`).
    After `entering`, a launch status with an `error` line is still a failed
    launch (5: `krun_start_enter` returned, the VM never started); any other
    exit is the workload's (including 128+n after a signal the daemon did not
    send, which the worker turned into a guest shutdown); a signal death is
    a crash.
    """
    if (exit_code is None) == (signal is None):
        raise ValueError("exactly one of exit_code and signal must be given")
    if requested is not None:
        if requested not in REQUESTED_REASONS:
            raise ValueError(f"{requested} is not a reason the daemon can request")
        return requested
    if oom_killed:
        return Reason.OOM_KILLED
    if signal is not None:
        return Reason.WORKER_CRASHED
    if exit_code in LAUNCH_FAILURES and (worker_error or not entered):
        return Reason.LAUNCH_FAILED
    if not entered:
        return Reason.WORKER_CRASHED
    return Reason.EXITED


def final_state(reason: Reason) -> State:
    """The state a sandbox rests in once its run ended for `reason`."""
    match reason:
        case Reason.LAUNCH_FAILED:
            return State.FAILED
        case (Reason.EXITED | Reason.STOP_REQUESTED | Reason.KILLED | Reason.IDLE_TIMEOUT
              | Reason.MAX_DURATION | Reason.HEARTBEAT_LOST | Reason.WORKER_CRASHED
              | Reason.DAEMON_LOST | Reason.OOM_KILLED):
            return State.STOPPED
        case _:
            assert_never(reason)
