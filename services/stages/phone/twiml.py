"""What a Twilio number's voice webhook is answered with, and how its request is known to be Twilio's.

`connect_stream`: `<Connect><Stream url="wss://…">` with `<Parameter>`s, which reach the stream's
`start` message as customParameters (Twilio drops a query string from a Stream url: a per-call secret
travels as a Parameter). `busy`: `<Say>` then `<Hangup>`, a clear answer instead of a ringing line.

`signature`: Twilio signs each webhook request with HMAC-SHA1 under the account's auth token, over
the full URL followed by every POST parameter's name and value, sorted by name, base64 in
`X-Twilio-Signature` (Twilio's "Webhooks security"; twilio-python's RequestValidator does the same).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from xml.sax.saxutils import escape, quoteattr

SIGNATURE_HEADER = "X-Twilio-Signature"
CONTENT_TYPE = "text/xml"


def connect_stream(url: str, parameters: dict[str, str] | None = None) -> str:
    params = "".join(f"<Parameter name={quoteattr(name)} value={quoteattr(value)}/>"
                     for name, value in (parameters or {}).items())
    return (f'<?xml version="1.0" encoding="UTF-8"?><Response><Connect><Stream url={quoteattr(url)}>{params}'
            "</Stream></Connect></Response>")


def busy(message: str) -> str:
    return f'<?xml version="1.0" encoding="UTF-8"?><Response><Say>{escape(message)}</Say><Hangup/></Response>'


def signature(auth_token: str, url: str, params: dict[str, str]) -> str:
    signed = url + "".join(f"{name}{params[name]}" for name in sorted(params))
    return base64.b64encode(hmac.new(auth_token.encode(), signed.encode(), hashlib.sha1).digest()).decode()


def signature_ok(auth_token: str, url: str, params: dict[str, str], received: str) -> bool:
    return hmac.compare_digest(signature(auth_token, url, params).encode(), received.encode())
