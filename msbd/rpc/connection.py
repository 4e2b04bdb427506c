"""One client connection of the RPC server: framing, dispatch, flow control, watchdog.

`Connection` and `CallContext` are what handlers see; `ServerProtocol` is the
asyncio protocol behind them, internal to `msbd.rpc.server` (see its docstring
for how a connection behaves).
"""

from __future__ import annotations

import asyncio
import logging
import math
import select
import socket
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Final, cast

import anyio
import anyio.abc

from msbd.errors import InvalidRequest, MsbdError
from msbd.model import Spec
from msbd.peer import UNKNOWN, Peer
from msbd.rpc.codec import (
    Batch,
    Call,
    Invalid,
    Item,
    encode_batch,
    encode_error,
    encode_notification,
    encode_result,
    parse_frame,
)

if TYPE_CHECKING:
    from msbd.rpc.server import RpcServer

log = logging.getLogger("msbd.rpc")

Handler = Callable[["CallContext", str, Spec], Awaitable[Any]]
"""`await handler(ctx, method, params)`; the result is encoded with msgspec."""
Deferred = Callable[[], Awaitable[None]]

_INTERNAL: Final = MsbdError("internal error")


class Connection:
    """One client connection as handlers see it: who is calling, and a way to notify.

    `subscriptions` is the handlers' own count of the event streams this
    connection holds (the daemon caps it per connection).
    """

    __slots__ = ("_proto", "gid", "groups", "id", "pid", "subscriptions", "uid")

    def __init__(self, proto: ServerProtocol, conn_id: int, peer: Peer) -> None:
        self._proto = proto
        self.id = conn_id
        self.pid = peer.pid
        self.uid = peer.uid
        self.gid = peer.gid
        self.groups = peer.groups
        self.subscriptions = 0

    def __repr__(self) -> str:
        return f"<Connection {self.id} uid={self.uid} gid={self.gid} pid={self.pid}>"

    @property
    def closed(self) -> bool:
        return self._proto.closing

    async def notify(self, method: str, params: Any) -> None:
        """Write one notification frame; waits while the client is not reading.

        Raises `anyio.BrokenResourceError` once the connection is closed (a
        client that does not read for `send_timeout` is closed).
        """
        proto = self._proto
        if proto.closing:
            raise anyio.BrokenResourceError(f"connection {self.id} is closed")
        proto.write(encode_notification(method, params))
        while proto.write_paused and not proto.closing:
            await proto.writable.wait()
        if proto.closing:
            raise anyio.BrokenResourceError(f"connection {self.id} is closed")

    def close(self) -> None:
        """Close after the replies already written are sent; cancels its calls."""
        self._proto.close()


class CallContext:
    """What a handler gets besides its params: the connection, and `defer`."""

    __slots__ = ("_deferred", "connection")

    def __init__(self, connection: Connection) -> None:
        self.connection = connection
        self._deferred: list[Deferred] = []

    def defer(self, job: Deferred) -> None:
        """Run `job()` once this call's reply (or its batch's reply) is written.

        It runs in the connection's task group: it is cancelled when the
        connection closes, and its errors are logged, never sent.
        """
        self._deferred.append(job)



