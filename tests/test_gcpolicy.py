"""The daemon's garbage-collection policy: survivors frozen, the full collection planned
for a quiet moment, and cyclic garbage among frozen objects still reclaimed by it."""

from __future__ import annotations

import gc
import time
import weakref
from collections.abc import Callable

import anyio
import pytest

from msbd.daemon import gcpolicy

GUARD = 10.0


class Cycle:
    def __init__(self) -> None:
        self.me = self


def test_quiet() -> None:
    assert gcpolicy.quiet(None, 100.0)
    assert gcpolicy.quiet(102.0, 100.0, margin=1.0)
    assert not gcpolicy.quiet(100.5, 100.0, margin=1.0)
    assert not gcpolicy.quiet(99.0, 100.0, margin=1.0)  # overdue: the timers are busy


async def until(fact: Callable[[], bool]) -> None:
    with anyio.fail_after(GUARD):
        while not fact():
            await anyio.sleep(0.005)


async def test_frozen_garbage_waits_for_a_quiet_moment_then_is_collected(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gcpolicy, "FREEZE_EVERY", 0.01)
    monkeypatch.setattr(gcpolicy, "FULL_EVERY", 0.05)
    monkeypatch.setattr(gcpolicy, "MAX_DEFER", GUARD * 10)
    busy = True
    asked = 0

    def next_deadline() -> float | None:
        nonlocal asked
        asked += 1
        return time.monotonic() + (0.01 if busy else 60.0)

    obj = Cycle()
    gone = weakref.ref(obj)
    try:
        async with anyio.create_task_group() as tg:
            await tg.start(gcpolicy.serve, next_deadline)
            assert gc.get_freeze_count() > 0
            await until(lambda: gc.get_freeze_count() > 0 and asked > 0)
            del obj
            # Frozen: no collection reaches it, not even an explicit one.
            gc.collect()
            assert gone() is not None
            # A deadline keeps falling within the quiet margin: the full collection waits.
            seen = asked
            await until(lambda: asked >= seen + 5)
            assert gone() is not None
            busy = False
            await until(lambda: gone() is None)
            tg.cancel_scope.cancel()
    finally:
        gc.unfreeze()
    assert gc.get_freeze_count() == 0  # released to the collector on the way out


async def test_a_pause_that_never_comes_is_not_waited_for_forever(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gcpolicy, "FREEZE_EVERY", 0.01)
    monkeypatch.setattr(gcpolicy, "FULL_EVERY", 0.02)
    monkeypatch.setattr(gcpolicy, "MAX_DEFER", 0.5)
    obj = Cycle()
    gone = weakref.ref(obj)
    try:
        async with anyio.create_task_group() as tg:
            await tg.start(gcpolicy.serve, time.monotonic)  # always due: never quiet
            del obj
            await until(lambda: gone() is None)
            tg.cancel_scope.cancel()
    finally:
        gc.unfreeze()
