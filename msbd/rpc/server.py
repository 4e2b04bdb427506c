"""The JSON-RPC server: serves newline-delimited JSON-RPC 2.0 on a listening Unix socket.

How it works. The daemon creates and binds the socket; `serve_rpc` takes it
over and reports an `RpcServer` through `task_status.started(server)`. The
server accepts connections itself (a reader callback on the listening
socket, up to `_ACCEPT_BURST` per wakeup); each admitted connection is an
asyncio protocol (the daemon runs on asyncio/uvloop; reading through a
protocol keeps the ping round trip short) plus one task, owned by the
server's task group, that owns the connection's task group: every call,
batch and deferred job runs in it, so closing the connection cancels them all
and nothing escapes to the server.

Accepting. Past `max_connections` a new connection gets one -32004 error
line (id null) and is closed; one warning is logged per such episode, not
one per connection. When `accept` fails for want of resources (EMFILE,
ENFILE, ENOBUFS, ENOMEM) or any other reason, the server stops watching the
listening socket, logs one warning for the episode, and tries again when one
of its connections has released its descriptor or after a back-off (50 ms,
doubling up to 1 s): never a busy loop. Meanwhile open connections are
served as usual and new clients wait in the listen backlog. (uvloop's own
server would instead apply libuv's EMFILE trick, closing waiting clients
unanswered and logging nothing, and would stop serving for good on any other
accept error.)

Per connection: frames are split on b"\\n" from one buffer; a frame over
`max_frame_bytes` is answered with -32600 and the connection closed. Calls
run concurrently and are answered as they finish (ids match them up); a
batch is answered with one array line. While `max_inflight_per_connection`
calls run, or the client is not reading its replies, the connection is not
read (backpressure). Writes are whole frames through the transport, in the
order they are made. A watchdog closes a connection that is idle, stops
reading its replies (`send_timeout`), or leaves a frame unfinished for
`frame_timeout` (answered with -32600 first). A connection closed with
replies still unsent gets `send_timeout` to take them, then is aborted: its
descriptor is never held longer.

After EOF from a client that only shut down its writing side, calls already
read still run and are answered, then the connection closes. A client that
closed its socket (POLLHUP at EOF) or a lost connection: everything on it is
cancelled.
`RpcServer.drain(timeout)` stops accepting and reading, lets in-flight calls
finish within `timeout`, then cancels the rest; `serve_rpc` then returns.
Calls run on worker tasks of the connection's task group that stay for the
next call (handing a call to an idle worker is cheaper than a new task).
"""

from __future__ import annotations

import asyncio
import errno
import itertools
import logging
import socket
from dataclasses import dataclass
from typing import Final

import anyio
import anyio.abc

from msbd.errors import LimitReached
from msbd.peer import Peer, read_peer
from msbd.rpc.codec import encode_error
from msbd.rpc.connection import CallContext, Connection, Deferred, Handler, ServerProtocol

__all__ = ["CallContext", "Connection", "Deferred", "Handler", "RpcLimits", "RpcServer",
           "serve_rpc"]

log = logging.getLogger("msbd.rpc")

_ACCEPT_BURST: Final = 128
"""Connections accepted per wakeup of the listening socket before others get the loop."""
_BACKOFF_MIN: Final = 0.05
_BACKOFF_MAX: Final = 1.0
_RESOURCE_ERRNOS: Final = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


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


