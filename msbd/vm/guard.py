"""The worker's guard threads: signals, the parent watchdog (fd 97), heartbeats, the stop."""

from __future__ import annotations

import os
import select
import signal
import sys
import threading
from collections.abc import Callable
from typing import Final

from msbd.contract import SIGNAL_EXIT_BASE, WorkerExit
from msbd.vm import control
from msbd.vm.status import StatusPipe, say

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
    Linux); else not at all, and the worker exits at once. After asking it
    waits `grace` (the guest's own grace: its init SIGKILLs what is left then)
    plus `margin` (for the init to sync, report and end the VM), then calls
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
        self._timer: threading.Timer | None = None

    def request(self, status: int, why: str, *, insist: bool = False) -> None:
        """Ask for a shutdown; `insist` (a repeated signal) forces the exit at once."""
        with self._lock:
            first = self._status is None
            if first:
                self._status = status
            current = self._status
        assert current is not None
        if not first:
            if insist:
                self._force(current, f"{why} again: exiting now")
            return
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
                return
        else:
            self._force(status, f"{why}: this libkrun has no way to ask its guest to stop "
                                "(no control channel, no shutdown eventfd), exiting now")
            return
        timer = threading.Timer(self._grace + self._margin, self._give_up, (status,))
        timer.daemon = True
        self._timer = timer
        timer.start()

    def _give_up(self, status: int) -> None:
        what = "" if self._channel is None else f" ({self._channel.describe()})"
        self._force(status, f"the guest did not stop within its grace of {self._grace:g} s "
                            f"and {self._margin:g} s more{what}")

    def _force(self, status: int, why: str) -> None:
        say(f"{why}; exit status {status}")
        self._force_exit(status)


def _take_signals(shutdown: Shutdown) -> None:
    while True:
        signo = signal.sigwait(SHUTDOWN_SIGNALS)
        shutdown.request(SIGNAL_EXIT_BASE + signo, signal.Signals(signo).name, insist=True)


def _watch_parent(fd: int, shutdown: Shutdown) -> None:
    """EOF (or an error) on the watchdog pipe means the daemon is gone."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    while True:
        poller.poll()
        try:
            if os.read(fd, 4096):
                continue  # the daemon never writes here; ignore it if it does
        except BlockingIOError:
            continue
        except OSError:
            pass
        shutdown.request(WorkerExit.DAEMON_GONE, "the daemon is gone (EOF on fd 97)")
        return


def start(*, watchdog_fd: int, status: StatusPipe, heartbeat_interval: float,
          shutdown: Shutdown) -> None:
    """Start the three daemon threads. Call after `block_signals`."""
    threads = (
        threading.Thread(target=_take_signals, args=(shutdown,), name="signals"),
        threading.Thread(target=_watch_parent, args=(watchdog_fd, shutdown), name="watchdog"),
        threading.Thread(target=status.beat, args=(heartbeat_interval, threading.Event()),
                         name="heartbeat"),
    )
    for thread in threads:
        thread.daemon = True
        thread.start()
