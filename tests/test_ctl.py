"""msbctl as a person uses it: exit statuses, one-line errors, tables and JSON, output
to its last byte, secrets kept off its command line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from daemonproc import DaemonProc


def msbctl_argv(d: DaemonProc | Path, *args: str) -> list[str]:
    sock = d.socket if isinstance(d, DaemonProc) else d
    return [sys.executable, "-m", "msbd.ctl", "--socket", str(sock), *args]


def msbctl(d: DaemonProc | Path, *args: str, env: dict[str, str] | None = None
           ) -> subprocess.CompletedProcess[str]:
    return subprocess.run(msbctl_argv(d, *args), capture_output=True, text=True, timeout=60,
                          env=None if env is None else os.environ | env)


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
                  "-p", "18080:80", "-p", "[::1]:18081:81", "--rlimit", "nofile=100",
                  "--", "/bin/sh", "-c", "echo hi")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "created box"
    ls = msbctl(daemon, "ls")
    lines = ls.stdout.splitlines()
    assert lines[0].split() == ["NAME", "STATE", "PID", "STARTED", "ENDED", "NETWORK", "PORTS",
                                "COMMAND"]
    assert lines[1].split()[:7] == ["box", "created", "-", "-", "-", "none",
                                    "127.0.0.1:18080->80/tcp,[::1]:18081->81/tcp"]
    # Columns are aligned: each row's STATE starts under the header's.
    assert lines[1].index("created") == lines[0].index("STATE")
    info = json.loads(msbctl(daemon, "inspect", "box").stdout)
    assert info["spec"]["disks"] == [{"id": "data", "host": str(disk), "format": "qcow2",
                                      "readonly": True}]
    assert info["spec"]["mounts"] == [{"tag": "src", "host": str(tmp_path), "readonly": True}]
    assert info["spec"]["args"] == ["-c", "echo hi"]
    assert info["ports"] == [{"host": 18080, "guest": 80, "address": None},
                             {"host": 18081, "guest": 81, "address": "::1"}]
    assert info["spec"]["rlimits"] == {"nofile": 100}
    listed = json.loads(msbctl(daemon, "--json", "ls", "--label", "team=infra").stdout)
    assert [s["name"] for s in listed["sandboxes"]] == ["box"]
    assert msbctl(daemon, "rm", "box").returncode == 0
    gone = msbctl(daemon, "rm", "box")
    assert gone.returncode == 1
    assert gone.stderr == "msbctl: no sandbox named 'box'\n"


@pytest.mark.parametrize(("flags", "message"), [
    (["-p", "80"], "-p 80: expected [ADDRESS:]HOST:GUEST"),
    (["-p", "x:80"], "-p x:80: 'x' is not a number"),
    (["-p", "[::1:80:81"], "-p [::1:80:81: expected [ADDRESS]:HOST:GUEST"),
    (["--rlimit", "nofile"], "invalid --rlimit 'nofile': expected KEY=VALUE"),
    (["--rlimit", "nofile=lots"], "--rlimit nofile: 'lots' is not a number"),
    (["--network", "bridge"], "argument --network: invalid choice: 'bridge'"),
])
def test_bad_network_flags_say_which(daemon: DaemonProc, tmp_path: Path, flags: list[str],
                                     message: str) -> None:
    done = msbctl(daemon, "create", "box", "--rootfs", str(tmp_path), *flags, "--", "/bin/true")
    assert done.returncode != 0
    assert message in done.stderr, done.stderr
    assert daemon.call("sandbox.list", {})["sandboxes"] == []


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


# --- long output: every page, to the end ----------------------------------------------

PAGE = 256 * 1024  # sandbox.logs's default `limit`


def test_logs_and_run_wait_print_all_of_a_long_output(kdaemon: DaemonProc,
                                                      busybox_root: Path) -> None:
    """About five pages of output: `run --wait`, `logs` and `logs -f` print all of it."""
    expected = "".join(f"{i}\n" for i in range(1, 200_001))
    assert len(expected) > 4 * PAGE
    done = msbctl(kdaemon, "run", "big", "--rootfs", str(busybox_root), "--wait", "--",
                  "/bin/seq", "1", "200000")
    assert done.returncode == 0, done.stderr
    assert done.stdout == expected
    for args in (["logs", "big"], ["logs", "-f", "big"]):
        printed = msbctl(kdaemon, *args)
        assert (printed.returncode, printed.stderr) == (0, ""), args
        assert printed.stdout == expected, args
    assert msbctl(kdaemon, "logs", "-n", "2", "big").stdout == "199999\n200000\n"
    # The API says when a page is not the last.
    pages, offset, more = [], 0, True
    while more:
        page = kdaemon.call("sandbox.logs", {"name": "big", "offset": offset})
        pages.append(page["data"])
        offset, more = page["offset"], page["more"]
    assert [len(p) for p in pages[:-1]] == [PAGE] * (len(pages) - 1)
    assert "".join(pages) == expected and offset == len(expected)


def test_pages_never_split_a_character_and_always_move_on(kdaemon: DaemonProc,
                                                          busybox_root: Path) -> None:
    """A page that ends inside a UTF-8 character holds it back for the next one, unless
    that would leave the page empty: a reader paging with any `limit` reaches the end."""
    text = "ab\u20ac\n"  # the euro sign is 3 bytes
    done = msbctl(kdaemon, "run", "utf", "--rootfs", str(busybox_root), "--wait", "--",
                  "/bin/printf", "ab\\342\\202\\254\\n")
    assert done.stdout == text

    def pages(limit: int) -> list[tuple[str, int, bool]]:
        out, offset, more = [], 0, True
        while more:
            page = kdaemon.call("sandbox.logs", {"name": "utf", "offset": offset,
                                                 "limit": limit})
            out.append((page["data"], page["offset"], page["more"]))
            offset, more = page["offset"], page["more"]
        return out

    assert pages(3) == [("ab", 2, True), ("\u20ac", 5, True), ("\n", 6, False)]
    assert [p[1] for p in pages(1)] == [1, 2, 3, 4, 5, 6]  # each byte its own page


# --- the guest environment without secrets on the command line -------------------------


def test_env_file_and_bare_env_keys(daemon: DaemonProc, tmp_path: Path) -> None:
    env_file = tmp_path / "job.env"
    env_file.write_bytes(
        b"# a comment\n"
        b"\n"
        b"   \t\n"
        b"  # an indented comment\n"
        b"PLAIN=value\n"
        b"SPACES=  both ends  \n"
        b"QUOTED='kept' as is\n"
        b"DOLLAR=$HOME and ${PATH} and \\n\n"
        b"EQUALS=a=b=c\n"
        b"EMPTY=\n"
        b"HASH=not # a comment\n"
        b"CRLF=windows\r\n"
        b"FROM_ENV\n"
        b"OVERRIDDEN=from the file")
    done = msbctl(daemon, "create", "envs", "--rootfs", str(tmp_path), "--env-file",
                  str(env_file), "-e", "OVERRIDDEN=from -e", "-e", "BARE", "--", "/bin/true",
                  env={"FROM_ENV": "file's bare key", "BARE": "flag's bare key"})
    assert done.returncode == 0, done.stderr
    env = json.loads(msbctl(daemon, "inspect", "envs").stdout)["spec"]["env"]
    assert env == {
        "PLAIN": "value", "SPACES": "  both ends  ", "QUOTED": "'kept' as is",
        "DOLLAR": "$HOME and ${PATH} and \\n", "EQUALS": "a=b=c", "EMPTY": "",
        "HASH": "not # a comment", "CRLF": "windows", "FROM_ENV": "file's bare key",
        "OVERRIDDEN": "from -e", "BARE": "flag's bare key"}


@pytest.mark.parametrize(("content", "args", "message"), [
    (None, ["-e", "NOT_SET_HERE"], "-e NOT_SET_HERE: NOT_SET_HERE is not set in msbctl's "
                                   "environment"),
    (b"A=1\nNOT_SET_HERE\n", [], "line 2: NOT_SET_HERE is not set in msbctl's environment"),
    (b"A=1\nexport B=2\n", [], "line 2: expected KEY=VALUE or KEY"),
    (b" C=3\n", [], "line 1: expected KEY=VALUE or KEY"),
    (b"D E=4\n", [], "line 1: expected KEY=VALUE or KEY"),
    (b"=5\n", [], "line 1: expected KEY=VALUE or KEY"),
    (b"\xff=6\n", [], "job.env: 'utf-8' codec can't decode"),
    (None, ["--env-file", "/nonexistent/job.env"], "/nonexistent/job.env: No such file"),
    (None, ["-e", "BAD-NAME"], "'BAD-NAME' is not a variable name"),
])
def test_bad_env_is_a_usage_error(daemon: DaemonProc, tmp_path: Path, content: bytes | None,
                                  args: list[str], message: str) -> None:
    if content is not None:
        (tmp_path / "job.env").write_bytes(content)
        args = ["--env-file", str(tmp_path / "job.env"), *args]
    env = {k: v for k, v in os.environ.items() if k != "NOT_SET_HERE"}
    done = subprocess.run(msbctl_argv(daemon, "create", "x", "--rootfs", str(tmp_path), *args,
                                      "--", "/bin/true"),
                          capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode == 2, done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("msbctl: usage error: ") and message in last, done.stderr
    assert json.loads(msbctl(daemon, "--json", "ls").stdout) == {"sandboxes": []}


def test_secrets_stay_off_msbctls_command_line(kdaemon: DaemonProc, busybox_root: Path,
                                               tmp_path: Path) -> None:
    """While `run --wait` waits, every user can read /proc/PID/cmdline of msbctl: the
    values from `--env-file` and `-e KEY` are not there, and the guest gets them."""
    from_file, from_env = "s3cret-from-the-file", "s3cret-from-the-environment"
    env_file = tmp_path / "secret.env"
    env_file.write_text(f"FILE_TOKEN={from_file}\n")
    env_file.chmod(0o600)
    script = "echo file=$FILE_TOKEN env=$ENV_TOKEN plain=$PLAIN; echo ready; exec sleep 600"
    argv = msbctl_argv(kdaemon, "run", "sec", "--rootfs", str(busybox_root), "--wait",
                       "--env-file", str(env_file), "-e", "ENV_TOKEN", "-e", "PLAIN=on-argv",
                       "--", "/bin/sh", "-c", script)
    with kdaemon.client() as events:
        events.call("events.subscribe")
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, env=os.environ | {"ENV_TOKEN": from_env})
        try:
            for method, params in events.iter_notifications(timeout=60):
                ev = params["event"]
                if method == "event" and ev["sandbox"] == "sec" and ev["state"] == "running":
                    break
            else:
                pytest.fail(f"the sandbox never ran; msbctl: {proc.communicate()}")
            data, offset = "", 0
            while "ready" not in data:  # long polls: the guest has its environment now
                page = kdaemon.call("sandbox.logs", {"name": "sec", "offset": offset,
                                                     "wait": 30})
                data, offset = data + page["data"], page["offset"]
            assert proc.poll() is None, "msbctl should still be waiting for the run"
            cmdline = Path(f"/proc/{proc.pid}/cmdline").read_bytes().split(b"\0")
            assert b"on-argv" in b" ".join(cmdline)  # what this probe sees when it is there
            assert b"run" in cmdline and b"ENV_TOKEN" in cmdline
            for secret in (from_file, from_env):
                assert secret.encode() not in b" ".join(cmdline)
            kdaemon.call("sandbox.stop", {"name": "sec"})
            out, err = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    assert proc.returncode == 128 + 15, err
    assert out.startswith(f"file={from_file} env={from_env} plain=on-argv\nready\n"), out