class RpcServer:
    """A running server: `serve` it, then `close_listener()` or `drain(timeout)`."""

    def __init__(self, handler: Handler, *, limits: RpcLimits | None = None) -> None:
        self.handler = handler
        self.limits = limits if limits is not None else RpcLimits()
        self._ids = itertools.count(1)
        self._protocols: set[ServerProtocol] = set()
        self._per_uid: dict[int, int] = {}  # uid -> connections it holds (not exempt ones)
        self._lingering = 0  # closed connections still flushing their last replies
        self._tg: anyio.abc.TaskGroup | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._listener: socket.socket | None = None
        self._watching = False  # the reader callback is on the listening socket
        self._retry: asyncio.TimerHandle | None = None
        self._backoff = 0.0
        self._starved_since: float | None = None  # accept failing since (loop time)
        self._refused = 0  # connections refused since the limit was last reached
        self._inflight = 0
        self._draining = False
        self._idle: anyio.Event | None = None

    @property
    def connection_count(self) -> int:
        """Connections open now (those still flushing their last replies included)."""
        return len(self._protocols) + self._lingering

    @property
    def inflight(self) -> int:
        """Calls running now, over all connections (deferred jobs not counted)."""
        return self._inflight

    async def serve(self, listener: anyio.abc.SocketListener | socket.socket, *,
                    task_status: anyio.abc.TaskStatus[RpcServer] = anyio.TASK_STATUS_IGNORED,
                    ) -> None:
        """Serve until cancelled or drained. Takes over `listener` and closes it on exit."""
        if self._tg is not None:
            raise RuntimeError("this RpcServer is already serving")
        sock = listener if isinstance(listener, socket.socket) else listener.extra(
            anyio.abc.SocketAttribute.raw_socket)
        sock.setblocking(False)
        self._loop = asyncio.get_running_loop()
        async with anyio.create_task_group() as tg:
            self._tg = tg
            self._listener = sock
            try:
                self._watch()
                task_status.started(self)
                await anyio.sleep_forever()
            finally:
                self.close_listener()
                tg.cancel_scope.cancel()

    def close_listener(self) -> None:
        """Stop accepting connections (and close the listening socket)."""
        sock, self._listener = self._listener, None
        if sock is None:
            return
        self._unwatch(sock)
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None
        sock.close()

    async def drain(self, timeout: float) -> None:
        """Stop accepting and reading; wait up to `timeout` s for in-flight calls; cancel the rest.

        `serve` returns once this does.
        """
        self.close_listener()
        self._draining = True
        for proto in list(self._protocols):
            proto.update_reading()
        with anyio.move_on_after(timeout):
            while self._inflight:
                self._idle = anyio.Event()
                await self._idle.wait()
        if self._tg is not None:
            self._tg.cancel_scope.cancel()

    # --- accepting ---

    def _watch(self) -> None:
        if self._listener is not None and not self._watching and self._loop is not None:
            self._loop.add_reader(self._listener.fileno(), self._accept)
            self._watching = True

    def _unwatch(self, sock: socket.socket) -> None:
        if self._watching and self._loop is not None:
            self._loop.remove_reader(sock.fileno())
        self._watching = False

    def _accept(self) -> None:
        """The listening socket is readable: take what is waiting, up to a burst."""
        for _ in range(_ACCEPT_BURST):
            listener = self._listener
            if listener is None:
                return
            try:
                sock, _ = listener.accept()
            except (BlockingIOError, InterruptedError):
                # Everyone waiting was taken: only now is a starved episode over (a
                # released descriptor lets one client in, and the next may fail again).
                if self._starved_since is not None:
                    assert self._loop is not None
                    log.warning("accepting connections again after %.1f s (%d open)",
                                self._loop.time() - self._starved_since,
                                self.connection_count)
                    self._starved_since = None
                return
            except ConnectionAbortedError:
                continue  # gone before we took it
            except OSError as exc:
                self._starve(listener, exc)
                return
            self._open(sock)

    def _starve(self, listener: socket.socket, exc: OSError) -> None:
        """`accept` failed: stop watching, retry on a released descriptor or after a back-off."""
        loop = self._loop
        assert loop is not None
        self._unwatch(listener)
        if self._starved_since is None:
            self._starved_since = loop.time()
            self._backoff = _BACKOFF_MIN
            if exc.errno in _RESOURCE_ERRNOS:
                log.warning("cannot accept connections: %s (%d open); new clients wait until "
                            "a descriptor is released (retrying at least every %g s)",
                            exc.strerror or exc, self.connection_count, _BACKOFF_MAX)
            else:
                log.error("cannot accept connections: %r; retrying at least every %g s", exc,
                          _BACKOFF_MAX)
        else:
            self._backoff = min(self._backoff * 2, _BACKOFF_MAX)
        if self._retry is not None:
            self._retry.cancel()
        self._retry = loop.call_later(self._backoff, self._resume)

    def _resume(self) -> None:
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None
        self._watch()

    def _open(self, sock: socket.socket) -> None:
        tg = self._tg
        if tg is None or self._draining:
            sock.close()
            return
        limits = self.limits
        peer = read_peer(sock)
        exempt = peer.known and peer.uid in limits.exempt_uids
        if self.connection_count >= limits.max_connections:
            self._refuse(sock, peer, "max_connections", limits.max_connections)
            return
        held = self._per_uid.get(peer.uid, 0)
        if (limits.max_connections_per_user is not None and not exempt
                and held >= limits.max_connections_per_user):
            self._refuse(sock, peer, "max_connections_per_user",
                         limits.max_connections_per_user)
            return
        if self._refused and self.connection_count < limits.max_connections:
            log.warning("accepting connections again: %d refused while at the limit of %d",
                        self._refused, limits.max_connections)
            self._refused = 0
        proto = ServerProtocol(self, peer)
        if not exempt:
            self._per_uid[peer.uid] = held + 1
            proto.counted_uid = peer.uid
        self._protocols.add(proto)
        tg.start_soon(proto.serve_socket, sock, name=f"msbd.rpc connection {proto.conn_id}")

    def _refuse(self, sock: socket.socket, peer: Peer, setting: str, limit: int) -> None:
        """Over a connection limit: one -32004 line (id null), then close. Never blocks."""
        try:
            if setting == "max_connections":
                self._refused += 1
                if self._refused == 1:
                    log.warning("refusing connections: %d open, the limit (max_connections); "
                                "first refused: uid %d pid %d", limit, peer.uid, peer.pid)
            else:
                log.warning("refused a connection of uid %d pid %d: it holds %d, the limit "
                            "(%s)", peer.uid, peer.pid, limit, setting)
            sock.setblocking(False)
            sock.send(_too_many(setting, limit))  # a fresh socket's buffer takes this line
        except OSError:
            pass  # the client is gone already: nothing to tell it
        finally:
            sock.close()

    # --- used by ServerProtocol ---

    def _connection_ended(self, proto: ServerProtocol) -> None:
        if proto in self._protocols:
            self._protocols.discard(proto)
            self._release_uid(proto)

    def _release_uid(self, proto: ServerProtocol) -> None:
        uid = proto.counted_uid
        if uid is None:
            return
        proto.counted_uid = None
        left = self._per_uid.get(uid, 1) - 1
        if left > 0:
            self._per_uid[uid] = left
        else:
            self._per_uid.pop(uid, None)

    def _descriptor_released(self) -> None:
        """A connection's socket is closed: a starved accept may succeed now."""
        if self._starved_since is not None and self._listener is not None:
            self._resume()

    def _calls_done(self, n: int) -> None:
        self._inflight -= n
        if not self._inflight and self._idle is not None:
            self._idle.set()


def _too_many(setting: str, limit: int) -> bytes:
    what = ("too many connections" if setting == "max_connections"
            else f"too many connections from this user (at most {limit})")
    return encode_error(None, LimitReached(what, data={"limit": setting, "max": limit})) + b"\n"


async def serve_rpc(listener: anyio.abc.SocketListener | socket.socket, handler: Handler,
                    limits: RpcLimits | None = None, *,
                    task_status: anyio.abc.TaskStatus[RpcServer] = anyio.TASK_STATUS_IGNORED,
                    ) -> None:
    """Serve JSON-RPC on an already listening Unix socket until cancelled or drained.

    `server = await tg.start(serve_rpc, sock, handler, limits)`; later
    `await server.drain(timeout)` for a graceful stop. Needs the asyncio backend.
    """
    await RpcServer(handler, limits=limits).serve(listener, task_status=task_status)
