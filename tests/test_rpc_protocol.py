"""One connection's protocol on a fake transport, no socket: framing, batching, limits,
flow control and the watchdog. The protocol is driven through its asyncio callbacks
(`data_received`, `eof_received`, `pause_writing`, ...) as a transport would, and what
it writes is read back from the fake. What only a real socket can show (accepting,
peer credentials, POLLHUP, real backpressure) is in test_rpc_server.py."""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any

import anyio
import msgspec
import pytest
from test_rpc_server import PING_99, Handler, req

from msbd.peer import Peer
from msbd.rpc.handler import Immediate
from msbd.rpc.limits import RpcLimits, Stall, close_deadline
from msbd.rpc.protocol import ServerProtocol
from msbd.rpc.state import ServerState

PEER = Peer(pid=4242, uid=1000, gid=1000, groups=frozenset({1000}))


class FakeTransport(asyncio.Transport):
    """What the protocol writes, and the switches it flips. `unsent` stands for bytes
    the client has not read: a close then waits for them (or an abort)."""

    def __init__(self, protocol: ServerProtocol) -> None:
        super().__init__()
        self.protocol = protocol
        self.out = bytearray()
        self.reading = True
        self.closed = self.aborted = False
        self.unsent = 0
        self.changed = asyncio.Event()  # set on every write, close and abort
        self.gone = asyncio.Event()  # connection_lost was called

    def write(self, data: bytes | bytearray | memoryview) -> None:
        assert not self.closed, "written after close"
        self.out += data
        self.changed.set()

    def is_reading(self) -> bool:
        return self.reading

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def is_closing(self) -> bool:
        return self.closed

    def get_write_buffer_size(self) -> int:
        return self.unsent

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.changed.set()
            if not self.unsent:  # else: once the client reads them, or an abort
                asyncio.get_running_loop().call_soon(self._lose)

    def abort(self) -> None:
        if not self.aborted:
            self.closed = self.aborted = True
            self.changed.set()
            asyncio.get_running_loop().call_soon(self._lose)

    def lose(self) -> None:
        """The client vanished (a reset): the transport is gone at once."""
        self.closed = True
        self._lose()

    def _lose(self) -> None:
        if not self.gone.is_set():
            self.gone.set()
            self.protocol.connection_lost(None)


class Client:
    """The client's end of one fake connection."""

    def __init__(self, proto: ServerProtocol, transport: FakeTransport) -> None:
        self.proto = proto
        self.transport = transport
        self.done = anyio.Event()  # the connection's task returned

    async def run(self) -> None:
        try:
            await self.proto.run()
        finally:
            self.done.set()

    def send(self, data: bytes) -> None:
        self.proto.data_received(data)

    async def line(self) -> Any:
        """The next line the server wrote, decoded; None once it closed with nothing left."""
        t = self.transport
        with anyio.fail_after(10):
            while b"\n" not in t.out:
                if t.closed:
                    return None
                t.changed.clear()
                await t.changed.wait()
        line, _, rest = bytes(t.out).partition(b"\n")
        t.out[:] = rest
        return msgspec.json.decode(line)

    async def call(self, method: str, params: Any = None, rid: Any = 1) -> Any:
        self.send(req(method, rid, params) + b"\n")
        return await self.line()

    async def closed(self) -> None:
        """Until the connection's task is over and the transport closed."""
        with anyio.fail_after(10):
            await self.done.wait()
        assert self.transport.closed


@asynccontextmanager
async def serving(handler: Handler | None = None, limits: RpcLimits | None = None,
                  immediate: Mapping[str, Immediate] | None = None,
                  ) -> AsyncIterator[tuple[ServerState, Any]]:
    """A server state, and `connect()` to open connections on it; all closed on exit."""
    state = ServerState(handler or Handler(), limits or RpcLimits(), immediate)
    async with anyio.create_task_group() as tg:

        def connect() -> Client:
            proto = ServerProtocol(state, PEER)
            transport = FakeTransport(proto)
            state.admit(proto, PEER.uid)
            proto.connection_made(transport)
            client = Client(proto, transport)
            tg.start_soon(client.run)
            return client

        yield state, connect
        tg.cancel_scope.cancel()


@asynccontextmanager
async def one(handler: Handler | None = None, limits: RpcLimits | None = None,
              immediate: Mapping[str, Immediate] | None = None) -> AsyncIterator[Client]:
    async with serving(handler, limits, immediate) as (_, connect):
        yield connect()


