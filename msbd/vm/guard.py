"""The worker's guard threads: signals, the parent watchdog (fd 97), heartbeats, forced exit."""

from __future__ import annotations

import os
import select
import signal
import sys
import threading
from typing import Final, NoReturn

from msbd.vm import SIGNAL_EXIT_BASE, WorkerExit
from msbd.vm.status import StatusPipe, say

SHUTDOWN_SIGNALS: Final = frozenset({signal.SIGTERM, signal.SIGINT})


def block_signals() -> None:
    """Block SIGTERM/SIGINT in the calling (main) thread, so every later thread inherits it.

    The main thread ends up inside krun_start_enter for good, where Python
    signal handlers never run; the signal thread takes them with sigwait.
    """
    signal.pthread_sigmask(signal.SIG_BLOCK, SHUTDOWN_SIGNALS)


class Shutdown:
    """Asks the guest to stop once, then forces `os._exit` when the grace period ends."""

    def __init__(self, grace: float, eventfd: int | None) -> None:
        self._grace = grace
        self._eventfd = eventfd
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
        if self._eventfd is None:
            self._force(status, f"{why}: libkrun has no shutdown eventfd, exiting now")
        say(f"{why}: asking the guest to shut down (grace {self._grace:g} s)")
        try:
            os.write(self._eventfd, (1).to_bytes(8, sys.byteorder))
        except OSError as exc:
            self._force(status, f"cannot write the shutdown eventfd ({exc.strerror}), "
                                "exiting now")
        timer = threading.Timer(self._grace, self._force,
                                (status, f"the guest did not stop within {self._grace:g} s"))
        timer.daemon = True
        self._timer = timer
        timer.start()

    @staticmethod
    def _force(status: int, why: str) -> NoReturn:
        say(f"{why}; exit status {status}")
        os._exit(status)


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
