"""Hostile input against a real daemon over its real socket (issue 5).

Nothing a client sends may crash the daemon, stall other clients, or grow its
memory without bound. Every test talks to a real `msbd serve` process.

Synchronisation is on facts: a reply line, EOF, POLLHUP on our end of the
socket, or a log line the daemon wrote (it runs with `--log-level debug`, so
every connection logs `connection N opened` / `connection N closed`).
Timeouts are hang guards only; the few lower bounds asserted ("not closed
before its timeout") cannot be flaky.
"""

from __future__ import annotations

import collections
import contextlib
import os
import re
import resource
import select
import selectors
import socket
import struct
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
from daemonproc import DaemonProc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from msbd.errors import RemoteError

GUARD = 30.0  # hang guard for any one wait
MAX_FRAME = 1024 * 1024
MAX_BATCH = 20  # the shared daemon's max_batch: over-limit batches stay small
PING = b'{"jsonrpc":"2.0","method":"daemon.ping","id":"after"}'
PONG_AFTER = {"jsonrpc": "2.0", "result": "pong", "id": "after"}
ALLOWED_CODES = {-32700, -32600, -32601, -32602, -32001, -32003}  # never -32603


# --- a raw client ---------------------------------------------------------------------


class Raw:
    """A blocking raw connection: bytes out, decoded reply lines in."""

    def __init__(self, path: Path, *, timeout: float = GUARD) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(str(path))
        self.buf = b""

    def __enter__(self) -> Raw:
        return self

    def __exit__(self, *exc: object) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def raw_line(self) -> bytes | None:
        """The next line without its newline; None at EOF or reset."""
        while b"\n" not in self.buf:
            try:
                chunk = self.sock.recv(1 << 20)
            except ConnectionResetError:
                chunk = b""
            if not chunk:
                return None
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        return line

    def line(self) -> Any:
        line = self.raw_line()
        return None if line is None else msgspec.json.decode(line)

    def call(self, method: str, params: Any = None, rid: Any = 1) -> Any:
        body: dict[str, Any] = {"jsonrpc": "2.0", "method": method, "id": rid}
        if params is not None:
            body["params"] = params
        self.send(msgspec.json.encode(body) + b"\n")
        return self.line()

    def finish(self) -> list[Any]:
        """Shut down our writing side and read every reply until the daemon closes."""
        self.sock.shutdown(socket.SHUT_WR)
        lines = []
        while (line := self.line()) is not None:
            lines.append(line)
        return lines

    def wait_closed(self, timeout: float = GUARD) -> float:
        """Block until the daemon closed its end (POLLRDHUP/POLLHUP); seconds waited."""
        poller = select.poll()
        poller.register(self.sock.fileno(), select.POLLRDHUP)
        t0 = time.monotonic()
        events = poller.poll(timeout * 1000)
        assert events, f"the daemon did not close the connection within {timeout}s"
        return time.monotonic() - t0


def pong(rid: Any) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "result": "pong", "id": rid}


def code(reply: Any) -> int:
    return int(reply["error"]["code"])


# --- facts about the daemon process -------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def open_fds(pid: int) -> list[int]:
    return sorted(int(fd) for fd in os.listdir(f"/proc/{pid}/fd"))


_OPENED = re.compile(r"msbd\.rpc: connection (\d+) opened")
_CLOSED = re.compile(r"msbd\.rpc: connection (\d+) closed")


def live_connections(d: DaemonProc) -> set[int]:
    """Connections the daemon has opened and not yet closed, from its debug log."""
    text = d.stderr()
    return set(map(int, _OPENED.findall(text))) - set(map(int, _CLOSED.findall(text)))


def wait_until(fact: Callable[[], bool], what: str, timeout: float = GUARD) -> None:
    """Wait for a fact the daemon publishes in its log (checked every 10 ms)."""
    deadline = time.monotonic() + timeout
    while not fact():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def log_count(d: DaemonProc, text: str) -> int:
    return d.stderr().count(text)


