"""What starting and live sandboxes hold, and whether one more fits: the daemon's limits.

How it works: every sandbox from the moment a start is admitted until its
worker process is gone holds a `Share` (its vcpus and memory, and its
owner). A start asks `reserve`, which checks every limit and takes the share
in one synchronous step, so two starts racing for the last slot cannot both
pass. The share is released when the worker is gone, even if recording the
run's end is still being retried: limits follow what is running, not what
the database has caught up with.

The global limits (`max_sandboxes`, `max_vcpus`, `max_memory_mib`) apply to
everyone. The per-user ones (`max_live_sandboxes_per_user`,
`max_memory_mib_per_user`) apply to each owner but the admins (root and the
daemon's own uid), so one user filling their share never costs another user
anything. A refusal is `LimitReached` naming the setting.

Published host ports are held the same way: a start whose spec publishes a
host port that a starting or live sandbox holds is refused (`PortInUse`,
naming that sandbox if it is the same owner's, else only saying it is
another user's), in the same synchronous step.
"""

from __future__ import annotations

from dataclasses import dataclass

from msbd.config import Settings
from msbd.errors import LimitReached, PortInUse
from msbd.model import LaunchSpec


@dataclass(frozen=True, slots=True)
class Share:
    owner_uid: int
    vcpus: int
    memory_mib: int
    name: str = ""
    host_ports: frozenset[int] = frozenset()


def share_of(spec: LaunchSpec, owner_uid: int, name: str) -> Share:
    """What a run of `spec` holds while it is starting or live."""
    return Share(owner_uid, spec.vcpus, spec.memory_mib, name=name,
                 host_ports=frozenset(p.host for p in spec.ports))


@dataclass(frozen=True, slots=True)
class Usage:
    sandboxes: int
    vcpus: int
    memory_mib: int


class Limits:
    """The shares held now, by sandbox id."""

    def __init__(self, settings: Settings, admins: frozenset[int]) -> None:
        self._s = settings
        self._admins = admins
        self._held: dict[int, Share] = {}

    def holds(self, sandbox_id: int) -> bool:
        return sandbox_id in self._held

    def usage(self, owner_uid: int | None = None) -> Usage:
        """What is held, in all or by `owner_uid`."""
        shares = [s for s in self._held.values()
                  if owner_uid is None or s.owner_uid == owner_uid]
        return Usage(len(shares), sum(s.vcpus for s in shares),
                     sum(s.memory_mib for s in shares))

    def check(self, share: Share, *, name: str) -> None:
        """`LimitReached` if `share` would not fit now, `PortInUse` if a host port it
        publishes is held."""
        self._check_ports(share, name)
        s = self._s
        data = {"sandbox": name}
        total = self.usage()
        if total.sandboxes + 1 > s.max_sandboxes:
            raise LimitReached(f"limit reached: at most {s.max_sandboxes} live sandboxes",
                               data=data | {"limit": "max_sandboxes"})
        if total.vcpus + share.vcpus > s.max_vcpus:
            raise LimitReached(f"limit reached: {total.vcpus} of {s.max_vcpus} vcpus in use, "
                               f"{share.vcpus} more asked", data=data | {"limit": "max_vcpus"})
        if total.memory_mib + share.memory_mib > s.max_memory_mib:
            raise LimitReached(f"limit reached: {total.memory_mib} of {s.max_memory_mib} MiB "
                               f"in use, {share.memory_mib} more asked",
                               data=data | {"limit": "max_memory_mib"})
        if share.owner_uid in self._admins:
            return
        mine = self.usage(share.owner_uid)
        if mine.sandboxes + 1 > s.max_live_sandboxes_per_user:
            raise LimitReached(
                f"limit reached: uid {share.owner_uid} has {mine.sandboxes} live sandboxes, "
                f"at most {s.max_live_sandboxes_per_user}",
                data=data | {"limit": "max_live_sandboxes_per_user"})
        if mine.memory_mib + share.memory_mib > s.max_memory_mib_per_user:
            raise LimitReached(
                f"limit reached: uid {share.owner_uid} uses {mine.memory_mib} of "
                f"{s.max_memory_mib_per_user} MiB, {share.memory_mib} more asked",
                data=data | {"limit": "max_memory_mib_per_user"})

    def _check_ports(self, share: Share, name: str) -> None:
        if not share.host_ports:
            return
        for held in self._held.values():
            if taken := share.host_ports & held.host_ports:
                port = min(taken)
                whose = (f"sandbox {held.name!r}" if held.owner_uid == share.owner_uid
                         else "a sandbox of another user")
                raise PortInUse(f"host port {port} is published by {whose}, which is running",
                               data={"sandbox": name, "port": port, "field": "ports"})

    def reserve(self, sandbox_id: int, share: Share, *, name: str) -> None:
        self.check(share, name=name)
        self._held[sandbox_id] = share

    def release(self, sandbox_id: int) -> None:
        self._held.pop(sandbox_id, None)
