"""What the stage zygote preloads and how it runs a stage: the table `services.zygote` is handed.

The launcher names this module to its zygote (`Zygote("services.preload")`); the zygote imports it by
name, imports PRELOAD, calls warm() once, and runs each forked stage's command line through run().
Light to import: what it names is imported only when a zygote asks.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time

from common.log import kv

log = logging.getLogger("voicebus.zygote")

# what the stages import, their lazy imports included (the SDK's event tables, the browser stage's
# codec and jitter buffer): every stage of `up` and of a served conversation forks with these in
# place. Not the MCP client (only with `tools --mcp`) nor weave (only when uploading), nor the
# simulator unless the set starts one (`COMMAND_PRELOAD`).
PRELOAD = ["services.cli", "common.runner", "services.bus", "services.stages.resampler", "services.stages.mic",
           "services.stages.player", "services.stages.gateway.stage", "services.stages.gateway.session", "services.stages.gateway.bargein",
           "services.stages.tools.stage", "services.stages.logger.stage", "services.stages.web.stage", "services.stages.web.opus",
           "aiortc.jitterbuffer", "ssl",
           # what a browser's call imports as it connects (DTLS ciphers, the certificate's serialization;
           # asyncio's default executor in the web, tools and gateway stages): ~7 ms at Connect, and
           # pages of each web stage's own otherwise
           "cryptography.hazmat.primitives.ciphers", "cryptography.hazmat.backends.openssl",
           "cryptography.hazmat.primitives.serialization", "concurrent.futures.thread"]
# and what a stage only some sets start imports, preloaded when the launcher says it will start one:
# the simulator stands in for OpenAI in an offline `up` (~3 MB a browser conversation would
# otherwise carry in its zygote with a key, or with the simulator apart as in the benchmarks)
COMMAND_PRELOAD = {"simulate": ["services.simulator.server"]}


def run(argv: list[str]) -> int:
    """A stage's command line, as `python -m services.cli ARGV` runs it (click raises SystemExit)."""
    from services.cli import main

    main(args=argv, prog_name="voicebus")
    return 0


def warm() -> None:
    """Build once, in the zygote, what every fork would otherwise build for itself."""
    from common.realtime_types import build_validators

    build_validators("ga")  # the gateway's event tables and their validators, built once here (~4 MB)
    from common.resample import StreamResampler

    StreamResampler(48_000, 24_000, 1).feed(bytes(3840))  # and the resampler's 48 -> 24 kHz tables (1.6 kB)
    from services.stages.web import libopus

    with contextlib.suppress(libopus.LibOpusMissing):  # a web stage forked without it says so at its start
        libopus.load()  # and the browser's decoder: found (ldconfig, ~12 ms) and bound once, not per web stage
    rehearse()
    _preload_example_tools()


def _preload_example_tools() -> None:
    """The default tools' models and schemas, built once for every tools stage (`preload_python_tools`)."""
    from services.pipeline import EXAMPLE_TOOLS
    from services.stages.tools.python_source import preload_python_tools

    try:
        preload_python_tools(EXAMPLE_TOOLS)
    except Exception as exc:  # noqa: BLE001 - a tools stage loading it says what is wrong, and exits 2
        log.warning(kv("example_tools_not_preloaded", path=str(EXAMPLE_TOOLS), reason=repr(str(exc))))


def rehearse() -> int:
    """Run once, here, the pure part of every stage's start: parsing its command line (as the launcher
    gives it; no command runs, and the stage commands have no callbacks) and stamping, encoding and
    decoding the bus messages it sends and takes. Returns how many command lines parsed.

    The first run of code in a process writes to what it runs through: the code objects (CPython
    specializes them as they run), the ABCs' isinstance caches, interned names' reference counts.
    Done here, those writes land in pages every fork shares; done in each stage, each copied them:
    measured, ~0.9 MB of each stage's private memory for the command line and ~0.4 MB more in
    each stage that decodes messages (a browser conversation has five stages)."""
    import click

    from common.envelope import decode, encode
    from common.stage import Output
    from services.cli import main
    from services.pipeline import BUS, STAGES

    parsed = 0
    for argv in ([BUS], *STAGES.values()):
        try:
            with main.make_context("voicebus", list(argv)) as group:
                command = main.get_command(group, argv[0])
                if command is not None:
                    command.make_context(argv[0], list(argv[1:]), parent=group).close()
                    parsed += 1
        except (click.ClickException, click.exceptions.Exit) as exc:  # a stage that needs more; its start says so
            log.debug(kv("rehearsal_skipped", command=argv[0], reason=repr(str(exc))))
    out, sent = Output.collecting("zygote", "rehearsal")
    out.event("health.zygote", {"state": "running", "pid": os.getpid(), "uptime_s": 0.0, "in": 0, "out": 0})
    out.audio("audio.user", bytes(960), rate=24_000, channels=1, pts=0, t_capture_ns=time.time_ns())
    for message in sent:
        decode(encode(message))
    return parsed
