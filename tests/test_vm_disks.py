"""Host files a VM gets are opened with its owner's rights: the attacks of issue 10, part 1.

Each attack is made by a real unprivileged uid against real worker processes
and the libkrun test double, which opens disks the way libkrun does (inside
`krun_start_enter`, before libkrun takes the `krun_setuid` identity) and
records the first bytes it read, and hands each disk to its "guest" as fd
100+i. So a test sees what a real VM would read and write. Needs root (to
create the uid, the root-only file, and to start workers as the daemon does).
"""

from __future__ import annotations

import contextlib
import grp
import json
import os
import pwd
import secrets
import shutil
import stat
import subprocess
import tempfile
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from daemonproc import DaemonProc
from workerproc import Worker, Workers

from msbd.errors import RemoteError, RpcCode
from msbd.rpc.client import Client

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to create and become a uid")

OWNER_NAME, OWNER_ID = "msbd-t-disk", 64021
GUEST_DISK_FD = 100  # the test double's "guest" finds disk i on fd 100 + i


@dataclass(frozen=True)
class Owner:
    uid: int
    gid: int

    def fields(self) -> dict[str, Any]:
        """The identity fields of a WorkerSpec, as the daemon fills them for this owner."""
        return {"uid": self.uid, "gid": self.gid, "groups": [self.gid]}


@pytest.fixture(scope="module")
def owner() -> Iterator[Owner]:
    """A throwaway unprivileged uid with its own group, removed at the end."""
    made_group = made_user = False
    try:
        assert grp.getgrgid(OWNER_ID).gr_name == OWNER_NAME, f"gid {OWNER_ID} is taken"
    except KeyError:
        subprocess.run(["groupadd", "-g", str(OWNER_ID), OWNER_NAME], check=True)
        made_group = True
    try:
        assert pwd.getpwuid(OWNER_ID).pw_name == OWNER_NAME, f"uid {OWNER_ID} is taken"
    except KeyError:
        subprocess.run(["useradd", "-u", str(OWNER_ID), "-g", str(OWNER_ID), "-M", "-N",
                        "-d", "/nonexistent", "-s", "/usr/sbin/nologin", OWNER_NAME], check=True)
        made_user = True
    yield Owner(OWNER_ID, OWNER_ID)
    if made_user:
        subprocess.run(["userdel", OWNER_NAME], check=False)
    if made_group:
        with contextlib.suppress(KeyError):
            grp.getgrnam(OWNER_NAME)
            subprocess.run(["groupdel", OWNER_NAME], check=False)


def _open_dir() -> Path:
    path = Path(tempfile.mkdtemp(prefix="msbd-disks-", dir="/tmp"))
    os.chmod(path, 0o755)
    return path


@pytest.fixture(scope="module")
def owner_root(owner: Owner, busybox_root: Path) -> Iterator[Path]:
    """The busybox root, copied where the owner can reach it, and owned by the owner."""
    base = _open_dir()
    root = base / "root"
    shutil.copytree(busybox_root, root, symlinks=True)
    os.chown(root, owner.uid, owner.gid)
    yield root
    shutil.rmtree(base, ignore_errors=True)


@dataclass
class Area:
    """A 0755 directory holding root's secret (0600) and the owner's own files."""

    path: Path
    owner: Owner
    secret: bytes
    secret_file: Path
    log: Path

    def mine(self, name: str, data: bytes) -> Path:
        """A file of the owner's, 0644."""
        path = self.path / name
        path.write_bytes(data)
        os.chown(path, self.owner.uid, self.owner.gid)
        return path


@pytest.fixture
def area(owner: Owner) -> Iterator[Area]:
    path = _open_dir()
    secret = b"ROOT-ONLY-" + secrets.token_hex(8).encode()
    secret_file = path / "root-only"
    secret_file.write_bytes(secret)
    os.chmod(secret_file, 0o600)
    yield Area(path, owner, secret, secret_file, path / "fakekrun.jsonl")
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def launch(workers: Workers, fakekrun: Path, owner_root: Path, owner: Owner, area: Area
           ) -> Callable[..., Worker]:
    """Start a worker as the daemon would for a sandbox of `owner`: `fields` go in its spec
    (None leaves a field out). The spec is not checked here: the worker checks it."""
    def start(log: Path = area.log, **fields: Any) -> Worker:
        spec = {"name": "t", "rootfs": str(owner_root), "exec": "/bin/true",
                "libkrun": str(fakekrun), "heartbeat_interval": 60.0} | owner.fields() | fields
        data = json.dumps({k: v for k, v in spec.items() if v is not None}).encode()
        return workers.start(data, log=log)

    return start