# --- the JSON-RPC 2.0 specification's examples, and what is never answered -------


@pytest.mark.parametrize(("line", "reply"), [
    (b'{"jsonrpc": "2.0", "method": "sandbox.get", "params": ["a"], "id": 1}',
     {"jsonrpc": "2.0", "id": 1, "error": {"code": -32602,
                                            "message": "params must be an object (by name)"}}),
    (b'{"jsonrpc": "2.0", "method": "foobar", "id": "1"}',
     {"jsonrpc": "2.0", "id": "1", "error": {"code": -32601, "message": "method not found: "
                                              "'foobar'", "data": {"method": "foobar"}}}),
    (b'{"jsonrpc": "2.0", "method": "foobar, "params": "bar", "baz]', -32700),
    (b'{"jsonrpc": "2.0", "method": 1, "params": "bar"}', -32600),
    (b'[{"jsonrpc": "2.0", "method": "sum", "params": [1,2,4], "id": "1"},{"jsonrpc": "2.0", "a]',
     -32700),
    (b"[]", -32600),
    (b"[1]", [-32600]),
    (b"[1,2,3]", [-32600, -32600, -32600]),
    (b'[{"jsonrpc":"2.0","method":"daemon.ping","id":"1"},{"jsonrpc":"2.0","method":"x"},'
     b'{"jsonrpc":"2.0","method":"subtract","params":[42,23],"id":"2"},{"foo":"boo"},'
     b'{"jsonrpc":"2.0","method":"sandbox.get","params":{"name":"myself"},"id":"5"}]',
     [{"jsonrpc": "2.0", "result": "pong", "id": "1"}, -32601, -32600, -32001]),
    (b'{"jsonrpc": "2.0", "method": "update", "params": [1,2,3,4,5]}', None),
    (b'[{"jsonrpc":"2.0","method":"notify_sum"},{"jsonrpc":"2.0","method":"daemon.ping"}]', None),
])
async def test_spec_examples(line: bytes, reply: Any) -> None:
    async with one() as c:
        c.send(line + b"\n" + req("daemon.ping", 99) + b"\n")
        first = await c.line()
        if reply is None:  # nothing but the ping's reply
            assert first == PING_99
            c.proto.eof_received()
            assert await c.line() is None
            return
        second = await c.line()  # replies may come in any order
        got, ping = (second, first) if first == PING_99 else (first, second)
        assert ping == PING_99

        def code(r: Any) -> Any:
            return r["error"]["code"] if "error" in r else r

        if isinstance(reply, int):
            assert code(got) == reply and got["id"] is None
        elif isinstance(reply, list):
            pairs = zip(got, reply, strict=True)
            assert [code(r) if isinstance(want, int) else r for r, want in pairs] == reply
        else:
            assert got == reply


async def test_notifications_are_never_answered() -> None:
    handler = Handler()
    async with one(handler) as c:
        c.send(req("sandbox.get", params={"name": "x"}) + b"\n"  # raises NotFound
               + req("nope") + b"\n" + req("sandbox.get", params={"name": 1}) + b"\n"
               + req("daemon.info") + b"\n"  # raises RuntimeError
               + req("daemon.ping", 99) + b"\n")
        assert await c.line() == PING_99
        c.proto.eof_received()
        assert await c.line() is None
    assert handler.ran.count("sandbox.get") == 1 and "daemon.info" in handler.ran


async def test_errors_are_answered_and_internal_ones_only_logged(
        caplog: pytest.LogCaptureFixture) -> None:
    async with one() as c:
        assert await c.call("sandbox.get", {"name": "box"}, rid="a") == {
            "jsonrpc": "2.0", "id": "a",
            "error": {"code": -32001, "message": "no sandbox named 'box'",
                      "data": {"sandbox": "box"}}}
        got = await c.call("sandbox.create", {"name": "b", "exec": "/x", "vcpus": 0}, rid=2)
        assert got["error"]["code"] == -32602 and got["error"]["data"] == {"field": "vcpus"}
        with caplog.at_level(logging.ERROR, logger="msbd.rpc"):
            got = await c.call("daemon.info", rid=3)
        assert got == {"jsonrpc": "2.0", "id": 3,
                       "error": {"code": -32603, "message": "internal error"}}
        assert "boom" in caplog.text and "Traceback" in caplog.text
        assert "secret" not in str(got)


