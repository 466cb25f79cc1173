"""An SMTP sink for tests/it/alerts.rs: aiosmtpd on 127.0.0.1:<port> with STARTTLS required
(the given certificate) and AUTH required (user "alerts", password "s3cret"), writing each
received message, parsed, as one JSON file in <out_dir>. Prints "ready" once listening."""

import email
import email.policy
import json
import os
import ssl
import sys
import time

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword

out_dir, port, cert, key = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]


class Handler:
    async def handle_DATA(self, server, session, envelope):
        message = email.message_from_bytes(envelope.original_content or envelope.content,
                                           policy=email.policy.default)
        parts = [{"type": p.get_content_type(), "body": p.get_content()}
                 for p in message.walk() if not p.is_multipart()]
        record = {
            "mail_from": envelope.mail_from,
            "rcpt_tos": envelope.rcpt_tos,
            "authenticated": bool(session.authenticated),
            "subject": str(message["Subject"]),
            "from": str(message["From"]),
            "to": str(message["To"]),
            "message_id": str(message["Message-ID"]),
            "content_type": message.get_content_type(),
            "parts": parts,
        }
        name = os.path.join(out_dir, "%06d-%d.json" % (len(os.listdir(out_dir)), os.getpid()))
        with open(name + ".tmp", "w") as f:
            json.dump(record, f)
        os.rename(name + ".tmp", name)
        return "250 OK"


def authenticator(server, session, envelope, mechanism, auth_data):
    ok = (isinstance(auth_data, LoginPassword) and auth_data.login == b"alerts"
          and auth_data.password == b"s3cret")
    return AuthResult(success=ok, handled=False)


context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
context.load_cert_chain(cert, key)
controller = Controller(Handler(), hostname="127.0.0.1", port=port, tls_context=context,
                        require_starttls=True, authenticator=authenticator, auth_required=True,
                        auth_require_tls=True, ready_timeout=60)
controller.start()
print("ready", flush=True)
while True:
    time.sleep(3600)
