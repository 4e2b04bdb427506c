"""The worker's network calls and its port relay, against the libkrun test double.

What libkrun makes of the calls (TSI, its port map) is tested with real
guests in test_vm_real.py. Here: the exact calls for each mode, and the part
msbd builds itself, which the test double runs for real: a published port
without network access is a private network namespace plus the worker's
relay, so the double's workload (a host process that inherits the worker's
namespace) plays the guest's server.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from tenants import A
from workerproc import Worker, Workers

NETWORK_CALLS = ("krun_disable_implicit_vsock", "krun_add_vsock", "krun_set_port_map",
                 "krun_set_rlimits")


def network_calls(w: Worker) -> list[dict[str, Any]]:
    return [{k: v for k, v in c.items() if k not in ("ctx", "ret")}
            for c in w.calls() if c["fn"] in NETWORK_CALLS]


@pytest.fixture
def host_listener() -> Iterator[socket.socket]:
    """A TCP listener on the host's loopback, which no sandbox without egress may reach."""
    with socket.create_server(("127.0.0.1", 0)) as s:
        s.settimeout(0)
        yield s


def accepted(listener: socket.socket) -> bool:
    try:
        conn, _ = listener.accept()
    except BlockingIOError:
        return False
    conn.close()
    return True


@pytest.mark.parametrize(("fields", "expected"), [
    ({}, [{"fn": "krun_disable_implicit_vsock"},
          {"fn": "krun_add_vsock", "tsi_features": 0},
          {"fn": "krun_set_port_map", "port_map": []}]),
    ({"network": "none"}, [{"fn": "krun_disable_implicit_vsock"},
                           {"fn": "krun_add_vsock", "tsi_features": 0},
                           {"fn": "krun_set_port_map", "port_map": []}]),
    ({"network": "egress"}, [{"fn": "krun_disable_implicit_vsock"},
                             {"fn": "krun_add_vsock", "tsi_features": 1},
                             {"fn": "krun_set_port_map", "port_map": []}]),
    ({"network": "egress", "ports": [{"host": 18080, "guest": 80}, {"host": 18443, "guest": 443}],
      "rlimits": {"nproc": 64, "nofile": 1024}},
     [{"fn": "krun_disable_implicit_vsock"},
      {"fn": "krun_add_vsock", "tsi_features": 1},
      {"fn": "krun_set_port_map", "port_map": ["18080:80", "18443:443"]},
      {"fn": "krun_set_rlimits", "rlimits": ["7=1024:1024", "6=64:64"]}]),
    # Published ports without egress: inet TSI inside the VMM's own namespace, where each
    # guest port keeps its number (the relay's target).
    ({"network": "none", "ports": [{"host": "<free>", "guest": 8080}]},
     [{"fn": "krun_disable_implicit_vsock"},
      {"fn": "krun_add_vsock", "tsi_features": 1},
      {"fn": "krun_set_port_map", "port_map": ["8080:8080"]}]),
], ids=["default", "none", "egress", "egress-ports-rlimits", "none-ports"])
def test_each_mode_makes_exactly_these_calls(
        workers: Workers, make_spec: Callable[..., bytes], log: Path,
        fields: dict[str, Any], expected: list[dict[str, Any]],
        free_tcp_port_factory: Callable[[], int]) -> None:
    for port in fields.get("ports", []):
        if port["host"] == "<free>":
            port["host"] = free_tcp_port_factory()
    w = workers.start(make_spec(**fields), log=log)
    assert w.wait() == 0, w.output()
    assert network_calls(w) == expected
    fns = [c["fn"] for c in w.calls()]
    # Before the control channel's vsock port, which needs the explicit device.
    assert fns.index("krun_set_port_map") < fns.index("krun_add_vsock_port2")
    # Never TSI for Unix sockets (bit 2): no guest reaches a host Unix socket.
    assert not any(c["tsi_features"] & 2 for c in w.calls() if c["fn"] == "krun_add_vsock")


def listening_in(pid: int, port: int) -> bool:
    """Whether a TCP socket listens on `port` in `pid`'s network namespace (its
    /proc/PID/net/tcp and tcp6: state 0A is LISTEN)."""
    lines: list[str] = []
    for table in ("tcp", "tcp6"):
        try:
            lines += Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]
        except OSError:
            continue
    return any(f.split()[1].endswith(f":{port:04X}") and f.split()[3] == "0A" for f in lines)


def wait_listening(pid: int, port: int, timeout: float = 30.0) -> None:
    """Until `port` listens in `pid`'s namespace. A listen sends no notice to wait on, so
    this polls the kernel's table."""
    deadline = time.monotonic() + timeout
    while not listening_in(pid, port):
        assert time.monotonic() < deadline, f"nothing listened on {port} in {pid}'s namespace"
        time.sleep(0.02)  # a fact in another namespace, polled; noqa: sleep-ok


def echo_through(port: int) -> bytes:
    """What a client of 127.0.0.1:`port` gets back for one line."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as c:
        c.sendall(b"ping\n")
        c.shutdown(socket.SHUT_WR)
        return c.recv(100)


def test_a_published_port_without_network_reaches_the_server_and_nothing_else(
        workers: Workers, make_spec: Callable[..., bytes], log: Path,
        host_listener: socket.socket, free_tcp_port_factory: Callable[[], int]) -> None:
    host_port = free_tcp_port_factory()
    reach = host_listener.getsockname()[1]
    # The double's workload is a host process in the worker's namespace: it first tries
    # the host's loopback listener, then serves one echo on the published guest port.
    script = (f"nc -w 2 127.0.0.1 {reach} </dev/null; echo probe:$?; "
              f"nc -l -p 8080 -e cat; echo served")
    w = workers.start(make_spec(network="none", ports=[{"host": host_port, "guest": 8080}],
                                exec="/bin/sh", args=["-c", script]), log=log)
    assert w.status_line() == "entering"
    wait_listening(w.pid, 8080)  # in the worker's own namespace, where the workload is
    assert echo_through(host_port) == b"ping\n"
    assert w.wait() == 0
    out = w.output().splitlines()
    assert out[0] != "probe:0" and out[-1] == "served", out
    assert not accepted(host_listener)


def test_a_published_port_someone_holds_fails_the_launch_naming_it(
        workers: Workers, make_spec: Callable[..., bytes], log: Path,
        host_listener: socket.socket) -> None:
    taken = host_listener.getsockname()[1]
    w = workers.start(make_spec(network="none", ports=[{"host": taken, "guest": 80}]), log=log)
    assert w.wait() == 4
    message = f"cannot publish 127.0.0.1 port {taken}: Address already in use"
    assert w.output() == f"msbd-worker: {message}\n"
    assert w.status_lines() == [f"error {message}"]
    assert not log.exists() or "krun_start_enter" not in log.read_text()


def test_a_port_below_1024_is_bound_with_the_owners_rights(
        workers: Workers, make_spec: Callable[..., bytes], log: Path, users: None) -> None:
    w = workers.start(make_spec(network="none", ports=[{"host": 1, "guest": 80}],
                                uid=A.uid, gid=A.gid), log=log)
    assert w.wait() == 4
    assert w.output() == "msbd-worker: cannot publish 127.0.0.1 port 1: Permission denied\n"
