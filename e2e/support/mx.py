#!/usr/bin/python3
"""An independent SMTP/LMTP server for tambo's end-to-end tests.

Built on aiosmtpd (Debian package python3-aiosmtpd), so what tambo's
deliverd talks to is somebody else's implementation of the protocol. The
Rust wrapper is e2e/src/pymx.rs; run `mx.py --help` for the options.

Every accepted message is written to --maildir as one file (written under a
temporary name, then renamed): a JSON line with the envelope and session
facts, then the raw message bytes as received (CRLF, dot-unstuffed).

Logs go to stderr (the wrapper points it at a file). When the socket
listens, it prints "mx.py listening on HOST:PORT".
"""

import argparse
import asyncio
import json
import logging
import os
import sys
import time

try:
    from aiosmtpd.lmtp import LMTP
    from aiosmtpd.smtp import SMTP
except ImportError:
    sys.stderr.write(
        "mx.py needs aiosmtpd: apt-get install python3-aiosmtpd "
        "(scripts/test.sh installs it)\n"
    )
    sys.exit(3)

import ssl

COUNTER = 0


def parse_listen(s):
    host, _, port = s.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port)


def parse_reply(s):
    code, _, text = s.strip().partition(" ")
    if len(code) != 3 or not code.isdigit():
        raise argparse.ArgumentTypeError(f"a reply is 'CODE TEXT', not {s!r}")
    return f"{code} {text}".rstrip()


def parse_addr_reply(s):
    addr, eq, reply = s.partition("=")
    if not eq:
        raise argparse.ArgumentTypeError(f"expected ADDR=CODE TEXT, not {s!r}")
    return addr.strip().lower(), parse_reply(reply)


def lookup(table, addr):
    """The fixed reply for addr (case-insensitive), or for '*', or None."""
    return table.get(addr.lower(), table.get("*"))


def tls_facts(server):
    obj = server.transport.get_extra_info("ssl_object") if server.transport else None
    if obj is None:
        return False, None, None
    cipher = obj.cipher()
    return True, obj.version(), cipher[0] if cipher else None


class Handler:
    def __init__(self, args):
        self.args = args
        self.rcpt_replies = dict(args.rcpt_reply)
        self.rcpt_data_replies = dict(args.rcpt_data_reply)

    async def handle_EHLO(self, server, session, envelope, hostname, responses):
        session.host_name = hostname
        # A plain MX: no AUTH on offer.
        out = [r for r in responses if not r[4:].upper().startswith("AUTH")]
        return out

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        fixed = lookup(self.rcpt_replies, address)
        if fixed is not None and not fixed.startswith("2"):
            return fixed
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return fixed or "250 2.1.5 OK"

    def write(self, server, session, envelope, rcpt_tos):
        global COUNTER
        COUNTER += 1
        tls, version, cipher = tls_facts(server)
        header = {
            "mail_from": envelope.mail_from,
            "mail_options": envelope.mail_options,
            "rcpt_tos": rcpt_tos,
            "rcpt_options": envelope.rcpt_options,
            "helo": session.host_name,
            "tls": tls,
            "tls_version": version,
            "tls_cipher": cipher,
            "peer": "%s:%s" % tuple(session.peer[:2]) if session.peer else None,
            "lmtp": self.args.lmtp,
        }
        name = "%020d-%06d-%d" % (time.time_ns(), COUNTER, os.getpid())
        tmp = os.path.join(self.args.maildir, "." + name + ".tmp")
        with open(tmp, "wb") as f:
            f.write(json.dumps(header).encode() + b"\n")
            f.write(envelope.original_content or b"")
            f.flush()
            os.fsync(f.fileno())
        os.rename(tmp, os.path.join(self.args.maildir, name + ".msg"))
        logging.info("stored %s for %s", name, rcpt_tos)

    async def handle_DATA(self, server, session, envelope):
        if self.args.hang_after_dot:
            if self.args.maildir:
                self.write(server, session, envelope, list(envelope.rcpt_tos))
            logging.info("hanging after the final dot")
            await asyncio.Event().wait()
        default = self.args.data_reply or "250 2.0.0 OK"
        if self.args.lmtp:
            replies, accepted = [], []
            for rcpt in envelope.rcpt_tos:
                r = lookup(self.rcpt_data_replies, rcpt) or default
                replies.append(r)
                if r.startswith("2"):
                    accepted.append(rcpt)
            if accepted and self.args.maildir:
                self.write(server, session, envelope, accepted)
            # aiosmtpd's push() adds the final CRLF: one reply per
            # recipient, in RCPT order (RFC 2033 §4.2).
            return "\r\n".join(replies)
        if default.startswith("2") and self.args.maildir:
            self.write(server, session, envelope, list(envelope.rcpt_tos))
        return default


