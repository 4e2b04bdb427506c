"""The daemon as a user meets it: a real process, a real socket, a real SQLite file."""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from daemonproc import DaemonProc, raw_exchange

from msbd.errors import RemoteError


def spec(name: str, rootfs: Path, **extra: Any) -> dict[str, Any]:
    return {"name": name, "rootfs": str(rootfs), "exec": "/bin/sh", "args": ["-c", "true"]} \
        | extra


def rpc(daemon: DaemonProc, method: str, params: Any = None) -> Any:
    return daemon.call(method, params)


def rpc_error(daemon: DaemonProc, method: str, params: Any = None) -> RemoteError:
    with pytest.raises(RemoteError) as info:
        daemon.call(method, params)
    return info.value


def test_ping_and_info(daemon: DaemonProc) -> None:
    assert rpc(daemon, "daemon.ping") == "pong"
    info = rpc(daemon, "daemon.info")
    assert info["pid"] == daemon.proc.pid  # type: ignore[union-attr]
    assert info["socket"] == str(daemon.socket)
    assert set(info["counts"]) == {"created", "starting", "running", "paused", "stopping",
                                   "stopped", "failed"}
    assert info["limits"]["max_sandboxes"] == 1000
    checks = {c["name"]: c for c in info["checks"]}
    assert set(checks) == {"virtualization", "kvm_device", "kvm_module", "libkrun", "libkrunfw"}
    assert info["libkrun"] is None
    assert not checks["libkrun"]["ok"] and checks["libkrun"]["hint"]


def test_socket_is_0660(daemon: DaemonProc) -> None:
    mode = stat.S_IMODE(daemon.socket.stat().st_mode)
    assert mode == 0o660


def test_create_get_list_remove(daemon: DaemonProc, tmp_path: Path) -> None:
    info = rpc(daemon, "sandbox.create", spec("a1", tmp_path, labels={"team": "x"}))
    assert info["name"] == "a1"
    assert info["state"] == "created"
    assert info["owner_uid"] == os.getuid()
    assert info["run"] is None
    assert info["labels"] == {"team": "x"}
    assert info["spec"]["rootfs"] == str(tmp_path)
    rpc(daemon, "sandbox.create", spec("b2", tmp_path, labels={"team": "y"}))
    assert rpc(daemon, "sandbox.get", {"name": "a1"}) == info
    names = [s["name"] for s in rpc(daemon, "sandbox.list")["sandboxes"]]
    assert names == ["a1", "b2"]
    by_label = rpc(daemon, "sandbox.list", {"label": "team=y"})["sandboxes"]
    assert [s["name"] for s in by_label] == ["b2"]
    assert rpc(daemon, "sandbox.list", {"state": "running"})["sandboxes"] == []
    removed = rpc(daemon, "sandbox.remove", {"name": "a1"})
    assert removed["name"] == "a1"
    assert [s["name"] for s in rpc(daemon, "sandbox.list")["sandboxes"]] == ["b2"]


def test_duplicate_name_is_conflict_and_first_is_untouched(daemon: DaemonProc,
                                                           tmp_path: Path) -> None:
    first = rpc(daemon, "sandbox.create", spec("dup", tmp_path, vcpus=2))
    err = rpc_error(daemon, "sandbox.create", spec("dup", tmp_path, vcpus=4))
    assert err.rpc_code == -32002
    assert err.remote_data == {"sandbox": "dup"}
    assert rpc(daemon, "sandbox.get", {"name": "dup"}) == first


def test_unknown_names_are_not_found(daemon: DaemonProc) -> None:
    for method in ("sandbox.remove", "sandbox.get", "sandbox.stop", "sandbox.wait",
                   "sandbox.logs", "sandbox.touch"):
        err = rpc_error(daemon, method, {"name": "ghost"})
        assert err.rpc_code == -32001, method
        assert err.remote_data == {"sandbox": "ghost"}


def test_records_survive_a_restart(daemon: DaemonProc, tmp_path: Path) -> None:
    created = rpc(daemon, "sandbox.create", spec("keep", tmp_path, env={"A": "1"}))
    assert daemon.stop() == 0
    daemon.start()
    assert rpc(daemon, "sandbox.get", {"name": "keep"}) == created


