"""The control channel's host end (msbd.vm.control) and the worker's stop (guard.Shutdown),
in process with real sockets and eventfds; and the channel of a worker run by a non-root
owner, against the libkrun test double."""

from __future__ import annotations

import os
import re
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from tenants import B
from workerproc import Workers

from msbd.vm import control, guard

INIT = "msbd-worker: control channel: the guest's init "


@pytest.fixture
def channel(tmp_path: Path) -> Iterator[control.Channel]:
    ch = control.Channel.open(str(tmp_path), verbose=True)
    yield ch
    ch.discard()


def serving(ch: control.Channel) -> threading.Thread:
    """`serve` in a thread of the test's own: joining it waits for the end of the channel."""
    thread = threading.Thread(target=ch.serve, daemon=True)
    thread.start()
    return thread


def dial(ch: control.Channel) -> socket.socket:
    """Connect as libkrun does: from this very process, through /proc/self/fd/N."""
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.settimeout(20)
    try:
        conn.connect(ch.path)
    except OSError:
        conn.close()
        raise
    return conn


def lines_of(err: str) -> list[str]:
    return err.splitlines()


def test_nothing_is_left_on_disk_and_libkrun_gets_a_proc_self_fd_name(
        tmp_path: Path, channel: control.Channel) -> None:
    assert list(tmp_path.iterdir()) == []  # the directory and the socket file: gone at once
    found = re.fullmatch(r"/proc/self/fd/(\d+)", channel.path)
    assert found is not None
    assert stat.S_ISSOCK(os.stat(channel.path).st_mode)
    assert control.guest_env(2.5, channel) == ["MSBD_CONTROL_PORT=7097", "MSBD_STOP_GRACE=2.5"]
    assert control.guest_env(10.0, None) == ["MSBD_STOP_GRACE=10"]


def test_the_private_directory_is_new_and_only_its_makers(tmp_path: Path) -> None:
    old = os.umask(0)  # the most permissive umask: the mode must not depend on it
    try:
        first = control.private_dir(str(tmp_path))
        second = control.private_dir(str(tmp_path))
    finally:
        os.umask(old)
    assert first != second
    for made in (first, second):
        st = os.lstat(made)
        assert stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o700
        assert st.st_uid == os.geteuid()
        assert Path(made).parent == tmp_path and Path(made).name.startswith("msbd-ctl-")


@pytest.mark.parametrize(("seconds", "text"), [(10.0, "10"), (0.5, "0.5"), (0.0, "0"),
                                               (1e-5, "0"), (3599.9994, "3599.999")])
def test_seconds_are_plain_decimals(seconds: float, text: str) -> None:
    assert control.seconds_text(seconds) == text


def test_only_this_process_may_connect_and_only_once(
        channel: control.Channel, capfd: pytest.CaptureFixture[str]) -> None:
    thread = serving(channel)
    # Another process reaches the socket (as the owner could, through /proc/<pid>/fd/N).
    other = subprocess.run(
        [sys.executable, "-c", "import socket, sys\n"
         "s = socket.socket(socket.AF_UNIX); s.settimeout(20); s.connect(sys.argv[1])\n"
         "print(repr(s.recv(100)))", f"/proc/{os.getpid()}/fd/{channel.path.rsplit('/')[-1]}"],
        capture_output=True, text=True, timeout=60, check=True)
    assert other.stdout == "b''\n"  # closed at once
    conn = dial(channel)
    channel.stop("test", 5.0)  # goes out now, or as soon as the connection is taken
    assert conn.recv(100).decode() in ("stop 5\n", *(f"stop 4.{n:03d}\n" for n in range(1000)))
    with pytest.raises((FileNotFoundError, ConnectionRefusedError)):
        dial(channel)
    conn.close()
    thread.join(20)
    assert not thread.is_alive()
    err = lines_of(capfd.readouterr().err)
    refused = re.fullmatch(r"msbd-worker: control channel: refused a connection from pid "
                           r"(\d+): only libkrun, inside this worker, may connect", err[0])
    assert refused is not None and int(refused.group(1)) != os.getpid(), err
    # The stop went out at once, or when the connection was taken, if that came later.
    sent = ["msbd-worker: control channel: the guest's init connected",
            "msbd-worker: test: asking the guest to stop over the control channel (grace 5 s)"]
    pending = ["msbd-worker: test: the guest's init has not connected to the control channel "
               "yet; asking it to stop once it does (grace 5 s)", sent[0]]
    assert err[1:] == sent or (err[1:3] == pending and len(err) == 4), err


