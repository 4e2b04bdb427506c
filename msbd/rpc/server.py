"""The JSON-RPC server: serves newline-delimited JSON-RPC 2.0 on a listening Unix socket.

How it works. The daemon creates and binds the socket; `serve_rpc` takes it
over and reports an `RpcServer` through `task_status.started(server)`. The
server accepts connections itself (a reader callback on the listening
socket, up to `_ACCEPT_BURST` per wakeup) and serves each admitted one as a
`msbd.rpc.protocol.ServerProtocol` with a task of its own in the server's
task group (how a connection is read, answered, held back and closed is
told there). The server and its connections share one `ServerState`: the
open connections and their per-uid counts, the calls in flight, whether the
server drains.

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

`RpcServer.drain(timeout)` stops accepting and reading, lets in-flight calls
finish within `timeout`, then cancels the rest; `serve_rpc` then returns.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
from collections.abc import Mapping
from typing import Final

import anyio
import anyio.abc

from msbd.errors import LimitReached
from msbd.peer import Peer, read_peer
from msbd.rpc.codec import encode_error
from msbd.rpc.handler import CallContext, Connection, Deferred, Handler, Immediate
from msbd.rpc.limits import RpcLimits
from msbd.rpc.protocol import ServerProtocol
from msbd.rpc.state import ServerState

__all__ = ["CallContext", "Connection", "Deferred", "Handler", "Immediate", "RpcLimits",
           "RpcServer", "serve_rpc"]

log = logging.getLogger("msbd.rpc")

_ACCEPT_BURST: Final = 128
"""Connections accepted per wakeup of the listening socket before others get the loop."""
_BACKOFF_MIN: Final = 0.05
_BACKOFF_MAX: Final = 1.0
_RESOURCE_ERRNOS: Final = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


class RpcServer:
    """A running server: `serve` it, then `close_listener()` or `drain(timeout)`."""

    def __init__(self, handler: Handler, *, limits: RpcLimits | None = None,
                 immediate: Mapping[str, Immediate] | None = None) -> None:
        """`immediate`: methods whose handler never suspends, answered without a task
        (`msbd.rpc.calls`); every other method goes to `handler`."""
        self.handler = handler
        self.limits = limits if limits is not None else RpcLimits()
        self._state = ServerState(handler, self.limits, immediate)
        self._state.released = self._descriptor_released
        self._tg: anyio.abc.TaskGroup | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._listener: socket.socket | None = None
        self._watching = False  # the reader callback is on the listening socket
        self._retry: asyncio.TimerHandle | None = None
        self._backoff = 0.0
        self._starved_since: float | None = None  # accept failing since (loop time)
        self._refused = 0  # connections refused since the limit was last reached

    @property
    def connection_count(self) -> int:
        """Connections open now (those still flushing their last replies included)."""
        return self._state.connection_count

    @property
    def inflight(self) -> int:
        """Calls running now, over all connections (deferred jobs not counted)."""
        return self._state.inflight

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
        self._state.drain()
        with anyio.move_on_after(timeout):
            await self._state.wait_idle()
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
        tg, state = self._tg, self._state
        if tg is None or state.draining:
            sock.close()
            return
        limits = self.limits
        peer = read_peer(sock)
        exempt = peer.known and peer.uid in limits.exempt_uids
        if self.connection_count >= limits.max_connections:
            self._refuse(sock, peer, "max_connections", limits.max_connections)
            return
        held = state.per_uid.get(peer.uid, 0)
        if (limits.max_connections_per_user is not None and not exempt
                and held >= limits.max_connections_per_user):
            self._refuse(sock, peer, "max_connections_per_user",
                         limits.max_connections_per_user)
            return
        if self._refused and self.connection_count < limits.max_connections:
            log.warning("accepting connections again: %d refused while at the limit of %d",
                        self._refused, limits.max_connections)
            self._refused = 0
        proto = ServerProtocol(state, peer)
        state.admit(proto, None if exempt else peer.uid)
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

    def _descriptor_released(self) -> None:
        """A connection's socket is closed: a starved accept may succeed now."""
        if self._starved_since is not None and self._listener is not None:
            self._resume()


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
