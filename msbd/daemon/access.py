"""Who may do what: sandbox ownership, and host paths checked as the caller.

The rules
---------
- Identity. A connection's uid, gid and pid come from `SO_PEERCRED`, its
  supplementary groups from `SO_PEERGROUPS` (taken by the rpc layer when the
  client connected); the user database is never asked. A sandbox records its
  creator's uid, gid and groups, and its VM runs with exactly those. A
  connection without them
  (uid or gid -1) gets -32003 permission denied for every method but
  `daemon.ping` and `rpc.discover`: an unknown caller owns nothing.
- Ownership. A sandbox belongs to the uid that created it (`owner_uid`).
  Root and the daemon's own uid are admins and act on every sandbox. Any
  other uid sees only its own: `sandbox.list`, `events.subscribe` (live and
  replayed with `since`) and `daemon.info`'s counts cover its own sandboxes,
  and every call naming a sandbox it does not own fails exactly as for a
  name that does not exist (-32001, same message and data). -32003 is never
  used for ownership: it would reveal that the sandbox exists.
- Names are one namespace for all uids. Creating a sandbox whose name is
  taken is -32002 `sandbox 'x' already exists` whoever owns it; the reply
  says only that the name is taken (not the owner, state or anything else).
  This is the one way a uid learns that a name it does not own exists, and
  it cannot be avoided without per-uid namespaces.
- Secrets. `spec.env` is returned as given, to the owner and the admins
  only (no one else ever sees the record). It never reaches a command line,
  the worker's environment (the worker reads the spec from a sealed memfd)
  or the daemon's log; it is stored in the database under the 0700 state
  directory.
- Host paths. Every host path in a launch spec (rootfs, root_disk.path,
  mounts[].host, disks[].host) is walked the way the kernel would walk it
  for the caller: each directory on the way (symlinks followed, their
  targets walked too) must be searchable by the caller before the next name
  in it is looked at, so a refusal never tells whether something exists
  where the caller could not look. The target must have the right kind and
  be readable by the caller, and writable too wherever the guest can write:
  a disk that is not read-only, a mount that is not read-only, and the rootfs
  (libkrun shares it read-write). A sandbox may thus change on the host only
  what its owner could change there. When the daemon is not root, the same
  walk is made as the daemon too (the worker runs as the daemon), so a path
  the worker could not open is refused up front. A refusal is -32602 naming
  the field; its message says "permission denied" and which uid cannot do
  what. `sandbox.start` and `sandbox.restart` check again, as the caller of
  that call. A walk that enters /proc is refused: its entries lead into
  other processes' files and mounts.

Limits, said plainly: the check uses mode bits and group membership (POSIX
ACLs, capabilities other than root's and LSMs are not consulted); group
membership is the peer's primary gid plus the groups `SO_PEERGROUPS` gave.
It is an early refusal with a clear message, not the guard: it looks at
names, and a caller who can rename entries on the way can swap them before
the launch. The guard is the worker, which takes the owner's uid, gid and
groups before it opens any host path, opens each one itself, once, and hands
libkrun the open file (`msbd.vm.hostfiles`): whatever a name leads to by
then, the VM gets only what its owner could open.
"""

from __future__ import annotations

import os
import pwd
import stat
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from msbd.errors import InvalidParams, PermissionDenied
from msbd.model import LaunchSpec, Owner, SandboxInfo, under_proc

# Methods a connection whose identity is unknown may still call.
OPEN_METHODS: Final = frozenset({"daemon.ping", "rpc.discover"})
# The kernel's limit on symlinks followed in one path walk (ELOOP).
_MAX_LINKS: Final = 40
_R, _W, _X = 4, 2, 1


@dataclass(frozen=True, slots=True)
class Caller:
    """Who is calling: the peer's credentials, as the kernel gave them."""

    uid: int
    gid: int
    pid: int = 0
    groups: frozenset[int] | None = None
    """Supplementary groups (`SO_PEERGROUPS`); None when the kernel did not say: then
    the caller counts as a member of its primary group only."""

    @property
    def known(self) -> bool:
        return self.uid >= 0 and self.gid >= 0

    def is_admin(self, daemon_uid: int) -> bool:
        return self.known and self.uid in (0, daemon_uid)

    def all_groups(self) -> frozenset[int]:
        """The primary gid and the supplementary groups, exactly as the kernel gave them."""
        return (self.groups or frozenset()) | {self.gid}

    def as_owner(self) -> Owner:
        """What a sandbox this caller creates records about its owner."""
        return Owner(uid=self.uid, gid=self.gid, groups=tuple(sorted(self.all_groups())))


def daemon_identity() -> Caller:
    return Caller(uid=os.getuid(), gid=os.getgid(), pid=os.getpid(),
                  groups=frozenset(os.getgroups()))


def check_identity(caller: Caller, method: str) -> None:
    """-32003 for a caller without credentials, except for the open methods."""
    if not caller.known and method not in OPEN_METHODS:
        raise PermissionDenied("permission denied: the daemon could not tell who is calling "
                               "(no peer credentials)", data={"method": method})


def may_see(caller: Caller, info: SandboxInfo, daemon_uid: int) -> bool:
    return caller.is_admin(daemon_uid) or (caller.known and info.owner_uid == caller.uid)


