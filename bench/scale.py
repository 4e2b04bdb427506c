"""Benchmark 3, scale: 1,000 running sandboxes in one daemon (test double, `sleep 600`, 1 s beats).

- memory: daemon VmRSS after one warm-up launch (0 live) and with N live;
  (RSS(N) - RSS(0)) / N.
- CPU at steady state: daemon utime+stime over a window / the window.
- `sandbox.list` latency with N records (all running).
- idle-timeout lateness with N deadlines in the same second or two: each
  sandbox is launched with `idle_timeout = T_fire - now`, T_fire planned from
  the launch rate so that every launch is done (and the steady figures taken)
  first. Nothing writes to their consoles, so each idle deadline is the
  worker's spawn time + its idle_timeout (the daemon's `worker spawned` log
  line gives the spawn time, to the millisecond). Lateness of the `stopping`
  event (the daemon decided: timer fired, task ran), of the `stopping` log
  line (committed; SIGTERM goes out right after), and of the `stopped` event
  (the worker exited: adds SIGTERM -> guest exit -> worker exit -> reap).
- reconciliation of N live records after a restart: a consistent copy of the
  database taken while all N ran (sqlite3 backup API), used once the workers
  are gone (as after a crash: workers end on their watchdog pipe's EOF).
  (a) `msbd serve` until READY=1 on that copy minus the same on an empty
  state dir; (b) `msbd.daemon.reconcile.reconcile()` alone, in-process, on
  another copy.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import datetime as dt
import math
import os
import re
import shutil
import sqlite3
import statistics
import threading
import time
from pathlib import Path
from typing import Any

import msgspec

from bench.common import (
    LineClient,
    Msbd,
    Report,
    Summary,
    make_rootfs,
    need_fakekrun,
    proc_cpu_seconds,
    proc_rss_kib,
    request,
    sandbox_spec,
    scratch,
)
from bench.control import floor_server

INFLIGHT = 8
WORKER_BUDGET_MIB = 16  # a worker (~15 MB RSS, much of it shared) plus its `sleep`
_LOG_LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) INFO msbd\.supervisor: "
                       r"(worker spawned|stopping) sandbox=(\S+)")


def _mem_available_mib() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) // 1024
    return 0


def affordable(wanted: int) -> int:
    """How many sandboxes this machine can hold; says so when it is fewer than `wanted`."""
    mem = _mem_available_mib()
    pid_max = int(Path("/proc/sys/kernel/pid_max").read_text())
    fits = min((mem - 2048) // WORKER_BUDGET_MIB, (pid_max - 2000) // 6)
    if fits < wanted:
        print(f"  # NOTE: only {fits} sandboxes fit ({mem} MiB available, pid_max {pid_max}); "
              f"running {fits} instead of {wanted}", flush=True)
        return max(fits, 1)
    return wanted


def _log_times(path: Path) -> tuple[dict[str, float], dict[str, float]]:
    """(spawned, stopping) wall times by sandbox, from the daemon's info log lines."""
    spawned: dict[str, float] = {}
    stopping: dict[str, float] = {}
    for line in path.read_text(errors="replace").splitlines():
        m = _LOG_LINE.match(line)
        if m:
            when = dt.datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
            (spawned if m.group(2) == "worker spawned" else stopping)[m.group(3)] = when
    return spawned, stopping


def _event_time(text: str) -> float:
    return dt.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def _events_after(msbd: Msbd, since: int, want_stopped: set[str], timeout: float
                  ) -> list[dict[str, Any]]:
    """Replay events after `since` until every sandbox in `want_stopped` has its end.
    Each event gets `received`: our wall clock when its line arrived."""
    events: list[dict[str, Any]] = []
    missing = set(want_stopped)
    deadline = time.monotonic() + timeout
    with LineClient(msbd.socket, timeout=timeout) as c:
        c.call("events.subscribe", {"since": since})
        while missing and time.monotonic() < deadline:
            c.sock.settimeout(max(0.1, deadline - time.monotonic()))
            try:
                line = c.receive()
            except TimeoutError:
                break
            msg = msgspec.json.decode(line)
            if msg.get("method") != "event":
                continue
            event = msg["params"]["event"]
            event["received"] = time.time()
            events.append(event)
            if event["state"] in ("stopped", "failed"):
                missing.discard(event["sandbox"])
    return events


