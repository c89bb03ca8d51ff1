"""`voicebus upload --follow SESSION`: a live session's turns to Weave as the logger stores them.

The logger starts one per session when `WANDB_API_KEY` is set (in a process of its own: the weave
client never touches the audio path). Each stored turn goes out within about two seconds of its end,
through the same exactly-once path as `voicebus upload`; the session call once the session has ended.
A failed send is retried with backoff; what is never sent stays pending for `voicebus upload`.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import click
import requests

from services.stages.logger.store import load_json
from services.stages.logger.upload import SessionLock, SessionUploader, span_exporter
from services.stages.logger.weave_setup import trace_server_url
from services.weave_upload import SessionBusy, UploadError, connect

FOLLOW_POLL_S = 0.5  # how often a live uploader looks for a newly stored turn
FOLLOW_RETRY_S = (1.0, 30.0)  # after a failed send: first wait, longest wait (doubling)


def follow_session(session_dir: Path, project: str, owner_pid: int | None = None) -> int:
    """Send each turn of a live session as the logger stores it; the session call when it has ended.

    Exits once the session is over and all of it is confirmed, or when `owner_pid` (the logger) is
    gone: what is not sent then stays pending for `voicebus upload`."""
    if not (session_dir / "meta.json").exists():
        raise click.ClickException(f"{session_dir}: not a voicebus session directory")
    client = connect(project, "session", 1, session_dir.parent)
    export = span_exporter(client)
    click.echo(f"following {session_dir.name}: each turn goes to {trace_server_url()} as it is stored")

    def progress(turn: dict[str, Any]) -> None:
        click.echo(f"  {session_dir.name} turn {turn['turn']} sent live "
                   f"({(time.time_ns() - (turn.get('ended_ns') or time.time_ns())) / 1e9:.1f} s after it ended)")

    wait_s, failed = FOLLOW_RETRY_S[0], False
    try:
        with SessionLock(session_dir):
            uploader = SessionUploader(client, session_dir, export, progress)
            while True:
                ended = bool((load_json(session_dir / "meta.json") or {}).get("ended_ns"))
                owner_gone = owner_pid is not None and not _alive(owner_pid)
                try:
                    uploader.send_new_turns()
                    if ended:
                        uploader.finish_session()
                        click.echo(f"  {session_dir.name}: confirmed, every turn and the session call")
                        break
                    failed, wait_s = False, FOLLOW_RETRY_S[0]
                except (UploadError, requests.RequestException) as exc:
                    failed = True
                    said = str(exc) if isinstance(exc, UploadError) else f"{session_dir.name}: {exc}"
                    click.echo(f"  {said} (retrying in {wait_s:.0f} s)", err=True)
                    time.sleep(wait_s)
                    wait_s = min(wait_s * 2, FOLLOW_RETRY_S[1])
                if owner_gone:
                    click.echo(f"  {session_dir.name}: the logger (pid {owner_pid}) is gone before the session "
                               "ended; what is left stays pending for `voicebus upload`")
                    break
                time.sleep(FOLLOW_POLL_S)
    except SessionBusy as exc:
        click.echo(str(exc))
        return 0
    finally:
        client.finish()
    return 1 if failed else 0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
