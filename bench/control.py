"""Benchmark 1, the control path: round trips of `daemon.ping` and `sandbox.list` (100 records).

Servers, each measured with the same client processes (`bench.loadgen`):
the floor (`bench.echo_server`: uvloop + msgspec, answers in `data_received`),
msbd, and the peer, supervisord's XML-RPC (`supervisor.getState` for ping,
`supervisor.getAllProcessInfo` over 100 configured programs for list).
One client calling sequentially, then 16 clients (16 processes, one
connection each, each sequential). Besides calls/s and latency it reports
each server's own CPU per call (utime+stime of the server process over the
run / calls), which the client's overhead does not blur. The floor and msbd
take turns for several rounds and the median round counts: on two cores shared
with 16 client processes, one round of either moves by a third from run to run.
"""

from __future__ import annotations

import contextlib
import statistics
import subprocess
import time
import xmlrpc.client
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import msgspec

from bench import peer
from bench.common import (
    PYTHON,
    REPO,
    LineClient,
    Msbd,
    Report,
    Summary,
    proc_cpu_seconds,
    request,
    scratch,
)
from bench.loadgen import http_request

RECORDS = 100
CONCURRENT = 16


@dataclass
class Load:
    latencies: list[float]  # seconds, every call
    wall: float  # seconds from the first client's start to the last one's end
    cpu_per_call: float  # server CPU seconds per call

    @property
    def summary(self) -> Summary:
        return Summary.of(self.latencies)

    @property
    def rate(self) -> float:
        return len(self.latencies) / self.wall

    @staticmethod
    def pooled(rounds: list[Load]) -> Load:
        """Several rounds as one: every latency, calls over the summed wall time, and
        the median round's CPU per call (a round that the machine's other work
        disturbed moves a median less than a sum)."""
        return Load([t for r in rounds for t in r.latencies], sum(r.wall for r in rounds),
                    statistics.median(r.cpu_per_call for r in rounds))


