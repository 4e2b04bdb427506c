"""Running one connection's calls: dispatch of each frame, worker tasks, batches, deferred
jobs, and the calls answered inline (internal).

Why it is built this way. A call that may suspend runs on a worker task of
its connection; the tasks stay for the next call (cheaper than a new task
each) and answer as they finish (ids match replies to calls). A call whose
handler never suspends (`Immediate`, e.g. `daemon.ping`) is answered right
in the dispatch, inside `data_received`: no task switch, no future, one
loop iteration less per call. Calls on one connection are concurrent either
way, so answering one inline changes no ordering a client may rely on; the
read gate still decides when a frame is dispatched at all, inline or not
(`may_read` stops the loop once writing pauses, the server drains or the
inflight limit is reached), and inline calls take no inflight slot because
none outlives the dispatch. Only single calls go inline: a batch is
answered with one line once all its calls are done, so it always runs on a
task.

`CallRunner` is a mixin of `msbd.rpc.protocol.ServerProtocol`, which owns the
connection (framing, the read gate, closing, the watchdog) and provides what
is declared below; this module owns what happens to a frame once it was
read.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping

import anyio
import anyio.abc

from msbd.rpc.codec import Batch, Call, Invalid, Item, encode_batch, encode_error, parse_frame
from msbd.rpc.handler import (
    INTERNAL_ERROR,
    CallContext,
    Connection,
    Deferred,
    Handler,
    Immediate,
    answer,
    answer_now,
)
from msbd.rpc.limits import RpcLimits
from msbd.rpc.state import ServerState

log = logging.getLogger("msbd.rpc")


class CallRunner:
    """Dispatch and running of one connection's calls (a mixin of its protocol)."""

    # Provided by the protocol.
    state: ServerState
    limits: RpcLimits
    handler: Handler
    immediate: Mapping[str, Immediate]
    conn_id: int
    conn: Connection | None
    tg: anyio.abc.TaskGroup | None
    loop: asyncio.AbstractEventLoop
    closing: bool
    inflight: int  # calls running on tasks (a batch counts each of its calls)
    busy: int  # deferred jobs running
    idle_workers: list[asyncio.Future[Call | list[Item]]]

    def write(self, data: bytes) -> None:
        raise NotImplementedError

    def after_work(self) -> None:
        """A call or deferred job ended: read on if the gate allows, end after EOF."""
        raise NotImplementedError

    # --- dispatch ---

    def dispatch(self, line: bytes) -> None:
        try:
            frame = parse_frame(line, max_batch=self.limits.max_batch)
        except Exception:
            log.error("connection %d: cannot parse a frame", self.conn_id, exc_info=True)
            self.write(encode_error(None, INTERNAL_ERROR))
            return
        if type(frame) is Call:
            now = self.immediate.get(frame.method)
            if now is not None:
                self.run_inline(now, frame)
            else:
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

    def run_inline(self, now: Immediate, call: Call) -> None:
        assert self.conn is not None
        ctx = CallContext(self.conn)
        reply = answer_now(now, ctx, call)
        if reply is not None:
            self.write(reply)
        if ctx.deferred:
            self.start_deferred(ctx)

    def launch(self, job: Call | list[Item]) -> None:
        """Hand `job` to an idle worker of this connection, or start one."""
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
        self.state.calls_started(n)

    def calls_done(self, n: int) -> None:
        self.inflight -= n
        self.state.calls_done(n)

    # --- running calls on tasks ---

    async def run_call(self, call: Call) -> None:
        assert self.conn is not None
        ctx = CallContext(self.conn)
        try:
            reply = await answer(self.handler, ctx, call)
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
            replies[i] = await answer(self.handler, ctx, call)

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

    # --- deferred jobs ---

    def start_deferred(self, ctx: CallContext) -> None:
        if not ctx.deferred or self.closing or self.tg is None:
            return
        for job in ctx.deferred:
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


def _answer_invalid(item: Item) -> bytes:
    assert isinstance(item, Invalid)
    return encode_error(item.id, item.error)
