#!/usr/bin/env python3
"""Opens N SMTP connections, reads each greeting, sends EHLO and reads the
reply, then prints "ready" and holds them all open until stdin closes.
With --tls, each connection is implicit TLS (port 465 style; the
certificate is not checked). Used by idle-memory.sh and handshake.sh; needs
nothing outside Python's standard library."""
import socket
import ssl
import sys


def read_reply(f):
    while True:
        line = f.readline()
        if not line:
            raise SystemExit("connection closed")
        if line[3:4] != b"-":
            return line


def main():
    args = [a for a in sys.argv[1:] if a != "--tls"]
    tls = "--tls" in sys.argv[1:]
    host, port, n = args[0], int(args[1]), int(args[2])
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    conns = []
    for i in range(n):
        s = socket.create_connection((host, port))
        if tls:
            s = ctx.wrap_socket(s, server_hostname="bench.example.test")
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