async def test_the_handler_sees_the_peer() -> None:
    async with one() as c:
        got = await c.call("sandbox.touch", {"name": "a"})
        assert got["result"] == {"uid": PEER.uid, "gid": PEER.gid, "pid": PEER.pid}


# --- framing ---------------------------------------------------------------------


async def test_frames_split_anywhere_and_empty_lines_are_skipped() -> None:
    async with one() as c:
        data = b"\n\r\n" + req("daemon.ping", 1) + b"\n\n" + req("daemon.ping", 2) + b"\n"
        for i in range(len(data)):  # one byte at a time
            c.send(data[i:i + 1])
        assert {(await c.line())["id"], (await c.line())["id"]} == {1, 2}


async def test_data_before_the_connection_task_runs_is_kept() -> None:
    state = ServerState(Handler(), RpcLimits())
    proto = ServerProtocol(state, PEER)
    transport = FakeTransport(proto)
    proto.connection_made(transport)
    assert not transport.reading  # nothing is read before the task runs
    proto.data_received(req("daemon.ping", 99) + b"\n")
    assert transport.out == b""
    async with anyio.create_task_group() as tg:
        tg.start_soon(proto.run)
        assert await Client(proto, transport).line() == PING_99
        assert transport.reading
        tg.cancel_scope.cancel()


@pytest.mark.parametrize("whole", [True, False])
async def test_a_frame_over_the_limit_closes_only_its_connection(whole: bool) -> None:
    limits = RpcLimits(max_frame_bytes=1000)
    async with serving(limits=limits) as (state, connect):
        good, bad = connect(), connect()
        assert (await good.call("daemon.ping"))["result"] == "pong"
        big = b'{"jsonrpc":"2.0","method":"daemon.ping","params":{"x":"' + b"y" * 2000
        bad.send(big + b'"}}\n' if whole else big)  # unfinished: known too big already
        got = await bad.line()
        assert got == {"jsonrpc": "2.0", "id": None, "error": {
            "code": -32600, "message": "frame is over the limit of 1000 bytes; closing the "
                                       "connection", "data": {"limit": 1000}}}
        assert await bad.line() is None
        await bad.closed()
        assert (await good.call("daemon.ping", rid=2))["result"] == "pong"
        assert state.connection_count == 1


async def test_a_frame_at_the_limit_is_taken() -> None:
    frame = req("daemon.ping", 7)
    async with one(limits=RpcLimits(max_frame_bytes=len(frame))) as c:
        for _ in range(3):  # also when split, so only its start is buffered at first
            c.send(frame[:5])
            c.send(frame[5:] + b"\n")
            assert (await c.line())["id"] == 7


async def test_eof_answers_what_was_read_even_a_last_frame_without_newline() -> None:
    async with one() as c:
        c.send(req("daemon.ping", 1) + b"\n" + req("daemon.ping", 2))
        c.proto.eof_received()
        assert {(await c.line())["id"], (await c.line())["id"]} == {1, 2}
        assert await c.line() is None


# --- batches ---------------------------------------------------------------------


async def test_a_batch_is_answered_in_one_line_once_all_its_calls_are_done() -> None:
    handler = Handler()
    async with one(handler) as c:
        c.send(b"[" + req("sandbox.wait", "a", {"name": "a"}) + b"," + req("daemon.ping", 2)
               + b"," + req("nope") + b"," + b"1]\n")
        await handler.gate("a")[0].wait()
        assert (await c.call("daemon.ping", rid=3))["id"] == 3  # not held back by the batch
        handler.gate("a")[1].set()
        got = await c.line()
        assert {r["id"] for r in got} == {"a", 2, None} and len(got) == 3


async def test_a_batch_over_max_batch_runs_nothing() -> None:
    handler = Handler()
    async with one(handler, RpcLimits(max_batch=3)) as c:
        c.send(b"[" + b",".join(req("daemon.ping", i) for i in range(4)) + b"]\n")
        assert await c.line() == {"jsonrpc": "2.0", "id": None, "error": {
            "code": -32600, "message": "batch of 4 requests is over the limit of 3",
            "data": {"limit": 3}}}
        assert handler.ran == []
        c.send(b"[" + b",".join(req("daemon.ping", i) for i in range(3)) + b"]\n")
        assert sorted(r["id"] for r in await c.line()) == [0, 1, 2]


