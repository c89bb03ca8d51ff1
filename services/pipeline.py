"""Which processes make the pipeline, for `voicebus up` and `voicebus demo` (the Procfile lists the same)."""

from __future__ import annotations

import logging

from common.config import openai_target
from common.log import kv
from services.launcher import ProcessSpec

# stage name -> `voicebus` arguments, in start order
STAGES: dict[str, list[str]] = {
    "mic": ["mic"],
    "resample": ["resample"],
    "player": ["player"],
}
DEFAULT_STAGES = list(STAGES)

log = logging.getLogger("voicebus.launcher")


def pipeline_specs(names: list[str] | None, extra_args: dict[str, list[str]]) -> tuple[list[ProcessSpec], dict[str, str]]:
    """The processes to start and the environment they share."""
    names = names or DEFAULT_STAGES
    unknown = sorted(set(names) - set(STAGES)) + sorted(set(extra_args) - set(STAGES))
    if unknown:
        raise ValueError(f"unknown stage(s) {', '.join(unknown)}; known: {', '.join(STAGES)}")
    specs = [ProcessSpec(name, STAGES[name] + extra_args.get(name, [])) for name in names]
    env: dict[str, str] = {}
    target = openai_target()
    log.info(kv("openai_target", simulator=target.is_simulator, base_url=target.base_url))
    return specs, env
