"""Signals to workers, sent from one thread: a burst of stops never stalls the event loop.

Each signal wakes a worker that then competes with the daemon for the CPU;
sent from the event loop, a thousand SIGTERMs at once (idle deadlines falling
together) kept the loop, and so the timers and the control socket, waiting
for hundreds of milliseconds. Queued here, they cost the loop a `dup` each.
The duplicate pidfd keeps naming the same process even if the watcher closes
its own pidfd meanwhile: a signal can never reach a process that reused a pid.
"""

from __future__ import annotations

import contextlib
import os
import queue
import signal

import anyio
import anyio.abc


class Signaller:
    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[tuple[int, int] | None] = queue.SimpleQueue()

    def send(self, pidfd: int, sig: int) -> None:
        """Queue `sig` for the process `pidfd` refers to (returns at once)."""
        self._queue.put((os.dup(pidfd), sig))

    async def serve(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
                    ) -> None:
        """Run the sending thread until cancelled."""
        task_status.started()
        try:
            await anyio.to_thread.run_sync(self._run, abandon_on_cancel=True)
        finally:
            self._queue.put(None)

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            fd, sig = item
            try:
                with contextlib.suppress(ProcessLookupError):
                    signal.pidfd_send_signal(fd, sig)
            finally:
                os.close(fd)