def run_load(path: Path, kind: str, payload: bytes, *, clients: int, duration: float,
             warmup: int, server_pid: int, work: Path) -> Load:
    """`clients` loadgen processes hammer `path` for `duration` s; merged figures."""
    request_file = work / f"request-{kind}-{hash(payload) & 0xffff:x}"
    request_file.write_bytes(payload)
    procs = [subprocess.Popen([PYTHON, "-m", "bench.loadgen", str(path), kind,
                               str(request_file), str(warmup)],
                              cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
             for _ in range(clients)]
    try:
        for p in procs:
            assert p.stdout is not None
            if p.stdout.readline() != b"ready\n":
                raise RuntimeError(f"a load client failed against {path}")
        cpu0 = proc_cpu_seconds(server_pid)
        deadline = time.monotonic_ns() + int(duration * 1e9)
        for p in procs:
            assert p.stdin is not None
            p.stdin.write(f"GO {deadline}\n".encode())
            p.stdin.flush()
        outs = [msgspec.json.decode(p.communicate(timeout=duration + 60)[0]) for p in procs]
        cpu1 = proc_cpu_seconds(server_pid)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    latencies = [ns / 1e9 for out in outs for ns in out["latencies"]]
    wall = (max(o["end"] for o in outs) - min(o["start"] for o in outs)) / 1e9
    return Load(latencies, wall, (cpu1 - cpu0) / max(len(latencies), 1))


@contextlib.contextmanager
def floor_server(base: Path, results_file: Path) -> Iterator[subprocess.Popen[bytes]]:
    path = base / "floor.sock"
    proc = subprocess.Popen([PYTHON, "-m", "bench.echo_server", str(path), str(results_file)],
                            cwd=REPO, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        if proc.stdout.readline() != b"ready\n":
            raise RuntimeError("the floor server did not start")
        yield proc
    finally:
        proc.kill()
        proc.wait()


def run(*, duration: float = 2.0, warmup: int = 200, rounds: int = 3) -> None:
    report = Report("control path")
    report.note(f"each figure: {duration:g} s of calls after {warmup} warm-up calls per "
                "client; clients read replies without parsing them (same work per server)")
    report.note(f"the floor and msbd: {rounds} rounds each, taking turns (floor, msbd, "
                "floor, ...); their CPU per call is the median round's, their latencies and "
                "rate all rounds'; supervisord: one round")
    report.note("supervisord client: raw HTTP/1.1 POST on one keep-alive connection "
                "(what xmlrpc.client sends, minus reconnecting per call)")
    with scratch("ctl") as base, contextlib.ExitStack() as stack:
        rootfs = base / "rootfs"
        rootfs.mkdir()
        msbd = Msbd(base / "msbd").start()
        stack.callback(msbd.stop)
        with msbd.client() as c:
            c.batch("sandbox.create", [{"name": f"rec-{i:03d}", "rootfs": str(rootfs),
                                        "exec": "/bin/sleep", "args": ["600"],
                                        "labels": {"bench": "control"}}
                                       for i in range(RECORDS)])
            listed = c.call("sandbox.list")
            assert len(listed["sandboxes"]) == RECORDS
            list_bytes = len(c.exchange(request("sandbox.list")))
        report.figure("sandbox_list.reply_bytes", list_bytes, "B")
        results_file = base / "results.json"
        results_file.write_bytes(msgspec.json.encode({"sandbox.list": listed}))
        floor = stack.enter_context(floor_server(base, results_file))
        with LineClient(base / "floor.sock") as c:
            assert c.call("daemon.ping") == "pong"
        servers: dict[str, tuple[Path, str, int]] = {
            "floor": (base / "floor.sock", "line", floor.pid),
            "msbd": (msbd.socket, "line", msbd.pid),
        }
        if peer.available():
            sup = peer.Supervisord(base / "sup", programs=RECORDS).start()
            stack.callback(sup.stop)
            client = sup.client()
            assert len(client.call("supervisor.getAllProcessInfo")) == RECORDS
            client.close()
            servers["supervisord"] = (sup.socket, "http", sup.pid)
        else:
            report.note(peer.SKIP_MESSAGE)
        payloads = {
            "ping": {"line": request("daemon.ping"),
                     "http": http_request(xmlrpc.client.dumps((), "supervisor.getState")
                                          .encode())},
            "list": {"line": request("sandbox.list"),
                     "http": http_request(xmlrpc.client.dumps(
                         (), "supervisor.getAllProcessInfo").encode())},
        }
        for method in ("ping", "list"):
            for clients in (1, CONCURRENT):
                mode = "seq" if clients == 1 else f"c{clients}"
                runs: dict[str, list[Load]] = {server: [] for server in servers}
                for turn in range(rounds):
                    for server, (path, kind, pid) in servers.items():
                        if turn and server == "supervisord":
                            continue
                        runs[server].append(run_load(
                            path, kind, payloads[method][kind], clients=clients,
                            duration=duration, warmup=warmup, server_pid=pid, work=base))
                report.note(f"{method}.{mode} CPU per call by round: " + "; ".join(
                    f"{server} " + ", ".join(f"{r.cpu_per_call * 1e6:.2f}" for r in rs)
                    for server, rs in runs.items()) + " us")
                loads = {server: Load.pooled(rs) for server, rs in runs.items()}
                for server, load in loads.items():
                    name = f"{method}.{mode}.{server}"
                    report.latency(name, load.summary, rate=load.rate)
                    report.figure(f"{name}.server_cpu_per_call", load.cpu_per_call * 1e6, "us")
                ping_seq = method == "ping" and clients == 1
                report.ratio(f"{method}.{mode}.msbd_p50_vs_floor",
                             loads["msbd"].summary.p50, loads["floor"].summary.p50,
                             target="<= 2" if ping_seq else None)
                report.ratio(f"{method}.{mode}.msbd_cpu_per_call_vs_floor",
                             loads["msbd"].cpu_per_call, loads["floor"].cpu_per_call,
                             target="<= 1.5" if method == "ping" else None)
                if "supervisord" in loads:
                    report.ratio(f"{method}.{mode}.msbd_rate_vs_supervisord",
                                 loads["msbd"].rate, loads["supervisord"].rate,
                                 target=">= 10" if method == "ping" else None)
                    report.ratio(f"{method}.{mode}.supervisord_cpu_per_call_vs_msbd",
                                 loads["supervisord"].cpu_per_call, loads["msbd"].cpu_per_call,
                                 target=">= 10" if method == "ping" else None)