def guest_script(script: str) -> dict[str, Any]:
    return {"exec": "/bin/busybox", "args": ["sh", "-c", script]}


def leaks(w: Worker, secret: bytes, output: str) -> list[str]:
    """Everywhere root's bytes showed up: an open by the test double, the guest's output."""
    found = [f"{c['fn']} of {c['path']} as euid {c['euid']} read them" for c in w.calls()
             if c.get("head") and secret in bytes.fromhex(c["head"])]
    if secret.decode() in output:
        found.append("the guest printed them")
    return found


def refusal(w: Worker) -> str:
    """The worker's `error` line, after checking it refused the launch (status 2)."""
    lines = w.status_lines()
    assert w.wait() == 2, lines
    assert len(lines) == 1 and lines[0].startswith("error "), lines
    assert w.calls_named("krun_start_enter") == []
    return lines[0].removeprefix("error ")


# --- 1. /proc magic links -------------------------------------------------------------


@contextlib.contextmanager
def bound_in_a_namespace(owner: Owner, source: Path, target: Path) -> Iterator[int]:
    """A process of the owner's in its own user and mount namespace (`unshare -Urm`) where
    `source` is bind-mounted over `target`; yields its pid."""
    proc = subprocess.Popen(
        ["unshare", "-Urm", "sh", "-c",
         f"mount --bind {source} {target} && echo ready && exec sleep 600"],
        user=owner.uid, group=owner.gid, extra_groups=[], stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stderr is not None
    try:
        line = proc.stdout.readline()
        assert line == "ready\n", f"unshare -Urm failed as uid {owner.uid}: {proc.stderr.read()}"
        yield proc.pid
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()
        proc.stderr.close()


@pytest.fixture
def namespace(owner: Owner, area: Area) -> Iterator[tuple[int, Path]]:
    """Root's 0600 file bind-mounted over a file of the owner's, in the owner's own
    namespace: (the pid of the owner's process there, the owner's file)."""
    mine = area.mine("mine.img", b"the owner's own bytes")
    with bound_in_a_namespace(owner, area.secret_file, mine) as pid:
        # Root sees root's file through the owner's process's root: the attack is real.
        with open(f"/proc/{pid}/root{mine}", "rb") as through:
            assert through.read() == area.secret
        yield pid, mine


@pytest.mark.parametrize("readonly", [True, False], ids=["ro", "rw"])
@pytest.mark.parametrize("via", ["proc-path", "symlink"])
def test_a_proc_magic_link_never_reaches_a_root_only_file(
        launch: Callable[..., Worker], area: Area, namespace: tuple[int, Path], owner: Owner,
        via: str, readonly: bool) -> None:
    pid, mine = namespace
    path = f"/proc/{pid}/root{mine}"
    if via == "symlink":  # a name outside /proc that leads there
        link = area.path / "innocent.img"
        link.symlink_to(path)
        path = str(link)
    w = launch(disks=[{"id": "d", "host": path, "format": "raw", "readonly": readonly}],
               **guest_script(f"head -c 64 <&{GUEST_DISK_FD}; echo; "
                              f"printf OWNED >&{GUEST_DISK_FD}"))
    w.wait()
    assert leaks(w, area.secret, w.output()) == []
    assert area.secret_file.read_bytes() == area.secret, "root's file was changed"
    message = refusal(w)
    if via == "proc-path":
        assert message == (f"spec: `disks[0].host`: {path} is under /proc, which msbd never "
                           "opens (its entries lead into other processes)")
    else:
        assert message == (f"disk 'd': cannot open {path} as uid {owner.uid}: "
                           "Permission denied")


def test_a_file_reached_through_another_mount_namespace_is_refused(
        launch: Callable[..., Worker], area: Area, owner: Owner) -> None:
    """Even a file the owner may read: only a /proc/<pid>/root walk reaches that mount."""
    mine, other = area.mine("mine.img", b"mine"), area.mine("other.img", b"other")
    link = area.path / "innocent.img"
    with bound_in_a_namespace(owner, other, mine) as pid:
        link.symlink_to(f"/proc/{pid}/root{mine}")
        w = launch(disks=[{"id": "d", "host": str(link), "format": "raw", "readonly": True}])
        assert refusal(w) == (f"disk 'd': {link} is on a mount outside the worker's mount "
                              "namespace (reached through /proc/<pid>/root?); refused")


def test_the_daemon_refuses_a_path_that_leads_into_proc(
        make_daemon: Callable[..., DaemonProc], fakekrun: Path, sock_dir: Path, area: Area,
        owner: Owner, owner_root: Path, namespace: tuple[int, Path]) -> None:
    pid, mine = namespace
    link = area.path / "innocent.img"
    link.symlink_to(f"/proc/{pid}/root{mine}")
    d = open_daemon(make_daemon, fakekrun, sock_dir, area)
    spec = {"name": "p", "rootfs": str(owner_root), "exec": "/bin/true",
            "disks": [{"id": "d", "host": str(link), "format": "raw", "readonly": True}]}
    got = _as(owner, lambda: call(d, "sandbox.run", spec))
    assert got == ["remote", RpcCode.INVALID_PARAMS,
                   f"`disks[0].host`: {link}: it leads into /proc, which msbd never opens"]


# --- 2. images naming other files --------------------------------------------------------


def qemu_img(*args: str) -> None:
    done = subprocess.run(["qemu-img", *args], capture_output=True, text=True)
    assert done.returncode == 0, f"qemu-img {' '.join(args)}: {done.stderr}"


def test_a_qcow2_naming_a_root_only_backing_file_is_refused(
        launch: Callable[..., Worker], area: Area) -> None:
    image = area.path / "user.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", str(area.secret_file), "-F", "raw",
             str(image))
    os.chown(image, area.owner.uid, area.owner.gid)
    w = launch(disks=[{"id": "q", "host": str(image), "format": "qcow2", "readonly": True}])
    w.wait()
    assert leaks(w, area.secret, w.output()) == []
    assert w.calls_named("open_backing") == []
    assert refusal(w) == (
        f"disk 'q': {image} is a qcow2 image naming the backing file "
        f"'{area.secret_file}'; libkrun would open that file itself, so msbd refuses "
        "images that name other files")


