"""One user never costs another: per-user limits, what non-admins may learn, the kernel's
word on who a caller is, console logs that never outlive their sandbox.

Real daemons, real uids (forked clients that drop to them), the libkrun test double.
Needs root.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import sqlite3
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from daemonproc import DaemonProc, read_line
from tenants import ROOT, A, AsUser, B, User, names, ok, refused, sleeper

from msbd.errors import RpcCode
from msbd.rpc.client import Client

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to create and become uids")

PING = b'{"jsonrpc":"2.0","id":1,"method":"daemon.ping"}\n'


def tenant_daemon(make_daemon: Callable[..., DaemonProc], fakekrun: Path,
                  **settings: Any) -> DaemonProc:
    return make_daemon(libkrun=fakekrun, settings={"heartbeat_interval": 0.2,
                                                   "socket_mode": 0o666, **settings})


def limit_of(err: dict[str, Any]) -> str:
    assert err["code"] == RpcCode.LIMIT_REACHED, err
    return str(err["data"]["limit"])


# --- connections ---------------------------------------------------------------------


def test_one_users_connections_never_cost_another(
        make_daemon: Callable[..., DaemonProc], fakekrun: Path, open_dir: Path) -> None:
    d = tenant_daemon(make_daemon, fakekrun, max_connections_per_user=3, max_connections=8)
    go_r, go_w = os.pipe()

    def hog(ready: Callable[[], None]) -> list[bytes]:
        held = []
        for _ in range(3):
            s = socket.socket(socket.AF_UNIX)
            s.settimeout(30)
            s.connect(str(d.socket))
            s.sendall(PING)
            assert b'"pong"' in read_line(s)
            held.append(s)
        extra = socket.socket(socket.AF_UNIX)
        extra.settimeout(30)
        extra.connect(str(d.socket))
        refused_line = read_line(extra)
        after = read_line(extra)  # then closed
        ready()
        os.read(go_r, 1)  # hold them until the parent has seen the others served
        return [refused_line, after]

    b = AsUser(B, hog)
    b.wait_ready()
    # B holds its 3 and was refused a 4th; A and root are served meanwhile.
    assert ok(d.socket, A, "daemon.ping") == "pong"
    assert ok(d.socket, ROOT, "daemon.ping") == "pong"
    os.write(go_w, b"g")
    kind, (line, after) = b.result()
    os.close(go_r)
    os.close(go_w)
    assert kind == "ok"
    assert after == b""
    assert line == (b'{"jsonrpc":"2.0","error":{"code":-32004,"message":"too many connections'
                    b' from this user (at most 3)","data":{"limit":"max_connections_per_user",'
                    b'"max":3}},"id":null}\n')
    # B's connections are gone with its process: B is served again.
    assert ok(d.socket, B, "daemon.ping") == "pong"


def test_subscriptions_per_connection(make_daemon: Callable[..., DaemonProc], fakekrun: Path,
                                      open_dir: Path) -> None:
    d = tenant_daemon(make_daemon, fakekrun, max_subscriptions_per_connection=2)

    def subscribe_thrice(ready: Callable[[], None]) -> list[Any]:
        got: list[Any] = []
        with Client(d.socket, timeout=30) as c:
            for _ in range(3):
                try:
                    got.append(c.call("events.subscribe"))
                except Exception as exc:
                    got.append(getattr(exc, "remote_data", str(exc)))
        with Client(d.socket, timeout=30) as c:  # another connection starts afresh
            got.append(c.call("events.subscribe"))
        return got

    kind, got = AsUser(B, subscribe_thrice).result()
    assert kind == "ok", got
    assert [type(g) for g in got] == [dict, dict, dict, dict]
    assert "seq" in got[0] and "seq" in got[1] and "seq" in got[3]
    assert got[2] == {"limit": "max_subscriptions_per_connection"}


# --- sandboxes ------------------------------------------------------------------------


def test_per_user_sandbox_limits(make_daemon: Callable[..., DaemonProc], fakekrun: Path,
                                 make_root: Callable[..., Path]) -> None:
    d = tenant_daemon(make_daemon, fakekrun, max_sandboxes_per_user=3,
                      max_live_sandboxes_per_user=2, max_memory_mib_per_user=80)
    sock = d.socket
    a_root, b_root = make_root("a-root", A), make_root("b-root", B)
    for name, mib in (("b1", 32), ("b2", 32), ("b3", 64)):
        ok(sock, B, "sandbox.create", sleeper(name, b_root, memory_mib=mib))
    err = refused(sock, B, "sandbox.create", sleeper("b4", b_root, memory_mib=32))
    assert limit_of(err) == "max_sandboxes_per_user"
    assert limit_of(refused(sock, B, "sandbox.run", sleeper("b5", b_root))) == \
        "max_sandboxes_per_user"
    assert names(ok(sock, B, "sandbox.list")) == {"b1", "b2", "b3"}  # nothing else recorded

    ok(sock, B, "sandbox.start", {"name": "b1"})
    ok(sock, B, "sandbox.start", {"name": "b2"})
    assert limit_of(refused(sock, B, "sandbox.start", {"name": "b3"})) == \
        "max_live_sandboxes_per_user"
    ok(sock, B, "sandbox.stop", {"name": "b2"})
    assert limit_of(refused(sock, B, "sandbox.start", {"name": "b3"})) == \
        "max_memory_mib_per_user"  # 32 running + 64 asked > 80

    # None of it costs A (or root) anything.
    ok(sock, A, "sandbox.run", sleeper("a0", a_root, memory_mib=32))
    ok(sock, A, "sandbox.run", sleeper("a1", a_root, memory_mib=32))
    ok(sock, A, "sandbox.create", sleeper("a2", a_root))
    for i in range(5):
        ok(sock, ROOT, "sandbox.create", sleeper(f"r{i}", a_root))
    assert ok(sock, B, "sandbox.get", {"name": "b3"})["state"] == "created"


def test_a_spec_over_the_size_limit_is_refused_and_nothing_recorded(
        make_daemon: Callable[..., DaemonProc], fakekrun: Path,
        make_root: Callable[..., Path]) -> None:
    d = tenant_daemon(make_daemon, fakekrun, max_spec_bytes=2048)
    root = make_root("b-root", B)
    for method in ("sandbox.create", "sandbox.run"):
        err = refused(d.socket, B, method, sleeper("big", root, env={"X": "y" * 3000}))
        assert err["code"] == RpcCode.INVALID_PARAMS
        assert err["data"] == {"field": "spec"}
        assert "max_spec_bytes" in err["message"]
    assert names(ok(d.socket, B, "sandbox.list")) == set()


def test_list_pages_and_leaves_specs_out(shared: DaemonProc,
                                         make_root: Callable[..., Path]) -> None:
    root = make_root("b-root", B)
    for i in range(5):
        ok(shared.socket, B, "sandbox.create", sleeper(f"s{i}", root, labels={"n": str(i)}))
    seen: list[str] = []
    params: dict[str, Any] = {"limit": 2}
    while True:
        page = ok(shared.socket, B, "sandbox.list", params)
        assert len(page["sandboxes"]) <= 2
        assert all(s["spec"] is None and s["labels"]["n"] == s["name"][1:]
                   for s in page["sandboxes"])
        seen += [s["name"] for s in page["sandboxes"]]
        if page["next"] is None:
            break
        params["cursor"] = page["next"]
    assert seen == [f"s{i}" for i in range(5)]
    for cursor in ("9" * 19, "-1", "", "1e3"):  # not a cursor the daemon gives: -32602
        err = refused(shared.socket, B, "sandbox.list", {"cursor": cursor})
        assert (err["code"], err["data"]) == (RpcCode.INVALID_PARAMS, {"field": "cursor"})
    assert ok(shared.socket, B, "sandbox.list", {"cursor": "9" * 18})["sandboxes"] == []
    full = ok(shared.socket, B, "sandbox.list", {"spec": True, "label": "n=3"})
    assert [s["spec"]["name"] for s in full["sandboxes"]] == ["s3"]


# --- what a non-admin may learn --------------------------------------------------------


def test_non_admins_learn_nothing_of_others_activity(shared: DaemonProc,
                                                     make_root: Callable[..., Path]) -> None:
    a_root, b_root = make_root("a-root", A), make_root("b-root", B)
    ok(shared.socket, B, "sandbox.create", sleeper("b-only", b_root))
    b_head = ok(shared.socket, B, "events.subscribe")["seq"]
    for i in range(3):  # A's activity moves the global head, not B's
        ok(shared.socket, A, "sandbox.create", sleeper(f"a{i}", a_root))
    assert ok(shared.socket, B, "events.subscribe")["seq"] == b_head
    assert ok(shared.socket, ROOT, "events.subscribe")["seq"] == b_head + 3
    b_info = ok(shared.socket, B, "daemon.info")
    assert b_info["timers"] is None and b_info["unreadable"] is None
    assert sum(b_info["counts"].values()) == 1
    root_info = ok(shared.socket, ROOT, "daemon.info")
    assert root_info["timers"] is not None and root_info["unreadable"] == {}


# --- who the caller is: the kernel's word ----------------------------------------------


def test_groups_are_the_kernels_not_the_user_databases(
        make_daemon: Callable[..., DaemonProc], fakekrun: Path, open_dir: Path,
        busybox_root: Path) -> None:
    """A uid with no passwd entry, in a group the user database knows nothing of: its
    real groups (SO_PEERGROUPS) open the path, and the VM runs with exactly those."""
    ghost = User("no-passwd-entry", 64150, 64151, (64152,))
    root = open_dir / "group-root"
    shutil.copytree(busybox_root, root, symlinks=True)
    os.chown(root, 0, 64152)
    os.chmod(root, 0o775)  # writable through group 64152 only
    d = tenant_daemon(make_daemon, fakekrun)
    spec = {"name": "g", "rootfs": str(root), "exec": "/bin/busybox", "args": ["id"],
            "memory_mib": 64}
    info = ok(d.socket, ghost, "sandbox.run", spec)
    assert info["owner_uid"] == 64150
    ok(d.socket, ghost, "sandbox.wait", {"name": "g", "timeout": 60})
    out = ok(d.socket, ghost, "sandbox.logs", {"name": "g"})["data"]
    match = re.search(r"uid=(\d+).*gid=(\d+)(?:.*groups=([\d,()a-z-]+))?", out)
    assert match, out
    assert match.group(1, 2) == ("64150", "64151"), out
    assert "64152" in (match.group(3) or ""), out


# --- console logs -----------------------------------------------------------------------


def test_console_logs_never_outlive_their_sandbox(
        make_daemon: Callable[..., DaemonProc], fakekrun: Path,
        make_root: Callable[..., Path]) -> None:
    d = tenant_daemon(make_daemon, fakekrun)
    a_root, b_root = make_root("a-root", A), make_root("b-root", B)
    secret_run = {"name": "x", "rootfs": str(a_root), "exec": "/bin/busybox",
                  "args": ["echo", "A-SECRET-OUTPUT"], "memory_mib": 64}
    ok(d.socket, A, "sandbox.run", secret_run)
    ok(d.socket, A, "sandbox.wait", {"name": "x", "timeout": 60})
    assert "A-SECRET-OUTPUT" in ok(d.socket, A, "sandbox.logs", {"name": "x"})["data"]
    logs = d.state_dir / "logs"
    planted = [logs / "999999.log", logs / "y.log", logs / "x.log.1"]
    d.stop()
    for path in planted:  # logs of no record: a crash mid-remove, an older layout
        path.write_bytes(b"A-SECRET-OUTPUT\n")
    # The database is replaced (a restore, a new file): ids start again from 1.
    for suffix in ("", "-wal", "-shm"):
        with contextlib.suppress(FileNotFoundError):
            (d.state_dir / f"msbd.db{suffix}").unlink()
    d.start()
    assert not any(p.exists() for p in planted)
    assert os.listdir(logs) == []
    quiet = {"name": "x", "rootfs": str(b_root), "exec": "/bin/busybox", "args": ["true"],
             "memory_mib": 64}
    ok(d.socket, B, "sandbox.create", quiet)
    assert ok(d.socket, B, "sandbox.logs", {"name": "x"})["data"] == ""
    ok(d.socket, B, "sandbox.start", {"name": "x"})
    ok(d.socket, B, "sandbox.wait", {"name": "x", "timeout": 60})
    assert "A-SECRET" not in ok(d.socket, B, "sandbox.logs", {"name": "x"})["data"]
    ok(d.socket, B, "sandbox.remove", {"name": "x"})
    assert os.listdir(logs) == []  # the log went with the record


# --- one unreadable record --------------------------------------------------------------


def test_one_unreadable_record_fails_only_calls_about_it(
        make_daemon: Callable[..., DaemonProc], fakekrun: Path,
        make_root: Callable[..., Path]) -> None:
    d = tenant_daemon(make_daemon, fakekrun)
    root = make_root("b-root", B)
    for name in ("good", "bad"):
        ok(d.socket, B, "sandbox.create", sleeper(name, root))
    d.stop()
    with sqlite3.connect(d.state_dir / "msbd.db") as db:
        db.execute("UPDATE sandboxes SET spec = x'7b6e6f' WHERE name = 'bad'")
    d.start()
    assert names(ok(d.socket, B, "sandbox.list", {"spec": True})) == {"good"}
    assert sum(ok(d.socket, B, "daemon.info")["counts"].values()) == 2
    assert set(ok(d.socket, ROOT, "daemon.info")["unreadable"]) == {"bad"}
    err = refused(d.socket, B, "sandbox.get", {"name": "bad"})
    assert err["code"] == RpcCode.INTERNAL_ERROR and "unreadable" in err["message"]
    assert ok(d.socket, B, "sandbox.remove", {"name": "bad"})["name"] == "bad"
    assert ok(d.socket, ROOT, "daemon.info")["unreadable"] == {}
    assert stat.S_ISSOCK(d.socket.stat().st_mode)


def test_numbers_past_what_sqlite_stores_are_refused(shared: DaemonProc) -> None:
    """A `since` past SQLite's integers would have failed inside the subscription's
    stream, after its reply: the subscriber would wait for events that never come."""
    for method, params in (("events.subscribe", {"since": 2**63}),
                           ("sandbox.logs", {"name": "x", "offset": 2**63})):
        err = refused(shared.socket, ROOT, method, params)
        assert err["code"] == RpcCode.INVALID_PARAMS, err
    assert "seq" in ok(shared.socket, ROOT, "events.subscribe", {"since": 2**63 - 1})
