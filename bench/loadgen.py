"""A load-generating client process: one connection, sequential calls, latencies out.

    python -m bench.loadgen SOCKET line|http REQUEST_FILE WARMUP

It connects to SOCKET, sends the bytes of REQUEST_FILE (one complete request)
WARMUP times, prints `ready`, then reads `GO <deadline_ns>` from stdin and
repeats the call until CLOCK_MONOTONIC passes the deadline. It prints one
JSON object: latencies (ns) and when it started and stopped. Replies are
read, not parsed (framing only: a newline, or an HTTP/1.1 response with
Content-Length or chunked body), the same work for every server measured.

Several of these run at once for the concurrent figures: separate processes,
so the clients never share a GIL.
"""

from __future__ import annotations

import socket
import sys
import time
from collections.abc import Callable

import msgspec


def _line_call(sock: socket.socket, payload: bytes, buf: bytearray) -> None:
    sock.sendall(payload)
    while (nl := buf.find(b"\n")) < 0:
        chunk = sock.recv(262144)
        if not chunk:
            raise ConnectionError("closed")
        buf += chunk
    del buf[:nl + 1]


def _http_call(sock: socket.socket, payload: bytes, buf: bytearray) -> None:
    sock.sendall(payload)
    while (end := buf.find(b"\r\n\r\n")) < 0:
        chunk = sock.recv(262144)
        if not chunk:
            raise ConnectionError("closed")
        buf += chunk
    head = bytes(buf[:end]).lower()
    del buf[:end + 4]
    if b"content-length:" in head:
        length = int(head.split(b"content-length:")[1].split(b"\r\n")[0])
        while len(buf) < length:
            buf += sock.recv(262144)
        del buf[:length]
        return
    while True:  # chunked
        while (nl := buf.find(b"\r\n")) < 0:
            buf += sock.recv(262144)
        size = int(bytes(buf[:nl]).split(b";")[0], 16)
        while len(buf) < nl + 2 + size + 2:
            buf += sock.recv(262144)
        del buf[:nl + 2 + size + 2]
        if size == 0:
            return


def http_request(body: bytes) -> bytes:
    """An HTTP/1.1 keep-alive POST of an XML-RPC body, as supervisorctl sends it."""
    return (b"POST /RPC2 HTTP/1.1\r\nHost: localhost\r\nContent-Type: text/xml\r\n"
            b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)


def main(argv: list[str]) -> int:
    path, kind, request_file, warmup = argv[0], argv[1], argv[2], int(argv[3])
    with open(request_file, "rb") as f:
        payload = f.read()
    call: Callable[[socket.socket, bytes, bytearray], None] = (
        _line_call if kind == "line" else _http_call)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(path)
    buf = bytearray()
    for _ in range(warmup):
        call(sock, payload, buf)
    print("ready", flush=True)
    deadline = int(sys.stdin.readline().split()[1])
    latencies: list[int] = []
    clock = time.monotonic_ns
    start = now = clock()
    while now < deadline:
        call(sock, payload, buf)
        end = clock()
        latencies.append(end - now)
        now = end
    sys.stdout.write(msgspec.json.encode(
        {"latencies": latencies, "start": start, "end": now}).decode() + "\n")
    sock.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
