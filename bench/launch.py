"""Benchmark 2, launch: `sandbox.run` until the worker wrote `entering`, against its baselines.

- msbd: `sandbox.run` of `sleep 600` in a busybox root with the libkrun test
  double; the call returns once the worker wrote `entering` (everything before
  libkrun would start a VM). Sequential, then 8 calls in flight (8
  connections). Sandboxes are stopped and removed after each series, untimed.
  With the default warm pool (`worker_pool` = 2) and without (`worker_pool` =
  0, a worker started per launch), both with the fork server (the default),
  and with the pool but without the fork server (`msbd_spawn`: every worker
  spawned as a new interpreter, as before the fork server); and "warm": each launch timed only once
  the pool's workers are blocked reading their spec (a launch finding the
  pool warm, as one does that is not part of a burst), each right after a
  bare interpreter spawn timed the same way ("python_paired": the warm
  target's baseline, paired launch by launch, as the machine is shared).
- baseline: `posix_spawn` of the bare interpreter until it writes a line on a
  pipe: `python -c "import os; os.write(1, b'x\\n')"` (site imported, as the
  worker's interpreter does) and the same with `-S` (no site) for reference.
- the worker alone: `msbd.daemon.spawn.spawn_worker` (the daemon's own spawn)
  of `python -m msbd.vm` until `entering`, no daemon, no RPC, no database.
- peer: supervisord `startProcess(name, wait=True)` of `/bin/sleep 600` with
  startsecs=0 (returns once the process is RUNNING), and `wait=False`.

Where the time goes: the worker run through `bench/worker_probe.py`
(timestamps at each phase), `python -X importtime` of the worker's imports,
and CPU accounting (/proc utime+stime): the daemon's per launch, and a pooled
worker's until it waits for its spec, which together bound launches/s on
this machine's cores. With the fork server (`worker_fork_server`, on by
default) the daemon's workers are forked: the zygote's CPU per launch (its
own and its reaped intermediate children's) and a forked pool worker's CPU
until it waits (read from the daemon's idle workers in the warm series) are
reported too, and the bound they give.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import re
import select
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import msgspec

from bench import peer
from bench.common import (
    PYTHON,
    REPO,
    Msbd,
    Report,
    Summary,
    make_rootfs,
    need_fakekrun,
    proc_cpu_seconds,
    proc_runtime_seconds,
    reaped_children_cpu_seconds,
    sandbox_spec,
    scratch,
    waiting_for_spec,
)

INFLIGHT = 8
POOL = 2  # msbd's default `worker_pool`
LINE_CODE = "import os; os.write(1, b'x\\n')"


# --- generic: start N things with at most K in flight, time each ---------------------------


def timed_concurrently(count: int, inflight: int, one: Callable[[int], float]
                       ) -> tuple[list[float], float]:
    """Run `one(i)` (returns its latency) for i < count, `inflight` at a time; (latencies, wall)."""
    t0 = time.monotonic()
    if inflight == 1:
        latencies = [one(i) for i in range(count)]
    else:
        with concurrent.futures.ThreadPoolExecutor(inflight) as pool:
            latencies = list(pool.map(one, range(count)))
    return latencies, time.monotonic() - t0


def spawn_until_line(argv: Sequence[str], count: int, inflight: int,
                     env: dict[str, str] | None = None) -> tuple[list[float], float]:
    """posix_spawn `argv` `count` times, `inflight` at once; latency until a line on stdout.

    One thread and poll(), so the measurer itself adds no thread hand-offs.
    """
    env = dict(os.environ) if env is None else env
    latencies: list[float] = []
    running: dict[int, tuple[int, float]] = {}  # read fd -> (pid, t0)
    started = 0
    poller = select.poll()
    t_begin = time.monotonic()
    while len(latencies) < count:
        while started < count and len(running) < inflight:
            r, w = os.pipe2(os.O_CLOEXEC)
            t0 = time.monotonic()
            pid = os.posix_spawn(argv[0], list(argv), env,
                                 file_actions=[(os.POSIX_SPAWN_DUP2, w, 1)])
            os.close(w)
            running[r] = (pid, t0)
            poller.register(r, select.POLLIN)
            started += 1
        for fd, _ in poller.poll():
            data = os.read(fd, 64)
            now = time.monotonic()
            pid, t0 = running.pop(fd)
            poller.unregister(fd)
            os.close(fd)
            if not data.endswith(b"\n"):
                raise RuntimeError(f"{argv} wrote {data!r}")
            latencies.append(now - t0)
            os.waitpid(pid, 0)
    return latencies, time.monotonic() - t_begin


# --- the worker alone -------------------------------------------------------------


def worker_spec(rootfs: Path, libkrun: Path, name: str = "probe") -> bytes:
    from msbd.model import WorkerSpec

    spec = msgspec.convert(sandbox_spec(name, rootfs) | {"libkrun": str(libkrun)},
                           WorkerSpec)
    return msgspec.json.encode(spec)


def _read_until(fd: int, needle: bytes, deadline: float, sink: bytearray) -> None:
    while needle not in sink:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"no {needle!r} within the deadline; got {bytes(sink)!r}")
        ready, _, _ = select.select([fd], [], [], left)
        if ready:
            try:
                chunk = os.read(fd, 65536)
            except BlockingIOError:
                continue
            if not chunk:
                raise RuntimeError(f"EOF before {needle!r}; got {bytes(sink)!r}")
            sink += chunk


def spawn_worker_once(argv: list[str], spec: bytes, env: dict[str, str], *, probe: bool = False
                      ) -> tuple[float, float, bytes]:
    """(t0, time `entering` arrived, console output) of one worker spawned the daemon's way.

    With `probe`, also waits for the probe's last phase line on the console.
    """
    from msbd.daemon.spawn import spawn_worker

    t0 = time.monotonic()
    worker = spawn_worker(argv, env, spec)
    status, console = bytearray(), bytearray()
    try:
        _read_until(worker.status_r, b"entering\n", time.monotonic() + 30, status)
        t1 = time.monotonic()
        if probe:
            _read_until(worker.console_r, b"phase configured", time.monotonic() + 5, console)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(worker.pid, signal.SIGKILL)
        os.waitpid(worker.pid, 0)
        worker.close()
    return t0, t1, bytes(console)


def _entering_latency(argv: list[str], spec: bytes, env: dict[str, str]) -> float:
    t0, t1, _ = spawn_worker_once(argv, spec, env)
    return t1 - t0


def wait_pool_warm(msbd: Msbd, size: int, timeout: float = 30.0) -> None:
    """Until `size` children of `msbd` wait for their spec (polls /proc: bench only)."""
    deadline = time.monotonic() + timeout
    while sum(map(waiting_for_spec, msbd.children())) < size:
        if time.monotonic() > deadline:
            raise TimeoutError(f"the pool of msbd {msbd.pid} never got {size} warm workers")
        time.sleep(0.002)


def prespawned_latency(spec: bytes, env: dict[str, str], cpu: list[float] | None = None
                       ) -> float:
    """What a pool of pre-spawned workers would give: spec in, `entering` out.

    The unmodified worker (`python -m msbd.vm`) gets its spec on a pipe
    (the fd protocol allows a pipe on fd 96) whose write end we hold; once it is
    blocked reading it (all imports and fd checks done), the clock starts,
    the spec is written and the pipe closed, and it runs until `entering`.
    Appends to `cpu` the CPU seconds the worker used until it waited.
    """
    spec_r, spec_w = os.pipe2(os.O_CLOEXEC)
    status_r, status_w = os.pipe2(os.O_CLOEXEC)
    console_r, console_w = os.pipe2(os.O_CLOEXEC)
    watchdog_r, watchdog_w = os.pipe2(os.O_CLOEXEC)
    null = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    # dup2 targets 96-98 are above every source here (fresh fds are small).
    actions = [(os.POSIX_SPAWN_DUP2, null, 0), (os.POSIX_SPAWN_DUP2, console_w, 1),
               (os.POSIX_SPAWN_DUP2, console_w, 2), (os.POSIX_SPAWN_DUP2, spec_r, 96),
               (os.POSIX_SPAWN_DUP2, watchdog_r, 97), (os.POSIX_SPAWN_DUP2, status_w, 98)]
    pid = os.posix_spawn(PYTHON, [PYTHON, "-m", "msbd.vm"], env, file_actions=actions,
                         setsid=True)
    for fd in (spec_r, status_w, console_w, watchdog_r, null):
        os.close(fd)
    try:
        deadline = time.monotonic() + 30
        while not waiting_for_spec(pid):  # still starting
            if time.monotonic() > deadline:
                raise TimeoutError("the pre-spawned worker never waited for its spec")
            time.sleep(0.005)
        if cpu is not None:
            cpu.append(proc_cpu_seconds(pid))
        t0 = time.monotonic()
        os.write(spec_w, spec)
        os.close(spec_w)
        spec_w = -1
        _read_until(status_r, b"entering\n", time.monotonic() + 30, bytearray())
        return time.monotonic() - t0
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        for fd in (spec_w, status_r, console_r, watchdog_w):
            if fd >= 0:
                os.close(fd)


def worker_env() -> dict[str, str]:
    """The environment the daemon gives its workers (no extra `worker_env`)."""
    from msbd.daemon.spawn import worker_environ

    return worker_environ({})


# --- importtime ---------------------------------------------------------------------


_IMPORTTIME = re.compile(r"import time:\s+(\d+) \|\s+(\d+) \|( *)(\S+)")


def import_times(*args: str) -> dict[str, dict[str, int]]:
    """`python -X importtime ARGS`: {top-level module: {itself and each direct import: µs}}.

    Cumulative microseconds; importtime prints a module after its imports, so
    the direct imports of a top-level module are the depth-2 lines before it.
    `-m msbd.vm` (the real entry, so its imports are the worker's own) ends with
    status 2 without its fds, after importing everything.
    """
    done = subprocess.run([PYTHON, "-X", "importtime", *args], cwd=REPO,
                          capture_output=True, text=True, check=False)
    if done.returncode not in (0, 2):
        raise RuntimeError(f"python -X importtime {' '.join(args)}: {done.stderr[-500:]}")
    tops: dict[str, dict[str, int]] = {}
    pending: dict[str, int] = {}
    for line in done.stderr.splitlines():
        m = _IMPORTTIME.match(line)
        if not m:
            continue
        depth = (len(m.group(3)) + 1) // 2
        if depth == 1:
            tops[m.group(4)] = {m.group(4): int(m.group(2))} | pending
            pending = {}
        elif depth == 2:
            pending[m.group(4)] = int(m.group(2))
    return tops


# --- the benchmark -------------------------------------------------------------------------


def _zygote_cpu(msbd: Msbd) -> float:
    """CPU seconds of the daemon's fork server and its reaped children (0: none)."""
    return sum(proc_cpu_seconds(pid) + reaped_children_cpu_seconds(pid)
               for pid in msbd.zygotes())


def _msbd_series(msbd: Msbd, rootfs: Path, prefix: str, count: int, inflight: int,
                 *, warm: int = 0, paired: list[float] | None = None,
                 ready_cpu: dict[int, float] | None = None
                 ) -> tuple[list[float], float, float, float]:
    """Launch `count` sandboxes; (latencies, wall, daemon CPU s per launch, the fork
    server's CPU s per launch). Then stop + remove.

    `warm`: before each (sequential) launch, wait until that many pool workers are warm.
    `paired`: right before each launch, time a bare interpreter spawn into it too (so a
    ratio of the two compares launches made under the same load of a shared machine).
    `ready_cpu`: {pid: CPU s} of each warm pool worker seen waiting for its spec (its CPU
    clock: a forked worker's is far below a clock tick).
    """
    local = threading.local()

    def one(i: int) -> float:
        client = getattr(local, "client", None)
        if client is None:
            client = local.client = msbd.client()
        if warm:
            wait_pool_warm(msbd, warm)
            if ready_cpu is not None:
                for pid in msbd.children():
                    if pid not in ready_cpu and waiting_for_spec(pid):
                        ready_cpu[pid] = proc_runtime_seconds(pid)
        if paired is not None:
            paired.extend(spawn_until_line([PYTHON, "-c", LINE_CODE], 1, 1)[0])
        t0 = time.monotonic()
        info = client.call("sandbox.run", sandbox_spec(f"{prefix}-{i}", rootfs))
        latency = time.monotonic() - t0
        if info["state"] != "running":
            raise RuntimeError(f"sandbox {prefix}-{i} is {info['state']}")
        return latency

    cpu0, zcpu0 = proc_cpu_seconds(msbd.pid), _zygote_cpu(msbd)
    latencies, wall = timed_concurrently(count, inflight, one)
    cpu = (proc_cpu_seconds(msbd.pid) - cpu0) / count
    zcpu = (_zygote_cpu(msbd) - zcpu0) / count
    names = [{"name": f"{prefix}-{i}"} for i in range(count)]
    with msbd.client() as c:
        c.batches("sandbox.stop", [n | {"timeout": 10} for n in names])
        c.batches("sandbox.remove", names)
    return latencies, wall, cpu, zcpu


def _supervisord_series(sup: peer.Supervisord, count: int, inflight: int, wait: bool
                        ) -> tuple[list[float], float]:
    local = threading.local()

    def one(i: int) -> float:
        client = getattr(local, "client", None)
        if client is None:
            client = local.client = sup.client()
        t0 = time.monotonic()
        if client.call("supervisor.startProcess", f"p{i}", wait) is not True:
            raise RuntimeError("startProcess failed")
        return time.monotonic() - t0

    result = timed_concurrently(count, inflight, one)
    client = sup.client()
    try:
        client.call("supervisor.stopAllProcesses", True)
    finally:
        client.close()
    return result


def run(*, count: int = 40, concurrent_count: int = 120, probes: int = 15) -> float | None:
    """Run benchmark 2; returns msbd's launches/s with 8 in flight (used to size `scale`)."""
    report = Report("launch")
    libkrun = need_fakekrun()
    report.note(f"{count} sequential launches and {concurrent_count} with {INFLIGHT} in flight "
                "per series; workload `sleep 600`, libkrun test double")
    with scratch("launch") as base, contextlib.ExitStack() as stack:
        rootfs = make_rootfs(base)
        series: dict[str, dict[str, tuple[list[float], float]]] = {"seq": {}, f"c{INFLIGHT}": {}}

        # baselines: the bare interpreter
        for mode, n, k in (("seq", count, 1), (f"c{INFLIGHT}", concurrent_count, INFLIGHT)):
            spawn_until_line([PYTHON, "-c", LINE_CODE], 3, 1)  # warm the page cache
            series[mode]["python"] = spawn_until_line([PYTHON, "-c", LINE_CODE], n, k)
            series[mode]["python_S"] = spawn_until_line([PYTHON, "-S", "-c", LINE_CODE], n, k)

        # the worker alone, spawned as the daemon spawns it
        spec = worker_spec(rootfs, libkrun)
        env = worker_env()
        argv = [PYTHON, "-m", "msbd.vm"]
        spawn_worker_once(argv, spec, env)  # warm-up
        for mode, n, k in (("seq", count, 1), (f"c{INFLIGHT}", concurrent_count, INFLIGHT)):
            series[mode]["worker"] = timed_concurrently(
                n, k, lambda _i: _entering_latency(argv, spec, env))
        ready_cpu: list[float] = []
        series["seq"]["prespawned"] = timed_concurrently(
            count, 1, lambda _i: prespawned_latency(spec, env, ready_cpu))

        # msbd, with its default warm pool and with none
        cpu_per_launch: dict[str, float] = {}
        zygote_per_launch: dict[str, float] = {}
        forked_ready: dict[int, float] = {}
        for label, pool, forks in (("msbd", POOL, True), ("msbd_nopool", 0, True),
                                   ("msbd_spawn", POOL, False)):
            msbd = Msbd(base / label, libkrun=libkrun,
                        settings={"max_sandboxes": 100_000, "max_vcpus": 100_000,
                                  "worker_pool": pool, "worker_fork_server": forks}).start()
            with msbd.client() as c:  # warm-up: thread pool, lazy imports
                c.call("sandbox.run", sandbox_spec("warm", rootfs))
                c.call("sandbox.stop", {"name": "warm"})
                c.call("sandbox.remove", {"name": "warm"})
            try:
                if label == "msbd":
                    paired: list[float] = []
                    latencies, wall, cpu, zcpu = _msbd_series(
                        msbd, rootfs, "w", count, 1, warm=pool, paired=paired,
                        ready_cpu=forked_ready)
                    series["seq"]["msbd_warm"] = (latencies, wall)
                    series["seq"]["python_paired"] = (paired, wall)
                    cpu_per_launch["warm"] = cpu
                    zygote_per_launch["warm"] = zcpu
                for mode, n, k in (("seq", count, 1),
                                   (f"c{INFLIGHT}", concurrent_count, INFLIGHT)):
                    latencies, wall, cpu, zcpu = _msbd_series(msbd, rootfs, mode, n, k)
                    series[mode][label] = (latencies, wall)
                    cpu_per_launch[f"{mode}.{label}"] = cpu
                    zygote_per_launch[f"{mode}.{label}"] = zcpu
            finally:
                msbd.stop()

        # the peer
        if peer.available():
            sup = peer.Supervisord(base / "sup", programs=max(count, concurrent_count)).start()
            stack.callback(sup.stop)
            _supervisord_series(sup, 2, 1, True)  # warm-up
            series["seq"]["supervisord_nowait"] = _supervisord_series(sup, count, 1, False)
            for mode, n, k in (("seq", count, 1), (f"c{INFLIGHT}", concurrent_count, INFLIGHT)):
                series[mode]["supervisord"] = _supervisord_series(sup, n, k, True)
        else:
            report.note(peer.SKIP_MESSAGE)

        for mode, runs in series.items():
            for name, (latencies, wall) in runs.items():
                # not a rate: a pre-spawned worker's would be the refill rate, and the
                # warm series waits for the pool between launches
                report.latency(f"launch.{mode}.{name}", Summary.of(latencies),
                               rate=None if name in ("prespawned", "msbd_warm",
                                                     "python_paired")
                               else len(latencies) / wall, unit="launches/s")
        for key, cpu in cpu_per_launch.items():
            report.figure(f"launch.{key}.daemon_cpu_per_launch", cpu * 1e3, "ms")
        for key, cpu in zygote_per_launch.items():
            report.figure(f"launch.{key}.zygote_cpu_per_launch", cpu * 1e3, "ms",
                          note="the fork server and its reaped intermediate children")
        ready = sum(ready_cpu) / len(ready_cpu)
        report.figure("launch.worker_cpu_until_waiting", ready * 1e3, "ms",
                      note="a pooled worker's CPU from spawn to blocking on fd 96")
        per_launch = ready + cpu_per_launch["seq.msbd"]
        report.figure("launch.cpu_bound_rate", (os.cpu_count() or 1) / per_launch, "launches/s",
                      note="cores / (daemon CPU per launch + worker CPU until waiting)")
        if forked_ready:
            forked = sum(forked_ready.values()) / len(forked_ready)
            report.figure("launch.forked_worker_cpu_until_waiting", forked * 1e3, "ms",
                          note=f"a forked pool worker's CPU from its fork to blocking on fd 96 "
                               f"({len(forked_ready)} workers)")
            per_forked = forked + cpu_per_launch["seq.msbd"] + zygote_per_launch["seq.msbd"]
            report.figure("launch.cpu_bound_rate_forked", (os.cpu_count() or 1) / per_forked,
                          "launches/s", note="cores / (daemon + zygote CPU per launch + forked "
                                             "worker CPU until waiting)")
        for mode, runs in series.items():
            p50 = {name: Summary.of(lat).p50 for name, (lat, _) in runs.items()}
            rate = {name: len(lat) / wall for name, (lat, wall) in runs.items()}
            if "msbd_warm" in p50:
                report.ratio(f"launch.{mode}.msbd_warm_p50_vs_python", p50["msbd_warm"],
                             p50["python_paired"], target="<= 0.5")
                report.ratio(f"launch.{mode}.msbd_warm_p50_vs_python_series",
                             p50["msbd_warm"], p50["python"])
            report.ratio(f"launch.{mode}.msbd_p50_vs_python", p50["msbd"], p50["python"])
            report.ratio(f"launch.{mode}.msbd_nopool_p50_vs_python", p50["msbd_nopool"],
                         p50["python"])
            report.ratio(f"launch.{mode}.worker_p50_vs_python", p50["worker"], p50["python"])
            if "supervisord" in rate:
                report.ratio(f"launch.{mode}.msbd_rate_vs_supervisord", rate["msbd"],
                             rate["supervisord"], target=">= 2")
                report.ratio(f"launch.{mode}.msbd_nopool_rate_vs_supervisord",
                             rate["msbd_nopool"], rate["supervisord"])
                report.ratio(f"launch.{mode}.msbd_spawn_rate_vs_supervisord",
                             rate["msbd_spawn"], rate["supervisord"])
        seq_p50 = {name: Summary.of(lat).p50 for name, (lat, _) in series["seq"].items()}
        breakdown(report, rootfs, libkrun, probes, env, python_p50=seq_p50["python"],
                  warm_p50=seq_p50["msbd_warm"], handed_p50=seq_p50["prespawned"])
        return len(series[f"c{INFLIGHT}"]["msbd"][0]) / series[f"c{INFLIGHT}"]["msbd"][1]


PHASES = ("interpreter", "imports", "argparse", "fds_closed", "fds_checked", "spec_read",
          "libkrun_loaded", "configured")


def breakdown(report: Report, rootfs: Path, libkrun: Path, probes: int, env: dict[str, str],
              *, python_p50: float, warm_p50: float, handed_p50: float) -> None:
    """Median time of each launch phase, from the probe's timestamps and -X importtime."""
    spec = worker_spec(rootfs, libkrun)
    argv = [PYTHON, str(REPO / "bench" / "worker_probe.py")]
    env = env | {"PYTHONPATH": str(REPO)}  # the probe imports the msbd of this checkout
    samples: dict[str, list[float]] = {p: [] for p in (*PHASES, "entering")}
    totals: list[float] = []
    spawn_worker_once(argv, spec, env, probe=True)  # warm-up
    for _ in range(probes):
        t0, t1, console = spawn_worker_once(argv, spec, env, probe=True)
        marks = {m[0]: float(m[1]) for m in (
            line.split()[1:3] for line in console.decode().splitlines()
            if line.startswith("phase "))}
        if set(marks) != set(PHASES):
            raise RuntimeError(f"worker probe printed {console!r}")
        prev = t0
        for phase in PHASES:
            samples[phase].append(marks[phase] - prev)
            prev = marks[phase]
        samples["entering"].append(t1 - prev)
        totals.append(t1 - t0)
    report.note(f"launch breakdown, median of {probes} probed workers (phase = time since "
                "the previous mark; `interpreter` = spawn until the first line of user code, "
                "site included; `entering` = until the parent read it)")
    for phase, values in samples.items():
        report.figure(f"breakdown.{phase}", Summary.of(values).p50 * 1e3, "ms")
    total = Summary.of(totals).p50
    report.figure("breakdown.worker_total", total * 1e3, "ms")
    report.figure("breakdown.daemon_share", (warm_p50 - handed_p50) * 1e3, "ms",
                  note="warm-pool sandbox.run p50 minus a pre-spawned worker's spec -> "
                       "entering: RPC, records, checks, console log, spec hand-off")
    report.figure("breakdown.python_baseline", python_p50 * 1e3, "ms")
    startup = import_times("-c", "pass")
    report.figure("imports.startup_us", sum(t[n] for n, t in startup.items()), "us",
                  note="-X importtime of `python -c pass`: site, encodings, .pth files")
    worker = {n: t for n, t in import_times("-m", "msbd.vm").items() if n not in startup}
    report.figure("imports.worker_us", sum(t[n] for n, t in worker.items()), "us",
                  note="-X importtime, what `python -m msbd.vm` adds (inflated by the "
                       "instrumentation)")
    direct = {k: v for t in worker.values() for k, v in t.items() if k not in worker}
    for name, micros in sorted(direct.items(), key=lambda kv: -kv[1])[:8]:
        report.note(f"  import {name}: {micros} us cumulative")
