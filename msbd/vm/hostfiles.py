"""Every host file a VM gets, opened once by the worker itself as the sandbox's owner.

Why it is built this way: libkrun opens the disk images (`krun_add_disk*`,
the root disk) inside `krun_start_enter`, *before* it takes the
`krun_setuid`/`krun_setgid` identity, and opens whatever a qcow2 or vmdk
names from there. Handed a host name, it would resolve it again later, as
whoever the worker is then: a root worker would follow a `/proc/<pid>/root`
magic link into the owner's own mount namespace, a symlink swapped in after
the daemon's check, or a backing file named in a user's qcow2. So:

1. `become_owner`: right after loading libkrun (and libkrunfw), the worker
   takes the owner's supplementary groups, gid and uid (real, effective and
   saved: for good). Everything below, libkrun's own opens included, has the
   owner's rights and no more; libkrun's later setgid/setuid to the same ids
   change nothing. One group is added: the one `/dev/kvm`'s mode lets read
   and write it, when the owner could not otherwise, because libkrun opens
   the device itself in `krun_start_enter`. That group grants nothing else a
   host normally has (only the device belongs to it).
2. `open_host_files`: the worker opens each disk (read-only or read-write, as
   the spec says) and each shared directory itself, once, and checks what it
   got: the kind (`fstat`), the mount it lies on (procfs, or a mount outside
   the worker's mount namespace, which only a `/proc/<pid>/root` walk
   reaches, is refused), and for qcow2 and vmdk the header (`msbd.vm.images`):
   an image naming any other file is refused.
3. libkrun gets `/proc/self/fd/N` for a disk and `/proc/self/fd/N/` for a
   directory. Opening those reaches the file the worker opened, not a name;
   the trailing slash makes libkrun's virtio-fs open (`O_PATH | O_NOFOLLOW`)
   follow the link to the directory instead of opening the link itself. The
   fds stay open (close-on-exec: nothing is ever exec'd with them) for the
   life of the process.

A header rewritten between the worker's check and libkrun's read could name a
file again, but libkrun then opens it as the owner: the owner gains nothing
it could not open itself.
"""

from __future__ import annotations

import os
import stat
from typing import Final

from msbd.errors import MsbdError
from msbd.model import DiskFormat, WorkerSpec
from msbd.vm import images
from msbd.vm.fds import kind

PROC_FD: Final = "/proc/self/fd"
KVM_DEVICE: Final = "/dev/kvm"
# O_NONBLOCK: a FIFO put where a disk should be must not hang the open (it is refused after).
_OPEN_FLAGS: Final = os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK


class HostFileRefused(MsbdError):
    """A host file of the spec cannot be opened as the owner, or is not fit for libkrun."""


class HostNames:
    """What libkrun is given instead of the spec's host paths, and the fds behind them.

    A plain class: `dataclasses` (and the `inspect` it imports) would cost the
    worker's start more than everything else in this module.
    """

    __slots__ = ("disks", "fds", "mounts", "root_disk", "rootfs")

    def __init__(self) -> None:
        self.rootfs: str | None = None
        self.root_disk: str | None = None
        self.mounts: list[str] = []
        self.disks: list[str] = []
        self.fds: list[int] = []


def become_owner(spec: WorkerSpec) -> None:
    """Take `spec`'s uid, gid and groups for good (nothing to do when it names none).

    Raises OSError when the worker may not (it is not root); checks the result.
    """
    if spec.uid is None or spec.gid is None:
        return  # `WorkerSpec.check`: then there are no groups either
    uid, gid = spec.uid, spec.gid
    groups = sorted(set(spec.groups or ()) | kvm_groups(uid, gid, set(spec.groups or ())))
    if (os.getresuid(), os.getresgid()) == ((uid,) * 3, (gid,) * 3) and sorted(
            set(os.getgroups())) == groups:
        return  # already the owner (a worker started as its owner)
    os.setgroups(groups)
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
    if os.getresuid() != (uid,) * 3 or os.getresgid() != (gid,) * 3:
        raise PermissionError(f"still uid {os.getresuid()}, gid {os.getresgid()}")


def kvm_groups(uid: int, gid: int, groups: set[int], device: str = KVM_DEVICE) -> set[int]:
    """{the group of `device`} when its mode gives that group read and write and the
    identity (uid, gid, groups) could not otherwise open it read-write; else {}."""
    try:
        st = os.stat(device)
    except OSError:
        return set()
    if st.st_uid == uid:
        return set()  # the owner class decides
    if (st.st_gid == gid or st.st_gid in groups) or st.st_mode & 0o006 == 0o006:
        return set()
    return {st.st_gid} if st.st_mode & 0o060 == 0o060 else set()


