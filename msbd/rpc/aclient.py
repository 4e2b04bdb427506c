"""The async JSON-RPC client: many concurrent calls multiplexed by id on one connection.

`async with connect(path) as client:` starts a reader task (owned by the
context manager's task group) that hands each reply to the caller waiting on
its id and queues notifications for `client.notifications()`.
"""

from __future__ import annotations

import math
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import anyio.abc
import msgspec
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from msbd.errors import DaemonUnavailable, MsbdError
from msbd.rpc.client import RECV_SIZE, connect_error, default_socket_path, result_type
from msbd.rpc.codec import encode_request
from msbd.rpc.framing import Framer
from msbd.rpc.methods import NOTIFICATIONS
from msbd.rpc.replies import Notification, Response, decode_message


class _Pending:
    __slots__ = ("done", "response")

    def __init__(self) -> None:
        self.done = anyio.Event()
        self.response: Response | MsbdError | None = None


class AsyncClient:
    """One connection to msbd; get it from `connect()`."""

    def __init__(self, stream: anyio.abc.SocketStream, path: str) -> None:
        self.path = path
        self._stream = stream
        self._ids = 0
        self._pending: dict[int, _Pending] = {}
        self._lock = anyio.Lock()
        self._closed: MsbdError | None = None
        self._decoders: dict[str, msgspec.json.Decoder[Any]] = {}
        send, receive = anyio.create_memory_object_stream[Notification](math.inf)
        self._note_send: MemoryObjectSendStream[Notification] = send
        self._note_receive: MemoryObjectReceiveStream[Notification] = receive

    async def call(self, method: str, params: Any = None, *,
                   timeout: float | None = None) -> Any:
        """Call `method` and return its JSON result; raises `RemoteError` on an error reply."""
        return msgspec.json.decode(await self._call(method, params, timeout))

    async def call_typed(self, method: str, params: Any = None, *,
                         timeout: float | None = None) -> Any:
        """Like `call`, decoding the result into the method's result type."""
        decoder = self._decoders.get(method)
        if decoder is None:
            decoder = self._decoders[method] = msgspec.json.Decoder(result_type(method))
        return decoder.decode(await self._call(method, params, timeout))

    async def notifications(self, *, typed: bool = False) -> AsyncIterator[tuple[str, Any]]:
        """(method, params) of each notification, until the connection closes."""
        async for note in self._note_receive:
            kind = NOTIFICATIONS.get(note.method) if typed else None
            yield note.method, msgspec.json.decode(note.params, type=kind or Any)

    async def _call(self, method: str, params: Any, timeout: float | None) -> msgspec.Raw:
        if self._closed is not None:
            raise self._closed
        self._ids += 1
        rid = self._ids
        pending = self._pending[rid] = _Pending()
        try:
            async with self._lock:
                await self._stream.send(encode_request(method, params, rid) + b"\n")
            with anyio.fail_after(timeout):
                await pending.done.wait()
        except TimeoutError:
            raise TimeoutError(f"no reply to {method} within {timeout}s") from None
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError) as exc:
            raise DaemonUnavailable(f"connection to msbd at {self.path} lost: {exc}",
                                    data={"socket": self.path}) from exc
        finally:
            self._pending.pop(rid, None)
        if isinstance(pending.response, MsbdError):
            raise pending.response
        assert pending.response is not None
        return pending.response.unwrap()

    async def _read(self) -> None:
        frames = Framer()
        lost: MsbdError = DaemonUnavailable(f"msbd closed the connection at {self.path}",
                                            data={"socket": self.path})
        try:
            while True:
                try:
                    data = await self._stream.receive(RECV_SIZE)
                except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError):
                    break
                frames.feed(data)
                while (line := frames.pop()) is not None:
                    if line.strip():
                        self._dispatch(line)
        except MsbdError as exc:  # a malformed message: the stream cannot be trusted
            lost = exc
        finally:
            self._closed = lost
            for pending in self._pending.values():
                pending.response = lost
                pending.done.set()
            self._note_send.close()

    def _dispatch(self, line: bytes) -> None:
        msg = decode_message(line)
        if isinstance(msg, Notification):
            self._note_send.send_nowait(msg)
            return
        for response in msg if isinstance(msg, list) else [msg]:
            if response.id is None and response.error is not None:
                targets = list(self._pending.values())  # about a request it could not read
            else:
                found = self._pending.get(response.id) if isinstance(response.id, int) else None
                targets = [found] if found is not None else []
            for pending in targets:
                pending.response = response
                pending.done.set()


@asynccontextmanager
async def connect(path: str | os.PathLike[str] | None = None) -> AsyncIterator[AsyncClient]:
    """Connect to msbd at `path` (default: `default_socket_path()`)."""
    where = os.fspath(path) if path is not None else default_socket_path()
    try:
        stream = await anyio.connect_unix(where)
    except OSError as exc:
        raise connect_error(where, exc) from exc
    async with stream, anyio.create_task_group() as tg:
        client = AsyncClient(stream, where)
        tg.start_soon(client._read)
        try:
            yield client
        finally:
            tg.cancel_scope.cancel()
            client._note_send.close()
            client._note_receive.close()