class ServerProtocol(asyncio.Protocol):
    """One connection's framing, dispatch, flow control and watchdog (internal)."""

    def __init__(self, server: RpcServer, peer: Peer = UNKNOWN) -> None:
        self.server = server
        self.peer = peer
        self.counted_uid: int | None = None  # set by the server when it counts us per uid
        self.limits = server.limits
        self.handler = server.handler
        self.conn_id = next(server._ids)
        self.loop = asyncio.get_running_loop()
        self.buf = bytearray()
        self.scan_from = 0
        self.inflight = 0  # calls running (a batch counts each of its calls)
        self.busy = 0  # deferred jobs running
        self.closing = False
        self.lost = False
        self.eof = False
        self.write_paused = False
        self.writable = anyio.Event()
        self.ended = anyio.Event()
        self.tg: anyio.abc.TaskGroup | None = None
        self.conn: Connection | None = None
        self.last_active = self.loop.time()
        self.frame_started: float | None = None
        self.write_paused_at: float | None = None
        self.watch_deadline = math.inf
        self.watch_wake = anyio.Event()
        self.idle_workers: list[asyncio.Future[Call | list[Item]]] = []
        self.lingering = False  # closed, still flushing replies: counted by the server
        self.linger: asyncio.TimerHandle | None = None

    # --- asyncio callbacks ---

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport
        self.transport = transport = cast(asyncio.Transport, transport)
        if not self.peer.known:
            log.warning("connection %d: no peer credentials", self.conn_id)
        self.conn = Connection(self, self.conn_id, self.peer)
        # Not read until the connection's task runs. uvloop starts reading only
        # after this returns, undoing this pause: `process` pauses again on the
        # first data, and `update_reading` asks the transport, never a flag.
        transport.pause_reading()

    def data_received(self, data: bytes) -> None:
        if self.closing:
            return
        self.buf += data
        self.last_active = self.loop.time()
        self.process()

    def eof_received(self) -> bool:
        self.eof = True
        if _peer_gone(self.transport):  # closed, not just done writing: nobody to answer
            self.close(abort=True)
            return True
        if self.buf and not self.buf.endswith(b"\n") and not self.closing:
            self.buf += b"\n"  # a last frame without its newline
            self.process()
        self.check_ended()
        return True  # keep our side open to write the replies

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = self.closing = True
        if self.lingering:
            self.lingering = False
            self.server._lingering -= 1
        if self.linger is not None:
            self.linger.cancel()
            self.linger = None
        self.server._descriptor_released()
        self.writable.set()
        self.ended.set()
        if self.tg is not None:
            self.tg.cancel_scope.cancel()

    def pause_writing(self) -> None:
        self.write_paused = True
        self.writable = anyio.Event()
        self.write_paused_at = self.loop.time()
        self.update_reading()
        self.wake_watchdog(self.limits.send_timeout, self.write_paused_at)

    def resume_writing(self) -> None:
        self.write_paused = False
        self.write_paused_at = None
        self.writable.set()
        self.process()

    # --- framing and dispatch ---

    def process(self) -> None:
        """Dispatch every complete frame in the buffer the inflight limit allows."""
        buf, limits = self.buf, self.limits
        if self.tg is None:  # data before the connection's task runs: keep it for then
            self.update_reading()
            return
        start = 0
        server = self.server
        while (self.inflight < limits.max_inflight_per_connection and not self.closing
               and not self.write_paused and not server._draining):
            nl = buf.find(b"\n", max(start, self.scan_from))
            if nl < 0:
                break
            self.scan_from = 0
            if nl - start > limits.max_frame_bytes:
                self.frame_too_big()
                return
            if nl > start:
                self.dispatch(bytes(buf[start:nl]))
            start = nl + 1
        if start:
            del buf[:start]
        if self.closing:
            return
        if buf and buf.find(b"\n", self.scan_from) < 0:  # a frame not finished yet
            if len(buf) > limits.max_frame_bytes:
                self.frame_too_big()
                return
            self.scan_from = len(buf)
            if self.frame_started is None:
                self.frame_started = self.loop.time()
                self.wake_watchdog(limits.frame_timeout, self.frame_started)
        else:
            self.frame_started = None
        self.update_reading()

    def dispatch(self, line: bytes) -> None:
        try:
            frame = parse_frame(line, max_batch=self.limits.max_batch)
        except Exception:
            log.error("connection %d: cannot parse a frame", self.conn_id, exc_info=True)
            self.write(encode_error(None, _INTERNAL))
            return
        if type(frame) is Call:
            self.start_calls(1)
            self.launch(frame)
        elif type(frame) is Invalid:
            self.write(encode_error(frame.id, frame.error))
        elif isinstance(frame, Batch):
            calls = sum(type(item) is Call for item in frame.items)
            if calls:
                self.start_calls(calls)
                self.launch(frame.items)
            elif frame.items:
                self.write(encode_batch([_answer_invalid(item) for item in frame.items]))

    def launch(self, job: Call | list[Item]) -> None:
        """Hand `job` to an idle worker of this connection, or start one.

        Workers are tasks of the connection's task group that stay for the
        next call: handing over a future is much cheaper than a new task.
        """
        if self.idle_workers:
            self.idle_workers.pop().set_result(job)
        else:
            assert self.tg is not None
            self.tg.start_soon(self.worker, job)

    async def worker(self, job: Call | list[Item]) -> None:
        while True:
            if isinstance(job, Call):
                await self.run_call(job)
            else:
                await self.run_batch(job)
            waiter: asyncio.Future[Call | list[Item]] = self.loop.create_future()
            self.idle_workers.append(waiter)
            self.after_work()
            job = await waiter

    def start_calls(self, n: int) -> None:
        self.inflight += n
        self.server._inflight += n

    def frame_too_big(self) -> None:
        limit = self.limits.max_frame_bytes
        log.warning("connection %d: frame over the limit of %d bytes, closing", self.conn_id, limit)
        self.write(encode_error(None, _frame_error(limit)))
        self.close()

    # --- running calls ---

    async def run_call(self, call: Call) -> None:
        assert self.conn is not None
        ctx = CallContext(self.conn)
        try:
            reply = await self.execute(ctx, call)
        finally:
            self.calls_done(1)
        if reply is not None:
            self.write(reply)
        self.start_deferred(ctx)

    async def run_batch(self, items: list[Item]) -> None:
        assert self.conn is not None
        calls = sum(type(item) is Call for item in items)
        replies: list[bytes | None] = [None] * len(items)
        contexts: list[CallContext] = []

        async def run_one(i: int, ctx: CallContext, call: Call) -> None:
            replies[i] = await self.execute(ctx, call)

        try:
            async with anyio.create_task_group() as tg:
                for i, item in enumerate(items):
                    if type(item) is Call:
                        contexts.append(ctx := CallContext(self.conn))
                        tg.start_soon(run_one, i, ctx, item)
                    else:
                        replies[i] = _answer_invalid(item)
        finally:
            self.calls_done(calls)
        answered = [r for r in replies if r is not None]
        if answered:
            self.write(encode_batch(answered))
        for ctx in contexts:
            self.start_deferred(ctx)

    async def execute(self, ctx: CallContext, call: Call) -> bytes | None:
        """Run one call; its encoded reply, or None for a notification."""
        try:
            result = await self.handler(ctx, call.method, call.params)
            return None if call.notification else encode_result(call.id, result)
        except MsbdError as exc:
            if call.notification:
                log.debug("connection %d: notification %s failed: %s", self.conn_id,
                          call.method, exc)
                return None
            return encode_error(call.id, exc)
        except Exception:
            log.error("connection %d: %s raised", self.conn_id, call.method, exc_info=True)
            return None if call.notification else encode_error(call.id, _INTERNAL)

    def calls_done(self, n: int) -> None:
        self.inflight -= n
        self.server._calls_done(n)

    def start_deferred(self, ctx: CallContext) -> None:
        if not ctx._deferred or self.closing or self.tg is None:
            return
        for job in ctx._deferred:
            self.busy += 1
            self.tg.start_soon(self.run_deferred, job)

    async def run_deferred(self, job: Deferred) -> None:
        try:
            await job()
        except anyio.BrokenResourceError:
            log.debug("connection %d: deferred job stopped: connection closed", self.conn_id)
        except Exception:
            log.warning("connection %d: deferred job failed", self.conn_id, exc_info=True)
        finally:
            self.busy -= 1
        self.after_work()

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
        if self.eof and not self.inflight and not self.busy and b"\n" not in self.buf:
            self.ended.set()

    # --- writing, flow control, closing ---

    def write(self, data: bytes) -> None:
        if not self.closing:
            self.transport.write(data + b"\n")

    def update_reading(self) -> None:
        if self.conn is None or self.transport.is_closing():  # not connected, or done
            return
        want = (self.tg is not None and not self.closing and not self.eof
                and not self.write_paused and not self.server._draining
                and self.inflight < self.limits.max_inflight_per_connection)
        if want != self.transport.is_reading():
            if want:
                self.transport.resume_reading()
            else:
                self.transport.pause_reading()

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
                    self.server._lingering += 1
                    if self.limits.send_timeout is not None:
                        self.linger = self.loop.call_later(self.limits.send_timeout,
                                                           self.abort_lingering)
        self.closing = True
        self.writable.set()
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
            self.server._connection_ended(self)
            if isinstance(exc, OSError):
                log.debug("connection %d: lost before it was set up: %s", self.conn_id, exc)
                return
            raise
        await self.run()

    async def run(self) -> None:
        conn = self.conn
        assert conn is not None
        log.debug("connection %d opened (uid %d gid %d pid %d)", conn.id, conn.uid, conn.gid,
                  conn.pid)
        try:
            async with anyio.create_task_group() as tg:
                self.tg = tg
                if self.lost:
                    tg.cancel_scope.cancel()
                limits = self.limits
                if (limits.idle_timeout, limits.frame_timeout, limits.send_timeout) != (
                        None, None, None):
                    tg.start_soon(self.watchdog)
                self.process()
                await self.ended.wait()
                tg.cancel_scope.cancel()
        except Exception:
            log.error("connection %d: unexpected error", conn.id, exc_info=True)
        finally:
            self.server._connection_ended(self)
            self.close()
            log.debug("connection %d closed", conn.id)

    def wake_watchdog(self, timeout: float | None, since: float) -> None:
        if timeout is not None and since + timeout < self.watch_deadline:
            self.watch_wake.set()

    async def watchdog(self) -> None:
        """Close the connection when it is idle, stalls mid-frame, or stops reading."""
        limits = self.limits
        while True:
            now = self.loop.time()
            deadline, why = math.inf, ""
            if limits.send_timeout is not None and self.write_paused_at is not None:
                deadline, why = self.write_paused_at + limits.send_timeout, "does not read"
            if limits.frame_timeout is not None and self.frame_started is not None and (
                    t := self.frame_started + limits.frame_timeout) < deadline:
                deadline, why = t, "left a frame unfinished"
            if limits.idle_timeout is not None:
                if self.inflight or self.busy or self.frame_started is not None:
                    t, reason = now + limits.idle_timeout, ""  # look again then
                else:
                    t, reason = self.last_active + limits.idle_timeout, "idle"
                if t < deadline:
                    deadline, why = t, reason
            if deadline <= now and why:
                if why == "idle":
                    log.debug("connection %d: idle for %ss, closing", self.conn_id,
                              limits.idle_timeout)
                else:
                    log.warning("connection %d: client %s, closing", self.conn_id, why)
                self.close(abort=why == "does not read")
                return
            self.watch_deadline = deadline
            self.watch_wake = anyio.Event()
            with anyio.CancelScope(deadline=deadline):
                await self.watch_wake.wait()


def _peer_gone(transport: asyncio.Transport) -> bool:
    """After EOF: did the peer close its socket, or only shut down its writing side?

    On Linux a Unix stream socket polls POLLHUP only once both directions
    are shut, i.e. the peer closed it; `shutdown(SHUT_WR)` leaves it writable.
    """
    try:
        poller = select.poll()
        poller.register(transport.get_extra_info("socket").fileno(), select.POLLOUT)
        return any(events & select.POLLHUP for _, events in poller.poll(0))
    except (OSError, AttributeError, ValueError):
        return False


def _answer_invalid(item: Item) -> bytes:
    assert isinstance(item, Invalid)
    return encode_error(item.id, item.error)


def _frame_error(limit: int) -> MsbdError:
    return InvalidRequest(f"frame is over the limit of {limit} bytes; closing the connection",
                          data={"limit": limit})

