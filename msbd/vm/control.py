"""The control channel: how the worker asks its guest to stop in order, over vsock.

Why it exists: libkrun 1.19 on Linux has no call that asks a guest to shut
down (`krun_get_shutdown_eventfd` is built only for macOS on aarch64), and a
signal to the VMM process ends the guest outright. msbd's guest init
(guest/init/init.c) therefore dials the host on a vsock port, and libkrun
bridges that port to a Unix socket on which the worker listens.

Setting it up, as the sandbox's owner and before `krun_start_enter`:

1. `Channel.open`: a listening Unix socket, bound in a private directory
   (`private_dir`: a new random name, mode 0700, the owner's) under `$TMPDIR`
   or /tmp (not `tempfile.mkdtemp`: `tempfile` imports `shutil`, `random`,
   and through them the compression modules, ~4 ms of every worker's start
   for one `mkdir`). The worker
   opens the socket file with O_PATH, then removes the file and the
   directory at once: the socket is reached only through
   `/proc/self/fd/N` (connecting there reaches the inode the fd holds),
   and nothing is left behind whatever happens to the run;
2. `krun_add_vsock_port2(ctx, PORT, "/proc/self/fd/N", listen=false)`
   (`krun.Krun.map_vsock_port`): a guest connection to the host (CID 2) on
   port PORT becomes a connection to that socket, made by libkrun's VMM,
   which is this very process (so `/proc/self` is the worker; the implicit
   vsock device carries it);
3. `guest_env`: the guest's environment gets `MSBD_CONTROL_PORT=PORT` and
   `MSBD_STOP_GRACE=<shutdown_grace>`. The init consumes both, so the
   workload never sees them; they are not in the spec, so SandboxInfo never
   shows them (and a spec may not set `MSBD_*` itself: msbd.cmdline).

The protocol: lines of printable ASCII, each ending in a newline.

    guest -> host   started         the workload's exec succeeded
    guest -> host   exit N          the run is over with status N; the VM ends next
    host -> guest   stop SECONDS    orderly stop: the init SIGTERMs every guest
                                    process, SIGKILLs what is left SECONDS later,
                                    and the run ends with the workload's status
                                    (its own code, 143 after SIGTERM, 137 after
                                    SIGKILL)

The init ignores other lines (so does the worker), and a bare `stop` means
`MSBD_STOP_GRACE`. The host closing its end is not a stop request.

One thread (`serve`) accepts exactly one connection: the first whose peer
(SO_PEERCRED) is this process, i.e. libkrun. Anything else that reaches the
socket (only through /proc/<worker>/fd/N: the owner and root) is closed at
once. Then the listener and the O_PATH fd are closed, so nothing can connect
again. The guest's lines come from inside the VM and may lie: the worker only
repeats them in messages (at log level 3, info, and up: that it connected and
what it says), never decides anything on them. A stop asked for before the
init connected is sent when it connects, with what is left of the grace.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import socket
import threading
import time
from typing import Final

from msbd.peer import peer_pid
from msbd.vm.status import say

PORT: Final = 7097  # any port will do: each VM has a vsock port space of its own
SOCKET_NAME: Final = "ctl"
LINE_MAX: Final = 256  # the longest line read from the guest; longer ones are dropped
_MAX_NOTED: Final = 3  # unexpected lines repeated on the console, at most
_EXIT_LINE: Final = re.compile(rb"exit (\d{1,3})")
_NAME_TRIES: Final = 100  # random names tried for the private directory


def seconds_text(seconds: float) -> str:
    """Seconds as the init parses them: plain decimal, at most milliseconds."""
    return f"{seconds:.3f}".rstrip("0").rstrip(".")


def guest_env(grace: float, channel: Channel | None) -> list[str]:
    """msbd's own entries of the guest's environment (after the spec's)."""
    entries = [f"MSBD_CONTROL_PORT={PORT}"] if channel is not None else []
    return [*entries, f"MSBD_STOP_GRACE={seconds_text(grace)}"]


def _printable(raw: bytes) -> str:
    text = "".join(chr(b) if 0x20 <= b < 0x7F else "?" for b in raw[:80])
    return text + ("..." if len(raw) > 80 else "")


class Channel:
    """The host's end of the control channel: a listening socket, later one connection."""

    def __init__(self, listener: socket.socket, node: int, *, verbose: bool = False) -> None:
        self._listener = listener
        self._node = node  # O_PATH fd of the socket's (removed) file
        self.path = f"/proc/self/fd/{node}"  # libkrun connects here, from this process
        self._verbose = verbose
        self._lock = threading.Lock()
        self._conn: socket.socket | None = None
        self._closed = False  # the init's end went away, or writing to it failed
        self._discarded = False
        self._pending_deadline: float | None = None  # a stop not sent yet: when it ends
        self._started = False
        self._reported_exit: int | None = None

    @classmethod
    def open(cls, where: str | None = None, *, verbose: bool = False) -> Channel:
        """A listening socket, its file already removed again; OSError if it cannot be made.

        `verbose`: say on the console when the guest's init connects and what it says.
        """
        directory = private_dir(where or os.environ.get("TMPDIR") or "/tmp")
        path = os.path.join(directory, SOCKET_NAME)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)  # close-on-exec
        try:
            listener.bind(path)
            listener.listen(8)
            node = os.open(path, os.O_PATH | os.O_CLOEXEC | os.O_NOFOLLOW)
        except OSError:
            listener.close()
            raise
        finally:
            _remove(directory)
        return cls(listener, node, verbose=verbose)

    def serve_in_background(self) -> None:
        """Start the thread that takes libkrun's connection and reads the guest's lines."""
        threading.Thread(target=self.serve, name="control", daemon=True).start()

    def serve(self) -> None:
        conn = self._accept()
        if conn is not None:
            self._read(conn)

    def discard(self) -> None:
        """No connection will come (libkrun never started): close the listening socket."""
        with self._lock:
            self._discarded = True
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes a thread blocked in accept
        self._close_listener()

    def _close_listener(self) -> None:
        with self._lock:
            node, self._node = self._node, -1
        self._listener.close()
        if node >= 0:
            os.close(node)

    def _accept(self) -> socket.socket | None:
        refused = 0
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError as exc:
                with self._lock:
                    discarded = self._discarded
                if not discarded:
                    say(f"control channel: cannot accept a connection: {exc.strerror or exc}")
                return None
            pid = peer_pid(conn)
            if pid == os.getpid():
                break
            conn.close()
            if refused == 0:
                say(f"control channel: refused a connection from pid {pid}: only libkrun, "
                    "inside this worker, may connect")
            refused += 1
        self._close_listener()
        with self._lock:
            self._conn = conn
            if self._verbose:
                say("control channel: the guest's init connected")
            if self._pending_deadline is not None:
                left = max(0.0, self._pending_deadline - time.monotonic())
                say(f"the guest's init connected: asking it to stop over the control channel "
                    f"({left:.1f} s of the grace left)")
                self._send_stop(left)
        return conn

    def _read(self, conn: socket.socket) -> None:
        buf, skipping, noted = b"", False, 0
        while True:
            try:
                chunk = conn.recv(4096)
            except OSError:
                chunk = b""
            if not chunk:
                break
            *lines, buf = (buf + chunk).split(b"\n")
            for line in lines:
                if skipping:  # the rest of an overlong line
                    skipping = False
                elif not self._known(line) and noted < _MAX_NOTED:
                    noted += 1
                    say(f"control channel: ignored an unexpected line from the guest: "
                        f"{_printable(line)!r}")
            if len(buf) > LINE_MAX:
                buf, skipping = b"", True
        with self._lock:
            self._closed = True
            conn.close()

    def _known(self, line: bytes) -> bool:
        found = _EXIT_LINE.fullmatch(line)
        with self._lock:
            if line == b"started":
                self._started = True
            elif found is not None:
                self._reported_exit = int(found.group(1))
            else:
                return False
        if self._verbose:
            say(f"control channel: the guest's init says {line.decode()!r}")
        return True

    def stop(self, why: str, grace: float) -> None:
        """Ask the guest's init to stop with `grace` (now, or as soon as it connects),
        saying so on the console first."""
        with self._lock:
            if self._conn is None:
                self._pending_deadline = time.monotonic() + grace
                say(f"{why}: the guest's init has not connected to the control channel yet; "
                    f"asking it to stop once it does (grace {grace:g} s)")
            elif self._closed:
                say(f"{why}: the guest's init has closed the control channel; waiting for "
                    "the VM to end")
            else:
                say(f"{why}: asking the guest to stop over the control channel "
                    f"(grace {grace:g} s)")
                self._send_stop(grace)

    def _send_stop(self, grace: float) -> None:
        """Under the lock, with a connection: one line, never blocking."""
        assert self._conn is not None
        try:
            self._conn.send(f"stop {seconds_text(grace)}\n".encode(), socket.MSG_DONTWAIT)
        except OSError as exc:
            self._closed = True
            say(f"control channel: cannot send the stop: {exc.strerror or exc}")

    def describe(self) -> str:
        """What the guest's init has done so far (its own word, for messages only)."""
        with self._lock:
            if self._conn is None:
                return "its init never connected to the control channel"
            if self._reported_exit is not None:
                return f"its init said the run ended with status {self._reported_exit}"
            if self._closed:
                return "its init closed the control channel"
            if not self._started:
                return "its init connected but never said the workload started"
            return "its init did not end the run"


def private_dir(parent: str, prefix: str = "msbd-ctl-") -> str:
    """A new directory in `parent` with a random name, mode 0700, made by this call
    (never one that existed: `mkdir` fails on an existing name, and another is tried)."""
    for _ in range(_NAME_TRIES):
        path = os.path.join(parent, prefix + os.urandom(8).hex())
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            continue
        return path
    raise FileExistsError(errno.EEXIST, "no unused directory name found", parent)


def _remove(directory: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(os.path.join(directory, SOCKET_NAME))
    with contextlib.suppress(OSError):
        os.rmdir(directory)
