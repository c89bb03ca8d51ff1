"""What the simulated assistant says: deterministic, and configurable by a small rules file.

Rules file (JSON): `[{"match": "weather", "reply": "It is sunny."}, {"match": ".*", "reply": "I heard: {transcript}"}]`
— the first rule whose regex matches the user's words (case-insensitive) wins.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

DEFAULT_REPLY = "I heard: {transcript}"
NOTHING_HEARD = "I did not catch that."


@dataclass(frozen=True)
class Rule:
    pattern: re.Pattern[str]
    reply: str


class Replies:
    def __init__(self, rules: list[Rule] | None = None) -> None:
        self.rules = rules or [Rule(re.compile(".*"), DEFAULT_REPLY)]

    @classmethod
    def from_file(cls, path: Path) -> Replies:
        try:
            raw = json.loads(path.read_text())
            rules = [Rule(re.compile(item["match"], re.IGNORECASE), str(item["reply"])) for item in raw]
        except (OSError, ValueError, KeyError, TypeError, re.error) as exc:
            raise ValueError(f"bad rules file {path}: {exc} (expected a JSON list of {{match, reply}})") from exc
        return cls(rules)

    def reply(self, transcript: str) -> str:
        if not transcript.strip():
            return NOTHING_HEARD
        for rule in self.rules:
            if rule.pattern.search(transcript):
                return rule.reply.replace("{transcript}", transcript)  # may be "": a silent answer
        return DEFAULT_REPLY.replace("{transcript}", transcript)
