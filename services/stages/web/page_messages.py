"""What the page may say on the data channel, as one pydantic model: anything else is refused and counted.

Numbers must be finite and in range (`Infinity` or `NaN` in a stats report once ended a web stage at its
next reply), strings bounded, types known; a refused message never reaches the stage's state (the web
stage counts it and logs it through common.log's RateLimitedLog: a flood is not a flood of lines).
"""

from __future__ import annotations

import json
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

MAX_MESSAGE_CHARS = 4096
MAX_DELAY_MS = 60_000.0  # a browser's jitter buffer, output latency or round trip beyond a minute is nonsense

DelayMs = Annotated[float, Field(ge=0.0, le=MAX_DELAY_MS, allow_inf_nan=False, strict=True)]


class Stats(BaseModel):
    """The page's own playout, every half second (getStats + AudioContext)."""

    model_config = ConfigDict(extra="ignore")
    type: Literal["stats"]
    jitter_buffer_ms: DelayMs = 0.0
    output_latency_ms: DelayMs = 0.0
    rtt_ms: DelayMs = 0.0


class HangUp(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["hangup"]


PAGE_MESSAGE = TypeAdapter(Annotated[Stats | HangUp, Field(discriminator="type")])


class BadPageMessage(ValueError):
    pass


def parse(text: object) -> Stats | HangUp:
    if not isinstance(text, str):
        raise BadPageMessage(f"a {type(text).__name__} message (only JSON text is spoken here)")
    if len(text) > MAX_MESSAGE_CHARS:
        raise BadPageMessage(f"{len(text)} characters (at most {MAX_MESSAGE_CHARS})")
    try:
        return PAGE_MESSAGE.validate_python(json.loads(text))
    except (ValueError, RecursionError) as exc:
        if isinstance(exc, ValidationError):
            first = exc.errors()[0]
            raise BadPageMessage(f"{'.'.join(map(str, first['loc'])) or 'message'}: {first['msg']}") from None
        raise BadPageMessage(f"not JSON ({type(exc).__name__})") from None