@pytest.mark.parametrize(("subformat", "named"), [
    ("monolithicFlat", "user-flat.vmdk"),
    ("twoGbMaxExtentFlat", "user-f001.vmdk"),
    ("monolithicSparse", "user.vmdk"),
])
def test_a_vmdk_naming_an_extent_file_is_refused(
        launch: Callable[..., Worker], area: Area, subformat: str, named: str) -> None:
    image = area.path / "user.vmdk"
    qemu_img("create", "-q", "-f", "vmdk", "-o", f"subformat={subformat}", str(image), "1M")
    w = launch(disks=[{"id": "v", "host": str(image), "format": "vmdk", "readonly": True}])
    message = refusal(w)
    assert message.startswith(f"disk 'v': {image} is a ")
    assert f"naming the extent file '{named}'" in message


# --- 3. symlink swaps -------------------------------------------------------------------


def test_a_symlink_swapped_during_launches_never_reaches_a_root_only_file(
        launch: Callable[..., Worker], area: Area, owner: Owner) -> None:
    data = b"OWNER-DATA-" + secrets.token_hex(8).encode()
    mine = area.mine("mine.img", data)
    path = area.path / "flipping.img"
    os.link(mine, path)
    stop = threading.Event()
    flips = 0

    def flip() -> None:
        """Swap `path` between the owner's file and a link to root's, atomically, nonstop."""
        nonlocal flips
        while not stop.is_set():
            os.symlink(area.secret_file, area.path / "tmp-link")
            os.replace(area.path / "tmp-link", path)
            os.link(mine, area.path / "tmp-file")
            os.replace(area.path / "tmp-file", path)
            flips += 1

    def one(i: int) -> tuple[int, str, list[str]]:
        w = launch(log=area.path / f"fakekrun-{i}.jsonl",
                   disks=[{"id": "d", "host": str(path), "format": "raw", "readonly": True}],
                   **guest_script(f"head -c 64 <&{GUEST_DISK_FD}"))
        status = w.wait(60)
        out = w.output()
        lines = w.status_lines()
        return status, out if status == 0 else "\n".join(lines), leaks(w, area.secret, out)

    flipper = threading.Thread(target=flip)
    flipper.start()
    try:
        with ThreadPoolExecutor(4) as pool:
            results = list(pool.map(one, range(200)))
    finally:
        stop.set()
        flipper.join()
    leaked = [i for i, (_, _, found) in enumerate(results) if found]
    assert leaked == [], f"{len(leaked)} of {len(results)} launches read root's file"
    assert area.secret_file.read_bytes() == area.secret
    outcomes = {(status, text) for status, text, _ in results}
    denied = f"error disk 'd': cannot open {path} as uid {owner.uid}: Permission denied"
    # Every launch read the owner's bytes or was refused; the race was really run (both seen).
    assert outcomes == {(0, data.decode()), (2, denied)}, (flips, outcomes)


