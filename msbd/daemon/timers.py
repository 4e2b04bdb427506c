"""One deadline scheduler for every sandbox: a pure heap of deadlines and a thin anyio loop.

How it works
------------
`Deadlines` holds at most one absolute monotonic deadline per (key,
`TimerKind`); the daemon's key is the sandbox id. Setting a key again replaces
its deadline (every console write moves IDLE later); the old heap entry is
left in place and skipped when it surfaces (lazy invalidation), and the heap
is rebuilt from the live entries once stale entries outnumber them. So set,
cancel and pop are O(log n) amortised for thousands of sandboxes. A
deadline fires once: `pop_due` removes it. Ties fire in the order they were
set. Nothing here reads a clock: every method takes the numbers.

`Scheduler` is the I/O shell: one task waits until the earliest deadline or
until a new deadline earlier than the one it waits for is set, then pops
everything due by its clock and calls `fire(key, kind)` for each. It never
fires early: a deadline fires only once `clock() >= deadline`. When more fell
due while it fired (a burst of a thousand stops), it yields to the loop once
before the next batch: the other tasks (reaping, records, calls) are never
starved for the length of the burst.
"""

from __future__ import annotations

import collections
import dataclasses
import enum
import heapq
import math
import statistics
import time
from collections.abc import Awaitable, Callable, Coroutine, Hashable
from typing import Any, Final, NamedTuple

import anyio
import anyio.abc
import anyio.lowlevel


class TimerKind(enum.StrEnum):
    IDLE = "idle"
    """No activity for the spec's `idle_timeout`: the run ends as `idle_timeout`."""
    MAX_DURATION = "max_duration"
    """The run reached the spec's `max_duration`: it ends as `max_duration`."""
    HEARTBEAT = "heartbeat"
    """Too many heartbeats missed: the run ends as `heartbeat_lost`."""
    KILL_GRACE = "kill_grace"
    """The grace after SIGTERM is over: the worker gets SIGKILL."""


Key = Hashable
"""Whose deadline: any hashable value (the daemon uses sandbox ids)."""


class Due(NamedTuple):
    key: Key
    kind: TimerKind
    deadline: float


# --- policy: when each deadline falls -----------------------------------------


def idle_deadline(last_activity: float, idle_timeout: float | None) -> float | None:
    """The idle deadline: `idle_timeout` seconds after the last activity, if there is one."""
    if idle_timeout is None:
        return None
    _check_timeout("idle_timeout", idle_timeout)
    return last_activity + idle_timeout


def max_duration_deadline(started: float, max_duration: float | None) -> float | None:
    """The hard limit: `max_duration` seconds after the run started, if there is one."""
    if max_duration is None:
        return None
    _check_timeout("max_duration", max_duration)
    return started + max_duration


def heartbeat_deadline(last_beat: float, interval: float, misses: int) -> float:
    """When the run counts as lost if no heartbeat arrives after `last_beat`.

    Heartbeats are due every `interval` seconds. `misses` is how many of them
    in a row may go missing; the run is lost when the one after those is due
    too, i.e. at `last_beat + interval * (misses + 1)`. With `misses=0` the
    very next beat must be on time (no slack at all; not a useful setting).
    """
    if not interval > 0 or math.isinf(interval):
        raise ValueError(f"heartbeat interval must be positive and finite, got {interval!r}")
    if misses < 0:
        raise ValueError(f"heartbeat misses must be >= 0, got {misses!r}")
    return last_beat + interval * (misses + 1)


def grace_deadline(now: float, grace: float, *, margin: float = 0.0) -> float:
    """When SIGKILL follows a SIGTERM sent at `now` with `grace` seconds to shut down,
    and `margin` more for what must still happen after the grace."""
    _check_timeout("grace", grace)
    _check_timeout("margin", margin)
    return now + grace + margin


def whole_ms(delay: float) -> float:
    """`delay` rounded up to whole milliseconds, less a microsecond: what to wait for so
    that a loop whose clock counts whole milliseconds (uvloop's) wakes on the tick that
    passes `delay`. Waited for as is, a deadline between two ticks is re-armed by anyio on
    every loop iteration until the clock passes it: a busy loop of up to a millisecond
    per wait (measured: hundreds of re-arms per wait, several times the CPU)."""
    return math.ceil(delay * 1000) / 1000 - 1e-6


def _check_timeout(what: str, timeout: float) -> None:
    if not timeout >= 0:  # also refuses NaN
        raise ValueError(f"{what} must be >= 0 seconds, got {timeout!r}")


# --- the pure core --------------------------------------------------------------

_Slot = tuple[Key, TimerKind]
_MIN_COMPACT: Final = 64


