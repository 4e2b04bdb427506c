"""What the RPC server shares with every connection it admitted: `ServerState`.

One object, made by the server and handed to each connection's protocol,
holds the handler (and the methods answered without suspending), the limits,
the open connections with the uid each is counted against, and the counters
the server reads to admit, drain and report. A connection counts itself in
and out here; neither side reaches into the other's attributes. It knows a
connection only as a `Member`, so it imports no protocol: the server
imports both, nothing imports back.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping
from typing import Protocol

import anyio

from msbd.rpc.handler import Handler, Immediate
from msbd.rpc.limits import RpcLimits


class Member(Protocol):
    """A connection as the state sees it."""

    def update_reading(self) -> None:
        """Open or shut the read gate again: the server's draining may have changed it."""


class ServerState:
    """Shared by the server and every connection it admitted."""

    def __init__(self, handler: Handler, limits: RpcLimits,
                 immediate: Mapping[str, Immediate] | None = None) -> None:
        self.handler = handler
        self.immediate: Mapping[str, Immediate] = immediate or {}
        """Methods answered inline by a handler that never suspends (`msbd.rpc.calls`)."""
        self.limits = limits
        self.ids = itertools.count(1)
        self.open: dict[Member, int | None] = {}  # admitted, not ended -> uid counted, if any
        self.per_uid: dict[int, int] = {}  # uid -> connections it holds (not exempt ones)
        self.lingering = 0  # closed connections still flushing their last replies
        self.inflight = 0  # calls running over all connections (deferred jobs not counted)
        self.draining = False
        self.released: Callable[[], None] = _nothing
        """Called when a connection's socket is closed (a starved server may accept again)."""
        self._idle: anyio.Event | None = None

    @property
    def connection_count(self) -> int:
        """Connections open now (those still flushing their last replies included)."""
        return len(self.open) + self.lingering

    def admit(self, member: Member, uid: int | None) -> None:
        """Count `member` in, and against `uid`'s per-user limit (None: exempt)."""
        if uid is not None:
            self.per_uid[uid] = self.per_uid.get(uid, 0) + 1
        self.open[member] = uid

    def ended(self, member: Member) -> None:
        """Count `member` out (again is a no-op)."""
        if member not in self.open:
            return
        uid = self.open.pop(member)
        if uid is None:
            return
        left = self.per_uid.get(uid, 1) - 1
        if left > 0:
            self.per_uid[uid] = left
        else:
            self.per_uid.pop(uid, None)

    def drain(self) -> None:
        """Stop reading every connection (calls already read still run)."""
        self.draining = True
        for member in list(self.open):
            member.update_reading()

    def calls_started(self, n: int) -> None:
        self.inflight += n

    def calls_done(self, n: int) -> None:
        self.inflight -= n
        if not self.inflight and self._idle is not None:
            self._idle.set()

    async def wait_idle(self) -> None:
        """Return once no call runs on any connection."""
        while self.inflight:
            self._idle = anyio.Event()
            await self._idle.wait()


def _nothing() -> None:
    pass
