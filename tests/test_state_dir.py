"""A state directory (or socket directory) msbd cannot write: `msbd serve` says so in
one line naming the path, and exits 2.

Through the real command: as a uid that is not root (a directory of mode 0500,
or one it may not create), and as root on a read-only bind mount (in a mount
namespace of its own, so nothing leaks out of the test).
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from daemonproc import python_for

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to become another uid "
                                                           "and to mount")

UID = GID = 64031  # no passwd entry needed: the daemon is given every path it uses


def serve_argv(python: str, base: Path, state_dir: Path) -> list[str]:
    return [python, "-m", "msbd.cli", "serve", "--socket", str(base / "msbd.sock"),
            "--state-dir", str(state_dir)]


def assert_one_line_naming(done: subprocess.CompletedProcess[str], what: str, path: Path,
                           reason: str) -> None:
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2, done.stderr
    assert len(lines) == 1, done.stderr
    assert "Traceback" not in done.stderr
    verb = "use" if what == "state directory" else "create"
    assert f" ERROR msbd.daemon: cannot {verb} the {what} {path}: " in lines[0], lines[0]
    assert lines[0].endswith(reason), lines[0]


@pytest.fixture
def base(sock_dir: Path) -> Path:
    """A directory every uid may search (`sock_dir` is 0700), for the daemon's files."""
    os.chmod(sock_dir, 0o755)
    return sock_dir


def test_unwritable_state_dir_as_a_user(base: Path) -> None:
    with pytest.raises(KeyError):
        pwd.getpwuid(UID)
    found = python_for(UID, GID)
    if found is None:
        pytest.fail(f"no Python {sys.version_info[:2]} that uid {UID} can run with msbd")
    python, pythonpath = found
    shut = base / "shut"  # the user's own directory, but r-x only
    shut.mkdir(mode=0o500)
    os.chown(shut, UID, GID)
    os.chown(base, UID, GID)  # the socket's directory is the user's, writable
    for state_dir in (shut, shut / "state"):  # cannot create files / cannot create it
        done = subprocess.run(serve_argv(python, base, state_dir), capture_output=True,
                              text=True, timeout=60,
                              env={"PYTHONPATH": pythonpath, "HOME": "/nonexistent"},
                              user=UID, group=GID, extra_groups=[])
        assert_one_line_naming(done, "state directory", state_dir, "Permission denied")
    assert list(shut.iterdir()) == []


def serve_under_read_only(mounted: Path, argv: list[str]) -> subprocess.CompletedProcess[str]:
    """Run `argv` with `mounted` bind-mounted read-only, in a mount namespace of its own."""
    if shutil.which("unshare") is None or subprocess.run(
            ["unshare", "--mount", "true"], capture_output=True, check=False).returncode:
        pytest.skip("cannot make a mount namespace here (unshare --mount)")
    script = ('mount --bind "$1" "$1" && mount -o remount,bind,ro "$1" && shift && '
              'exec "$@"')
    return subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                           script, "sh", str(mounted), *argv],
                          capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("used_before", [False, True])
def test_read_only_state_dir_as_root(base: Path, used_before: bool) -> None:
    """Root bypasses modes but not a read-only mount; a state dir msbd used before (its
    database and lock file already there) fails the same way."""
    mounted = base / "ro"
    state_dir = mounted / "state"
    mounted.mkdir()
    if used_before:
        state_dir.mkdir(mode=0o700)
        for name in ("msbd.db", "msbd.lock"):
            (state_dir / name).write_bytes(b"")
    done = serve_under_read_only(mounted, serve_argv(sys.executable, base, state_dir))
    assert_one_line_naming(done, "state directory", state_dir, "Read-only file system")


def test_control_socket_in_a_read_only_directory(base: Path) -> None:
    mounted = base / "ro"
    mounted.mkdir()
    argv = [sys.executable, "-m", "msbd.cli", "serve", "--socket", str(mounted / "msbd.sock"),
            "--state-dir", str(base / "state")]
    done = serve_under_read_only(mounted, argv)
    assert_one_line_naming(done, "control socket", mounted / "msbd.sock",
                           "Read-only file system")
