"""One SMTP session, N messages, each step timed from the client's side.

Usage: latency.py PORT N. Prints, per step, the median and 90th
percentile in microseconds: MAIL, RCPT and DATA (each one round trip to
the server), the end of the data (the body sent, until the 250), and the
whole transaction. Standard library only.
"""

import socket
import statistics
import sys
import time


def main():
    port, n = int(sys.argv[1]), int(sys.argv[2])
    s = socket.create_connection(("127.0.0.1", port))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    f = s.makefile("rb")

    def reply():
        while True:
            line = f.readline()
            if line[3:4] != b"-":
                return line

    reply()
    s.sendall(b"EHLO latency.example\r\n")
    reply()
    body = b"Subject: latency\r\n\r\n" + (b"x" * 70 + b"\r\n") * 14 + b".\r\n"
    steps = {k: [] for k in ("MAIL", "RCPT", "DATA", "end of data", "whole")}
    for _ in range(n):
        t0 = time.perf_counter()
        s.sendall(b"MAIL FROM:<>\r\n")
        reply()
        t1 = time.perf_counter()
        s.sendall(b"RCPT TO:<ann@example.test>\r\n")
        reply()
        t2 = time.perf_counter()
        s.sendall(b"DATA\r\n")
        reply()
        t3 = time.perf_counter()
        s.sendall(body)
        r = reply()
        t4 = time.perf_counter()
        if not r.startswith(b"250"):
            sys.exit(f"not accepted: {r!r}")
        for k, a, b in (("MAIL", t0, t1), ("RCPT", t1, t2), ("DATA", t2, t3),
                        ("end of data", t3, t4), ("whole", t0, t4)):
            steps[k].append((b - a) * 1e6)
    for k, v in steps.items():
        v.sort()
        print(f"{k:12s} median {statistics.median(v):6.0f} µs   p90 {v[int(len(v) * 0.9)]:6.0f} µs")


main()
