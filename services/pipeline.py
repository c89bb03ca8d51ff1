"""Which processes make the pipeline, for `voicebus up` and `voicebus demo` (the Procfile lists the same)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from common.config import openai_target
from common.log import kv
from services.launcher import ProcessSpec

EXAMPLE_TOOLS = Path(__file__).resolve().parent.parent / "examples" / "tools.py"
# stage name -> `voicebus` arguments, in start order
STAGES: dict[str, list[str]] = {
    "mic": ["mic"],
    "resample": ["resample"],
    "tools": ["tools", "--module", str(EXAMPLE_TOOLS)],
    "gateway": ["gateway"],
    "player": ["player"],
    "logger": ["logger"],
    "web": ["web"],  # not in the default set: it replaces mic and player (`voicebus up --web`)
}
DEFAULT_STAGES = [name for name in STAGES if name != "web"]
WEB_STAGES = ["web", "resample", "tools", "gateway", "logger"]
SIMULATOR = "simulator"
BUS = "bus"
# what else a user may call a process in --arg: the command's own name
ALIASES = {"simulate": SIMULATOR, "resampler": "resample"}

log = logging.getLogger("voicebus.launcher")


def canonical_args(extra_args: dict[str, list[str]]) -> dict[str, list[str]]:
    """--arg keys by process name, accepting each process's command name too (simulate -> simulator)."""
    merged: dict[str, list[str]] = {}
    for name, args in extra_args.items():
        merged.setdefault(ALIASES.get(name, name), []).extend(args)
    return merged


def pipeline_specs(names: list[str] | None, extra_args: dict[str, list[str]]) -> tuple[list[ProcessSpec], dict[str, str]]:
    """The processes to start (the bus apart) and the environment they share."""
    names = [ALIASES.get(name, name) for name in names or DEFAULT_STAGES]
    extra_args = canonical_args(extra_args)
    unknown = sorted(set(names) - set(STAGES))
    if unknown:
        raise ValueError(f"unknown stage(s) {', '.join(unknown)}; known: {', '.join(STAGES)}")
    unknown = sorted(set(extra_args) - set(STAGES) - {SIMULATOR, BUS})
    if unknown:
        raise ValueError(f"--arg for unknown process(es) {', '.join(unknown)}; every process `up` starts takes "
                         f"--arg: {', '.join([BUS, SIMULATOR, *STAGES])}")
    specs = [ProcessSpec(name, STAGES[name] + extra_args.get(name, [])) for name in names]
    env: dict[str, str] = {}
    target = openai_target()
    if target.is_simulator and os.environ.get("VOICEBUS_SIM_URL"):
        log.warning(kv("offline", reason="OPENAI_API_KEY is not set",
                       using=f"the simulator already running at {target.base_url} (VOICEBUS_SIM_URL; not starting one)"))
    elif target.is_simulator and "gateway" in names:
        port = target.base_url.rsplit(":", 1)[1].split("/", 1)[0]
        specs.insert(0, ProcessSpec(SIMULATOR, ["simulate", "--port", port, *extra_args.get(SIMULATOR, [])],
                                    heartbeat=False))
        log.warning(kv("offline", reason="OPENAI_API_KEY is not set", using=f"local simulator at {target.base_url}"))
    else:
        log.info(kv("openai_target", base_url=target.base_url))
    return specs, env
