"""Who is at the other end of a Unix socket, as the kernel says: `SO_PEERCRED`, `SO_PEERGROUPS`.

The kernel records the peer's pid, uid and gid when it connects, and its
supplementary groups with them; nothing the client sends can change them.
These are the only source of a caller's identity: a uid is never looked up
in the user database to find its groups (a uid with no passwd entry would
get groups it was never checked for, and a user's group list can change
between connecting and acting).

Stdlib only, and shared: the RPC server reads its callers here, the daemon
the pid of a live daemon on its socket, the worker the pid of whoever
reached its control channel (it must be libkrun, i.e. the worker itself).
Because the worker imports it, `Peer` is a `NamedTuple`, not a dataclass:
`dataclasses` pulls in `inspect` (and `ast`, `dis`, `tokenize`), about 7 ms
of every worker's start for one small record.
"""

from __future__ import annotations

import errno
import select
import socket
import struct
from typing import Final, NamedTuple

_UCRED: Final = struct.Struct("3i")
# Linux's value; Python's socket module does not export it.
SO_PEERGROUPS: Final = getattr(socket, "SO_PEERGROUPS", 59)
_MAX_GROUPS: Final = 65536  # the kernel's NGROUPS_MAX


class Peer(NamedTuple):
    """The peer's credentials at connect time; uid/gid -1 when unknown."""

    pid: int = 0
    uid: int = -1
    gid: int = -1
    groups: frozenset[int] | None = None  # None: the kernel did not say

    @property
    def known(self) -> bool:
        return self.uid >= 0 and self.gid >= 0


UNKNOWN: Final = Peer()


def peer_pid(sock: socket.socket) -> int:
    """The peer's pid; raises `OSError`."""
    return peer_ucred(sock)[0]


def peer_ucred(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the peer; raises `OSError`."""
    pid, uid, gid = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                  _UCRED.size))
    return pid, uid, gid


def peer_groups(sock: socket.socket) -> frozenset[int]:
    """The peer's supplementary groups; raises `OSError` (ERANGE is retried bigger)."""
    size = 64 * 4
    while True:
        try:
            raw = sock.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, size)
        except OSError as exc:
            if exc.errno == errno.ERANGE and size < _MAX_GROUPS * 4:  # more groups than room
                size *= 16
                continue
            raise
        count = len(raw) // 4
        return frozenset(struct.unpack(f"{count}I", raw[:count * 4]))


def read_peer(sock: socket.socket) -> Peer:
    """Everything the kernel says about the peer; `UNKNOWN` fields where it says nothing."""
    try:
        pid, uid, gid = peer_ucred(sock)
    except (OSError, struct.error):
        return UNKNOWN
    try:
        groups: frozenset[int] | None = peer_groups(sock)
    except (OSError, struct.error):
        groups = None
    return Peer(pid=pid, uid=uid, gid=gid, groups=groups)


def peer_closed(sock: socket.socket | None) -> bool:
    """After EOF: did the peer close its socket, or only shut down its writing side?

    On Linux a Unix stream socket polls POLLHUP only once both directions
    are shut, i.e. the peer closed it; `shutdown(SHUT_WR)` leaves it writable.
    False when it cannot tell (no socket).
    """
    if sock is None:
        return False
    try:
        poller = select.poll()
        poller.register(sock.fileno(), select.POLLOUT)
        return any(events & select.POLLHUP for _, events in poller.poll(0))
    except (OSError, ValueError):
        return False