def allowed(st: os.stat_result, uid: int, groups: frozenset[int], want: int) -> bool:
    """Whether `uid` (in `groups`) has the `want` bits (r=4, w=2, x=1) on a file with `st`."""
    if uid == 0:
        # Root reads, writes and searches anything; executes a file with any x bit.
        return not (want & _X) or stat.S_ISDIR(st.st_mode) or bool(st.st_mode & 0o111)
    if st.st_uid == uid:
        bits = (st.st_mode >> 6) & 7  # the owner class decides, even if group bits allow more
    elif st.st_gid in groups:
        bits = (st.st_mode >> 3) & 7
    else:
        bits = st.st_mode & 7
    return bits & want == want


def check_spec_paths(spec: LaunchSpec, caller: Caller, *, daemon: Caller | None = None) -> None:
    """Every host path in `spec` exists, has the right kind, and is usable by `caller`.

    `daemon`: the daemon's own identity; when it is neither root nor the
    caller, the paths are checked for it too (the worker runs as the daemon).
    """
    who = [caller]
    if daemon is not None and daemon.uid not in (0, caller.uid):
        who.append(daemon)
    for field, path, needs_write in spec.host_paths():
        directory, write = _guest_use(spec, field, needs_write)
        for identity in who:
            check_path(path, identity, field=field, directory=directory, write=write,
                       as_daemon=identity is not caller)


def _guest_use(spec: LaunchSpec, field: str, needs_write: bool) -> tuple[bool, bool]:
    """(is a directory, the guest can write it) for one of `spec.host_paths()`."""
    if field == "rootfs":
        return True, True  # libkrun shares the root directory read-write
    if field.startswith("mounts["):
        index = int(field[len("mounts["):field.index("]")])
        return True, not spec.mounts[index].readonly
    return False, needs_write


def check_path(path: str, caller: Caller, *, field: str, directory: bool, write: bool,
               as_daemon: bool = False) -> str:
    """Walk `path` as `caller`; return the resolved path or raise `InvalidParams`."""
    who = f"the daemon's uid {caller.uid}" if as_daemon else f"uid {caller.uid}"

    def refuse(problem: str) -> InvalidParams:
        """`problem` goes right after the path: " does not exist", ": permission denied"."""
        return InvalidParams(f"`{field}`: {path}{problem}", field=field)

    groups = caller.all_groups()
    real, st = _walk(path, caller.uid, groups, refuse, who)
    if directory and not stat.S_ISDIR(st.st_mode):
        raise refuse(" is not a directory")
    if not directory and not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
        raise refuse(" is not a regular file or block device")
    want = _R | (_W if write else 0) | (_X if directory else 0)
    if not allowed(st, caller.uid, groups, want):
        need = "read and write" if write else "read"
        shown = path if real == path else f"{real} (where {path} leads)"
        raise refuse(f": permission denied ({who} cannot {need} {shown})")
    return real


def _walk(path: str, uid: int, groups: frozenset[int], refuse: Callable[[str], InvalidParams],
          who: str) -> tuple[str, os.stat_result]:
    """Resolve `path` name by name as the kernel would for `uid`: search permission on
    each directory is checked before the next name in it is looked up."""
    if not path.startswith("/"):
        raise refuse(" is not an absolute path")
    names = deque(path.split("/"))
    current = "/"
    links = 0
    try:
        st = os.stat(current)
        while names:
            name = names.popleft()
            if name in ("", "."):
                continue
            if not stat.S_ISDIR(st.st_mode):
                raise refuse(f": {current} is not a directory")
            if not allowed(st, uid, groups, _X):
                raise refuse(f": permission denied ({who} cannot search {current})")
            if name == "..":
                current = os.path.dirname(current)
                st = os.stat(current)
                continue
            candidate = os.path.join(current, name)
            if under_proc(candidate):
                raise refuse(": it leads into /proc, which msbd never opens")
            lst = os.lstat(candidate)
            if stat.S_ISLNK(lst.st_mode):
                links += 1
                if links > _MAX_LINKS:
                    raise refuse(": too many levels of symbolic links")
                target = os.readlink(candidate)
                if target.startswith("/"):
                    current = "/"
                    st = os.stat(current)
                names.extendleft(reversed(target.split("/")))
                continue
            current, st = candidate, lst
    except FileNotFoundError:
        raise refuse(" does not exist") from None
    except PermissionError:
        # The daemon itself cannot look (it is not root): neither could its worker.
        raise refuse(f": permission denied (the daemon's uid {os.getuid()} cannot reach it)"
                     ) from None
    except OSError as exc:
        raise refuse(f": {exc.strerror or exc}") from None
    return current, st


def vm_identity(owner: Owner, daemon_uid: int) -> tuple[int | None, int | None, list[int] | None]:
    """(uid, gid, groups) a sandbox's VM runs as: its owner's, as recorded when the sandbox
    was created, unless the owner is root or the daemon's own uid (then the worker keeps
    the daemon's). A record from before gids were kept falls back to the user database."""
    if owner.uid in (0, daemon_uid):
        return None, None, None
    if owner.gid is not None and owner.groups is not None:
        return owner.uid, owner.gid, sorted(set(owner.groups))
    try:
        entry = pwd.getpwuid(owner.uid)
    except KeyError:  # no passwd entry and nothing recorded: its own number, no groups
        return owner.uid, owner.uid, []
    return owner.uid, entry.pw_gid, sorted(os.getgrouplist(entry.pw_name, entry.pw_gid))


def owner_caller(owner: Owner, daemon_uid: int) -> Caller | None:
    """The identity the VM of `owner`'s sandbox uses, as a `Caller` for path checks;
    None when the VM keeps the daemon's identity."""
    uid, gid, groups = vm_identity(owner, daemon_uid)
    if uid is None or gid is None:
        return None
    return Caller(uid=uid, gid=gid, groups=frozenset(groups or ()))
