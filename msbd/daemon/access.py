"""Who may do what: sandbox ownership and host-path checks made as the caller.

A sandbox belongs to the uid that created it. Root and the daemon's own uid
act on every sandbox; any other uid sees only its own, and a sandbox it does
not own is reported as not found (its existence is not revealed).

Paths in a launch spec are checked with the caller's identity, not the
daemon's: every directory on the way must be searchable by the caller, and
the target readable (and writable for a disk that is not read-only). Mode
bits only; POSIX ACLs are not consulted (documented limitation).
"""

from __future__ import annotations

import os
import pwd
import stat
from dataclasses import dataclass
from functools import lru_cache

from msbd.errors import InvalidParams
from msbd.model import LaunchSpec, SandboxInfo


@dataclass(frozen=True, slots=True)
class Caller:
    uid: int
    gid: int
    pid: int = 0

    def is_admin(self, daemon_uid: int) -> bool:
        return self.uid in (0, daemon_uid)


def may_see(caller: Caller, info: SandboxInfo, daemon_uid: int) -> bool:
    return caller.is_admin(daemon_uid) or info.owner_uid == caller.uid


@lru_cache(maxsize=256)
def _groups(uid: int, gid: int) -> frozenset[int]:
    try:
        name = pwd.getpwuid(uid).pw_name
    except KeyError:
        return frozenset({gid})
    return frozenset(os.getgrouplist(name, gid)) | {gid}


def _allowed(st: os.stat_result, caller: Caller, want: int) -> bool:
    """Whether `caller` has the `want` bits (r=4, w=2, x=1) on a file with `st`."""
    if caller.uid == 0:
        # Root reads and writes anything; executes/searches if any x bit is set.
        return not (want & 1) or bool(st.st_mode & 0o111) or stat.S_ISDIR(st.st_mode)
    if st.st_uid == caller.uid:
        bits = (st.st_mode >> 6) & 7
    elif st.st_gid in _groups(caller.uid, caller.gid):
        bits = (st.st_mode >> 3) & 7
    else:
        bits = st.st_mode & 7
    return bits & want == want


def check_spec_paths(spec: LaunchSpec, caller: Caller) -> None:
    """Every host path in `spec` exists, has the right kind, and is usable by `caller`."""
    for field, path, needs_write in spec.host_paths():
        want_dir = field == "rootfs" or field.startswith("mounts[")
        check_path(path, caller, field=field, directory=want_dir, write=needs_write)


def check_path(path: str, caller: Caller, *, field: str, directory: bool, write: bool) -> None:
    try:
        real = os.path.realpath(path, strict=True)
        st = os.stat(real)
    except FileNotFoundError:
        raise InvalidParams(f"`{field}`: {path} does not exist", field=field) from None
    except OSError as exc:
        raise InvalidParams(f"`{field}`: {path}: {exc.strerror}", field=field) from None
    kind = "a directory" if directory else "a file"
    if directory != stat.S_ISDIR(st.st_mode) or not (
            directory or stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
        raise InvalidParams(f"`{field}`: {path} is not {kind}", field=field)
    # Every directory on the way to the target must be searchable by the caller.
    parent = os.path.dirname(real)
    while True:
        if not _allowed(os.stat(parent), caller, 1):
            raise InvalidParams(f"`{field}`: {path}: permission denied (uid {caller.uid} "
                                f"cannot search {parent})", field=field)
        if parent == "/":
            break
        parent = os.path.dirname(parent)
    want = 4 | (2 if write else 0) | (1 if directory else 0)
    if not _allowed(st, caller, want):
        need = "read and write" if write else "read"
        raise InvalidParams(f"`{field}`: {path}: permission denied (uid {caller.uid} cannot "
                            f"{need} it)", field=field)
