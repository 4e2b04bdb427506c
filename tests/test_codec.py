"""The pure JSON-RPC codec: the JSON-RPC 2.0 spec examples, field paths, encoding."""

from __future__ import annotations

import datetime as dt
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from msbd.errors import MsbdError, NotFound, RemoteError
from msbd.model import State
from msbd.rpc.codec import (
    Batch,
    Call,
    Invalid,
    encode_batch,
    encode_error,
    encode_notification,
    encode_request,
    encode_result,
    parse_frame,
)
from msbd.rpc.methods import METHODS, NameParams
from msbd.rpc.replies import Notification, Response, decode_message


def shape(frame: object) -> Any:
    """What a client would get for each item: ("call", method, id, notification) or (code, id)."""
    if frame is None:
        return None
    if isinstance(frame, Batch):
        return [shape(item) for item in frame.items]
    if isinstance(frame, Call):
        return ("call", frame.method, frame.id, frame.notification)
    assert isinstance(frame, Invalid)
    return (int(frame.error.code), frame.id)


SPEC_EXAMPLES = [
    # rpc call with positional parameters: we are by-name only
    pytest.param(b'{"jsonrpc": "2.0", "method": "sandbox.get", "params": ["a"], "id": 1}',
                 (-32602, 1), id="positional-params"),
    pytest.param(b'{"jsonrpc": "2.0", "method": "sandbox.get", "params": {"name": "a"}, "id": 3}',
                 ("call", "sandbox.get", 3, False), id="named-params"),
    pytest.param(b'{"jsonrpc": "2.0", "method": "daemon.ping"}',
                 ("call", "daemon.ping", None, True), id="notification"),
    pytest.param(b'{"jsonrpc": "2.0", "method": "update", "params": [1,2,3,4,5]}',
                 None, id="notification-unknown-method"),
    pytest.param(b'{"jsonrpc": "2.0", "method": "foobar", "id": "1"}',
                 (-32601, "1"), id="non-existent-method"),
    pytest.param(b'{"jsonrpc": "2.0", "method": "foobar, "params": "bar", "baz]',
                 (-32700, None), id="invalid-json"),
    pytest.param(b'{"jsonrpc": "2.0", "method": 1, "params": "bar"}',
                 (-32600, None), id="invalid-request-object"),
    pytest.param(b'[{"jsonrpc": "2.0", "method": "sum", "params": [1,2,4], "id": "1"},'
                 b'{"jsonrpc": "2.0", "method"]',
                 (-32700, None), id="batch-invalid-json"),
    pytest.param(b"[]", (-32600, None), id="empty-array"),
    pytest.param(b"[1]", [(-32600, None)], id="invalid-batch-one"),
    pytest.param(b"[1,2,3]", [(-32600, None)] * 3, id="invalid-batch"),
    pytest.param(b'[{"jsonrpc": "2.0", "method": "daemon.ping", "id": "1"},'
                 b'{"jsonrpc": "2.0", "method": "notify_hello", "params": [7]},'
                 b'{"jsonrpc": "2.0", "method": "subtract", "params": [42,23], "id": "2"},'
                 b'{"foo": "boo"},'
                 b'{"jsonrpc": "2.0", "method": "foo.get", "params": {"name": "myself"},'
                 b' "id": "5"},'
                 b'{"jsonrpc": "2.0", "method": "get_data", "id": "9"}]',
                 [("call", "daemon.ping", "1", False), (-32601, "2"), (-32600, None),
                  (-32601, "5"), (-32601, "9")], id="mixed-batch"),
    pytest.param(b'[{"jsonrpc": "2.0", "method": "notify_sum", "params": [1,2,4]},'
                 b'{"jsonrpc": "2.0", "method": "notify_hello", "params": [7]}]',
                 [], id="all-notifications-batch"),
]


@pytest.mark.parametrize(("line", "expected"), SPEC_EXAMPLES)
def test_spec_examples(line: bytes, expected: Any) -> None:
    assert shape(parse_frame(line)) == expected


