"""Real microVMs: msbd with the real libkrun (`make libkrun`) on a KVM that boots a kernel.

Run with `pytest -m vm` (`make test` does, through `scripts/nested-kvm` on hosts
whose own KVM cannot boot a guest). They are not skipped when the host cannot
run them: each fails and says why, since a skipped real-VM test is not a pass.
`MSBD_TEST_LIBKRUN` names the libkrun.so.1 to use (the lane sets it).

Every test asserts on what the guest did: its console output, files it
wrote on the host, its exit code. Guests boot from a busybox root directory
unless a test says otherwise.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from daemonproc import DaemonProc, waiting_for_spec
from tenants import B, ok, refused
from workerproc import Workers, spec_bytes

from msbd.errors import RemoteError, RpcCode
from msbd.vm import doctor

pytestmark = pytest.mark.vm

GUEST_WAIT = 240.0  # a guest's whole life under nested TCG: boot, run, shut down


def why_no_real_vm() -> str | None:
    """Why this host cannot run real guests, or None when it can."""
    why: list[str] = []
    lib = os.environ.get("MSBD_TEST_LIBKRUN")
    if not lib:
        why.append("MSBD_TEST_LIBKRUN does not name a libkrun.so.1 (make libkrun prints "
                   "its directory)")
    elif not Path(lib).is_file():
        why.append(f"MSBD_TEST_LIBKRUN={lib} does not exist")
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        cpuinfo = ""
    if not doctor.virt_flags(cpuinfo):
        why.append("no hardware virtualization (vmx/svm) in /proc/cpuinfo")
    if not doctor.check_kvm_device().ok:
        why.append("/dev/kvm is missing or not read/write")
    elif doctor.pvm_loaded():
        why.append("/dev/kvm is kvm_pvm, which cannot boot a guest kernel "
                   "(run these through scripts/nested-kvm)")
    return "; ".join(why) or None


@pytest.fixture(scope="module")
def real_libkrun() -> str:
    if reason := why_no_real_vm():
        pytest.fail(f"cannot run real guests here: {reason}", pytrace=False)
    return os.environ["MSBD_TEST_LIBKRUN"]


@pytest.fixture(scope="module")
def vm_root(busybox_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A busybox root for guests (root-owned, world-searchable)."""
    root = tmp_path_factory.mktemp("vmroot") / "root"
    shutil.copytree(busybox_root, root, symlinks=True)
    for d in ("sys", "mnt", "run"):
        (root / d).mkdir(exist_ok=True)
    os.chmod(root.parent, 0o755)
    return root


def guest(name: str, root: Path, script: str, **extra: Any) -> dict[str, Any]:
    """A launch spec running `script` with the guest's busybox sh."""
    return {"name": name, "rootfs": str(root), "exec": "/bin/sh", "args": ["-c", script],
            "memory_mib": 256} | extra


def vm_settings(**extra: Any) -> dict[str, Any]:
    # Generous: under nested TCG the worker's heartbeat thread competes with the guest.
    return {"heartbeat_interval": 1.0, "heartbeat_misses": 60, "stop_timeout": 20.0,
            "start_timeout": 120.0, "socket_mode": 0o666} | extra


@pytest.fixture(scope="module")
def vm_daemon(real_libkrun: str) -> Iterator[DaemonProc]:
    """A daemon with the real libkrun whose socket every test uid can reach."""
    base = Path(tempfile.mkdtemp(prefix="msbd-vm-", dir="/tmp"))
    os.chmod(base, 0o755)
    d = DaemonProc(base, libkrun=Path(real_libkrun), settings=vm_settings())
    d.start()
    yield d
    d.close()
    shutil.rmtree(base, ignore_errors=True)


def finished(d: DaemonProc, name: str) -> dict[str, Any]:
    info = d.call("sandbox.wait", {"name": name, "timeout": GUEST_WAIT})
    assert info["state"] in ("stopped", "failed"), info
    return info


def output(d: DaemonProc, name: str) -> str:
    return str(d.call("sandbox.logs", {"name": name, "limit": 4 * 1024 * 1024})["data"])


def gone(pid: int) -> bool:
    return not Path(f"/proc/{pid}").exists()


def wait_for(fact: Callable[[], bool], what: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not fact():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)  # a fact outside the daemon (a pid); noqa: sleep-ok


# --- the worker alone ------------------------------------------------------------------


