"""The error tree shared by the daemon, the worker, the client and msbctl.

One root, `MsbdError`; a subclass only where a caller branches on it. Each
error knows its JSON-RPC code, so the mapping from error to wire lives here,
in one place (`RpcCode`), and nowhere else.
"""

from __future__ import annotations

import enum
from typing import Any


class RpcCode(enum.IntEnum):
    """Every JSON-RPC error code msbd sends: the standard ones, then ours."""

    PARSE_ERROR = -32700
    INVALID_REQUEST = -32600
    METHOD_NOT_FOUND = -32601
    INVALID_PARAMS = -32602
    INTERNAL_ERROR = -32603
    NOT_FOUND = -32001
    CONFLICT = -32002
    PERMISSION_DENIED = -32003
    LIMIT_REACHED = -32004
    LAUNCH_FAILED = -32005
    TIMED_OUT = -32006
    NOT_SUPPORTED = -32007


class MsbdError(Exception):
    """Root of every error msbd raises on purpose.

    `message` is one clear line for a person; `data` is the machine-readable
    detail sent as the JSON-RPC error's `data` (which field, which sandbox).
    """

    code: RpcCode = RpcCode.INTERNAL_ERROR

    def __init__(self, message: str, *, data: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.data = data

    def __str__(self) -> str:
        return self.message


class ParseError(MsbdError):
    """The frame is not valid JSON."""

    code = RpcCode.PARSE_ERROR


class InvalidRequest(MsbdError):
    """Valid JSON, but not a JSON-RPC 2.0 request object."""

    code = RpcCode.INVALID_REQUEST


class MethodNotFound(MsbdError):
    code = RpcCode.METHOD_NOT_FOUND

    def __init__(self, method: str) -> None:
        super().__init__(f"method not found: {method!r}", data={"method": method})


class InvalidParams(MsbdError):
    """Params of the wrong shape or value; `field` names the culprit."""

    code = RpcCode.INVALID_PARAMS

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message, data={"field": field} if field is not None else None)
        self.field = field


class NotFound(MsbdError):
    code = RpcCode.NOT_FOUND

    def __init__(self, name: str) -> None:
        super().__init__(f"no sandbox named {name!r}", data={"sandbox": name})
        self.name = name


class Conflict(MsbdError):
    """The name is taken, or the sandbox is in the wrong state for the call."""

    code = RpcCode.CONFLICT


class PortInUse(Conflict):
    """A host port the spec publishes is held by a starting or running sandbox: the
    launch could not begin (`sandbox.run` then keeps no record)."""


class PermissionDenied(MsbdError):
    code = RpcCode.PERMISSION_DENIED


class LimitReached(MsbdError):
    code = RpcCode.LIMIT_REACHED


class LaunchFailed(MsbdError):
    code = RpcCode.LAUNCH_FAILED


class TimedOut(MsbdError):
    code = RpcCode.TIMED_OUT


class NotSupported(MsbdError):
    """The call is valid, but this daemon cannot do it here: a feature the host or the
    settings do not provide (`sandbox.pause` without cgroups). Not the sandbox's state
    (that is `Conflict`): asking again will not help until the daemon is set up otherwise."""

    code = RpcCode.NOT_SUPPORTED


class ConfigError(MsbdError):
    """A bad setting: startup refuses to go on and says which one."""


class AlreadyRunning(ConfigError):
    """Another daemon owns the socket or the state dir."""


class StoreError(MsbdError):
    """The database could not do what was asked (not a caller's mistake)."""


class FdCheckFailed(MsbdError):
    """The worker inherited a file descriptor that is missing or wrong."""

    def __init__(self, fd: int, problem: str) -> None:
        super().__init__(f"fd {fd}: {problem}", data={"fd": fd})
        self.fd = fd
        self.problem = problem


class KrunError(MsbdError):
    """A libkrun call returned a negative errno."""

    def __init__(self, symbol: str, errno: int, message: str) -> None:
        super().__init__(f"{symbol} failed: {message} (errno {errno})",
                         data={"symbol": symbol, "errno": errno})
        self.symbol = symbol
        self.errno = errno


class LibraryNotLoadable(MsbdError):
    """No usable library was found; `tried` says where it looked and what went wrong."""

    def __init__(self, what: str, tried: list[str]) -> None:
        super().__init__(f"{what} not loadable; tried: " + "; ".join(tried),
                         data={"tried": tried})
        self.tried = tried


class DaemonUnavailable(MsbdError, ConnectionError):
    """A client's side: the daemon's socket is missing, refuses us, or the connection dropped."""


class Lagged(MsbdError):
    """An events subscriber fell too far behind and was dropped (it may resubscribe)."""

    def __init__(self, message: str = "the subscriber fell behind and was dropped") -> None:
        super().__init__(message)


class RemoteError(MsbdError):
    """An error reply received by a client: code, message and data as sent."""

    def __init__(self, code: int, message: str, data: Any = None) -> None:
        super().__init__(message, data=data if isinstance(data, dict) else None)
        self.remote_code = code
        self.remote_data = data

    @property
    def rpc_code(self) -> int:
        return self.remote_code
