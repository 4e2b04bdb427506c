"""krun.py against the libkrun test double, in process (never krun_start_enter here)."""

from __future__ import annotations

import ctypes
import errno
import json
import os
from pathlib import Path
from typing import Any

import pytest

from msbd.errors import KrunError, LibraryNotLoadable
from msbd.model import DiskFormat
from msbd.vm import krun


@pytest.fixture
def lib(fakekrun: Path) -> krun.Krun:
    return krun.load(str(fakekrun), environ={})


@pytest.fixture
def log(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "calls.jsonl"
    monkeypatch.setenv("FAKEKRUN_LOG", str(path))
    return path


def records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize(("configured", "env", "expected"), [
    (None, {}, [("the soname", "libkrun.so.1")]),
    ("/a.so", {}, [("the daemon's libkrun setting", "/a.so"), ("the soname", "libkrun.so.1")]),
    (None, {"MSBD_LIBKRUN": "/b.so"}, [("$MSBD_LIBKRUN", "/b.so"),
                                       ("the soname", "libkrun.so.1")]),
    ("/a.so", {"MSBD_LIBKRUN": "/b.so"}, [("the daemon's libkrun setting", "/a.so"),
                                          ("$MSBD_LIBKRUN", "/b.so"),
                                          ("the soname", "libkrun.so.1")]),
    (None, {"MSBD_LIBKRUN": ""}, [("the soname", "libkrun.so.1")]),
])
def test_lookup_order(configured: str | None, env: dict[str, str],
                      expected: list[tuple[str, str]]) -> None:
    assert krun.candidates(configured, env) == expected


def test_setting_wins_over_env(fakekrun: Path) -> None:
    lib = krun.load(str(fakekrun), environ={"MSBD_LIBKRUN": "/nonexistent.so"})
    assert lib.path == str(fakekrun)
    assert lib.test_double


def test_not_loadable_names_each_try() -> None:
    not_krun = "libm.so.6"  # loads fine, but is no libkrun
    with pytest.raises(LibraryNotLoadable) as info:
        krun.load("/nonexistent/libkrun.so", environ={"MSBD_LIBKRUN": str(not_krun)})
    tried = info.value.tried
    assert len(tried) == 3
    assert tried[0].startswith("/nonexistent/libkrun.so (the daemon's libkrun setting): ")
    assert tried[1].startswith(f"{not_krun} ($MSBD_LIBKRUN): not a usable libkrun, lacks "
                               "krun_set_log_level, krun_create_ctx")
    assert tried[2].startswith("libkrun.so.1 (the soname): ")


@pytest.mark.parametrize("code", [errno.EINVAL, errno.ENOENT, errno.EPERM, errno.ENOMEM])
def test_negative_return_becomes_krun_error(lib: krun.Krun, log: Path,
                                            monkeypatch: pytest.MonkeyPatch, code: int) -> None:
    monkeypatch.setenv("FAKEKRUN_FAIL", f"krun_set_vm_config:{code}")
    ctx = lib.create_ctx()
    with pytest.raises(KrunError) as info:
        lib.set_vm_config(ctx, 1, 64)
    assert (info.value.symbol, info.value.errno) == ("krun_set_vm_config", code)
    assert str(info.value) == f"krun_set_vm_config failed: {os.strerror(code)} (errno {code})"


def test_unknown_context_is_an_error_from_the_library(lib: krun.Krun, log: Path) -> None:
    with pytest.raises(KrunError) as info:
        lib.set_root(10_000, "/")
    assert info.value.errno == errno.ENOENT


def test_string_arrays_are_explicit_and_null_terminated(lib: krun.Krun, log: Path) -> None:
    ctx = lib.create_ctx()
    lib.set_exec(ctx, "/bin/x", [], [])
    lib.set_exec(ctx, "/bin/x", ["a", "b c", "ü"], ["K=v", "E="])
    execs = [r for r in records(log) if r["fn"] == "krun_set_exec"]
    assert [(r["argv"], r["envp"]) for r in execs] == [
        ([], []), (["a", "b c", "ü"], ["K=v", "E="])]


def test_uint8_vcpus_and_formats_reach_the_library(lib: krun.Krun, log: Path) -> None:
    ctx = lib.create_ctx()
    lib.set_vm_config(ctx, 255, 1024 * 1024)
    for fmt in DiskFormat:
        lib.add_disk(ctx, fmt.value, f"/{fmt.value}", fmt, readonly=fmt is DiskFormat.RAW)
    got = records(log)
    assert got[1]["num_vcpus"] == 255 and got[1]["ram_mib"] == 1024 * 1024
    assert [(r["block_id"], r["disk_format"], r["read_only"]) for r in got[2:]] == [
        ("raw", 0, True), ("qcow2", 1, False), ("vmdk", 2, False)]


def test_like_libkrun_on_linux_there_is_no_shutdown_eventfd(lib: krun.Krun, log: Path) -> None:
    ctx = lib.create_ctx()
    assert not lib.has("krun_get_shutdown_eventfd")
    assert lib.shutdown_eventfd(ctx) is None
    assert [r["fn"] for r in records(log)] == ["krun_create_ctx"]


def test_vsock_ports_map_while_a_vsock_device_is_to_exist(lib: krun.Krun, log: Path) -> None:
    """The test double refuses what libkrun refuses: no mapping without a vsock device,
    krun_add_vsock only after the implicit one is disabled."""
    ctx = lib.create_ctx()
    lib.map_vsock_port(ctx, 7097, "/proc/self/fd/9")
    other = lib.create_ctx()
    fn = ctypes.CDLL(lib.path)
    assert fn.krun_add_vsock(other, 1) == -errno.EEXIST  # the implicit device is there
    assert fn.krun_disable_implicit_vsock(other) == 0
    with pytest.raises(KrunError) as info:
        lib.map_vsock_port(other, 7097, "/x")
    assert info.value.errno == errno.ENODEV
    assert fn.krun_add_vsock(other, 4) == -errno.EINVAL  # an unknown TSI flag
    assert fn.krun_add_vsock(other, 0) == 0
    lib.map_vsock_port(other, 7097, "/x")
    assert [(r["fn"], r.get("port"), r.get("listen"), r["ret"]) for r in records(log)
            if r["fn"] not in ("krun_create_ctx",)] == [
        ("krun_add_vsock_port2", 7097, False, 0),
        ("krun_add_vsock", None, None, -errno.EEXIST),
        ("krun_disable_implicit_vsock", None, None, 0),
        ("krun_add_vsock_port2", 7097, False, -errno.ENODEV),
        ("krun_add_vsock", None, None, -errno.EINVAL),
        ("krun_add_vsock", None, None, 0),
        ("krun_add_vsock_port2", 7097, False, 0)]


def test_root_disk_remount_needs_a_disk_and_no_root_directory(lib: krun.Krun,
                                                              log: Path) -> None:
    ctx = lib.create_ctx()
    with pytest.raises(KrunError) as info:
        lib.set_root_disk_remount(ctx, "/dev/vda", "auto", None)  # no disk yet
    assert info.value.errno == errno.EINVAL
    lib.add_disk(ctx, "root", "/r.img", DiskFormat.RAW, readonly=True)
    lib.set_root_disk_remount(ctx, "/dev/vda", "ext4", "noatime")
    with_root = lib.create_ctx()
    lib.set_root(with_root, "/")
    lib.add_disk(with_root, "root", "/r.img", DiskFormat.RAW, readonly=True)
    with pytest.raises(KrunError):
        lib.set_root_disk_remount(with_root, "/dev/vda", None, None)
    got = [(r["ctx"], r["device"], r["fstype"], r["options"], r["ret"]) for r in records(log)
           if r["fn"] == "krun_set_root_disk_remount"]
    assert got == [(ctx, "/dev/vda", "auto", None, -errno.EINVAL),
                   (ctx, "/dev/vda", "ext4", "noatime", 0),
                   (with_root, "/dev/vda", None, None, -errno.EINVAL)]


def test_an_older_libkrun_lacks_the_newer_calls(fakekrun_old: Path, log: Path) -> None:
    old = krun.load(str(fakekrun_old), environ={})
    assert not old.has("krun_add_vsock_port2") and not old.has("krun_set_root_disk_remount")
    ctx = old.create_ctx()
    with pytest.raises(KrunError) as info:
        old.set_root_disk_remount(ctx, "/dev/vda", "auto", None)
    assert info.value.errno == errno.ENOSYS
    assert "so it cannot boot a root disk" in str(info.value)


@pytest.mark.parametrize(("port_map", "err"), [
    (["8080:80", "8081:81"], 0),
    (["8080:80", "8080:81"], errno.EINVAL),  # a host port twice
    (["8080:80", "8081:80"], errno.EINVAL),  # a guest port twice
    (["8080"], errno.EINVAL),
    (["70000:80"], errno.EINVAL),
    (["x:80"], errno.EINVAL),
])
def test_the_port_map_is_checked_as_libkrun_does(lib: krun.Krun, port_map: list[str],
                                                 err: int) -> None:
    ctx = lib.create_ctx()
    if not err:
        lib.set_network(ctx, 1, port_map)
        return
    with pytest.raises(KrunError) as exc:
        lib.set_network(ctx, 1, port_map)
    assert (exc.value.symbol, exc.value.errno) == ("krun_set_port_map", err)


def test_a_port_map_without_a_vsock_device_is_refused(lib: krun.Krun) -> None:
    ctx = lib.create_ctx()
    lib._call("krun_disable_implicit_vsock", ctx)
    with pytest.raises(KrunError) as exc:
        lib._call("krun_set_port_map", ctx, krun._strv([]))
    assert exc.value.errno == errno.ENODEV
