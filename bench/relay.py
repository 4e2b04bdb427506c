"""The published-port relay against a direct connection: what a client pays for the way in.

A sandbox with network `none` and published ports is reached through the
worker's relay (msbd/vm/portrelay.py): one accept and one connect per
client connection, two copying threads. This measures it in process, in the
current network namespace (the worker runs the same code in the VM's own),
against the floor: the same echo server reached directly.

- connect + one 64-byte round trip, sequential, p50 and p99;
- bulk throughput, 64 MiB one way and back;
- 32 clients at once, each doing round trips.

`python -m bench.run --only relay`; the figures go to BENCHMARKS.md.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable

from bench.common import Report, Summary
from msbd.network import PortMap
from msbd.vm.portrelay import Relay

PAYLOAD = b"x" * 64
CHUNK = 1 << 16


def _echo_server() -> socket.socket:
    """An echo server on 127.0.0.1 (one thread per connection): the guest's stand-in."""
    server = socket.create_server(("127.0.0.1", 0), backlog=256)

    def serve(conn: socket.socket) -> None:
        with conn:
            while data := conn.recv(CHUNK):
                conn.sendall(data)

    def accept() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    return server


def _round_trip(port: int) -> float:
    t0 = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port)) as c:
        c.sendall(PAYLOAD)
        got = b""
        while len(got) < len(PAYLOAD):
            got += c.recv(CHUNK)
    return time.perf_counter() - t0


def _bulk(port: int, size: int) -> float:
    """Seconds to send `size` bytes and read them all back."""
    block = b"y" * CHUNK
    t0 = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port)) as c:
        def send() -> None:
            for _ in range(size // CHUNK):
                c.sendall(block)
            c.shutdown(socket.SHUT_WR)
        sender = threading.Thread(target=send)
        sender.start()
        seen = 0
        while data := c.recv(CHUNK):
            seen += len(data)
        sender.join()
    assert seen == size, (seen, size)
    return time.perf_counter() - t0


def _concurrent(port: int, clients: int, each: int) -> float:
    """Round trips per second with `clients` at once, `each` connections apiece."""
    def client() -> None:
        for _ in range(each):
            _round_trip(port)
    threads = [threading.Thread(target=client) for _ in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return clients * each / (time.perf_counter() - t0)


def _samples(fn: Callable[[], float], count: int) -> Summary:
    return Summary.of([fn() for _ in range(count)])


def run(*, count: int = 2000, bulk_mib: int = 64, clients: int = 32, each: int = 50) -> None:
    report = Report("relay: a published port without network, against a direct connection")
    server = _echo_server()
    inner = server.getsockname()[1]
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        outer = probe.getsockname()[1]
    relay = Relay.create([PortMap(host=outer, guest=inner)])
    relay.bind()
    relay.serve_in_background()
    try:
        for port in (inner, outer):  # warm both paths
            _samples(lambda p=port: _round_trip(p), 50)
        direct = _samples(lambda: _round_trip(inner), count)
        relayed = _samples(lambda: _round_trip(outer), count)
        report.latency("connect_round_trip.direct", direct)
        report.latency("connect_round_trip.relay", relayed)
        report.ratio("connect_round_trip_p50.relay_vs_direct", relayed.p50, direct.p50)
        size = bulk_mib << 20
        direct_s, relay_s = _bulk(inner, size), _bulk(outer, size)
        report.figure("bulk.direct", size / direct_s / 2**20, "MiB/s")
        report.figure("bulk.relay", size / relay_s / 2**20, "MiB/s")
        report.ratio("bulk_throughput.relay_vs_direct", direct_s, relay_s)
        direct_rate = _concurrent(inner, clients, each)
        relay_rate = _concurrent(outer, clients, each)
        report.figure(f"concurrent_{clients}.direct", direct_rate, "conn/s")
        report.figure(f"concurrent_{clients}.relay", relay_rate, "conn/s")
        report.ratio(f"concurrent_{clients}.relay_vs_direct", relay_rate, direct_rate)
    finally:
        relay.close()
        server.close()
