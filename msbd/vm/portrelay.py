"""Published ports of a guest without network: host listeners relayed into a private namespace.

A guest's listening socket exists on the host only through TSI, where the VMM
binds a real socket for it. TSI cannot be limited by address, so a guest
with network `none` and published ports gets TSI inet sockets inside a network
namespace of its own that holds nothing but a loopback: whatever it connects
to or listens on stays there. libkrun maps each published guest port to the
same port inside (msbd.network.port_map_entries). This module is the one way
in: the worker listens on each published host address and port, in the
host's namespace, and relays every connection to 127.0.0.1:<guest port>
inside the namespace.

The order matters, and the worker's main line follows it:

1. `Relay.create`, in the host's namespace: only the sockets. A socket stays
   in the namespace it was created in, whatever its process does after.
2. `msbd.vm.krun.unshare_network`, then `loopback_up` (still root: both need
   privileges the owner may not have).
3. The worker becomes the sandbox owner; then `Relay.bind`, so a host port
   the owner may not bind (below 1024 without privileges) stays refused.
4. `Relay.serve_in_background`, right before the worker enters libkrun: a
   daemon thread per listener, two per connection, at most MAX_CONNECTIONS
   connections at once (more are closed as they arrive), so one busy
   sandbox's relay never grows without bound. The threads end with the
   process, when the VM does.
"""

from __future__ import annotations

import contextlib
import fcntl
import socket
import struct
import threading
from collections.abc import Sequence
from typing import Final

from msbd.network import PortMap

MAX_CONNECTIONS: Final = 128
BACKLOG: Final = 64
INNER_HOST: Final = "127.0.0.1"
CONNECT_TIMEOUT: Final = 5.0
CHUNK: Final = 65536

# <linux/sockios.h>, <net/if.h>: read and set an interface's flags.
_SIOCGIFFLAGS: Final = 0x8913
_SIOCSIFFLAGS: Final = 0x8914
_IFF_UP: Final = 0x1
_IFREQ: Final = struct.Struct("16sh22x")  # struct ifreq: name, then ifr_flags in the union


class PortUnavailable(Exception):
    """A published port could not be bound on the host; the message names it."""


def loopback_up() -> None:
    """Bring up `lo` in this (new) network namespace, which starts with it down."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        raw = fcntl.ioctl(sock, _SIOCGIFFLAGS, _IFREQ.pack(b"lo", 0))
        flags = _IFREQ.unpack(raw)[1]
        fcntl.ioctl(sock, _SIOCSIFFLAGS, _IFREQ.pack(b"lo", flags | _IFF_UP))


class Relay:
    """The host side of a sandbox's published ports (see the module's order)."""

    def __init__(self, listeners: Sequence[tuple[socket.socket, PortMap]]) -> None:
        self._listeners = list(listeners)
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)

    @classmethod
    def create(cls, ports: Sequence[PortMap]) -> Relay:
        listeners = []
        for port in ports:
            family = socket.AF_INET6 if ":" in port.listen_address else socket.AF_INET
            sock = socket.socket(family, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            listeners.append((sock, port))
        return cls(listeners)

    def bind(self) -> None:
        """Bind and listen on every published address and port, or `PortUnavailable`."""
        for sock, port in self._listeners:
            try:
                sock.bind((port.listen_address, port.host))
                sock.listen(BACKLOG)
            except OSError as exc:
                self.close()
                raise PortUnavailable(
                    f"cannot publish {port.listen_address} port {port.host}: "
                               f"{exc.strerror or exc}") from None

    def close(self) -> None:
        for sock, _ in self._listeners:
            sock.close()

    def serve_in_background(self) -> None:
        for sock, port in self._listeners:
            threading.Thread(target=self._accept_loop, args=(sock, port.guest),
                             name=f"relay-{port.host}", daemon=True).start()

    def _accept_loop(self, listener: socket.socket, guest_port: int) -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return  # closed
            if not self._slots.acquire(blocking=False):
                conn.close()
                continue
            threading.Thread(target=self._relay, args=(conn, guest_port),
                             name=f"relay-conn-{guest_port}", daemon=True).start()

    def _relay(self, conn: socket.socket, guest_port: int) -> None:
        try:
            try:
                inner = socket.create_connection((INNER_HOST, guest_port), CONNECT_TIMEOUT)
            except OSError:
                return  # nothing listens in the guest (yet): the client sees it closed
            inner.settimeout(None)
            with inner:
                back = threading.Thread(target=_pump, args=(inner, conn), daemon=True)
                back.start()
                if not _pump(conn, inner):  # the client is gone: end the guest's side too
                    _shutdown(inner, socket.SHUT_RDWR)
                back.join()
        finally:
            conn.close()
            self._slots.release()


def _pump(src: socket.socket, dst: socket.socket) -> bool:
    """Copy `src` to `dst` until `src` ends, then end `dst`'s writing side. False when
    either side failed rather than ended in order."""
    clean = True
    try:
        while data := src.recv(CHUNK):
            dst.sendall(data)
    except OSError:
        clean = False
    _shutdown(dst, socket.SHUT_WR)
    return clean


def _shutdown(sock: socket.socket, how: int) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(how)
