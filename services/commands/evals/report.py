"""The HTML report of an eval run: every scenario and turn, transcripts, audio, and the baseline's diff."""

from __future__ import annotations

import html
import os
from pathlib import Path
from typing import Any

from services.stages.logger.store import load_json

STYLE = """body{font:14px system-ui,sans-serif;margin:2em;color:#222}table{border-collapse:collapse;margin:1em 0}
td,th{border:1px solid #ccc;padding:4px 8px;vertical-align:top;text-align:left}th{background:#f3f3f3}
.pass{color:#176f2c;font-weight:600}.fail{color:#b00020;font-weight:600}.none{color:#777}
.regress{background:#ffe3e6}.fixed{background:#e3ffe8}audio{height:28px;width:220px}small{color:#666}"""


def _badge(passed: bool | None) -> str:
    return {True: '<span class="pass">pass</span>', False: '<span class="fail">FAIL</span>'}.get(
        passed, '<span class="none">not run</span>')


def _audio(base: Path, run_dir: Path, relative: str | None) -> str:
    if not relative:
        return '<span class="none">-</span>'
    src = os.path.relpath(run_dir / relative, base)
    return f'<audio controls preload="none" src="{html.escape(src)}"></audio>'


def _index(result: dict[str, Any]) -> dict[tuple[str, int, int], dict[str, Any]]:
    return {(s["name"], s["repeat"], t["turn"]): t for s in result.get("scenarios", []) for t in s["turns"]}


def write_report(run_dir: Path, result: dict[str, Any], baseline_dir: Path | None) -> Path:
    """report.html in `run_dir` (audio linked relative to it, so the folder can be moved whole)."""
    baseline = load_json(baseline_dir / "run.json") if baseline_dir else None
    before = _index(baseline or {})
    diff = result.get("baseline") or {}
    changed = {(r["scenario"], r["turn"], r["check"]): "regress" for r in diff.get("regressions", [])}
    changed |= {(r["scenario"], r["turn"], r["check"]): "fixed" for r in diff.get("fixed", [])}
    summary = result["summary"]
    parts = [f"<!doctype html><meta charset=utf-8><title>voicebus eval {html.escape(result['run'])}</title>"
             f"<style>{STYLE}</style><h1>voicebus eval {html.escape(result['run'])}</h1>",
             f"<p>{summary['passed']}/{summary['scenarios']} scenario(s) passed; "
             f"{summary['checks'] - summary['failed_checks'] - summary['not_run']}/{summary['checks']} checks held"
             f" &middot; target: {html.escape(str(result.get('target')))} &middot; files: "
             f"{html.escape(', '.join(result.get('files', [])))}</p>"]
    if diff:
        parts.append(f"<p>Against baseline <b>{html.escape(diff['run'])}</b>: "
                     f"<span class='fail'>{len(diff['regressions'])} regression(s)</span>, "
                     f"<span class='pass'>{len(diff['fixed'])} fixed</span>.</p>")
        changes = [("regress", "pass → FAIL", r) for r in diff["regressions"]] + \
            [("fixed", "FAIL → pass", r) for r in diff["fixed"]]
        if changes:
            parts.append("<table><tr><th>change</th><th>scenario</th><th>turn</th><th>check</th><th>held before</th>"
                         "<th>held now</th></tr>" + "".join(
                             f"<tr class='{kind}'><td>{label}</td><td>{html.escape(r['scenario'])}</td>"
                             f"<td>{r['turn']}</td><td>{html.escape(r['check'])}</td><td>{r['before']:.0%}</td>"
                             f"<td>{r['now']:.0%}</td></tr>" for kind, label, r in changes) + "</table>")
        if diff.get("latency"):
            parts.append("<table><tr><th>latency at the ear</th><th>turn</th><th>baseline</th><th>now</th>"
                         "<th>delta</th></tr>" + "".join(
                             f"<tr><td>{html.escape(d['scenario'])}</td><td>{d['turn']}</td><td>{d['before_ms']} ms</td>"
                             f"<td>{d['now_ms']} ms</td><td>{d['delta_ms']:+d} ms</td></tr>" for d in diff["latency"])
                         + "</table>")
    for scenario in result["scenarios"]:
        title = f"{scenario['name']} #{scenario['repeat']}" if result["settings"]["repeat"] > 1 else scenario["name"]
        parts.append(f"<h2>{_badge(scenario['passed'])} {html.escape(title)} <small>{html.escape(scenario['file'])}"
                     f" &middot; session {html.escape(scenario['session'])}</small></h2>")
        head = "<tr><th>turn</th><th>user (said / transcribed)</th><th>reply as heard</th><th>latency</th>" \
               "<th>checks</th><th>audio</th>" + ("<th>baseline</th>" if baseline else "") + "</tr>"
        rows = [head]
        for turn in scenario["turns"]:
            old = before.get((scenario["name"], scenario["repeat"], turn["turn"]))
            checks = []
            for check in turn["checks"]:
                mark = changed.get((scenario["name"], turn["turn"], check["name"]), "")
                was = next((c["passed"] for c in (old or {}).get("checks", []) if c["name"] == check["name"]), "n/a")
                was_text = f" <small>(was {_badge(was) if was != 'n/a' else 'n/a'})</small>" if baseline else ""
                checks.append(f"<div class='{mark}'>{_badge(check['passed'])} {html.escape(check['name'])}"
                              f"{was_text}<br><small>{html.escape(check['detail'])}</small></div>")
            latency = f"{turn['latency_ms']:.0f} ms" if turn.get("latency_ms") is not None else "-"
            said = turn.get("say") or turn.get("wav") or ""
            after = html.escape(turn.get("barge_in_after") or "the reply started")
            barge = f"<br><small>barge-in {turn['barge_in_ms']} ms after {after}</small>" \
                if turn.get("barge_in_ms") is not None else ""
            cells = [str(turn["turn"]),
                     f"{html.escape(said)}<br><small>{html.escape(str(turn.get('user_transcript')))}</small>{barge}",
                     html.escape(turn.get("reply_heard") or ""), latency, "".join(checks),
                     f"user {_audio(run_dir, run_dir, turn['audio'].get('user'))}<br>"
                     f"heard {_audio(run_dir, run_dir, turn['audio'].get('heard'))}"]
            if baseline:
                if old is None:
                    cells.append('<span class="none">not in baseline</span>')
                else:
                    delta = ""
                    if old.get("latency_ms") is not None and turn.get("latency_ms") is not None:
                        delta = f" ({turn['latency_ms'] - old['latency_ms']:+.0f} ms now)"
                    cells.append(f"{html.escape(old.get('reply_heard') or '')}<br><small>"
                                 f"{old.get('latency_ms') or 0:.0f} ms{delta}</small><br>"
                                 f"heard {_audio(run_dir, baseline_dir, old['audio'].get('heard'))}")
            rows.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
        parts.append("<table>" + "".join(rows) + "</table>")
    out = run_dir / "report.html"
    out.write_text("\n".join(parts))
    return out
