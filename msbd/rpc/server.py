"""The JSON-RPC server: serves newline-delimited JSON-RPC 2.0 on a listening Unix socket.

How it works. The daemon creates and binds the socket; `serve_rpc` takes it
over and reports an `RpcServer` through `task_status.started(server)`. Each
connection is an asyncio protocol (the daemon runs on asyncio/uvloop; reading
through a protocol keeps the ping round trip short) plus one task, owned by
the server's task group, that owns the connection's task group: every call,
batch and deferred job runs in it, so closing the connection cancels them all
and nothing escapes to the server.

Per connection: frames are split on b"\\n" from one buffer; a frame over
`max_frame_bytes` is answered with -32600 and the connection closed. Calls
run concurrently and are answered as they finish (ids match them up); a
batch is answered with one array line. While `max_inflight_per_connection`
calls run, or the client is not reading its replies, the connection is not
read (backpressure). Writes are whole frames through the transport, in the
order they are made. A watchdog closes a connection that is idle, sends half
a frame and stops, or stops reading its replies.

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
import itertools
import socket
from dataclasses import dataclass

import anyio
import anyio.abc

from msbd.rpc.connection import CallContext, Connection, Deferred, Handler, ServerProtocol

__all__ = ["CallContext", "Connection", "Deferred", "Handler", "RpcLimits", "RpcServer",
           "serve_rpc"]


@dataclass(frozen=True, slots=True)
class RpcLimits:
    """What one client may cost the daemon. Timeouts are seconds; None disables one."""

    max_frame_bytes: int = 1024 * 1024
    max_batch: int = 100
    max_inflight_per_connection: int = 64
    max_connections: int = 1024
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
        self._tg: anyio.abc.TaskGroup | None = None
        self._aserver: asyncio.AbstractServer | None = None
        self._inflight = 0
        self._draining = False
        self._idle: anyio.Event | None = None

    @property
    def connection_count(self) -> int:
        return len(self._protocols)

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
        loop = asyncio.get_running_loop()
        async with anyio.create_task_group() as tg:
            self._tg = tg
            try:
                self._aserver = await loop.create_unix_server(
                    lambda: ServerProtocol(self), sock=sock)
                task_status.started(self)
                await anyio.sleep_forever()
            finally:
                self.close_listener()
                tg.cancel_scope.cancel()

    def close_listener(self) -> None:
        """Stop accepting connections (and close the listening socket)."""
        if self._aserver is not None:
            self._aserver.close()

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

    # --- used by ServerProtocol ---

    def _admit(self, proto: ServerProtocol) -> bool:
        if len(self._protocols) >= self.limits.max_connections or self._tg is None:
            return False
        self._protocols.add(proto)
        self._tg.start_soon(proto.run, name=f"msbd.rpc connection {proto.conn_id}")
        return True

    def _calls_done(self, n: int) -> None:
        self._inflight -= n
        if not self._inflight and self._idle is not None:
            self._idle.set()


async def serve_rpc(listener: anyio.abc.SocketListener | socket.socket, handler: Handler,
                    limits: RpcLimits | None = None, *,
                    task_status: anyio.abc.TaskStatus[RpcServer] = anyio.TASK_STATUS_IGNORED,
                    ) -> None:
    """Serve JSON-RPC on an already listening Unix socket until cancelled or drained.

    `server = await tg.start(serve_rpc, sock, handler, limits)`; later
    `await server.drain(timeout)` for a graceful stop. Needs the asyncio backend.
    """
    await RpcServer(handler, limits=limits).serve(listener, task_status=task_status)

