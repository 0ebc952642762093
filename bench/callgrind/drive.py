#!/usr/bin/env python3
"""Drives N WebSocket upgrades through ADDR, C at a time, shaped like the bench's handshake
scenario: upgrade (checking 101 and Sec-WebSocket-Accept), masked close frame, wait for the
echoed close, wait for the server's FIN. Bounded: every socket has a 10 s timeout.

usage: drive.py HOST:PORT N C
"""
import base64
import hashlib
import os
import socket
import sys
import threading

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


def upgrade(host, port):
    """An upgraded connection, and the bytes read past the 101."""
    key = base64.b64encode(os.urandom(16))
    expect = base64.b64encode(hashlib.sha1(key + GUID).digest())
    s = socket.create_connection((host, port), timeout=10)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    s.sendall(
        b"GET / HTTP/1.1\r\nHost: %s:%d\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\n\r\n"
        % (host.encode(), port, key)
    )
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = s.recv(4096)
        if not chunk:
            raise RuntimeError("closed before the 101")
        head += chunk
    head, rest = head.split(b"\r\n\r\n", 1)
    lines = head.split(b"\r\n")
    if not lines[0].startswith(b"HTTP/1.1 101"):
        raise RuntimeError(lines[0])
    accept = [l.split(b":", 1)[1].strip() for l in lines[1:] if l.lower().startswith(b"sec-websocket-accept:")]
    if accept != [expect]:
        raise RuntimeError("bad Sec-WebSocket-Accept")
    return s, rest


def one(host, port):
    s, rest = upgrade(host, port)
    # Close frame, masked, payload 1000 (normal closure).
    mask = os.urandom(4)
    payload = bytes(b ^ mask[i % 4] for i, b in enumerate(b"\x03\xe8"))
    s.sendall(b"\x88\x82" + mask + payload)
    got = rest
    while len(got) < 4:
        chunk = s.recv(4096)
        if not chunk:
            break
        got += chunk
    if got[:1] != b"\x88":
        raise RuntimeError("no echoed close")
    while s.recv(4096):
        pass
    s.close()


def main():
    host, port = sys.argv[1].rsplit(":", 1)
    port, n, c = int(port), int(sys.argv[2]), int(sys.argv[3])
    lock = threading.Lock()
    left = [n]
    errors = []

    def worker():
        while True:
            with lock:
                if left[0] == 0 or errors:
                    return
                left[0] -= 1
            try:
                one(host, port)
            except Exception as e:  # noqa: BLE001 - reported below
                errors.append(e)
                return

    threads = [threading.Thread(target=worker) for _ in range(c)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        sys.exit(f"drive.py: {errors[0]}")


if __name__ == "__main__":
    main()
