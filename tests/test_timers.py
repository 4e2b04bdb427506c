"""The deadline scheduler: the pure heap with plain numbers, the policy, the async loop."""

from __future__ import annotations

import math
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import anyio
import anyio.lowlevel
import hypothesis.strategies as st
import pytest
from hypothesis import settings
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from msbd.daemon.timers import (
    AfterFires,
    Deadlines,
    Due,
    Scheduler,
    TimerKind,
    grace_deadline,
    heartbeat_deadline,
    idle_deadline,
    max_duration_deadline,
)

IDLE, MAX, BEAT, GRACE = (TimerKind.IDLE, TimerKind.MAX_DURATION, TimerKind.HEARTBEAT,
                          TimerKind.KILL_GRACE)

# --- the pure core -------------------------------------------------------------------


def test_empty() -> None:
    d = Deadlines()
    assert len(d) == 0
    assert d.next_deadline() is None
    assert d.pop_due(math.inf) == []
    assert d.get("a", IDLE) is None


def test_pop_due_returns_only_due_deadlines_earliest_first() -> None:
    d = Deadlines()
    d.set("c", IDLE, 30.0)
    d.set("a", MAX, 10.0)
    d.set("b", BEAT, 20.0)
    d.set("d", GRACE, 40.0)
    assert d.next_deadline() == 10.0
    assert d.pop_due(9.999) == []
    assert d.pop_due(30.0) == [Due("a", MAX, 10.0), Due("b", BEAT, 20.0), Due("c", IDLE, 30.0)]
    assert len(d) == 1
    assert d.next_deadline() == 40.0
    assert d.pop_due(30.0) == []


def test_ties_fire_in_the_order_they_were_set() -> None:
    d = Deadlines()
    for name in ["z", "a", "m"]:
        d.set(name, IDLE, 5.0)
    d.set("a", MAX, 5.0)
    assert [(due.key, due.kind) for due in d.pop_due(5.0)] == [
        ("z", IDLE), ("a", IDLE), ("m", IDLE), ("a", MAX)]


def test_a_reset_moves_the_deadline_later_and_the_old_one_never_fires() -> None:
    d = Deadlines()
    d.set("a", IDLE, 10.0)
    d.set("a", IDLE, 20.0)
    assert d.get("a", IDLE) == 20.0
    assert d.next_deadline() == 20.0
    assert d.pop_due(15.0) == []
    assert d.pop_due(20.0) == [Due("a", IDLE, 20.0)]
    assert d.pop_due(math.inf) == []


def test_a_reset_can_move_the_deadline_earlier() -> None:
    d = Deadlines()
    d.set("a", IDLE, 20.0)
    d.set("a", IDLE, 10.0)
    assert d.pop_due(10.0) == [Due("a", IDLE, 10.0)]
    assert d.pop_due(math.inf) == []


def test_setting_the_same_deadline_again_fires_once() -> None:
    d = Deadlines()
    d.set("a", IDLE, 10.0)
    d.set("a", IDLE, 20.0)
    d.set("a", IDLE, 10.0)
    assert d.pop_due(math.inf) == [Due("a", IDLE, 10.0)]


def test_a_fired_deadline_can_be_set_again() -> None:
    d = Deadlines()
    d.set("a", BEAT, 1.0)
    assert d.pop_due(1.0) == [Due("a", BEAT, 1.0)]
    d.set("a", BEAT, 2.0)
    assert d.pop_due(2.0) == [Due("a", BEAT, 2.0)]


def test_cancel() -> None:
    d = Deadlines()
    d.set("a", IDLE, 1.0)
    d.set("a", MAX, 2.0)
    d.cancel("a", IDLE)
    d.cancel("a", IDLE)  # again: nothing to do
    d.cancel("nobody", GRACE)
    assert d.get("a", IDLE) is None
    assert d.next_deadline() == 2.0
    assert d.pop_due(math.inf) == [Due("a", MAX, 2.0)]