@contextlib.contextmanager
def nofile_limit(n: int) -> Iterator[None]:
    """This test process's own soft RLIMIT_NOFILE at least `n` (up to the hard limit)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(max(soft, n), hard)
    if want < n:
        pytest.skip(f"needs {n} file descriptors; the hard limit is {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@pytest.fixture(scope="module")
def shared() -> Iterator[DaemonProc]:
    """One daemon for the read-only tests of this module (small max_batch)."""
    base = Path(tempfile.mkdtemp(prefix="msbd-h-", dir="/tmp"))
    d = DaemonProc(base, settings={"max_batch": MAX_BATCH}).start()
    try:
        yield d
    finally:
        d.stop()
        with contextlib.suppress(OSError):
            for p in sorted(base.rglob("*"), reverse=True):
                p.rmdir() if p.is_dir() else p.unlink()
            base.rmdir()


# --- 1. timeouts ----------------------------------------------------------------------------


def test_half_frame_is_closed_after_the_frame_timeout_others_are_served(
        make_daemon: Callable[..., DaemonProc]) -> None:
    d = make_daemon(settings={"partial_frame_timeout": 0.5})
    with Raw(d.socket) as stalled, Raw(d.socket) as other:
        t0 = time.monotonic()
        stalled.send(b'{"jsonrpc": "2.0", "method": "daemon.pi')
        for i in range(50):  # served while the other one stalls
            assert other.call("daemon.ping", rid=i) == pong(i)
        stalled.wait_closed()
        assert time.monotonic() - t0 >= 0.5  # not before its timeout
        assert stalled.line() is None  # closed without running half a request
        assert other.call("daemon.ping", rid="still") == pong("still")
    assert "client left a frame unfinished, closing" in d.stderr()


def test_idle_connection_is_closed_after_the_idle_timeout(
        make_daemon: Callable[..., DaemonProc]) -> None:
    d = make_daemon(settings={"connection_idle_timeout": 0.5})
    with Raw(d.socket) as idle:
        assert idle.call("daemon.ping") == pong(1)
        t0 = time.monotonic()
        idle.wait_closed()
        assert time.monotonic() - t0 >= 0.5 - 0.05  # counted from its last activity
        assert idle.line() is None  # no unsolicited error line
    assert d.call("daemon.ping") == "pong"


def test_client_that_never_reads_is_closed_after_the_send_timeout(
        make_daemon: Callable[..., DaemonProc]) -> None:
    d = make_daemon(settings={"connection_send_timeout": 1.0})
    with Raw(d.socket) as other:
        deaf = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        deaf.connect(str(d.socket))
        deaf.setblocking(False)
        frame = b'{"jsonrpc":"2.0","method":"rpc.discover","id":1}\n'  # a large reply
        with contextlib.suppress(BlockingIOError):
            while True:  # until the daemon stops reading it: it never reads its replies
                deaf.send(frame)
        t0 = time.monotonic()
        for i in range(20):
            assert other.call("daemon.ping", rid=i) == pong(i)
        poller = select.poll()
        poller.register(deaf.fileno(), select.POLLRDHUP)
        assert poller.poll(GUARD * 1000), "a client that never reads was never closed"
        assert time.monotonic() - t0 >= 0.9
        deaf.close()
        assert other.call("daemon.ping", rid="after") == pong("after")
    assert "client does not read, closing" in d.stderr()


def test_client_that_pipelines_without_reading_is_not_buffered(daemon: DaemonProc) -> None:
    """The daemon stops reading a client that does not read its replies: what it
    sends waits in the socket buffers, not in the daemon's memory."""
    pid = daemon.proc.pid if daemon.proc else 0
    rss0 = rss_bytes(pid)
    chunk = b'{"jsonrpc":"2.0","method":"daemon.ping","id":1}\n' * 2000
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as deaf, Raw(daemon.socket) as other:
        deaf.connect(str(daemon.socket))
        deaf.setblocking(False)
        sent = 0
        while sent < 64 * 2**20:
            try:
                sent += deaf.send(chunk)
            except BlockingIOError:
                # A measurement window: a daemon that still reads makes room within it.
                if not select.select([], [deaf], [], 1.0)[1]:
                    break
        assert sent < 8 * 2**20, f"the daemon took {sent / 2**20:.0f} MiB from a deaf client"
        assert other.call("daemon.ping", rid="other") == pong("other")
    grown = rss_bytes(pid) - rss0
    assert grown < 32 * 2**20, f"daemon RSS grew by {grown / 2**20:.1f} MiB"
    assert daemon.call("daemon.ping") == "pong"


# --- 2. the connection cap ------------------------------------------------------------------


def test_connections_past_the_cap_are_answered_and_closed(
        make_daemon: Callable[..., DaemonProc]) -> None:
    d = make_daemon(settings={"max_connections": 4})
    held = [Raw(d.socket) for _ in range(4)]
    try:
        for i, c in enumerate(held):
            assert c.call("daemon.ping", rid=i) == pong(i)
        for _ in range(30):  # a burst of refused clients: one line each, then closed
            with Raw(d.socket) as extra:
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                    extra.send(PING + b"\n")  # it may be refused before this arrives
                refused = extra.line()
                assert refused == {"jsonrpc": "2.0", "id": None, "error": {
                    "code": -32004, "message": "too many connections",
                    "data": {"limit": "max_connections", "max": 4}}}
                assert extra.line() is None
        for i, c in enumerate(held):  # the admitted ones are served throughout
            assert c.call("daemon.ping", rid=f"again-{i}") == pong(f"again-{i}")
        assert held[0].finish() == []  # EOF from the daemon: its slot is free now
        held[0].sock.close()
        with Raw(d.socket) as late:
            assert late.call("daemon.ping", rid="late") == pong("late")
    finally:
        for c in held:
            c.sock.close()
    log = d.stderr()
    assert log.count("refusing connections") == 1, "one warning per episode, not per client"
    assert "accepting connections again: 30 refused while at the limit of 4" in log


# --- 3. EMFILE on accept ---------------------------------------------------------------------


