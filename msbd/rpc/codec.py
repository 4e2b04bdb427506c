"""The pure JSON-RPC 2.0 codec: frame bytes in, calls or errors out; replies back to bytes.

No I/O and no event loop: the server, the blocking client (msbctl) and the
async client all reuse it (the clients read replies with `msbd.rpc.replies`).
Every decoder is built once at import.

How a frame is decided (JSON-RPC 2.0, params by name only):

- not JSON, not UTF-8 (RFC 8259 requires it), a string with a lone surrogate
  escape (`"\\ud800"`: no text to decode it to), or nested too deeply
                                            -> -32700, id null
- valid JSON that is not a request object: a bare string, number, null or
  boolean, a member of the wrong type, a number out of range (`1e400`, an
  integer of more than 4300 digits) where the envelope needs it (`id`)
                                            -> -32600, with the id if one is
  readable, else null
- `[]`, or more entries than `max_batch`    -> one -32600 for the whole batch, id null,
  data `{"limit": max_batch}`; none of its entries is run
- an entry that is not a request object     -> -32600, with its id if one is
  readable (string, number or null), else null; answered even without an id
- `params` neither absent, object nor array -> -32600 (the spec's "structured value")
- unknown method                            -> -32601, data `{"method": ...}`
- `params` a non-empty array                -> -32602 "params must be an object (by name)"
- params of the wrong type or value         -> -32602, data `{"field": "<path>"}`
- a request without `id` is a notification: it is run, and never answered,
  not even with -32601/-32602 (those are dropped here).
- duplicate member names: the last one wins (as in Python's `json` and
  JavaScript's `JSON.parse`); members the envelope does not know are ignored.
- an `id` is echoed as decoded: an integer of up to 4300 digits exactly.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any, Final, Literal, TypeAlias

import msgspec
from msgspec import UNSET, Raw, UnsetType

from msbd.errors import (
    InvalidParams,
    InvalidRequest,
    MethodNotFound,
    MsbdError,
    ParseError,
    RemoteError,
)
from msbd.model import Spec
from msbd.rpc.methods import METHODS

Id: TypeAlias = str | int | float | None
"""A request id: the spec allows a string, a number or null."""


# --- what parse_frame returns -------------------------------------------------


class Call(msgspec.Struct, frozen=True, gc=False):
    """A valid request: run `method` with decoded and checked `params`."""

    id: Id
    method: str
    params: Spec
    notification: bool


class Invalid(msgspec.Struct, frozen=True):
    """A request that must be answered with `error` (never a notification)."""

    id: Id
    error: MsbdError


class Batch(msgspec.Struct, frozen=True):
    """A batch: its answerable items in order (notifications' errors dropped)."""

    items: list[Call | Invalid]


Item: TypeAlias = Call | Invalid
Frame: TypeAlias = Call | Invalid | Batch | None
"""What one line means; None: nothing to run and nothing to answer."""


# --- wire structs -------------------------------------------------------------


class _Envelope(msgspec.Struct, frozen=True, gc=False):
    # Unknown members are ignored: the spec does not forbid them.
    jsonrpc: Literal["2.0"]
    method: str
    params: Raw = Raw(b"")
    id: Id | UnsetType = UNSET


class ErrorObject(msgspec.Struct, frozen=True, omit_defaults=True):
    code: int
    message: str
    data: Any = None


class _ResultReply(msgspec.Struct, frozen=True):
    jsonrpc: str
    result: Any
    id: Id


class _ErrorReply(msgspec.Struct, frozen=True):
    jsonrpc: str
    error: ErrorObject
    id: Id


class _Request(msgspec.Struct, frozen=True, omit_defaults=True):
    jsonrpc: str
    method: str
    params: Any = None
    id: Id = None


class _Notification(msgspec.Struct, frozen=True, omit_defaults=True):
    jsonrpc: str
    method: str
    params: Any = None


# --- decoders and encoder, built once ------------------------------------------

_ENVELOPE: Final = msgspec.json.Decoder(_Envelope)
_BATCH: Final = msgspec.json.Decoder(list[Raw])
_RAW: Final = msgspec.json.Decoder(Raw)
_MEMBERS: Final = msgspec.json.Decoder(dict[str, Raw])
_ID: Final = msgspec.json.Decoder(Id)
_ENCODER: Final = msgspec.json.Encoder()


def _default_params(decoder: msgspec.json.Decoder[Any]) -> Spec | None:
    try:
        params: Spec = decoder.decode(b"{}")
        params.check()
    except (msgspec.ValidationError, MsbdError):
        return None
    return params


_PARAMS: Final[dict[str, tuple[msgspec.json.Decoder[Any], Spec | None]]] = {}
for _name, _spec in METHODS.items():
    _dec: msgspec.json.Decoder[Any] = msgspec.json.Decoder(_spec.params)
    _PARAMS[_name] = (_dec, _default_params(_dec))

DEFAULT_MAX_BATCH: Final = 100
_WS: Final = b" \t\r\n"
_STRUCTURED: Final = frozenset(b"{[")


# --- decoding requests ----------------------------------------------------------


def parse_frame(line: bytes, *, max_batch: int = DEFAULT_MAX_BATCH) -> Frame:
    """Decide what one frame (a line without its newline) asks for. Never raises."""
    body = line.strip(_WS)
    if not body:
        return None
    if not body.isascii():  # msgspec checks UTF-8 only in strings it decodes, not skips
        try:
            body.decode()
        except UnicodeDecodeError as exc:
            return Invalid(None, ParseError(f"parse error: invalid UTF-8 at byte {exc.start}"))
    if body[0] == 0x5B:  # "["
        return _parse_batch(body, max_batch)
    try:
        env = _ENVELOPE.decode(body)
    except msgspec.ValidationError as exc:
        return _invalid_envelope(body, exc, whole_frame=True)
    except (msgspec.DecodeError, RecursionError) as exc:
        return Invalid(None, _parse_error(exc))
    return _call(env)


def _parse_batch(body: bytes, max_batch: int) -> Frame:
    try:
        entries = _BATCH.decode(body)
    except (msgspec.DecodeError, RecursionError) as exc:
        return Invalid(None, _parse_error(exc))
    if not entries:
        return Invalid(None, InvalidRequest("invalid request: empty batch"))
    if len(entries) > max_batch:
        return Invalid(None, InvalidRequest(
            f"batch of {len(entries)} requests is over the limit of {max_batch}",
            data={"limit": max_batch}))
    items: list[Item] = []
    for raw in entries:
        try:
            item = _call(_ENVELOPE.decode(raw))
        except msgspec.ValidationError as exc:
            item = _invalid_envelope(raw, exc, whole_frame=False)
        except (msgspec.DecodeError, RecursionError) as exc:  # pragma: no cover - validated above
            item = Invalid(None, _parse_error(exc))
        if item is not None:
            items.append(item)
    return Batch(items)


def _call(env: _Envelope) -> Item | None:
    notification = env.id is UNSET
    rid: Id = None if isinstance(env.id, UnsetType) else env.id
    raw = env.params
    if not raw:  # absent, the common case (`ping`, `info`): its checked default if it has one
        found = _PARAMS.get(env.method)
        if found is not None and found[1] is not None:
            return Call(rid, env.method, found[1], notification)
    kind = memoryview(raw)[0] if len(raw) else 0x7B  # absent reads as "{}"
    if kind not in _STRUCTURED:
        return Invalid(rid, InvalidRequest(
            "invalid request: params must be an object or an array", data={"field": "params"}))
    found = _PARAMS.get(env.method)
    if found is None:
        return None if notification else Invalid(rid, MethodNotFound(env.method))
    decoder, default = found
    try:
        if not len(raw) or (kind == 0x5B and _empty_array(raw)):
            params = default if default is not None else decoder.decode(b"{}")
        elif kind == 0x5B:
            raise InvalidParams("params must be an object (by name)")
        else:
            params = decoder.decode(raw)
        if params is not default:
            params.check()
    except msgspec.ValidationError as exc:
        return None if notification else Invalid(rid, invalid_params(exc))
    except (msgspec.DecodeError, RecursionError) as exc:  # pragma: no cover - checked above
        return Invalid(None, _parse_error(exc))
    except MsbdError as exc:
        return None if notification else Invalid(rid, exc)
    return Call(rid, env.method, params, notification)


def _empty_array(raw: Raw) -> bool:
    return bytes(raw).translate(None, _WS) == b"[]"


def _invalid_envelope(body: bytes | Raw, exc: msgspec.ValidationError,
                      *, whole_frame: bool) -> Invalid:
    # Only the syntax is checked here (skipping values checks no number's range):
    # malformed JSON after the first wrong member is still a parse error.
    try:
        _RAW.decode(body)
    except (msgspec.DecodeError, RecursionError) as bad:
        if whole_frame:
            return Invalid(None, _parse_error(bad))
    try:
        members = _MEMBERS.decode(body)  # member values stay raw: none can be out of range
    except (msgspec.DecodeError, RecursionError):
        members = {}  # valid JSON, but not an object
    rid = _readable_id(members.get("id"))
    message, field = _describe(str(exc))
    if field is None:
        return Invalid(rid, InvalidRequest(f"invalid request: {message}"))
    return Invalid(rid, InvalidRequest(f"invalid request: {message}", data={"field": field}))


def _readable_id(raw: Raw | None) -> Id:
    """The id to answer an invalid request with: its own if it is a valid id, else null."""
    if raw is None:
        return None
    try:
        rid: Id = _ID.decode(raw)
    except msgspec.DecodeError:  # an object, a boolean, a number out of range
        return None
    return rid


def _parse_error(exc: Exception) -> ParseError:
    if isinstance(exc, RecursionError):
        return ParseError("parse error: JSON nested too deeply")
    return ParseError(f"parse error: {exc}")


# --- msgspec's error path -> our field path -------------------------------------

_AT = re.compile(r"^(?P<detail>.*?) - at (?:`(?P<key>key)` in )?`\$(?P<path>[^`]*)`$", re.S)
_NAMED = re.compile(r"^Object (?P<what>missing required|contains unknown) field `(?P<name>[^`]*)`$")


def _describe(text: str) -> tuple[str, str | None]:
    """(message, field) from a msgspec ValidationError text."""
    detail, path = text, ""
    if (at := _AT.match(text)) is not None:
        detail, path = at["detail"], at["path"]
    path = path.replace("[...]", "").removeprefix(".")
    if (named := _NAMED.match(detail)) is not None:
        field = f"{path}.{named['name']}" if path else named["name"]
        what = "missing required" if named["what"].startswith("missing") else "unknown"
        return f"{what} field `{field}`", field
    if not path:
        return detail, None
    if at is not None and at["key"]:
        return f"invalid key in `{path}`: {detail}", path
    return f"invalid `{path}`: {detail}", path


def invalid_params(exc: msgspec.ValidationError) -> InvalidParams:
    """Translate msgspec's validation error into -32602 naming the field."""
    message, field = _describe(str(exc))
    return InvalidParams(message if field else f"invalid params: {message}", field=field)


# --- encoding replies -------------------------------------------------------------


def encode_result(rid: Id, result: Any) -> bytes:
    """A success reply (no newline). Raises TypeError/EncodeError if `result` is not encodable."""
    return _ENCODER.encode(_ResultReply("2.0", result, rid))


def encode_error(rid: Id, exc: MsbdError) -> bytes:
    """An error reply with the error's code, message and data (no newline)."""
    return _ENCODER.encode(_ErrorReply("2.0", error_object(exc), rid))


def error_object(exc: MsbdError) -> ErrorObject:
    if isinstance(exc, RemoteError):
        return ErrorObject(exc.remote_code, exc.message, exc.remote_data)
    return ErrorObject(int(exc.code), exc.message, exc.data)


def encode_batch(replies: Sequence[bytes]) -> bytes:
    """One array of already encoded replies (no newline)."""
    return b"[" + b",".join(replies) + b"]"


def encode_request(method: str, params: Any, rid: Id) -> bytes:
    """A request; `params` (a dict or Struct) is omitted when None. No newline."""
    return _ENCODER.encode(_Request("2.0", method, params, rid))


def encode_notification(method: str, params: Any) -> bytes:
    """A notification (a request without id). No newline."""
    return _ENCODER.encode(_Notification("2.0", method, params))