REQUEST_RULES = [
    pytest.param(b'{"jsonrpc":"2.0","method":"daemon.ping","id":null}',
                 ("call", "daemon.ping", None, False), id="null-id-is-a-request"),
    pytest.param(b'{"jsonrpc":"2.0","method":"daemon.ping","id":1.5}',
                 ("call", "daemon.ping", 1.5, False), id="fractional-id"),
    pytest.param(b'{"jsonrpc":"2.0","method":"daemon.ping","id":true}', (-32600, None),
                 id="bool-id"),
    pytest.param(b'{"jsonrpc":"2.0","method":"daemon.ping","id":{}}', (-32600, None), id="obj-id"),
    pytest.param(b'{"jsonrpc":"2.0","method":"daemon.ping","id":[1]}', (-32600, None),
                 id="array-id"),
    pytest.param(b'{"jsonrpc":"1.0","method":"daemon.ping","id":4}', (-32600, 4), id="jsonrpc-1.0"),
    pytest.param(b'{"method":"daemon.ping","id":4}', (-32600, 4), id="no-jsonrpc"),
    pytest.param(b'{"jsonrpc":"2.0","id":4}', (-32600, 4), id="no-method"),
    pytest.param(b'{"jsonrpc":"2.0","method":"daemon.ping","params":"x","id":4}', (-32600, 4),
                 id="string-params"),
    pytest.param(b'{"jsonrpc":"2.0","method":"daemon.ping","params":null,"id":4}', (-32600, 4),
                 id="null-params"),
    pytest.param(b'{"jsonrpc":"2.0","method":"daemon.ping","params":[ ],"id":4}',
                 ("call", "daemon.ping", 4, False), id="empty-array-params"),
    pytest.param(b'{"jsonrpc":"2.0","method":"daemon.ping","params":{},"id":4}',
                 ("call", "daemon.ping", 4, False), id="empty-object-params"),
    pytest.param(b'{"jsonrpc":"2.0","method":"daemon.ping","params":[1],"id":4}', (-32602, 4),
                 id="positional-on-no-params"),
    pytest.param(b'{"jsonrpc":"2.0","method":"sandbox.get","id":4}', (-32602, 4),
                 id="missing-params"),
    pytest.param(b'{"jsonrpc":"2.0","method":"sandbox.get"}', None,
                 id="notification-invalid-params"),
    pytest.param(b'{"jsonrpc":"2.0","method":"daemon.ping","id":4}  \r', ("call", "daemon.ping", 4,
                 False), id="trailing-whitespace"),
    pytest.param(b'{"jsonrpc":"2.0","method":"daemon.ping","id":4} x', (-32700, None),
                 id="trailing-garbage"),
    pytest.param(b'{"jsonrpc":1,"method":"daemon.ping","id":4, x', (-32700, None),
                 id="wrong-member-then-garbage"),
    pytest.param(b"[" * 5000 + b"]" * 5000, (-32700, None), id="nested-too-deeply"),
    pytest.param(b"   ", None, id="blank"),
    pytest.param(b'"hello"', (-32600, None), id="a-string"),
]


@pytest.mark.parametrize(("line", "expected"), REQUEST_RULES)
def test_request_rules(line: bytes, expected: Any) -> None:
    assert shape(parse_frame(line)) == expected


P = b'"jsonrpc":"2.0","method":'

