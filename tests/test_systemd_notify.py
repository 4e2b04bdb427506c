"""msbd.daemon.systemd: sd_notify, the watchdog, socket activation and journald, for real.

Pure functions get plain dicts; notifications go to a real AF_UNIX datagram
socket (a path and an abstract name); socket activation is done by systemd's
own `systemd-socket-activate`, which execs a small Python child.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import anyio
import pytest

from msbd.daemon import activation, systemd
from msbd.daemon.activation import ListenFd
from msbd.daemon.systemd import Notifier
from msbd.errors import MsbdError

REPO = Path(__file__).resolve().parent.parent
PID = os.getpid()
OTHER_PID = PID + 1

needs_socket_activate = pytest.mark.skipif(
    shutil.which("systemd-socket-activate") is None,
    reason="systemd-socket-activate is not installed (Debian package `systemd`)",
)


# ---------------------------------------------------------------- pure tables


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({}, None),
        ({"WATCHDOG_USEC": ""}, None),
        ({"WATCHDOG_USEC": "30000000"}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(PID)}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(OTHER_PID)}, None),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": ""}, 15.0),
        ({"WATCHDOG_USEC": "1000"}, 0.0005),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "-5"}, None),
        ({"WATCHDOG_USEC": "30s"}, None),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "me"}, None),
        ({"WATCHDOG_PID": str(PID)}, None),
    ],
)
def test_watchdog_interval(environ: dict[str, str], expected: float | None) -> None:
    assert systemd.watchdog_interval(environ, PID) == expected


@pytest.mark.parametrize(
    "environ",
    [
        {},
        {"LISTEN_FDS": "1"},
        {"LISTEN_PID": str(PID)},
        {"LISTEN_PID": str(OTHER_PID), "LISTEN_FDS": "1"},
        {"LISTEN_PID": str(OTHER_PID), "LISTEN_FDS": "2", "LISTEN_FDNAMES": "msbd.sock"},
        {"LISTEN_PID": str(PID), "LISTEN_FDS": "0"},
        {"LISTEN_PID": str(PID), "LISTEN_FDS": "0", "LISTEN_FDNAMES": ""},
    ],
)
def test_no_listen_fds_for_us(environ: dict[str, str]) -> None:
    # Nothing for this pid means the fds are never touched (fd 3 here is pytest's).
    assert activation.listen_fds(environ, PID) == []
    assert activation.take_listen_socket(environ, PID) is None


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({"LISTEN_PID": "self", "LISTEN_FDS": "1"}, "LISTEN_PID='self' is not a number"),
        ({"LISTEN_PID": str(PID), "LISTEN_FDS": "one"}, "LISTEN_FDS='one' is not a number"),
        ({"LISTEN_PID": str(PID), "LISTEN_FDS": "-1"}, "LISTEN_FDS=-1 is negative"),
        ({"LISTEN_PID": str(PID), "LISTEN_FDS": "2", "LISTEN_FDNAMES": "msbd.sock"},
         "LISTEN_FDNAMES has 1 names for 2 fds"),
        ({"LISTEN_PID": str(PID), "LISTEN_FDS": "1", "LISTEN_FDNAMES": "a:b"},
         "LISTEN_FDNAMES has 2 names for 1 fds"),
        ({"LISTEN_PID": str(PID), "LISTEN_FDS": "1", "LISTEN_FDNAMES": ""},
         "LISTEN_FDNAMES has 0 names for 1 fds"),
    ],
)
def test_malformed_listen_variables_are_errors(environ: dict[str, str], message: str) -> None:
    with pytest.raises(MsbdError, match=message):
        activation.listen_fds(environ, PID)


ALL_SYSTEMD = {
    "NOTIFY_SOCKET": "/run/systemd/notify",
    "LISTEN_PID": "1234",
    "LISTEN_FDS": "1",
    "LISTEN_FDNAMES": "msbd.sock",
    "WATCHDOG_USEC": "30000000",
    "WATCHDOG_PID": "1234",
    "JOURNAL_STREAM": "8:12345",
    "INVOCATION_ID": "0123456789abcdef0123456789abcdef",
    "SYSTEMD_EXEC_PID": "1234",
}


def test_unset_systemd_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    assert set(systemd.SYSTEMD_VARIABLES) == set(ALL_SYSTEMD)
    for key, value in ALL_SYSTEMD.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("MSBD_TEST_KEEP", "1")
    assert systemd.unset_systemd_environ() == ALL_SYSTEMD
    assert not set(ALL_SYSTEMD) & set(os.environ)
    assert os.environ["MSBD_TEST_KEEP"] == "1"
    # A child spawned now inherits none of them.
    dump = "import os, json; print(json.dumps(dict(os.environ)))"
    child = subprocess.run([sys.executable, "-c", dump], capture_output=True, text=True,
                           check=True)
    assert not set(ALL_SYSTEMD) & set(json.loads(child.stdout))
    assert systemd.unset_systemd_environ() == {}


@pytest.fixture
def stream_file() -> Iterator[int]:
    with tempfile.TemporaryFile() as f:
        yield f.fileno()


def _stream_id(fd: int) -> str:
    st = os.fstat(fd)
    return f"{st.st_dev}:{st.st_ino}"


def test_journald_is_collecting_when_stderr_is_the_stream(stream_file: int) -> None:
    environ = {"JOURNAL_STREAM": _stream_id(stream_file)}
    assert systemd.journald_is_collecting(environ, stderr_fd=stream_file)


def test_journald_is_collecting_looks_at_fd_2_by_default() -> None:
    assert systemd.journald_is_collecting({"JOURNAL_STREAM": _stream_id(2)})


def test_journald_is_not_collecting_from_another_stream(stream_file: int) -> None:
    r, w = os.pipe()
    try:
        environ = {"JOURNAL_STREAM": _stream_id(r)}
        assert not systemd.journald_is_collecting(environ, stderr_fd=stream_file)
    finally:
        os.close(r)
        os.close(w)


@pytest.mark.parametrize("value", ["", "8", "8:", ":12", "a:b", "8:12:13"])
def test_journald_stream_malformed(stream_file: int, value: str) -> None:
    assert not systemd.journald_is_collecting({"JOURNAL_STREAM": value}, stderr_fd=stream_file)


def test_journald_stream_on_a_closed_fd() -> None:
    r, w = os.pipe()
    stream = _stream_id(w)
    os.close(r)
    os.close(w)
    assert not systemd.journald_is_collecting({"JOURNAL_STREAM": stream}, stderr_fd=w)


# -------------------------------------------------------------------- notify


@pytest.fixture(params=["path", "abstract"])
def notify_socket(
    request: pytest.FixtureRequest, sock_dir: Path,
) -> Iterator[tuple[str, socket.socket]]:
    """(NOTIFY_SOCKET value, the bound receiving socket), as systemd would have it."""
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.settimeout(5)
    if request.param == "path":
        path = str(sock_dir / "notify")
        receiver.bind(path)
        value = path
    else:
        name = f"msbd-test-{uuid.uuid4().hex}"
        receiver.bind("\0" + name)
        value = "@" + name
    with receiver:
        yield value, receiver


def test_notifier_sends_each_message_as_one_datagram(
    notify_socket: tuple[str, socket.socket],
) -> None:
    value, receiver = notify_socket
    with Notifier.from_env({"NOTIFY_SOCKET": value}) as notifier:
        assert notifier.enabled
        assert notifier.ready("reconciled 3 runs")
        assert receiver.recv(4096) == b"READY=1\nSTATUS=reconciled 3 runs"
        assert notifier.status("12 sandboxes running")
        assert receiver.recv(4096) == b"STATUS=12 sandboxes running"
        assert notifier.watchdog()
        assert receiver.recv(4096) == b"WATCHDOG=1"
        assert notifier.stopping()
        assert receiver.recv(4096) == b"STOPPING=1"
        assert notifier.stopping("stopping 2 sandboxes")
        assert receiver.recv(4096) == b"STOPPING=1\nSTATUS=stopping 2 sandboxes"
        assert notifier.ready()
        assert receiver.recv(4096) == b"READY=1"
        assert notifier.notify_text("READY=1\nSTATUS=raw")
        assert receiver.recv(4096) == b"READY=1\nSTATUS=raw"


def test_notify_keeps_one_field_per_line(notify_socket: tuple[str, socket.socket]) -> None:
    value, receiver = notify_socket
    with Notifier.from_env({"NOTIFY_SOCKET": value}) as notifier:
        assert notifier.notify(status="line one\nREADY=1\r\nend", errno=5)
        assert receiver.recv(4096) == b"STATUS=line one READY=1  end\nERRNO=5"
        with pytest.raises(ValueError, match="not a notification field name"):
            notifier.notify(**{"STATUS=x\nREADY": "1"})


@pytest.mark.parametrize("environ", [{}, {"NOTIFY_SOCKET": ""}, {"NOTIFY_SOCKET": "relative/sock"},
                                     {"NOTIFY_SOCKET": "@"}, {"NOTIFY_SOCKET": "vsock:2:1234"}])
def test_notifier_outside_systemd_is_a_silent_no_op(environ: dict[str, str]) -> None:
    with Notifier.from_env(environ) as notifier:
        assert not notifier.enabled
        assert not notifier.ready("up")
        assert not notifier.watchdog()
        assert not notifier.stopping()


def test_notify_failure_is_logged_once_and_never_raised(
    sock_dir: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="msbd.daemon.systemd")
    with Notifier.from_env({"NOTIFY_SOCKET": str(sock_dir / "gone")}) as notifier:
        assert notifier.enabled
        assert not notifier.ready("up")
        assert not notifier.watchdog()
        assert not notifier.stopping()
    failures = [r for r in caplog.records if "cannot notify systemd" in r.getMessage()]
    assert len(failures) == 1
    assert failures[0].levelno == logging.DEBUG


def _open_fds() -> set[int]:
    """This process's open fds (less the one listdir itself used)."""
    fds = set()
    for name in os.listdir("/proc/self/fd"):
        try:
            os.fstat(int(name))
        except OSError:
            continue
        fds.add(int(name))
    return fds