def test_the_worker_alone_runs_a_guest_to_its_exit_code(
        real_libkrun: str, vm_root: Path, workers: Workers) -> None:
    spec = spec_bytes(name="real", rootfs=str(vm_root), exec="/bin/sh",
                      args=["-c", "echo hello from the guest; exit 7"], libkrun=real_libkrun)
    w = workers.start(spec)
    assert w.status_line(120) == "entering"
    assert w.wait(GUEST_WAIT) == 7
    assert "hello from the guest" in w.output()


def test_watchdog_eof_stops_a_real_guest_in_order(
        real_libkrun: str, vm_root: Path, workers: Workers) -> None:
    spec = spec_bytes(name="real", rootfs=str(vm_root), exec="/bin/sh",
                      args=["-c", "trap 'echo got TERM; exit 42' TERM; echo up; "
                                  "while true; do sleep 1; done"],
                      libkrun=real_libkrun, shutdown_grace=60.0)
    w = workers.start(spec)
    assert w.status_line(120) == "entering"
    w.wait_output("up", GUEST_WAIT)
    w.close_watchdog()
    assert w.wait(GUEST_WAIT) == 42  # the guest's own code: it was asked, not killed
    assert "got TERM" in w.output()


# --- a whole life through the daemon ----------------------------------------------------


def test_a_guest_prints_and_exits_with_its_code(vm_daemon: DaemonProc, vm_root: Path) -> None:
    info = vm_daemon.call("sandbox.run", guest("seven", vm_root,
                                               "echo hello from $(uname -r); exit 7"))
    pid = info["run"]["pid"]
    end = finished(vm_daemon, "seven")
    assert (end["state"], end["run"]["reason"], end["run"]["exit_code"]) == \
        ("stopped", "exited", 7)
    assert "hello from" in output(vm_daemon, "seven")
    shown = subprocess.run([str(Path(vm_daemon.argv()[0]).parent / "msbctl"), "--socket",
                            str(vm_daemon.socket), "logs", "seven"],
                           capture_output=True, text=True, check=True).stdout
    assert "hello from" in shown
    assert gone(pid)
    # What is left is the warm pool: idle workers waiting for a spec (a refill may
    # still be starting), nothing of this run's; and the fork server, which forks them.
    wait_for(lambda: all(waiting_for_spec(p) for p in vm_daemon.children()),
             "the daemon's children to be idle pool workers only", timeout=120)
    assert pid not in vm_daemon.all_children()


def test_args_env_workdir_and_resources_reach_the_guest(vm_daemon: DaemonProc,
                                                        vm_root: Path) -> None:
    script = ("echo ARG0=$0 ARG1=$1; echo FOO=$FOO; echo PWD=$(pwd); echo NPROC=$(nproc); "
              "grep MemTotal /proc/meminfo")
    spec = {"name": "env", "rootfs": str(vm_root), "exec": "/bin/busybox",
            "args": ["sh", "-c", script, "first", "second arg"], "env": {"FOO": "bar baz"},
            "workdir": "/work", "vcpus": 2, "memory_mib": 300}
    vm_daemon.call("sandbox.run", spec)
    assert finished(vm_daemon, "env")["run"]["exit_code"] == 0
    out = output(vm_daemon, "env")
    assert "ARG0=first ARG1=second arg" in out
    assert "FOO=bar baz" in out
    assert "PWD=/work" in out
    assert "NPROC=2" in out
    mem_kib = int(out.split("MemTotal:")[1].split()[0])
    # The guest kernel keeps some for itself; libkrun adds a little (seen: 316816 kB).
    assert 0.75 * 300 * 1024 < mem_kib < 1.1 * 300 * 1024, out


def test_stop_and_kill_end_real_guests(vm_daemon: DaemonProc, vm_root: Path) -> None:
    for name in ("stopme", "killme"):
        vm_daemon.call("sandbox.run", guest(name, vm_root, "echo up; exec sleep 600"))
    for name in ("stopme", "killme"):
        vm_daemon.call("sandbox.logs", {"name": name, "offset": 0, "wait": GUEST_WAIT})
    started = time.monotonic()
    stopped = vm_daemon.call("sandbox.stop", {"name": "stopme", "timeout": 20})
    assert time.monotonic() - started < 20 + 10
    assert (stopped["state"], stopped["run"]["reason"]) == ("stopped", "stop_requested")
    killed = vm_daemon.call("sandbox.kill", {"name": "killme"})
    assert (killed["state"], killed["run"]["reason"]) == ("stopped", "killed")
    assert gone(stopped["run"]["pid"]) and gone(killed["run"]["pid"])