async def test_deferred_work_runs_after_the_reply() -> None:
    async with one() as c:
        assert await c.call("events.subscribe", rid=5) == {"jsonrpc": "2.0",
                                                          "result": {"seq": 7}, "id": 5}
        assert (await c.line())["method"] == "event"


async def test_a_batch_defers_after_the_batch_reply() -> None:
    async with one() as c:
        c.send(b"[" + req("events.subscribe", 1) + b"," + req("daemon.ping", 2) + b"]\n")
        assert sorted(r["id"] for r in await c.line()) == [1, 2]
        assert (await c.line())["method"] == "event"


# --- concurrency and the read gate -------------------------------------------------


async def test_calls_on_one_connection_finish_out_of_order() -> None:
    handler = Handler()
    async with one(handler) as c:
        c.send(req("sandbox.wait", "a", {"name": "a"}) + b"\n"
               + req("sandbox.wait", "b", {"name": "b"}) + b"\n")
        await handler.gate("a")[0].wait()
        await handler.gate("b")[0].wait()
        assert await c.call("daemon.ping", rid=3) == {"jsonrpc": "2.0", "result": "pong", "id": 3}
        handler.gate("b")[1].set()
        assert (await c.line())["id"] == "b"
        handler.gate("a")[1].set()
        assert await c.line() == {"jsonrpc": "2.0", "result": {"waited": "a"}, "id": "a"}


async def test_the_inflight_limit_shuts_the_read_gate() -> None:
    handler = Handler()
    async with serving(handler, RpcLimits(max_inflight_per_connection=2)) as (state, connect):
        c = connect()
        c.send(b"".join(req("sandbox.wait", n, {"name": n}) + b"\n" for n in "abc"))
        await handler.gate("a")[0].wait()
        await handler.gate("b")[0].wait()
        assert not handler.gate("c")[0].is_set()
        assert not c.transport.reading and state.inflight == 2
        handler.gate("a")[1].set()
        assert (await c.line())["id"] == "a"
        await handler.gate("c")[0].wait()
        handler.gate("b")[1].set()
        handler.gate("c")[1].set()
        assert {(await c.line())["id"], (await c.line())["id"]} == {"b", "c"}
        assert c.transport.reading and state.inflight == 0


async def test_a_frame_read_alone_waits_at_the_shut_gate_too() -> None:
    # One whole frame per read takes the shortcut past the framer: the gate still holds it.
    handler = Handler()
    async with serving(handler, RpcLimits(max_inflight_per_connection=2)) as (state, connect):
        c = connect()
        c.send(req("daemon.ping", 99) + b"\n")
        assert await c.line() == PING_99  # the connection's task runs: reads go straight on
        assert c.transport.reading  # an inline call took no slot
        for n in "ab":
            c.send(req("sandbox.wait", n, {"name": n}) + b"\n")
        assert not c.transport.reading  # shut by the frame that took the last slot
        c.send(req("sandbox.wait", "c", {"name": "c"}) + b"\n")  # read before the pause
        await handler.gate("a")[0].wait()
        await handler.gate("b")[0].wait()
        assert not handler.gate("c")[0].is_set()
        assert not c.transport.reading and state.inflight == 2
        handler.gate("b")[1].set()
        assert (await c.line())["id"] == "b"
        await handler.gate("c")[0].wait()
        handler.gate("a")[1].set()
        handler.gate("c")[1].set()
        assert {(await c.line())["id"], (await c.line())["id"]} == {"a", "c"}
        assert c.transport.reading and state.inflight == 0


async def test_a_client_not_reading_stops_the_reading_and_holds_notifications() -> None:
    async with one() as c:
        assert (await c.call("daemon.ping"))["result"] == "pong"
        c.proto.pause_writing()  # the transport's buffer is full
        assert not c.transport.reading
        c.send(req("daemon.ping", 2) + b"\n")  # read already: kept, not run
        assert c.transport.out == b""
        sent = anyio.Event()

        async def notify() -> None:
            assert c.proto.conn is not None
            await c.proto.conn.notify("event", {"n": 1})
            sent.set()

        async with anyio.create_task_group() as tg:
            tg.start_soon(notify)
            await anyio.wait_all_tasks_blocked()
            assert not sent.is_set()  # written, but its sender waits for the client
            c.proto.resume_writing()
        assert (await c.line())["method"] == "event"
        assert (await c.line())["id"] == 2
        assert c.transport.reading