def test_notifier_socket_is_close_on_exec(notify_socket: tuple[str, socket.socket]) -> None:
    value, _ = notify_socket
    before = _open_fds()
    with Notifier.from_env({"NOTIFY_SOCKET": value}):
        opened = _open_fds() - before
        assert len(opened) == 1, "the notifier should open exactly one socket"
        assert not os.get_inheritable(opened.pop())
    assert _open_fds() == before  # closed with the notifier


# ------------------------------------------------------------------ watchdog


def _recv_stamped(receiver: socket.socket, count: int, into: list[tuple[float, bytes]]) -> None:
    """Receive `count` datagrams, each stamped with its arrival time (in a thread)."""
    for _ in range(count):
        data = receiver.recv(4096)
        into.append((time.monotonic(), data))


async def test_serve_watchdog_pings_at_the_interval(
    notify_socket: tuple[str, socket.socket],
) -> None:
    value, receiver = notify_socket
    interval = 0.05
    pings: list[tuple[float, bytes]] = []
    with Notifier.from_env({"NOTIFY_SOCKET": value}) as notifier:
        async with anyio.create_task_group() as tg:
            start = time.monotonic()  # the loop's clock (anyio.current_time) is this one
            await tg.start(systemd.serve_watchdog, notifier, interval)
            with anyio.fail_after(10):
                await anyio.to_thread.run_sync(_recv_stamped, receiver, 7, pings)
            tg.cancel_scope.cancel()
    assert {data for _, data in pings} == {b"WATCHDOG=1"}
    times = [t for t, _ in pings]
    # Deadlines are absolute, start + k * interval: ping k is never early
    # (a datagram arrives after it is sent, so this bound is exact)...
    early = [k for k, t in enumerate(times) if t < start + k * interval]
    assert early == [], [round(t - start, 4) for t in times]
    # ...and a loaded machine may be late, but not by much.
    assert times[-1] - start <= 6 * interval + 2.0


