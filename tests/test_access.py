"""Who may do what, end to end: real uids (forked clients that drop to them), real daemons.

Clients of other uids are forked children of the test process that drop to
that uid (setgroups, setresgid, setresuid) and then use `msbd.rpc.client`;
they never exec, so the interpreter need not be reachable by those uids.
The host-path rules are emulated permission checks, so most of their cases
are plain tables with numeric uids; the end-to-end tests show the wiring.
Needs root (to create the test users and to drop to them).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import secrets
import signal
import socket
import stat
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import msgspec
import pytest
from daemonproc import DaemonProc, python_for
from tenants import (
    ROOT,
    SHARED_GID,
    SOCK_GID,
    A,
    AsUser,
    B,
    C,
    User,
    names,
    not_found,
    ok,
    outcome,
    refused,
    sleeper,
)

from msbd.daemon.access import Caller, allowed, check_path, check_spec_paths
from msbd.daemon.api import Api
from msbd.errors import InvalidParams, PermissionDenied, RemoteError, RpcCode
from msbd.model import LaunchSpec
from msbd.rpc.client import Client
from msbd.rpc.methods import ListSandboxParams, NoParams

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to create and become uids")


# --- the socket -------------------------------------------------------------------------


def test_socket_group_decides_who_may_connect(make_daemon: Callable[..., DaemonProc],
                                              open_dir: Path) -> None:
    d = make_daemon(settings={"socket_group": "msbd-t-sock"})
    st = d.socket.stat()
    assert (stat.S_IMODE(st.st_mode), st.st_gid) == (0o660, SOCK_GID)
    assert ok(d.socket, A, "daemon.ping") == "pong"  # A is in msbd-t-sock
    kind, message, errno = outcome(d.socket, B, "daemon.ping")
    assert (kind, errno) == ("unavailable", 13)  # EACCES
    assert message == (f"cannot connect to msbd at {d.socket}: permission denied: "
                       "are you in the socket's group?")


# --- ownership --------------------------------------------------------------------------


def test_other_uids_sandboxes_are_not_found(shared: DaemonProc,
                                            make_root: Callable[..., Path]) -> None:
    sock = shared.socket
    a_root = make_root("a-root", A)
    running = ok(sock, A, "sandbox.run", sleeper("a-run", a_root))
    assert running["owner_uid"] == A.uid
    ok(sock, A, "sandbox.create", sleeper("a-new", a_root))

    def b_tries(ready: Callable[[], None]) -> dict[tuple[str, str], Any]:
        out: dict[tuple[str, str], Any] = {}
        with Client(sock, timeout=60) as c:
            for name in ("a-run", "a-new", "ghost"):
                for method, extra in (("sandbox.get", {}), ("sandbox.stop", {"timeout": 5}),
                                      ("sandbox.kill", {}), ("sandbox.remove", {"force": True}),
                                      ("sandbox.logs", {}), ("sandbox.metrics", {}),
                                      ("sandbox.wait", {"timeout": 5}), ("sandbox.touch", {}),
                                      ("sandbox.start", {}), ("sandbox.restart", {})):
                    try:
                        out[name, method] = c.call(method, {"name": name} | extra)
                    except RemoteError as exc:
                        out[name, method] = {"code": exc.remote_code, "message": exc.message,
                                             "data": exc.remote_data}
            out["list", ""] = c.call("sandbox.list")
            out["info", ""] = c.call("daemon.info")["counts"]
        return out

    kind, seen = AsUser(B, b_tries).result()
    assert kind == "ok", seen
    for (name, method), got in seen.items():
        if name in ("a-run", "a-new"):
            # Exactly what a name nobody uses gets, name for name.
            assert got == not_found(name), (name, method)
            assert seen["ghost", method] == not_found("ghost")
    assert names(seen["list", ""]) == set()
    assert sum(seen["info", ""].values()) == 0

    # Nothing B tried touched A's run.
    after = ok(sock, A, "sandbox.get", {"name": "a-run"})
    assert (after["state"], after["run"]["id"]) == ("running", running["run"]["id"])

    # Names are global: B learns only that the name is taken, as A itself would.
    b_root = make_root("b-root", B)
    taken = {"code": RpcCode.CONFLICT, "message": "sandbox 'a-new' already exists",
             "data": {"sandbox": "a-new"}}
    assert refused(sock, B, "sandbox.create", sleeper("a-new", b_root)) == taken
    assert refused(sock, B, "sandbox.run", sleeper("a-new", b_root)) == taken
    assert refused(sock, A, "sandbox.create", sleeper("a-new", a_root)) == taken

    ok(sock, B, "sandbox.create", sleeper("b-own", b_root))
    assert names(ok(sock, B, "sandbox.list")) == {"b-own"}
    assert names(ok(sock, A, "sandbox.list")) == {"a-run", "a-new"}
    assert names(ok(sock, ROOT, "sandbox.list")) == {"a-run", "a-new", "b-own"}
    assert sum(ok(sock, A, "daemon.info")["counts"].values()) == 2
    assert sum(ok(sock, ROOT, "daemon.info")["counts"].values()) == 3

    # Root (here also the daemon's own uid) acts on everyone's sandboxes.
    assert ok(sock, ROOT, "sandbox.metrics", {"name": "a-run"})["pid"] == running["run"]["pid"]
    assert ok(sock, ROOT, "sandbox.stop", {"name": "a-run"})["state"] == "stopped"
    ok(sock, ROOT, "sandbox.remove", {"name": "b-own"})
    ok(sock, A, "sandbox.remove", {"name": "a-run"})
    assert refused(sock, A, "sandbox.get", {"name": "a-run"}) == not_found("a-run")


def test_events_show_only_own_sandboxes(shared: DaemonProc,
                                        make_root: Callable[..., Path]) -> None:
    sock = shared.socket
    a_root, b_root = make_root("a-root", A), make_root("b-root", B)
    # History from before anyone subscribes: the replay (`since`) must filter it too.
    ok(sock, A, "sandbox.run", sleeper("a-early", a_root))
    ok(sock, A, "sandbox.stop", {"name": "a-early"})
    ok(sock, B, "sandbox.create", sleeper("b-early", b_root))

    def subscriber(until: str) -> Callable[[Callable[[], None]], list[dict[str, Any]]]:
        def watch(ready: Callable[[], None]) -> list[dict[str, Any]]:
            seen: list[dict[str, Any]] = []
            with Client(sock, timeout=60) as c:
                c.call("events.subscribe", {"since": 0})
                ready()
                for method, params in c.iter_notifications(timeout=60):
                    assert method == "event", method
                    seen.append(params["event"])
                    if seen[-1]["sandbox"] == until:
                        return seen
            raise AssertionError(f"no event for {until} within 60 s; saw {seen}")
        return watch

    # Each stops at the last marker its uid may see; events come in seq order, so
    # everything before the marker that it may see has arrived by then.
    watchers = {who.name: AsUser(who, subscriber(until))
                for who, until in ((A, "a-mark"), (B, "b-mark"), (ROOT, "a-mark"))}
    for w in watchers.values():
        w.wait_ready()
    ok(sock, A, "sandbox.run", sleeper("a-live", a_root))
    ok(sock, A, "sandbox.kill", {"name": "a-live"})
    ok(sock, A, "sandbox.remove", {"name": "a-early"})
    ok(sock, B, "sandbox.create", sleeper("b-mark", b_root))
    ok(sock, A, "sandbox.create", sleeper("a-mark", a_root))
    by = {name: w.result() for name, w in watchers.items()}
    for name, (kind, events) in by.items():
        assert kind == "ok", (name, events)
    seqs = {name: [e["seq"] for e in events] for name, (_, events) in by.items()}
    assert all(s == sorted(set(s)) for s in seqs.values()), seqs
    sandboxes = {name: {e["sandbox"] for e in events} for name, (_, events) in by.items()}
    assert sandboxes[B.name] == {"b-early", "b-mark"}
    assert sandboxes[A.name] == {"a-early", "a-live", "a-mark"}
    assert sandboxes["root"] == {"a-early", "b-early", "a-live", "b-mark", "a-mark"}
    a_seen = [(e["sandbox"], e["state"], e["detail"]) for e in by[A.name][1]]
    assert ("a-early", "stopped", "removed") in a_seen  # the removal, live
    assert ("a-early", "running", None) in a_seen  # from the replay


def test_unknown_caller_is_refused() -> None:
    """A connection without peer credentials owns nothing and may only ping."""
    api = Api(settings=None, store=None, supervisor=SimpleNamespace(log_dir=Path("/nowhere")),
              hub=None, host=None, started=0.0)
    ctx = SimpleNamespace(connection=SimpleNamespace(uid=-1, gid=-1, pid=0, groups=None,
                                                     memo=None))
    with pytest.raises(PermissionDenied) as caught:
        asyncio.run(api(ctx, "sandbox.list", ListSandboxParams()))
    assert caught.value.code == RpcCode.PERMISSION_DENIED
    assert caught.value.data == {"method": "sandbox.list"}
    assert not Caller(uid=-1, gid=-1).is_admin(daemon_uid=-1)
    assert asyncio.run(api(ctx, "daemon.ping", NoParams())) == "pong"
    # Answered inline, the same; the second time too, with the caller remembered.
    assert ctx.connection.memo is not None
    for _ in range(2):
        with pytest.raises(PermissionDenied):
            api.immediate["sandbox.list"](ctx, ListSandboxParams())
        assert api.immediate["daemon.ping"](ctx, NoParams()) == "pong"


# --- host paths -------------------------------------------------------------------------


@pytest.mark.parametrize(("mode", "owner", "group", "who", "want", "expected"), [
    (0o700, B.uid, 0, B, 4 | 2 | 1, True),
    (0o077, B.uid, 0, B, 4, False),  # the owner class decides, though "other" may read
    (0o070, 0, SHARED_GID, A, 4 | 1, True),  # by a supplementary group
    (0o070, 0, SHARED_GID, B, 4, False),
    (0o705, 0, SHARED_GID, A, 4, False),  # A is in the group: group bits (none) decide
    (0o604, 0, 0, B, 4, True),
    (0o604, 0, 0, B, 2, False),
    (0o000, 5, 5, ROOT, 4 | 2, True),  # root reads and writes anything
    (0o644, 5, 5, ROOT, 1, False),  # but executes a file only with some x bit
    (0o744, 5, 5, ROOT, 1, True),
])
def test_allowed(mode: int, owner: int, group: int, who: User, want: int,
                 expected: bool) -> None:
    st = os.stat_result((stat.S_IFREG | mode, 0, 0, 1, owner, group, 0, 0, 0, 0))
    assert allowed(st, who.uid, frozenset({who.gid, *who.groups}), want) is expected


@pytest.fixture
def tree(open_dir: Path) -> Path:
    """open/ (0755), private/ (0700 root) with a dir in it, shared/ (0770 root:shared),
    mine/ (0700 B), links of every kind."""
    t = open_dir
    for name, mode, owner, group in (("open", 0o755, 0, 0), ("private", 0o700, 0, 0),
                                     ("private/inside", 0o755, 0, 0),
                                     ("shared", 0o770, 0, SHARED_GID),
                                     ("mine", 0o700, B.uid, B.gid),
                                     ("searchonly", 0o711, 0, 0),
                                     ("searchonly/readable", 0o755, 0, 0)):
        (t / name).mkdir()
        os.chown(t / name, owner, group)
        os.chmod(t / name, mode)
    (t / "open" / "disk.img").write_bytes(b"\0" * 512)
    os.chmod(t / "open" / "disk.img", 0o644)
    (t / "open" / "to-private").symlink_to(t / "private" / "inside")
    (t / "open" / "to-open").symlink_to(t / "open")
    (t / "open" / "relative").symlink_to("../searchonly/./readable")
    (t / "private" / "to-open").symlink_to(t / "open")
    (t / "open" / "loop").symlink_to("loop")
    return t


PATH_CASES = [
    # (path under tree, directory, write, who, None or the expected problem)
    ("open", True, False, B, None),
    ("open", True, True, B, ": permission denied (uid 64002 cannot read and write {t}/open)"),
    ("mine", True, True, B, None),
    ("shared", True, True, A, None),
    ("shared", True, False, B, ": permission denied (uid 64002 cannot read {t}/shared)"),
    ("private/inside", True, False, B,
     ": permission denied (uid 64002 cannot search {t}/private)"),
    # No oracle: a missing name behind a dir B cannot search is refused the same way.
    ("private/no-such", True, False, B,
     ": permission denied (uid 64002 cannot search {t}/private)"),
    ("private/inside", True, True, ROOT, None),
    ("searchonly/readable", True, False, B, None),
    ("open/relative", True, False, B, None),
    ("open/to-open", True, False, B, None),
    ("open/to-open", True, True, B, ": permission denied (uid 64002 cannot read and write "
                                    "{t}/open (where {t}/open/to-open leads))"),
    # A link whose target the caller cannot reach is refused, as the kernel would.
    ("open/to-private", True, False, B,
     ": permission denied (uid 64002 cannot search {t}/private)"),
    ("private/to-open", True, False, B,
     ": permission denied (uid 64002 cannot search {t}/private)"),
    ("open/loop", True, False, B, ": too many levels of symbolic links"),
    ("open/no-such", True, False, B, " does not exist"),
    ("open/disk.img", True, False, B, " is not a directory"),
    ("open/disk.img/x", False, False, B, ": {t}/open/disk.img is not a directory"),
    ("open", False, False, B, " is not a regular file or block device"),
    ("open/disk.img", False, False, B, None),
    ("open/disk.img", False, True, B,
     ": permission denied (uid 64002 cannot read and write {t}/open/disk.img)"),
]


@pytest.mark.parametrize(("rel", "directory", "write", "who", "problem"), PATH_CASES)
def test_check_path(tree: Path, rel: str, directory: bool, write: bool, who: User,
                    problem: str | None) -> None:
    path = f"{tree}/{rel}"
    if problem is None:
        assert check_path(path, who.caller(), field="f", directory=directory, write=write
                          ) == os.path.realpath(path)
        return
    with pytest.raises(InvalidParams) as caught:
        check_path(path, who.caller(), field="f", directory=directory, write=write)
    assert caught.value.message == f"`f`: {path}{problem.format(t=tree)}"
    assert caught.value.data == {"field": "f"}


def test_spec_paths_need_write_where_the_guest_writes(tree: Path) -> None:
    def problem(**spec: Any) -> str | None:
        launch = msgspec.convert({"name": "p", "exec": "/bin/sh"} | spec, LaunchSpec)
        try:
            check_spec_paths(launch, B.caller())
        except InvalidParams as exc:
            return f"{exc.field}: {exc.message}"
        return None

    mine, shut = str(tree / "mine"), str(tree / "open")
    disk = str(tree / "open" / "disk.img")
    assert problem(rootfs=mine) is None
    assert problem(rootfs=shut) is not None  # libkrun shares the rootfs read-write
    assert problem(rootfs=mine, mounts=[{"tag": "t", "host": shut, "readonly": True}]) is None
    assert (problem(rootfs=mine, mounts=[{"tag": "t", "host": shut}]) or "").startswith(
        "mounts[0].host: ")
    assert problem(rootfs=mine, disks=[{"id": "d", "host": disk, "format": "raw",
                                        "readonly": True}]) is None
    assert (problem(rootfs=mine, disks=[{"id": "d", "host": disk, "format": "raw"}]) or ""
            ).startswith("disks[0].host: ")
    assert (problem(root_disk={"path": disk, "format": "raw"}) or "").startswith(
        "root_disk.path: ")


def test_paths_checked_for_a_non_root_daemon_too(tree: Path) -> None:
    launch = LaunchSpec(name="p", exec="/bin/sh", rootfs=str(tree / "private" / "inside"))
    check_spec_paths(launch, ROOT.caller(), daemon=ROOT.caller())
    with pytest.raises(InvalidParams) as caught:
        check_spec_paths(launch, ROOT.caller(), daemon=C.caller())
    assert "permission denied (the daemon's uid 64003 cannot search" in caught.value.message


def test_launches_refused_for_paths_the_caller_cannot_use(
        shared: DaemonProc, make_root: Callable[..., Path], open_dir: Path) -> None:
    sock = shared.socket
    private = open_dir / "private"
    private.mkdir(mode=0o700)
    hidden = make_root("root", ROOT, parent=private)

    def assert_refused(err: dict[str, Any], path: Path) -> None:
        assert err["code"] == RpcCode.INVALID_PARAMS and err["data"] == {"field": "rootfs"}
        assert err["message"] == (f"`rootfs`: {path}: permission denied (uid {B.uid} cannot "
                                  f"search {private})")

    assert_refused(refused(sock, B, "sandbox.create", sleeper("b1", hidden)), hidden)
    assert_refused(refused(sock, B, "sandbox.run", sleeper("b1", hidden)), hidden)
    assert refused(sock, ROOT, "sandbox.get", {"name": "b1"}) == not_found("b1")  # no record

    # start and restart check again, as the caller of that call.
    b_root = make_root("b-root", B)
    ok(sock, B, "sandbox.create", sleeper("b2", b_root))
    os.chown(b_root, 0, 0)
    os.chmod(b_root, 0o700)
    err = refused(sock, B, "sandbox.start", {"name": "b2"})
    assert err["data"] == {"field": "rootfs"} and "permission denied" in err["message"]
    # Root may start B's sandbox, but its VM runs as B: so it is checked as B too.
    err = refused(sock, ROOT, "sandbox.start", {"name": "b2"})
    assert err["data"] == {"field": "rootfs"}
    assert f"permission denied (uid {B.uid} cannot" in err["message"]
    os.chown(b_root, B.uid, B.gid)
    started = ok(sock, ROOT, "sandbox.start", {"name": "b2"})
    # B may still search and read its root (the guest may not have started yet: it runs
    # as B), but no longer write it: enough to refuse the restart.
    os.chown(b_root, 0, 0)
    os.chmod(b_root, 0o755)
    err = refused(sock, B, "sandbox.restart", {"name": "b2"})
    assert err["data"] == {"field": "rootfs"} and "permission denied" in err["message"]
    after = ok(sock, B, "sandbox.get", {"name": "b2"})  # a refused restart stops nothing
    assert (after["state"], after["run"]["id"]) == ("running", started["run"]["id"])

    ok(sock, ROOT, "sandbox.run", sleeper("r1", hidden))  # root-created, root-started
    ok(sock, ROOT, "sandbox.restart", {"name": "r1"})
    for name in ("b2", "r1"):
        ok(sock, ROOT, "sandbox.stop", {"name": name})


def test_a_guest_writes_host_files_only_as_its_owner(shared: DaemonProc,
                                                     make_root: Callable[..., Path]) -> None:
    a_root = make_root("a-root", A)
    # A relative name: the test double chroots only when it is root, and the worker is A.
    ok(shared.socket, A, "sandbox.run", {"name": "w", "rootfs": str(a_root),
                                         "exec": "/bin/busybox", "args": ["touch", "made"]})
    ok(shared.socket, A, "sandbox.wait", {"name": "w", "timeout": 60})
    made = a_root / "made"
    assert made.exists(), "the workload did not run"
    assert made.stat().st_uid == A.uid


# --- secrets ----------------------------------------------------------------------------


def test_env_values_stay_out_of_argv_environ_and_logs(kdaemon: DaemonProc,
                                                      busybox_root: Path) -> None:
    secret = secrets.token_hex(16)
    env = {"SECRET_TOKEN": secret}
    info = kdaemon.call("sandbox.run", {
        "name": "sec", "rootfs": str(busybox_root), "exec": "/bin/sh", "memory_mib": 64,
        "env": env, "args": ["-c", "echo length ${#SECRET_TOKEN}; exec sleep 600"]})
    worker = info["run"]["pid"]
    # The workload got it (without printing it): the console shows its length.
    logs = kdaemon.call("sandbox.logs", {"name": "sec", "offset": 0, "wait": 30})
    while "length" not in logs["data"]:
        more = kdaemon.call("sandbox.logs", {"name": "sec", "offset": logs["offset"],
                                             "wait": 30})
        assert more["offset"] > logs["offset"], "no output from the workload"
        logs = {"data": logs["data"] + more["data"], "offset": more["offset"]}
    assert f"length {len(secret)}\n" in logs["data"]

    needle = secret.encode()
    holders: set[int] = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        with contextlib.suppress(OSError):
            assert needle not in Path(f"/proc/{entry}/cmdline").read_bytes(), entry
            if needle in Path(f"/proc/{entry}/environ").read_bytes():
                holders.add(int(entry))
    ps = subprocess.run(["ps", "-eww", "-o", "args"], capture_output=True, check=True).stdout
    assert needle not in ps
    assert kdaemon.proc is not None
    assert worker not in holders and kdaemon.proc.pid not in holders
    # Only the guest's own processes (the test double's workload, below the worker) hold it.
    for pid in holders:
        assert worker in _ancestors(pid), (pid, holders)

    # The owner's, exactly: msbd's own MSBD_* variables for the guest's init are not in it.
    assert kdaemon.call("sandbox.get", {"name": "sec"})["spec"]["env"] == env
    kdaemon.call("sandbox.stop", {"name": "sec"})
    kdaemon.call("sandbox.remove", {"name": "sec"})
    assert needle not in kdaemon.stderr_path.read_bytes()
    assert "worker spawned" in kdaemon.stderr()  # the log is there, at debug level
    for path in kdaemon.state_dir.rglob("*"):
        if path.is_file() and "log" in path.parts:
            assert needle not in path.read_bytes(), path
    assert stat.S_IMODE(kdaemon.state_dir.stat().st_mode) == 0o700  # the database's home


def _ancestors(pid: int) -> list[int]:
    chain = []
    while pid > 1:
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            break
        match = re.search(r"^PPid:\s+(\d+)$", status, re.M)
        assert match is not None
        pid = int(match.group(1))
        chain.append(pid)
    return chain


# --- a daemon that is not root ----------------------------------------------------------


class DaemonAs(DaemonProc):
    """`msbd serve` as `user`, with an interpreter that user can run."""

    def __init__(self, base: Path, user: User, python: str, pythonpath: str,
                 **kwargs: Any) -> None:
        super().__init__(base, **kwargs)
        self.user, self.python, self.pythonpath = user, python, pythonpath

    def argv(self) -> list[str]:
        return [self.python, *super().argv()[1:]]

    def environ(self) -> dict[str, str]:
        return super().environ() | {"PYTHONPATH": self.pythonpath}

    def start(self, *, wait: bool = True) -> DaemonAs:
        self._notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        with contextlib.suppress(FileNotFoundError):
            self.notify_path.unlink()
        self._notify.bind(str(self.notify_path))
        os.chown(self.notify_path, self.user.uid, self.user.gid)
        with self.stderr_path.open("ab") as stderr:
            self.proc = subprocess.Popen(self.argv(), env=self.environ(),
                                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                         stderr=stderr, user=self.user.uid,
                                         group=self.user.gid, extra_groups=[])
        if wait:
            self.wait_ready()
        return self


def _python_for(user: User) -> tuple[str, str]:
    """An interpreter `user` can run with msbd importable, or skip."""
    found = python_for(user.uid, user.gid)
    if found is None:
        pytest.skip(f"no Python {sys.version_info.major}.{sys.version_info.minor} with msbd "
                    f"importable by uid {user.uid}")
    return found


@pytest.mark.parametrize("mode", [0o660, 0o666])
def test_a_non_root_daemon_acts_on_everything_of_its_socket(
        open_dir: Path, fakekrun: Path, make_root: Callable[..., Path], busybox_root: Path,
        mode: int) -> None:
    python, pythonpath = _python_for(C)
    base = open_dir / "c"
    base.mkdir()
    os.chown(base, C.uid, C.gid)
    d = DaemonAs(base, C, python, pythonpath, libkrun=fakekrun,
                 settings={"heartbeat_interval": 0.2, "socket_mode": mode,
                           "worker_env": {"PYTHONPATH": pythonpath}})
    try:
        d.start()
        sock = d.socket
        assert ok(sock, C, "daemon.info")["uid"] == C.uid
        c_root = make_root("c-root", C)
        ok(sock, C, "sandbox.run", sleeper("c-run", c_root))
        ok(sock, ROOT, "sandbox.create", sleeper("root-made", c_root))
        # The worker runs as C: a path C cannot reach is refused, even to root.
        err = refused(sock, ROOT, "sandbox.create", sleeper("nope", busybox_root))
        assert "permission denied (the daemon's uid 64003 cannot" in err["message"]
        assert names(ok(sock, C, "sandbox.list")) == {"c-run", "root-made"}
        assert names(ok(sock, ROOT, "sandbox.list")) == {"c-run", "root-made"}
        assert ok(sock, C, "sandbox.get", {"name": "root-made"})["owner_uid"] == 0
        if mode == 0o666:  # B may connect, and sees nothing of C's or root's
            assert names(ok(sock, B, "sandbox.list")) == set()
            assert refused(sock, B, "sandbox.stop", {"name": "c-run"}) == not_found("c-run")
            assert refused(sock, B, "sandbox.get", {"name": "root-made"}) == not_found(
                "root-made")
        else:
            assert outcome(sock, B, "daemon.ping")[0] == "unavailable"
        ok(sock, C, "sandbox.remove", {"name": "root-made"})
        assert ok(sock, ROOT, "sandbox.stop", {"name": "c-run"})["state"] == "stopped"
    finally:
        if d.proc is not None:
            d.stop(sig=signal.SIGTERM)
