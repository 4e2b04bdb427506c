"""Socket activation (sd_listen_fds(3)): adopt the listening socket systemd passed, as is.

``LISTEN_PID`` must be our pid; ``LISTEN_FDS`` sockets start at fd 3, named
by ``LISTEN_FDNAMES``. `take_listen_socket` adopts msbd's listening socket as
it is: systemd owns its path, mode and group, so it is never unlinked,
re-bound or re-created. Startup reads the variables once, before
`systemd.unset_systemd_environ` forgets them.
"""

from __future__ import annotations

import logging
import os
import socket
import stat
from collections.abc import Mapping
from dataclasses import dataclass

from msbd.errors import MsbdError

log = logging.getLogger(__name__)

#: The first file descriptor of socket activation (SD_LISTEN_FDS_START).
LISTEN_FDS_START = 3

#: The name msbd.socket gives its socket (FileDescriptorName=).
DEFAULT_FD_NAME = "msbd.sock"


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