async def test_serve_watchdog_stops_while_the_event_loop_is_stuck(
    notify_socket: tuple[str, socket.socket],
) -> None:
    value, receiver = notify_socket
    interval = 0.05
    pings: list[tuple[float, bytes]] = []
    with Notifier.from_env({"NOTIFY_SOCKET": value}) as notifier:
        async with anyio.create_task_group() as tg:
            await tg.start(systemd.serve_watchdog, notifier, interval)  # first ping sent
            collector = threading.Thread(target=_recv_stamped, args=(receiver, 4, pings))
            collector.start()
            # The stall itself, not a synchroniser: block the event loop for
            # five intervals, as a stuck daemon would. The collector thread
            # stamps anything that arrives meanwhile.
            time.sleep(5 * interval)  # a stuck loop on purpose; noqa: sleep-ok
            stall_end = time.monotonic()
            with anyio.fail_after(10):
                await anyio.to_thread.run_sync(collector.join)
            tg.cancel_scope.cancel()
    assert len(pings) == 4
    after = [t - stall_end for t, _ in pings[1:]]
    # Nothing was sent while the loop was stuck; on recovery one ping goes out
    # at once and the cadence restarts from there: the missed pings are not
    # sent in a burst (arrival never precedes sending, so these bounds are exact).
    assert after[0] >= 0, after
    assert after[1] >= interval, after
    assert after[2] >= 2 * interval, after


