"""What a run's cgroup is allowed, from its spec and the daemon's settings.

Policy only, kept apart from the cgroupfs I/O of `msbd.daemon.cgroups`:

- `memory.max` is the guest's memory plus `cgroup_vmm_overhead_mib` for the
  VMM itself (the worker's interpreter, libkrun, its device threads and
  buffers). The guest's RAM is anonymous memory of the VMM process, so the
  sum is what the whole run may take of the host. `memory.swap.max` is 0:
  swap would be a hidden second allowance, and a run at its limit is killed
  (`oom_killed`) rather than pushing the host into swapping for it.
  `memory.oom.group` is 1: an OOM kill ends the whole run, never half of it.
- `pids.max` is `cgroup_pids_max`: a worker is a few Python threads, one
  thread per vCPU and the device threads; a guest cannot fork on the host,
  so this stops only a runaway VMM.
- `cpu.max` caps the run at `vcpus` CPUs when `cgroup_cpu_max` is on;
  otherwise runs share the CPU by weight, as processes do.
"""

from __future__ import annotations

from pathlib import Path

from msbd.config import Settings
from msbd.daemon import cgroups
from msbd.errors import LaunchFailed
from msbd.model import LaunchSpec

_MIB = 1024 * 1024
CPU_PERIOD_US = 100_000


def run_limits(spec: LaunchSpec, settings: Settings) -> dict[str, str]:
    """The cgroup files to write for a run of `spec`, in the order they are written."""
    limits = {
        "memory.oom.group": "1",
        "memory.swap.max": "0",
        "memory.max": str((spec.memory_mib + settings.cgroup_vmm_overhead_mib) * _MIB),
        "pids.max": str(settings.cgroup_pids_max),
    }
    if settings.cgroup_cpu_max:
        limits["cpu.max"] = f"{spec.vcpus * CPU_PERIOD_US} {CPU_PERIOD_US}"
    return limits


def open_run_cgroup(cg: cgroups.Cgroups, run_id: int, limits: dict[str, str]) -> Path | None:
    """Create run `run_id`'s cgroup with `limits`; None when cgroups are off.

    `LaunchFailed` naming the cgroup if the kernel refuses.
    """
    if not cg.enabled:
        return None
    path = cg.run_path(run_id)
    try:
        cgroups.create(path, limits)
    except OSError as exc:
        raise LaunchFailed(f"cannot create the run's cgroup {path}: "
                           f"{exc.strerror or exc}") from exc
    return path
