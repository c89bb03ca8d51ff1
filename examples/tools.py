"""Example tools for voicebus (`voicebus tools --module examples/tools.py`): offline, quick, typed.

Any module like this one works: each public function with type hints and a docstring becomes a
tool the model can call; the JSON schema comes from the signature.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import Field

UNITS = {  # to the base unit of each dimension
    "m": ("length", 1.0), "km": ("length", 1000.0), "mi": ("length", 1609.344), "ft": ("length", 0.3048),
    "kg": ("mass", 1.0), "lb": ("mass", 0.45359237), "g": ("mass", 0.001),
    "l": ("volume", 1.0), "gal": ("volume", 3.785411784),
}


def get_current_time(timezone: Annotated[str, Field(description="IANA timezone, e.g. Asia/Tokyo")] = "UTC") -> dict:
    """The current time in a timezone."""
    try:
        now = datetime.now(ZoneInfo(timezone))
    except ZoneInfoNotFoundError as exc:
        raise ValueError(f"unknown timezone {timezone!r}") from exc
    return {"timezone": timezone, "datetime": now.isoformat(timespec="seconds"), "day_of_week": now.strftime("%A")}


def convert_units(value: float, from_unit: Literal["m", "km", "mi", "ft", "kg", "lb", "g", "l", "gal"],
                  to_unit: Literal["m", "km", "mi", "ft", "kg", "lb", "g", "l", "gal"]) -> dict:
    """Convert a quantity between units of length, mass or volume."""
    (kind_from, scale_from), (kind_to, scale_to) = UNITS[from_unit], UNITS[to_unit]
    if kind_from != kind_to:
        raise ValueError(f"cannot convert {kind_from} ({from_unit}) to {kind_to} ({to_unit})")
    return {"value": round(value * scale_from / scale_to, 6), "unit": to_unit}