def test_out_of_descriptors_backs_off_and_recovers(daemon: DaemonProc) -> None:
    pid = daemon.proc.pid if daemon.proc else 0
    assert daemon.call("daemon.ping") == "pong"  # warm: nothing left to open lazily
    wait_until(lambda: not live_connections(daemon), "the warm-up connection to close")
    fds = open_fds(pid)
    free = 5
    limit = len(fds) + free
    assert fds[-1] < limit, "a descriptor above the new limit: the count would be off"
    before = resource.prlimit(pid, resource.RLIMIT_NOFILE)
    resource.prlimit(pid, resource.RLIMIT_NOFILE, (limit, before[1]))
    hogs: list[Raw] = []
    waiting: list[Raw] = []
    try:
        for i in range(free):  # every free descriptor now holds a connection
            hogs.append(Raw(daemon.socket))
            assert hogs[-1].call("daemon.ping", rid=i) == pong(i)
        cpu0 = cpu_seconds(pid)
        for i in range(3):  # accept fails with EMFILE: these wait in the backlog
            waiting.append(Raw(daemon.socket))
            waiting[-1].send(b'{"jsonrpc":"2.0","method":"daemon.ping","id":"w%d"}\n' % i)
        wait_until(lambda: "cannot accept connections: Too many open files" in daemon.stderr(),
                   "the EMFILE warning")
        for i in range(100):  # open connections are served meanwhile
            assert hogs[i % free].call("daemon.ping", rid=i) == pong(i)
        waiting[0].sock.settimeout(1.0)  # a measurement window, not a synchroniser
        with pytest.raises(TimeoutError):
            waiting[0].sock.recv(1)  # not served and not dropped: still waiting
        spent = cpu_seconds(pid) - cpu0
        assert spent < 0.5, f"the daemon used {spent:.2f} s of CPU while starved: a busy loop"
        for c in hogs:
            c.sock.close()
        for i, c in enumerate(waiting):  # recovery: the waiting clients are served
            c.sock.settimeout(GUARD)
            assert c.line() == pong(f"w{i}")
    finally:
        resource.prlimit(pid, resource.RLIMIT_NOFILE, before)
        for c in hogs + waiting:
            c.sock.close()
    assert daemon.call("daemon.ping") == "pong"
    log = daemon.stderr()
    assert log.count("cannot accept connections") == 1, "one warning per episode"
    assert log.count("accepting connections again after") == 1
    assert daemon.proc is not None and daemon.proc.poll() is None


# --- 4. hostile frames, one by one --------------------------------------------------------------

ENV = b'"jsonrpc":"2.0",'


def req(body: bytes) -> bytes:
    return b"{" + ENV + body + b"}"


def err(rid: Any, c: int, data: Any = ...) -> Callable[[Any], bool]:
    def check(reply: Any) -> bool:
        ok = reply.get("id", "missing") == rid and "result" not in reply and code(reply) == c
        return ok and (data is ... or reply["error"].get("data") == data)
    check.__name__ = f"error {c} id {rid!r}"
    return check


def res(rid: Any, result: Any = "pong") -> Callable[[Any], bool]:
    def check(reply: Any) -> bool:
        return reply == {"jsonrpc": "2.0", "result": result, "id": rid}
    check.__name__ = f"result {result!r} id {rid!r}"
    return check


def batch(*checks: Callable[[Any], bool]) -> Callable[[Any], bool]:
    def check(reply: Any) -> bool:
        if not isinstance(reply, list) or len(reply) != len(checks):
            return False
        left = list(reply)  # batch replies may come in any order
        for c in checks:
            match = next((r for r in left if c(r)), None)
            if match is None:
                return False
            left.remove(match)
        return True
    return check


BIG = b"1" + b"0" * 4000  # 4001 digits: a valid id, echoed exactly
HUGE = b"1" + b"0" * 5000  # 5001 digits: out of range

