"""systemd's protocols spoken natively: sd_notify, the watchdog, journald (see `activation`).

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
- Socket activation (sd_listen_fds(3)): in `msbd.daemon.activation`.
- journald (systemd.exec(5)): ``JOURNAL_STREAM`` is ``dev:inode`` of the stream
  journald reads; when stderr is that stream, log lines need no timestamp.

Startup reads everything first, then forgets it, so nothing msbd spawns later
inherits variables meant for msbd alone::

    notifier = Notifier.from_env(os.environ)
    interval = watchdog_interval(os.environ, os.getpid())
    listener = activation.take_listen_socket(os.environ, os.getpid())
    plain_logs = journald_is_collecting(os.environ)
    unset_systemd_environ()
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping
from types import TracebackType

import anyio
from anyio.abc import TaskStatus

from msbd.log import journald_is_collecting

__all__ = [
    "SYSTEMD_VARIABLES",
    "Notifier",
    "journald_is_collecting",
    "serve_watchdog",
    "unset_systemd_environ",
    "watchdog_interval",
]

log = logging.getLogger(__name__)

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

    def watchdog(self) -> bool:
        """Keep-alive ping for WatchdogSec=."""
        return self.notify(WATCHDOG=1)

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


# ---------------------------------------------------------------- environment


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
