"""The fork server (the zygote): one interpreter with the worker's imports done, forking workers.

Why: a worker started by `posix_spawn` pays an interpreter start and the
imports of `msbd.vm.main` (tens of ms of CPU) before it can take a spec. The
zygote pays them once; each worker is then a `fork` of it, about a
millisecond. `python -m msbd.vm zygote` runs it, with a SOCK_SEQPACKET socket
on `contract.FORK_SERVER_FD` and otherwise the fds of a worker spawned
without its spec (the daemon, `msbd.daemon.forkserver`, starts it so).

Once its imports are done it says `contract.FORK_READY`; the daemon sends
no request before (a worker is spawned meanwhile). A request
(`contract.FORK_REQUEST`) carries, by SCM_RIGHTS, the child's ends
of one worker's pipes: the read end of its (empty) spec pipe, the status and
console write ends, the watchdog read end. The zygote forks B; B forks C,
writes C's pid on a pipe to the zygote and exits at once; the zygote reaps B
and only then answers with C's pid (`contract.fork_reply`). When B exits, C is reparented to the
nearest subreaper above it, the daemon (which made itself one, and is the
zygote's parent): by the time the daemon reads the answer C is its child,
so its pidfd and `waitid` work on C as on a spawned worker, and nobody but
the daemon can reap C (so C's pid stays C's until the daemon reaps it).

C becomes a worker exactly as `python -m msbd.vm` would: a new session; the
passed fds on 1/2 (console), 96, 97 and 98, /dev/null on 0, and every other
fd closed (the control socket included), so its fd table holds the
protocol's fds and nothing else; an empty signal mask; then the worker's
main line with no arguments, and `os._exit` with its status. Its signal
dispositions are the zygote's, which are a fresh interpreter's (the daemon
spawns the zygote with default dispositions and an empty mask, as it
spawns a worker, and this module never changes them).

What the zygote never holds, by construction:
- anything of a tenant: it runs as the daemon (root) with the environment
  every worker gets, and never sees a spec. The spec goes from the daemon
  into C's spec pipe after C exists, as with a pooled worker; the fds the
  zygote passes on are closed in it right after the fork.
- a thread: forking a process with threads is unsafe (a lock held by
  another thread stays held in the child). It imports what a worker
  imports, nothing loads libkrun (that is C's, after its spec) and nothing
  here starts a thread.
- randomness of its own to share: `os.urandom` (what the worker uses for
  names) asks the kernel each time. `random` reseeds itself after
  `os.fork` (the worker does not import it). Hash randomisation is the
  zygote's for every C: all workers forked from one zygote share the seed
  of `str` hashes (a worker hashes no tenant's input that an attacker could
  choose to collide).

The zygote exits when its socket reaches EOF: the daemon is gone.
"""

from __future__ import annotations

import fcntl
import os
import signal
import socket
import sys
from typing import Final

from msbd.contract import (
    FORK_FDS,
    FORK_READY,
    FORK_REQUEST,
    FORK_SERVER_FD,
    STDIO_FDS,
    fork_reply,
)
from msbd.vm import fds as worker_fds
from msbd.vm import main as worker_main
from msbd.vm.status import say

_SAFE_FD_FLOOR: Final = 128  # passed fds are moved above every target before placing them
_MAX_MESSAGE: Final = 64


def serve(control_fd: int = FORK_SERVER_FD) -> int:
    """Answer fork requests until EOF on the control socket; 0 then."""
    try:
        sock = socket.socket(fileno=control_fd)
    except OSError as exc:
        say(f"zygote: fd {control_fd} is not the fork server's socket: {exc}")
        return 2
    with sock:
        try:
            sock.sendall(FORK_READY)  # imports done: requests may come
        except (BrokenPipeError, ConnectionResetError):
            return 0  # the daemon is gone
        while True:
            try:
                msg, passed, _flags, _addr = socket.recv_fds(sock, _MAX_MESSAGE, len(FORK_FDS))
            except ConnectionResetError:
                return 0  # the daemon is gone
            if not msg:
                return 0  # EOF: the daemon is gone
            try:
                if msg != FORK_REQUEST or len(passed) != len(FORK_FDS):
                    reply = fork_reply(None, f"bad request ({len(msg)} bytes, {len(passed)} fds)")
                else:
                    reply = _fork(sock, passed)
            finally:
                for fd in passed:
                    os.close(fd)
            try:
                sock.sendall(reply)
            except (BrokenPipeError, ConnectionResetError):
                return 0  # the daemon is gone


def _fork(sock: socket.socket, passed: list[int]) -> bytes:
    """Fork B, which forks the worker C and exits; reap B; the answer for C."""
    report_r, report_w = os.pipe()  # close-on-exec, like every fd opened here
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        b = os.fork()
    except OSError as exc:
        os.close(report_r)
        os.close(report_w)
        return fork_reply(None, f"cannot fork: {exc.strerror}")
    if b == 0:
        _middle(sock, passed, report_r, report_w)
    os.close(report_w)
    try:
        answer = b""
        while chunk := os.read(report_r, 32):
            answer += chunk
    finally:
        os.close(report_r)
        os.waitpid(b, 0)  # B has exited: C is the daemon's child from here on
    if not answer.isdigit():
        return fork_reply(None, "the intermediate process ended without forking the worker")
    return fork_reply(int(answer))


def _middle(sock: socket.socket, passed: list[int], report_r: int, report_w: int) -> None:
    """B: fork C, say its pid, exit. Never returns."""
    status = 1
    try:
        os.close(report_r)
        c = os.fork()
        if c == 0:
            os.close(report_w)
            _worker(sock, passed)
        os.write(report_w, str(c).encode())
        status = 0
    finally:
        os._exit(status)


def _worker(sock: socket.socket, passed: list[int]) -> None:
    """C: the fd map and session of a spawned worker, then the worker's main line. Never
    returns."""
    status = 1
    try:
        sock.detach()  # its fd is closed below with every other; the object must not reuse it
        os.setsid()
        null = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        high = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, _SAFE_FD_FLOOR) for fd in passed]
        for fd, target in zip(high, FORK_FDS, strict=True):
            os.dup2(fd, target)  # inheritable: as posix_spawn's dup2 leaves them
        os.dup2(high[FORK_FDS.index(1)], 2)
        os.dup2(null, 0)
        worker_fds.close_other_fds({*STDIO_FDS, *FORK_FDS})
        signal.pthread_sigmask(signal.SIG_SETMASK, ())
        sys.argv[1:] = []
        status = worker_main.run([])
    except SystemExit as exc:  # as the interpreter would end on it
        status = exc.code if isinstance(exc.code, int) else 1
    except BaseException:  # noqa: BLE001 - as the interpreter would: a traceback, status 1
        sys.excepthook(*sys.exc_info())
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(status)