HOSTILE: list[Any] = [
    # nesting
    pytest.param(b"[" * 100_000, [err(None, -32700)], id="100k-open-brackets"),
    pytest.param(b'{"a":' * 100_000, [err(None, -32700)], id="100k-open-objects"),
    pytest.param(b"[" * 50_000 + b"]" * 50_000, [err(None, -32700)], id="50k-deep-closed"),
    pytest.param(req(b'"method":"daemon.ping","params":{"a":' + b"[" * 100_000 + b"]" * 100_000
                     + b'},"id":1'), [err(None, -32700)], id="deep-in-params"),
    # huge numbers
    pytest.param(req(b'"method":"daemon.ping","id":1e400'), [err(None, -32600, {"field": "id"})],
                 id="id-1e400"),
    pytest.param(req(b'"method":"daemon.ping","id":-1e400'), [err(None, -32600)], id="id--1e400"),
    pytest.param(req(b'"method":"daemon.ping","id":' + HUGE), [err(None, -32600)],
                 id="id-5001-digits"),
    pytest.param(req(b'"method":"daemon.ping","id":' + BIG), [res(int(BIG))], id="id-4001-digits"),
    pytest.param(req(b'"method":"daemon.ping","id":1e-400'), [res(0.0)], id="id-1e-400"),
    pytest.param(req(b'"method":"sandbox.logs","params":{"name":"a","tail":' + HUGE + b'},"id":1'),
                 [err(1, -32602, {"field": "tail"})], id="param-5001-digits"),
    pytest.param(req(b'"method":"sandbox.logs","params":{"name":"a","wait":1e400},"id":1'),
                 [err(1, -32602, {"field": "wait"})], id="param-1e400"),
    pytest.param(req(b'"method":"daemon.ping","pad":1e400,"id":1'), [res(1)],
                 id="ignored-member-1e400"),
    pytest.param(b"1e400", [err(None, -32600)], id="bare-1e400"),
    # invalid UTF-8
    pytest.param(req(b'"method":"daemon.ping","id":"\xff\xfe"'), [err(None, -32700)],
                 id="utf8-in-id"),
    pytest.param(req(b'"method":"sandbox.get","params":{"name":"\xc3"},"id":1'),
                 [err(None, -32700)], id="utf8-in-params"),
    pytest.param(req(b'"method":"daemon.ping","pad":"\xed\xa0\x80","id":1'), [err(None, -32700)],
                 id="utf8-encoded-surrogate-in-ignored-member"),
    pytest.param(b"\xff" + req(b'"method":"daemon.ping","id":1'), [err(None, -32700)],
                 id="utf8-raw"),
    pytest.param(b"\xef\xbb\xbf" + req(b'"method":"daemon.ping","id":1'), [err(None, -32700)],
                 id="bom"),
    # NUL
    pytest.param(req(b'"method":"daemon.\x00ping","id":1'), [err(None, -32700)],
                 id="nul-raw-in-str"),
    pytest.param(req(b'"method":"daemon.ping",\x00"id":1'), [err(None, -32700)], id="nul-raw"),
    pytest.param(b"\x00", [err(None, -32700)], id="nul-only"),
    pytest.param(req(b'"method":"daemon.\\u0000ping","id":1'),
                 [err(1, -32601, {"method": "daemon.\x00ping"})], id="nul-escaped-in-method"),
    pytest.param(req(b'"method":"sandbox.get","params":{"name":"a\\u0000"},"id":1'),
                 [err(1, -32602, {"field": "name"})], id="nul-escaped-in-name"),
    # surrogates
    pytest.param(req(b'"method":"daemon.ping","id":"\\ud800"'), [err(None, -32700)],
                 id="lone-surrogate-id"),
    pytest.param(req(b'"method":"\\udfff","id":1'), [err(None, -32700)],
                 id="lone-low-surrogate-method"),
    pytest.param(req(b'"method":"sandbox.get","params":{"name":"\\ud800x"},"id":1'),
                 [err(None, -32700)], id="lone-surrogate-params"),
    pytest.param(req(b'"method":"daemon.ping","id":"\\ud83d\\ude00"'), [res("\U0001f600")],
                 id="surrogate-pair-id"),
    # not a request object
    pytest.param(b'"daemon.ping"', [err(None, -32600)], id="bare-string"),
    pytest.param(b"42", [err(None, -32600)], id="bare-number"),
    pytest.param(b"null", [err(None, -32600)], id="bare-null"),
    pytest.param(b"true", [err(None, -32600)], id="bare-true"),
    pytest.param(req(b'"method":"daemon.ping","id":{"a":1}'), [err(None, -32600)], id="id-object"),
    pytest.param(req(b'"method":"daemon.ping","id":true'), [err(None, -32600)], id="id-bool"),
    pytest.param(req(b'"method":"daemon.ping","params":"x","id":7'), [err(7, -32600)],
                 id="params-string"),
    pytest.param(b'{"jsonrpc":"1.0","method":"daemon.ping","id":3}', [err(3, -32600)],
                 id="jsonrpc-1.0"),
    pytest.param(req(b'"method":"daemon.ping","id":1} x'), [err(None, -32700)],
                 id="trailing-garbage"),
    pytest.param(req(b'"method":"daemon.ping","id":1') + req(b'"method":"daemon.ping","id":2'),
                 [err(None, -32700)], id="two-objects-one-line"),
    # duplicate keys: the last wins
    pytest.param(req(b'"method":"nope","method":"daemon.ping","id":1,"id":2'), [res(2)],
                 id="duplicate-keys"),
    pytest.param(req(b'"method":"sandbox.get","params":{"name":"a","name":"b"},"id":1'),
                 [err(1, -32001, {"sandbox": "b"})], id="duplicate-keys-in-params"),
    # batches
    pytest.param(b"[]", [err(None, -32600)], id="empty-batch"),
    pytest.param(b"[[]]", [batch(err(None, -32600))], id="batch-of-array"),
    pytest.param(b"[" + b",".join([req(b'"method":"daemon.ping","id":%d' % i)
                                   for i in range(MAX_BATCH)]) + b"]",
                 [batch(*(res(i) for i in range(MAX_BATCH)))], id="batch-at-limit"),
    pytest.param(b"[" + b",".join([req(b'"method":"daemon.ping","id":%d' % i)
                                   for i in range(MAX_BATCH + 1)]) + b"]",
                 [err(None, -32600, {"limit": MAX_BATCH})], id="batch-over-limit"),
    pytest.param(b"[" + b",".join([b"1"] * 300_000) + b"]",
                 [err(None, -32600, {"limit": MAX_BATCH})], id="batch-300k-entries"),
    pytest.param(b"[" + req(b'"method":"daemon.ping"') + b"," + req(b'"method":"nope"') + b"]",
                 [], id="batch-of-notifications"),
    pytest.param(b"[" + req(b'"method":"daemon.ping","id":1e400') + b",1," + req(
        b'"method":"daemon.ping","id":"x"') + b"]",
                 [batch(err(None, -32600), err(None, -32600), res("x"))], id="batch-mixed"),
    # framing
    pytest.param(req(b'"method":"daemon.ping","id":1') + b"\r\n" + req(
        b'"method":"daemon.ping","id":2') + b"\r", [res(1), res(2)], id="crlf"),
    pytest.param(b"\n\n  \n\t\r\n\r", [], id="empty-lines"),
    pytest.param(req(b'"method":"daemon.ping","pad":"' + b"x" * (MAX_FRAME - 60) + b'","id":1'),
                 [res(1)], id="frame-at-the-limit"),
]


