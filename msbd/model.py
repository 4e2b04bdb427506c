"""The shared vocabulary: launch spec, sandbox and run records, states, reasons.

Pure data and pure checks, no I/O. The daemon, the worker, the client and
msbctl all speak these types; the wire format is what msgspec makes of them.
"""

from __future__ import annotations

import datetime as dt
import enum
import posixpath
from typing import Annotated, Final, NamedTuple, TypeVar

import msgspec

import msbd.network as net
from msbd.cmdline import check_workload
from msbd.errors import InvalidParams

_T = TypeVar("_T")

# --- names and strings -------------------------------------------------------

NAME_PATTERN: Final = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"
ENV_KEY_PATTERN: Final = r"^[A-Za-z_][A-Za-z0-9_]*$"
# virtio-fs tags are at most 36 bytes; virtio-blk ids (serials) at most 20.
MOUNT_TAG_PATTERN: Final = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,35}$"
DISK_ID_PATTERN: Final = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,19}$"
LABEL_KEY_PATTERN: Final = r"^[A-Za-z0-9][A-Za-z0-9_./-]{0,62}$"
NO_NUL: Final = r"^[^\x00]*$"
ABS_PATH: Final = r"^/[^\x00]*$"

MIN_MEMORY_MIB: Final = 32
MAX_MEMORY_MIB: Final = 1024 * 1024
MAX_ARGS: Final = 4096
MAX_ENV: Final = 4096
MAX_MOUNTS: Final = 64
MAX_DISKS: Final = 64
MAX_LABELS: Final = 64
# One day short of 10 years: large enough for "forever", small enough that
# deadline arithmetic never overflows a float's useful precision.
MAX_TIMEOUT_S: Final = 10 * 365 * 86400.0

Name = Annotated[str, msgspec.Meta(
    pattern=NAME_PATTERN, min_length=1, max_length=128,
    description="1-128 bytes of [A-Za-z0-9_.-], not starting with [_.-]")]
Text = Annotated[str, msgspec.Meta(pattern=NO_NUL, max_length=65536)]
HostPath = Annotated[str, msgspec.Meta(pattern=ABS_PATH, max_length=4096,
                                       description="absolute host path")]
GuestPath = Annotated[str, msgspec.Meta(pattern=NO_NUL, min_length=1, max_length=4096)]
EnvKey = Annotated[str, msgspec.Meta(pattern=ENV_KEY_PATTERN, max_length=256)]
MountTag = Annotated[str, msgspec.Meta(pattern=MOUNT_TAG_PATTERN)]
DiskId = Annotated[str, msgspec.Meta(pattern=DISK_ID_PATTERN)]
LabelKey = Annotated[str, msgspec.Meta(pattern=LABEL_KEY_PATTERN)]
LabelValue = Annotated[str, msgspec.Meta(pattern=NO_NUL, max_length=256)]
Seconds = Annotated[float, msgspec.Meta(gt=0, le=MAX_TIMEOUT_S)]


# --- enums -------------------------------------------------------------------


class State(enum.StrEnum):
    CREATED = "created"
    STARTING = "starting"
    RUNNING = "running"
    PAUSED = "paused"
    STOPPING = "stopping"
    STOPPED = "stopped"
    FAILED = "failed"


LIVE_STATES: Final = frozenset({State.STARTING, State.RUNNING, State.PAUSED, State.STOPPING})


class Reason(enum.StrEnum):
    """Why a run ended."""

    EXITED = "exited"
    STOP_REQUESTED = "stop_requested"
    KILLED = "killed"
    IDLE_TIMEOUT = "idle_timeout"
    MAX_DURATION = "max_duration"
    HEARTBEAT_LOST = "heartbeat_lost"
    LAUNCH_FAILED = "launch_failed"
    WORKER_CRASHED = "worker_crashed"
    DAEMON_LOST = "daemon_lost"
    OOM_KILLED = "oom_killed"