async def test_serve_watchdog_refuses_a_nonsense_interval() -> None:
    with pytest.raises(ValueError, match="must be positive"):
        await systemd.serve_watchdog(Notifier(), 0)


# --------------------------------------------------------- socket activation

# Run by systemd-socket-activate: adopts the socket, accepts the connection
# that activated it, and answers with what it found.
ACTIVATED_CHILD = textwrap.dedent("""
    import json, os, sys
    from msbd.daemon import activation, systemd
    from msbd.errors import MsbdError

    pid = os.getpid()
    inheritable_before = [os.get_inheritable(3 + i) for i in range(int(os.environ["LISTEN_FDS"]))]
    fds = activation.listen_fds(os.environ, pid)
    try:
        sock = activation.take_listen_socket(os.environ, pid)
    except MsbdError as exc:
        print(f"msbd: {exc}", flush=True)
        sys.exit(3)
    path = sock.getsockname()
    report = {
        "fds": [[f.fd, f.name] for f in fds],
        "inheritable_before": inheritable_before,
        "inheritable_after": [os.get_inheritable(f.fd) for f in fds],
        "fileno": sock.fileno(),
        "path": path,
        "path_exists": os.path.exists(path),
        "removed": sorted(systemd.unset_systemd_environ()),
        "left": [k for k in systemd.SYSTEMD_VARIABLES if k in os.environ],
    }
    conn, _ = sock.accept()
    with conn:
        conn.sendall(json.dumps(report).encode())
""")


