"""Runs and the state transitions that open and close them, as the state table allows.

A transition is one change (`session._change`): read the sandbox's state and
current run (`_CURRENT`), check the move (`_check`: the table of
`msbd.states`, then the run invariant), open or close the run, set the
state, append one event, read the record back for memory; all of it one
plain function on the database thread, one hop from the event loop.
`end_runs` applies the same checks and statements to many sandboxes at once
(restart reconciliation), set-based.

The run invariant: a sandbox in a live state (starting, running, paused, stopping)
has an open current run, and one in any other state has none. A move the
table allows but the record cannot take (a damaged row, a caller's bug) is a
`StoreError`; a move the table forbids is a `Conflict`.
"""

from __future__ import annotations

import datetime as dt
import functools
from collections.abc import Iterable, Mapping
from typing import Any, Final

import msgspec

from msbd.db.records import ENCODER, STATES, Row, Unreadable, utc
from msbd.db.session import Connection, Draft, Session
from msbd.errors import NotFound, StoreError
from msbd.model import LIVE_STATES, Event, Owner, Reason, SandboxInfo, SandboxRef, State
from msbd.states import check_transition

_LIVE_VALUES: Final = tuple(sorted(s.value for s in LIVE_STATES))
_LIVE_SELECT: Final = f"""
SELECT s.id, s.name, r.id, s.state, r.pid, r.proc_start, r.boot_id, r.started_at
FROM sandboxes AS s JOIN runs AS r ON r.id = s.current_run
WHERE s.state IN ({", ".join("?" * len(_LIVE_VALUES))}) ORDER BY r.id
"""
# A transition's statements, shared by `transition` and `end_runs`: read the
# current state and run, close the run, set the state.
_CURRENT: Final = ("SELECT s.id, s.state, s.owner_uid, s.current_run, r.ended_at IS NULL"
                   " FROM sandboxes AS s LEFT JOIN runs AS r ON r.id = s.current_run WHERE ")
_END_RUN: Final = ("UPDATE runs SET ended_at = ?, reason = ?, exit_code = ?, signal = ?,"
                   " detail = ? WHERE id = ?")
_SET_STATE: Final = "UPDATE sandboxes SET state = ?, updated_at = ?, current_run = ? WHERE id = ?"


class RunEnd(msgspec.Struct, frozen=True, kw_only=True):
    """How a run ended, written on the transition that closes it."""

    reason: Reason
    exit_code: int | None = None
    signal: int | None = None
    detail: str | None = None

    def values(self, now: float, run_id: int | None) -> tuple[Any, ...]:
        """The parameters of `_END_RUN`."""
        return (now, self.reason.value, self.exit_code, self.signal, self.detail, run_id)


class LiveRun(msgspec.Struct, frozen=True, kw_only=True):
    """A run the database believes alive: what restart reconciliation checks."""

    ref: SandboxRef
    run_id: int
    state: State
    pid: int | None
    proc_start: int | None
    boot_id: str | None
    started_at: dt.datetime


def _check(ref: SandboxRef, current: Mapping[int, Row], to: State, *, start_run: bool = False,
           end: RunEnd | None = None) -> tuple[int, int | None]:
    """(owner uid, current run) of `ref`, if moving it to `to` is legal; raises otherwise.

    `current` maps sandbox ids to their `_CURRENT` rows. `NotFound` if `ref` is
    not there; `Conflict` if the state table forbids the move; `StoreError`
    (a caller's bug, or a damaged record) if the move would break the run
    invariant: a sandbox in a live state (starting, running, paused, stopping) has an
    open current run, and one in any other state has none.
    """
    if ref.id not in current:
        raise NotFound(ref.name)
    _, state_value, owner_uid, run_id, run_open = current[ref.id]
    state = STATES.get(state_value)
    if state is None:
        raise Unreadable(f"sandbox {ref.name!r}", ref.name, f"unknown state {state_value!r}")
    check_transition(state, to, name=ref.name)
    run_open = run_id is not None and bool(run_open)
    problem = None
    if start_run and run_open:
        problem = f"run {run_id} is still open"
    elif not start_run and end is not None and not run_open:
        problem = "there is no open run to end"
    elif (to in LIVE_STATES) != ((start_run or run_open) and end is None):
        problem = (f"a {to} sandbox must have an open run" if to in LIVE_STATES
                   else f"a {to} sandbox must not have an open run")
    if problem is not None:
        raise StoreError(f"cannot move sandbox {ref.name!r} from {state} to {to}: {problem}",
                         data={"sandbox": ref.name, "state": state.value, "to": to.value})
    return owner_uid, run_id


def _event(ref: SandboxRef, to: State, *, now: float, run_id: int | None,
           end: RunEnd | None, detail: str | None = None) -> Event:
    """The event of a transition: `detail`, or else the run end's own."""
    event = Event(seq=0, time=utc(now), sandbox=ref.name, sandbox_id=ref.id, state=to,
                  run_id=run_id, detail=detail)
    if end is None:
        return event
    return msgspec.structs.replace(event, reason=end.reason, exit_code=end.exit_code,
                                   signal=end.signal,
                                   detail=end.detail if detail is None else detail)