class DiskFormat(enum.StrEnum):
    """Disk image formats; the value libkrun wants is `krun_code`.

    Formats are always explicit (never probed), but that alone does not keep
    an image from naming other host files: a qcow2 header can name a backing
    file or an external data file, a vmdk descriptor names its extent files,
    and libkrun opens whatever they name itself. The worker reads each image's
    header from the file it opened as the owner and refuses any image that
    names another file (`msbd.vm.images`).
    """

    RAW = "raw"
    QCOW2 = "qcow2"
    VMDK = "vmdk"

    @property
    def krun_code(self) -> int:
        return _KRUN_FORMAT[self]


_KRUN_FORMAT: Final = {DiskFormat.RAW: 0, DiskFormat.QCOW2: 1, DiskFormat.VMDK: 2}


def under_proc(path: str) -> bool:
    """Whether `path`, taken as written, names /proc or something in it.

    Entries there (`/proc/<pid>/root`, `/proc/<pid>/fd/N`, `/proc/self/...`)
    are links into other processes' files and mounts, whoever owns them, so
    no spec may name one. Names elsewhere that lead there are caught when the
    worker opens them (as the owner, and checking the mount it reached).
    """
    return posixpath.normpath(path).lstrip("/").split("/", 1)[0] == "proc"


# --- the launch spec ---------------------------------------------------------