def test_timers_end_real_guests(vm_daemon: DaemonProc, vm_root: Path) -> None:
    vm_daemon.call("sandbox.run", guest("short", vm_root, "exec sleep 600", max_duration=20))
    vm_daemon.call("sandbox.run", guest("idle", vm_root, "exec sleep 600", idle_timeout=20))
    assert finished(vm_daemon, "short")["run"]["reason"] == "max_duration"
    assert finished(vm_daemon, "idle")["run"]["reason"] == "idle_timeout"


def test_a_missing_executable_says_so(vm_daemon: DaemonProc, vm_root: Path) -> None:
    vm_daemon.call("sandbox.run", {"name": "nope", "rootfs": str(vm_root),
                                   "exec": "/no/such/program", "memory_mib": 256})
    end = finished(vm_daemon, "nope")
    assert (end["run"]["reason"], end["run"]["exit_code"]) == ("exited", 127)
    assert "/no/such/program" in (end["run"]["detail"] or ""), end
    assert "No such file or directory" in output(vm_daemon, "nope")


# --- files: mounts, disks, a disk root ----------------------------------------------------


def test_mounts_write_as_the_owner_and_read_only_stays_so(
        vm_daemon: DaemonProc, vm_root: Path, make_root: Callable[..., Path],
        open_dir: Path) -> None:
    root = make_root("b-vmroot", B)
    (root / "sys").mkdir(exist_ok=True)
    shared, frozen = open_dir / "rw", open_dir / "ro"
    for d in (shared, frozen):
        d.mkdir()
        os.chown(d, B.uid, B.gid)
    script = ("mkdir -p /mnt/rw /mnt/ro && mount -t virtiofs rw /mnt/rw && "
              "mount -t virtiofs ro /mnt/ro && echo written > /mnt/rw/out && "
              "(echo x > /mnt/ro/f && echo RO-WRITABLE || echo RO-REFUSED)")
    spec = guest("mnt", root, script, mounts=[
        {"tag": "rw", "host": str(shared)}, {"tag": "ro", "host": str(frozen),
                                               "readonly": True}])
    ok(vm_daemon.socket, B, "sandbox.run", spec)
    end = ok(vm_daemon.socket, B, "sandbox.wait", {"name": "mnt", "timeout": GUEST_WAIT})
    out = ok(vm_daemon.socket, B, "sandbox.logs", {"name": "mnt"})["data"]
    assert end["run"]["exit_code"] == 0, (end, out)
    assert (shared / "out").read_text() == "written\n"
    assert (shared / "out").stat().st_uid == B.uid
    assert "RO-REFUSED" in out and not (frozen / "f").exists()


PATTERNS = {"raw": b"msbd-raw-pattern", "qcow2": b"msbd-qcow-pattern"}


def test_raw_and_qcow2_disks_are_read_by_the_guest(vm_daemon: DaemonProc, vm_root: Path,
                                                   tmp_path: Path) -> None:
    disks = []
    for fmt, pattern in PATTERNS.items():
        raw = tmp_path / f"{fmt}.raw"
        raw.write_bytes(pattern + b"\0" * (1024 * 1024 - len(pattern)))
        image = raw
        if fmt == "qcow2":
            image = tmp_path / "disk.qcow2"
            subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw),
                            str(image)], check=True)
        disks.append({"id": fmt, "host": str(image), "format": fmt, "readonly": True})
    vm_daemon.call("sandbox.run", guest("disks", vm_root,
                                        "head -c 17 /dev/vda; echo; head -c 17 /dev/vdb; echo",
                                        disks=disks))
    assert finished(vm_daemon, "disks")["run"]["exit_code"] == 0
    out = output(vm_daemon, "disks")
    for pattern in PATTERNS.values():
        assert pattern.decode() in out, out


def test_an_ext4_root_disk_boots(vm_daemon: DaemonProc, vm_root: Path, tmp_path: Path) -> None:
    image = tmp_path / "root.ext4"
    subprocess.run(["mkfs.ext4", "-q", "-d", str(vm_root), str(image), "64M"], check=True)
    vm_daemon.call("sandbox.run", {
        "name": "diskroot", "root_disk": {"path": str(image), "format": "raw"},
        "exec": "/bin/sh", "args": ["-c", "mount | grep ' on / '"], "memory_mib": 256})
    end = finished(vm_daemon, "diskroot")
    out = output(vm_daemon, "diskroot")
    assert end["run"]["exit_code"] == 0, (end, out)
    assert "/dev/vda on / type ext4" in out, out


