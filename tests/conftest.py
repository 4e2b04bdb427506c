"""Fixtures shared by every test: short socket dirs, the libkrun test double, a busybox
root, a store on a new database file."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from daemonproc import DaemonProc
from workerproc import Workers, fake_spec

from msbd.db.store import Store, open_store

TESTS = Path(__file__).resolve().parent
FAKEKRUN_DIR = TESTS / "fakekrun"
FAKEKRUN_LIB = FAKEKRUN_DIR / "libfakekrun.so"
BUSYBOX = Path("/bin/busybox")


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
    subprocess.run(["make", "-s", "-C", str(FAKEKRUN_DIR)], check=True)
    assert FAKEKRUN_LIB.exists(), "make did not build the libkrun test double"
    return FAKEKRUN_LIB


@pytest.fixture(scope="session")
def busybox_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny root filesystem: Debian's static busybox and its applet links."""
    if not BUSYBOX.exists():
        pytest.fail("busybox-static is not installed: run `make setup` (scripts/system-deps.sh)")
    root = tmp_path_factory.mktemp("rootfs")
    (root / "bin").mkdir()
    shutil.copy2(BUSYBOX, root / "bin" / "busybox")
    applets = subprocess.run([str(BUSYBOX), "--list"], capture_output=True, text=True,
                             check=True).stdout.split()
    for applet in applets:
        link = root / "bin" / applet
        if not link.exists():
            os.symlink("busybox", link)
    for d in ("tmp", "proc", "dev", "etc", "work"):
        (root / d).mkdir(exist_ok=True)
    return root


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


def pytest_configure(config: pytest.Config) -> None:
    """Whatever fds the test runner's own parent leaked must not reach the processes
    the tests start: the worker reports inherited fds as a leak, and so do the tests."""
    for entry in os.listdir("/proc/self/fd"):
        fd = int(entry)
        if fd > 2:
            with contextlib.suppress(OSError):
                os.set_inheritable(fd, False)
