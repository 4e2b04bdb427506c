"""What one client may cost the server, and when a connection has used up its time.

`RpcLimits` is the server's settings. `close_deadline` is the watchdog's
policy as a pure function of plain numbers (loop times in seconds): given
what a connection is doing, the next time it must be looked at, and what it
would be closed for then. Three clocks run, and the earliest decides:

- `send_timeout` from when the transport paused writing: the client does
  not read its replies (closed by abort: its unsent replies are dropped);
- `frame_timeout` from the first byte of a frame still unfinished;
- `idle_timeout` from the last activity (bytes read, a call or deferred job
  done). A connection that runs calls or jobs, or holds a frame half read,
  is not idle: its idle clock only says when to look again.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class RpcLimits:
    """What one client may cost the daemon. Timeouts are seconds; None disables one."""

    max_frame_bytes: int = 1024 * 1024
    max_batch: int = 100
    max_inflight_per_connection: int = 64
    max_connections: int = 1024
    max_connections_per_user: int | None = None
    """Connections one uid may hold at once (the `exempt_uids` are not counted)."""
    exempt_uids: frozenset[int] = frozenset()
    """Uids the per-user limit does not apply to (the daemon's admins)."""
    idle_timeout: float | None = 300.0
    """Close a connection with no calls, no deferred work and no traffic for this long."""
    frame_timeout: float | None = 30.0
    """Close a connection whose started frame is not finished within this long."""
    send_timeout: float | None = 30.0
    """Close a connection that does not read its replies for this long."""

    @property
    def watched(self) -> bool:
        """Whether any timeout is set, i.e. a connection needs a watchdog at all."""
        return (self.idle_timeout, self.frame_timeout, self.send_timeout) != (None, None, None)


class Stall(enum.StrEnum):
    """Why the watchdog closes a connection (the words finish "client ...")."""

    NOT_READING = "does not read"
    UNFINISHED = "left a frame unfinished"
    IDLE = "idle"


def close_deadline(limits: RpcLimits, *, now: float, last_active: float, busy: bool,
                   frame_started: float | None, write_paused_at: float | None,
                   ) -> tuple[float, Stall | None]:
    """(deadline, why): when to look at the connection next, and what closes it then.

    `busy`: calls or deferred jobs are running. `why` is None when the deadline
    only says "look again" (a busy connection's idle clock); `math.inf` when no
    clock runs. Close when `why` is set and `deadline <= now`.
    """
    deadline, why = math.inf, None
    if limits.send_timeout is not None and write_paused_at is not None:
        deadline, why = write_paused_at + limits.send_timeout, Stall.NOT_READING
    if limits.frame_timeout is not None and frame_started is not None and (
            t := frame_started + limits.frame_timeout) < deadline:
        deadline, why = t, Stall.UNFINISHED
    if limits.idle_timeout is not None:
        if busy or frame_started is not None:
            t, reason = now + limits.idle_timeout, None
        else:
            t, reason = last_active + limits.idle_timeout, Stall.IDLE
        if t < deadline:
            deadline, why = t, reason
    return deadline, why
