"""A real SMTP server for keygate's tests: accepts every message and writes it to a directory.

Usage: smtp_sink.py DIR  -- prints "PORT <n>" once listening on 127.0.0.1 (a free port).
Each accepted message becomes DIR/<n>.eml (written to a temporary name, then renamed).
Recipients whose address starts with "refused" are refused (550), as for an unknown mailbox,
"full" or "overquota" as for a full mailbox (452 4.2.2, 552 5.2.2);
with SMTP_REFUSE_SENDER set every sender is (550). Recipients whose address starts with
"slow" are answered after SMTP_SLOW_SECONDS (default 3), as by a relay that looks them up.
With SMTP_SLOW_DATA_SECONDS set, a message is stored and then answered after that many
seconds, as by a relay that scans it before answering the end of DATA.

Environment: SMTP_PORT (default 0: any free port); SMTP_TLS_CERT and SMTP_TLS_KEY (PEM files)
turn on STARTTLS, required before anything else, or implicit TLS with SMTP_IMPLICIT=1;
SMTP_USER and SMTP_PASS require AUTH with that user and password, each attempt logged as a
line of DIR/auth.log; SMTP_AUTH_ONLY=LOGIN offers LOGIN alone (as Exchange does).
"""
import asyncio
import os
import ssl
import sys

from aiosmtpd.smtp import SMTP, AuthResult


class Sink:
    def __init__(self, directory):
        self.directory = directory
        self.count = 0

    async def handle_MAIL(self, server, session, envelope, address, mail_options):
        # As a relay does for a sender it does not let this login send as.
        if os.environ.get("SMTP_REFUSE_SENDER"):
            return "550 5.7.1 Sender not allowed"
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 OK"

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        # As a LAN relay does for an unknown mailbox.
        if address.startswith("refused"):
            return "550 5.1.1 No such user here"
        # A mailbox full: for a while (452), or for good (552).
        if address.startswith("full"):
            return "452 4.2.2 Mailbox full, try again later"
        if address.startswith("overquota"):
            return "552 5.2.2 Mailbox over quota"
        if address.startswith("slow"):
            await asyncio.sleep(float(os.environ.get("SMTP_SLOW_SECONDS", "3")))
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):
        self.count += 1
        path = os.path.join(self.directory, "%04d.eml" % self.count)
        with open(path + ".tmp", "wb") as f:
            f.write(b"X-Rcpt-To: " + ", ".join(envelope.rcpt_tos).encode() + b"\r\n")
            f.write(envelope.content)
        os.rename(path + ".tmp", path)
        await asyncio.sleep(float(os.environ.get("SMTP_SLOW_DATA_SECONDS", "0")))
        return "250 Message accepted for delivery"


async def main(directory):
    os.makedirs(directory, exist_ok=True)
    loop = asyncio.get_running_loop()
    handler = Sink(directory)
    options, context = {}, None
    if os.environ.get("SMTP_TLS_CERT"):
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(os.environ["SMTP_TLS_CERT"], os.environ["SMTP_TLS_KEY"])
        if not os.environ.get("SMTP_IMPLICIT"):
            options.update(tls_context=context, require_starttls=True)
    if os.environ.get("SMTP_USER"):
        user, password = os.environ["SMTP_USER"].encode(), os.environ["SMTP_PASS"].encode()

        def authenticate(server, session, envelope, mechanism, auth_data):
            ok = auth_data.login == user and auth_data.password == password
            with open(os.path.join(directory, "auth.log"), "a") as log:
                log.write("%s %s\n" % (mechanism, "ok" if ok else "refused"))
            # handled=False: aiosmtpd answers a refusal itself (535); with its default it
            # would send nothing and the client would wait for its timeout.
            return AuthResult(success=ok, handled=False)

        # With implicit TLS the socket is encrypted before aiosmtpd sees it: it cannot tell, so
        # it is told not to insist.
        starttls = context is not None and not os.environ.get("SMTP_IMPLICIT")
        options.update(authenticator=authenticate, auth_required=True, auth_require_tls=starttls)
        if os.environ.get("SMTP_AUTH_ONLY") == "LOGIN":
            options.update(auth_exclude_mechanism=["PLAIN"])
    implicit = context if os.environ.get("SMTP_IMPLICIT") else None
    server = await loop.create_server(
        lambda: SMTP(handler, **options), host="127.0.0.1", port=int(os.environ.get("SMTP_PORT", "0")), ssl=implicit
    )
    print("PORT %d" % server.sockets[0].getsockname()[1], flush=True)
    await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