class Deadlines:
    """At most one deadline per (key, kind), earliest first. No clock, no I/O."""

    def __init__(self) -> None:
        # Live deadlines: key -> (deadline, seq); a heap entry is live iff its seq matches.
        self._live: dict[_Slot, tuple[float, int]] = {}
        self._heap: list[tuple[float, int, Key, TimerKind]] = []
        self._seq = 0

    def __len__(self) -> int:
        return len(self._live)

    @property
    def stored(self) -> int:
        """Heap entries held, live and stale: never more than `max(2 * len(self), 64)`."""
        return len(self._heap)

    def set(self, key: Key, kind: TimerKind, deadline: float) -> None:
        """Set (or move, earlier or later) the deadline of (key, kind)."""
        if math.isnan(deadline):
            raise ValueError("a deadline cannot be NaN")
        self._seq += 1
        self._live[key, kind] = (deadline, self._seq)
        heapq.heappush(self._heap, (deadline, self._seq, key, kind))
        self._maybe_compact()

    def cancel(self, key: Key, kind: TimerKind) -> None:
        """Forget the deadline of (key, kind), if any."""
        if self._live.pop((key, kind), None) is not None:
            self._maybe_compact()

    def cancel_all(self, key: Key) -> None:
        """Forget every deadline of `key`."""
        for kind in TimerKind:
            self._live.pop((key, kind), None)
        self._maybe_compact()

    def get(self, key: Key, kind: TimerKind) -> float | None:
        live = self._live.get((key, kind))
        return None if live is None else live[0]

    def next_deadline(self) -> float | None:
        """The earliest live deadline, or None if there is none."""
        self._drop_stale_top()
        return self._heap[0][0] if self._heap else None

    def pop_due(self, now: float) -> list[Due]:
        """Remove and return every deadline `<= now`, earliest first, ties in set order."""
        due: list[Due] = []
        heap, live = self._heap, self._live
        while heap and heap[0][0] <= now:
            deadline, seq, key, kind = heapq.heappop(heap)
            current = live.get((key, kind))
            if current is not None and current[1] == seq:
                del live[key, kind]
                due.append(Due(key, kind, deadline))
        self._maybe_compact()
        return due

    def _drop_stale_top(self) -> None:
        heap, live = self._heap, self._live
        while heap:
            _, seq, key, kind = heap[0]
            current = live.get((key, kind))
            if current is not None and current[1] == seq:
                return
            heapq.heappop(heap)

    def _maybe_compact(self) -> None:
        # Stale entries outnumber live ones: rebuild from the live set (O(n),
        # after at least n stale operations, so O(1) amortised).
        if len(self._heap) > _MIN_COMPACT and len(self._heap) > 2 * len(self._live):
            self._heap = [(d, seq, key, kind) for (key, kind), (d, seq) in self._live.items()]
            heapq.heapify(self._heap)


# --- the async shell ------------------------------------------------------------

Fire = Callable[[Any, TimerKind], Awaitable[None] | None]


@dataclasses.dataclass(frozen=True, slots=True)
class Lateness:
    """How late deadlines fired (`fired_at - deadline`, seconds).

    `fired`, `mean` and `max` cover every deadline fired; the percentiles
    cover the most recent samples only (`lateness_samples`).
    """

    fired: int
    mean: float
    max: float
    p50: float
    p99: float


