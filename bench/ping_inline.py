"""The RPC server's own CPU per `daemon.ping`, in process: through a task, and answered inline.

    .venv/bin/python -m bench.ping_inline [--calls N] [--profile]

One connection's protocol (`msbd.rpc.protocol.ServerProtocol`) on uvloop,
driven through `data_received` on an in-memory transport: no socket, no
client, so what is measured is only the server's Python work from the bytes
read to the reply written. Two connections side by side: **task** sends the
ping to the handler on a worker task (the path of every call that may
suspend), **inline** answers it from an immediate shaped like the daemon's
(`msbd.daemon.calling`: the caller built from the connection and checked).
Seven rounds of N pings each, interleaved; the process's CPU time per ping,
min and median. `--profile` then prints cProfile's top functions of the
inline path.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import pstats
import statistics
import sys
import time
from typing import Any

import anyio
import msgspec
import uvloop

from msbd.daemon.calling import caller_of, inline
from msbd.peer import Peer
from msbd.rpc.handler import CallContext
from msbd.rpc.limits import RpcLimits
from msbd.rpc.protocol import ServerProtocol
from msbd.rpc.state import ServerState

PEER = Peer(pid=1, uid=1000, gid=1000, groups=frozenset({1000}))
PING = msgspec.json.encode({"jsonrpc": "2.0", "method": "daemon.ping", "id": 1}) + b"\n"


class Sink(asyncio.Transport):
    """Keeps what is written; never closing, and always reading: the read gate stays
    open in this measurement (the protocol's pause in `connection_made` is ignored,
    so it never needs to resume)."""

    def __init__(self) -> None:
        super().__init__()
        self.out = bytearray()

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.out += data

    def is_reading(self) -> bool:
        return True

    def pause_reading(self) -> None:
        pass

    def is_closing(self) -> bool:
        return False

    def get_write_buffer_size(self) -> int:
        return 0

    def close(self) -> None:
        pass


async def _handler(ctx: CallContext, method: str, params: Any) -> Any:
    caller_of(ctx, method)  # what the daemon's Api does before any handler
    return "pong"


def _pong(caller: Any, params: Any, ctx: CallContext) -> str:
    return "pong"


async def _pings(proto: ServerProtocol, sink: Sink, calls: int) -> float:
    start = time.process_time()
    for _ in range(calls):
        proto.data_received(PING)
        while not sink.out:
            await asyncio.sleep(0)
        sink.out.clear()
    return (time.process_time() - start) / calls


async def _main(calls: int, profile: bool) -> None:
    immediate = {"daemon.ping": inline("daemon.ping", _pong)}
    conns: dict[str, tuple[ServerProtocol, Sink]] = {}
    async with anyio.create_task_group() as tg:
        for name, table in (("task", {}), ("inline", immediate)):
            proto = ServerProtocol(ServerState(_handler, RpcLimits(), table), PEER)
            sink = Sink()
            proto.connection_made(sink)
            tg.start_soon(proto.run)
            conns[name] = (proto, sink)
        await anyio.wait_all_tasks_blocked()
        results: dict[str, list[float]] = {name: [] for name in conns}
        for proto, sink in conns.values():
            await _pings(proto, sink, 2000)  # warm-up
        for _ in range(7):
            for name, (proto, sink) in conns.items():
                results[name].append(await _pings(proto, sink, calls))
        for name, values in results.items():
            print(f"{name:6s} server CPU per ping: min {min(values) * 1e6:5.2f} us, "
                  f"median {statistics.median(values) * 1e6:5.2f} us (7 x {calls})")
        if profile:
            proto, sink = conns["inline"]
            prof = cProfile.Profile()
            prof.enable()
            await _pings(proto, sink, calls)
            prof.disable()
            pstats.Stats(prof).sort_stats("tottime").print_stats(15)
        tg.cancel_scope.cancel()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.ping_inline", description=__doc__)
    parser.add_argument("--calls", type=int, default=20000)
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args(argv)
    uvloop.run(_main(args.calls, args.profile))
    return 0


if __name__ == "__main__":
    sys.exit(main())
