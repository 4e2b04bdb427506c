"""Whose CPU a burst of stops takes, whole machine: `perf record -a -g`, split by role.

The daemon's own profile (py-spy) says where its Python time goes; it cannot
say what the rest of the machine does meanwhile. During a burst of 1,000
stops the two cores are shared by the daemon, the workers ending, their
guests' processes and the kernel. `record` samples every CPU for a while;
`split` reads the samples back (`perf script`) and counts them by role,
knowing the pids taken before the burst: the daemon, the workers (each
run's pid), their guests (the workers' children), anything else under the
daemon (the fork server, warm workers), idle, and the rest of the machine.
For the daemon and the workers it also names the kernel and library functions
their samples were in, leaf and inclusive: where an exit's cost shows, and
the daemon's reaping.

Needs `perf` on PATH (Debian: `linux-perf`), run as root: a measuring tool,
not a dependency of msbd.
"""

from __future__ import annotations

import collections
import shutil
import subprocess
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

ROLES = ("daemon", "workers", "guests", "other under the daemon", "idle",
         "the rest of the machine")


def perf_path() -> str:
    found = shutil.which("perf")
    if found is None:
        raise SystemExit("perf not found: apt install linux-perf (a measuring tool only)")
    return found


def record(out: Path, seconds: float, *, frequency: int = 499) -> subprocess.Popen[bytes]:
    """Start sampling every CPU, with call graphs, for `seconds`; returns the process."""
    return subprocess.Popen([perf_path(), "record", "-a", "-g", "-F", str(frequency),
                             "-o", str(out), "--", "sleep", f"{seconds:g}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


@dataclass
class Sample:
    comm: str
    pid: int
    stack: list[str] = field(default_factory=list)  # leaf first


def samples(data: Path) -> Iterator[Sample]:
    """The samples of `data`, each with its call chain's symbol names."""
    script = subprocess.run([perf_path(), "script", "-i", str(data), "-F", "comm,pid,ip,sym"],
                            check=True, capture_output=True, text=True).stdout
    return parse(script)


def parse(script: str) -> Iterator[Sample]:
    """Samples from `perf script -F comm,pid,ip,sym` text: a "comm pid" line opens each,
    its call chain follows, one indented "address symbol" line per frame, leaf first."""
    current: Sample | None = None
    for line in script.splitlines():
        if not line.strip():
            continue
        if not line[0].isspace():  # "comm pid" opens a sample; its frames follow, indented
            if current is not None:
                yield current
            comm, _, pid = line.rstrip().rpartition(" ")
            current = Sample(comm.strip(), int(pid) if pid.isdigit() else -1)
        elif current is not None:
            parts = line.split(None, 1)
            current.stack.append(parts[1].strip() if len(parts) > 1 else "?")
    if current is not None:
        yield current


@dataclass(frozen=True)
class Pids:
    daemon: int
    workers: frozenset[int]
    guests: frozenset[int]
    others: frozenset[int]  # under the daemon, neither a worker nor a guest

    def role(self, sample: Sample) -> str:
        if sample.pid == self.daemon:
            return "daemon"
        if sample.pid in self.workers:
            return "workers"
        if sample.pid in self.guests:
            return "guests"
        if sample.pid in self.others:
            return "other under the daemon"
        if sample.pid == 0:
            return "idle"
        return "the rest of the machine"


DETAILED = ("daemon", "workers")


def split(sampled: Iterable[Sample], pids: Pids, *, top: int = 20) -> list[str]:
    """Lines to print: each role's share of the busy samples, then, for the daemon and
    the workers, the functions their samples were in."""
    by_role: collections.Counter[str] = collections.Counter()
    leaf = {role: collections.Counter[str]() for role in DETAILED}
    inclusive = {role: collections.Counter[str]() for role in DETAILED}
    total = 0
    for s in sampled:
        total += 1
        role = pids.role(s)
        by_role[role] += 1
        if role in leaf:
            leaf[role][s.stack[0] if s.stack else "?"] += 1
            inclusive[role].update(set(s.stack))
    if not total:
        return ["# perf: no samples"]
    busy = total - by_role["idle"]
    lines = [f"# perf: {total} samples on every CPU, {busy} not idle; by role "
             "(share of the busy samples):"]
    lines += [f"  {by_role[r] / max(busy, 1):6.1%}  {r}" for r in ROLES if r != "idle"]
    for role in DETAILED:
        if n := by_role[role]:
            lines.append(f"# {role}: {n} samples, by the function they were in:")
            lines += _top(leaf[role].most_common(top), n)
            lines.append("# the same, inclusive (a function and what it called):")
            lines += _top(inclusive[role].most_common(top), n)
    return lines


def _top(counts: Iterable[tuple[str, int]], of: int) -> list[str]:
    return [f"  {n / of:6.1%}  {name}" for name, n in counts]
