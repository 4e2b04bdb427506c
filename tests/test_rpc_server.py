"""The RPC server over real Unix sockets: accepting and its limits, peer credentials, real
backpressure, a client that vanishes or half-closes, drain. One connection's framing,
batching and limits run without a socket in test_rpc_protocol.py."""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import select
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import msgspec
import pytest

from msbd.errors import NotFound
from msbd.model import Event, Spec, State
from msbd.rpc.methods import EventParams, LogsSandboxParams, NameParams, Subscription
from msbd.rpc.server import CallContext, RpcLimits, RpcServer, serve_rpc


class Handler:
    """A tiny stand-in for the daemon's API, implementing a few methods of METHODS."""

    def __init__(self) -> None:
        self.started: dict[str, anyio.Event] = {}
        self.release: dict[str, anyio.Event] = {}
        self.cancelled = anyio.Event()
        self.ran: list[str] = []

    def gate(self, name: str) -> tuple[anyio.Event, anyio.Event]:
        if name not in self.started:
            self.started[name], self.release[name] = anyio.Event(), anyio.Event()
        return self.started[name], self.release[name]

    async def __call__(self, ctx: CallContext, method: str, params: Spec) -> Any:
        self.ran.append(method)
        if method == "daemon.ping":
            return "pong"
        if method == "sandbox.get":
            assert isinstance(params, NameParams)
            raise NotFound(params.name)
        if method == "sandbox.wait":  # blocks until released
            name = getattr(params, "name", "")
            started, release = self.gate(name)
            started.set()
            try:
                await release.wait()
            except BaseException:
                self.cancelled.set()
                raise
            return {"waited": name}
        if method == "sandbox.touch":
            conn = ctx.connection
            return {"uid": conn.uid, "gid": conn.gid, "pid": conn.pid}
        if method == "sandbox.logs":
            assert isinstance(params, LogsSandboxParams)
            return {"data": "x" * params.limit, "offset": 0}
        if method == "events.subscribe":
            async def push() -> None:
                event = Event(seq=8, time=dt.datetime(2024, 1, 2, tzinfo=dt.UTC), sandbox="a",
                              state=State.RUNNING)
                await ctx.connection.notify("event", EventParams(event=event))
            ctx.defer(push)
            return Subscription(seq=7)
        raise RuntimeError("boom: a secret detail")