def _exact(frame: bytes, size: int) -> bytes:
    """`frame` (with a `"pad":"xxx"` member) padded or trimmed to exactly `size` bytes."""
    head, sep, tail = frame.partition(b'"pad":"')
    pad = tail.partition(b'"')[0]
    rest = tail[len(pad):]
    fill = size - len(head) - len(sep) - len(rest)
    out = head + sep + b"x" * fill + rest
    assert len(out) == size
    return out


@pytest.mark.parametrize(("frame", "expect"), HOSTILE)
def test_hostile_frame_is_answered_and_the_connection_stays_usable(
        shared: DaemonProc, frame: bytes, expect: list[Callable[[Any], bool]]) -> None:
    if b'"pad":"xxx' in frame:
        frame = _exact(frame, MAX_FRAME)
    with Raw(shared.socket) as c:
        c.send(frame + b"\n" + PING + b"\n")
        replies = c.finish()
    assert PONG_AFTER in replies, "the connection stopped serving after the hostile frame"
    replies.remove(PONG_AFTER)
    assert len(replies) == len(expect), replies
    for check in expect:  # replies to separate frames may come in any order
        assert any(check(r) for r in replies), (check.__name__, replies)
    assert shared.call("daemon.ping") == "pong"


def test_frame_just_over_the_limit_is_refused_and_closed(shared: DaemonProc) -> None:
    frame = _exact(req(b'"method":"daemon.ping","pad":"xxx","id":1'), MAX_FRAME + 1)
    with Raw(shared.socket) as c, Raw(shared.socket) as other:
        c.send(frame + b"\n" + PING + b"\n")
        got = c.line()
        assert (got["id"], code(got)) == (None, -32600)
        assert got["error"]["data"] == {"limit": MAX_FRAME}
        assert c.line() is None  # closed: the ping after it is not run
        assert other.call("daemon.ping") == pong(1)


def test_frame_over_the_limit_without_a_newline_is_refused_early(shared: DaemonProc) -> None:
    with Raw(shared.socket) as c:
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            c.send(b'{"x":"' + b"y" * (MAX_FRAME + 10))  # never ends: refused when too long
        got = c.line()
        assert (got["id"], code(got)) == (None, -32600)
        assert c.line() is None


def test_many_frames_in_one_write(shared: DaemonProc) -> None:
    with Raw(shared.socket) as c:
        c.send(b"".join(req(b'"method":"daemon.ping","id":%d' % i) + b"\n" for i in range(2000)))
        replies = c.finish()
    assert sorted(r["id"] for r in replies) == list(range(2000))
    assert all(r["result"] == "pong" for r in replies)


def test_frames_in_one_byte_writes(shared: DaemonProc) -> None:
    data = (req(b'"method":"daemon.ping","id":1') + b"\r\n"
            + b"[" + req(b'"method":"daemon.ping","id":2') + b"]\n" + b"{bad\n")
    with Raw(shared.socket) as c:
        for i in range(len(data)):
            c.send(data[i:i + 1])
        replies = c.finish()
    assert len(replies) == 3
    assert pong(1) in replies and [pong(2)] in replies
    assert any(isinstance(r, dict) and r.get("error", {}).get("code") == -32700 for r in replies)


# --- 5. generated frames ------------------------------------------------------------------------

NAMES = st.builds(lambda head, tail: head + tail, st.sampled_from("aZ09"),
                  st.text("ab_.-9", max_size=8))
JSONISH = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner,
                                                                 max_size=3),
    max_leaves=5)
PARAMS = st.one_of(
    st.none(), st.just({}), st.just([]),
    st.builds(lambda n: {"name": n}, NAMES),
    st.sampled_from([{"state": "running"}, {"state": "stopped"}, {"label": "a=b"},
                     {"state": "nope"}, {"name": 1}, ["x"], {"tail": 1}]),
    st.dictionaries(st.text(max_size=4), JSONISH, max_size=2))
