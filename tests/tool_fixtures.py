"""Tools that misbehave on purpose, for the tools stage's tests."""

from __future__ import annotations

import asyncio
import time


def echo(text: str, times: int = 1) -> str:
    """Say the text back."""
    return " ".join([text] * times)


async def async_echo(text: str) -> dict:
    """Say the text back, asynchronously."""
    await asyncio.sleep(0)
    return {"echo": text}


def explode(reason: str = "boom") -> str:
    """Always raises."""
    raise RuntimeError(reason)


def hang(seconds: float = 60.0) -> str:
    """Sleeps longer than any timeout."""
    time.sleep(seconds)
    return "woke up"


def big(size: int) -> str:
    """Returns a very long output."""
    return "x" * size


def noop() -> str:
    """Does nothing, quickly (for round-trip benchmarks)."""
    return "ok"
