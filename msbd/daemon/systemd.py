"""Speak systemd's protocols natively: sd_notify, the watchdog, socket activation, journald.

No libsystemd: each protocol is a few lines of stdlib.

- Notification (sd_notify(3)): one datagram of ``KEY=value`` lines sent to the
  AF_UNIX socket named by ``NOTIFY_SOCKET`` (a path, or an abstract name written
  with a leading ``@``). Outside systemd there is no such variable and every
  call is a silent no-op. A notifier never raises: a failed send is logged once,
  at debug level, and the daemon goes on.
- Watchdog (sd_watchdog_enabled(3)): ``WATCHDOG_USEC`` (honoured only when
  ``WATCHDOG_PID`` is unset or ours); `serve_watchdog` pings at half that
  period from the event loop itself, so a stuck loop stops the pings and
  systemd notices.
- Socket activation (sd_listen_fds(3)): ``LISTEN_PID`` must be our pid;
  ``LISTEN_FDS`` sockets start at fd 3, named by ``LISTEN_FDNAMES``.
  `take_listen_socket` adopts msbd's listening socket as it is: it is never
  unlinked, re-bound or re-created.
- journald (systemd.exec(5)): ``JOURNAL_STREAM`` is ``dev:inode`` of the stream
  journald reads; when stderr is that stream, log lines need no timestamp.

Startup reads everything first, then forgets it, so nothing msbd spawns later
inherits variables meant for msbd alone::

    notifier = Notifier.from_env(os.environ)
    interval = watchdog_interval(os.environ, os.getpid())
    listener = take_listen_socket(os.environ, os.getpid())
    plain_logs = journald_is_collecting(os.environ)
    unset_systemd_environ()
"""

from __future__ import annotations

import logging
import os
import socket
import stat
import time
from collections.abc import Mapping
from dataclasses import dataclass
from types import TracebackType

import anyio
from anyio.abc import TaskStatus

from msbd.errors import MsbdError
from msbd.log import journald_is_collecting

__all__ = [
    "DEFAULT_FD_NAME",
    "LISTEN_FDS_START",
    "SYSTEMD_VARIABLES",
    "ListenFd",
    "Notifier",
    "adopt_unix_listener",
    "journald_is_collecting",
    "listen_fds",
    "scrub_environ",
    "serve_watchdog",
    "take_listen_socket",
    "unset_systemd_environ",
    "watchdog_interval",
]

log = logging.getLogger(__name__)

#: The first file descriptor of socket activation (SD_LISTEN_FDS_START).
LISTEN_FDS_START = 3

#: The name msbd.socket gives its socket (FileDescriptorName=).
DEFAULT_FD_NAME = "msbd.sock"

#: Variables systemd sets for msbd alone. Each is consumed at startup and must
#: not reach anything msbd spawns (workers, libkrun, guests' helpers):
#:
#: - ``NOTIFY_SOCKET``: a child could report READY/STOPPING/WATCHDOG in msbd's
#:   name (NotifyAccess=main makes systemd ignore it, but a library in the child
#:   that finds the variable will still try, and a hung msbd must never be kept
#:   alive by someone else's watchdog pings).
#: - ``LISTEN_PID``, ``LISTEN_FDS``, ``LISTEN_FDNAMES``: describe fds that were
#:   passed to msbd; a child that runs sd_listen_fds() after an exec that keeps
#:   its pid would take whatever sits at fd 3 for a listening socket.
#: - ``WATCHDOG_USEC``, ``WATCHDOG_PID``: the watchdog contract is msbd's; a
#:   child has nothing to ping.
#: - ``JOURNAL_STREAM``: names msbd's stderr; a worker's stderr is its console
#:   pipe, so for a child the value is simply false.
#: - ``INVOCATION_ID``, ``SYSTEMD_EXEC_PID``: identify this run of msbd.service
#:   and its main pid; a sandbox is not that invocation and must not claim it
#:   (e.g. in logs it ships to the journal on its own).
SYSTEMD_VARIABLES: tuple[str, ...] = (
    "NOTIFY_SOCKET",
    "LISTEN_PID",
    "LISTEN_FDS",
    "LISTEN_FDNAMES",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
    "JOURNAL_STREAM",
    "INVOCATION_ID",
    "SYSTEMD_EXEC_PID",
)


# --------------------------------------------------------------------- notify


def _notify_address(value: str) -> bytes | None:
    """The sockaddr for NOTIFY_SOCKET, or None for a form msbd does not speak."""
    if value.startswith("@") and len(value) > 1:
        return b"\0" + os.fsencode(value[1:])
    if value.startswith("/"):
        return os.fsencode(value)
    return None  # vsock:..., relative paths: not for us


