"""How the server reaches a handler of `msbd.daemon.api`: the caller, then the handler.

Every handler gets the `Caller` first: the connection's peer credentials as
the kernel gave them at connect (kept on the connection, `Connection.memo`,
so it is built once), checked by `access.check_identity` for the method
(-32003 for an unknown peer, except the open methods). `Api` keeps one table
of handlers that may suspend (`Handler`); a handler written as a plain
function (`Immediately`) is also offered to the server to answer inline
(`inline`, `msbd.rpc.calls`), which runs for every ping: there the check is
written out, the same rule in fewer steps.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from msbd.daemon.access import OPEN_METHODS, Caller, check_identity
from msbd.rpc.server import CallContext, Immediate

Handler = Callable[[Caller, Any, CallContext], Awaitable[Any]]
Immediately = Callable[[Caller, Any, CallContext], Any]


def caller_of(ctx: CallContext, method: str) -> Caller:
    """Who calls `method` on this call's connection; -32003 if the kernel did not say
    and the method needs to know."""
    conn = ctx.connection
    caller: Caller | None = conn.memo  # the connection's credentials, read at connect
    if caller is None:
        caller = conn.memo = Caller(uid=conn.uid, gid=conn.gid, pid=conn.pid,
                                    groups=conn.groups)
    check_identity(caller, method)
    return caller


def awaitable(func: Immediately) -> Handler:
    """A plain-function handler as one that may suspend (for batches and the table)."""
    async def call(caller: Caller, params: Any, ctx: CallContext) -> Any:
        return func(caller, params, ctx)
    return call


def inline(method: str, func: Immediately) -> Immediate:
    """`func` as the server calls a method it answers inline, the caller checked as
    `caller_of` does."""
    open_method = method in OPEN_METHODS

    def call(ctx: CallContext, params: Any) -> Any:
        caller: Caller | None = ctx.connection.memo
        if caller is None or not (open_method or caller.known):
            caller = caller_of(ctx, method)  # builds it, or raises -32003
        return func(caller, params, ctx)
    return call
