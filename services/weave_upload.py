"""What both uploads share (`voicebus upload`'s sessions and `voicebus eval`'s runs): reaching the trace
server, the errors they report, timing a call as it happened, audio for a call, and confirming that
the server has every call before anything is marked sent.

Both uploaders import this; neither imports the other (`services/upload_command.py` runs either).
"""

from __future__ import annotations

import datetime
import json
import os
import time
from pathlib import Path

import click
import requests

from services.stages.logger.store import _atomic_write
from services.stages.logger.weave_setup import init_client, trace_server_url

REACHABILITY_TIMEOUT_S = 3.0


class UploadError(RuntimeError):
    pass


class SessionBusy(UploadError):
    """Another uploader (a live one) holds the session."""


def reachable() -> tuple[bool, str]:
    url = trace_server_url()
    try:
        response = requests.get(f"{url}/server_info", timeout=REACHABILITY_TIMEOUT_S)
        return response.ok, f"{url} answered {response.status_code}"
    except requests.RequestException as exc:
        return False, f"{url} unreachable ({type(exc).__name__})"


def at(ns: int | None) -> datetime.datetime | None:
    return datetime.datetime.fromtimestamp(ns / 1e9, tz=datetime.UTC) if ns else None


def audio(path: Path):
    import weave

    return weave.Audio.from_path(str(path)) if path.exists() and path.stat().st_size > 44 else None


def confirmed(client, call_ids: list[str]) -> bool:
    query = {"project_id": client.project_id, "filter": {"call_ids": call_ids}}
    found = {call.id for call in client.server.calls_query_stream(query)}
    return set(call_ids) <= found


def flush_and_confirm(client, state_path: Path, call_ids: list[str], name: str, before_flush=None) -> None:
    """Write the call ids down, flush, read them back; only then mark `state_path` confirmed.

    An upload cut short after the ids are written is checked on the next run, not sent again.
    `before_flush` runs between (an Evaluation's summary, which ends its open call)."""
    _atomic_write(state_path, json.dumps({"call_ids": call_ids, "confirmed": False}, indent=1))
    if before_flush is not None:
        before_flush()
    client.flush()
    if not confirmed(client, call_ids):
        raise UploadError(f"{name}: the trace server does not have all {len(call_ids)} calls yet; "
                          "it stays pending and will be checked on the next upload")
    _atomic_write(state_path, json.dumps({"call_ids": call_ids, "confirmed": True, "at_ns": time.time_ns()},
                                         indent=1))


def connect(project: str, what: str, count: int, root: Path):
    if not os.environ.get("WANDB_API_KEY"):
        raise click.ClickException(f"WANDB_API_KEY is not set: nothing can be uploaded ({what}s stay in "
                                   f"{root}; weave is never asked to prompt for a login)")
    ok, why = reachable()
    if not ok:
        raise click.ClickException(f"W&B is not reachable: {why}; {count} {what}(s) stay stored for later")
    return init_client(project)