@pytest.mark.parametrize(("change", "field"), [
    ({"name": ""}, "name"),
    ({"name": "-lead"}, "name"),
    ({"name": "a b"}, "name"),
    ({"name": "x" * 129}, "name"),
    ({"vcpus": 0}, "vcpus"),
    ({"vcpus": 256}, "vcpus"),
    ({"vcpus": "2"}, "vcpus"),
    ({"memory_mib": 8}, "memory_mib"),
    ({"rootfs": "relative/dir"}, "rootfs"),
    ({"rootfs": "/does/not/exist"}, "rootfs"),
    ({"rootfs": None}, "rootfs"),
    ({"env": {"1BAD": "x"}}, "env"),
    ({"env": {"A": 1}}, "env"),
    ({"mounts": [{"tag": "", "host": "/"}]}, "mounts[0].tag"),
    ({"mounts": [{"tag": "t", "host": "/", "extra": 1}]}, "mounts[0].extra"),
    ({"disks": [{"id": "d", "host": "/x", "format": "qcow3"}]}, "disks[0].format"),
    ({"rootfs": "/proc/1/root"}, "rootfs"),  # /proc leads into other processes
    ({"disks": [{"id": "d", "host": "/proc/self/fd/0", "format": "raw"}]}, "disks[0].host"),
    ({"idle_timeout": -1}, "idle_timeout"),
    ({"surprise": True}, "surprise"),
    ({"args": ["ok", "nul\u0000byte"]}, "args[1]"),
    # What the guest kernel's command line cannot carry (msbd.cmdline).
    ({"args": ["ok", 'a "quoted" word']}, "args[1]"),
    ({"args": ["tab\there"]}, "args[0]"),
    ({"env": {"A": "caf\u00e9"}}, "env.A"),
    ({"env": {"MSBD_CONTROL_PORT": "1"}}, "env.MSBD_CONTROL_PORT"),
    ({"exec": "/bin/my prog"}, "exec"),
])
def test_spec_validation_names_the_field(daemon: DaemonProc, tmp_path: Path,
                                         change: dict[str, Any], field: str) -> None:
    params = spec("v", tmp_path) | change
    params = {k: v for k, v in params.items() if v is not None}
    err = rpc_error(daemon, "sandbox.create", params)
    assert err.rpc_code == -32602
    assert err.remote_data == {"field": field}, err.message
    assert field.split("[", maxsplit=1)[0].split(".", maxsplit=1)[0] in err.message
    assert rpc(daemon, "sandbox.list")["sandboxes"] == []


def test_disk_path_must_be_a_file(daemon: DaemonProc, tmp_path: Path) -> None:
    err = rpc_error(daemon, "sandbox.create", spec(
        "d", tmp_path, disks=[{"id": "data", "host": str(tmp_path), "format": "raw"}]))
    assert err.rpc_code == -32602
    assert err.remote_data == {"field": "disks[0].host"}


def test_raw_client_gets_spec_errors(daemon: DaemonProc) -> None:
    reply = json.loads(raw_exchange(daemon.socket, b'{"jsonrpc": "2.0", "method": "foobar", '
                                                   b'"id": "1"}\n'))
    assert reply["error"]["code"] == -32601
    assert reply["id"] == "1"
    reply = json.loads(raw_exchange(daemon.socket, b'{"jsonrpc": "2.0", "method": "foobar, '
                                                   b'"params": "bar", "baz]\n'))
    assert reply == {"jsonrpc": "2.0", "error": reply["error"], "id": None}
    assert reply["error"]["code"] == -32700
    # A batch of notifications gets no reply at all: the next line is the ping's.
    reply = json.loads(raw_exchange(
        daemon.socket, b'[{"jsonrpc":"2.0","method":"daemon.ping"},'
                       b'{"jsonrpc":"2.0","method":"sandbox.list"}]\n'
                       b'{"jsonrpc":"2.0","method":"daemon.ping","id":9}\n'))
    assert reply == {"jsonrpc": "2.0", "result": "pong", "id": 9}


def test_openrpc_document_lists_every_method(daemon: DaemonProc) -> None:
    doc = rpc(daemon, "rpc.discover")
    names = {m["name"] for m in doc["methods"]}
    assert "sandbox.create" in names and "rpc.discover" in names and len(names) == 19


def test_live_socket_is_never_stolen(daemon: DaemonProc) -> None:
    second = subprocess.run(
        [sys.executable, "-m", "msbd.cli", "serve", "--socket", str(daemon.socket),
         "--state-dir", str(daemon.base / "other-state")],
        capture_output=True, text=True, timeout=60)
    assert second.returncode == 1
    assert f"another msbd (pid {daemon.proc.pid}) is serving" in second.stderr  # type: ignore
    assert rpc(daemon, "daemon.ping") == "pong"


def test_state_dir_is_never_shared(daemon: DaemonProc) -> None:
    second = subprocess.run(
        [sys.executable, "-m", "msbd.cli", "serve", "--socket", str(daemon.base / "o.sock"),
         "--state-dir", str(daemon.state_dir)], capture_output=True, text=True, timeout=60)
    assert second.returncode == 1
    assert "is using the state directory" in second.stderr
    assert rpc(daemon, "daemon.ping") == "pong"