def test_a_users_disk_gives_the_guest_only_what_the_user_can_read(
        vm_daemon: DaemonProc, make_root: Callable[..., Path], open_dir: Path) -> None:
    root = make_root("b-diskroot", B)
    (root / "sys").mkdir(exist_ok=True)
    secret = open_dir / "root-only"
    secret.write_bytes(b"ROOT-SECRET" + b"\0" * 4096)
    os.chmod(secret, 0o600)
    backing = open_dir / "b-backed.qcow2"
    subprocess.run(["qemu-img", "create", "-f", "qcow2", "-b", str(secret), "-F", "raw",
                    str(backing)], check=True, capture_output=True)
    os.chown(backing, B.uid, B.gid)
    for name, disk in (("direct", {"id": "d", "host": str(secret), "format": "raw",
                                   "readonly": True}),
                       ("backed", {"id": "d", "host": str(backing), "format": "qcow2",
                                   "readonly": True})):
        spec = guest(name, root, "head -c 11 /dev/vda", disks=[disk])
        err = refused(vm_daemon.socket, B, "sandbox.run", spec)
        assert err["code"] in (RpcCode.INVALID_PARAMS, RpcCode.LAUNCH_FAILED), err
        assert "ROOT-SECRET" not in str(err)


# --- failures, heartbeats, a daemon that dies -----------------------------------------------


def test_a_missing_libkrunfw_says_so(real_libkrun: str, vm_root: Path,
                                     tmp_path_factory: pytest.TempPathFactory) -> None:
    lonely = Path(tmp_path_factory.mktemp("lonely"))
    shutil.copy2(real_libkrun, lonely / "libkrun.so.1")
    d = DaemonProc(lonely, libkrun=lonely / "libkrun.so.1", settings=vm_settings())
    d.start()
    try:
        with pytest.raises(RemoteError) as err:
            d.call("sandbox.run", guest("nofw", vm_root, "true"))
        assert err.value.rpc_code == RpcCode.LAUNCH_FAILED
        assert "libkrunfw" in err.value.message
        info = d.call("sandbox.get", {"name": "nofw"})
        assert info["run"]["reason"] == "launch_failed" and "libkrunfw" in info["run"]["detail"]
    finally:
        d.close()


def test_heartbeat_loss_ends_the_run_and_the_guest(
        real_libkrun: str, vm_root: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    base = Path(tmp_path_factory.mktemp("hb"))
    d = DaemonProc(base, libkrun=Path(real_libkrun),
                   settings=vm_settings(heartbeat_misses=5, stop_timeout=5.0))
    d.start()
    try:
        info = d.call("sandbox.run", guest("frozen", vm_root, "echo up; exec sleep 600"))
        d.call("sandbox.logs", {"name": "frozen", "offset": 0, "wait": GUEST_WAIT})
        pid = info["run"]["pid"]
        os.kill(pid, signal.SIGSTOP)
        end = finished(d, "frozen")
        assert end["run"]["reason"] == "heartbeat_lost"
        assert gone(pid)
    finally:
        d.close()


def test_sigkilled_daemon_takes_its_guests_down_and_the_next_records_it(
        real_libkrun: str, vm_root: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    base = Path(tmp_path_factory.mktemp("lost"))
    d = DaemonProc(base, libkrun=Path(real_libkrun), settings=vm_settings(stop_timeout=10.0))
    d.start()
    try:
        pids = [d.call("sandbox.run", guest(f"g{i}", vm_root, "echo up; exec sleep 600")
                       )["run"]["pid"] for i in range(3)]
        for i in range(3):
            d.call("sandbox.logs", {"name": f"g{i}", "offset": 0, "wait": GUEST_WAIT})
        d.stop(sig=signal.SIGKILL)
        wait_for(lambda: all(gone(p) for p in pids), "every worker to go", 10.0 + 30.0)
        d.start()
        for i in range(3):
            run = d.call("sandbox.get", {"name": f"g{i}"})["run"]
            assert run["reason"] == "daemon_lost", run
    finally:
        d.close()