PARSE = {-32700}
INVALID = {-32600}
PARAMS_ERR = {-32602}
# value -> what it gets as the id, inside sandbox.get's params (id 1), and as the whole frame:
# (reply id, allowed codes or None for the result "pong")
HOSTILE_VALUES: dict[bytes, tuple[tuple[Any, set[int] | None], set[int], set[int]]] = {
    b"1e400": ((None, INVALID), PARAMS_ERR, INVALID),
    b"-1e400": ((None, INVALID), PARAMS_ERR, INVALID),
    HUGE: ((None, INVALID), PARAMS_ERR, INVALID),
    BIG: ((10**4000, None), PARAMS_ERR, INVALID),
    b'"\\u0000"': (("\x00", None), PARAMS_ERR, INVALID),
    b'"\\ud83d\\ude00"': (("\U0001f600", None), PARAMS_ERR, INVALID),
    b'"\\ud800"': ((None, PARSE), PARSE, PARSE),
    b'"\xff"': ((None, PARSE), PARSE, PARSE),
    b"[" * 3000: ((None, PARSE), PARSE, PARSE),
    b'{"a":' * 3000: ((None, PARSE), PARSE, PARSE),
    b"NaN": ((None, PARSE), PARSE, PARSE),
    b"\x00": ((None, PARSE), PARSE, PARSE),
}
HOSTILE_VALUE = st.sampled_from(sorted(HOSTILE_VALUES))


class Expect(msgspec.Struct):
    """What one frame must get back: nothing, one reply, or one batch array."""

    kind: str  # "none" | "one" | "batch"
    ids: list[Any] = []  # the reply ids ("one": exactly one)
    codes: list[set[int] | None] = []  # per id: allowed error codes; None: a result
    pong: list[bool] = []  # per id: the result must be "pong"


@st.composite
def requests(draw: st.DrawFn, seq: Iterator[int]
             ) -> tuple[bytes, tuple[Any, set[int] | None, bool] | None]:
    """One request (or junk entry): its bytes, and (reply id, codes, pong) or None."""
    kind = draw(st.sampled_from(["call", "call", "call", "notification", "bad-request",
                                 "hostile-id", "hostile-param"]))
    method = draw(st.sampled_from(["daemon.ping", "sandbox.get", "sandbox.list", "nope"]))
    params = draw(PARAMS)
    n = next(seq)
    rid: Any = draw(st.sampled_from([n, f"s{n}-" + draw(st.text(max_size=6)), n + 0.5,
                                     -n, n * 10**30]))
    body: dict[str, Any] = {"jsonrpc": "2.0", "method": method}
    if params is not None:
        body["params"] = params
    if kind == "notification":
        return msgspec.json.encode(body), None
    if kind == "bad-request":
        bad = draw(st.sampled_from([{"jsonrpc": "1.0"}, {"method": 5}, {"params": "x"},
                                    {"jsonrpc": None}]))
        return msgspec.json.encode(body | bad | {"id": rid}), (rid, {-32600}, False)
    if kind == "hostile-id":
        value = draw(st.sampled_from([b"1e400", HUGE, b"true", b"{}", b"[1]"]))
        return (msgspec.json.encode(body)[:-1] + b',"id":' + value + b"}",
                (None, {-32600}, False))
    body["id"] = rid
    if kind == "hostile-param":
        value = draw(st.sampled_from([b"1e400", HUGE, b'"\\u0000"', b"[[[[[[]]]]]]"]))
        frame = msgspec.json.encode(body | {"params": {"name": "x"}})
        frame = frame.replace(b'"x"', value, 1)
        allowed = {-32601} if method == "nope" else {-32602}
        return frame, (rid, allowed, False)
    if method == "nope":
        return msgspec.json.encode(body), (rid, {-32601}, False)
    plain_ping = method == "daemon.ping" and params in (None, {}, [])
    return msgspec.json.encode(body), (rid, None if plain_ping else ALLOWED_CODES | {0}, plain_ping)


@st.composite
def frames(draw: st.DrawFn, seq: Iterator[int]) -> tuple[bytes, Expect]:
    """One line a client could send, and what it must get back."""
    kind = draw(st.sampled_from(["request", "request", "request", "batch", "malformed",
                                 "hostile", "bare", "blank"]))
    if kind == "request":
        frame, want = draw(requests(seq))
        if want is None:
            return frame, Expect("none")
        return frame, Expect("one", [want[0]], [want[1]], [want[2]])
    if kind == "batch":
        entries = draw(st.lists(requests(seq) | st.sampled_from(
            [(b"1", (None, {-32600}, False)), (b"[]", (None, {-32600}, False)),
             (b'"x"', (None, {-32600}, False))]), max_size=MAX_BATCH + 3))
        frame = b"[" + b",".join(e for e, _ in entries) + b"]"
        if not entries or len(entries) > MAX_BATCH:
            return frame, Expect("one", [None], [{-32600}], [False])
        wants = [w for _, w in entries if w is not None]
        if not wants:
            return frame, Expect("none")
        return frame, Expect("batch", [w[0] for w in wants], [w[1] for w in wants],
                             [w[2] for w in wants])
    if kind == "malformed":
        good = msgspec.json.encode({"jsonrpc": "2.0", "method": "daemon.ping", "id": 1})
        cut = draw(st.integers(1, len(good) - 1))
        junk = draw(st.sampled_from([good[:cut], good + b"x", good[:cut] + b"\xff" + good[cut:],
                                     b"x" + draw(st.binary(max_size=40)).replace(b"\n", b"")]))
        return junk, Expect("one", [None], [{-32700}], [False])
    if kind == "hostile":
        value = draw(HOSTILE_VALUE)
        (rid, codes), in_params, bare = HOSTILE_VALUES[value]
        where = draw(st.sampled_from(["id", "params", "bare"]))
        if where == "bare":
            return value, Expect("one", [None], [bare], [False])
        if where == "id":
            frame = b'{"jsonrpc":"2.0","method":"daemon.ping","id":' + value + b"}"
            return frame, Expect("one", [rid], [codes], [codes is None])
        frame = b'{"jsonrpc":"2.0","method":"sandbox.get","id":1,"params":{"name":' \
            + value + b"}}"
        return frame, Expect("one", [None if in_params is PARSE else 1], [in_params], [False])
    if kind == "bare":
        value = draw(JSONISH.filter(lambda v: not isinstance(v, list | dict)))
        return msgspec.json.encode(value), Expect("one", [None], [{-32600}], [False])
    return draw(st.sampled_from([b"", b" ", b"\t\r"])), Expect("none")