class Scheduler:
    """Runs `Deadlines` against a monotonic clock: one task for all sandboxes.

    `set` and `cancel_all` may be called at any time from the
    event loop's thread, before or while `run` runs.
    """

    def __init__(self, *, clock: Callable[[], float] = time.monotonic,
                 max_samples: int = 4096,
                 on_late: Callable[[float], None] | None = None) -> None:
        self._deadlines = Deadlines()
        self._clock = clock
        self._on_late = on_late  # told each lateness before its fire (msbd.daemon.priority)
        self._changed: anyio.Event | None = None
        # The deadline the loop is waiting for; -inf while it is not waiting
        # (it will look at the heap again anyway), +inf when there is none.
        self._waiting_for = -math.inf
        self._samples: collections.deque[float] = collections.deque(maxlen=max_samples)
        self._fired = 0
        self._late_total = 0.0
        self._late_max = 0.0
        self._caught_up: anyio.Event | None = None  # set while `run` waits (`caught_up`)

    def now(self) -> float:
        return self._clock()

    def __len__(self) -> int:
        return len(self._deadlines)

    def set(self, key: Key, kind: TimerKind, deadline: float) -> None:
        """Set or move a deadline; wakes the loop only if it now has to fire sooner."""
        self._deadlines.set(key, kind, deadline)
        if deadline < self._waiting_for and self._changed is not None:
            self._changed.set()

    def cancel(self, key: Key, kind: TimerKind) -> None:
        self._deadlines.cancel(key, kind)

    def cancel_all(self, key: Key) -> None:
        self._deadlines.cancel_all(key)

    def get(self, key: Key, kind: TimerKind) -> float | None:
        return self._deadlines.get(key, kind)

    def next_deadline(self) -> float | None:
        """The earliest deadline set, or None."""
        return self._deadlines.next_deadline()

    async def caught_up(self) -> None:
        """Return once `run` waits for its next deadline, not in the middle of a burst (at
        once when it is not running)."""
        event = self._caught_up
        if event is not None:
            await event.wait()

    async def run(self, fire: Fire, *,
                  task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Fire deadlines as they fall due, until cancelled.

        `fire(key, kind)` is called once per due deadline, in deadline order,
        from this task. It must not block: it should record the fact or start
        the work in a task group its caller owns (`tg.start_soon`). If it
        returns an awaitable, that is awaited before the next deadline fires.
        An exception from `fire` ends `run` with that exception.
        """
        if self._changed is not None:
            raise RuntimeError("Scheduler.run is already running")
        self._changed = anyio.Event()
        self._caught_up = anyio.Event()
        task_status.started()
        try:
            while True:
                for due in self._deadlines.pop_due(self._clock()):
                    late = self._clock() - due.deadline
                    self._record(late)
                    if self._on_late is not None:
                        self._on_late(late)
                    result = fire(due.key, due.kind)
                    if result is not None:
                        await result
                # No await from here to the wait: a `set` cannot slip between.
                self._changed = anyio.Event()
                deadline = self._deadlines.next_deadline()
                if deadline is None:
                    self._waiting_for = math.inf
                    self._caught_up.set()
                    await self._changed.wait()
                else:
                    delay = deadline - self._clock()
                    if delay <= 0:
                        # More fell due while firing (a burst): fire them, but only after
                        # the loop's other ready work had its turn, never starving it.
                        await anyio.lowlevel.checkpoint()
                        continue
                    self._waiting_for = deadline
                    self._caught_up.set()
                    with anyio.move_on_after(whole_ms(delay)):
                        await self._changed.wait()
                self._waiting_for = -math.inf
                self._caught_up = anyio.Event()
        finally:
            self._changed = None
            self._waiting_for = -math.inf
            self._caught_up.set()  # nobody waits for a scheduler that has stopped
            self._caught_up = None

    def lateness_samples(self) -> list[float]:
        """The most recent `fired_at - deadline` samples (at most `max_samples`), oldest first."""
        return list(self._samples)

    def lateness(self) -> Lateness:
        samples = sorted(self._samples)
        if not samples:
            return Lateness(0, 0.0, 0.0, 0.0, 0.0)
        p99 = samples[min(len(samples) - 1, math.ceil(0.99 * len(samples)) - 1)]
        return Lateness(self._fired, self._late_total / self._fired, self._late_max,
                        statistics.median(samples), p99)

    def _record(self, late: float) -> None:
        self._samples.append(late)
        self._fired += 1
        self._late_total += late
        self._late_max = max(self._late_max, late)


class AfterFires:
    """Work a fire leaves for later: started `chunk` tasks at a time, only while the
    scheduler has caught up (waits for its next deadline), never in the middle of a burst.

    Why: in a burst (a thousand idle deadlines within 150 ms) the fires must
    go first. A task spawned per fire (its `stopping` record) ran between the
    fires, and the later deadlines fired tens of milliseconds late; queued
    here, the records start once the scheduler has caught up, a chunk per
    turn of the loop, so a deadline falling meanwhile waits for one chunk's
    first steps at most.
    """

    def __init__(self, scheduler: Scheduler, task_group: anyio.abc.TaskGroup, *,
                 chunk: int = 32) -> None:
        self._scheduler = scheduler
        self._tg = task_group
        self._chunk = chunk
        self._queue: list[tuple[Callable[..., Coroutine[Any, Any, None]], tuple[Any, ...]]] = []
        self._draining = False

    def add(self, fn: Callable[..., Coroutine[Any, Any, None]], *args: Any) -> None:
        """Run `fn(*args)` in the task group when the burst allows (no await)."""
        self._queue.append((fn, args))
        if not self._draining:
            self._draining = True
            self._tg.start_soon(self._drain)

    async def _drain(self) -> None:
        try:
            while self._queue:
                await self._scheduler.caught_up()
                chunk, self._queue = self._queue[:self._chunk], self._queue[self._chunk:]
                for fn, args in chunk:
                    self._tg.start_soon(fn, *args)
                await anyio.lowlevel.checkpoint()
        finally:
            self._draining = False