def test_cancel_all_forgets_one_sandbox_only() -> None:
    d = Deadlines()
    for kind in TimerKind:
        d.set("a", kind, 1.0)
    d.set("b", IDLE, 3.0)
    d.cancel_all("a")
    d.cancel_all("nobody")
    assert len(d) == 1
    assert d.next_deadline() == 3.0
    assert d.pop_due(math.inf) == [Due("b", IDLE, 3.0)]


def test_infinite_deadlines_are_kept_nan_is_refused() -> None:
    d = Deadlines()
    d.set("a", IDLE, math.inf)
    assert d.next_deadline() == math.inf
    assert d.pop_due(1e300) == []
    with pytest.raises(ValueError, match="NaN"):
        d.set("a", IDLE, math.nan)
    assert d.get("a", IDLE) == math.inf


def test_ten_thousand_random_operations_against_a_naive_model() -> None:
    rng = random.Random(20240611)
    d = Deadlines()
    model: dict[tuple[str, TimerKind], tuple[float, int]] = {}
    names = [f"sb{i}" for i in range(300)]
    kinds = list(TimerKind)
    now, seq, fired = 0.0, 0, 0
    for _ in range(10_000):
        op = rng.random()
        if op < 0.75:  # set or reset, mostly later (activity)
            name, kind = rng.choice(names), rng.choice(kinds)
            deadline = now + rng.choice([0.0, rng.uniform(0, 50), float(rng.randint(0, 5))])
            seq += 1
            d.set(name, kind, deadline)
            model[name, kind] = (deadline, seq)
        elif op < 0.85:
            name, kind = rng.choice(names), rng.choice(kinds)
            d.cancel(name, kind)
            model.pop((name, kind), None)
        elif op < 0.87:
            name = rng.choice(names)
            d.cancel_all(name)
            for kind in kinds:
                model.pop((name, kind), None)
        else:
            now += rng.uniform(0, 3)
            due = sorted((v, k) for k, v in model.items() if v[0] <= now)
            expected = [Due(k[0], k[1], v[0]) for v, k in due]
            for _, k in due:
                del model[k]
            assert d.pop_due(now) == expected
            fired += len(expected)
        assert len(d) == len(model)
        assert d.next_deadline() == min((v[0] for v in model.values()), default=None)
        assert d.stored <= max(2 * len(d), 64)
    assert fired > 1000  # the run exercised firing, not only resets


def test_frequent_resets_of_many_sandboxes_keep_memory_bounded() -> None:
    d = Deadlines()
    for t in range(100):  # 1,000 sandboxes, each reset 100 times
        for i in range(1000):
            d.set(f"sb{i}", IDLE, t + 60.0)
        assert d.stored <= 2 * len(d)
    assert len(d) == 1000
    due = d.pop_due(math.inf)
    assert len(due) == 1000
    assert {x.deadline for x in due} == {99 + 60.0}


class DeadlinesMachine(RuleBasedStateMachine):
    """Any sequence of operations agrees with a dict and a sort."""

    def __init__(self) -> None:
        super().__init__()
        self.d = Deadlines()
        self.model: dict[tuple[str, TimerKind], tuple[float, int]] = {}
        self.seq = 0

    names = st.sampled_from(["a", "b", "c"])
    kinds = st.sampled_from(list(TimerKind))
    times = st.integers(0, 20).map(float)

    @rule(name=names, kind=kinds, deadline=times)
    def set(self, name: str, kind: TimerKind, deadline: float) -> None:
        self.seq += 1
        self.d.set(name, kind, deadline)
        self.model[name, kind] = (deadline, self.seq)

    @rule(name=names, kind=kinds)
    def cancel(self, name: str, kind: TimerKind) -> None:
        self.d.cancel(name, kind)
        self.model.pop((name, kind), None)

    @rule(name=names)
    def cancel_all(self, name: str) -> None:
        self.d.cancel_all(name)
        self.model = {k: v for k, v in self.model.items() if k[0] != name}

    @rule(now=times)
    def pop_due(self, now: float) -> None:
        due = sorted((v, k) for k, v in self.model.items() if v[0] <= now)
        for _, k in due:
            del self.model[k]
        assert self.d.pop_due(now) == [Due(k[0], k[1], v[0]) for v, k in due]

    @invariant()
    def agrees(self) -> None:
        assert len(self.d) == len(self.model)
        assert self.d.next_deadline() == min((v[0] for v in self.model.values()), default=None)
        for (name, kind), (deadline, _) in self.model.items():
            assert self.d.get(name, kind) == deadline


