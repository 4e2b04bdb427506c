"""Read a worker's pipes with the event loop's own transports: one registration per pipe.

A thousand workers each send a heartbeat a second and write console output;
waiting for readability once per chunk (register, wake, unregister) cost more
than the work itself. A read-pipe transport stays registered and hands every
chunk to a plain callback until EOF.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable

from msbd.rpc.framing import Framer

OnData = Callable[[bytes], None]


class _Reader(asyncio.Protocol):
    def __init__(self, on_data: OnData, done: asyncio.Future[None]) -> None:
        self._on_data = on_data
        self._done = done

    def data_received(self, data: bytes) -> None:
        if self._done.done():
            return
        try:
            self._on_data(data)
        except Exception as exc:  # noqa: BLE001 - handed to the awaiting task, not the loop
            self._done.set_exception(exc)

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if not self._done.done():
            self._done.set_result(None)


async def pump(fd: int, on_data: OnData) -> None:
    """Call `on_data` with each chunk read from the pipe `fd` until EOF.

    `on_data` runs inside the event loop's read callback: it must be quick and
    must not block; an exception from it ends the pump with that exception.
    `fd` itself stays open (the transport owns a duplicate).
    """
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()
    pipe = os.fdopen(os.dup(fd), "rb", buffering=0)
    try:
        transport, _ = await loop.connect_read_pipe(lambda: _Reader(on_data, done), pipe)
    except BaseException:
        pipe.close()
        raise
    try:
        await done
    finally:
        transport.close()


class LineSplitter:
    """Turn chunks into complete lines; a line longer than `limit` is dropped, not kept."""

    def __init__(self, on_line: Callable[[str], None], *, limit: int = 4096) -> None:
        self._on_line = on_line
        self._limit = limit
        self._frames = Framer()

    def feed(self, chunk: bytes) -> None:
        frames = self._frames
        line = frames.single(chunk)  # a heartbeat, nearly always: a thousand a second
        if line is not None:
            if line:
                self._on_line(line.decode(errors="replace").strip())
            return
        frames.feed(chunk)
        while (raw := frames.pop()) is not None:
            self._on_line(raw.decode(errors="replace").strip())
        if frames.pending > self._limit:
            frames.discard()
