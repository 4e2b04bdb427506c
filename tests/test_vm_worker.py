"""The worker as the daemon sees it: real processes, real pipes, the libkrun test double."""

from __future__ import annotations

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
    STATUS_FD,
    WATCHDOG_FD,
    Workers,
    pipe_with,
)


@pytest.fixture
def log(tmp_path: Path) -> Path:
    return tmp_path / "fakekrun.jsonl"


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
        args=["-c", 'echo "$0|$1|$2"', "zero", "one two", ""],
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
    assert w.output() == "zero|one two|\n"
    calls = w.calls()
    [eventfd] = [c["ret"] for c in calls if c["fn"] == "krun_get_shutdown_eventfd"]
    # Host files go to libkrun as the files the worker opened (/proc/self/fd/N).
    expected = [
        {"fn": "krun_set_log_level", "level": 3, "ret": 0},
        {"fn": "krun_create_ctx", "ret": 0},
        {"fn": "krun_set_vm_config", "ctx": 0, "num_vcpus": 3, "ram_mib": 320, "ret": 0},
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
        {"fn": "krun_get_shutdown_eventfd", "ctx": 0, "ret": eventfd},
    ]
    # krun_set_exec comes right before the eventfd call; argv is what follows the program.
    exec_call = {"fn": "krun_set_exec", "ctx": 0, "exec_path": "/bin/sh",
                 "argv": ["-c", 'echo "$0|$1|$2"', "zero", "one two", ""],
                 "envp": ["A=1", "SPACED=x y", "EMPTY="], "ret": 0}
    expected.insert(10, exec_call)
    assert [{k: by_fd(v) for k, v in c.items()} for c in calls[:12]] == expected
    assert isinstance(eventfd, int) and eventfd > 2
    assert [c["fn"] for c in calls[12:]] == [
        "open_disk", "open_disk", "open_disk", "krun_start_enter",
        "open_dir", "open_dir", "open_dir", "child", "exit"]
    # The test double opened what the worker had opened, the way libkrun does.
    disks = {c["block_id"]: c for c in calls if c["fn"] == "krun_add_disk2"}
    for opened in calls[12:15]:
        assert opened["path"] == disks[opened["block_id"]]["disk_path"] and opened["ok"]
    assert [bytes.fromhex(c["head"])[:4] for c in calls[12:15]] == [
        b"RAW!", b"QFI\xfb", ZERO_VMDK[:4]]
    assert [(c["tag"], c["ok"], c["directory"]) for c in calls[16:19]] == [
        ("/dev/root", True, True), ("data", True, True), ("seed", True, True)]
    child = calls[19]
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

CONFIGURING = ["krun_set_log_level", "krun_create_ctx", "krun_set_vm_config", "krun_set_root",
               "krun_add_virtiofs", "krun_add_virtiofs3", "krun_add_disk2", "krun_set_workdir",
               "krun_set_exec", "krun_get_shutdown_eventfd"]


@pytest.mark.parametrize("symbol", CONFIGURING)
def test_configuring_call_failure_exits_4(workers: Workers, make_spec: Callable[..., bytes],
                                          log: Path, tmp_path: Path, symbol: str) -> None:
    (tmp_path / "d.raw").write_bytes(b"\0" * 512)
    spec = make_spec(workdir="/work",
                     mounts=[{"tag": "rw", "host": str(tmp_path)},
                             {"tag": "ro", "host": str(tmp_path), "readonly": True}],
                     disks=[{"id": "d", "host": str(tmp_path / "d.raw"), "format": "raw"}])
    w = workers.start(spec, log=log, env={"FAKEKRUN_FAIL": f"{symbol}:5"})
    assert w.wait() == 4
    message = f"{symbol} failed: Input/output error (errno 5)"
    assert w.status_lines() == [f"error {message}"]
    assert w.output() == f"msbd-worker: {message}\n"
    fns = [c["fn"] for c in w.calls()]
    assert fns[-1] == symbol and "krun_start_enter" not in fns


def test_krun_start_enter_returning_exits_5(workers: Workers,
                                            make_spec: Callable[..., bytes], log: Path) -> None:
    w = workers.start(make_spec(), log=log, env={"FAKEKRUN_FAIL": "krun_start_enter:22"})
    assert w.wait() == 5
    message = "krun_start_enter failed: Invalid argument (errno 22)"
    assert w.status_lines() == ["entering", f"error {message}"]
    assert w.output() == f"msbd-worker: {message}\n"


def test_root_disk_is_configured_but_the_test_double_cannot_boot_it(
        workers: Workers, make_spec: Callable[..., bytes], log: Path, tmp_path: Path) -> None:
    image = disk_files(tmp_path)["qcow2"]
    spec = make_spec(rootfs=None, root_disk={"path": str(image), "format": "qcow2",
                                             "readonly": True})
    w = workers.start(spec, log=log)
    assert w.wait() == 5
    assert w.status_lines() == [
        "entering", "error krun_start_enter failed: Operation not supported (errno 95)"]
    root = w.calls_named("krun_add_disk2", "krun_set_root")
    assert [{k: by_fd(v) for k, v in c.items()} for c in root] == [
        {"fn": "krun_add_disk2", "ctx": 0, "block_id": "root", "disk_path": "<fd>",
         "disk_format": 1, "read_only": True, "ret": 0}]
    [opened] = w.calls_named("open_disk")  # opened, like libkrun, before it gives up
    assert (opened["path"], opened["ok"]) == (root[0]["disk_path"], True)


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
    env = {"A": "1", "PATH": "/bin", "EMPTY": "", "QUOTED": "'\"$x"}
    w = workers.start(make_spec(exec="/bin/env", env=env), log=log,
              env={"LEAK_ME_NOT": "daemon secret"})
    assert w.wait() == 0
    assert sorted(w.output().splitlines()) == sorted(f"{k}={v}" for k, v in env.items())


def test_an_empty_env_is_passed_as_an_empty_array(workers: Workers,
                                                  make_spec: Callable[..., bytes],
                                                  log: Path) -> None:
    w = workers.start(make_spec(exec="/bin/env"), log=log)
    assert w.wait() == 0
    assert w.output() == ""
    [call] = w.calls_named("krun_set_exec")
    assert call["argv"] == [] and call["envp"] == []


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
    [eventfd_call] = w.calls_named("krun_get_shutdown_eventfd")
    [root_call] = w.calls_named("krun_set_root")
    root_match = FD_NAME.match(root_call["root_path"])
    assert root_match is not None  # the root directory the worker opened, and nothing else
    [enter] = w.calls_named("krun_start_enter")
    assert sorted(enter["fds"]) == sorted([0, 1, 2, int(root_match.group(1)), 97, 98,
                                           eventfd_call["ret"]])
    [child] = w.calls_named("child")
    assert child["fds"] == [0, 1, 2]


# --- manual entry points -----------------------------------------------------------------


def test_spec_file_and_seed_syntax_disks(workers: Workers, make_spec: Callable[..., bytes],
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


def test_bad_seed_syntax_disk_exits_2(workers: Workers, make_spec: Callable[..., bytes],
                                      log: Path, tmp_path: Path) -> None:
    spec_file = tmp_path / "spec.json"
    spec_file.write_bytes(make_spec())
    w = workers.start(None, log=log, fds={96: None},
              args=["--spec-file", str(spec_file), "--disk", "id:/host:raw:rw"])
    assert w.wait() == 2
    assert w.output() == ("msbd-worker: spec: invalid --disk entry with unknown flag 'rw' "
                          "(expected 'ro'): 'id:/host:raw:rw'\n")
    assert not log.exists()
