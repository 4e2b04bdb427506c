"""The daemon's side of `network`, `ports` and `rlimits`: what it records, who may ask for
what, and bad input refused with the field named and nothing recorded.

Real daemons, real uids (forked clients), the libkrun test double. Needs root.
"""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from daemonproc import DaemonProc
from tenants import ROOT, A, B, ok, refused, sleeper

from msbd.config import load_settings
from msbd.errors import ConfigError, RemoteError, RpcCode

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to create and become uids")


@pytest.fixture
def netd(make_daemon: Callable[..., DaemonProc], fakekrun: Path, open_dir: Path) -> DaemonProc:
    return make_daemon(libkrun=fakekrun, settings={"heartbeat_interval": 0.2,
                                                   "socket_mode": 0o666})


def nothing_recorded(d: DaemonProc) -> None:
    """No record, and no event either (a refused create or run writes nothing)."""
    assert d.call("sandbox.list", {})["sandboxes"] == []
    assert d.call("daemon.info")["counts"] == dict.fromkeys(
        ("created", "starting", "running", "paused", "stopping", "stopped", "failed"), 0)
    with d.client() as c:
        assert c.call("events.subscribe", {"since": 0})["seq"] == 0


@pytest.mark.parametrize(("extra", "field", "words"), [
    ({"network": "bridge"}, "network", "Invalid enum value 'bridge'"),
    ({"ports": [{"host": 0, "guest": 80}]}, "ports[0].host", ">= 1"),
    ({"ports": [{"host": 8080, "guest": 70000}]}, "ports[0].guest", "<= 65535"),
    ({"ports": [{"host": 8080, "guest": 80}, {"host": 8080, "guest": 81}]},
     "ports[1].host", "host port 8080 is published twice"),
    ({"ports": [{"host": 8080, "guest": 80}, {"host": 8081, "guest": 80}]},
     "ports[1].guest", "guest port 80 is published twice"),
    ({"ports": [{"host": 8080, "guest": 80, "address": "localhost"}]},
     "ports[0].address", "not an IPv4 or IPv6 address"),
    ({"ports": [{"host": 8080, "guest": 80, "proto": "udp"}]}, "ports[0]", "unknown field"),
    ({"network": "egress", "ports": [{"host": 8080, "guest": 80, "address": "127.0.0.1"}]},
     "ports[0].address", "only for network 'none'"),
    ({"rlimits": {"files": 10}}, "rlimits", "Invalid enum value 'files'"),
    ({"rlimits": {"nofile": -1}}, "rlimits", ">= 0"),
])
@pytest.mark.parametrize("method", ["sandbox.create", "sandbox.run"])
def test_bad_network_input_names_the_field_and_records_nothing(
        netd: DaemonProc, make_root: Callable[..., Path], method: str, extra: dict[str, Any],
        field: str, words: str) -> None:
    root = make_root("r", ROOT)
    err = refused(netd.socket, A, method, sleeper("x", root) | extra)
    assert err["code"] == RpcCode.INVALID_PARAMS, err
    assert words in err["message"], err
    assert err["data"]["field"].startswith(field), err
    nothing_recorded(netd)


def test_the_default_network_is_written_into_the_record(
        netd: DaemonProc, make_root: Callable[..., Path]) -> None:
    root = make_root("r", A)
    made = ok(netd.socket, A, "sandbox.create", sleeper("plain", root))
    assert (made["network"], made["ports"]) == ("none", [])
    assert made["spec"]["network"] == "none"
    # List entries carry both without the spec.
    [entry] = ok(netd.socket, A, "sandbox.list", {})["sandboxes"]
    assert (entry["spec"], entry["network"], entry["ports"]) == (None, "none", [])


def test_egress_is_for_admins_unless_a_setting_opens_it(
        make_daemon: Callable[..., DaemonProc], fakekrun: Path, open_dir: Path,
        make_root: Callable[..., Path]) -> None:
    root = make_root("r", A)
    d = make_daemon(libkrun=fakekrun, settings={"socket_mode": 0o666})
    err = refused(d.socket, A, "sandbox.create", sleeper("out", root, network="egress"))
    assert err["code"] == RpcCode.PERMISSION_DENIED and err["data"] == {"field": "network"}
    assert "loopback" in err["message"]
    nothing_recorded(d)
    made = ok(d.socket, ROOT, "sandbox.create", sleeper("root-out", root, network="egress"))
    assert made["network"] == "egress"
    assert (ok(d.socket, A, "daemon.info")["egress_allowed"],
            ok(d.socket, ROOT, "daemon.info")["egress_allowed"]) == (False, True)

    opened = make_daemon(libkrun=fakekrun, name="opened",
                         settings={"socket_mode": 0o666, "egress": "everyone",
                                   "default_network": "egress"})
    made = ok(opened.socket, A, "sandbox.create", sleeper("out", root))
    assert made["network"] == "egress"
    shown = ok(opened.socket, A, "daemon.info")
    assert (shown["default_network"], shown["egress_allowed"]) == ("egress", True)


def test_closing_egress_again_holds_at_the_next_start(
        make_daemon: Callable[..., DaemonProc], fakekrun: Path, open_dir: Path,
        make_root: Callable[..., Path]) -> None:
    root = make_root("r", A)
    d = make_daemon(libkrun=fakekrun, settings={"socket_mode": 0o666, "egress": "everyone"},
                    start=False)
    d.start()
    ok(d.socket, A, "sandbox.create", sleeper("out", root, network="egress"))
    d.stop()
    d.settings.pop("egress")
    d.start()
    err = refused(d.socket, A, "sandbox.start", {"name": "out"})
    assert err["code"] == RpcCode.PERMISSION_DENIED and err["data"] == {"field": "network"}
    assert d.call("sandbox.get", {"name": "out"})["state"] == "created"