def _activate(args: list[str]) -> subprocess.Popen[str]:
    """Start systemd-socket-activate and wait for its "Listening on" lines."""
    proc = subprocess.Popen(
        ["systemd-socket-activate", *args, "-E", f"PYTHONPATH={REPO}",
         sys.executable, "-c", ACTIVATED_CHILD],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    assert proc.stderr is not None
    listening = sum(1 for a in args if a == "-l")
    seen = 0
    while seen < listening:
        line = proc.stderr.readline()  # a fact to synchronise on; EOF if it failed
        if not line:
            proc.kill()
            pytest.fail(f"systemd-socket-activate exited: {proc.communicate()}")
        seen += line.startswith("Listening on ")
    return proc


def _report_over(path: Path) -> dict[str, object]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
        client.settimeout(15)
        client.connect(str(path))  # activation: systemd-socket-activate execs the child
        chunks = []
        while chunk := client.recv(65536):
            chunks.append(chunk)
    report: dict[str, object] = json.loads(b"".join(chunks))
    return report


@needs_socket_activate
def test_socket_activation_hands_over_the_listening_socket(sock_dir: Path) -> None:
    path = sock_dir / "msbd.sock"
    proc = _activate(["-l", str(path), "--fdname=msbd.sock"])
    try:
        report = _report_over(path)
        assert proc.wait(timeout=15) == 0
    finally:
        proc.kill()
        proc.communicate()
    assert report == {
        "fds": [[3, "msbd.sock"]],
        "inheritable_before": [True],    # as systemd passes it
        "inheritable_after": [False],    # so no worker inherits it
        "fileno": 3,                     # adopted as is, not re-created
        "path": str(path),
        "path_exists": True,             # never unlinked
        "removed": ["LISTEN_FDNAMES", "LISTEN_FDS", "LISTEN_PID"],
        "left": [],
    }


@needs_socket_activate
def test_socket_activation_picks_msbd_sock_by_name(sock_dir: Path) -> None:
    other, ours = sock_dir / "other.sock", sock_dir / "msbd.sock"
    proc = _activate(["-l", str(other), "-l", str(ours), "--fdname=other:msbd.sock"])
    try:
        report = _report_over(ours)
        assert proc.wait(timeout=15) == 0
    finally:
        proc.kill()
        proc.communicate()
    assert report["fds"] == [[3, "other"], [4, "msbd.sock"]]
    assert report["inheritable_after"] == [False, False]
    assert (report["fileno"], report["path"]) == (4, str(ours))


@needs_socket_activate
def test_socket_activation_of_the_wrong_kind_is_a_clear_error(sock_dir: Path) -> None:
    path = sock_dir / "msbd.sock"
    proc = _activate(["--datagram", "-l", str(path), "--fdname=msbd.sock"])
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as client:
            client.sendto(b"wake up", str(path))  # activation
        out, _ = proc.communicate(timeout=15)
    finally:
        proc.kill()
        proc.communicate()
    assert proc.returncode == 3
    assert out.strip() == (
        "msbd: fd 3 is not msbd's control socket: type SOCK_DGRAM, not SOCK_STREAM")


# A stand-in for systemd that is not the real tool: the shell sets LISTEN_PID
# to its own pid and execs Python, which keeps that pid; fd 3 is a pipe.
def test_listen_fd_that_is_not_a_socket(sock_dir: Path) -> None:
    script = ("import os; from msbd.daemon import activation; "
              "activation.take_listen_socket(os.environ, os.getpid())")
    child = subprocess.run(
        ["sh", "-c", 'exec 3</dev/null; LISTEN_PID=$$ LISTEN_FDS=1 exec "$0" -c "$1"',
         sys.executable, script],
        capture_output=True, text=True, timeout=30, check=False,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert child.returncode == 1
    assert "MsbdError: fd 3 is not a socket (mode crw-rw-rw-)" in child.stderr, child.stderr


# ---------------------------------------------------- adopting a listener fd


def test_adopt_unix_listener_takes_a_listening_stream_socket(sock_dir: Path) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(str(sock_dir / "s"))
        listener.listen()
        adopted = activation.adopt_unix_listener(os.dup(listener.fileno()))
        with adopted:
            assert (adopted.family, adopted.type) == (socket.AF_UNIX, socket.SOCK_STREAM)
            assert adopted.getsockname() == str(sock_dir / "s")


def _one_of_a_pair() -> socket.socket:
    """One end of a connected stream pair (the other end closed)."""
    ours, theirs = socket.socketpair()
    theirs.close()
    return ours


def _bound(kind: socket.SocketKind, path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, kind)
    sock.bind(str(path))
    return sock


@pytest.mark.parametrize(
    ("make", "problem"),
    [
        (lambda d: _bound(socket.SOCK_DGRAM, d / "s"), "type SOCK_DGRAM, not SOCK_STREAM"),
        (lambda d: _bound(socket.SOCK_SEQPACKET, d / "s"), "type SOCK_SEQPACKET, not SOCK_STREAM"),
        (lambda d: _bound(socket.SOCK_STREAM, d / "s"), "not listening"),
        (lambda d: _one_of_a_pair(), "not listening"),
        (lambda d: socket.create_server(("127.0.0.1", 0)), "family AF_INET, not AF_UNIX"),
    ],
)
def test_adopt_unix_listener_refuses_other_sockets(
    sock_dir: Path, make: Callable[[Path], socket.socket], problem: str,
) -> None:
    sock = make(sock_dir)
    try:
        with pytest.raises(MsbdError, match=f"is not msbd's control socket: {problem}"):
            activation.adopt_unix_listener(sock.fileno())
        assert sock.fileno() >= 0
        os.fstat(sock.fileno())  # still open: a refused fd is left alone
    finally:
        sock.close()


def test_adopt_unix_listener_refuses_a_pipe_or_a_closed_fd() -> None:
    r, w = os.pipe()
    try:
        with pytest.raises(MsbdError, match=r"fd \d+ is not a socket \(mode prw"):
            activation.adopt_unix_listener(r)
    finally:
        os.close(r)
        os.close(w)
    with pytest.raises(MsbdError, match=rf"fd {r} is not open"):
        activation.adopt_unix_listener(r)


def test_listen_fd_is_a_value() -> None:
    assert ListenFd(3, "msbd.sock") == ListenFd(3, "msbd.sock")
    with pytest.raises(AttributeError):
        ListenFd(3, "msbd.sock").fd = 4  # type: ignore[misc]