@asynccontextmanager
async def running(sock_dir: Path, handler: Handler | None = None,
                  limits: RpcLimits | None = None) -> AsyncIterator[tuple[str, RpcServer]]:
    path = str(sock_dir / "s.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(path)
    sock.listen(512)
    async with anyio.create_task_group() as tg:
        server = await tg.start(serve_rpc, sock, handler or Handler(), limits)
        yield path, server
        tg.cancel_scope.cancel()


class Wire:
    """A raw client: send bytes, read reply lines."""

    def __init__(self, stream: anyio.abc.SocketStream) -> None:
        self.stream = stream
        self.buf = b""

    async def send(self, data: bytes) -> None:
        await self.stream.send(data)

    async def line(self) -> Any:
        """The next reply line, decoded; None at EOF."""
        with anyio.fail_after(10):
            while b"\n" not in self.buf:
                try:
                    self.buf += await self.stream.receive()
                except (anyio.EndOfStream, anyio.BrokenResourceError):
                    return None
        line, _, self.buf = self.buf.partition(b"\n")
        return msgspec.json.decode(line)

    async def call(self, method: str, params: Any = None, rid: Any = 1) -> Any:
        body: dict[str, Any] = {"jsonrpc": "2.0", "method": method, "id": rid}
        if params is not None:
            body["params"] = params
        await self.send(msgspec.json.encode(body) + b"\n")
        return await self.line()


@asynccontextmanager
async def wire(path: str) -> AsyncIterator[Wire]:
    async with await anyio.connect_unix(path) as stream:
        yield Wire(stream)


def req(method: str, rid: Any = None, params: Any = None) -> bytes:
    body: dict[str, Any] = {"jsonrpc": "2.0", "method": method}
    if rid is not None:
        body["id"] = rid
    if params is not None:
        body["params"] = params
    return msgspec.json.encode(body)


PING_99 = {"jsonrpc": "2.0", "result": "pong", "id": 99}


async def test_200_concurrent_connections(sock_dir: Path) -> None:
    results: list[Any] = []

    async def client(i: int) -> None:
        async with wire(path) as w:
            for j in range(3):
                results.append(await w.call("daemon.ping", rid=f"{i}-{j}"))

    async with running(sock_dir) as (path, _server), anyio.create_task_group() as tg:
        for i in range(200):
            tg.start_soon(client, i)
    assert len(results) == 600 and all(r["result"] == "pong" for r in results)
    assert {r["id"] for r in results} == {f"{i}-{j}" for i in range(200) for j in range(3)}


async def test_client_not_reading_does_not_block_others(sock_dir: Path) -> None:
    async with running(sock_dir) as (path, _server), wire(path) as other:
        deaf = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        deaf.connect(path)
        deaf.setblocking(False)
        request = req("sandbox.logs", 1, {"name": "a", "limit": 64 * 1024}) + b"\n"
        sent = 0
        try:  # until the server stops reading it: it never reads its replies
            while True:
                sent += deaf.send(request)
        except BlockingIOError:
            pass
        try:
            assert sent > 0
            for i in range(5):
                assert (await other.call("daemon.ping", rid=i))["result"] == "pong"
        finally:
            deaf.close()


async def test_max_connections_is_answered(sock_dir: Path) -> None:
    limits = RpcLimits(max_connections=2)
    async with running(sock_dir, limits=limits) as (path, _), wire(path) as a, wire(path) as b:
        assert (await a.call("daemon.ping"))["result"] == "pong"
        assert (await b.call("daemon.ping"))["result"] == "pong"
        async with wire(path) as c:
            got = await c.line()
            assert got["id"] is None and got["error"]["code"] == -32004
            assert got["error"]["message"] == "too many connections"
            assert await c.line() is None
        assert (await a.call("daemon.ping", rid=2))["result"] == "pong"


async def test_peer_credentials(sock_dir: Path) -> None:
    async with running(sock_dir) as (path, _), wire(path) as w:
        got = await w.call("sandbox.touch", {"name": "a"})
        assert got["result"] == {"uid": os.getuid(), "gid": os.getgid(), "pid": os.getpid()}


async def test_client_vanishing_mid_call_cancels_it(sock_dir: Path) -> None:
    handler = Handler()
    async with running(sock_dir, handler) as (path, _server):
        async with wire(path) as w:
            await w.send(req("sandbox.wait", 1, {"name": "gone"}) + b"\n")
            await handler.gate("gone")[0].wait()
        with anyio.fail_after(5):
            await handler.cancelled.wait()
        async with wire(path) as w:
            assert (await w.call("daemon.ping"))["result"] == "pong"


async def test_half_closed_client_still_gets_its_replies(sock_dir: Path) -> None:
    async with running(sock_dir) as (path, _), wire(path) as w:
        await w.send(req("daemon.ping", 1) + b"\n" + req("daemon.ping", 2))  # last without \n
        await w.stream.send_eof()
        assert {(await w.line())["id"], (await w.line())["id"]} == {1, 2}
        assert await w.line() is None


async def test_drain_lets_inflight_calls_finish(sock_dir: Path) -> None:
    handler = Handler()
    async with running(sock_dir, handler) as (path, server), wire(path) as w:
        await w.send(req("sandbox.wait", 1, {"name": "a"}) + b"\n")
        await handler.gate("a")[0].wait()
        async with anyio.create_task_group() as tg:
            tg.start_soon(server.drain, 10)
            with pytest.raises(OSError):
                await anyio.connect_unix(path)  # no longer accepting
            handler.gate("a")[1].set()
            assert (await w.line())["result"] == {"waited": "a"}
        assert await w.line() is None


async def test_drain_cancels_after_its_timeout(sock_dir: Path) -> None:
    handler = Handler()
    async with running(sock_dir, handler) as (path, server), wire(path) as w:
        await w.send(req("sandbox.wait", 1, {"name": "a"}) + b"\n")
        await handler.gate("a")[0].wait()
        await server.drain(0.05)
        await handler.cancelled.wait()
        assert await w.line() is None


def _wait_hangup(fd: int, timeout: float) -> bool:
    poller = select.poll()
    poller.register(fd, select.POLLRDHUP)
    return bool(poller.poll(timeout * 1000))


async def test_closed_with_unread_replies_is_aborted_after_the_send_timeout(
        sock_dir: Path) -> None:
    """An idle close while the client holds unread replies must not keep the socket
    (and a descriptor) forever: it counts as open, then is aborted after send_timeout."""
    limits = RpcLimits(idle_timeout=0.2, send_timeout=1.0, max_connections=1)
    async with running(sock_dir, limits=limits) as (path, server):
        deaf = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        deaf.connect(path)
        deaf.setblocking(False)
        request = req("sandbox.logs", 1, {"name": "a", "limit": 64 * 1024}) + b"\n"
        try:
            with contextlib.suppress(BlockingIOError):
                while True:  # until the server stops reading it
                    deaf.send(request)
            t0 = anyio.current_time()
            closed = await anyio.to_thread.run_sync(_wait_hangup, deaf.fileno(), 10.0)
            assert closed, "a connection closed with unread replies was never aborted"
            assert anyio.current_time() - t0 >= 0.9
        finally:
            deaf.close()
        async with wire(path) as w:  # its slot is free again
            assert (await w.call("daemon.ping"))["result"] == "pong"
        assert server.connection_count <= 1


async def test_accepting_on_the_plain_asyncio_loop_refuses_over_the_cap_and_recovers(
        sock_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    limits = RpcLimits(max_connections=1)
    async with running(sock_dir, limits=limits) as (path, server), wire(path) as a:
        assert (await a.call("daemon.ping"))["result"] == "pong"
        for _ in range(5):
            async with wire(path) as extra:
                got = await extra.line()
                assert (got["id"], got["error"]["code"]) == (None, -32004)
                assert await extra.line() is None
        await a.stream.send_eof()
        assert await a.line() is None  # closed by the server: the slot is free
        async with wire(path) as b:
            assert (await b.call("daemon.ping"))["result"] == "pong"
        assert server.connection_count == 1
    assert caplog.text.count("refusing connections") == 1
    assert "5 refused while at the limit of 1" in caplog.text
