"""One live run as the daemon holds it in memory, and how its end is worded.

A `Live` exists from the spawn of a sandbox's worker until the end of that
run is on disk. Two events mark its last steps, in this order:

- `exited`: the worker process is gone and reaped. What it held (its share
  of the limits, its timers, its pipes) is given back at this point.
- `ended`: the run's end is recorded in the database. Until then `pending`
  holds the record as it will be written, so reads show the truth and a
  write that fails (a full disk) is retried without the sandbox looking
  alive. A new start of the sandbox waits for `ended`.

Everything here is plain data and pure functions of it; the supervisor does
the I/O.
"""

from __future__ import annotations

import datetime as dt
import signal as signal_mod
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import msgspec

from msbd import states
from msbd.contract import signame
from msbd.daemon.console import ConsoleLog
from msbd.daemon.spawn import Worker
from msbd.db.store import RunEnd
from msbd.model import LaunchSpec, Reason, SandboxInfo, SandboxRef, State


@dataclass(eq=False)
class Live:
    """One running worker, as the daemon tracks it in memory."""

    ref: SandboxRef
    owner_uid: int
    spec: LaunchSpec
    run_id: int
    worker: Worker
    console: ConsoleLog
    state: State = State.STARTING
    started: float = 0.0
    last_activity: float = 0.0
    last_beat: float = 0.0
    requested: Reason | None = None
    stop_detail: str | None = None
    entered: bool = False
    reaped: bool = False
    console_full: bool = False
    error_line: str | None = None
    last_output_line: str = ""
    pending: tuple[State, RunEnd, float] | None = None  # (to, end, when), not yet on disk
    cgroup: Path | None = None  # the run's cgroup (msbd.daemon.cgroups), None if off
    oom: str | None = None  # set at the end when the cgroup counted an OOM kill: the words
    paused_at: float | None = None  # when a freeze began (msbd.daemon.freezer); None: thawed
    write_error: str | None = None
    running: anyio.Event = field(default_factory=anyio.Event)
    exited: anyio.Event = field(default_factory=anyio.Event)
    ended: anyio.Event = field(default_factory=anyio.Event)
    output: anyio.Event = field(default_factory=anyio.Event)
    final: SandboxInfo | None = None
    lock: anyio.Lock = field(default_factory=anyio.Lock)

    @property
    def pid(self) -> int:
        return self.worker.pid

    @property
    def name(self) -> str:
        return self.ref.name

    def describe(self) -> str:
        """Its state in words, for a refusal (`sandbox 'x' is ...`)."""
        if self.exited.is_set():
            return ("ended, but its end is not recorded yet (the database refused the write: "
                    f"{self.write_error or 'unknown error'}; msbd keeps retrying)")
        return str(self.state)


def live_cgroups(lives: Mapping[int, Live]) -> list[Path]:
    """The cgroups of the runs whose worker is not reaped yet (their cgroups still exist)."""
    return [live.cgroup for live in lives.values() if live.cgroup is not None and not live.reaped]


def overlay(live: Live, info: SandboxInfo) -> SandboxInfo:
    """`info` with `live`'s end if that end is not recorded yet, else `info` itself."""
    if live.pending is None or info.run is None:
        return info
    to, end, ended_at = live.pending
    when = dt.datetime.fromtimestamp(ended_at, dt.UTC)
    run = msgspec.structs.replace(info.run, ended_at=when, reason=end.reason,
                                  exit_code=end.exit_code, signal=end.signal,
                                  detail=end.detail)
    return msgspec.structs.replace(info, state=to, updated_at=when, run=run)


def end_reason(live: Live, exit_code: int | None, sig: int | None) -> Reason:
    """Why `live`'s run ended, once its worker is reaped (see `states.end_reason`)."""
    if live.requested is Reason.LAUNCH_FAILED:
        return Reason.LAUNCH_FAILED
    if exit_code is None and sig is None:
        sig = signal_mod.SIGKILL
    return states.end_reason(requested=live.requested, exit_code=exit_code, signal=sig,
                             entered=live.entered, worker_error=live.error_line is not None,
                             oom_killed=live.oom is not None)


# Exit statuses of the guest's init that are about the workload, not from it.
INIT_STATUSES = {
    125: "the guest could not set up the workload's environment",
    126: "the workload is not executable",
    127: "the workload was not found",
}


def end_detail(live: Live, reason: Reason, exit_code: int | None, sig: int | None) -> str | None:
    """The words recorded with the end: why it was stopped, what the worker said."""
    parts: list[str] = []
    if live.stop_detail:
        parts.append(live.stop_detail)
    if reason is Reason.OOM_KILLED and live.oom:
        parts.append(live.oom)
    if reason is Reason.EXITED and exit_code in INIT_STATUSES:
        parts.append(f"status {exit_code}: {INIT_STATUSES[exit_code]}")
        if live.last_output_line:
            parts.append(f"last output: {live.last_output_line}")
    if reason in (Reason.LAUNCH_FAILED, Reason.WORKER_CRASHED):
        if live.error_line:
            parts.append(live.error_line)
        elif sig is not None:
            parts.append(f"the worker was killed by {signame(sig)}")
        elif exit_code is not None:
            parts.append(f"the worker exited with status {exit_code}")
        if live.last_output_line and live.last_output_line not in parts:
            parts.append(f"last output: {live.last_output_line}")
    return "; ".join(parts) or None