TestDeadlinesMachine = DeadlinesMachine.TestCase
TestDeadlinesMachine.settings = settings(max_examples=100, stateful_step_count=50,
                                         database=None, deadline=None)

# --- policy arithmetic ---------------------------------------------------------------


@pytest.mark.parametrize(("last", "timeout", "expected"), [
    (100.0, None, None), (100.0, 30.0, 130.0), (0.0, 0.5, 0.5), (100.0, 0.0, 100.0)])
def test_idle_deadline(last: float, timeout: float | None, expected: float | None) -> None:
    assert idle_deadline(last, timeout) == expected


@pytest.mark.parametrize(("started", "limit", "expected"), [
    (5.0, None, None), (5.0, 3600.0, 3605.0), (5.0, 0.25, 5.25)])
def test_max_duration_deadline(started: float, limit: float | None,
                               expected: float | None) -> None:
    assert max_duration_deadline(started, limit) == expected


@pytest.mark.parametrize(("last", "interval", "misses", "expected"), [
    (10.0, 1.0, 0, 11.0),  # the very next beat must be on time
    (10.0, 1.0, 1, 12.0),  # one beat may go missing
    (10.0, 1.0, 3, 14.0),
    (10.0, 0.5, 3, 12.0),
    (0.0, 2.0, 2, 6.0),
])
def test_heartbeat_deadline(last: float, interval: float, misses: int, expected: float) -> None:
    assert heartbeat_deadline(last, interval, misses) == expected


def test_grace_deadline() -> None:
    assert grace_deadline(50.0, 10.0) == 60.0
    assert grace_deadline(50.0, 0.0) == 50.0
    assert grace_deadline(50.0, 10.0, margin=7.0) == 67.0


@pytest.mark.parametrize("call", [
    lambda: idle_deadline(0.0, -1.0),
    lambda: idle_deadline(0.0, math.nan),
    lambda: max_duration_deadline(0.0, -0.1),
    lambda: grace_deadline(0.0, -5.0),
    lambda: grace_deadline(0.0, 5.0, margin=-1.0),
    lambda: heartbeat_deadline(0.0, 0.0, 3),
    lambda: heartbeat_deadline(0.0, -1.0, 3),
    lambda: heartbeat_deadline(0.0, math.inf, 3),
    lambda: heartbeat_deadline(0.0, math.nan, 3),
    lambda: heartbeat_deadline(0.0, 1.0, -1),
])
def test_policy_refuses_nonsense(call: Callable[[], object]) -> None:
    with pytest.raises(ValueError):
        call()


# --- the async scheduler -------------------------------------------------------------

GUARD = 10.0  # catches a hang; never a synchroniser