class Notifier:
    """Sends sd_notify datagrams to systemd; a silent no-op outside systemd.

    Build it with `from_env`. Every method returns whether the message was
    sent; none raises for a failure to send.
    """

    def __init__(self, sock: socket.socket | None = None, address: bytes | None = None) -> None:
        if (sock is None) != (address is None):
            raise ValueError("a notifier needs both a socket and an address, or neither")
        self._sock = sock
        self._address = address
        self._failed_before = False

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> Notifier:
        """A notifier for ``NOTIFY_SOCKET`` in `environ`, or a no-op one."""
        value = environ.get("NOTIFY_SOCKET", "")
        if not value:
            return cls()
        address = _notify_address(value)
        if address is None:
            log.debug("NOTIFY_SOCKET=%r is not a path or an abstract name; not notifying", value)
            return cls()
        try:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        except OSError as exc:
            log.debug("cannot open a socket for NOTIFY_SOCKET: %s; not notifying", exc)
            return cls()
        # Non-blocking: with a timeout set, Python would wait for room in the
        # peer's queue (up to the timeout) inside the event loop.
        sock.setblocking(False)
        return cls(sock, address)

    @property
    def enabled(self) -> bool:
        """Whether messages go anywhere (msbd runs under systemd)."""
        return self._sock is not None

    def notify(self, **fields: str | int) -> bool:
        """Send ``KEY=value`` lines, e.g. ``notify(READY=1, STATUS="up")``.

        Keys are upper-cased; a newline inside a value becomes a space (one
        field can never inject another).
        """
        lines = []
        for key, value in fields.items():
            name = key.upper()
            if not name.replace("_", "").isalnum() or not name.isascii():
                raise ValueError(f"not a notification field name: {key!r}")
            text = str(value).replace("\r", " ").replace("\n", " ")
            lines.append(f"{name}={text}")
        return self.notify_text("\n".join(lines))

    def notify_text(self, text: str) -> bool:
        """Send `text` (``KEY=value`` lines) as one datagram, as sd_notify does."""
        if self._sock is None or self._address is None:
            return False
        try:
            # Never block the event loop: a reader that does not keep up loses
            # messages (systemd keeps up; a stuck peer must not stall msbd).
            self._sock.sendto(text.encode(), socket.MSG_DONTWAIT, self._address)
        except OSError as exc:
            if not self._failed_before:
                self._failed_before = True
                log.debug("cannot notify systemd at %r: %s (not logged again)",
                          self._address, exc)
            return False
        return True

    def ready(self, status: str | None = None) -> bool:
        """Startup is complete: msbd answers calls from now on."""
        if status is None:
            return self.notify(READY=1)
        return self.notify(READY=1, STATUS=status)

    def status(self, text: str) -> bool:
        """A one-line status shown by ``systemctl status``."""
        return self.notify(STATUS=text)

    def stopping(self, status: str | None = None) -> bool:
        """Shutdown has begun."""
        if status is None:
            return self.notify(STOPPING=1)
        return self.notify(STOPPING=1, STATUS=status)

    def reloading(self) -> bool:
        """A configuration reload has begun; send `ready` when it is done."""
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.notify(RELOADING=1, MONOTONIC_USEC=usec)

    def watchdog(self) -> bool:
        """Keep-alive ping for WatchdogSec=."""
        return self.notify(WATCHDOG=1)

    def extend_timeout(self, timeout: float) -> bool:
        """Ask for `timeout` more seconds to finish starting or stopping."""
        return self.notify(EXTEND_TIMEOUT_USEC=max(1, round(timeout * 1_000_000)))

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
            self._address = None

    def __enter__(self) -> Notifier:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


# ------------------------------------------------------------------- watchdog


def watchdog_interval(environ: Mapping[str, str], pid: int) -> float | None:
    """Seconds between watchdog pings (half of ``WATCHDOG_USEC``), or None.

    None when there is no watchdog, when ``WATCHDOG_PID`` names another
    process, or when a value is malformed (logged at debug).
    """
    usec_text = environ.get("WATCHDOG_USEC")
    if not usec_text:
        return None
    pid_text = environ.get("WATCHDOG_PID")
    try:
        usec = int(usec_text)
        watchdog_pid = int(pid_text) if pid_text else None
    except ValueError:
        log.debug("malformed WATCHDOG_USEC=%r or WATCHDOG_PID=%r; no watchdog",
                  usec_text, pid_text)
        return None
    if usec <= 0 or (watchdog_pid is not None and watchdog_pid != pid):
        return None
    return usec / 2 / 1_000_000


