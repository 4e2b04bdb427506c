"""The worker as the daemon sees it: real processes, real pipes, the libkrun test double."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from workerproc import (
    DEFAULT,
    Workers,
    pipe_with,
)

from msbd.contract import STATUS_FD, WATCHDOG_FD

ZERO_VMDK = b'# Disk DescriptorFile\nversion=1\nparentCID=ffffffff\nRW 2048 ZERO\n'
"""A vmdk descriptor naming no file (all its data reads as zeros): one the worker accepts."""


def disk_files(where: Path) -> dict[str, Path]:
    """One real image per format: raw (known bytes), qcow2 (qemu-img), vmdk (all ZERO)."""
    files = {"raw": where / "r.img", "qcow2": where / "q.qcow2", "vmdk": where / "v.vmdk"}
    files["raw"].write_bytes(b"RAW!" + b"\0" * 508)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(files["qcow2"]), "1M"],
                   check=True)
    files["vmdk"].write_bytes(ZERO_VMDK)
    return files


FD_NAME = re.compile(r"^/proc/self/fd/(\d+)(/?)$")


def by_fd(value: object) -> object:
    """`/proc/self/fd/N` as `<fd>` (`<fd>/` with the slash): the numbers vary, the form not."""
    if isinstance(value, str) and (m := FD_NAME.match(value)):
        return "<fd>" + m.group(2)
    return value


CONTROL_SOCKET = re.compile(r"^/proc/self/fd/\d+$")  # the socket's file is gone already
# msbd's own entries of the guest environment, after the spec's (grace: the default 10 s).
MSBD_ENV = ["MSBD_CONTROL_PORT=7097", "MSBD_STOP_GRACE=10"]


def vm_records(calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The records but the guest init's control channel ones, which its own thread writes
    at its own pace (test_vm_control.py checks those)."""
    return [c for c in calls if not c["fn"].startswith(("control_", "guest_signal"))]


# --- fd checks: status 2, one stderr line, no libkrun call ---------------------------


def _regular_file(tmp: Path) -> int:
    return os.open(tmp / "regular", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)


def _socket(_: Path) -> int:
    a, b = socket.socketpair()
    b.close()
    return a.detach()


def _pipe_read_end(_: Path) -> int:
    r, w = os.pipe()
    os.close(w)
    return r


def _pipe_write_end(_: Path) -> int:
    r, w = os.pipe()
    os.close(r)
    return w


FD_FAILURES = [
    # (id, target fd, how to make its source (None: leave it closed), prelude, message)
    ("97-missing", WATCHDOG_FD, None, None, "fd 97: not open"),
    ("97-regular-file", WATCHDOG_FD, _regular_file, None, "fd 97: not a FIFO (a regular file)"),
    ("97-socket", WATCHDOG_FD, _socket, None, "fd 97: not a FIFO (a socket)"),
    ("97-write-end", WATCHDOG_FD, _pipe_write_end, None,
     "fd 97: not readable (the write end of the watchdog pipe?)"),
    ("97-close-on-exec", WATCHDOG_FD, DEFAULT,
     "import fcntl; fcntl.fcntl(97, fcntl.F_SETFD, fcntl.FD_CLOEXEC)",
     "fd 97: close-on-exec is set (the watchdog pipe must be inherited)"),
    ("98-missing", STATUS_FD, None, None, "fd 98: not open"),
    ("98-read-only-end", STATUS_FD, _pipe_read_end, None, "fd 98: not writable (opened read-only)"),
    ("98-regular-file", STATUS_FD, _regular_file, None, "fd 98: not a FIFO (a regular file)"),
    ("96-missing", 96, None, None, "fd 96: not open"),
    ("96-write-only", 96, _pipe_write_end, None, "fd 96: not readable (opened write-only)"),
    ("96-socket", 96, _socket, None, "fd 96: not a regular file or pipe (a socket)"),
]


@pytest.mark.parametrize(("target", "make", "prelude", "message"),
                         [f[1:] for f in FD_FAILURES], ids=[f[0] for f in FD_FAILURES])
