"""A fresh cgroup v2 directory for a test, on this machine's real cgroup v2 hierarchy.

This host kind is a cgroup v1 hybrid: its v2 hierarchy (at /sys/fs/cgroup/unified)
offers no memory or pids controller, but a cgroup there holds processes, moves them,
kills them all (`cgroup.kill`) and freezes them (`cgroup.freeze`). Tests of those
mechanics run here with the daemon's `cgroups` setting pointing at such a directory;
limits and accounting are tested under the real systemd lane (tests/test_systemd_*.py).
Without a writable cgroup v2 hierarchy the fixture fails: it never skips.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import select
from pathlib import Path

from daemonproc import wait_pids_gone

from msbd.daemon import cgroups

__all__ = ["destroy", "make", "procs", "v2_root", "wait_pids_gone"]

_serial = itertools.count()


def v2_root() -> Path:
    mount = cgroups.v2_mount(Path("/proc/self/mountinfo").read_text())
    assert mount is not None, "this machine has no cgroup v2 hierarchy mounted"
    assert os.access(mount / "cgroup.procs", os.W_OK), f"{mount} is not writable"
    return mount


def make() -> Path:
    path = v2_root() / f"msbd-test-{os.getpid()}-{next(_serial)}"
    path.mkdir()
    return path


def procs(path: Path) -> set[int]:
    return {int(p) for p in (path / "cgroup.procs").read_text().split()}


def destroy(path: Path) -> None:
    """Kill everything under `path` and remove it, children first."""
    if not path.exists():
        return
    for child in sorted((p for p in path.rglob("*") if p.is_dir()),
                        key=lambda p: len(p.parts), reverse=True):
        _empty_and_remove(child)
    _empty_and_remove(path)


def _empty_and_remove(path: Path) -> None:
    try:
        pids = procs(path)
    except FileNotFoundError:
        return  # msbd removed it meanwhile
    with contextlib.suppress(FileNotFoundError):
        (path / "cgroup.kill").write_text("1")
    wait_pids_gone(pids)
    # A killed process leaves the cgroup when it is reaped; its parent may be slower.
    for _ in range(1000):
        try:
            path.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError:
            with open(path / "cgroup.events", "rb") as events:  # wakes on its next change
                select.select([], [], [events], 0.05)
    path.rmdir()