# --- what still works -------------------------------------------------------------------


def test_disks_are_opened_once_as_the_owner_and_reach_the_guest(
        launch: Callable[..., Worker], area: Area, owner: Owner, owner_root: Path) -> None:
    raw = area.mine("data.raw", b"RAW-DISK-BYTES" + b"\0" * 498)
    image = area.path / "plain.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(image), "1M")
    os.chown(image, owner.uid, owner.gid)
    share = area.path / "share"
    share.mkdir()
    os.chown(share, owner.uid, owner.gid)
    w = launch(disks=[{"id": "r", "host": str(raw), "format": "raw"},
                      {"id": "q", "host": str(image), "format": "qcow2", "readonly": True}],
               mounts=[{"tag": "share", "host": str(share)}],
               **guest_script(f"head -c 14 <&{GUEST_DISK_FD}; echo; "
                              f"head -c 4 <&{GUEST_DISK_FD + 1} | od -An -tx1; "
                              f"printf WROTE >&{GUEST_DISK_FD}"))
    assert w.wait() == 0, w.output()
    assert w.output() == "RAW-DISK-BYTES\n 51 46 49 fb\n"
    assert raw.read_bytes().startswith(b"RAW-DISK-BYTESWROTE")  # written where reading ended
    opens = w.calls_named("open_disk")
    assert [(c["block_id"], c["read_only"], c["ok"], c["euid"], c["egid"]) for c in opens] == [
        ("r", False, True, owner.uid, owner.gid), ("q", True, True, owner.uid, owner.gid)]
    # libkrun was handed each file the worker opened, never a name to resolve again.
    disk_calls = w.calls_named("krun_add_disk2")
    assert [c["disk_path"] for c in disk_calls] == [c["path"] for c in opens]
    assert all(c["path"].startswith("/proc/self/fd/") for c in opens)
    [root_call] = w.calls_named("krun_set_root")
    [share_call] = w.calls_named("krun_add_virtiofs")
    for call in (root_call["root_path"], share_call["path"]):
        assert call.startswith("/proc/self/fd/") and call.endswith("/")
    dirs = {c["tag"]: (c["ok"], c["directory"], c["euid"]) for c in w.calls_named("open_dir")}
    assert dirs == {"/dev/root": (True, True, owner.uid), "share": (True, True, owner.uid)}
    [child] = w.calls_named("child")
    assert (child["uid"], child["gid"]) == (owner.uid, owner.gid)
    assert child["fds"] == [0, 1, 2, GUEST_DISK_FD, GUEST_DISK_FD + 1]


def test_virtio_fs_flags_need_the_trailing_slash(tmp_path: Path) -> None:
    """libkrun's virtio-fs opens a shared directory with O_PATH | O_NOFOLLOW: given
    /proc/self/fd/N that is the link itself; /proc/self/fd/N/ is the directory."""
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for name, is_dir in ((f"/proc/self/fd/{fd}", False), (f"/proc/self/fd/{fd}/", True)):
            opened = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
            try:
                assert stat.S_ISDIR(os.fstat(opened).st_mode) is is_dir, name
            finally:
                os.close(opened)
    finally:
        os.close(fd)


def test_a_root_disk_is_opened_as_the_owner_before_the_double_refuses_to_boot_it(
        launch: Callable[..., Worker], area: Area, owner: Owner) -> None:
    disk = area.mine("root.raw", b"ROOT-DISK" + b"\0" * 503)
    w = launch(rootfs=None, root_disk={"path": str(disk), "format": "raw"})
    assert w.wait() == 5
    [opened] = w.calls_named("open_disk")
    assert (opened["block_id"], opened["ok"], opened["euid"]) == ("root", True, owner.uid)
    assert bytes.fromhex(opened["head"]).startswith(b"ROOT-DISK")


