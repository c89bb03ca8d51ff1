"""The example tools with a broken clock: `get_current_time` raises. Run tools.yaml with it to see an
eval fail and name the expectation (`voicebus eval examples/evals/tools.yaml --tools examples/evals/broken_tools.py`)."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field


def get_current_time(timezone: Annotated[str, Field(description="IANA timezone, e.g. Asia/Tokyo")] = "UTC") -> dict:
    """The current time in a timezone."""
    raise RuntimeError("the clock is broken")