def test_a_stop_before_the_init_connects_goes_out_with_what_is_left(
        channel: control.Channel, capfd: pytest.CaptureFixture[str]) -> None:
    channel.stop("SIGTERM", 30.0)
    assert lines_of(capfd.readouterr().err) == [
        "msbd-worker: SIGTERM: the guest's init has not connected to the control channel yet; "
        "asking it to stop once it does (grace 30 s)"]
    thread = serving(channel)
    conn = dial(channel)
    line = conn.recv(100).decode()
    assert re.fullmatch(r"stop \d+(\.\d+)?\n", line) and 25 < float(line[5:]) <= 30, line
    conn.close()
    thread.join(20)
    err = lines_of(capfd.readouterr().err)
    assert err[0] == f"{INIT}connected"
    assert re.fullmatch(r"msbd-worker: the guest's init connected: asking it to stop over the "
                        r"control channel \(\d+\.\d s of the grace left\)", err[1]), err


def test_the_guests_lines_are_only_repeated_and_bounded(
        channel: control.Channel, capfd: pytest.CaptureFixture[str]) -> None:
    thread = serving(channel)
    conn = dial(channel)
    assert channel.describe() in ("its init never connected to the control channel",
                                  "its init connected but never said the workload started")
    junk = [b"hello", b"stop 1", b"exit x", b"\x1b[2Jexit 3", b"one more"]
    conn.sendall(b"started\n" + b"A" * 5000 + b"\n" + b"\n".join(junk) + b"\nexit 3\n")
    conn.close()  # the init's end goes away: not a stop, only noted
    thread.join(20)
    assert not thread.is_alive()
    assert channel.describe() == "its init said the run ended with status 3"
    assert lines_of(capfd.readouterr().err) == [
        f"{INIT}connected",
        f"{INIT}says 'started'",
        # the 5000-byte line was dropped; then at most three unexpected lines are repeated
        "msbd-worker: control channel: ignored an unexpected line from the guest: 'hello'",
        "msbd-worker: control channel: ignored an unexpected line from the guest: 'stop 1'",
        "msbd-worker: control channel: ignored an unexpected line from the guest: 'exit x'",
        f"{INIT}says 'exit 3'"]
    channel.stop("SIGTERM", 1.0)
    assert lines_of(capfd.readouterr().err) == [
        "msbd-worker: SIGTERM: the guest's init has closed the control channel; waiting for "
        "the VM to end"]


def test_discard_wakes_the_thread_and_closes_the_socket(channel: control.Channel) -> None:
    thread = serving(channel)
    path = channel.path
    channel.discard()
    thread.join(20)
    assert not thread.is_alive()
    with pytest.raises(OSError), socket.socket(socket.AF_UNIX) as late:
        late.connect(path)


# --- guard.Shutdown: how the worker asks, and when it gives up -------------------------


class Exits:
    """Records the forced exits Shutdown asks for (instead of os._exit)."""

    def __init__(self) -> None:
        self.statuses: list[int] = []
        self.happened = threading.Event()

    def __call__(self, status: int) -> None:
        self.statuses.append(status)
        self.happened.set()


def test_with_a_shutdown_eventfd_the_worker_writes_it(capfd: pytest.CaptureFixture[str]
                                                      ) -> None:
    efd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    exits = Exits()
    try:
        shutdown = guard.Shutdown(600.0, 5.0, eventfd=efd, force_exit=exits)
        shutdown.request(143, "SIGTERM", insist=True)
        assert os.eventfd_read(efd) == 1
        assert exits.statuses == []
        shutdown.request(130, "SIGINT", insist=True)  # a second signal: at once, first status
        assert exits.statuses == [143]
    finally:
        os.close(efd)
    assert lines_of(capfd.readouterr().err) == [
        "msbd-worker: SIGTERM: asking the guest to shut down through libkrun's shutdown "
        "eventfd (grace 600 s)",
        "msbd-worker: SIGINT again: exiting now; exit status 143"]


