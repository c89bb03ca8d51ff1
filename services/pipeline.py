"""Which processes make the pipeline, for `voicebus up` and `voicebus demo` (the Procfile lists the same)."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

from common.config import SIMULATOR_DEFAULT_PORT, OpenAITarget, openai_target
from common.log import kv
from common.ports import port_answers, port_listening
from services.launcher import PORT_READY_TIMEOUT_S, ProcessSpec, spawn, terminate

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
    "phone": ["phone"],  # nor this: it answers a phone line instead (`voicebus up --phone`)
}
DEFAULT_STAGES = [name for name in STAGES if name not in ("web", "phone")]
WEB_STAGES = ["web", "tools", "gateway", "logger"]  # the web stage resamples in-process
PHONE_STAGES = ["phone", "tools", "gateway", "logger"]
PHONE_GATEWAY_ARGS = ["--audio-format", "pcmu"]  # the caller's μ-law to the server and back, untouched
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
    if "gateway" in names:
        simulator = simulator_spec(extra_args.get(SIMULATOR, []), env)
        if simulator is not None:
            specs.insert(0, simulator)
    return specs, env


def simulator_spec(args: list[str], env: dict[str, str]) -> ProcessSpec | None:
    """The simulator to start when offline (None: online, or one already named by VOICEBUS_SIM_URL).

    Its port is bound here and the socket handed to it (`--listen-fd`): the default port, or a free one
    when something holds it (another pipeline's simulator), written into `env` for the gateway. Bound, not
    checked and bound later, so no other process can take it in between or while it restarts. Stages
    started after it wait until it listens.
    """
    target = openai_target()
    if not target.is_simulator:
        log.info(kv("openai_target", base_url=target.base_url))
        return None
    if os.environ.get("VOICEBUS_SIM_URL"):
        log.warning(kv("offline", reason="OPENAI_API_KEY is not set",
                       using=f"the simulator already running at {target.base_url} (VOICEBUS_SIM_URL; not starting one)"))
        return None
    port = int(target.base_url.rsplit(":", 1)[1].split("/", 1)[0])
    listener = bind_listener(port, may_move="VOICEBUS_SIM_PORT" not in os.environ and port == SIMULATOR_DEFAULT_PORT)
    if listener.getsockname()[1] != port:
        log.info(kv("simulator_port", default=port, reason="in use", using=listener.getsockname()[1]))
    port = listener.getsockname()[1]
    env["VOICEBUS_SIM_PORT"] = str(port)
    log.warning(kv("offline", reason="OPENAI_API_KEY is not set", using=f"local simulator on port {port}"))
    return ProcessSpec(SIMULATOR, ["simulate", "--listen-fd", str(listener.fileno()), *args], heartbeat=False,
                       ready_port=port, listener=listener)


def bind_listener(port: int, may_move: bool) -> socket.socket:
    """A socket listening on 127.0.0.1:`port`, or (`may_move`) on a free port when that one is taken."""
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind(("127.0.0.1", port))
    except OSError as exc:
        if not may_move:
            listener.close()
            raise RuntimeError(f"the simulator's port {port} is taken ({exc.strerror}): set VOICEBUS_SIM_PORT to a "
                               "free one, or unset it to let voicebus pick") from exc
        listener.bind(("127.0.0.1", 0))
    listener.listen(128)
    listener.set_inheritable(True)
    return listener


@contextlib.contextmanager
def simulator_for(target: OpenAITarget) -> Iterator[str]:
    """A base URL that answers for the offline target: the simulator already listening there, else one
    started for as long as the caller needs it (`voicebus say`)."""
    port = int(target.base_url.rsplit(":", 1)[1].split("/", 1)[0])
    if os.environ.get("VOICEBUS_SIM_URL") or port_listening(port):
        yield target.base_url
        return
    env: dict[str, str] = {}
    spec = simulator_spec(["--log-level", "WARNING"], env)
    assert spec is not None and spec.ready_port is not None and spec.listener is not None
    with spec.listener:
        proc = spawn(spec.args, {**os.environ, **env}, pass_fds=(spec.listener.fileno(),))
    try:
        deadline = time.monotonic() + PORT_READY_TIMEOUT_S
        while not port_answers(spec.ready_port):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the local simulator did not start (exit code {proc.poll()})")
            time.sleep(0.05)
        yield f"http://127.0.0.1:{spec.ready_port}/v1"
    finally:
        terminate([proc], within_s=3.0)
