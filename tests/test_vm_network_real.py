"""What real guests can reach in each network mode (docs/network.md), seen from both sides.

Each test boots one guest (real libkrun, `pytest -m vm`; the nested lane on
hosts like this one) whose script probes, then prints `listening` once its
own server answers, and sleeps; the host checks what it saw meanwhile: its
listeners' accept counts, `ss -ltn`, a client of the published port. The
guest's sandbox belongs to root, the strongest case: were a host Unix socket
reachable, msbd's own control socket would be.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from daemonproc import DaemonProc
from test_vm_real import GUEST_WAIT, guest, real_libkrun, vm_daemon, vm_root

pytestmark = pytest.mark.vm
__all__ = ["real_libkrun", "vm_daemon", "vm_root"]  # fixtures shared with test_vm_real

PROBE = Path(__file__).parent / "guestprobe" / "unixconnect.c"
GUEST_PORT = 8080
HELLO = "hi-from-guest"


@pytest.fixture(scope="module")
def probe_root(vm_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The busybox root plus `unixconnect` (busybox nc has no Unix sockets)."""
    built = tmp_path_factory.mktemp("probe") / "unixconnect"
    subprocess.run(["gcc", "-static", "-O2", "-Wall", "-Werror", "-o", str(built), str(PROBE)],
                   check=True)
    shutil.copy2(built, vm_root / "bin" / "unixconnect")
    return vm_root


class HostListener:
    """A TCP listener on the host's 127.0.0.1 that greets and counts whoever connects."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port: int = self.sock.getsockname()[1]
        self.accepted = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            with conn:
                conn.sendall(b"host-says-hi\n")


@pytest.fixture
def host_tcp() -> Iterator[HostListener]:
    listener = HostListener()
    yield listener
    listener.sock.close()


@pytest.fixture
def host_unix(probe_root: Path) -> Iterator[tuple[socket.socket, str]]:
    """A host Unix listener whose socket file the guest sees in its root (`/probe.sock`)."""
    path = probe_root / "probe.sock"
    path.unlink(missing_ok=True)
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(path))
        os.chmod(path, 0o777)
        s.listen(8)
        s.settimeout(0)
        yield s, "/probe.sock"
    path.unlink(missing_ok=True)


def unix_accepted(s: socket.socket) -> bool:
    try:
        s.accept()[0].close()
    except BlockingIOError:
        return False
    return True


def listening_ports() -> set[str]:
    """Local addresses of listening TCP sockets on the host, as `ss -ltn` prints them."""
    out = subprocess.run(["ss", "-ltnH"], capture_output=True, text=True, check=True).stdout
    return {line.split()[3] for line in out.splitlines() if line.strip()}


def bound(port: int) -> list[str]:
    return sorted(a for a in listening_ports() if a.rsplit(":", 1)[1] == str(port))


def until_logged(d: DaemonProc, name: str, text: str) -> str:
    """The guest's console up to the line holding `text` (sandbox.logs waits for more)."""
    deadline = time.monotonic() + GUEST_WAIT
    seen, offset = "", 0
    while text not in seen:
        left = deadline - time.monotonic()
        assert left > 0, f"{name} never printed {text!r}; it printed: {seen!r}"
        chunk = d.call("sandbox.logs", {"name": name, "offset": offset, "wait": min(left, 30)})
        seen, offset = seen + chunk["data"], chunk["offset"]
        info = d.call("sandbox.get", {"name": name})
        assert info["state"] == "running" or text in seen, (info, seen)
    return seen