class Spec(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Base of request-side structs: immutable, by name, no unknown fields."""

    def check(self) -> None:
        """Cross-field rules checked after decoding; raise `InvalidParams`."""


class RootDisk(Spec, frozen=True):
    path: HostPath
    format: DiskFormat
    readonly: bool = False


class Mount(Spec, frozen=True):
    """An extra host directory shared into the guest (virtio-fs) under `tag`."""

    tag: MountTag
    host: HostPath
    readonly: bool = False


class Disk(Spec, frozen=True):
    """An extra disk image attached as a virtio-blk device named `id`."""

    id: DiskId
    host: HostPath
    format: DiskFormat
    readonly: bool = False


class LaunchSpec(Spec, frozen=True):
    """What a client asks for: one sandbox, its root, its workload, its limits."""

    name: Name
    exec: GuestPath
    rootfs: HostPath | None = None
    root_disk: RootDisk | None = None
    args: Annotated[list[Text], msgspec.Meta(max_length=MAX_ARGS)] = []
    env: Annotated[dict[EnvKey, Text], msgspec.Meta(max_length=MAX_ENV)] = {}
    workdir: GuestPath | None = None
    vcpus: Annotated[int, msgspec.Meta(ge=1, le=255)] = 1
    memory_mib: Annotated[int, msgspec.Meta(ge=MIN_MEMORY_MIB, le=MAX_MEMORY_MIB)] = 512
    mounts: Annotated[list[Mount], msgspec.Meta(max_length=MAX_MOUNTS)] = []
    disks: Annotated[list[Disk], msgspec.Meta(max_length=MAX_DISKS)] = []
    idle_timeout: Seconds | None = None
    max_duration: Seconds | None = None
    labels: Annotated[dict[LabelKey, LabelValue], msgspec.Meta(max_length=MAX_LABELS)] = {}
    # None: the daemon's `default_network`, written into the record at creation.
    network: Annotated[net.Network | None, msgspec.Meta(description=net.NETWORK_HELP)] = None
    ports: Annotated[list[net.PortMap], msgspec.Meta(max_length=net.MAX_PORTS,
                                                     description=net.PORTS_HELP)] = []
    rlimits: Annotated[dict[net.RlimitName, net.RlimitValue],
                       msgspec.Meta(description=net.RLIMITS_HELP)] = {}

    def check(self) -> None:
        """Cross-field rules msgspec's per-field constraints cannot say.

        Raises `InvalidParams` naming the field. Host paths are only checked
        for shape here (absolute, not under /proc); whether they exist and
        who may read them is the daemon's business (it knows the caller).
        """
        if (self.rootfs is None) == (self.root_disk is None):
            raise InvalidParams("exactly one of `rootfs` and `root_disk` is required",
                                field="rootfs")
        for field, path, _ in self.host_paths():
            if under_proc(path):
                raise InvalidParams(f"`{field}`: {path} is under /proc, which msbd never opens "
                                    "(its entries lead into other processes)", field=field)
        if self.workdir is not None and not self.workdir.startswith("/"):
            raise InvalidParams("`workdir` must be an absolute guest path", field="workdir")
        check_workload(self.exec, self.workdir, self.args, self.env)
        seen_tags: set[str] = set()
        for i, mount in enumerate(self.mounts):
            if mount.tag in seen_tags:
                raise InvalidParams(f"duplicate mount tag {mount.tag!r}", field=f"mounts[{i}].tag")
            seen_tags.add(mount.tag)
        seen_ids: set[str] = {"root"} if self.root_disk is not None else set()
        for i, disk in enumerate(self.disks):
            if disk.id in seen_ids:
                raise InvalidParams(f"duplicate disk id {disk.id!r}", field=f"disks[{i}].id")
            seen_ids.add(disk.id)
        net.check_ports(self.network, self.ports)

    def host_paths(self) -> list[tuple[str, str, bool]]:
        """(field, path, needs_write) for every host path the spec names."""
        paths: list[tuple[str, str, bool]] = []
        if self.rootfs is not None:
            paths.append(("rootfs", self.rootfs, False))
        if self.root_disk is not None:
            paths.append(("root_disk.path", self.root_disk.path, not self.root_disk.readonly))
        paths += [(f"mounts[{i}].host", m.host, False) for i, m in enumerate(self.mounts)]
        paths += [(f"disks[{i}].host", d.host, not d.readonly) for i, d in enumerate(self.disks)]
        return paths


class WorkerSpec(LaunchSpec, frozen=True):
    """The launch spec as the worker reads it on fd 96.

    The daemon adds its worker settings; each has a default so a plain
    launch spec in a file is enough to run the worker by hand.
    """

    heartbeat_interval: Annotated[float, msgspec.Meta(gt=0, le=3600)] = 1.0
    # A stop request gives the guest's processes `shutdown_grace` seconds (its
    # init SIGKILLs what is left then) and its init `shutdown_margin` more to
    # sync, report the status and end the VM; only then does the worker force
    # its own exit (msbd.vm: statuses 6 and 128+n).
    shutdown_grace: Annotated[float, msgspec.Meta(ge=0, le=3600)] = 10.0
    shutdown_margin: Annotated[float, msgspec.Meta(ge=0, le=3600)] = 5.0
    libkrun: HostPath | None = None
    log_level: Annotated[int, msgspec.Meta(ge=0, le=5)] = 1
    # The identity the VM runs as: the sandbox owner's. The worker takes it
    # (groups, gid, uid, for good) right after loading libkrun, before it opens
    # any host file, and libkrun is told the same uid/gid; so every host file
    # a VM gets is opened with its owner's rights. None keeps the worker's own.
    uid: Annotated[int, msgspec.Meta(ge=0, le=2**32 - 2)] | None = None
    gid: Annotated[int, msgspec.Meta(ge=0, le=2**32 - 2)] | None = None
    # Supplementary groups the VM keeps (the owner's); None with a uid: none.
    groups: Annotated[list[Annotated[int, msgspec.Meta(ge=0, le=2**32 - 2)]],
                      msgspec.Meta(max_length=65536)] | None = None

    def check(self) -> None:
        """The launch spec's rules, and: `uid` and `gid` come together, `groups` only
        with them (the worker takes all three before it opens any host file)."""
        super().check()
        if (self.uid is None) != (self.gid is None):
            raise InvalidParams("`uid` and `gid` must be given together", field="uid")
        if self.groups is not None and self.uid is None:
            raise InvalidParams("`groups` needs `uid` and `gid`", field="groups")


# --- seed syntax: `--disk id:host:format[:ro]`, `--mount tag:host[:ro]` --------


def parse_disk_arg(entry: str) -> Disk:
    """Parse `id:host:format[:ro]` exactly as strictly as msb's `--disk`.

    Three or four fields; non-empty id and host; a known format; `ro` is the
    only flag (`rw`, `RO` and anything else are rejected, never coerced).
    """
    parts = entry.split(":")
    if not 3 <= len(parts) <= 4:
        raise InvalidParams(f"invalid --disk entry, expected id:host:format[:ro], got: {entry!r}",
                            field="disks")
    disk_id, host, fmt = parts[0], parts[1], parts[2]
    if not disk_id:
        raise InvalidParams(f"invalid --disk entry with empty id: {entry!r}", field="disks")
    if not host:
        raise InvalidParams(f"invalid --disk entry with empty host path: {entry!r}", field="disks")
    try:
        disk_format = DiskFormat(fmt)
    except ValueError:
        raise InvalidParams(f"invalid --disk entry with unknown format {fmt!r}: {entry!r}",
                            field="disks") from None
    readonly = _parse_ro_flag("--disk", entry, parts[3] if len(parts) == 4 else None, "disks")
    return _convert(Disk, {"id": disk_id, "host": host, "format": disk_format,
                           "readonly": readonly}, "disks", "--disk", entry)


def parse_mount_arg(entry: str) -> Mount:
    """Parse `tag:host[:ro]` with the same strictness as `--disk`."""
    parts = entry.split(":")
    if not 2 <= len(parts) <= 3:
        raise InvalidParams(f"invalid --mount entry, expected tag:host[:ro], got: {entry!r}",
                            field="mounts")
    tag, host = parts[0], parts[1]
    if not tag:
        raise InvalidParams(f"invalid --mount entry with empty tag: {entry!r}", field="mounts")
    if not host:
        raise InvalidParams(f"invalid --mount entry with empty host path: {entry!r}",
                            field="mounts")
    readonly = _parse_ro_flag("--mount", entry, parts[2] if len(parts) == 3 else None, "mounts")
    return _convert(Mount, {"tag": tag, "host": host, "readonly": readonly},
                    "mounts", "--mount", entry)


def _parse_ro_flag(option: str, entry: str, flag: str | None, field: str) -> bool:
    if flag is None:
        return False
    if flag == "ro":
        return True
    raise InvalidParams(f"invalid {option} entry with unknown flag {flag!r} (expected 'ro'): "
                        f"{entry!r}", field=field)


def _convert(kind: type[_T], fields: dict[str, object], field: str, option: str,
                entry: str) -> _T:
    try:
        return msgspec.convert(fields, type=kind)
    except msgspec.ValidationError as exc:
        raise InvalidParams(f"invalid {option} entry {entry!r}: {exc}", field=field) from None


# --- records -----------------------------------------------------------------


class RunInfo(msgspec.Struct, frozen=True, kw_only=True):
    """One start of a sandbox's worker, from spawn to exit."""

    id: int
    pid: int | None
    started_at: dt.datetime
    ended_at: dt.datetime | None = None
    reason: Reason | None = None
    exit_code: int | None = None
    signal: int | None = None
    detail: str | None = None


class SandboxRef(NamedTuple):
    """Which sandbox record: its immutable `id` (never reused) and its name.

    Everything that acts on a record after an await names it by `id`: a name
    can be removed and taken by someone else's new sandbox meanwhile.
    """

    id: int
    name: str


class Owner(msgspec.Struct, frozen=True, kw_only=True):
    """Who a sandbox belongs to, as the kernel told the daemon when it was created.

    `gid` and `groups` come from `SO_PEERCRED` and `SO_PEERGROUPS`; they are
    None for records made before they were kept (then the user database is
    asked, at launch).
    """

    uid: int
    gid: int | None = None
    groups: tuple[int, ...] | None = None


class SandboxInfo(msgspec.Struct, frozen=True, kw_only=True):
    id: int
    name: str
    state: State
    owner_uid: int
    created_at: dt.datetime
    updated_at: dt.datetime
    labels: dict[str, str]
    run: RunInfo | None = None
    # None in `sandbox.list` entries unless the caller asks for specs.
    spec: LaunchSpec | None = None
    # From the spec, in every entry: None only for a record made before networks were
    # chosen (it gets the daemon's default when it starts).
    network: net.Network | None = None
    ports: list[net.PortMap] = []

    @property
    def ref(self) -> SandboxRef:
        return SandboxRef(self.id, self.name)


class Event(msgspec.Struct, frozen=True, kw_only=True):
    """One entry of the sequence-numbered events log (a state change)."""

    seq: int
    time: dt.datetime
    sandbox: str
    state: State
    sandbox_id: int | None = None  # None only for events recorded before ids existed
    run_id: int | None = None
    reason: Reason | None = None
    exit_code: int | None = None
    signal: int | None = None
    detail: str | None = None