async def test_losing_the_connection_cancels_its_calls() -> None:
    handler = Handler()
    async with serving(handler) as (state, connect):
        c = connect()
        c.send(req("sandbox.wait", 1, {"name": "gone"}) + b"\n")
        await handler.gate("gone")[0].wait()
        c.transport.lose()
        with anyio.fail_after(5):
            await handler.cancelled.wait()
        await c.closed()
        assert state.inflight == 0 and state.connection_count == 0


async def test_draining_shuts_the_read_gate_of_every_connection() -> None:
    async with serving() as (state, connect):
        a, b = connect(), connect()
        assert (await a.call("daemon.ping"))["result"] == "pong"
        state.drain()
        assert not a.transport.reading and not b.transport.reading
        b.send(req("daemon.ping", 2) + b"\n")
        await anyio.wait_all_tasks_blocked()
        assert b.transport.out == b""


# --- the watchdog ---------------------------------------------------------------------


async def test_an_idle_connection_is_closed() -> None:
    async with one(limits=RpcLimits(idle_timeout=0.1)) as c:
        assert (await c.call("daemon.ping"))["result"] == "pong"
        await c.closed()
        assert not c.transport.aborted


async def test_a_frame_left_unfinished_is_closed_after_frame_timeout() -> None:
    async with serving(limits=RpcLimits(frame_timeout=0.1)) as (_, connect):
        stalled, other = connect(), connect()
        stalled.send(b'{"jsonrpc": "2.0", "meth')
        assert (await other.call("daemon.ping"))["result"] == "pong"
        await stalled.closed()
        assert not stalled.transport.aborted and not other.transport.closed


async def test_a_client_not_reading_is_aborted_after_send_timeout() -> None:
    async with one(limits=RpcLimits(send_timeout=0.1)) as c:
        c.proto.pause_writing()
        await c.closed()
        assert c.transport.aborted


async def test_a_close_with_unsent_replies_lingers_counted_then_aborts() -> None:
    async with serving(limits=RpcLimits(idle_timeout=0.05, send_timeout=0.2)) as (
            state, connect):
        c = connect()
        assert (await c.call("daemon.ping"))["result"] == "pong"
        c.transport.unsent = 4096  # the client did not read that much
        await c.closed()  # idle: closed gracefully, then waits for the client to read
        assert not c.transport.aborted and state.connection_count == 1
        with anyio.fail_after(5):
            await c.transport.gone.wait()
        assert c.transport.aborted and state.connection_count == 0


@pytest.mark.parametrize(("kw", "want"), [
    # nothing set: no clock runs
    ({}, (math.inf, None)),
    # idle from the last activity
    ({"idle": 10}, (15.0, Stall.IDLE)),
    # busy, or a frame half read: not idle, only look again an idle timeout from now
    ({"idle": 10, "busy": True}, (110.0, None)),
    ({"idle": 10, "frame": 99.0}, (110.0, None)),
    # the earliest clock decides
    ({"idle": 10, "frame_t": 30, "frame": 99.0}, (110.0, None)),
    ({"idle": 30, "frame_t": 5, "frame": 99.0}, (104.0, Stall.UNFINISHED)),
    ({"idle": 30, "send": 2, "paused": 99.5, "frame_t": 5, "frame": 99.0},
     (101.5, Stall.NOT_READING)),
    ({"send": 2, "paused": 90.0}, (92.0, Stall.NOT_READING)),  # overdue: close now
    # a timeout that is off does not count, whatever the connection does
    ({"paused": 90.0, "frame": 90.0, "busy": True}, (math.inf, None)),
])
def test_close_deadline(kw: dict[str, Any], want: tuple[float, Stall | None]) -> None:
    limits = RpcLimits(idle_timeout=kw.get("idle"), frame_timeout=kw.get("frame_t"),
                       send_timeout=kw.get("send"))
    assert close_deadline(limits, now=100.0, last_active=5.0, busy=kw.get("busy", False),
                          frame_started=kw.get("frame"),
                          write_paused_at=kw.get("paused")) == want
    assert limits.watched == (kw.keys() & {"idle", "frame_t", "send"} != set())