def talk(port: int) -> str:
    """What a host client of 127.0.0.1:`port` reads (once the guest said `listening`, its
    server answers there: a relay or libkrun's listener is in front of it by then)."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as c:
        return c.recv(100).decode()


def script(unix_paths: list[str], host_port: int, *, servers: list[int],
           ready: list[int]) -> str:
    """Probe the host's Unix sockets, its loopback listener and an unrouted address, say
    the `nofile` limit, start `servers`, and say `listening` once every port of `ready`
    answers on 127.0.0.1 as seen from the guest."""
    start_servers = "".join(f"nc -ll -p {port} -e echo {HELLO} & " for port in servers)
    return (f"unixconnect {' '.join(unix_paths)}; "
            f"timeout 10 nc 127.0.0.1 {host_port} </dev/null; echo lo-probe:$?; "
            "timeout 10 nc 192.0.2.1 80 </dev/null; echo out-probe:$?; "
            "echo nofile:$(ulimit -n); " + start_servers +
            "".join(f"until nc 127.0.0.1 {port} </dev/null | grep -q {HELLO}; "
                    "do sleep 0.2; done; " for port in ready) +
            "echo listening; exec sleep 600")


def no_unix_reached(out: str, paths: list[str], listener: socket.socket) -> None:
    for path in paths:
        [line] = [ln for ln in out.splitlines() if ln.startswith(f"unix {path}: ")]
        assert not line.endswith(": connected"), line
    assert not unix_accepted(listener)


def test_none_reaches_nothing_and_binds_nothing(
        vm_daemon: DaemonProc, probe_root: Path, host_tcp: HostListener,
        host_unix: tuple[socket.socket, str]) -> None:
    paths = [host_unix[1], str(vm_daemon.socket)]
    vm_daemon.call("sandbox.run", guest("net-none", probe_root, script(
        paths, host_tcp.port, servers=[GUEST_PORT], ready=[GUEST_PORT]),
        network="none", rlimits={"nofile": 77}))
    try:
        out = until_logged(vm_daemon, "net-none", "listening")
        assert bound(GUEST_PORT) == [], "a guest without network is bound on the host"
    finally:
        vm_daemon.call("sandbox.stop", {"name": "net-none", "timeout": 5})
    assert "lo-probe:0" not in out and "host-says-hi" not in out, out
    assert host_tcp.accepted == 0
    assert "Network is unreachable" in out and "out-probe:0" not in out, out
    assert "nofile:77" in out, out
    no_unix_reached(out, paths, host_unix[0])
    assert vm_daemon.call("sandbox.get", {"name": "net-none"})["network"] == "none"


def test_published_ports_without_network_let_clients_in_and_nothing_out(
        vm_daemon: DaemonProc, probe_root: Path, host_tcp: HostListener,
        host_unix: tuple[socket.socket, str], free_tcp_port_factory: Callable[[], int]) -> None:
    paths = [host_unix[1], str(vm_daemon.socket)]
    published = free_tcp_port_factory()
    info = vm_daemon.call("sandbox.run", guest("net-ports", probe_root, script(
        paths, host_tcp.port, servers=[GUEST_PORT], ready=[GUEST_PORT]),
        ports=[{"host": published, "guest": GUEST_PORT}]))
    assert info["network"] == "none"
    try:
        out = until_logged(vm_daemon, "net-ports", "listening")
        assert talk(published).strip() == HELLO
        assert bound(published) == [f"127.0.0.1:{published}"]
        assert bound(GUEST_PORT) == []
    finally:
        vm_daemon.call("sandbox.stop", {"name": "net-ports", "timeout": 5})
    assert "lo-probe:0" not in out and "host-says-hi" not in out, out
    assert host_tcp.accepted == 0
    assert "out-probe:0" not in out, out
    no_unix_reached(out, paths, host_unix[0])
    assert bound(published) == [], "the port outlived its sandbox"


def test_egress_reaches_what_the_docs_say_and_no_unix_socket(
        vm_daemon: DaemonProc, probe_root: Path, host_tcp: HostListener,
        host_unix: tuple[socket.socket, str], free_tcp_port_factory: Callable[[], int]) -> None:
    paths = [host_unix[1], str(vm_daemon.socket)]
    published, unlisted = free_tcp_port_factory(), free_tcp_port_factory()
    vm_daemon.call("sandbox.run", guest("net-egress", probe_root, script(
        paths, host_tcp.port, servers=[GUEST_PORT, unlisted],
        ready=[published, unlisted]),
        network="egress", ports=[{"host": published, "guest": GUEST_PORT}]))
    try:
        out = until_logged(vm_daemon, "net-egress", "listening")
        assert talk(published).strip() == HELLO
        # docs/network.md: a listed port is renumbered, an unlisted one is bound as the
        # guest asked (all addresses), and the guest reaches the host's loopback.
        assert bound(GUEST_PORT) == []
        assert bound(published) and bound(unlisted), listening_ports()
    finally:
        vm_daemon.call("sandbox.stop", {"name": "net-egress", "timeout": 5})
    assert "host-says-hi" in out and "lo-probe:0" in out, out
    assert host_tcp.accepted == 1
    no_unix_reached(out, paths, host_unix[0])