def _transition(db: Connection, draft: Draft, ref: SandboxRef, to: State, *, now: float,
                start_run: bool = False, end: RunEnd | None = None,
                detail: str | None = None) -> tuple[SandboxInfo, Owner, Event]:
    """A transition's statements, on the database thread; the record as it left it."""
    rows = db.execute(_CURRENT + "s.id = ?", (ref.id,)).fetchall()
    owner_uid, run_id = _check(ref, {row[0]: row for row in rows}, to, start_run=start_run,
                               end=end)
    if start_run:
        run_id = db.execute("INSERT INTO runs (sandbox_id, started_at) VALUES (?, ?)",
                            (ref.id, now)).lastrowid
    if end is not None:
        db.execute(_END_RUN, end.values(now, run_id))
    db.execute(_SET_STATE, (to.value, now, run_id, ref.id))
    event = draft.append(db, now, owner_uid, _event(ref, to, now=now, run_id=run_id, end=end,
                                                    detail=detail))
    entry = draft.reread(db, [ref.id])[ref.id]
    assert entry is not None
    return entry.info(), entry.owner, event


def _end_runs(db: Connection, draft: Draft, todo: list[tuple[SandboxRef, RunEnd]], *,
              now: float) -> list[Event]:
    """`end_runs`' statements, on the database thread."""
    to = State.STOPPED
    wanted = ENCODER.encode([ref.id for ref, _ in todo]).decode()
    rows = db.execute(_CURRENT + "s.id IN (SELECT value FROM json_each(?))",
                      (wanted,)).fetchall()
    current = {row[0]: row for row in rows}
    checked = [(ref, end, *_check(ref, current, to, end=end)) for ref, end in todo]
    db.executemany(_END_RUN, [end.values(now, run_id) for _, end, _, run_id in checked])
    db.executemany(_SET_STATE, [(to.value, now, run_id, ref.id)
                                for ref, _, _, run_id in checked])
    events = [draft.append(db, now, owner_uid, _event(ref, to, now=now, run_id=run_id,
                                                      end=end))
              for ref, end, owner_uid, run_id in checked]
    draft.reread(db, [ref.id for ref, _ in todo])
    return events


def _set_process(db: Connection, draft: Draft, ref: SandboxRef, run_id: int, *, pid: int,
                 proc_start: int | None, boot_id: str | None) -> None:
    cursor = db.execute("UPDATE runs SET pid = ?, proc_start = ?, boot_id = ?"
                        " WHERE id = ? AND sandbox_id = ?",
                        (pid, proc_start, boot_id, run_id, ref.id))
    if cursor.rowcount != 1:
        raise NotFound(ref.name)
    draft.reread(db, [ref.id])


class Runs(Session):
    """Run records and transitions, over the session's connection."""

    async def begin_run(self, ref: SandboxRef, *, now: float) -> tuple[SandboxInfo, Owner]:
        """Open a new run and move the sandbox to `starting` (`Conflict` unless the state
        table allows it from the current state).

        Returns the record as read inside that same transaction, with its
        owner: what gets launched is exactly what this transaction saw.
        """
        info, owner, _ = await self._change(functools.partial(
            _transition, ref=ref, to=State.STARTING, now=now, start_run=True))
        return info, owner

    async def transition(self, ref: SandboxRef, to: State, *, now: float,
                         end: RunEnd | None = None, detail: str | None = None,
                         ) -> tuple[SandboxInfo, Event]:
        """Move a sandbox to `to` in one transaction and record one event.

        `Conflict` unless `msbd.states.TRANSITIONS` allows the move from the
        current state. `end` closes the current run at `now`. The event's
        `detail` is `detail`, or else `end.detail`.

        Invariant, checked before anything is written (`StoreError` if broken,
        a caller's bug): a sandbox in a live state (starting, running,
        paused, stopping) has an open current run, and one in any other state has none.
        """
        info, _, event = await self._change(functools.partial(
            _transition, ref=ref, to=to, now=now, end=end, detail=detail))
        return info, event

    async def end_runs(self, ends: Iterable[tuple[SandboxRef, RunEnd]], *,
                       now: float) -> list[Event]:
        """End the current run of each named live sandbox and move it to `stopped`.

        All in one transaction (restart reconciliation: all or nothing), one
        event each; the same checks and statements as `transition`, but
        set-based (a few statements for any number of runs), in one hop to
        the database thread.
        """
        todo = list(ends)
        if not todo:
            return []
        return await self._change(functools.partial(_end_runs, todo=todo, now=now))

    async def set_run_process(self, ref: SandboxRef, run_id: int, *, pid: int,
                              proc_start: int | None, boot_id: str | None) -> None:
        """Record which process run `run_id` of `ref` is, once it is spawned.

        Not a state change, so no event. The run may have ended already (the
        worker died at once); its record still gets the pid. `NotFound` if the
        sandbox (or that run of it) is gone.
        """
        await self._change(functools.partial(_set_process, ref=ref, run_id=run_id, pid=pid,
                                             proc_start=proc_start, boot_id=boot_id))

    async def live_runs(self) -> list[LiveRun]:
        """Current runs of sandboxes in a live state, by run id."""
        rows = await self._fetch(_LIVE_SELECT, _LIVE_VALUES)
        return [LiveRun(ref=SandboxRef(sandbox_id, name), run_id=run_id, state=STATES[state],
                        pid=pid, proc_start=proc_start, boot_id=boot_id,
                        started_at=utc(started_at))
                for sandbox_id, name, run_id, state, pid, proc_start, boot_id, started_at
                in rows]