@pytest.mark.parametrize(("make", "what"), [
    (lambda path: path.mkdir(), "a directory"),
    (os.mkfifo, "a FIFO"),  # opened without blocking, then refused
    (lambda path: path.symlink_to("/dev/null"), "a character device"),
])
def test_a_disk_that_is_no_file_or_block_device_is_refused(
        launch: Callable[..., Worker], area: Area, make: Callable[[Path], None],
        what: str) -> None:
    path = area.path / "not-a-disk"
    make(path)
    w = launch(disks=[{"id": "d", "host": str(path), "format": "raw", "readonly": True}])
    assert refusal(w) == f"disk 'd': {path} is {what}, not a regular file or block device"


@pytest.mark.parametrize(("field", "value"), [
    ("rootfs", "/proc/1/root"),
    ("mounts", [{"tag": "m", "host": "/proc/self/cwd"}]),
    ("disks", [{"id": "d", "host": "/proc/self/fd/0", "format": "raw"}]),
    ("root_disk", {"path": "/proc/1/root/etc/hostname", "format": "raw"}),
])
def test_paths_under_proc_are_refused(launch: Callable[..., Worker], field: str,
                                      value: Any) -> None:
    w = launch(**{field: value} | ({"rootfs": None} if field == "root_disk" else {}))
    name = {"mounts": "mounts[0].host", "disks": "disks[0].host",
            "root_disk": "root_disk.path"}.get(field, field)
    path = value if isinstance(value, str) else (value[0]["host"] if isinstance(value, list)
                                                  else value["path"])
    assert refusal(w) == (f"spec: `{name}`: {path} is under /proc, which msbd never opens "
                          "(its entries lead into other processes)")


# --- through a real daemon, as its socket's users see it ---------------------------------


def _as(owner: Owner, call: Callable[[], Any]) -> list[Any]:
    """`call()` in a forked child as `owner`: ["ok", value] or ["remote", code, message]."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(r)
            os.setgroups([owner.gid])
            os.setresgid(owner.gid, owner.gid, owner.gid)
            os.setresuid(owner.uid, owner.uid, owner.uid)
            try:
                out: list[Any] = ["ok", call()]
            except RemoteError as exc:
                out = ["remote", exc.remote_code, exc.message]
            with os.fdopen(w, "wb") as f:
                f.write(json.dumps(out).encode())
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        text = f.read().decode()
    os.waitpid(pid, 0)
    assert text, "the child as the owner died without an answer"
    answer: list[Any] = json.loads(text)
    return answer


def open_daemon(make_daemon: Callable[..., DaemonProc], fakekrun: Path, sock_dir: Path,
                area: Area) -> DaemonProc:
    """A root daemon with the test double whose socket every uid may use."""
    os.chmod(sock_dir, 0o755)
    return make_daemon(libkrun=fakekrun, settings={
        "heartbeat_interval": 0.2, "socket_mode": 0o666,
        "worker_env": {"FAKEKRUN_LOG": str(area.log)}})


def call(d: DaemonProc, method: str, params: Any) -> Any:
    with Client(d.socket, timeout=60) as c:
        return c.call(method, params)


def test_the_daemon_refuses_to_launch_a_users_qcow2_naming_roots_file(
        make_daemon: Callable[..., DaemonProc], fakekrun: Path, sock_dir: Path, area: Area,
        owner: Owner, owner_root: Path) -> None:
    d = open_daemon(make_daemon, fakekrun, sock_dir, area)
    image = area.path / "user.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", str(area.secret_file), "-F", "raw",
             str(image))
    os.chown(image, owner.uid, owner.gid)
    spec = {"name": "q", "rootfs": str(owner_root), "exec": "/bin/busybox",
            "args": ["sh", "-c", f"head -c 64 <&{GUEST_DISK_FD}"],
            "disks": [{"id": "q", "host": str(image), "format": "qcow2", "readonly": True}]}

    got = _as(owner, lambda: call(d, "sandbox.run", spec))
    assert got[:2] == ["remote", RpcCode.LAUNCH_FAILED], got
    assert f"backing file '{area.secret_file}'" in got[2]
    opened = [line for line in (area.log.read_text() if area.log.exists() else "").splitlines()
              if '"open_backing"' in line or area.secret.hex() in line]
    assert opened == []
    assert area.secret.decode() not in d.call("sandbox.logs", {"name": "q"})["data"]
    assert d.call("sandbox.get", {"name": "q"})["state"] == "failed"
