"""The control path's floor: the least a uvloop + msgspec newline-delimited JSON-RPC server does.

    python -m bench.echo_server SOCKET [RESULTS_FILE]

Per frame it decodes the request with a typed msgspec decoder and encodes a
reply carrying the result for that method: `"pong"` for daemon.ping, and for
methods named in RESULTS_FILE (a JSON object method -> result, e.g. the real
reply of msbd's sandbox.list) that result, re-encoded from Python objects on
every call. It answers inside `data_received`: no tasks, no dispatch table,
no database. Prints `ready` once it listens.
"""

from __future__ import annotations

import asyncio
import sys
from typing import Any

import msgspec
import uvloop


class Request(msgspec.Struct):
    jsonrpc: str
    method: str
    id: int | str | None = None
    params: msgspec.Raw = msgspec.Raw(b"null")


class Reply(msgspec.Struct):
    jsonrpc: str
    id: int | str | None
    result: Any


_DECODE = msgspec.json.Decoder(Request).decode
_ENCODE = msgspec.json.Encoder().encode


class EchoProtocol(asyncio.Protocol):
    def __init__(self, results: dict[str, Any]) -> None:
        self.results = results
        self.buf = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        *frames, self.buf = (self.buf + data).split(b"\n")
        assert self.transport is not None
        for frame in frames:
            req = _DECODE(frame)
            result = self.results.get(req.method, "pong")
            self.transport.write(_ENCODE(Reply("2.0", req.id, result)) + b"\n")


async def serve(path: str, results: dict[str, Any]) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_unix_server(lambda: EchoProtocol(results), path)
    print("ready", flush=True)
    async with server:
        await server.serve_forever()


def main(argv: list[str]) -> int:
    results: dict[str, Any] = {}
    if len(argv) > 1:
        with open(argv[1], "rb") as f:
            results = msgspec.json.decode(f.read())
    uvloop.run(serve(argv[0], results))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
