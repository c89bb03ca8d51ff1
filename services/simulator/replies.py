"""What the simulated assistant says or calls: deterministic, and configurable by a small rules file.

Rules file (JSON), first matching rule wins (regex, case-insensitive, on the user's words):

    [{"match": "weather", "reply": "It is sunny."},
     {"match": "time.*in (?P<city>\\w+)", "call": {"name": "get_current_time",
      "arguments": {"timezone": "Asia/{city}"}},
      "after_call": "It is {datetime:%H} hours and {datetime:%M} minutes in {city}.",
      "after_error": "Sorry, I could not look that up: {error}"},
     {"match": ".*", "reply": "I heard: {transcript}"}]

A `call` rule makes the response a function call (when the session offers that tool); once the
client sends the output and asks for a response, `after_call` is spoken, filled from the output's
JSON fields (ISO times become datetimes, so `{datetime:%H}` works), the rule's named groups and
`{output}` (the raw text). An output `{"error": ...}` is spoken with `after_error`.
"""

from __future__ import annotations

import json
import re
import string
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

DEFAULT_REPLY = "I heard: {transcript}"
NOTHING_HEARD = "I did not catch that."
DEFAULT_AFTER_CALL = "The tool said: {output}"
DEFAULT_AFTER_ERROR = "Sorry, that did not work: {error}"


@dataclass(frozen=True)
class Rule:
    pattern: re.Pattern[str]
    reply: str = ""
    call: dict[str, Any] | None = None
    after_call: str = DEFAULT_AFTER_CALL
    after_error: str = DEFAULT_AFTER_ERROR


@dataclass
class Plan:
    """What one response does: say `text`, or call `call_name` with `arguments` (JSON text)."""

    text: str = ""
    call_name: str | None = None
    arguments: str = "{}"
    rule: Rule | None = None
    groups: dict[str, str] = field(default_factory=dict)
    approval_request_id: str | None = None  # a server-side MCP call the client approved


class _Lenient(string.Formatter):
    """Missing fields stay visible as {name} instead of failing the reply."""

    def get_value(self, key, args, kwargs):
        return kwargs.get(key, "{" + str(key) + "}") if isinstance(key, str) else super().get_value(key, args, kwargs)

    def format_field(self, value, format_spec):
        try:
            return super().format_field(value, format_spec)
        except (ValueError, TypeError):
            return str(value)


def _fill(template: Any, fields: dict[str, Any]) -> Any:
    if isinstance(template, str):
        return _Lenient().format(template, **fields)
    if isinstance(template, dict):
        return {k: _fill(v, fields) for k, v in template.items()}
    if isinstance(template, list):
        return [_fill(v, fields) for v in template]
    return template


def _output_fields(output: str) -> tuple[dict[str, Any], bool]:
    """Template fields from a function output, and whether it reports an error."""
    fields: dict[str, Any] = {"output": output}
    try:
        parsed = json.loads(output)
    except ValueError:
        return fields, False
    if isinstance(parsed, dict):
        for key, value in parsed.items():
            if isinstance(value, str):
                try:
                    value = datetime.fromisoformat(value) if "T" in value or "-" in value[:5] else value
                except ValueError:
                    pass
            fields[str(key)] = value
    return fields, isinstance(parsed, dict) and set(parsed) == {"error"}


def _time_rule(words: str, timezone: str, place: str) -> Rule:
    return Rule(re.compile(words, re.IGNORECASE), call={"name": "get_current_time", "arguments": {"timezone": timezone}},
                after_call="It is {datetime:%H} {datetime:%M} in " + place + ".")


# with no rules file: asking for the time calls a get_current_time tool when the session offers one
# (examples/tools.py and mcp-server-time both have it); everything else is echoed
DEFAULT_RULES = [_time_rule(r"time.*\btokyo", "Asia/Tokyo", "Tokyo"),
                 _time_rule(r"time.*\blondon", "Europe/London", "London"),
                 _time_rule(r"time.*\bparis", "Europe/Paris", "Paris"),
                 _time_rule(r"time.*\bnew york", "America/New_York", "New York"),
                 _time_rule(r"what time is it", "UTC", "U T C"),
                 Rule(re.compile(".*"), DEFAULT_REPLY)]


class Replies:
    def __init__(self, rules: list[Rule] | None = None) -> None:
        self.rules = rules or DEFAULT_RULES

    @classmethod
    def from_file(cls, path: Path) -> Replies:
        try:
            raw = json.loads(path.read_text())
            rules = [Rule(re.compile(item["match"], re.IGNORECASE), str(item.get("reply", "")), item.get("call"),
                          item.get("after_call", DEFAULT_AFTER_CALL), item.get("after_error", DEFAULT_AFTER_ERROR))
                     for item in raw]
            for rule in rules:
                if rule.call is not None and not isinstance(rule.call.get("name"), str):
                    raise ValueError("a call needs a name")
        except (OSError, ValueError, KeyError, TypeError, AttributeError, re.error) as exc:
            raise ValueError(f"bad rules file {path}: {exc} (expected a JSON list of {{match, reply}} or "
                             f"{{match, call, after_call}})") from exc
        return cls(rules)

    def reply(self, transcript: str) -> str:
        return self.plan(transcript, set()).text

    def plan(self, transcript: str, tools: set[str]) -> Plan:
        """The response to the user's words; a call only when the session offers tools."""
        if not transcript.strip():
            return Plan(NOTHING_HEARD)
        for rule in self.rules:
            match = rule.pattern.search(transcript)
            if not match:
                continue
            groups = {k: v for k, v in match.groupdict().items() if v is not None}
            if rule.call is not None and tools:
                arguments = _fill(rule.call.get("arguments", {}), {**groups, "transcript": transcript})
                return Plan(call_name=rule.call["name"], arguments=json.dumps(arguments), rule=rule, groups=groups)
            if rule.call is not None:
                continue  # no tools in this session: a later rule answers
            return Plan(rule.reply.replace("{transcript}", transcript))  # may be "": a silent answer
        return Plan(DEFAULT_REPLY.replace("{transcript}", transcript))

    @staticmethod
    def after_call(plan: Plan | None, output: str) -> str:
        """What to say once the output of the plan's call is known."""
        rule = plan.rule if plan and plan.rule else Rule(re.compile(".*"))
        output_fields, is_error = _output_fields(output)
        fields = {**(plan.groups if plan else {}), **output_fields}
        template = rule.after_error if is_error else rule.after_call
        return _Lenient().format(template, **fields)
