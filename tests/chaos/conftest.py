"""Chaos cases record what they tried and what survived; scripts/chaos_report.py prints the table."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest


@pytest.fixture
def chaos_record(request):
    """record(case=..., tried=N, survived=N, lost=N, **figures) -> one JSON line in $VOICEBUS_CHAOS_REPORT."""
    path = os.environ.get("VOICEBUS_CHAOS_REPORT")

    def record(**row) -> None:
        row.setdefault("test", request.node.name)
        if path:
            with open(Path(path), "a") as f:
                f.write(json.dumps(row) + "\n")

    return record
