"""The cgroup v2 subtree msbd owns: one directory per sandbox run, and why there is none.

Why a cgroup per run
--------------------
A VMM process is the guest's memory, vCPU threads and device threads. Only a
cgroup caps what all of them take together, counts it honestly, ends every
process of a run with one write (`cgroup.kill`) and freezes them in place
(`cgroup.freeze`). msbd uses cgroups only where the cgroup tree is given to
it: it never writes into a cgroup it does not own.

Where the tree comes from
-------------------------
- `cgroups = "auto"` (the default): the daemon's own cgroup, when systemd
  delegated it (`Delegate=yes` in msbd.service; systemd marks such a cgroup
  with the extended attribute `trusted.delegate`, and it must be writable
  here, which under `ProtectControlGroups=yes` takes a `ReadWritePaths=` for
  it). A cgroup v2 directory holds either processes or child cgroups with
  controllers, never both, so the daemon first moves itself into the leaf
  `daemon/`; runs live under `runs/`.
- `cgroups = "/sys/fs/cgroup/..."`: a cgroup v2 directory the admin made for
  msbd (a host without systemd, and the tests). The daemon stays where it
  is; runs live under `<dir>/runs/`.
- `cgroups = "off"`, or no usable tree: the daemon runs without cgroups and
  `Cgroups.reason` says why, for `msbd doctor` and `daemon.info`.

A run's directory is `runs/run-<run id>`: run ids are never reused, and no
name a client chose ever becomes a path. The worker is moved into it before
it is handed its spec (`msbd.daemon.pool`): it blocks reading fd 96 until
then, so libkrun, the VMM and anything it starts are counted from their first
instruction. The controllers msbd enables are those of `WANTED` the parent
offers; on a host where a controller is missing the files it would write do
not exist, and nothing is written.

This module does file I/O on cgroupfs and nothing else; `release` alone
waits (for the kernel to finish killing what a run left).
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import anyio

from msbd.rpc.methods import CgroupsInfo, CgroupTotals, CgroupUsage

WANTED: Final = ("memory", "pids", "cpu", "io")
"""Controllers msbd enables for runs when its tree offers them."""
RUNS: Final = "runs"
DAEMON_LEAF: Final = "daemon"
_DELEGATE_XATTRS: Final = ("trusted.delegate", "user.delegate")


@dataclass(frozen=True, slots=True)
class Cgroups:
    """The tree runs go into (`root` set) or why there is none (`reason` set)."""

    root: Path | None = None
    reason: str | None = None
    controllers: frozenset[str] = frozenset()
    delegated: bool = False  # the daemon's own cgroup, given by systemd

    @property
    def enabled(self) -> bool:
        return self.root is not None

    @property
    def runs(self) -> Path:
        assert self.root is not None
        return self.root / RUNS

    def run_path(self, run_id: int) -> Path:
        return self.runs / f"run-{run_id}"


def off(reason: str) -> Cgroups:
    return Cgroups(reason=reason)


def v2_mount(mountinfo: str) -> Path | None:
    """Where the cgroup v2 hierarchy is mounted (its root), from /proc/self/mountinfo."""
    for line in mountinfo.splitlines():
        left, sep, right = line.partition(" - ")
        fields = left.split()
        if sep and len(fields) >= 5 and right.split()[:1] == ["cgroup2"] and fields[3] == "/":
            return Path(fields[4])
    return None


def own_v2_path(proc_cgroup: str) -> str | None:
    """The daemon's cgroup on the v2 hierarchy (`0::/path` in /proc/self/cgroup)."""
    for line in proc_cgroup.splitlines():
        if line.startswith("0::"):
            return line[3:]
    return None


def _write(path: Path, value: str) -> None:
    """Write a cgroupfs file that must exist (no O_CREAT: kernfs refuses creation with EACCES,
    a missing file here is ENOENT)."""
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, value.encode("ascii"))
    finally:
        os.close(fd)


def _read(path: Path) -> str:
    return path.read_text(encoding="ascii", errors="replace")


