#!/usr/bin/env python3
"""Drives N WebSocket echo round trips through ADDR over C connections, shaped like the
bench's echo scenarios: each connection upgrades once (checking the 101 and its
Sec-WebSocket-Accept, as drive.py does), then sends one masked SIZE-byte binary frame at
a time and waits for its whole echo; then it closes. Bounded: every socket has a 10 s
timeout.

usage: drive_echo.py HOST:PORT N C SIZE
"""
import os
import sys
import threading

from drive import upgrade


def frame(payload):
    """A masked binary frame (client to server)."""
    mask = os.urandom(4)
    n = len(payload)
    if n < 126:
        head = bytes([0x82, 0x80 | n])
    elif n < 65536:
        head = bytes([0x82, 0x80 | 126]) + n.to_bytes(2, "big")
    else:
        head = bytes([0x82, 0x80 | 127]) + n.to_bytes(8, "big")
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def echoes(host, port, rounds, size):
    s, rest = upgrade(host, port)
    payload = os.urandom(size)
    msg = frame(payload)
    # The echo backend answers unmasked: header (2, 4 or 10 bytes) + payload.
    expect = 2 + (2 if size >= 126 else 0) + (6 if size >= 65536 else 0) + size
    got = rest
    for _ in range(rounds):
        s.sendall(msg)
        while len(got) < expect:
            chunk = s.recv(65536)
            if not chunk:
                raise RuntimeError("closed mid-echo")
            got += chunk
        if got[expect - size : expect] != payload:
            raise RuntimeError("echo differs")
        got = got[expect:]
    s.close()


def main():
    host, port = sys.argv[1].rsplit(":", 1)
    port, n, c, size = int(port), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    errors = []

    def worker(rounds):
        try:
            echoes(host, port, rounds, size)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(n // c,)) for _ in range(c)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        sys.exit(f"drive_echo.py: {errors[0]}")


if __name__ == "__main__":
    main()
