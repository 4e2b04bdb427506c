"""What /proc says about a process: its start time, CPU and memory, and the boot id.

A pid alone does not identify a process across time: pids are reused. The
pair (boot id, start time in clock ticks since boot) does, so that pair is
recorded with every run and checked before msbd trusts a pid again.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import cache

CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


@cache
def boot_id() -> str:
    with open("/proc/sys/kernel/random/boot_id") as f:
        return f.read().strip()


def _stat_fields(pid: int) -> list[str]:
    """Fields of /proc/PID/stat after the command name (which may hold spaces)."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        data = f.read()
    return data[data.rindex(b")") + 2:].decode().split()


def start_ticks(pid: int) -> int | None:
    """Start time of `pid` in clock ticks after boot, or None if it is gone."""
    try:
        return int(_stat_fields(pid)[19])  # field 22 of stat(5); 3 is index 0 here
    except (OSError, IndexError, ValueError):
        return None


def is_same_process(pid: int, proc_start: int | None, boot: str | None) -> bool:
    """True only if `pid` is alive and is the very process recorded (same boot, same start).

    A zombie (exited, not yet reaped by whoever inherited it) is not alive.
    """
    if proc_start is None or boot != boot_id():
        return False
    try:
        fields = _stat_fields(pid)
    except OSError:
        return False
    return fields[0] not in ("Z", "X", "x") and int(fields[19]) == proc_start


@dataclass(frozen=True, slots=True)
class Usage:
    rss_bytes: int
    cpu_seconds: float
    uptime: float


def usage(pid: int) -> Usage | None:
    """Resident memory, CPU time (user+system) and age of `pid`, or None if gone."""
    try:
        fields = _stat_fields(pid)
        with open("/proc/uptime") as f:
            system_uptime = float(f.read().split()[0])
    except (OSError, ValueError):
        return None
    utime, stime, start = int(fields[11]), int(fields[12]), int(fields[19])
    rss_pages = int(fields[21])
    return Usage(
        rss_bytes=rss_pages * PAGE_SIZE,
        cpu_seconds=(utime + stime) / CLK_TCK,
        uptime=max(0.0, system_uptime - start / CLK_TCK),
    )
