"""The daemon as a child subreaper, and the reaping of the orphans that makes it inherit.

Why a subreaper: a worker forked by the fork server (`msbd.daemon.forkserver`)
is born a grandchild of the daemon (daemon -> zygote -> B -> C). When B
exits, the kernel gives C to the nearest living ancestor that is a child
subreaper: the daemon, which must be every worker's parent (a pidfd can be
`waitid`ed only by the parent, and `os.killpg` of a worker's group is safe
only while nobody else can reap it). `become_subreaper` makes the daemon
one, at start, before it spawns anything.

Why ctypes here: the standard library has no `prctl` (Python 3.11 has no
`os.prctl`), and PR_SET_CHILD_SUBREAPER is a single libc call at start. This
is the daemon's only use of ctypes; tests/test_layering.py allows it in this
module and in the worker's `msbd.vm.krun`, nowhere else.

The cost: a subreaper inherits every orphan below it, e.g. a process a
workload left behind when its worker ended, or a B whose zygote was killed.
Unreaped, each would stay a zombie for the daemon's lifetime. `reap` reaps
a child only when all of these hold:

- it has exited (`Z` in /proc/<pid>/stat): a living child is left alone;
- it is not claimed (`claim`/`release`): every worker the daemon spawned or
  had forked is claimed from the moment its pid is known until its `Worker`
  is closed, after the daemon reaped it through its pidfd (reaping it here
  would lose its exit status); so is the zygote;
- it is not in the daemon's own session: a child the daemon starts through
  asyncio (the host check's `anyio.run_process`) stays in it, and its
  reaping belongs to the event loop's child watcher; every worker, the
  zygote and whatever they start live in sessions of their own;
- no fork request is in flight (`forking`): a forked worker is the daemon's
  child a moment before the daemon reads its pid and claims it.

Children are read from /proc/self/task/<tid>/children (every thread's) and
reaped one pid at a time with `waitid(P_PID, WEXITED | WNOHANG)`, never with
a wildcard wait. `serve` does so every `INTERVAL` seconds.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
from collections.abc import Iterator
from typing import Final

import anyio

log = logging.getLogger("msbd.reaper")

INTERVAL: Final = 1.0
_PR_SET_CHILD_SUBREAPER: Final = 36



class _Registry:
    """What the daemon reaps itself: claimed pids, and fork requests in flight."""

    def __init__(self) -> None:
        self.claimed: set[int] = set()
        self.forking = 0


_registry = _Registry()


def become_subreaper() -> bool:
    """Make this process a child subreaper (prctl); False, with a warning, if refused."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(ctypes.c_int(_PR_SET_CHILD_SUBREAPER), ctypes.c_ulong(1), ctypes.c_ulong(0),
                  ctypes.c_ulong(0), ctypes.c_ulong(0)) != 0:
        log.warning("cannot become a child subreaper: %s", os.strerror(ctypes.get_errno()))
        return False
    return True


def claim(pid: int) -> None:
    """`pid` is the daemon's to reap (through its pidfd): never reap it as an orphan."""
    _registry.claimed.add(pid)


def release(pid: int) -> None:
    """The daemon is done with `pid` (reaped it, or gave up on it)."""
    _registry.claimed.discard(pid)


@contextlib.contextmanager
def forking() -> Iterator[None]:
    """While a fork request is in flight: reap nothing (its worker is not claimed yet)."""
    _registry.forking += 1
    try:
        yield
    finally:
        _registry.forking -= 1


def children() -> set[int]:
    """This process's children (of every thread), from /proc."""
    found: set[int] = set()
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:
        return found
    for tid in tasks:
        try:
            with open(f"/proc/self/task/{tid}/children", "rb") as f:
                found.update(map(int, f.read().split()))
        except OSError:
            continue  # the thread ended meanwhile
    return found


def _zombie_elsewhere(pid: int, session: int) -> bool:
    """Whether `pid` has exited and is in another session than `session`."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rpartition(b")")[2].split()
    except OSError:
        return False
    # after the command: state, ppid, pgrp, session
    return fields[0] == b"Z" and int(fields[3]) != session


def reap() -> list[int]:
    """Reap every exited orphan (see the module's docstring); the pids reaped."""
    if _registry.forking:
        return []
    session = os.getsid(0)
    reaped = []
    for pid in children() - _registry.claimed:
        if not _zombie_elsewhere(pid, session):
            continue
        with contextlib.suppress(ChildProcessError):
            if os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG) is not None:
                reaped.append(pid)
    if reaped:
        log.debug("reaped %d orphan(s): %s", len(reaped), " ".join(map(str, reaped)))
    return reaped


async def serve(interval: float = INTERVAL) -> None:
    """Reap orphans every `interval` seconds, until cancelled."""
    while True:
        reap()
        await anyio.sleep(interval)