async def serve_watchdog(
    notifier: Notifier,
    interval: float,
    *,
    task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Send ``WATCHDOG=1`` now and every `interval` seconds until cancelled.

    Pings come from the event loop, on absolute deadlines (next = previous +
    interval, so they do not drift): if the loop is stuck, they stop, which is
    the point. After a stall longer than an interval, one ping goes out at once
    and the cadence restarts from there; missed pings are not sent in a burst.
    Reports readiness once the first ping is out.
    """
    if not interval > 0:
        raise ValueError(f"watchdog interval must be positive, not {interval!r}")
    deadline = anyio.current_time()
    notifier.watchdog()
    task_status.started()
    while True:
        deadline += interval
        now = anyio.current_time()
        if deadline <= now:
            deadline = now + interval
        await anyio.sleep_until(deadline)
        notifier.watchdog()


# ---------------------------------------------------------- socket activation


@dataclass(frozen=True, slots=True)
class ListenFd:
    """One file descriptor passed by socket activation, and its name."""

    fd: int
    name: str


def _env_int(environ: Mapping[str, str], key: str) -> int:
    text = environ[key]
    try:
        return int(text)
    except ValueError:
        raise MsbdError(f"socket activation: {key}={text!r} is not a number",
                        data={"variable": key}) from None


def listen_fds(environ: Mapping[str, str], pid: int) -> list[ListenFd]:
    """The fds systemd passed to process `pid`, named; [] when none were.

    sd_listen_fds semantics: only when ``LISTEN_PID`` is `pid`; ``LISTEN_FDS``
    fds from fd 3; names from ``LISTEN_FDNAMES`` (``unknown`` when unset).
    Marks each fd close-on-exec, so none leaks into a spawned process.
    Malformed variables, or an fd that is not open, raise `MsbdError`.
    """
    if "LISTEN_PID" not in environ or "LISTEN_FDS" not in environ:
        return []
    if _env_int(environ, "LISTEN_PID") != pid:
        return []  # meant for another process (we were exec'd or forked)
    count = _env_int(environ, "LISTEN_FDS")
    if count < 0:
        raise MsbdError(f"socket activation: LISTEN_FDS={count} is negative",
                        data={"variable": "LISTEN_FDS"})
    if count == 0:
        return []
    names_text = environ.get("LISTEN_FDNAMES")
    if names_text is None:
        names = ["unknown"] * count
    else:
        names = names_text.split(":") if names_text else []
    if len(names) != count:
        raise MsbdError(
            f"socket activation: LISTEN_FDNAMES has {len(names)} names for {count} fds",
            data={"variable": "LISTEN_FDNAMES"},
        )
    fds = [ListenFd(LISTEN_FDS_START + i, name) for i, name in enumerate(names)]
    for entry in fds:
        try:
            os.set_inheritable(entry.fd, False)
        except OSError as exc:
            raise MsbdError(f"socket activation: fd {entry.fd} ({entry.name}) is not open",
                            data={"fd": entry.fd}) from exc
    return fds


def adopt_unix_listener(fd: int) -> socket.socket:
    """Wrap `fd`, which must be a listening AF_UNIX SOCK_STREAM socket, as is.

    Raises `MsbdError` naming what the fd is instead; the fd is left open then.
    """
    try:
        mode = os.fstat(fd).st_mode
    except OSError as exc:
        raise MsbdError(f"fd {fd} is not open", data={"fd": fd}) from exc
    if not stat.S_ISSOCK(mode):
        raise MsbdError(f"fd {fd} is not a socket (mode {stat.filemode(mode)})", data={"fd": fd})
    sock = socket.socket(fileno=fd)
    try:
        family = sock.family
        kind = sock.getsockopt(socket.SOL_SOCKET, socket.SO_TYPE)
        accepting = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
    except OSError as exc:
        sock.detach()
        raise MsbdError(f"fd {fd}: cannot inspect the socket: {exc}", data={"fd": fd}) from exc
    problem = None
    if family != socket.AF_UNIX:
        problem = f"family {_enum_name(socket.AddressFamily, family)}, not AF_UNIX"
    elif kind != socket.SOCK_STREAM:
        problem = f"type {_enum_name(socket.SocketKind, kind)}, not SOCK_STREAM"
    elif not accepting:
        problem = "not listening (a connected stream, not a ListenStream= socket)"
    if problem is not None:
        sock.detach()
        raise MsbdError(f"fd {fd} is not msbd's control socket: {problem}", data={"fd": fd})
    return sock


def _enum_name(enum_type: type[socket.AddressFamily] | type[socket.SocketKind],
               value: int) -> str:
    try:
        return enum_type(value).name
    except ValueError:
        return str(value)


def take_listen_socket(
    environ: Mapping[str, str], pid: int, name: str = DEFAULT_FD_NAME
) -> socket.socket | None:
    """msbd's listening socket from socket activation, or None without one.

    Picks the fd named `name`, else the first one passed. The socket is used
    as is: systemd owns its path, mode and group, so it is never unlinked or
    re-created. A passed fd of the wrong kind raises `MsbdError`.
    """
    fds = listen_fds(environ, pid)
    if not fds:
        return None
    chosen = next((entry for entry in fds if entry.name == name), fds[0])
    if chosen.name != name:
        log.debug("no socket named %r among %s; using fd %d (%s)",
                  name, [entry.name for entry in fds], chosen.fd, chosen.name)
    return adopt_unix_listener(chosen.fd)


# ---------------------------------------------------------------- environment


def scrub_environ(environ: Mapping[str, str]) -> dict[str, str]:
    """A copy of `environ` without `SYSTEMD_VARIABLES` (for spawning children)."""
    return {key: value for key, value in environ.items() if key not in SYSTEMD_VARIABLES}


def unset_systemd_environ() -> dict[str, str]:
    """Remove `SYSTEMD_VARIABLES` from os.environ, once msbd has read them.

    Returns what was removed.
    """
    removed = {}
    for key in SYSTEMD_VARIABLES:
        value = os.environ.pop(key, None)
        if value is not None:
            removed[key] = value
    return removed
