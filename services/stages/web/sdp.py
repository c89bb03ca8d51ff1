"""A browser's offer, checked before anything is spent on it: parsed JSON, then the SDP's own shape.

An offer that cannot work is refused with one line (400) by the front door before it takes a stage set,
and by the web stage before it touches its caller slot: text that is not JSON (or nests past Python's
recursion limit), no audio m-line, an audio section that does not send (recvonly/inactive: there would
be no microphone), or no ICE credentials or DTLS fingerprint (WebRTC cannot connect without them).
"""

from __future__ import annotations

import json
import re
from typing import Any

MAX_SDP_CHARS = 64 * 1024
SENDING = ("sendrecv", "sendonly")


class OfferError(ValueError):
    """Why an offer is refused, in one line for the caller."""


def parse_offer(raw: bytes) -> dict[str, Any]:
    """The request body as an offer `{"type": "offer", "sdp": ...}` with a usable SDP, or OfferError."""
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise OfferError(f"not JSON ({type(exc).__name__})") from None
    if not isinstance(body, dict) or body.get("type") != "offer" or not isinstance(body.get("sdp"), str):
        raise OfferError('expected JSON {"type": "offer", "sdp": "..."}')
    check_sdp(body["sdp"])
    return body


def check_sdp(sdp: str) -> None:
    if len(sdp) > MAX_SDP_CHARS:
        raise OfferError(f"the SDP is {len(sdp)} characters (at most {MAX_SDP_CHARS})")
    lines = [line.strip() for line in sdp.replace("\r\n", "\n").split("\n") if line.strip()]
    if not lines or lines[0] != "v=0":
        raise OfferError("the SDP does not start with v=0")
    sections: list[list[str]] = [[]]
    for line in lines:
        if line.startswith("m="):
            sections.append([])
        sections[-1].append(line)
    session, media = sections[0], sections[1:]
    audio = [section for section in media if section[0].startswith("m=audio ")]
    if not audio:
        raise OfferError("the offer has no audio section (m=audio)")
    for section in audio:
        direction = next((line[2:] for line in section if re.fullmatch(r"a=(sendrecv|sendonly|recvonly|inactive)",
                                                                       line)), None) or \
            next((line[2:] for line in session if re.fullmatch(r"a=(sendrecv|sendonly|recvonly|inactive)", line)),
                 "sendrecv")
        if direction not in SENDING:
            raise OfferError(f"the audio section is {direction}: a call needs the browser's microphone "
                             "(sendrecv or sendonly)")
        attributes = session + section
        for needed, what in (("a=ice-ufrag:", "ICE username"), ("a=ice-pwd:", "ICE password"),
                             ("a=fingerprint:", "DTLS fingerprint")):
            if not any(line.startswith(needed) for line in attributes):
                raise OfferError(f"the offer has no {what} ({needed[:-1]})")