HOSTILE_RULES = [
    # valid JSON with a number msgspec cannot hold: an invalid request, not a parse error
    pytest.param(b"{" + P + b'"daemon.ping","id":1e400}', (-32600, None), id="id-1e400"),
    pytest.param(b"{" + P + b'"daemon.ping","id":1' + b"0" * 5000 + b"}", (-32600, None),
                 id="id-5001-digits"),
    pytest.param(b"{" + P + b'"daemon.ping","id":1' + b"0" * 4000 + b"}",
                 ("call", "daemon.ping", 10**4000, False), id="id-4001-digits-echoed"),
    pytest.param(b"{" + P + b'1,"id":1e400}', (-32600, None), id="bad-method-and-id-1e400"),
    pytest.param(b"{" + P + b'1,"id":7,"x":1e400}', (-32600, 7), id="id-kept-past-1e400"),
    pytest.param(b"1e400", (-32600, None), id="bare-1e400"),
    pytest.param(b"[" + b"{" + P + b'"daemon.ping","id":1e400}]', [(-32600, None)],
                 id="batch-entry-id-1e400"),
    pytest.param(b"{" + P + b'"sandbox.logs","params":{"name":"a","wait":1e400},"id":2}',
                 (-32602, 2), id="param-1e400"),
    # not UTF-8: a parse error wherever it is (msgspec checks only what it decodes)
    pytest.param(b"{" + P + b'"sandbox.get","params":{"name":"\xc3"},"id":1}', (-32700, None),
                 id="utf8-in-params"),
    pytest.param(b"{" + P + b'"daemon.ping","x":"\xff","id":1}', (-32700, None),
                 id="utf8-in-ignored-member"),
    pytest.param(b"[{" + P + b'"daemon.ping","x":"\xff","id":1}]', (-32700, None),
                 id="utf8-in-batch"),
    pytest.param(b"{" + P + b'"daemon.ping","x":"\xed\xa0\x80","id":1}', (-32700, None),
                 id="utf8-encoded-surrogate"),
    # lone surrogate escapes decode to no text: a parse error
    pytest.param(b"{" + P + b'"daemon.ping","id":"\\ud800"}', (-32700, None),
                 id="lone-surrogate"),
    pytest.param(b"{" + P + b'"daemon.ping","id":"\\ud83d\\ude00"}',
                 ("call", "daemon.ping", "\U0001f600", False), id="surrogate-pair"),
    # duplicate members: the last wins
    pytest.param(b"{" + P + b'"nope",' + P + b'"daemon.ping","id":1,"id":2}',
                 ("call", "daemon.ping", 2, False), id="duplicate-members"),
]


@pytest.mark.parametrize(("line", "expected"), HOSTILE_RULES)
def test_hostile_values(line: bytes, expected: Any) -> None:
    assert shape(parse_frame(line)) == expected


def test_duplicate_params_members_last_wins() -> None:
    frame = parse_frame(b"{" + P + b'"sandbox.get","params":{"name":"a","name":"b"},"id":1}')
    assert isinstance(frame, Call) and frame.params == NameParams(name="b")


def test_batch_over_the_limit_is_one_error() -> None:
    line = b"[" + b",".join([b'{"jsonrpc":"2.0","method":"daemon.ping","id":1}'] * 3) + b"]"
    frame = parse_frame(line, max_batch=2)
    assert isinstance(frame, Invalid)
    assert frame.error.code == -32600 and "limit of 2" in frame.error.message


def launch(**extra: Any) -> bytes:
    params = {"name": "a", "exec": "/bin/sh", "rootfs": "/srv/root", **extra}
    return encode_request("sandbox.create", params, 9)


@pytest.mark.parametrize(("line", "field", "words"), [
    (launch(vcpus=0), "vcpus", ">= 1"),
    (launch(vcpus=256), "vcpus", "<= 255"),
    (launch(mounts=[{"tag": "", "host": "/x"}]), "mounts[0].tag", "mounts[0].tag"),
    (launch(mounts=[{"host": "/x"}]), "mounts[0].tag", "missing required field"),
    (launch(mounts=[{"tag": "t", "host": "/x", "zz": 1}]), "mounts[0].zz", "unknown field"),
    (launch(x=1), "x", "unknown field `x`"),
    (launch(env={"1A": "v"}), "env", "env"),
    (launch(labels={"a": 1}), "labels", "labels"),
    (launch(rootfs=None), "rootfs", "rootfs"),  # LaunchSpec.check()
    (launch(mounts=[{"tag": "t", "host": "/x"}, {"tag": "t", "host": "/y"}]), "mounts[1].tag",
     "duplicate"),
    (encode_request("sandbox.get", {}, 9), "name", "missing required field `name`"),
    (encode_request("sandbox.get", {"name": 5}, 9), "name", "`name`"),
])
def test_invalid_params_name_the_field(line: bytes, field: str, words: str) -> None:
    frame = parse_frame(line)
    assert isinstance(frame, Invalid)
    assert frame.id == 9
    assert frame.error.code == -32602
    assert frame.error.data == {"field": field}
    assert words in frame.error.message


def test_call_params_are_typed_structs() -> None:
    frame = parse_frame(encode_request("sandbox.get", {"name": "box"}, "x"))
    assert frame == Call("x", "sandbox.get", NameParams(name="box"), False)


def test_every_method_decodes() -> None:
    for name in METHODS:
        frame = parse_frame(encode_request(name, None, 1))
        assert isinstance(frame, Call | Invalid)
        if isinstance(frame, Invalid):
            assert frame.error.code == -32602