def test_fd_check_failure(workers: Workers, make_spec: Callable[..., bytes], log: Path,
                          tmp_path: Path, target: int, make: Any, prelude: str | None,
                          message: str) -> None:
    source: object = make(tmp_path) if callable(make) else make
    w = workers.start(make_spec(), log=log, fds={target: source}, prelude=prelude)
    try:
        assert w.wait() == 2
        assert w.output() == f"msbd-worker: {message}\n"
        if w.status is not None:  # fd 98 was fine: the daemon gets the reason there too
            assert w.status_lines() == [f"error {message}"]
        assert not log.exists(), "libkrun was touched before the fd checks passed"
    finally:
        if isinstance(source, int):
            os.close(source)


# --- a good launch ---------------------------------------------------------------------


def test_good_launch_calls_libkrun_in_order_with_exact_arguments(
        workers: Workers, make_spec: Callable[..., bytes], log: Path, tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    files = disk_files(tmp_path)
    spec = make_spec(
        vcpus=3, memory_mib=320, workdir="/work", exec="/bin/sh",
        args=["-c", "echo $0:$#:${#1}:${#2}", "zero", "one two", ""],
        env={"A": "1", "SPACED": "x y", "EMPTY": ""},
        mounts=[{"tag": "data", "host": str(tmp_path / "a")},
                {"tag": "seed", "host": str(tmp_path / "b"), "readonly": True}],
        disks=[{"id": "r", "host": str(files["raw"]), "format": "raw", "readonly": True},
               {"id": "q", "host": str(files["qcow2"]), "format": "qcow2"},
               {"id": "v", "host": str(files["vmdk"]), "format": "vmdk"}],
        log_level=3)
    w = workers.start(spec, log=log)
    assert w.status_line() == "entering"
    assert w.wait() == 0
    # One argument with a space, one empty. At log level 3 the worker also says what the
    # guest's init did, as far as it got before the run ended.
    lines = w.output().splitlines()
    said = [ln for ln in lines if ln.startswith("msbd-worker: control channel: ")]
    assert [ln for ln in lines if ln not in said] == ["zero:2:7:0"]
    init = "msbd-worker: control channel: the guest's init "
    assert said == [f"{init}connected", f"{init}says 'started'", f"{init}says 'exit 0'"][
        :len(said)]
    calls = vm_records(w.calls())
    # Host files go to libkrun as the files the worker opened (/proc/self/fd/N).
    expected = [
        {"fn": "krun_set_log_level", "level": 3, "ret": 0},
        {"fn": "krun_create_ctx", "ret": 0},
        {"fn": "krun_set_vm_config", "ctx": 0, "num_vcpus": 3, "ram_mib": 320, "ret": 0},
        # No network by default: a vsock device without TSI, and an empty port map.
        {"fn": "krun_disable_implicit_vsock", "ctx": 0, "ret": 0},
        {"fn": "krun_add_vsock", "ctx": 0, "tsi_features": 0, "ret": 0},
        {"fn": "krun_set_port_map", "ctx": 0, "port_map": [], "ret": 0},
        {"fn": "krun_set_root", "ctx": 0, "root_path": "<fd>/", "ret": 0},
        {"fn": "krun_add_virtiofs", "ctx": 0, "tag": "data", "path": "<fd>/", "ret": 0},
        {"fn": "krun_add_virtiofs3", "ctx": 0, "tag": "seed", "path": "<fd>/",
         "shm_size": 0, "read_only": True, "ret": 0},
        {"fn": "krun_add_disk2", "ctx": 0, "block_id": "r", "disk_path": "<fd>",
         "disk_format": 0, "read_only": True, "ret": 0},
        {"fn": "krun_add_disk2", "ctx": 0, "block_id": "q", "disk_path": "<fd>",
         "disk_format": 1, "read_only": False, "ret": 0},
        {"fn": "krun_add_disk2", "ctx": 0, "block_id": "v", "disk_path": "<fd>",
         "disk_format": 2, "read_only": False, "ret": 0},
        {"fn": "krun_set_workdir", "ctx": 0, "workdir": "/work", "ret": 0},
        # The control channel: the guest's port 7097 leads to the worker's socket.
        {"fn": "krun_add_vsock_port2", "ctx": 0, "port": 7097, "filepath": "<socket>",
         "listen": False, "ret": 0},
        # argv is what follows the program; msbd's own variables come after the spec's.
        {"fn": "krun_set_exec", "ctx": 0, "exec_path": "/bin/sh",
         "argv": ["-c", "echo $0:$#:${#1}:${#2}", "zero", "one two", ""],
         "envp": ["A=1", "SPACED=x y", "EMPTY=", *MSBD_ENV], "ret": 0},
    ]
    [vsock] = [c for c in calls if c["fn"] == "krun_add_vsock_port2"]
    assert CONTROL_SOCKET.match(vsock["filepath"]), vsock
    vsock["filepath"] = "<socket>"
    assert [{k: by_fd(v) for k, v in c.items()} for c in calls[:15]] == expected
    assert [c["fn"] for c in calls[15:]] == [
        "open_disk", "open_disk", "open_disk", "krun_start_enter",
        "open_dir", "open_dir", "open_dir", "child", "exit"]
    # The test double opened what the worker had opened, the way libkrun does.
    disks = {c["block_id"]: c for c in calls if c["fn"] == "krun_add_disk2"}
    for opened in calls[15:18]:
        assert opened["path"] == disks[opened["block_id"]]["disk_path"] and opened["ok"]
    assert [bytes.fromhex(c["head"])[:4] for c in calls[15:18]] == [
        b"RAW!", b"QFI\xfb", ZERO_VMDK[:4]]
    assert [(c["tag"], c["ok"], c["directory"]) for c in calls[19:22]] == [
        ("/dev/root", True, True), ("data", True, True), ("seed", True, True)]
    child = calls[22]
    assert (child["chroot"], child["cwd"], child["exec"]) == (
        os.geteuid() == 0, "/work", "/bin/sh")  # the double chroots only as root (README)
    assert by_fd(child["root"]) == "<fd>/"


def test_entering_is_sent_before_the_workload_runs(
        workers: Workers, make_spec: Callable[..., bytes], log: Path) -> None:
    # Status pipe and console share one pipe here, so their order on it is the true order.
    w = workers.start(make_spec(exec="/bin/echo", args=["workload ran"]), log=log,
              shared_status_console=True)
    assert w.wait() == 0
    assert w.output() == "entering\nworkload ran\n"


def test_spec_through_a_pipe_instead_of_a_memfd(
        workers: Workers, make_spec: Callable[..., bytes], log: Path) -> None:
    spec_fd = pipe_with(make_spec(exec="/bin/echo", args=["via pipe"]))
    try:
        w = workers.start(None, log=log, fds={96: spec_fd})
        assert w.wait() == 0
    finally:
        os.close(spec_fd)
    assert w.output() == "via pipe\n"


@pytest.mark.parametrize(("spec", "message"), [
    (b"{not json", "msbd-worker: spec: spec is not valid JSON: "),
    (b'{"name": "t", "exec": "/bin/true"}',
     "msbd-worker: spec: exactly one of `rootfs` and `root_disk` is required"),
    (b'{"name": "t", "exec": "/bin/true", "rootfs": "/", "vcpus": 0}',
     "msbd-worker: spec: invalid spec: Expected `int` >= 1 - at `$.vcpus`"),
    (b'{"name": "t", "exec": "/bin/true", "rootfs": "/", "surprise": 1}',
     "msbd-worker: spec: invalid spec: Object contains unknown field `surprise`"),
])
def test_bad_spec_exits_2(workers: Workers, log: Path, spec: bytes, message: str) -> None:
    w = workers.start(spec, log=log)
    assert w.wait() == 2
    out = w.output()
    assert out.startswith(message) and out.count("\n") == 1
    assert w.status_lines() == [f"error {out.removeprefix('msbd-worker: ').rstrip()}"]
    assert not log.exists()


# --- failures in libkrun -------------------------------------------------------------

CONFIGURING = ["krun_set_log_level", "krun_create_ctx", "krun_set_vm_config",
               "krun_disable_implicit_vsock", "krun_add_vsock", "krun_set_port_map",
               "krun_set_rlimits", "krun_set_root",
               "krun_add_virtiofs", "krun_add_virtiofs3", "krun_add_disk2", "krun_set_workdir",
               "krun_add_vsock_port2", "krun_set_exec"]


@pytest.mark.parametrize("symbol", CONFIGURING)
def test_configuring_call_failure_exits_4(workers: Workers, make_spec: Callable[..., bytes],
                                          log: Path, tmp_path: Path, symbol: str) -> None:
    (tmp_path / "d.raw").write_bytes(b"\0" * 512)
    tmpdir = tmp_path / "tmpdir"  # where the worker makes its control channel's directory
    tmpdir.mkdir()
    spec = make_spec(workdir="/work", rlimits={"nofile": 64},
                     mounts=[{"tag": "rw", "host": str(tmp_path)},
                             {"tag": "ro", "host": str(tmp_path), "readonly": True}],
                     disks=[{"id": "d", "host": str(tmp_path / "d.raw"), "format": "raw"}])
    w = workers.start(spec, log=log, env={"FAKEKRUN_FAIL": f"{symbol}:5",
                                          "TMPDIR": str(tmpdir)})
    assert w.wait() == 4
    message = f"{symbol} failed: Input/output error (errno 5)"
    assert w.status_lines() == [f"error {message}"]
    assert w.output() == f"msbd-worker: {message}\n"
    fns = [c["fn"] for c in w.calls()]
    assert fns[-1] == symbol and "krun_start_enter" not in fns
    assert list(tmpdir.iterdir()) == []  # the control channel's directory is gone again


def test_control_channel_that_cannot_be_made_exits_4(
        workers: Workers, make_spec: Callable[..., bytes], log: Path, tmp_path: Path) -> None:
    missing = tmp_path / "no-such-dir"
    w = workers.start(make_spec(), log=log, env={"TMPDIR": str(missing)})
    assert w.wait() == 4
    [line] = w.status_lines()
    assert line.startswith("error cannot create the control channel: ") and str(missing) in line
    assert w.calls() == []  # before any libkrun call


def test_krun_start_enter_returning_exits_5(workers: Workers,
                                            make_spec: Callable[..., bytes], log: Path) -> None:
    w = workers.start(make_spec(), log=log, env={"FAKEKRUN_FAIL": "krun_start_enter:22"})
    assert w.wait() == 5
    message = "krun_start_enter failed: Invalid argument (errno 22)"
    assert w.status_lines() == ["entering", f"error {message}"]
    assert w.output() == f"msbd-worker: {message}\n"


def test_root_disk_is_the_first_disk_and_remounted_as_the_root(
        workers: Workers, make_spec: Callable[..., bytes], log: Path, tmp_path: Path) -> None:
    files = disk_files(tmp_path)
    spec = make_spec(rootfs=None, root_disk={"path": str(files["qcow2"]), "format": "qcow2",
                                             "readonly": True},
                     disks=[{"id": "r", "host": str(files["raw"]), "format": "raw"}])
    w = workers.start(spec, log=log)
    # The test double cannot boot a disk image: it says so where libkrun would start.
    assert w.wait() == 5
    assert w.status_lines() == [
        "entering", "error krun_start_enter failed: Operation not supported (errno 95)"]
    root = w.calls_named("krun_add_disk2", "krun_set_root", "krun_set_root_disk_remount")
    # The root disk first, so the guest has it as /dev/vda, which its init mounts.
    assert [{k: by_fd(v) for k, v in c.items()} for c in root] == [
        {"fn": "krun_add_disk2", "ctx": 0, "block_id": "root", "disk_path": "<fd>",
         "disk_format": 1, "read_only": True, "ret": 0},
        {"fn": "krun_set_root_disk_remount", "ctx": 0, "device": "/dev/vda", "fstype": "auto",
         "options": None, "ret": 0},
        {"fn": "krun_add_disk2", "ctx": 0, "block_id": "r", "disk_path": "<fd>",
         "disk_format": 0, "read_only": False, "ret": 0}]
    opened = w.calls_named("open_disk")  # opened, like libkrun, before it gives up
    assert [(c["path"], c["ok"]) for c in opened] == [
        (root[0]["disk_path"], True), (root[2]["disk_path"], True)]


def test_a_libkrun_without_root_disk_remount_cannot_boot_a_root_disk(
        workers: Workers, make_spec: Callable[..., bytes], log: Path, tmp_path: Path,
        fakekrun_old: Path) -> None:
    image = disk_files(tmp_path)["raw"]
    spec = make_spec(rootfs=None, libkrun=str(fakekrun_old),
                     root_disk={"path": str(image), "format": "raw"})
    w = workers.start(spec, log=log)
    assert w.wait() == 4
    message = (f"krun_set_root_disk_remount failed: not in this libkrun ({fakekrun_old}), "
               "so it cannot boot a root disk (errno 38)")
    assert w.status_lines() == [f"error {message}"]
    assert w.output() == f"msbd-worker: {message}\n"
    assert [c["fn"] for c in w.calls()][-1] == "krun_add_disk2"


def test_library_not_found_exits_3_and_names_every_place(
        workers: Workers, make_spec: Callable[..., bytes], log: Path) -> None:
    spec = make_spec(libkrun="/nonexistent/libkrun-setting.so")
    w = workers.start(spec, log=log, env={"MSBD_LIBKRUN": "/nonexistent/libkrun-env.so"})
    assert w.wait() == 3
    out = w.output()
    assert out.count("\n") == 1 and out.startswith("msbd-worker: libkrun not loadable; tried: ")
    for place in ("/nonexistent/libkrun-setting.so (the daemon's libkrun setting)",
                  "/nonexistent/libkrun-env.so ($MSBD_LIBKRUN)", "libkrun.so.1 (the soname)"):
        assert place in out
    [line] = w.status_lines()
    assert line.startswith("error libkrun not loadable; tried: ")


def test_msbd_libkrun_is_used_when_the_spec_names_none(
        workers: Workers, make_spec: Callable[..., bytes], log: Path,
        fakekrun: Path) -> None:
    spec = make_spec(libkrun=None, exec="/bin/echo", args=["found"])
    w = workers.start(spec, log=log, env={"MSBD_LIBKRUN": str(fakekrun)})
    assert w.wait() == 0
    assert w.output() == "found\n"


# --- the workload's fate becomes the worker's --------------------------------------------


@pytest.mark.parametrize(("exec_path", "args", "status"), [
    ("/bin/sh", ["-c", "exit 7"], 7),
    ("/bin/true", [], 0),
    ("/bin/false", [], 1),
    ("/no/such/program", [], 127),
    ("/etc", [], 126),
])
def test_workload_exit_status_is_the_workers(workers: Workers,
                                             make_spec: Callable[..., bytes], log: Path,
                                             exec_path: str, args: list[str],
                                             status: int) -> None:
    w = workers.start(make_spec(exec=exec_path, args=args), log=log)
    assert w.wait() == status
    assert w.status_lines() == ["entering"]


def test_guest_env_is_exactly_the_specs(workers: Workers, make_spec: Callable[..., bytes],
                                        log: Path) -> None:
    env = {"A": "1", "PATH": "/bin", "EMPTY": "", "QUOTED": "'$x `y` \\n;"}
    w = workers.start(make_spec(exec="/bin/env", env=env), log=log,
              env={"LEAK_ME_NOT": "daemon secret"})
    assert w.wait() == 0
    # msbd's own MSBD_* entries went to libkrun, but the guest's init keeps them.
    assert sorted(w.output().splitlines()) == sorted(f"{k}={v}" for k, v in env.items())
    [call] = w.calls_named("krun_set_exec")
    assert call["envp"] == [f"{k}={v}" for k, v in env.items()] + MSBD_ENV


def test_an_empty_env_reaches_the_guest_empty(workers: Workers,
                                              make_spec: Callable[..., bytes],
                                              log: Path) -> None:
    w = workers.start(make_spec(exec="/bin/env", shutdown_grace=2.5), log=log)
    assert w.wait() == 0
    assert w.output() == ""
    [call] = w.calls_named("krun_set_exec")  # an explicit array, never NULL
    assert call["argv"] == [] and call["envp"] == ["MSBD_CONTROL_PORT=7097",
                                                   "MSBD_STOP_GRACE=2.5"]


@pytest.mark.parametrize(("field", "value", "message"), [
    ("args", ["-c", 'echo "hi"'],
     '`args[1]` contains a double quote ("): libkrun passes each argument'),
    ("args", ["a\tb"], "`args[0]` contains the control character '\\t'"),
    ("env", {"A": "caf\u00e9"}, "`env.A` contains 'é' (U+00E9), which is not ASCII"),
    ("env", {"MSBD_CONTROL_PORT": "1"}, "`env.MSBD_CONTROL_PORT`: names starting with KRUN_"),
    ("workdir", "/my dir", "`workdir` contains a space: libkrun passes it"),
])
def test_what_the_guest_command_line_cannot_carry_exits_2(
        workers: Workers, log: Path, busybox_root: Path, fakekrun: Path, field: str,
        value: object, message: str) -> None:
    spec = json.dumps({"name": "t", "rootfs": str(busybox_root), "exec": "/bin/true",
                       "libkrun": str(fakekrun), field: value}).encode()
    w = workers.start(spec, log=log)
    assert w.wait() == 2
    [line] = w.status_lines()
    assert line.startswith(f"error spec: {message}"), line
    assert not log.exists()


# --- fd hygiene -------------------------------------------------------------------------


def test_only_allowed_fds_reach_libkrun_and_only_stdio_reaches_the_guest(
        workers: Workers, make_spec: Callable[..., bytes], log: Path) -> None:
    leak_r, leak_w = os.pipe()
    try:
        # The "daemon" leaks two inheritable fds, below and above the 96-98 block.
        w = workers.start(make_spec(), log=log, fds={50: leak_r, 120: leak_w})
        assert w.wait() == 0
    finally:
        os.close(leak_r)
        os.close(leak_w)
    [root_call] = w.calls_named("krun_set_root")
    root_match = FD_NAME.match(root_call["root_path"])
    assert root_match is not None  # the root directory the worker opened, and nothing else
    [enter] = w.calls_named("krun_start_enter")
    # The control channel: its listening socket, and the O_PATH fd libkrun connects through.
    [vsock] = w.calls_named("krun_add_vsock_port2")
    assert len(enter["sockets"]) == 2 and int(vsock["filepath"].split("/")[-1]) in enter["sockets"]
    assert sorted(enter["fds"]) == sorted([0, 1, 2, int(root_match.group(1)), 97, 98,
                                           *enter["sockets"]])
    [child] = w.calls_named("child")
    assert child["fds"] == [0, 1, 2]


# --- manual entry points -----------------------------------------------------------------


def test_spec_file_and_command_line_disks(workers: Workers, make_spec: Callable[..., bytes],
                                         log: Path, tmp_path: Path) -> None:
    files = disk_files(tmp_path)
    spec_file = tmp_path / "spec.json"
    spec_file.write_bytes(make_spec(disks=[{"id": "a", "host": str(files["raw"]),
                                            "format": "raw"}]))
    w = workers.start(None, log=log, fds={96: None},
              args=["--spec-file", str(spec_file), "--disk", f"a:{files['qcow2']}:qcow2:ro",
                    "--disk", f"b:{files['vmdk']}:vmdk", "--mount", f"m:{tmp_path}"])
    assert w.wait() == 0
    disks = [(c["block_id"], by_fd(c["disk_path"]), c["disk_format"], c["read_only"])
             for c in w.calls_named("krun_add_disk2")]
    assert disks == [("a", "<fd>", 1, True), ("b", "<fd>", 2, False)]
    opened = [bytes.fromhex(c["head"])[:4] for c in w.calls_named("open_disk")]
    assert opened == [b"QFI\xfb", ZERO_VMDK[:4]]  # the override replaced the raw disk
    assert [c["tag"] for c in w.calls_named("krun_add_virtiofs")] == ["m"]


def test_bad_command_line_disk_exits_2(workers: Workers, make_spec: Callable[..., bytes],
                                      log: Path, tmp_path: Path) -> None:
    spec_file = tmp_path / "spec.json"
    spec_file.write_bytes(make_spec())
    w = workers.start(None, log=log, fds={96: None},
              args=["--spec-file", str(spec_file), "--disk", "id:/host:raw:rw"])
    assert w.wait() == 2
    assert w.output() == ("msbd-worker: spec: invalid --disk entry with unknown flag 'rw' "
                          "(expected 'ro'): 'id:/host:raw:rw'\n")
    assert not log.exists()
