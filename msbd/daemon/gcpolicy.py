"""When the daemon's cyclic garbage collector runs: not in the middle of a burst.

Why
---
CPython's full collection walks every tracked object, and the daemon's live
objects grow with its sandboxes: with 1,000 live sandboxes a full collection
took 90-320 ms here, during which the event loop stood still. It runs when
enough new objects survived, which is exactly when a burst (a thousand idle
deadlines falling together) allocates: in every burst measured, a full
collection fell within the first 120 ms and was most of the timers' p99
lateness (BENCHMARKS.md, "The loop at a real-time priority").

What
----
Every `FREEZE_EVERY` seconds the daemon moves every object the collector
tracks into its permanent generation (`gc.freeze`, a constant-time splice):
what has lived that long is mostly what lives as long as its sandbox (records,
watchers, pipes). The automatic collections then only ever walk what was
allocated since, a few thousand objects, whatever the number of sandboxes.
Reference counting still frees frozen objects; only cyclic garbage among them
waits, for the full collection the daemon runs itself every `FULL_EVERY`
seconds (`gc.unfreeze`, `gc.collect`, `gc.freeze`), at a moment when no
deadline falls within `QUIET` seconds (or after `MAX_DEFER` seconds of
waiting for one, whatever falls). So the memory of cyclic garbage is bounded
by what `FULL_EVERY` seconds make, and the one long pause is planned.
"""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import Callable
from typing import Final

import anyio
import anyio.abc

log = logging.getLogger("msbd.gc")

FREEZE_EVERY: Final = 1.0
FULL_EVERY: Final = 600.0
QUIET: Final = 1.0
MAX_DEFER: Final = 30.0
_RETRY: Final = 0.25


def quiet(next_deadline: float | None, now: float, *, margin: float = QUIET) -> bool:
    """Whether a pause now would delay no deadline: none falls within `margin` seconds."""
    return next_deadline is None or next_deadline - now > margin


def full_collection() -> int:
    """Collect everything, the frozen objects included, then freeze the survivors again."""
    gc.unfreeze()
    found = gc.collect()
    gc.freeze()
    return found


async def serve(next_deadline: Callable[[], float | None], *,
                clock: Callable[[], float] = time.monotonic,
                task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
    """Freeze survivors every `FREEZE_EVERY` s; a full collection every `FULL_EVERY` s, when
    quiet. Until cancelled; what it froze is released to the collector on the way out."""
    gc.freeze()  # the start-up objects: modules, classes, settings
    task_status.started()
    try:
        last_full = clock()
        while True:
            await anyio.sleep(FREEZE_EVERY)
            gc.freeze()
            if clock() - last_full < FULL_EVERY:
                continue
            waited = 0.0
            while not quiet(next_deadline(), clock()) and waited < MAX_DEFER:
                await anyio.sleep(_RETRY)
                waited += _RETRY
            started = clock()
            found = full_collection()
            last_full = clock()
            log.debug("full collection: %d unreachable objects, %.1f ms (%d frozen)",
                      found, (last_full - started) * 1e3, gc.get_freeze_count())
    finally:
        gc.unfreeze()

