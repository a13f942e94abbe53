#!/usr/bin/env python3
"""Opens N SMTP connections, reads each greeting, sends EHLO and reads the
reply, then prints "ready" and holds them all open until stdin closes.
Used by idle-memory.sh; needs nothing outside Python's standard library."""
import socket
import sys


def read_reply(f):
    while True:
        line = f.readline()
        if not line:
            raise SystemExit("connection closed")
        if line[3:4] != b"-":
            return line


def main():
    host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    conns = []
    for i in range(n):
        s = socket.create_connection((host, port))
        f = s.makefile("rb")
        greeting = read_reply(f)
        if not greeting.startswith(b"220"):
            raise SystemExit(f"connection {i}: greeting {greeting!r}")
        s.sendall(b"EHLO idle.example\r\n")
        reply = read_reply(f)
        if not reply.startswith(b"250"):
            raise SystemExit(f"connection {i}: EHLO got {reply!r}")
        conns.append((s, f))
    print("ready", flush=True)
    sys.stdin.read()


if __name__ == "__main__":
    main()