class Recorder:
    """A quick, non-blocking `fire`: records (name, kind, fired_at) and says when `n` fired."""

    def __init__(self, n: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.n = n
        self.clock = clock
        self.fired: list[tuple[str, TimerKind, float]] = []
        self.done = anyio.Event()

    def __call__(self, name: str, kind: TimerKind) -> None:
        self.fired.append((name, kind, self.clock()))
        if len(self.fired) >= self.n:
            self.done.set()

    async def wait(self) -> None:
        with anyio.fail_after(GUARD):
            await self.done.wait()


@asynccontextmanager
async def running(sched: Scheduler,
                  fire: Callable[[str, TimerKind], Awaitable[None] | None]) -> AsyncIterator[None]:
    async with anyio.create_task_group() as tg:
        await tg.start(sched.run, fire)
        yield
        tg.cancel_scope.cancel()


async def test_fires_in_deadline_order_and_never_early() -> None:
    sched, rec = Scheduler(), Recorder(3)
    t0 = time.monotonic()
    expected = {"c": t0 + 0.06, "b": t0 + 0.04, "a": t0 + 0.02}
    async with running(sched, rec):
        for name, deadline in expected.items():
            sched.set(name, IDLE, deadline)
        await rec.wait()
    assert [name for name, _, _ in rec.fired] == ["a", "b", "c"]
    for name, _, fired_at in rec.fired:
        assert fired_at >= expected[name]
    assert len(sched) == 0
    assert all(late >= 0 for late in sched.lateness_samples())


async def test_an_earlier_deadline_wakes_a_long_wait() -> None:
    sched, rec = Scheduler(), Recorder(1)
    async with running(sched, rec):
        sched.set("far", MAX, sched.now() + 3600)
        await anyio.lowlevel.checkpoint()
        near = sched.now() + 0.02
        sched.set("near", IDLE, near)
        await rec.wait()
    assert [(n, k) for n, k, _ in rec.fired] == [("near", IDLE)]
    assert rec.fired[0][2] >= near
    assert sched.get("far", MAX) is not None


async def test_a_deadline_set_while_idle_wakes_the_loop() -> None:
    sched, rec = Scheduler(), Recorder(1)
    async with running(sched, rec):
        await anyio.lowlevel.checkpoint()
        sched.set("a", BEAT, sched.now() + 0.01)
        await rec.wait()
    assert rec.fired[0][:2] == ("a", BEAT)


async def test_reset_and_cancel_while_running() -> None:
    sched, rec = Scheduler(), Recorder(2)
    async with running(sched, rec):
        t0 = sched.now()
        sched.set("reset", IDLE, t0 + 0.02)
        sched.set("cancelled", IDLE, t0 + 0.02)
        sched.set("cancelled", GRACE, t0 + 0.02)
        sched.set("gone", MAX, t0 + 0.03)
        sched.set("gone", GRACE, t0 + 0.03)
        sched.set("sentinel", MAX, t0 + 0.10)
        sched.set("reset", IDLE, t0 + 0.06)  # activity: later
        sched.cancel_all("cancelled")
        sched.cancel_all("gone")
        await rec.wait()
    assert [(n, k) for n, k, _ in rec.fired] == [("reset", IDLE), ("sentinel", MAX)]
    assert rec.fired[0][2] >= t0 + 0.06


async def test_fire_may_rearm_and_may_be_async() -> None:
    sched = Scheduler()
    done = anyio.Event()
    seen: list[tuple[str, TimerKind]] = []

    async def fire(name: str, kind: TimerKind) -> None:
        seen.append((name, kind))
        await anyio.lowlevel.checkpoint()
        if kind is IDLE:  # as the supervisor does: SIGTERM, then SIGKILL after the grace
            sched.set(name, GRACE, grace_deadline(sched.now(), 0.01))
        else:
            done.set()

    async with running(sched, fire):
        sched.set("a", IDLE, sched.now() + 0.01)
        with anyio.fail_after(GUARD):
            await done.wait()
    assert seen == [("a", IDLE), ("a", GRACE)]


async def test_an_error_in_fire_ends_run() -> None:
    sched = Scheduler()

    def fire(name: str, kind: TimerKind) -> None:
        raise LookupError(name)

    with anyio.fail_after(GUARD), pytest.RaisesGroup(pytest.RaisesExc(LookupError, match="a")):
        async with anyio.create_task_group() as tg:
            sched.set("a", IDLE, sched.now())
            await tg.start(sched.run, fire)


async def test_run_twice_at_once_is_refused_and_it_can_run_again_later() -> None:
    sched, rec = Scheduler(), Recorder(1)
    async with running(sched, rec):
        with pytest.raises(RuntimeError, match="already running"):
            await sched.run(rec)
    async with running(sched, rec):
        sched.set("a", IDLE, sched.now())
        await rec.wait()
    assert len(rec.fired) == 1


async def test_injected_clock_decides_what_is_due() -> None:
    fake_now = 1000.0
    sched, rec = Scheduler(clock=lambda: fake_now), Recorder(2, clock=lambda: fake_now)
    sched.set("future", MAX, 1e9)
    sched.set("past", IDLE, 999.0)
    sched.set("now", BEAT, 1000.0)
    async with running(sched, rec):
        await rec.wait()
    assert [n for n, _, _ in rec.fired] == ["past", "now"]
    assert sched.lateness_samples() == [1.0, 0.0]
    stats = sched.lateness()
    assert (stats.fired, stats.mean, stats.max) == (2, 0.5, 1.0)
    assert sched.get("future", MAX) == 1e9


async def test_lateness_samples_are_bounded() -> None:
    sched, rec = Scheduler(clock=lambda: 100.0, max_samples=10), Recorder(50)
    for i in range(50):
        sched.set(f"sb{i}", IDLE, float(i))
    async with running(sched, rec):
        await rec.wait()
    samples = sched.lateness_samples()
    assert samples == [100.0 - i for i in range(40, 50)]
    stats = sched.lateness()
    assert stats.fired == 50
    assert stats.max == 100.0
    assert stats.p50 == pytest.approx(55.5)
    assert stats.p99 == 60.0


async def _thousand_deadlines() -> tuple[list[str], dict[str, float], Scheduler, Recorder]:
    n = 1000
    sched, rec = Scheduler(), Recorder(n)
    names = [f"sb{i:04d}" for i in range(n)]
    t0 = time.monotonic()
    # Spread over ~100 ms, starting 50 ms out, set in random order.
    deadlines = {name: t0 + 0.05 + i * 0.0001 for i, name in enumerate(names)}
    order = names[:]
    random.Random(7).shuffle(order)
    async with running(sched, rec):
        for name in order:
            sched.set(name, IDLE, deadlines[name])
        await rec.wait()
    return names, deadlines, sched, rec


def _check_thousand(names: list[str], deadlines: dict[str, float], sched: Scheduler,
                    rec: Recorder) -> None:
    assert [n for n, _, _ in rec.fired] == names  # all of them, each once, in deadline order
    early = [(n, deadlines[n] - at) for n, _, at in rec.fired if at < deadlines[n]]
    assert early == []
    assert len(sched) == 0
    assert len(sched.lateness_samples()) == 1000
    assert min(sched.lateness_samples()) >= 0


async def test_a_thousand_deadlines_within_100ms_all_fire_in_order_none_early() -> None:
    _check_thousand(*await _thousand_deadlines())


def test_a_thousand_deadlines_under_uvloop() -> None:
    """The daemon runs on uvloop, whose timers have millisecond resolution."""
    result = anyio.run(_thousand_deadlines, backend="asyncio",
                       backend_options={"use_uvloop": True})
    _check_thousand(*result)


def test_waits_under_uvloop_do_not_spin_between_milliseconds(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """uvloop's clock counts whole milliseconds, and anyio re-arms a cancel scope's deadline
    that falls between two ticks on every loop iteration until the clock passes it. The
    scheduler waits for whole milliseconds, so each wait arms its deadline about once."""
    from anyio._backends import _asyncio as backend

    armed = 0
    original = backend.CancelScope._timeout

    def counting(self: backend.CancelScope) -> None:
        nonlocal armed
        armed += 1
        original(self)

    monkeypatch.setattr(backend.CancelScope, "_timeout", counting)

    async def main() -> list[str]:
        sched, rec = Scheduler(), Recorder(20)
        async with running(sched, rec):
            t0 = time.monotonic()
            for i in range(20):  # none on a millisecond boundary
                sched.set(f"s{i}", IDLE, t0 + 0.005 + i * 0.00137)
            await rec.wait()
        return [n for n, _, _ in rec.fired]

    fired = anyio.run(main, backend="asyncio", backend_options={"use_uvloop": True})
    assert fired == [f"s{i}" for i in range(20)]
    assert armed <= 4 * 20, f"{armed} deadline checks for 20 waits"


async def test_a_long_run_of_due_deadlines_does_not_starve_the_loop() -> None:
    """Deadlines that keep falling due while `fire` works (a burst of stops) must not keep
    the scheduler from ever yielding: the loop's other tasks (reaping, records, calls) get
    their turn between batches, not after the whole burst."""
    n = 200
    sched, rec = Scheduler(), Recorder(n)
    other_ran_after: list[int] = []

    async def other() -> None:
        other_ran_after.append(len(rec.fired))

    async with anyio.create_task_group() as tg:
        def slow_fire(name: str, kind: TimerKind) -> None:
            if not rec.fired:
                tg.start_soon(other)  # ready to run from the first fire on
            start = time.monotonic()
            while time.monotonic() - start < 0.001:  # a fire's work: about 1 ms of CPU
                pass
            rec(name, kind)

        t0 = time.monotonic()
        async with running(sched, slow_fire):
            # 0.5 ms apart: each batch ends with the next deadline already due.
            for i in range(n):
                sched.set(f"s{i:03d}", IDLE, t0 + 0.01 + i * 0.0005)
            await rec.wait()
    assert len(rec.fired) == n
    assert other_ran_after and other_ran_after[0] < n // 2, other_ran_after


async def test_work_left_by_fires_waits_until_the_scheduler_caught_up() -> None:
    """A burst's fires go first: what each fire leaves (`AfterFires`, its stop's record)
    starts only once the scheduler caught up, never between the fires of a burst."""
    n = 100
    sched, rec = Scheduler(), Recorder(n)
    started_after: list[int] = []  # fires done when each piece of left work started

    async def work() -> None:
        started_after.append(len(rec.fired))

    async with anyio.create_task_group() as tg:
        after = AfterFires(sched, tg)

        def slow_fire(name: str, kind: TimerKind) -> None:
            start = time.monotonic()
            while time.monotonic() - start < 0.001:  # a fire's work: about 1 ms of CPU
                pass
            rec(name, kind)
            after.add(work)

        t0 = time.monotonic()
        async with running(sched, slow_fire):
            # 0.5 ms apart: each batch ends with the next deadline already due.
            for i in range(n):
                sched.set(f"s{i:03d}", IDLE, t0 + 0.01 + i * 0.0005)
            await rec.wait()
            with anyio.fail_after(GUARD):
                while len(started_after) < n:
                    await anyio.sleep(0.001)
    assert started_after == [n] * n


async def test_left_work_starts_a_chunk_per_turn_of_the_loop() -> None:
    """Between two chunks the loop takes a turn (a deadline falling then waits for one
    chunk's first steps at most, not for all of them)."""
    sched = Scheduler()
    turns = 0
    seen: list[int] = []  # the turn each piece of work started in

    async def ticker() -> None:
        nonlocal turns
        while True:
            turns += 1
            await anyio.lowlevel.checkpoint()

    async def work() -> None:
        seen.append(turns)

    async with anyio.create_task_group() as tg:
        tg.start_soon(ticker)
        await anyio.lowlevel.checkpoint()
        after = AfterFires(sched, tg, chunk=10)
        for _ in range(100):
            after.add(work)
        with anyio.fail_after(GUARD):
            while len(seen) < 100:
                await anyio.lowlevel.checkpoint()
        tg.cancel_scope.cancel()
    groups = [seen[i:i + 10] for i in range(0, 100, 10)]
    assert all(len(set(group)) == 1 for group in groups), seen  # a chunk starts together
    assert len({group[0] for group in groups}) == 10, seen  # in ten different turns


async def test_left_work_starts_while_the_scheduler_waits_or_has_stopped() -> None:
    """Caught up: waiting for a deadline to come (not due yet), or not running at all."""
    sched = Scheduler()
    ran: list[str] = []

    async def work(what: str) -> None:
        ran.append(what)

    async with anyio.create_task_group() as tg:
        after = AfterFires(sched, tg)
        async with running(sched, Recorder(1)):
            sched.set("later", IDLE, time.monotonic() + 600)
            after.add(work, "while waiting")
            with anyio.fail_after(GUARD):
                while not ran:
                    await anyio.lowlevel.checkpoint()
        after.add(work, "stopped")  # the scheduler has stopped: nothing to wait for
        with anyio.fail_after(GUARD):
            while len(ran) < 2:
                await anyio.lowlevel.checkpoint()
    assert ran == ["while waiting", "stopped"]
