"""Calls answered inline (msbd.rpc.calls): a method whose handler never suspends is answered
inside `data_received`, with no task. On the fake transport of test_rpc_protocol.py: the
read gate (inflight limit, a client not reading, a connection not yet served) holds inline
calls as it holds the others; errors, notifications, batches and deferred jobs behave as
for any call."""

from __future__ import annotations

import logging
from typing import Any

import anyio
import pytest
from test_rpc_protocol import PEER, FakeTransport, one
from test_rpc_server import Handler, req

from msbd.errors import NotFound
from msbd.model import Spec
from msbd.rpc.handler import CallContext, Immediate
from msbd.rpc.limits import RpcLimits
from msbd.rpc.methods import NameParams
from msbd.rpc.protocol import ServerProtocol
from msbd.rpc.state import ServerState

NOW = {"jsonrpc": "2.0", "result": "pong now", "id": 1}


def now_ping(ctx: CallContext, params: Spec) -> Any:
    return "pong now"  # not the handler's "pong": which path answered is visible


def now_get(ctx: CallContext, params: Spec) -> Any:
    assert isinstance(params, NameParams)
    if params.name == "boom":
        raise RuntimeError("boom: a secret detail")
    raise NotFound(params.name)


IMMEDIATE: dict[str, Immediate] = {"daemon.ping": now_ping, "sandbox.get": now_get}


async def test_an_immediate_call_is_answered_inside_data_received() -> None:
    handler = Handler()
    async with one(handler, immediate=IMMEDIATE) as c:
        await anyio.wait_all_tasks_blocked()  # the connection's task is serving
        c.send(req("daemon.ping", 1) + b"\n")
        assert bytes(c.transport.out).endswith(b"\n")  # written before anything awaited
        assert await c.line() == NOW
        assert "daemon.ping" not in handler.ran
        assert (await c.call("sandbox.touch", {"name": "a"}, rid=2))["result"]["uid"] == PEER.uid


async def test_it_does_not_wait_for_the_calls_running_on_its_connection() -> None:
    handler = Handler()
    async with one(handler, immediate=IMMEDIATE) as c:
        c.send(req("sandbox.wait", "a", {"name": "a"}) + b"\n")
        await handler.gate("a")[0].wait()
        assert await c.call("daemon.ping") == NOW
        handler.gate("a")[1].set()
        assert await c.line() == {"jsonrpc": "2.0", "result": {"waited": "a"}, "id": "a"}


async def test_the_inflight_limit_holds_it_until_a_slot_frees() -> None:
    handler = Handler()
    async with one(handler, RpcLimits(max_inflight_per_connection=1), IMMEDIATE) as c:
        c.send(req("sandbox.wait", "a", {"name": "a"}) + b"\n" + req("daemon.ping", 1) + b"\n")
        await handler.gate("a")[0].wait()
        await anyio.wait_all_tasks_blocked()
        assert c.transport.out == b"" and not c.transport.reading
        handler.gate("a")[1].set()
        assert (await c.line())["id"] == "a"  # the reply that freed the slot comes first
        assert await c.line() == NOW


async def test_a_client_not_reading_gets_no_inline_answer_until_it_reads() -> None:
    async with one(Handler(), immediate=IMMEDIATE) as c:
        assert await c.call("daemon.ping") == NOW
        c.proto.pause_writing()
        c.send(req("daemon.ping", 2) + b"\n")
        await anyio.wait_all_tasks_blocked()
        assert c.transport.out == b""
        c.proto.resume_writing()
        assert await c.line() == NOW | {"id": 2}


async def test_nothing_is_answered_before_the_connections_task_runs() -> None:
    state = ServerState(Handler(), RpcLimits(), IMMEDIATE)
    proto = ServerProtocol(state, PEER)
    transport = FakeTransport(proto)
    proto.connection_made(transport)
    proto.data_received(req("daemon.ping", 1) + b"\n")
    assert transport.out == b""
    async with anyio.create_task_group() as tg:
        tg.start_soon(proto.run)
        with anyio.fail_after(10):
            while b"\n" not in transport.out:
                transport.changed.clear()
                await transport.changed.wait()
        assert transport.out == b'{"jsonrpc":"2.0","result":"pong now","id":1}\n'
        tg.cancel_scope.cancel()


async def test_errors_are_answered_and_internal_ones_only_logged(
        caplog: pytest.LogCaptureFixture) -> None:
    async with one(Handler(), immediate=IMMEDIATE) as c:
        got = await c.call("sandbox.get", {"name": "box"}, rid="a")
        assert got["error"]["code"] == -32001 and got["id"] == "a"
        with caplog.at_level(logging.ERROR, logger="msbd.rpc"):
            got = await c.call("sandbox.get", {"name": "boom"}, rid=3)
        assert got == {"jsonrpc": "2.0", "id": 3,
                       "error": {"code": -32603, "message": "internal error"}}
        assert "boom" in caplog.text and "Traceback" in caplog.text


async def test_notifications_are_run_and_never_answered() -> None:
    ran: list[str] = []

    def noted(ctx: CallContext, params: Spec) -> Any:
        ran.append("ping")
        return "pong now"

    async with one(Handler(), immediate={"daemon.ping": noted, "sandbox.get": now_get}) as c:
        await anyio.wait_all_tasks_blocked()  # the connection's task is serving
        c.send(req("daemon.ping") + b"\n" + req("sandbox.get", params={"name": "x"}) + b"\n")
        assert c.transport.out == b"" and ran == ["ping"]
        assert await c.call("daemon.ping", rid=9) == NOW | {"id": 9}


async def test_a_batch_runs_on_a_task_through_the_handler() -> None:
    handler = Handler()
    async with one(handler, immediate=IMMEDIATE) as c:
        c.send(b"[" + req("daemon.ping", 1) + b"," + req("daemon.ping", 2) + b"]\n")
        assert [r["result"] for r in await c.line()] == ["pong", "pong"]
        assert handler.ran == ["daemon.ping", "daemon.ping"]


async def test_its_deferred_job_runs_after_its_reply() -> None:
    def subscribe(ctx: CallContext, params: Spec) -> Any:
        async def push() -> None:
            await ctx.connection.notify("event", {"n": 1})
        ctx.defer(push)
        return "pong now"

    async with one(Handler(), immediate={"daemon.ping": subscribe}) as c:
        assert await c.call("daemon.ping") == NOW
        assert await c.line() == {"jsonrpc": "2.0", "method": "event", "params": {"n": 1}}