def find(setting: str) -> Cgroups:
    """The tree for `setting` ("auto", "off" or a cgroup v2 directory), checked, not yet used."""
    if setting == "off":
        return off('turned off by the setting cgroups = "off"')
    try:
        mount = v2_mount(_read(Path("/proc/self/mountinfo")))
        own = own_v2_path(_read(Path("/proc/self/cgroup")))
    except OSError as exc:
        return off(f"cannot read the process's cgroups: {exc.strerror}")
    if mount is None:
        return off("no cgroup v2 hierarchy is mounted (a cgroup v1 host)")
    if setting != "auto":
        root = Path(setting)
        if not root.is_absolute() or not root.resolve().is_relative_to(mount):
            return off(f"the setting cgroups = {setting!r} is not a directory under the "
                       f"cgroup v2 hierarchy at {mount}")
        return _usable(root, delegated=False)
    if own is None or own == "/":
        return off(f"msbd is in no cgroup of its own on the cgroup v2 hierarchy at {mount}; "
                   "run it as msbd.service (Delegate=yes) or set cgroups to a cgroup v2 "
                   "directory made for it")
    root = mount / own.lstrip("/")
    if root.name == DAEMON_LEAF and _is_delegated(root.parent):
        root = root.parent  # a restart of the same process tree: already in its leaf
    if not _is_delegated(root):
        return off(f"msbd's cgroup {own} was not delegated to it (msbd.service has "
                   "Delegate=yes; elsewhere set cgroups to a cgroup v2 directory made for it)")
    return _usable(root, delegated=True)


def _is_delegated(path: Path) -> bool:
    for name in _DELEGATE_XATTRS:
        with contextlib.suppress(OSError):
            if os.getxattr(path, name) == b"1":
                return True
    return False


def _usable(root: Path, *, delegated: bool) -> Cgroups:
    try:
        offered = set(_read(root / "cgroup.controllers").split())
    except OSError as exc:
        return off(f"{root} is not a cgroup v2 directory: {exc.strerror}")
    if not os.access(root / "cgroup.subtree_control", os.W_OK):
        return off(f"{root} is not writable here (under systemd, ProtectControlGroups=yes "
                   "needs ReadWritePaths= for msbd's own cgroup)")
    return Cgroups(root=root, controllers=frozenset(c for c in WANTED if c in offered),
                   delegated=delegated)


def adopt(cg: Cgroups) -> Cgroups:
    """Make the tree ready: the daemon into its leaf (delegated), `runs/` with controllers.

    Returns `cg`, or an `off` one saying what the kernel refused.
    """
    if cg.root is None:
        return cg
    try:
        if cg.delegated:
            leaf = cg.root / DAEMON_LEAF
            leaf.mkdir(exist_ok=True)
            # Every process of the daemon's cgroup (the daemon; a restarted unit holds
            # nothing else) goes into the leaf, so the root may enable controllers.
            for pid in _read(cg.root / "cgroup.procs").split():
                with contextlib.suppress(ProcessLookupError):
                    _write(leaf / "cgroup.procs", pid)
        _enable(cg.root, cg.controllers)
        cg.runs.mkdir(exist_ok=True)
        _enable(cg.runs, cg.controllers)
    except OSError as exc:
        return off(f"cannot set up {cg.root}: {exc.strerror or exc}")
    return cg


def _enable(path: Path, controllers: frozenset[str]) -> None:
    if controllers:
        _write(path / "cgroup.subtree_control", " ".join(f"+{c}" for c in sorted(controllers)))


def create(path: Path, settings: Mapping[str, str]) -> None:
    """Make a run's cgroup and write its limits (`{"memory.max": "...", ...}`).

    A limit whose file does not exist (its controller is not enabled) is skipped.
    The directory is removed again if a write fails.
    """
    path.mkdir()
    try:
        for name, value in settings.items():
            with contextlib.suppress(FileNotFoundError):
                _write(path / name, value)
    except BaseException:
        with contextlib.suppress(OSError):
            path.rmdir()
        raise


def place(path: Path, pid: int) -> None:
    """Move process `pid` (all its threads) into `path`."""
    _write(path / "cgroup.procs", str(pid))


def kill(path: Path) -> None:
    """SIGKILL every process in `path` and below, frozen or not (`cgroup.kill`)."""
    with contextlib.suppress(FileNotFoundError):
        _write(path / "cgroup.kill", "1")


def freeze(path: Path, frozen: bool) -> None:
    """Ask the kernel to freeze (or thaw) every process in `path`: `cgroup.freeze`.
    It does so asynchronously; `cgroup.events` says `frozen 1` once it is done."""
    _write(path / "cgroup.freeze", "1" if frozen else "0")


def remove(path: Path) -> bool:
    """Remove an empty run cgroup: True when it is gone, False while processes remain."""
    try:
        path.rmdir()
    except FileNotFoundError:
        return True
    except OSError as exc:
        if exc.errno == errno.EBUSY:
            return False
        raise
    return True