def test_a_host_port_below_1024_is_roots_only(
        netd: DaemonProc, make_root: Callable[..., Path]) -> None:
    root = make_root("r", A)
    err = refused(netd.socket, A, "sandbox.create",
                  sleeper("web", root, ports=[{"host": 8080, "guest": 80},
                                              {"host": 80, "guest": 81}]))
    assert err["code"] == RpcCode.PERMISSION_DENIED
    assert err["data"] == {"field": "ports[1].host"}
    assert "below 1024" in err["message"]
    nothing_recorded(netd)


def test_a_port_published_by_a_running_sandbox_is_refused_naming_it(
        netd: DaemonProc, make_root: Callable[..., Path],
        free_tcp_port_factory: Callable[[], int]) -> None:
    root = make_root("r", A)
    port = free_tcp_port_factory()
    first = ok(netd.socket, A, "sandbox.run", sleeper("first", root, ports=[
        {"host": port, "guest": 80}]))
    assert first["state"] == "running" and first["ports"] == [
        {"host": port, "guest": 80, "address": None}]
    # The worker holds it on the host (the test double's workload has no server; the
    # relay's listener is msbd's own).
    with pytest.raises(OSError), socket.create_server(("127.0.0.1", port)):
        pass

    again = sleeper("second", root, ports=[{"host": free_tcp_port_factory(), "guest": 81},
                                           {"host": port, "guest": 82}])
    err = refused(netd.socket, A, "sandbox.run", again)
    assert err["code"] == RpcCode.CONFLICT, err
    assert err["message"] == f"host port {port} is published by sandbox 'first', which is running"
    assert err["data"] == {"sandbox": "second", "port": port, "field": "ports"}
    # Another user learns only that it is taken.
    err = refused(netd.socket, B, "sandbox.run", sleeper("b", root, ports=[
        {"host": port, "guest": 80}]))
    assert err["message"] == (f"host port {port} is published by a sandbox of another user, "
                              "which is running")
    assert [s["name"] for s in netd.call("sandbox.list", {})["sandboxes"]] == ["first"]

    # Created meanwhile, it starts once the port is free again.
    ok(netd.socket, A, "sandbox.create", again)
    assert refused(netd.socket, A, "sandbox.start", {"name": "second"})["code"] == \
        RpcCode.CONFLICT
    ok(netd.socket, A, "sandbox.stop", {"name": "first"})
    assert ok(netd.socket, A, "sandbox.start", {"name": "second"})["state"] == "running"


def test_default_egress_needs_egress_for_everyone() -> None:
    with pytest.raises(ConfigError, match="default_network"):
        load_settings(environ={"MSBD_DEFAULT_NETWORK": "egress"})
    assert load_settings(environ={"MSBD_DEFAULT_NETWORK": "egress",
                                  "MSBD_EGRESS": "everyone"}).default_network == "egress"


def test_discover_documents_the_network_fields_and_the_egress_caveat(daemon: DaemonProc) -> None:
    doc = daemon.call("rpc.discover")
    spec = doc["components"]["schemas"]["LaunchSpec"]["properties"]
    assert "loopback" in spec["network"]["description"]
    assert "Unix socket" in spec["network"]["description"]
    assert "127.0.0.1" in spec["ports"]["description"]
    assert "nofile" in spec["rlimits"]["description"]


def test_two_runs_racing_for_one_port_start_one_and_record_one(
        netd: DaemonProc, make_root: Callable[..., Path],
        free_tcp_port_factory: Callable[[], int]) -> None:
    root = make_root("r", ROOT)
    port = free_tcp_port_factory()
    results: dict[str, Any] = {}

    def launch(name: str) -> None:
        with netd.client() as c:
            try:
                results[name] = c.call("sandbox.run", sleeper(name, root, ports=[
                    {"host": port, "guest": 80}]))
            except RemoteError as exc:
                results[name] = exc.remote_code

    threads = [threading.Thread(target=launch, args=(f"race{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    won = [n for n, r in results.items() if isinstance(r, dict)]
    assert len(won) == 1, results
    assert sorted(r for r in results.values() if not isinstance(r, dict)) == \
        [RpcCode.CONFLICT] * 3
    assert [s["name"] for s in netd.call("sandbox.list", {})["sandboxes"]] == won


def test_a_run_stopped_while_starting_keeps_its_record(
        make_daemon: Callable[..., DaemonProc], fakekrun: Path, tmp_path: Path,
        make_root: Callable[..., Path], gated_python: Path) -> None:
    """`sandbox.run` forgets a sandbox only when it could not start at all (no room, a
    host port taken); one stopped while starting is a record with a run, and stays."""
    d = make_daemon(libkrun=fakekrun, settings={"worker_pool": 0,
                                                "worker_python": str(gated_python)})
    root = make_root("r", ROOT)
    outcome: dict[str, Any] = {}

    def run() -> None:
        with d.client() as c:
            try:
                outcome["run"] = c.call("sandbox.run", sleeper("held", root))
            except RemoteError as exc:
                outcome["run"] = (exc.remote_code, exc.message)

    with d.client() as watch:
        watch.call("events.subscribe", {})
        launcher = threading.Thread(target=run)
        launcher.start()
        states = (p["event"]["state"] for _, p in watch.iter_notifications(timeout=60))
        assert next(s for s in states if s == "starting") == "starting"
    d.call("sandbox.stop", {"name": "held", "timeout": 1})
    launcher.join()
    assert outcome["run"] == (RpcCode.CONFLICT, "sandbox 'held' was stopped while starting")
    kept = d.call("sandbox.get", {"name": "held"})
    assert (kept["state"], kept["run"]["reason"]) == ("stopped", "stop_requested")