# --- encoding ---------------------------------------------------------------------


def test_encode_result_uses_rfc3339_and_enum_values() -> None:
    when = dt.datetime(2024, 5, 6, 7, 8, 9, tzinfo=dt.UTC)
    out = encode_result(7, {"at": when, "state": State.RUNNING})
    assert msgspec.json.decode(out) == {"jsonrpc": "2.0", "result": {
        "at": "2024-05-06T07:08:09Z", "state": "running"}, "id": 7}


def test_encode_error_carries_code_message_data() -> None:
    assert msgspec.json.decode(encode_error("a", NotFound("box"))) == {
        "jsonrpc": "2.0", "id": "a",
        "error": {"code": -32001, "message": "no sandbox named 'box'", "data": {"sandbox": "box"}}}
    assert msgspec.json.decode(encode_error(None, MsbdError("internal error"))) == {
        "jsonrpc": "2.0", "id": None, "error": {"code": -32603, "message": "internal error"}}


def test_encode_batch_and_requests() -> None:
    batch = encode_batch([encode_result(1, "pong"), encode_error(2, NotFound("x"))])
    assert [r["id"] for r in msgspec.json.decode(batch)] == [1, 2]
    assert msgspec.json.decode(encode_request("daemon.ping", None, 3)) == {
        "jsonrpc": "2.0", "method": "daemon.ping", "id": 3}
    assert msgspec.json.decode(encode_notification("event", {"a": 1})) == {
        "jsonrpc": "2.0", "method": "event", "params": {"a": 1}}


def test_decode_message_kinds() -> None:
    ok = decode_message(encode_result(1, "pong"))
    assert isinstance(ok, Response) and msgspec.json.decode(ok.unwrap()) == "pong"
    err = decode_message(encode_error(2, NotFound("x")))
    assert isinstance(err, Response)
    with pytest.raises(RemoteError) as info:
        err.unwrap()
    assert info.value.remote_code == -32001 and info.value.remote_data == {"sandbox": "x"}
    note = decode_message(encode_notification("event", {"a": 1}))
    assert isinstance(note, Notification) and note.method == "event"
    batch = decode_message(encode_batch([encode_result(1, None)]))
    assert isinstance(batch, list) and isinstance(batch[0], Response)
    assert msgspec.json.decode(batch[0].unwrap()) is None


@pytest.mark.parametrize("line", [b"nope", b'{"jsonrpc":"2.0","id":1}', b'{"jsonrpc":"2.0"}',
                                  b'{"jsonrpc":"2.0","id":1,"result":1,"error":{"code":1,'
                                  b'"message":"m"}}'])
def test_decode_message_rejects_garbage(line: bytes) -> None:
    with pytest.raises(MsbdError):
        decode_message(line)


# --- nothing a client sends makes parse_frame raise ---------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                               max_size=4),
    max_leaves=12)
requests = st.fixed_dictionaries(
    {"jsonrpc": st.sampled_from(["2.0", "1.0", 2])},
    optional={"method": st.sampled_from([*METHODS, "nope", 1]), "id": json_values,
              "params": json_values | st.fixed_dictionaries({}, optional={
                  "name": json_values | st.just("box"), "vcpus": json_values,
                  "exec": st.just("/bin/sh"), "rootfs": st.just("/r")})})


def check_answerable(frame: object) -> None:
    items = frame.items if isinstance(frame, Batch) else [] if frame is None else [frame]
    for item in items:
        assert isinstance(item, Call | Invalid)
        if isinstance(item, Invalid):
            assert isinstance(item.error, MsbdError)
            reply = msgspec.json.decode(encode_error(item.id, item.error))
            assert reply["error"]["code"] in (-32700, -32600, -32601, -32602)
        else:
            assert isinstance(item.id, str | int | float | None)
            assert not isinstance(item.id, bool)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_parse_frame_never_raises_on_bytes(data: bytes) -> None:
    check_answerable(parse_frame(data))


@settings(max_examples=300, deadline=None)
@given(json_values | requests | st.lists(requests | json_values, max_size=5))
def test_parse_frame_never_raises_on_json(value: Any) -> None:
    check_answerable(parse_frame(msgspec.json.encode(value), max_batch=3))
