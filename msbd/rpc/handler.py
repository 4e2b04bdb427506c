"""What a method handler sees of the RPC server: its call's context and its connection.

The server calls `await handler(ctx, method, params)` with params already
decoded and checked against the method table; the handler returns a result
(encoded with msgspec) or raises an `MsbdError` (the error reply): `answer`
turns the outcome into the reply's bytes, anything unexpected into a bare
"internal error" with the traceback logged, never sent. Through
`ctx.connection` it learns who is calling (the kernel's word, read at
connect time) and can send notifications; through `ctx.defer` it can start
work that must follow its reply (an event stream after `events.subscribe`).

A `Connection` reaches its connection's protocol only through `Link`,
the four things it needs; `msbd.rpc.protocol.ServerProtocol` is one. This
module imports nothing of the protocol, so handlers and tests can use it
alone.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any, Final, Protocol

import anyio
import msgspec

from msbd.errors import MsbdError
from msbd.model import Spec
from msbd.peer import Peer
from msbd.rpc.codec import Call, encode_error, encode_notification, encode_result

log = logging.getLogger("msbd.rpc")

Handler = Callable[["CallContext", str, Spec], Awaitable[Any]]
"""`await handler(ctx, method, params)`; the result is encoded with msgspec."""
Immediate = Callable[["CallContext", Spec], Any]
"""`immediate(ctx, params)`: one method's handler that never suspends, so the server
answers it inside the read callback (`msbd.rpc.calls`); same results and errors."""
Deferred = Callable[[], Awaitable[None]]

INTERNAL_ERROR: Final = MsbdError("internal error")
"""What the client is told of an unexpected exception (it is logged, never sent)."""


class Link(Protocol):
    """What a `Connection` needs of its connection's protocol."""

    @property
    def closing(self) -> bool: ...

    def write(self, data: bytes) -> None:
        """Write one frame (its newline added); dropped once closing."""

    async def wait_writable(self) -> None:
        """Return once the client reads its replies again, or the connection closes."""

    def close(self) -> None:
        """Close after the replies already written are sent."""


class Connection:
    """One client connection as handlers see it: who is calling, and a way to notify.

    `subscriptions` is the handlers' own count of the event streams this
    connection holds (the daemon caps it per connection); `memo` is theirs
    too: what they derive from the connection once instead of on every call
    (the daemon keeps its `Caller` there). None until they set it.
    """

    __slots__ = ("_link", "gid", "groups", "id", "memo", "pid", "subscriptions", "uid")

    def __init__(self, link: Link, conn_id: int, peer: Peer) -> None:
        self._link = link
        self.id = conn_id
        self.pid = peer.pid
        self.uid = peer.uid
        self.gid = peer.gid
        self.groups = peer.groups
        self.subscriptions = 0
        self.memo: Any = None

    def __repr__(self) -> str:
        return f"<Connection {self.id} uid={self.uid} gid={self.gid} pid={self.pid}>"

    @property
    def closed(self) -> bool:
        return self._link.closing

    async def notify(self, method: str, params: Any) -> None:
        """Write one notification frame; waits while the client is not reading.

        Raises `anyio.BrokenResourceError` once the connection is closed (a
        client that does not read for `send_timeout` is closed).
        """
        link = self._link
        if link.closing:
            raise anyio.BrokenResourceError(f"connection {self.id} is closed")
        link.write(encode_notification(method, params))
        await link.wait_writable()
        if link.closing:
            raise anyio.BrokenResourceError(f"connection {self.id} is closed")

    def close(self) -> None:
        """Close after the replies already written are sent; cancels its calls."""
        self._link.close()


class CallContext(msgspec.Struct):
    """What a handler gets besides its params: the connection, and `defer`.

    A struct, not a class with `__init__`: one is made for every call, and
    msgspec builds it without running Python code. (Still tracked by the
    garbage collector: a deferred job may hold its context.)
    """

    connection: Connection
    deferred: list[Deferred] = msgspec.field(default_factory=list)

    def defer(self, job: Deferred) -> None:
        """Run `job()` once this call's reply (or its batch's reply) is written.

        It runs in the connection's task group: it is cancelled when the
        connection closes, and its errors are logged, never sent.
        """
        self.deferred.append(job)


async def answer(handler: Handler, ctx: CallContext, call: Call) -> bytes | None:
    """Run one call; its encoded reply, or None for a notification (never answered).

    An `MsbdError` is the error reply; anything else is logged with its
    traceback and answered "internal error".
    """
    try:
        result = await handler(ctx, call.method, call.params)
        return None if call.notification else encode_result(call.id, result)
    except Exception as exc:  # noqa: BLE001 - every outcome is a reply (see _failed)
        return _failed(ctx, call, exc)


def answer_now(immediate: Immediate, ctx: CallContext, call: Call) -> bytes | None:
    """`answer` for a handler that never suspends: the same reply, without awaiting."""
    try:
        result = immediate(ctx, call.params)
        return None if call.notification else encode_result(call.id, result)
    except Exception as exc:  # noqa: BLE001 - every outcome is a reply (see _failed)
        return _failed(ctx, call, exc)


def _failed(ctx: CallContext, call: Call, exc: Exception) -> bytes | None:
    if isinstance(exc, MsbdError):
        if call.notification:
            log.debug("connection %d: notification %s failed: %s", ctx.connection.id,
                      call.method, exc)
            return None
        return encode_error(call.id, exc)
    log.error("connection %d: %s raised", ctx.connection.id, call.method, exc_info=exc)
    return None if call.notification else encode_error(call.id, INTERNAL_ERROR)
