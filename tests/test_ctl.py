"""msbctl as a person uses it: exit statuses, one-line errors, tables and JSON."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from daemonproc import DaemonProc


def msbctl(d: DaemonProc | Path, *args: str) -> subprocess.CompletedProcess[str]:
    sock = d.socket if isinstance(d, DaemonProc) else d
    return subprocess.run([sys.executable, "-m", "msbd.ctl", "--socket", str(sock), *args],
                          capture_output=True, text=True, timeout=60)


def test_ping(daemon: DaemonProc) -> None:
    done = msbctl(daemon, "ping")
    assert done.returncode == 0
    assert done.stdout.startswith("pong (")


def test_info_for_people_and_machines(daemon: DaemonProc) -> None:
    human = msbctl(daemon, "info")
    assert human.returncode == 0
    assert "libkrun" in human.stdout and "limits" in human.stdout
    machine = json.loads(msbctl(daemon, "--json", "info").stdout)
    assert machine["pid"] == daemon.proc.pid  # type: ignore[union-attr]


def test_no_daemon_is_one_clear_line(tmp_path: Path) -> None:
    done = msbctl(tmp_path / "nothing.sock", "ping")
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1
    assert str(tmp_path / "nothing.sock") in lines[0]


def test_create_ls_inspect_rm(daemon: DaemonProc, tmp_path: Path) -> None:
    disk = tmp_path / "data.qcow2"
    disk.write_bytes(b"\0" * 512)
    done = msbctl(daemon, "create", "box", "--rootfs", str(tmp_path), "--vcpus", "2",
                  "--memory", "256", "-e", "TOKEN=s3cret", "-l", "team=infra",
                  "--mount", f"src:{tmp_path}:ro", "--disk", f"data:{disk}:qcow2:ro",
                  "--", "/bin/sh", "-c", "echo hi")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "created box"
    ls = msbctl(daemon, "ls")
    lines = ls.stdout.splitlines()
    assert lines[0].split() == ["NAME", "STATE", "PID", "STARTED", "ENDED", "COMMAND"]
    assert lines[1].split()[:5] == ["box", "created", "-", "-", "-"]
    # Columns are aligned: each row's STATE starts under the header's.
    assert lines[1].index("created") == lines[0].index("STATE")
    info = json.loads(msbctl(daemon, "inspect", "box").stdout)
    assert info["spec"]["disks"] == [{"id": "data", "host": str(disk), "format": "qcow2",
                                      "readonly": True}]
    assert info["spec"]["mounts"] == [{"tag": "src", "host": str(tmp_path), "readonly": True}]
    assert info["spec"]["args"] == ["-c", "echo hi"]
    listed = json.loads(msbctl(daemon, "--json", "ls", "--label", "team=infra").stdout)
    assert [s["name"] for s in listed["sandboxes"]] == ["box"]
    assert msbctl(daemon, "rm", "box").returncode == 0
    gone = msbctl(daemon, "rm", "box")
    assert gone.returncode == 1
    assert gone.stderr == "msbctl: no sandbox named 'box'\n"


@pytest.mark.parametrize(("disk", "message"), [
    ("id:/host", "expected id:host:format[:ro]"),
    ("id:/host:raw:ro:extra", "expected id:host:format[:ro]"),
    (":/host:raw", "empty id"),
    ("id::raw", "empty host path"),
    ("id:/host:bogus", "unknown format 'bogus'"),
    ("id:/host:raw:rw", "unknown flag 'rw'"),
    ("id:/host:raw:RO", "unknown flag 'RO'"),
])
def test_bad_disk_is_a_usage_error(daemon: DaemonProc, tmp_path: Path, disk: str,
                                   message: str) -> None:
    done = msbctl(daemon, "create", "x", "--rootfs", str(tmp_path), "--disk", disk, "--",
                  "/bin/true")
    assert done.returncode == 2
    assert message in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    assert json.loads(msbctl(daemon, "--json", "ls").stdout) == {"sandboxes": []}


@pytest.mark.parametrize("mount", ["t", ":/h", "t:", "t:/h:rw", "t:/h:ro:x"])
def test_bad_mount_is_a_usage_error(daemon: DaemonProc, tmp_path: Path, mount: str) -> None:
    done = msbctl(daemon, "create", "x", "--rootfs", str(tmp_path), "--mount", mount, "--",
                  "/bin/true")
    assert done.returncode == 2, done.stderr
    assert "--mount" in done.stderr


def test_usage_errors_exit_2(daemon: DaemonProc, tmp_path: Path) -> None:
    assert msbctl(daemon).returncode == 2
    assert msbctl(daemon, "frobnicate").returncode == 2
    no_cmd = msbctl(daemon, "create", "x", "--rootfs", str(tmp_path))
    assert no_cmd.returncode == 2
    assert "EXEC" in no_cmd.stderr


def test_error_reply_exits_1_with_one_line(daemon: DaemonProc, tmp_path: Path) -> None:
    done = msbctl(daemon, "create", "x", "--rootfs", str(tmp_path / "missing"), "--",
                  "/bin/true")
    assert done.returncode == 1
    assert done.stderr.strip() == f"msbctl: `rootfs`: {tmp_path / 'missing'} does not exist"
