"""`voicebus upload`: what is pending under a store (sessions, or eval runs with --evals), one by one,
each confirmed on the trace server before it is marked; what cannot be sent stays pending."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click
import requests

from services.commands.evals.upload import pending_runs, upload_eval_run
from services.stages.logger.upload import pending_sessions, span_exporter, upload_session
from services.stages.logger.weave_setup import project_name, trace_server_url
from services.weave_upload import SessionBusy, UploadError, connect


def run_upload(root: Path, names: list[str], project: str, evals: bool = False) -> int:
    """Upload what is pending under `root`: sessions, or eval runs (`voicebus eval`) with `evals`."""
    what = "eval run" if evals else "session"
    if not root.exists():
        raise click.ClickException(f"no {what}s stored under {root}")
    todo = pending_runs(root, names) if evals else pending_sessions(root, names)
    if not todo:
        click.echo(f"nothing to upload: every stored {what} is already confirmed on the trace server")
        return 0
    client = connect(project, what, len(todo), root)
    export = None if evals else span_exporter(client)
    total_mb = sum(f.stat().st_size for d in todo for f in d.rglob("*.wav")) / 1e6
    click.echo(f"uploading {len(todo)} {what}(s), {total_mb:.1f} MB of audio, to {trace_server_url()} "
               f"(project {project_name(project)})")
    failures = 0
    for index, item_dir in enumerate(todo, 1):
        def progress(turn: dict[str, Any], index: int = index, name: str = item_dir.name) -> None:
            click.echo(f"  [{index}/{len(todo)}] {name} {'' if evals else 'turn '}{turn['turn']}")

        try:
            result = upload_eval_run(client, item_dir, progress) if evals else \
                upload_session(client, item_dir, progress, export)
        except SessionBusy as exc:
            click.echo(f"  [{index}/{len(todo)}] skipped: {exc}")
            continue
        except (UploadError, requests.RequestException) as exc:  # the trace server went away mid-upload
            failures += 1
            said = str(exc) if isinstance(exc, UploadError) else f"{item_dir.name}: {exc}; it stays pending"
            click.echo(f"  {said}", err=True)
            continue
        note = "already on the server" if result["already_there"] else \
            f"{result['turns']} {'scenario run' if evals else 'turn'}(s)"
        click.echo(f"  [{index}/{len(todo)}] {item_dir.name}: confirmed ({note})")
    client.finish()
    return 1 if failures else 0
