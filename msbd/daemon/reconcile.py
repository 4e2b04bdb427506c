"""Restart reconciliation: settle every run the database still believes alive.

Runs before the first call is answered. A new daemon cannot adopt a worker
of the old one: the worker's pipes died with the old daemon, and the worker
ends its guest on EOF of fd 97 within its grace. So every run still marked
live is closed as `daemon_lost`. A worker still inside its grace is killed
first, but only if it provably is that worker: the pid is pinned with a
pidfd, then its boot id and start time must match the run's record. A pid
now used by an unrelated process is never signalled.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import time

from msbd.daemon import procfs
from msbd.db.store import LiveRun, RunEnd, Store
from msbd.model import Reason

log = logging.getLogger("msbd.reconcile")


def _end_old_worker(run: LiveRun) -> str:
    """Kill the run's worker if it is still that very process; say what was found."""
    if run.pid is None:
        return "the daemon stopped before the worker was spawned"
    try:
        pidfd = os.pidfd_open(run.pid)
    except ProcessLookupError:
        return f"worker {run.pid} was gone when the daemon restarted"
    except OSError as exc:
        return f"worker {run.pid} could not be checked: {exc.strerror}"
    try:
        if not procfs.is_same_process(run.pid, run.proc_start, run.boot_id):
            return (f"worker {run.pid} was gone when the daemon restarted "
                    "(the pid now belongs to another process)")
        with contextlib.suppress(ProcessLookupError):
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        return f"worker {run.pid} outlived the daemon and was killed"
    finally:
        os.close(pidfd)


async def reconcile(store: Store) -> int:
    """Close every live run as `daemon_lost`; returns how many were closed."""
    runs = await store.live_runs()
    if not runs:
        return 0
    ends = [(run.ref, RunEnd(reason=Reason.DAEMON_LOST, detail=_end_old_worker(run)))
            for run in runs]
    await store.end_runs(ends, now=time.time())
    log.info("reconciled %d runs left live by a previous daemon as daemon_lost", len(runs))
    return len(runs)