async def release(path: Path, *, timeout: float = 10.0) -> bool:
    """Kill whatever is left in a run's cgroup and remove it once empty.

    True when it is gone; False if it is still populated after `timeout` (then it
    stays for the next daemon's `leftovers`).
    """
    delay = 0.001
    with anyio.move_on_after(timeout):
        while True:
            try:
                if remove(path):
                    return True
            except OSError:
                return False
            kill(path)
            await anyio.sleep(delay)  # the kernel delivers SIGKILL and reaps asynchronously
            delay = min(delay * 2, 0.1)
    return False


def keyed(path: Path, name: str) -> dict[str, int]:
    """A flat keyed file (`cgroup.events`, `memory.events`, `cpu.stat`) as integers;
    empty if the file does not exist."""
    try:
        text = _read(path / name)
    except FileNotFoundError:
        return {}
    out: dict[str, int] = {}
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        with contextlib.suppress(ValueError):
            out[key] = int(value)
    return out


def oom_detail(path: Path) -> str | None:
    """The words for an OOM kill in a run's cgroup, or None when there was none (or the
    file cannot be read). `memory.events` counts `oom_kill` for every OOM kill of a
    process in it (the run's own limit, a parent's, the whole host's), and `oom` only
    for the times its own `memory.max` was the cause."""
    try:
        events = keyed(path, "memory.events")
        limit = _read(path / "memory.max").strip() if events.get("oom_kill") else ""
    except OSError:
        return None
    kills = events.get("oom_kill", 0)
    if not kills:
        return None
    killed = f"{kills} process{'es' if kills > 1 else ''} killed"
    if not events.get("oom") or limit == "max":
        return (f"the kernel's OOM killer ended the run ({killed}): the host or a cgroup "
                "above the run ran out of memory, not the run's own limit")
    return (f"the run used its memory.max of {int(limit) // (1024 * 1024)} MiB: the kernel's "
            f"OOM killer ended it ({killed})")


def _number(path: Path) -> int | None:
    """A one-value file (`memory.current`, `pids.max`): None when absent or "max"."""
    try:
        text = _read(path).strip()
    except FileNotFoundError:
        return None
    return None if text == "max" else int(text)


def _io_bytes(path: Path) -> tuple[int | None, int | None]:
    """(read, written) bytes summed over the devices of `io.stat`; None without the file."""
    try:
        text = _read(path / "io.stat")
    except FileNotFoundError:
        return None, None
    read = written = 0
    for line in text.splitlines():
        for field in line.split()[1:]:
            key, _, value = field.partition("=")
            if key == "rbytes":
                read += int(value)
            elif key == "wbytes":
                written += int(value)
    return read, written


def usage(path: Path) -> CgroupUsage:
    """What a run's cgroup counts now, and its memory and pids limits.

    `OSError` when the cgroup is gone (the run ended meanwhile).
    """
    cpu = keyed(path, "cpu.stat")
    io_read, io_written = _io_bytes(path)
    memory_events = keyed(path, "memory.events")
    return CgroupUsage(
        memory_current=_number(path / "memory.current"),
        memory_peak=_number(path / "memory.peak"),
        memory_max=_number(path / "memory.max"),
        cpu_usage_usec=cpu.get("usage_usec"), cpu_user_usec=cpu.get("user_usec"),
        cpu_system_usec=cpu.get("system_usec"),
        io_read_bytes=io_read, io_write_bytes=io_written,
        pids_current=_number(path / "pids.current"), pids_max=_number(path / "pids.max"),
        oom_kills=memory_events.get("oom_kill") if memory_events else None)


def totals(cg: Cgroups, paths: list[Path]) -> CgroupTotals | None:
    """The runs' figures summed field by field (a field none of them has stays null);
    None with cgroups off."""
    if not cg.enabled:
        return None
    each = [usage(path) for path in paths]
    sums: dict[str, int | None] = {}
    for name in CgroupUsage.__struct_fields__:
        present = [v for u in each if (v := getattr(u, name)) is not None]
        sums[name] = sum(present) if present else None
    return CgroupTotals(**sums, runs=len(each))


def describe(cg: Cgroups) -> CgroupsInfo:
    """`cg` as `daemon.info` shows it."""
    return CgroupsInfo(enabled=cg.enabled, root=None if cg.root is None else str(cg.root),
                       controllers=sorted(cg.controllers), reason=cg.reason)


def populated(path: Path) -> bool:
    return keyed(path, "cgroup.events").get("populated", 0) == 1


def leftovers(cg: Cgroups, keep: frozenset[Path] = frozenset()) -> list[Path]:
    """Run cgroups under `runs/` that belong to no live run (a previous daemon's)."""
    if cg.root is None:
        return []
    try:
        return sorted(p for p in cg.runs.iterdir()
                      if p.is_dir() and p.name.startswith("run-") and p not in keep)
    except FileNotFoundError:
        return []