def test_the_worker_gives_up_after_the_grace_and_the_margin(
        channel: control.Channel, capfd: pytest.CaptureFixture[str]) -> None:
    exits = Exits()
    shutdown = guard.Shutdown(0.1, 0.2, channel=channel, force_exit=exits)
    assert shutdown.left() is None  # not asked yet
    t0 = time.monotonic()
    assert shutdown.request(6, "the daemon is gone (EOF on fd 97)")  # the caller waits it out
    assert not shutdown.request(6, "again, not insisting")  # ignored
    left = shutdown.left()
    assert left is not None and 0.0 < left <= 0.3
    time.sleep(left)  # the caller's part, as the worker's waiting thread does; noqa: sleep-ok
    assert time.monotonic() - t0 >= 0.3
    assert shutdown.left() == 0.0
    shutdown.give_up()
    shutdown.give_up()  # another thread that waited too: once only
    assert exits.statuses == [6]
    assert lines_of(capfd.readouterr().err) == [
        "msbd-worker: the daemon is gone (EOF on fd 97): the guest's init has not connected to "
        "the control channel yet; asking it to stop once it does (grace 0.1 s)",
        "msbd-worker: the guest did not stop within its grace of 0.1 s and 0.2 s more (its "
        "init never connected to the control channel); exit status 6"]


def test_without_any_way_to_ask_the_worker_exits_at_once(
        capfd: pytest.CaptureFixture[str]) -> None:
    exits = Exits()
    guard.Shutdown(10.0, 5.0, force_exit=exits).request(143, "SIGTERM")
    assert exits.statuses == [143]
    assert lines_of(capfd.readouterr().err) == [
        "msbd-worker: SIGTERM: this libkrun has no way to ask its guest to stop (no control "
        "channel, no shutdown eventfd), exiting now; exit status 143"]


# --- a worker whose sandbox has a non-root owner ---------------------------------------


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to become another uid")
def test_the_channel_is_the_owners_and_libkrun_reaches_it_as_the_owner(
        workers: Workers, fakekrun: Path, make_root: Callable[..., Path], open_dir: Path
        ) -> None:
    root = make_root("owned", B)
    gate = open_dir / "gate"
    os.mkfifo(gate, 0o666)
    os.chmod(gate, 0o666)  # the test double's init waits on it as the owner
    release = os.open(gate, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    log = open_dir / "fakekrun.jsonl"
    spec = (f'{{"name": "t", "rootfs": "{root}", "libkrun": "{fakekrun}", "exec": "/bin/sh", '
            '"args": ["-c", "trap \'exit 42\' TERM; echo ready; while :; do sleep 0.1; done"], '
            f'"uid": {B.uid}, "gid": {B.gid}, "groups": [{B.gid}], "log_level": 3, '
            '"heartbeat_interval": 60}').encode()
    try:
        w = workers.start(spec, log=log, env={"FAKEKRUN_CONTROL_GATE": str(gate)})
        assert w.status_line() == "entering"
        node = w.control_socket().name
        st = os.stat(f"/proc/{w.pid}/fd/{node}")  # the socket the owner's worker bound
        assert stat.S_ISSOCK(st.st_mode) and (st.st_uid, st.st_gid) == (B.uid, B.gid)
        os.write(release, b"x")
        assert w.console is not None
        seen = {w.console.readline(20) for _ in range(3)}
        assert seen == {"ready", f"{INIT}connected", f"{INIT}says 'started'"}
        os.kill(w.pid, signal.SIGTERM)
        assert w.wait() == 42
    finally:
        os.close(release)
    [dial_record] = w.calls_named("control_connect")
    assert (dial_record["ok"], dial_record["euid"]) == (True, B.uid)
