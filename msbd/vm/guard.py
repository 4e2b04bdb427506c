"""The worker's two guard threads: signals; the parent watchdog (fd 97) with the heartbeats.

Why two threads and no more: every thread is made at the worker's start and
killed at its exit, and a stop must not need a new one (a thread that cannot
be made, at a pids limit or short of memory, would leave a worker that never
stops). So the thread that asked the guest to stop is the one that waits out
its grace: the signal thread in `sigtimedwait` (a second signal still forces
the exit at once), the watchdog thread in a sleep (the daemon is gone, no
heartbeat is owed to anyone). The heartbeats ride on the watchdog's poll,
whose timeout is the next beat's deadline.
"""

from __future__ import annotations

import math
import os
import select
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import Final

from msbd.contract import SIGNAL_EXIT_BASE, WorkerExit
from msbd.vm import control
from msbd.vm.status import HEARTBEAT, StatusPipe, say

SHUTDOWN_SIGNALS: Final = frozenset({signal.SIGTERM, signal.SIGINT})


def block_signals() -> None:
    """Block SIGTERM/SIGINT in the calling (main) thread, so every later thread inherits it.

    The main thread ends up inside krun_start_enter for good, where Python
    signal handlers never run; the signal thread takes them with sigwait.
    """
    signal.pthread_sigmask(signal.SIG_BLOCK, SHUTDOWN_SIGNALS)


class Shutdown:
    """Asks the guest to stop once, then forces the worker's exit if it has not ended.

    How it asks: over the control channel when there is one (msbd.vm.control;
    a stop asked before the guest's init connected goes out when it does);
    else through libkrun's shutdown eventfd (a libkrun that has one: not on
    Linux); else not at all, and the worker exits at once. After asking, the
    guest has `grace` (its own grace: its init SIGKILLs what is left then)
    plus `margin` (for the init to sync, report and end the VM); the thread
    that asked waits that out (`left`) and calls `give_up`, which calls
    `force_exit` with the status. A second SIGTERM/SIGINT forces the exit at once.
    """

    def __init__(self, grace: float, margin: float, *, channel: control.Channel | None = None,
                 eventfd: int | None = None,
                 force_exit: Callable[[int], None] = os._exit) -> None:
        self._grace = grace
        self._margin = margin
        self._channel = channel
        self._eventfd = eventfd
        self._force_exit = force_exit
        self._lock = threading.Lock()
        self._status: int | None = None
        self._give_up_at: float | None = None  # monotonic
        self._forced = False

    def request(self, status: int, why: str, *, insist: bool = False) -> bool:
        """Ask for a shutdown; `insist` (a repeated signal) forces the exit at once.

        True when this call asked the guest: the caller then waits out `left`
        and calls `give_up`.
        """
        with self._lock:
            first = self._status is None
            if first:
                self._status = status
            current = self._status
        assert current is not None
        if not first:
            if insist:
                self._force(current, f"{why} again: exiting now")
            return False
        if self._channel is not None:
            self._channel.stop(why, self._grace)
        elif self._eventfd is not None:
            say(f"{why}: asking the guest to shut down through libkrun's shutdown eventfd "
                f"(grace {self._grace:g} s)")
            try:
                os.write(self._eventfd, (1).to_bytes(8, sys.byteorder))
            except OSError as exc:
                self._force(status, f"cannot write the shutdown eventfd ({exc.strerror}), "
                                    "exiting now")
                return False
        else:
            self._force(status, f"{why}: this libkrun has no way to ask its guest to stop "
                                "(no control channel, no shutdown eventfd), exiting now")
            return False
        with self._lock:
            self._give_up_at = time.monotonic() + self._grace + self._margin
        return True

    def left(self) -> float | None:
        """Seconds until the guest's time is up (at least 0); None before it was asked."""
        with self._lock:
            at = self._give_up_at
        return None if at is None else max(0.0, at - time.monotonic())

    def give_up(self) -> None:
        """The guest's time is up: force the exit with the first status."""
        with self._lock:
            status = self._status
        assert status is not None
        what = "" if self._channel is None else f" ({self._channel.describe()})"
        self._force(status, f"the guest did not stop within its grace of {self._grace:g} s "
                            f"and {self._margin:g} s more{what}")

    def _force(self, status: int, why: str) -> None:
        with self._lock:  # once, whichever thread gets here first
            if self._forced:
                return
            self._forced = True
        say(f"{why}; exit status {status}")
        self._force_exit(status)


def take_signals(shutdown: Shutdown) -> None:
    """Thread body: SIGTERM/SIGINT ask for the stop (then the grace is waited out here)."""
    asked = False
    while True:
        left = shutdown.left() if asked else None
        if left is None:
            signo = signal.sigwait(SHUTDOWN_SIGNALS)
        else:
            info = signal.sigtimedwait(SHUTDOWN_SIGNALS, left)
            if info is None:
                shutdown.give_up()
                return
            signo = info.si_signo
        asked = shutdown.request(SIGNAL_EXIT_BASE + signo, signal.Signals(signo).name,
                                 insist=True) or asked


def watch_parent(fd: int, status: StatusPipe, heartbeat_interval: float,
                 shutdown: Shutdown) -> None:
    """Thread body: a heartbeat every `heartbeat_interval` seconds, and the watchdog.

    EOF (or an error) on the watchdog pipe means the daemon is gone: the
    stop is asked, and its grace waited out here. Beats follow the monotonic
    clock; a late one does not make the next ones bunch up (missed ones are
    skipped, not replayed). No more beats once the status pipe is closed.
    """
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    beating = True
    deadline = time.monotonic() + heartbeat_interval
    while True:
        timeout = None
        if beating:
            timeout = max(0, math.ceil((deadline - time.monotonic()) * 1000))
        if not poller.poll(timeout):
            if not status.send(HEARTBEAT):
                say("the status pipe is closed: no more heartbeats")
                beating = False
            deadline += heartbeat_interval
            now = time.monotonic()
            if deadline <= now:
                deadline = now + heartbeat_interval
            continue
        try:
            if os.read(fd, 4096):
                continue  # the daemon never writes here; ignore it if it does
        except BlockingIOError:
            continue
        except OSError:
            pass
        break
    if shutdown.request(WorkerExit.DAEMON_GONE, "the daemon is gone (EOF on fd 97)"):
        left = shutdown.left()
        assert left is not None
        time.sleep(left)
        shutdown.give_up()


def start(*, watchdog_fd: int, status: StatusPipe, heartbeat_interval: float,
          shutdown: Shutdown) -> None:
    """Start the two daemon threads. Call after `block_signals`."""
    threads = (
        threading.Thread(target=take_signals, args=(shutdown,), name="signals"),
        threading.Thread(target=watch_parent,
                         args=(watchdog_fd, status, heartbeat_interval, shutdown),
                         name="watchdog"),
    )
    for thread in threads:
        thread.daemon = True
        thread.start()
