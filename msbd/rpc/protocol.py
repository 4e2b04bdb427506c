"""One client connection of the RPC server, as an asyncio protocol (internal).

How a connection works. For each admitted socket the server starts
`serve_socket` in its own task group; that task owns the connection's task
group, in which every call, batch and deferred job runs: closing the
connection cancels them all, and nothing escapes to the server. Reading goes
through an asyncio protocol (on asyncio/uvloop a protocol keeps the ping
round trip short); nothing is read before the task runs.

Frames are split on b"\\n" (`Framer`); a frame over `max_frame_bytes`, whole
or still growing, is answered with -32600 (id null) and the connection
closed. What becomes of a frame once read is `msbd.rpc.calls`: calls run
concurrently on worker tasks and are answered as they finish (ids match them
up), a call that never suspends is answered inline, a batch with one array
line once all its calls are done, and deferred jobs start once their call's
reply is written. Writes are whole frames, in the order they are made.
While `max_inflight_per_connection` calls run, or the client is not reading
its replies, the connection is not read (`FlowControl`).

A watchdog task closes a connection that is idle, stops reading its replies
or leaves a frame unfinished (`limits.close_deadline`). A connection closed
with replies still unsent gets `send_timeout` to take them, then is aborted:
its descriptor is never held longer (it counts as open meanwhile).

After EOF from a client that only shut down its writing side, calls already
read still run and are answered (a last frame without its newline too), then
the connection closes. A client that closed its socket (POLLHUP at EOF) or a
lost connection: everything on it is cancelled. The protocol counts itself
in and out of the `ServerState` it shares; it never reaches into the server.
"""

from __future__ import annotations

import asyncio
import logging
import math
import socket
from typing import cast

import anyio
import anyio.abc

from msbd.peer import UNKNOWN, Peer, peer_closed
from msbd.rpc.calls import CallRunner
from msbd.rpc.codec import Call, Item, encode_error
from msbd.rpc.flow import FlowControl
from msbd.rpc.framing import Framer, FrameTooLong
from msbd.rpc.handler import Connection
from msbd.rpc.limits import Stall, close_deadline
from msbd.rpc.state import ServerState

log = logging.getLogger("msbd.rpc")