def test_stale_socket_is_replaced(daemon: DaemonProc) -> None:
    daemon.stop(sig=signal.SIGKILL)
    assert daemon.socket.exists()  # a SIGKILLed daemon leaves its socket file behind
    daemon.start()
    assert rpc(daemon, "daemon.ping") == "pong"


def test_sigterm_exits_zero_and_removes_the_socket(daemon: DaemonProc) -> None:
    assert daemon.stop() == 0
    assert not daemon.socket.exists()


def test_sigint_exits_zero(daemon: DaemonProc) -> None:
    assert daemon.stop(sig=signal.SIGINT) == 0


def test_in_flight_call_finishes_on_shutdown(daemon: DaemonProc, tmp_path: Path) -> None:
    """A call in progress when SIGTERM arrives still gets its reply."""
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(str(daemon.socket))
        s.sendall(b'{"jsonrpc":"2.0","id":7,"method":"sandbox.wait",'
                  b'"params":{"name":"nothing-here"}}\n')
        reply = json.loads(s.makefile("rb").readline())
    assert reply["id"] == 7
    assert daemon.stop() == 0


@pytest.mark.parametrize(("config", "message"), [
    ("bogus = 1\n", "unknown setting `bogus`"),
    ("max_batch = 0\n", "`max_batch`"),
    ("max_sandboxes = \"many\"\n", "`max_sandboxes`"),
])
def test_bad_config_is_a_clear_startup_error(tmp_path: Path, config: str, message: str) -> None:
    path = tmp_path / "msbd.toml"
    path.write_text(config)
    done = subprocess.run(
        [sys.executable, "-m", "msbd.cli", "serve", "--config", str(path),
         "--socket", str(tmp_path / "s.sock"), "--state-dir", str(tmp_path / "st")],
        capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert message in done.stderr
    assert str(path) in done.stderr


def test_unknown_environment_setting_is_an_error(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "msbd.cli", "serve", "--socket", str(tmp_path / "s.sock"),
         "--state-dir", str(tmp_path / "st")],
        capture_output=True, text=True, timeout=60,
        env={**os.environ, "MSBD_MAX_SANDBOXEZ": "3"})
    assert done.returncode == 2
    assert "MSBD_MAX_SANDBOXEZ" in done.stderr


def test_launch_without_libkrun_is_refused_clearly(daemon: DaemonProc, tmp_path: Path) -> None:
    err = rpc_error(daemon, "sandbox.run", spec("nolib", tmp_path))
    assert err.rpc_code == -32005
    assert "libkrun" in err.message
    assert err.remote_data == {"missing": "libkrun"}
    assert rpc(daemon, "sandbox.list")["sandboxes"] == []


def test_events_log_is_pruned_to_its_cap(make_daemon: Any, tmp_path: Path) -> None:
    d = make_daemon(settings={"events_keep": 5})
    for i in range(8):
        rpc(d, "sandbox.create", spec(f"e{i}", tmp_path))
    d.restart()  # pruning runs at startup (then hourly)
    with d.client() as c:
        head = c.call("events.subscribe", {"since": 0})["seq"]
        seqs = []
        for _, params in c.iter_notifications(timeout=30):
            seqs.append(params["event"]["seq"])
            if seqs[-1] >= head:
                break
    assert seqs == [4, 5, 6, 7, 8]


def test_state_dir_is_made_private(make_daemon: Any) -> None:
    d = make_daemon(start=False)
    d.state_dir.mkdir(mode=0o755)
    d.state_dir.chmod(0o755)
    d.start()
    assert stat.S_IMODE(d.state_dir.stat().st_mode) == 0o700


def test_a_full_batch_then_another_call_on_the_same_connection(daemon: DaemonProc) -> None:
    """A batch above the per-connection in-flight limit (64) pauses reading; reading
    must resume once it is done, or the next call on that connection hangs."""
    batch = [{"jsonrpc": "2.0", "id": i, "method": "daemon.ping"} for i in range(100)]
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(30)
        s.connect(str(daemon.socket))
        lines = s.makefile("rb")
        s.sendall(json.dumps(batch).encode() + b"\n")
        replies = json.loads(lines.readline())
        assert sorted(r["id"] for r in replies) == list(range(100))
        s.sendall(b'{"jsonrpc":"2.0","id":"after","method":"daemon.ping"}\n')
        assert json.loads(lines.readline()) == {"jsonrpc": "2.0", "result": "pong",
                                                "id": "after"}