def _key(rid: Any) -> Any:
    return (type(rid).__name__, rid)


def _fits(reply: Any, rid: Any, codes: set[int] | None, must_pong: bool) -> bool:
    """Whether `reply` is a well-formed answer with id `rid` and an allowed outcome."""
    if not isinstance(reply, dict) or reply.get("jsonrpc") != "2.0" or "id" not in reply:
        return False
    if _key(reply["id"]) != _key(rid) or ("result" in reply) == ("error" in reply):
        return False
    if "error" in reply:
        error = reply["error"]
        return (codes is not None and error.get("code") in codes
                and isinstance(error.get("message"), str)
                and set(error) <= {"code", "message", "data"})
    return (codes is None or 0 in codes) and (not must_pong or reply["result"] == "pong")


def _matches(left: list[Any], right: list[Any], fits: Callable[[Any, Any], bool]) -> bool:
    """A perfect matching between `left` and `right` under `fits` (Kuhn's algorithm)."""
    if len(left) != len(right):
        return False
    edges = [[j for j, r in enumerate(right) if fits(item, r)] for item in left]
    owner: list[int] = [-1] * len(right)

    def augment(i: int, seen: set[int]) -> bool:
        for j in edges[i]:
            if j not in seen:
                seen.add(j)
                if owner[j] < 0 or augment(owner[j], seen):
                    owner[j] = i
                    return True
        return False

    return all(augment(i, set()) for i in range(len(left)))


def _fits_expect(reply: Any, e: Expect) -> bool:
    if e.kind == "one":
        return any(_fits(reply, *opt) for opt in zip(e.ids, e.codes, e.pong, strict=True))
    return isinstance(reply, list) and _matches(
        reply, list(zip(e.ids, e.codes, e.pong, strict=True)),
        lambda r, opt: _fits(r, *opt))


def _verify(sent: list[Expect], replies: list[Any]) -> None:
    """Every frame that expects a reply got exactly one that fits; nothing else came."""
    wanted = [e for e in sent if e.kind != "none"]
    assert _matches(replies, wanted, _fits_expect), (replies, wanted)


def _exchange(path: Path, payloads: list[bytes]) -> list[list[Any]]:
    """Send each payload on its own connection while reading; then EOF; all replies."""
    sel = selectors.DefaultSelector()
    state = []
    for p in payloads:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(str(path))
        s.setblocking(False)
        st_ = {"sock": s, "out": memoryview(p), "in": bytearray(), "eof": False}
        state.append(st_)
        sel.register(s, selectors.EVENT_READ | selectors.EVENT_WRITE, st_)
    deadline = time.monotonic() + GUARD
    open_ = len(state)
    while open_:
        assert time.monotonic() < deadline, "the daemon stopped answering"
        for key, events in sel.select(1.0):
            c = key.data
            if events & selectors.EVENT_WRITE and c["out"]:
                with contextlib.suppress(BlockingIOError):
                    c["out"] = c["out"][c["sock"].send(c["out"][:65536]):]
                if not c["out"]:
                    c["sock"].shutdown(socket.SHUT_WR)
                    sel.modify(c["sock"], selectors.EVENT_READ, c)
            if events & selectors.EVENT_READ:
                data = c["sock"].recv(1 << 20)
                if data:
                    c["in"] += data
                else:
                    sel.unregister(c["sock"])
                    c["sock"].close()
                    open_ -= 1
    sel.close()
    return [[msgspec.json.decode(line) for line in bytes(c["in"]).splitlines()] for c in state]