def open_host_files(spec: WorkerSpec) -> HostNames:
    """Open every host path of `spec` as the worker is now; `HostFileRefused` on any problem.

    On a refusal the fds opened so far are closed again.
    """
    names = HostNames()
    mounts = _mount_types()
    try:
        if spec.rootfs is not None:
            names.rootfs = _open_dir(names, mounts, "rootfs", spec.rootfs)
        if spec.root_disk is not None:
            names.root_disk = _open_disk(names, mounts, "root disk", spec.root_disk.path,
                                         fmt=spec.root_disk.format,
                                         readonly=spec.root_disk.readonly)
        for mount in spec.mounts:
            names.mounts.append(_open_dir(names, mounts, f"mount {mount.tag!r}", mount.host))
        for disk in spec.disks:
            names.disks.append(_open_disk(names, mounts, f"disk {disk.id!r}", disk.host,
                                          fmt=disk.format, readonly=disk.readonly))
    except HostFileRefused:
        for fd in names.fds:
            os.close(fd)
        raise
    return names


def _open(names: HostNames, label: str, path: str, flags: int) -> int:
    try:
        fd = os.open(path, flags | _OPEN_FLAGS)
    except OSError as exc:
        raise HostFileRefused(f"{label}: cannot open {path} as uid {os.geteuid()}: "
                              f"{exc.strerror or exc}") from None
    names.fds.append(fd)
    return fd


def _open_dir(names: HostNames, mounts: dict[int, str], label: str, path: str) -> str:
    fd = _open(names, label, path, os.O_RDONLY | os.O_DIRECTORY)
    _check_mount(fd, mounts, label, path)
    return f"{PROC_FD}/{fd}/"


def _open_disk(names: HostNames, mounts: dict[int, str], label: str, path: str, *,
               fmt: DiskFormat, readonly: bool) -> str:
    fd = _open(names, label, path, os.O_RDONLY if readonly else os.O_RDWR)
    st = os.fstat(fd)
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
        raise HostFileRefused(f"{label}: {path} is {kind(st.st_mode)}, not a regular file "
                              "or block device")
    _check_mount(fd, mounts, label, path)
    size = st.st_size if stat.S_ISREG(st.st_mode) else os.lseek(fd, 0, os.SEEK_END)
    head = b"" if fmt is DiskFormat.RAW else os.pread(fd, images.HEAD_BYTES, 0)
    problem = images.check(fmt, head, size)
    if problem is not None:
        why = ("libkrun would open that file itself, so msbd refuses images that name "
               "other files" if problem.names_file else "refused")
        raise HostFileRefused(f"{label}: {path} is {problem.description}; {why}")
    return f"{PROC_FD}/{fd}"


def _check_mount(fd: int, mounts: dict[int, str], label: str, path: str) -> None:
    """Refuse a file on procfs, or on a mount the worker's mount namespace does not have."""
    try:
        with open(f"/proc/self/fdinfo/{fd}", encoding="utf-8", errors="replace") as info:
            mount_id = fdinfo_mount_id(info.read())
    except OSError:
        mount_id = None
    if mount_id is None:
        raise HostFileRefused(f"{label}: cannot tell which mount {path} is on")
    fstype = mounts.get(mount_id)
    if fstype is None:
        raise HostFileRefused(f"{label}: {path} is on a mount outside the worker's mount "
                              "namespace (reached through /proc/<pid>/root?); refused")
    if fstype == "proc":
        raise HostFileRefused(f"{label}: {path} is on procfs, which msbd never hands to "
                              "libkrun; refused")


def _mount_types() -> dict[int, str]:
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as info:
            return mount_types(info.read())
    except OSError:
        return {}  # then every file is refused as "outside": never silently allowed


def mount_types(mountinfo: str) -> dict[int, str]:
    """Mount id -> filesystem type, from the text of /proc/self/mountinfo."""
    found: dict[int, str] = {}
    for line in mountinfo.splitlines():
        left, sep, right = line.partition(" - ")
        ids, types = left.split(maxsplit=1), right.split(maxsplit=1)
        if sep and ids and types and ids[0].isdigit():
            found[int(ids[0])] = types[0]
    return found


def fdinfo_mount_id(fdinfo: str) -> int | None:
    """The `mnt_id:` of the text of /proc/self/fdinfo/N."""
    for line in fdinfo.splitlines():
        key, _, value = line.partition(":")
        if key == "mnt_id" and value.strip().isdigit():
            return int(value.strip())
    return None
