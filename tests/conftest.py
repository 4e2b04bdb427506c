"""Fixtures shared by every test: short socket dirs, the libkrun test double, a busybox
root, a store on a new database file."""

from __future__ import annotations

import contextlib
import errno
import grp
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import cgroupdir
import pytest
from daemonproc import FAKEKRUN_DIR, DaemonProc, build_fakekrun, make_busybox_root
from tenants import SHARED_GID, SOCK_GID, A, B, C, User
from workerproc import Workers, fake_spec

from msbd.db.store import Store, open_store


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    """A short directory for Unix sockets (tmp_path can pass the 108-byte limit)."""
    path = Path(tempfile.mkdtemp(prefix="msbd-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def fakekrun() -> Path:
    """The libkrun test double (tests/fakekrun), built with the system compiler."""
    return build_fakekrun()


@pytest.fixture(scope="session")
def fakekrun_old(fakekrun: Path) -> Path:
    """The test double without the calls older libkrun releases lack
    (krun_add_vsock_port2, krun_set_root_disk_remount)."""
    old = FAKEKRUN_DIR / "libfakekrun-old.so"
    assert old.exists(), "make did not build libfakekrun-old.so"
    return old


@pytest.fixture(scope="session")
def busybox_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny root filesystem: Debian's static busybox and its applet links."""
    return make_busybox_root(tmp_path_factory.mktemp("rootfs"))


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    """Where a store test keeps its database; the directory does not exist yet."""
    return tmp_path / "state" / "msbd.db"


@pytest.fixture
async def store(db_path: Path) -> AsyncIterator[Store]:
    """A store open on a new database at `db_path`, closed after the test."""
    async with open_store(db_path) as opened:
        yield opened


@pytest.fixture
def workers() -> Iterator[Workers]:
    """Worker processes started by a test (with exact fd maps); all reaped at the end."""
    started = Workers()
    yield started
    started.close()


@pytest.fixture
def log(tmp_path: Path) -> Path:
    """Where the libkrun test double records its calls (FAKEKRUN_LOG)."""
    return tmp_path / "fakekrun.jsonl"


@pytest.fixture
def make_spec(fakekrun: Path, busybox_root: Path) -> Callable[..., bytes]:
    """A worker spec (JSON) that runs in the busybox root with the libkrun test double."""
    return lambda **fields: fake_spec(fakekrun, busybox_root, **fields)


@pytest.fixture
def make_daemon(sock_dir: Path) -> Iterator[Callable[..., DaemonProc]]:
    """Factory of real daemons in `sock_dir`; every one is stopped at the end of the test."""
    started: list[DaemonProc] = []

    def make(*, libkrun: Path | None = None, settings: dict[str, Any] | None = None,
             env: dict[str, str] | None = None, start: bool = True, name: str = "d"
             ) -> DaemonProc:
        base = sock_dir / name
        base.mkdir(exist_ok=True)
        daemon = DaemonProc(base, libkrun=libkrun, settings=settings, env=env)
        started.append(daemon)
        return daemon.start() if start else daemon

    yield make
    for daemon in started:
        daemon.close()


@pytest.fixture
def daemon(make_daemon: Callable[..., DaemonProc]) -> DaemonProc:
    """A daemon with no libkrun configured: the control API without launches."""
    return make_daemon()


@pytest.fixture
def kdaemon(make_daemon: Callable[..., DaemonProc], fakekrun: Path) -> DaemonProc:
    """A daemon that launches workers with the libkrun test double."""
    return make_daemon(libkrun=fakekrun, settings={"heartbeat_interval": 0.2})


@pytest.fixture
def gated_python(tmp_path: Path) -> Iterator[Path]:
    """A `worker_python` that holds every worker before its interpreter starts, at a FIFO
    nobody writes: a launch stays `starting` until its worker is stopped or killed.

    At the end the gate opens once (a writer comes and goes: each held reader reads
    EOF and goes on), so a process still held (the daemon's fork server, which never
    got ready) becomes itself and ends with its daemon instead of waiting forever."""
    gate = tmp_path / "gate"
    os.mkfifo(gate)
    held = tmp_path / "worker-python"
    held.write_text(f"#!/bin/sh\nread _ < {gate}\nexec {sys.executable} \"$@\"\n")
    held.chmod(0o755)
    yield held
    try:
        os.close(os.open(gate, os.O_WRONLY | os.O_NONBLOCK))
    except OSError as exc:
        if exc.errno != errno.ENXIO:  # ENXIO: nobody is held
            raise


@pytest.fixture
def cgdir() -> Iterator[Path]:
    """A fresh cgroup v2 directory on this machine's real hierarchy (tests/cgroupdir.py),
    emptied and removed after the test."""
    path = cgroupdir.make()
    try:
        yield path
    finally:
        cgroupdir.destroy(path)


def pytest_configure(config: pytest.Config) -> None:
    """Whatever fds the test runner's own parent leaked must not reach the processes
    the tests start: the worker reports inherited fds as a leak, and so do the tests."""
    for entry in os.listdir("/proc/self/fd"):
        fd = int(entry)
        if fd > 2:
            with contextlib.suppress(OSError):
                os.set_inheritable(fd, False)


# --- other uids (tests/tenants.py) ---------------------------------------------------


@pytest.fixture(scope="module")
def users() -> Iterator[None]:
    """Users A, B and C, and the groups `msbd-t-shared` (A) and `msbd-t-sock` (A)."""
    made_users: list[str] = []
    made_groups: list[str] = []
    for name, gid in (("msbd-t-shared", SHARED_GID), ("msbd-t-sock", SOCK_GID),
                      *((u.name, u.gid) for u in (A, B, C))):
        try:
            assert grp.getgrgid(gid).gr_name == name, f"gid {gid} is taken on this host"
        except KeyError:
            subprocess.run(["groupadd", "-g", str(gid), name], check=True)
            made_groups.append(name)
    for user in (A, B, C):
        try:
            assert pwd.getpwuid(user.uid).pw_name == user.name, f"uid {user.uid} is taken"
        except KeyError:
            extra = ",".join(grp.getgrgid(g).gr_name for g in user.groups)
            subprocess.run(["useradd", "-u", str(user.uid), "-g", str(user.gid), "-M", "-N",
                            "-d", "/nonexistent", "-s", "/usr/sbin/nologin",
                            *(["-G", extra] if extra else []), user.name], check=True)
            made_users.append(user.name)
    yield
    for name in made_users:
        subprocess.run(["userdel", name], check=False)
    for name in made_groups:
        with contextlib.suppress(KeyError):
            grp.getgrnam(name)  # userdel may have removed a user's own group already
            subprocess.run(["groupdel", name], check=False)


@pytest.fixture
def open_dir(sock_dir: Path, users: None) -> Path:
    """`sock_dir`, searchable by every uid (so only the socket's own mode decides)."""
    os.chmod(sock_dir, 0o755)
    return sock_dir


@pytest.fixture
def make_root(open_dir: Path, busybox_root: Path) -> Callable[..., Path]:
    def make(name: str, owner: User, mode: int = 0o755, parent: Path | None = None) -> Path:
        root = (parent or open_dir) / name
        shutil.copytree(busybox_root, root, symlinks=True)
        os.chown(root, owner.uid, owner.gid)
        os.chmod(root, mode)
        return root

    return make


@pytest.fixture
def shared(make_daemon: Callable[..., DaemonProc], fakekrun: Path, open_dir: Path
           ) -> DaemonProc:
    """A root daemon with the test double, whose socket (0666) every uid may use."""
    return make_daemon(libkrun=fakekrun, settings={"heartbeat_interval": 0.2,
                                                   "socket_mode": 0o666})