class ServerProtocol(CallRunner, asyncio.Protocol):
    """One connection's framing, flow control and watchdog; its calls run through
    `CallRunner` (internal)."""

    def __init__(self, state: ServerState, peer: Peer = UNKNOWN) -> None:
        self.state = state
        self.peer = peer
        self.limits = state.limits
        self.handler = state.handler
        self.immediate = state.immediate
        self.conn_id = next(state.ids)
        self.loop = asyncio.get_running_loop()
        self.frames = Framer(self.limits.max_frame_bytes)
        self.flow = FlowControl()
        self.inflight = 0  # calls running (a batch counts each of its calls)
        self.busy = 0  # deferred jobs running
        self.closing = False
        self.lost = False
        self.eof = False
        self.ended = anyio.Event()
        self.tg: anyio.abc.TaskGroup | None = None
        self.conn: Connection | None = None
        self.last_active = self.loop.time()
        self.frame_started: float | None = None
        self.watch_deadline = math.inf
        self.watch_wake = anyio.Event()
        self.idle_workers: list[asyncio.Future[Call | list[Item]]] = []
        self.lingering = False  # closed, still flushing replies: counted by the state
        self.linger: asyncio.TimerHandle | None = None

    # --- asyncio callbacks ---

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport
        self.transport = transport = cast(asyncio.Transport, transport)
        self.flow.attach(transport)
        if not self.peer.known:
            log.warning("connection %d: no peer credentials", self.conn_id)
        self.conn = Connection(self, self.conn_id, self.peer)
        # Not read until the connection's task runs (see `FlowControl.set_reading`).
        transport.pause_reading()

    def data_received(self, data: bytes) -> None:
        if self.closing:
            return
        self.last_active = self.loop.time()
        if self.may_read() and (line := self.frames.single(data)):
            # One whole frame and nothing buffered (a client that waits for each reply):
            # dispatched straight from the chunk, never copied into the framer. Nothing
            # was buffered, so no frame was unfinished (`frame_started` is None). A call
            # answered inline takes no slot: the gate stays as `may_read` found it, or
            # whatever shut it meanwhile (writing paused, closing, draining) set it too.
            inflight = self.inflight
            self.dispatch(line)
            if self.inflight != inflight and not self.closing:
                self.update_reading()
            return
        self.frames.feed(data)
        self.process()

    def eof_received(self) -> bool:
        self.eof = True
        if peer_closed(self.transport.get_extra_info("socket")):  # nobody to answer
            self.close(abort=True)
            return True
        if not self.closing and self.frames.finish():  # a last frame without its newline
            self.process()
        self.check_ended()
        return True  # keep our side open to write the replies

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = self.closing = True
        if self.lingering:
            self.lingering = False
            self.state.lingering -= 1
        if self.linger is not None:
            self.linger.cancel()
            self.linger = None
        self.state.released()
        self.flow.close()
        self.ended.set()
        if self.tg is not None:
            self.tg.cancel_scope.cancel()

    def pause_writing(self) -> None:
        now = self.loop.time()
        self.flow.pause_writing(now)
        self.update_reading()
        self.wake_watchdog(self.limits.send_timeout, now)

    def resume_writing(self) -> None:
        self.flow.resume_writing()
        self.process()

    # --- framing and dispatch ---

    def may_read(self) -> bool:
        """Whether this connection takes another frame now (the read gate's rule)."""
        return (self.tg is not None and not self.closing and not self.flow.write_paused
                and not self.state.draining
                and self.inflight < self.limits.max_inflight_per_connection)

    def process(self) -> None:
        """Dispatch every complete frame in the buffer the inflight limit allows."""
        if self.tg is None:  # data before the connection's task runs: keep it for then
            self.update_reading()
            return
        frames = self.frames
        try:
            while self.may_read() and (line := frames.pop()) is not None:
                self.dispatch(line)
            if self.closing:
                return
            unfinished = frames.unfinished()
        except FrameTooLong as exc:
            log.warning("connection %d: frame over the limit of %d bytes, closing",
                        self.conn_id, exc.limit)
            self.write(encode_error(None, exc))
            self.close()
            return
        if not unfinished:
            self.frame_started = None
        elif self.frame_started is None:
            self.frame_started = self.loop.time()
            self.wake_watchdog(self.limits.frame_timeout, self.frame_started)
        self.update_reading()

    def after_work(self) -> None:
        if not self.inflight and not self.busy:
            self.last_active = self.loop.time()
        if not self.closing:
            # Also with an empty buffer: reading may be paused on the inflight
            # limit (a batch over it), and only `process` resumes it.
            self.process()
        self.check_ended()

    def check_ended(self) -> None:
        """After EOF: end once nothing is left to run or answer."""
        if self.eof and not self.inflight and not self.busy and not self.frames.has_frame():
            self.ended.set()

    # --- writing, the read gate, closing (the `Link` of the handlers' `Connection`) ---

    def write(self, data: bytes) -> None:
        if not self.closing:
            self.transport.write(data + b"\n")

    async def wait_writable(self) -> None:
        await self.flow.wait_writable()

    def update_reading(self) -> None:
        self.flow.set_reading(not self.eof and self.may_read())

    def close(self, *, abort: bool = False) -> None:
        """Close; `abort` drops unsent replies. A graceful close that leaves replies
        unsent gives the client `send_timeout` to read them, then aborts."""
        transport = self.transport
        if not transport.is_closing():
            if abort:
                transport.abort()
            else:
                pending = transport.get_write_buffer_size()
                transport.close()
                if pending and not self.lost:
                    self.lingering = True
                    self.state.lingering += 1
                    if self.limits.send_timeout is not None:
                        self.linger = self.loop.call_later(self.limits.send_timeout,
                                                           self.abort_lingering)
        self.closing = True
        self.flow.close()
        self.ended.set()

    def abort_lingering(self) -> None:
        self.linger = None
        if not self.lost:
            log.warning("connection %d: client did not read its last replies within %ss, "
                        "aborting", self.conn_id, self.limits.send_timeout)
            self.transport.abort()

    # --- the connection's task ---

    async def serve_socket(self, sock: socket.socket) -> None:
        """Serve an accepted socket (admitted by the server) until the connection ends."""
        try:
            await self.loop.connect_accepted_socket(lambda: self, sock)
        except BaseException as exc:
            # The transport closed (or never took) the socket; closing the same
            # socket object again is a no-op, never a second close of the fd.
            sock.close()
            self.state.ended(self)
            if isinstance(exc, OSError):
                log.debug("connection %d: lost before it was set up: %s", self.conn_id, exc)
                return
            raise
        await self.run()

    async def run(self) -> None:
        """Serve the connected transport until the connection ends."""
        conn = self.conn
        assert conn is not None
        log.debug("connection %d opened (uid %d gid %d pid %d)", conn.id, conn.uid, conn.gid,
                  conn.pid)
        try:
            async with anyio.create_task_group() as tg:
                self.tg = tg
                if self.lost:
                    tg.cancel_scope.cancel()
                if self.limits.watched:
                    tg.start_soon(self.watchdog)
                self.process()
                await self.ended.wait()
                tg.cancel_scope.cancel()
        except Exception:
            log.error("connection %d: unexpected error", conn.id, exc_info=True)
        finally:
            self.state.ended(self)
            self.close()
            log.debug("connection %d closed", conn.id)

    def wake_watchdog(self, timeout: float | None, since: float) -> None:
        if timeout is not None and since + timeout < self.watch_deadline:
            self.watch_wake.set()

    async def watchdog(self) -> None:
        """Close the connection when it is idle, stalls mid-frame, or stops reading."""
        while True:
            now = self.loop.time()
            deadline, why = close_deadline(
                self.limits, now=now, last_active=self.last_active,
                busy=bool(self.inflight or self.busy), frame_started=self.frame_started,
                write_paused_at=self.flow.paused_at)
            if why is not None and deadline <= now:
                if why is Stall.IDLE:
                    log.debug("connection %d: idle for %ss, closing", self.conn_id,
                              self.limits.idle_timeout)
                else:
                    log.warning("connection %d: client %s, closing", self.conn_id, why)
                self.close(abort=why is Stall.NOT_READING)
                return
            self.watch_deadline = deadline
            self.watch_wake = anyio.Event()
            with anyio.CancelScope(deadline=deadline):
                await self.watch_wake.wait()