async def hang():
    logging.info("hanging after EHLO")
    await asyncio.Event().wait()


def server_class(args):
    base = LMTP if args.lmtp else SMTP

    class Server(base):
        async def push(self, status):
            # aiosmtpd logs commands at INFO but replies only at DEBUG.
            peer = self.session.peer if self.session else None
            logging.info("%r << %r", peer, status)
            await super().push(status)

        async def smtp_EHLO(self, arg):
            await super().smtp_EHLO(arg)
            if args.hang_after_ehlo and not args.lmtp:
                await hang()

        async def smtp_HELO(self, arg):
            await super().smtp_HELO(arg)
            if args.hang_after_ehlo and not args.lmtp:
                await hang()

        if args.lmtp:

            async def smtp_LHLO(self, arg):
                await super().smtp_LHLO(arg)
                if args.hang_after_ehlo:
                    await hang()

    return Server


async def main(args):
    ctx = None
    if args.tls_cert:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(args.tls_cert, args.tls_key)
    handler = Handler(args)
    cls = server_class(args)
    host, port = parse_listen(args.listen)
    loop = asyncio.get_running_loop()

    def factory():
        return cls(
            handler,
            hostname=args.hostname,
            ident="mx.py",
            tls_context=ctx,
            require_starttls=False,
            decode_data=False,
            enable_SMTPUTF8=not args.no_smtputf8,
            data_size_limit=args.size,
            timeout=args.timeout,
            loop=loop,
        )

    server = await loop.create_server(factory, host, port)
    sock = server.sockets[0].getsockname()
    shown = f"[{sock[0]}]" if ":" in sock[0] else sock[0]
    print(f"mx.py listening on {shown}:{sock[1]}", file=sys.stderr, flush=True)
    async with server:
        await server.serve_forever()


def cli():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--listen", required=True, help="HOST:PORT ([::1]:PORT); port 0: any")
    p.add_argument("--hostname", default="mx.test", help="the name in the greeting and EHLO")
    p.add_argument("--tls-cert", help="certificate chain (PEM): offer STARTTLS")
    p.add_argument("--tls-key", help="its private key (PEM)")
    p.add_argument("--lmtp", action="store_true", help="LMTP: LHLO, one reply per recipient after DATA")
    p.add_argument(
        "--rcpt-reply",
        action="append",
        default=[],
        type=parse_addr_reply,
        metavar="ADDR=CODE TEXT",
        help="fixed RCPT reply for ADDR ('*': any other); a 2xx one accepts",
    )
    p.add_argument(
        "--rcpt-data-reply",
        action="append",
        default=[],
        type=parse_addr_reply,
        metavar="ADDR=CODE TEXT",
        help="LMTP: the reply after DATA for ADDR ('*': any other)",
    )
    p.add_argument(
        "--data-reply",
        type=parse_reply,
        metavar="CODE TEXT",
        help="the reply after DATA (LMTP: for each recipient without --rcpt-data-reply)",
    )
    p.add_argument("--hang-after-ehlo", action="store_true", help="answer EHLO/LHLO, then nothing more")
    p.add_argument("--hang-after-dot", action="store_true", help="store the message, never answer its final dot")
    p.add_argument("--no-smtputf8", action="store_true", help="do not offer SMTPUTF8")
    p.add_argument("--size", type=int, default=33554432, help="the SIZE limit offered")
    p.add_argument("--timeout", type=float, default=300, help="idle timeout of a session, seconds")
    p.add_argument("--maildir", help="store each accepted message here")
    args = p.parse_args()
    if bool(args.tls_cert) != bool(args.tls_key):
        p.error("--tls-cert and --tls-key go together")
    if args.maildir:
        os.makedirs(args.maildir, exist_ok=True)
    return args


if __name__ == "__main__":
    logging.basicConfig(
        stream=sys.stderr,
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        asyncio.run(main(cli()))
    except KeyboardInterrupt:
        pass