def test_generated_frames_are_each_answered_exactly_once(shared: DaemonProc) -> None:
    pid = shared.proc.pid if shared.proc else 0
    assert shared.call("daemon.ping") == "pong"
    rss0 = rss_bytes(pid)
    totals = collections.Counter[str]()

    @settings(max_examples=100, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(st.data())
    def check(data: st.DataObject) -> None:
        seq = iter(range(1, 10**9))
        conns: list[list[tuple[bytes, Expect]]] = [
            data.draw(st.lists(frames(seq), min_size=8, max_size=20)) for _ in range(3)]
        replies = _exchange(shared.socket, [b"".join(f + b"\n" for f, _ in c) for c in conns])
        for sent, got in zip(conns, replies, strict=True):
            _verify([e for _, e in sent], got)
            totals["frames"] += len(sent)
        totals["examples"] += 1

    check()
    assert totals["frames"] > 2500
    assert shared.call("daemon.ping") == "pong"
    grown = rss_bytes(pid) - rss0
    assert grown < 50 * 1024 * 1024, f"daemon RSS grew by {grown / 2**20:.1f} MiB"
    assert "Traceback" not in shared.stderr()


# --- 6. a thousand clients at once -----------------------------------------------------------


def test_1000_concurrent_connections_are_served(daemon: DaemonProc) -> None:
    with nofile_limit(1200):
        conns = []
        try:
            for _ in range(1000):
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                s.settimeout(GUARD)
                s.connect(str(daemon.socket))
                conns.append(s)
            for i, s in enumerate(conns):
                s.sendall(b'{"jsonrpc":"2.0","method":"daemon.ping","id":%d}\n' % i)
            for i, s in enumerate(conns):
                buf = b""
                while not buf.endswith(b"\n"):
                    chunk = s.recv(4096)
                    assert chunk, f"connection {i} closed without its reply"
                    buf += chunk
                assert msgspec.json.decode(buf) == pong(i)
        finally:
            for s in conns:
                s.close()
    assert daemon.call("daemon.ping") == "pong"


# --- 7. clients vanishing mid-call -----------------------------------------------------------


def _linger0(sock: socket.socket) -> None:
    # On AF_UNIX there is no RST: closing with unread data makes the peer see ECONNRESET.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


def test_vanishing_creators_leave_whole_records_or_none(daemon: DaemonProc,
                                                        tmp_path: Path) -> None:
    rootfs = tmp_path / "root"
    rootfs.mkdir()

    def spec(name: str) -> dict[str, Any]:
        return {"name": name, "rootfs": str(rootfs), "exec": "/bin/sh", "args": ["-c", name],
                "env": {"N": name}, "labels": {"who": name}, "memory_mib": 64}

    baseline = live_connections(daemon)
    names = []
    for i in range(20):  # one create each, closed right after sending
        name = f"single-{i}"
        names.append(name)
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(str(daemon.socket))
        s.sendall(msgspec.json.encode({"jsonrpc": "2.0", "method": "sandbox.create",
                                       "params": spec(name), "id": i}) + b"\n")
        s.close()
    for b in range(5):  # batches of creates, then an abortive close
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(str(daemon.socket))
        entries = []
        for i in range(MAX_BATCH):
            name = f"batch-{b}-{i}"
            names.append(name)
            entries.append({"jsonrpc": "2.0", "method": "sandbox.create", "params": spec(name),
                            "id": i})
        s.sendall(msgspec.json.encode(entries) + b"\n")
        _linger0(s)
        s.close()
    wait_until(lambda: live_connections(daemon) <= baseline, "the vanished connections to close")
    with daemon.client() as c:
        listed = {info["name"]: info
                  for info in c.call("sandbox.list", {"spec": True})["sandboxes"]}
        assert set(listed) <= set(names)
        for name in names:
            if name in listed:  # exists completely ...
                info = c.call("sandbox.get", {"name": name})
                assert info == listed[name]
                assert info["state"] == "created" and info["labels"] == {"who": name}
                assert info["spec"]["args"] == ["-c", name]
                assert info["spec"]["env"] == {"N": name}
            else:  # ... or not at all
                with pytest.raises(RemoteError, match="no sandbox named"):
                    c.call("sandbox.get", {"name": name})
        # every record has its `created` event, and no event names a missing one
        seq = c.call("events.subscribe", {"since": 0})["seq"]
        created = set()
        for _, params in c.iter_notifications(timeout=GUARD) if seq else ():
            event = params["event"]
            if event["state"] == "created":
                created.add(event["sandbox"])
            if event["seq"] >= seq:
                break
        assert created == set(listed)
    assert daemon.call("daemon.ping") == "pong"


def test_vanishing_during_long_calls_leaks_nothing(kdaemon: DaemonProc,
                                                   busybox_root: Path) -> None:
    kdaemon.call("sandbox.run", {"name": "quiet", "rootfs": str(busybox_root), "exec": "/bin/sh",
                                 "args": ["-c", "exec sleep 600"], "memory_mib": 64})
    baseline = live_connections(kdaemon)
    calls = [
        {"method": "sandbox.wait", "params": {"name": "quiet"}},
        {"method": "sandbox.logs", "params": {"name": "quiet", "offset": 0, "wait": 300}},
        {"method": "events.subscribe", "params": {}},
    ]
    for abortive in (False, True):
        opened = []
        for i, call in enumerate(calls):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(GUARD)
            s.connect(str(kdaemon.socket))
            s.sendall(msgspec.json.encode({"jsonrpc": "2.0", "id": i} | call) + b"\n")
            opened.append(s)
        # The calls are running (the subscription answers at once; the others block).
        wait_until(lambda: len(live_connections(kdaemon) - baseline) == len(calls),
                   "the long calls' connections")
        for s in opened:
            if abortive:
                _linger0(s)
            s.close()
        wait_until(lambda: live_connections(kdaemon) <= baseline,
                   "the vanished connections to close")
    info = kdaemon.call("sandbox.get", {"name": "quiet"})
    assert info["state"] == "running"  # the sandbox did not notice
    end = kdaemon.call("sandbox.stop", {"name": "quiet", "timeout": 10})
    assert end["run"]["reason"] == "stop_requested"
    assert "Traceback" not in kdaemon.stderr()
