"""The client's half of the codec: what the daemon sends, decoded into replies and notifications.

Pure, like `msbd.rpc.codec` (bytes in, messages out), and as light: the
blocking client (msbctl) and the async client both read with it. A reply's
result stays raw JSON until the caller decides its type (`Response.unwrap`,
then a per-method decoder); an error reply raises `RemoteError` with the
code, message and data the daemon sent.
"""

from __future__ import annotations

from typing import Final, Literal

import msgspec
from msgspec import UNSET, Raw, UnsetType

from msbd.errors import ParseError, RemoteError
from msbd.rpc.codec import ErrorObject, Id


class Response(msgspec.Struct, frozen=True):
    """A reply as a client sees it: `result` (raw JSON) or `error`."""

    id: Id
    result: Raw | None = None
    error: ErrorObject | None = None

    def unwrap(self) -> Raw:
        """The raw result; an error reply raises `RemoteError`."""
        if self.error is not None:
            raise RemoteError(self.error.code, self.error.message, self.error.data)
        return self.result if self.result is not None else Raw(b"null")


class Notification(msgspec.Struct, frozen=True):
    """A notification as a client sees it (the daemon sends `event`)."""

    method: str
    params: Raw


class _Incoming(msgspec.Struct, frozen=True):
    jsonrpc: Literal["2.0"]
    id: Id | UnsetType = UNSET
    method: str | UnsetType = UNSET
    params: Raw = Raw(b"")
    result: Raw | UnsetType = UNSET
    error: ErrorObject | UnsetType = UNSET


_INCOMING: Final = msgspec.json.Decoder(_Incoming)
_BATCH: Final = msgspec.json.Decoder(list[Raw])
_WS: Final = b" \t\r\n"


def decode_message(line: bytes) -> Response | Notification | list[Response]:
    """What the daemon sent: a reply, a notification, or a batch's replies.

    Raises `ParseError` when the line is not a JSON-RPC 2.0 response.
    """
    body = line.strip(_WS)
    try:
        if body[:1] == b"[":
            return [_response(_INCOMING.decode(raw)) for raw in _BATCH.decode(body)]
        msg = _INCOMING.decode(body)
    except (msgspec.DecodeError, RecursionError) as exc:
        raise ParseError(f"malformed message from the daemon: {exc}") from exc
    if isinstance(msg.method, str) and msg.id is UNSET:
        return Notification(msg.method, msg.params if len(msg.params) else Raw(b"null"))
    return _response(msg)


def _response(msg: _Incoming) -> Response:
    if isinstance(msg.id, UnsetType) or isinstance(msg.result, UnsetType) == isinstance(
            msg.error, UnsetType):
        raise ParseError("malformed response from the daemon: needs `id` and exactly one "
                         "of `result` and `error`")
    if isinstance(msg.error, ErrorObject):
        return Response(msg.id, None, msg.error)
    return Response(msg.id, msg.result if isinstance(msg.result, Raw) else None, None)
