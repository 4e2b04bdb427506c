"""Fixtures shared by every test: short socket dirs, the libkrun test double, a busybox root."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

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
