"""How msbctl shows things to a person: tables, durations, ends of runs, `--json`.

Plain functions over the decoded JSON replies (dicts), so msbctl's commands
stay about what to ask the daemon; no I/O but printing.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from msbd.contract import signame

# `signame` is the contract's; msbctl reads it here with the rest of its wording.
__all__ = ["ago", "duration", "emit", "print_info", "print_sandboxes", "signame", "status",
           "table"]


def table(headers: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    rows = [list(r) for r in rows]
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    return "\n".join(lines)


def ago(stamp: str | None, now: dt.datetime) -> str:
    if not stamp:
        return "-"
    seconds = (now - dt.datetime.fromisoformat(stamp)).total_seconds()
    return duration(seconds) + " ago"


def duration(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.0f}s" if seconds >= 10 else f"{seconds:.1f}s"
    if seconds < 3600:
        return f"{seconds // 60:.0f}m{seconds % 60:02.0f}s"
    if seconds < 86400:
        return f"{seconds // 3600:.0f}h{seconds % 3600 // 60:02.0f}m"
    return f"{seconds // 86400:.0f}d{seconds % 86400 // 3600:02.0f}h"


def status(info: dict[str, Any]) -> str:
    run = info.get("run") or {}
    if info["state"] in ("stopped", "failed") and run.get("reason"):
        code = run.get("exit_code")
        sig = run.get("signal")
        tail = f" {code}" if code is not None else ""
        tail += f" {signame(sig)}" if sig else ""
        return f"{run['reason']}{tail}"
    return "-"


def print_sandboxes(items: list[dict[str, Any]]) -> None:
    now = dt.datetime.now(dt.UTC)
    rows = []
    for info in items:
        run = info.get("run") or {}
        spec = info.get("spec") or {}
        command = " ".join([spec.get("exec", "?"), *spec.get("args", [])])
        rows.append([
            info["name"], info["state"], str(run.get("pid") or "-"),
            ago(run.get("started_at"), now), status(info), info.get("network") or "default",
            ports(info.get("ports") or [], info.get("network")),
            command if len(command) <= 40 else command[:37] + "...",
        ])
    print(table(["NAME", "STATE", "PID", "STARTED", "ENDED", "NETWORK", "PORTS", "COMMAND"],
                rows))


def ports(published: list[dict[str, Any]], network: str | None) -> str:
    """`127.0.0.1:8080->80/tcp` as docker prints them (`*:` with egress, where the guest's
    own listen address applies); `-` for none."""
    out = []
    for p in published:
        address = "*" if network == "egress" else p.get("address") or "127.0.0.1"
        host = f"[{address}]" if ":" in address else address
        out.append(f"{host}:{p['host']}->{p['guest']}/tcp")
    return ",".join(out) or "-"


def print_info(info: dict[str, Any]) -> None:
    print(f"msbd {info['version']}  pid {info['pid']}  up {duration(info['uptime'])}")
    print(f"socket     {info['socket']}")
    print(f"state dir  {info['state_dir']}")
    print(f"libkrun    {info['libkrun'] or 'not found: ' + (info['libkrun_problem'] or '?')}")
    counts = ", ".join(f"{n} {s}" for s, n in info["counts"].items() if n) or "none"
    print(f"sandboxes  {counts}")
    lim = info["limits"]
    print(f"limits     {lim['max_sandboxes']} sandboxes, {lim['max_vcpus']} vcpus, "
          f"{lim['max_memory_mib']} MiB")
    if "default_network" in info:
        egress = "yes" if info.get("egress_allowed") else "no (admins only)"
        print(f"network    default {info['default_network']}, egress for you: {egress}")
    print_cgroups(info)
    t = info.get("timers")
    if t and t["fired"]:
        print(f"timers     {t['fired']} fired, late p50 {t['late_p50'] * 1000:.1f} ms, "
              f"p99 {t['late_p99'] * 1000:.1f} ms")
    for check in info["checks"]:
        mark = "ok " if check["ok"] else "!! "
        print(f"{mark} {check['name']}: {check['detail']}")
        if not check["ok"] and check.get("hint"):
            print(f"      -> {check['hint']}")


def mib(value: int | None) -> str:
    return "-" if value is None else f"{value / 1048576:.1f} MiB"


def print_cgroup_usage(cg: dict[str, Any], indent: str = "") -> None:
    """A run's (or all runs') cgroup figures; `-` where the cgroup has no such file."""
    print(f"{indent}memory {mib(cg['memory_current'])} (peak {mib(cg['memory_peak'])}, "
          f"max {mib(cg['memory_max']) if cg['memory_max'] is not None else 'none'})")
    cpu = cg["cpu_usage_usec"]
    if cpu is not None:
        print(f"{indent}cpu    {cpu / 1e6:.2f}s (user {cg['cpu_user_usec'] / 1e6:.2f}s, "
              f"system {cg['cpu_system_usec'] / 1e6:.2f}s)")
    print(f"{indent}io     read {mib(cg['io_read_bytes'])}, written {mib(cg['io_write_bytes'])}")
    pids = "-" if cg["pids_current"] is None else str(cg["pids_current"])
    print(f"{indent}pids   {pids} (max {cg['pids_max'] or 'none'})")
    if cg.get("oom_kills"):
        print(f"{indent}oom    {cg['oom_kills']} processes killed")


def print_metrics(m: dict[str, Any]) -> None:
    print(f"pid {m['pid']}  rss {m['rss_bytes'] / 1048576:.1f} MiB  "
          f"cpu {m['cpu_seconds']:.2f}s  up {duration(m['uptime'])}  "
          f"(from {m.get('source', 'proc')})")
    if m.get("cgroup"):
        print_cgroup_usage(m["cgroup"])


def print_cgroups(info: dict[str, Any]) -> None:
    cg = info.get("cgroups")
    if not cg:
        return
    if not cg["enabled"]:
        print(f"cgroups    off: {cg['reason']}")
        return
    print(f"cgroups    on: runs under {cg['root']}/runs "
          f"({' '.join(cg['controllers']) or 'no controllers'})")
    totals = info.get("cgroup_totals")
    if totals:
        print(f"           {totals['runs']} live runs together:")
        print_cgroup_usage(totals, indent=" " * 11)


def emit(args: argparse.Namespace, result: Any, human: Callable[[Any], None]) -> None:
    if args.json:
        print(json.dumps(result, indent=2, sort_keys=False))
    else:
        human(result)