def _machine_busy_seconds() -> float:
    """CPU seconds every core spent not idle (nor waiting for I/O) since boot (/proc/stat)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


def _backup(src: Path, dst: Path) -> None:
    """A consistent copy of a live SQLite database (WAL included)."""
    with contextlib.closing(sqlite3.connect(f"file:{src}?mode=ro", uri=True)) as source, \
            contextlib.closing(sqlite3.connect(dst)) as target:
        source.backup(target)


def _reconcile_in_process(db: Path) -> tuple[float, int]:
    """(seconds, runs closed) of `reconcile()` alone on the database at `db`."""
    import anyio

    from msbd.daemon.reconcile import reconcile
    from msbd.db.store import open_store

    async def measure() -> tuple[float, int]:
        async with open_store(db) as store:
            t0 = time.monotonic()
            closed = await reconcile(store)
            return time.monotonic() - t0, closed

    return anyio.run(measure, backend="asyncio", backend_options={"use_uvloop": True})


def _lateness(report: Report, name: str, late: list[float], *, target: bool = False) -> None:
    s = Summary.of(late)
    report.figure(f"{name}.p50", s.p50 * 1e3, "ms")
    report.figure(f"{name}.p99", s.p99 * 1e3, "ms")
    report.figure(f"{name}.max", max(late, default=math.nan) * 1e3, "ms",
                  note=f"{len(late)} sandboxes")
    if target:
        report.target(f"{name}.p99", s.p99 * 1e3, "ms", "<= 20")


def run(*, sandboxes: int = 1000, launch_rate: float | None = None, window: float = 10.0,
        restarts: int = 3, margin: float = 15.0) -> None:
    report = Report("scale")
    n = affordable(sandboxes)
    libkrun = need_fakekrun()
    rate = launch_rate or 10.0
    with scratch("scale") as base, contextlib.ExitStack() as stack:
        rootfs = make_rootfs(base)
        msbd = Msbd(base / "msbd", libkrun=libkrun,
                    settings={"max_sandboxes": n + 100, "max_vcpus": 100_000,
                              "max_memory_mib": 1 << 30, "heartbeat_interval": 1.0})
        msbd.start()
        stack.callback(msbd.stop, 300.0)
        with msbd.client() as c:  # warm-up: thread pool, lazy imports, first log file
            c.call("sandbox.run", sandbox_spec("warm", rootfs))
            c.call("sandbox.stop", {"name": "warm"})
            c.call("sandbox.remove", {"name": "warm"})
        rss0 = proc_rss_kib(msbd.pid)

        # Launch N with deadlines planned to fall together after the steady figures.
        planned = n / rate
        t_fire = time.time() + 2.0 * planned + window + margin
        report.note(f"{n} sandboxes; idle deadlines planned {t_fire - time.time():.0f} s "
                    f"ahead (launch rate estimate {rate:.1f}/s)")
        idle: dict[str, float] = {}
        rss_at: dict[int, int] = {}
        local = threading.local()
        lock = threading.Lock()

        def launch(i: int) -> None:
            client = getattr(local, "client", None)
            if client is None:
                client = local.client = msbd.client()
            name = f"s{i:04d}"
            timeout = round(max(5.0, t_fire - time.time()), 3)
            info = client.call("sandbox.run", sandbox_spec(name, rootfs, idle_timeout=timeout))
            if info["state"] != "running":
                raise RuntimeError(f"{name} is {info['state']}")
            with lock:
                idle[name] = timeout
                if len(idle) in (n // 4, n // 2, 3 * n // 4):
                    rss_at[len(idle)] = proc_rss_kib(msbd.pid)

        t0 = time.monotonic()
        mem0 = _mem_available_mib()
        with concurrent.futures.ThreadPoolExecutor(INFLIGHT) as pool:
            list(pool.map(launch, range(n)))
        launch_wall = time.monotonic() - t0
        report.figure("scale.host_memory_per_sandbox", (mem0 - _mem_available_mib()) / n, "MiB",
                      note="MemAvailable drop / sandboxes: worker + guest, all processes")
        rss_at[n] = proc_rss_kib(msbd.pid)
        slack = t_fire - time.time()
        report.figure("scale.sandboxes", n, "")
        report.figure("scale.launch_rate", n / launch_wall, "launches/s",
                      note=f"{INFLIGHT} in flight, {launch_wall:.1f} s")
        for count, rss in sorted(rss_at.items()):
            report.figure(f"scale.rss_at_{count}", rss / 1024, "MiB")
        report.figure("scale.rss_at_0", rss0 / 1024, "MiB")
        per = (rss_at[n] - rss0) / n
        report.figure("scale.rss_per_sandbox", per, "KiB")
        report.target("scale.rss_per_sandbox", per * 1.024, "kB", "<= 150")

        # Steady state.
        time.sleep(2.0)
        cpu0, w0 = proc_cpu_seconds(msbd.pid), time.monotonic()
        busy0 = _machine_busy_seconds()
        time.sleep(window)
        steady_wall = time.monotonic() - w0
        cpu = (proc_cpu_seconds(msbd.pid) - cpu0) / steady_wall
        steady_busy = (_machine_busy_seconds() - busy0) / steady_wall  # cores' worth
        report.figure("scale.daemon_cpu_steady", cpu * 100, "% of a core",
                      note=f"over {window:g} s, {n} heartbeats/s")
        report.figure("scale.machine_busy_steady", steady_busy * 100, "% of a core",
                      note="all processes (workers' heartbeats, the daemon), same window")
        list_lat: list[float] = []
        # One page of every record (1000 at most per page), specs left out as by default.
        list_frame = request("sandbox.list", {"limit": min(n, 1000)})
        with msbd.client() as c:
            reply = c.exchange(list_frame)
            for _ in range(20):
                t = time.monotonic()
                c.exchange(list_frame)
                list_lat.append(time.monotonic() - t)
            since = c.call("events.subscribe")["seq"]
        report.figure("scale.list_reply_bytes", len(reply), "B")
        report.latency(f"scale.list_{n}", Summary.of(list_lat))
        # The floor, right after: the same reply re-encoded from Python objects on every
        # call by a bare uvloop + msgspec server (bench.echo_server), same socket kind.
        results_file = base / "floor-results.json"
        results_file.write_bytes(msgspec.json.encode(
            {"sandbox.list": msgspec.json.decode(reply)["result"]}))
        floor_lat: list[float] = []
        with floor_server(base, results_file), LineClient(base / "floor.sock") as c:
            if len(c.exchange(list_frame)) != len(reply):
                raise RuntimeError("the floor's list reply is not the daemon's size")
            for _ in range(20):
                t = time.monotonic()
                c.exchange(list_frame)
                floor_lat.append(time.monotonic() - t)
        report.latency(f"scale.list_{n}.floor", Summary.of(floor_lat))
        report.ratio(f"scale.list_{n}_p50_vs_floor", Summary.of(list_lat).p50,
                     Summary.of(floor_lat).p50, target="<= 3")
        # Console output would move a sandbox's idle deadline: there must be none
        # (checked before the deadlines: a worker logs its shutdown there).
        talkative = [p for p in (msbd.state_dir / "logs").glob("*") if p.stat().st_size]
        report.figure("idle.sandboxes_with_console_output", len(talkative), "",
                      note="must be 0 for the idle deadlines to be spawn + idle_timeout")
        snapshot = base / "live.db"
        _backup(msbd.state_dir / "msbd.db", snapshot)
        slack = t_fire - time.time()
        report.figure("scale.slack_before_deadlines", slack, "s",
                      note="time left before the planned deadlines once steady figures "
                           "were taken (negative: some fired early)")

        # The deadlines fall. What the burst costs: the daemon's CPU, and how busy the
        # machine was, from a second before the first deadline to the last end.
        time.sleep(max(0.0, t_fire - time.time() - 1.0))
        machine_before, wall_before = _machine_busy_seconds(), time.monotonic()
        daemon_before = proc_cpu_seconds(msbd.pid)
        wait = max(0.0, t_fire - time.time()) + 60.0
        events = _events_after(msbd, since, set(idle), timeout=wait)
        daemon_burst = proc_cpu_seconds(msbd.pid) - daemon_before
        machine_busy = _machine_busy_seconds() - machine_before
        burst_wall = time.monotonic() - wall_before
        spawned, stopping_log = _log_times(msbd.stderr_path)
        deadline = {name: spawned[name] + idle[name] for name in idle if name in spawned}
        decided = {e["sandbox"]: _event_time(e["time"]) for e in events
                   if e["state"] == "stopping"}
        ended = {e["sandbox"]: (_event_time(e["time"]), e.get("reason")) for e in events
                 if e["state"] == "stopped"}
        reasons = {r for _, r in ended.values()}
        if reasons != {"idle_timeout"}:
            report.note(f"WARNING: ends other than idle_timeout: {sorted(map(str, reasons))}")
        spread = max(deadline.values()) - min(deadline.values())
        report.figure("idle.deadline_spread", spread * 1e3, "ms",
                      note="last deadline minus first")
        # The timer figure proper: how late the scheduler fired (and so signalled: the
        # SIGTERM goes out inside the timer callback), as the daemon measures it.
        with msbd.client() as c:
            timers = c.call("daemon.info")["timers"]
        report.figure("timers.fired", timers["fired"], "",
                      note="idle, heartbeat and grace deadlines fired so far")
        report.figure("timers.late.p50", timers["late_p50"] * 1e3, "ms")
        report.target("timers.late.p99", timers["late_p99"] * 1e3, "ms", "<= 20")
        report.figure("timers.late.max", timers["late_max"] * 1e3, "ms")
        # When each decision was on disk (`stopping` event), and when each run's end was.
        _lateness(report, "idle.decided_late",
                  [decided[k] - d for k, d in deadline.items() if k in decided])
        _lateness(report, "idle.stopping_logged_late",
                  [stopping_log[k] - d for k, d in deadline.items() if k in stopping_log])
        _lateness(report, "idle.ended_late",
                  [ended[k][0] - d for k, d in deadline.items() if k in ended])
        # An end's time is when the daemon reaped the worker; its event goes out after the
        # COMMIT holding it, and reaches us over the socket. The gap is the daemon's delay
        # in recording an end (plus our own in reading it), apart from the wait for the
        # worker to exit.
        _lateness(report, "idle.end_event_received_after_reap",
                  [e["received"] - _event_time(e["time"]) for e in events
                   if e["state"] == "stopped"])
        report.figure("idle.all_ended_after", (max(t for t, _ in ended.values())
                                               - min(deadline.values())) * 1e3, "ms",
                      note="first deadline to the last recorded end")
        report.figure("idle.last_deadline_to_last_end", (max(t for t, _ in ended.values())
                                                        - max(deadline.values())) * 1e3, "ms",
                      note="target <= 300")
        report.figure("idle.last_deadline_to_last_end_event", (max(
            e["received"] for e in events if e["state"] == "stopped")
            - max(deadline.values())) * 1e3, "ms",
            note="the same, to when the last end's event (sent after its COMMIT) reached us")
        report.figure("idle.burst_cpu.daemon", daemon_burst * 1e3, "ms",
                      note="the daemon's CPU from 1 s before the deadlines to the last end")
        cores = os.cpu_count() or 1
        report.figure("idle.burst_machine_busy", 100 * machine_busy / (cores * burst_wall),
                      "% of all cores", note=f"over the same {burst_wall:.2f} s (/proc/stat): "
                      "near 100 means the workers' own ends need the CPU the burst waits for")
        # What the ends cost besides the daemon: the workers, their guests (here the
        # test double and each guest's workload process) and the kernel reaping them,
        # less what the machine spent anyway (the steady rate over the same wall time).
        rest = machine_busy - daemon_burst - steady_busy * burst_wall
        report.figure("idle.burst_cpu.rest", rest * 1e3, "ms",
                      note="machine busy - daemon - steady load, same window")
        # Even a daemon that cost nothing leaves that work to the cores after the first
        # deadline: the last end comes no sooner than rest / cores after it.
        report.figure("idle.last_end_bound_without_daemon", (rest / cores - spread) * 1e3,
                      "ms", note=f"rest / {cores} cores - deadline spread: the last deadline "
                      "to the last end if the daemon's own work were free")
        msbd.stop(300.0)

        # Reconciliation after a restart.
        empty: list[float] = []
        loaded: list[float] = []
        for i in range(restarts):
            fresh = Msbd(base / f"empty{i}", libkrun=libkrun).start()
            empty.append(fresh.ready_after)
            fresh.stop()
            again = Msbd(base / f"again{i}", libkrun=libkrun)
            again.state_dir.mkdir(parents=True)
            shutil.copyfile(snapshot, again.state_dir / "msbd.db")
            os.chmod(again.state_dir / "msbd.db", 0o600)
            again.start()
            loaded.append(again.ready_after)
            again.stop()
            if i == 0:
                log = again.stderr_path.read_text()
                if f"{n} runs reconciled" not in log:
                    report.note(f"WARNING: the restarted daemon did not reconcile {n} runs")
        report.figure("reconcile.ready_empty", statistics.median(empty) * 1e3, "ms",
                      note=f"msbd serve until READY=1, empty state dir, median of {restarts}")
        report.figure("reconcile.ready_with_live_records", statistics.median(loaded) * 1e3,
                      "ms", note=f"same with {n} live runs to reconcile")
        report.figure("reconcile.restart_delta",
                      (statistics.median(loaded) - statistics.median(empty)) * 1e3, "ms")
        copy = base / "reconcile.db"
        shutil.copyfile(snapshot, copy)
        took, closed = _reconcile_in_process(copy)
        report.figure("reconcile.in_process", took * 1e3, "ms", note=f"{closed} runs closed")
