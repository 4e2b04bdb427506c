"""Where the time goes when many idle deadlines fall together: py-spy, or perf, sampled.

    .venv/bin/python -m bench.profile_burst [--sandboxes N] [--seconds S] [--top K]
    .venv/bin/python -m bench.profile_burst --perf [--sandboxes N] [--seconds S]

Needs py-spy on PATH or beside this interpreter (`pip install py-spy`: a
measuring tool, not a dependency of msbd); `--perf` needs perf instead
(`bench.perf_split`) and samples the whole machine, split by role.
Launches N sandboxes (the libkrun test double, `sleep 600`, 1 s heartbeats,
8 in flight) with their idle deadlines planned to fall within a few hundred
ms of each other, as §3 of
BENCHMARKS.md does; from one second before the first deadline it samples the
daemon for S seconds with `py-spy record --gil --threads --format raw` (only
samples where a thread holds the GIL: the Python work that makes the event
loop late). Then prints the timers' lateness as the daemon measures it
(`daemon.info`), how many sandboxes ended, and the functions seen in the
event loop thread's samples, by own and by inclusive share, and the other
threads' share. With `--perf`: each role's share of the machine's busy
samples (the daemon, the workers, their guests, ...), and the functions the
daemon's and the workers' samples were in.
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

from bench import perf_split
from bench.common import (
    Msbd,
    children,
    descendants,
    make_rootfs,
    need_fakekrun,
    sandbox_spec,
    scratch,
)

INFLIGHT = 8
_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::\d+)?\)$")


def _py_spy() -> str:
    found = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not os.access(found, os.X_OK):
        raise SystemExit("py-spy not found: pip install py-spy (a measuring tool only)")
    return found


def _short(frame: str) -> str:
    m = _FRAME.match(frame)
    if not m:
        return frame
    path = m.group("file")
    for marker in ("/msbd/", "/site-packages/", "/python3.11/"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    return f"{m.group('func')} ({path})"


def summarize(raw: Path, top: int) -> None:
    """Own and inclusive shares of each function in the samples of the thread with the
    most samples (the event loop's), and the other threads' shares."""
    per_thread: collections.Counter[str] = collections.Counter()
    stacks: list[tuple[str, list[str], int]] = []
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        frames = stack.split(";")
        n = int(count)
        per_thread[frames[0]] += n
        stacks.append((frames[0], [_short(f) for f in frames[1:]], n))
    if not stacks:
        print("# no samples")
        return
    loop_thread, loop_total = per_thread.most_common(1)[0]
    total = sum(per_thread.values())
    print(f"# {total} samples holding the GIL; threads: " + ", ".join(
        f"{name} {n / total:.0%}" for name, n in per_thread.most_common()))
    own: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    for thread, frames, n in stacks:
        if thread != loop_thread or not frames:
            continue
        own[frames[-1]] += n
        for f in set(frames):
            inclusive[f] += n
    print(f"# event loop thread ({loop_thread}), {loop_total} samples; own time:")
    for f, n in own.most_common(top):
        print(f"  {n / loop_total:6.1%}  {f}")
    print("# inclusive (msbd's own functions):")
    ours = [(f, n) for f, n in inclusive.most_common() if "site-packages" not in f
            and "python3.11" not in f and not f.startswith("<")]
    for f, n in ours[:top]:
        print(f"  {n / loop_total:6.1%}  {f}")


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.profile_burst", description=__doc__)
    p.add_argument("--sandboxes", type=int, default=400)
    p.add_argument("--seconds", type=float, default=8.0)
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--rate", type=int, default=200, help="py-spy samples per second")
    p.add_argument("--native", action="store_true", help="py-spy --native: C frames too")
    p.add_argument("--perf", action="store_true",
                   help="perf record -a -g: the whole machine, by role, not py-spy")
    p.add_argument("--out", type=Path, default=None,
                   help="the samples (default /tmp/msbd-burst.raw, or .perf with --perf)")
    args = p.parse_args()
    out = args.out or Path("/tmp/msbd-burst.perf" if args.perf else "/tmp/msbd-burst.raw")
    spy = perf_split.perf_path() if args.perf else _py_spy()
    n = args.sandboxes
    with scratch("burst") as base:
        rootfs = make_rootfs(base)
        msbd = Msbd(base / "msbd", libkrun=need_fakekrun(),
                    settings={"max_sandboxes": n + 100, "max_vcpus": 100_000,
                              "max_memory_mib": 1 << 30, "heartbeat_interval": 1.0}).start()
        try:
            t_fire = time.time() + n / 8.0 + 20.0  # launches first, at ~10/s or better
            local = threading.local()

            def launch(i: int) -> None:
                client = getattr(local, "client", None)
                if client is None:
                    client = local.client = msbd.client()
                timeout = round(max(5.0, t_fire - time.time()), 3)
                client.call("sandbox.run", sandbox_spec(f"b{i:04d}", rootfs,
                                                        idle_timeout=timeout))

            t0 = time.monotonic()
            with concurrent.futures.ThreadPoolExecutor(INFLIGHT) as pool:
                list(pool.map(launch, range(n)))
            print(f"# {n} launched in {time.monotonic() - t0:.1f} s; deadlines in "
                  f"{t_fire - time.time():.1f} s", flush=True)
            pids = _roles(msbd)
            time.sleep(max(0.0, t_fire - 1.0 - time.time()))
            if args.perf:
                perf_split.record(out, args.seconds).wait()
            else:
                _spy(spy, msbd.pid, out, args)
            with msbd.client() as c:
                info = c.call("daemon.info")
                left = c.call("sandbox.list", {"state": "running", "limit": 1000})
            timers = info.get("timers") or {}
            print(f"# timers: fired {timers.get('fired')}, lateness p50 "
                  f"{timers.get('late_p50', 0) * 1e3:.1f} ms, p99 "
                  f"{timers.get('late_p99', 0) * 1e3:.1f} ms, max "
                  f"{timers.get('late_max', 0) * 1e3:.1f} ms; still running after the "
                  f"sampling: {len(left.get('sandboxes', []))}")
        finally:
            msbd.stop(300.0)
    if args.perf:
        print("\n".join(perf_split.split(perf_split.samples(out), pids, top=args.top)))
    else:
        summarize(out, args.top)


def _roles(msbd: Msbd) -> perf_split.Pids:
    """Who is who under the daemon, before the burst: each run's worker, their guests."""
    with msbd.client() as c:
        listed = c.call("sandbox.list", {"limit": 1000})["sandboxes"]
    workers = {s["run"]["pid"] for s in listed if s.get("run") and s["run"].get("pid")}
    guests = {child for w in workers for child in children(w)}
    others = set(descendants(msbd.pid)) - workers - guests
    return perf_split.Pids(msbd.pid, frozenset(workers), frozenset(guests), frozenset(others))


def _spy(spy: str, pid: int, out: Path, args: argparse.Namespace) -> None:
    # --native must pause the daemon for each sample; otherwise it is not paused.
    mode = ["--native"] if args.native else ["--nonblocking"]
    spied = subprocess.run([spy, "record", "--pid", str(pid), "--gil", "--threads",
                            *mode, "--rate", str(args.rate),
                            "--duration", str(int(args.seconds)), "--format", "raw",
                            "--output", str(out)],
                           check=False, capture_output=True, text=True)
    if spied.returncode != 0:
        raise SystemExit(f"py-spy failed: {spied.stderr[-2000:]}")


if __name__ == "__main__":
    main()
