"""One way to start the weave client: nothing leaves the machine but the trace itself.

weave, left to itself, starts a Sentry client when it is imported (error reports and a session
envelope to Sentry's ingest host) and asks PyPI for a newer weave on every `weave.init`. Neither is
the trace server, and README promises that a conversation goes nowhere else. So, before weave is
imported: its error reporting is off, its call links and per-object log lines quiet, its implicit patching of libraries off
(an uploader has no OpenAI client to patch); after import, the PyPI check is a no-op. Setting
`VOICEBUS_WEAVE_TELEMETRY=1` (or `WANDB_ERROR_REPORTING=true` for Sentry alone) opts back in.
"""

from __future__ import annotations

import os

TELEMETRY_OPT_IN = "VOICEBUS_WEAVE_TELEMETRY"


def telemetry_allowed() -> bool:
    return os.environ.get(TELEMETRY_OPT_IN, "").lower() in ("1", "true", "yes")


def quiet_environment() -> None:
    """Call before anything imports weave: its Sentry client reads this at import."""
    if not telemetry_allowed():
        os.environ.setdefault("WANDB_ERROR_REPORTING", "false")
    os.environ.setdefault("WANDB_SILENT", "true")
    os.environ.setdefault("WEAVE_PRINT_CALL_LINK", "false")
    os.environ.setdefault("WEAVE_LOG_LEVEL", "WARNING")  # its "Published to ..." per object: ours say what was sent
    os.environ.setdefault("WEAVE_IMPLICITLY_PATCH_INTEGRATIONS", "false")


def trace_server_url() -> str:
    quiet_environment()
    from weave.trace import env

    return env.weave_trace_server_url().rstrip("/")


def project_name(project: str) -> str:
    entity = os.environ.get("WANDB_ENTITY")
    return f"{entity}/{project}" if entity else project


def init_client(project: str):
    """`weave.init` for `project` (under `$WANDB_ENTITY` when set), without telemetry."""
    quiet_environment()
    import weave
    from weave.trace import init_message

    if not telemetry_allowed():
        init_message._print_version_check = lambda: None  # a request to PyPI on every init
    return weave.init(project_name(project))
