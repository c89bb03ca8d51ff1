"""`voicebus eval`: plan, run every scenario, check, store, report, upload; an exit code for CI.

    <evals root>/<run>/run.json      every scenario, turn and check, the settings, the baseline's diff
    <evals root>/<run>/sessions/     the logger's store of each scenario's conversation (audio as heard)
    <evals root>/<run>/audio/        what the mic spoke
    <evals root>/<run>/report.html   the table, transcripts and audio; the diff against --baseline
    <evals root>/<run>/upload.json   what the trace server has confirmed (the Evaluation, once)
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import click

from common.config import openai_target
from common.speech import Transcriber
from services.commands.evals.run import (
    EvalError,
    Pipeline,
    Settings,
    call_by_phone,
    check_target_up,
    converse,
    evaluate,
    plan,
    slug,
    unknown_tools,
)
from services.commands.evals.scenario import ScenarioError
from services.stages.logger.store import _atomic_write, data_dir, load_json

RUN_FILE = "run.json"


def default_evals_root() -> Path:
    return data_dir("VOICEBUS_EVAL_DIR", "evals")


def new_run_id() -> str:
    return time.strftime("e%Y%m%d-%H%M%S-", time.gmtime()) + os.urandom(3).hex()


def find_run(root: Path, name: str, files: list[Path] | None = None) -> Path:
    """A run directory: a path, a run id under `root`, `latest` (the latest run that ran every one of the
    scenario files `files`: a run of their folder counts) or `latest-passing` (the latest of those whose
    every check held)."""
    if name in ("latest", "latest-passing"):
        wanted = {str(Path(f).resolve()) for f in files or []}
        runs = sorted((p for p in root.iterdir() if (p / RUN_FILE).exists()), key=lambda p: p.name) \
            if root.is_dir() else []
        for run in reversed(runs):
            result = load_json(run / RUN_FILE) or {}
            if files is not None and not wanted <= {str(Path(f).resolve()) for f in result.get("files", [])}:
                continue
            if name == "latest-passing" and (result.get("summary") or {}).get("failed_checks", 1):
                continue
            return run
        which = "passing run" if name == "latest-passing" else "run"
        raise EvalError(f"no {which} of {', '.join(sorted(Path(f).name for f in wanted)) or 'these files'} "
                        f"stored under {root} to compare with")
    for candidate in (Path(name), root / name):
        if (candidate / RUN_FILE).is_file():
            return candidate
    raise EvalError(f"no eval run {name!r} (neither a directory with {RUN_FILE} nor a run under {root})")


def run_eval(files: list[Path], settings: Settings, root: Path, baseline: str | None, upload: bool) -> int:
    baseline_dir = find_run(root, baseline, files) if baseline else None
    if baseline_dir is not None and baseline.startswith("latest"):
        click.echo(f"baseline: {baseline_dir.name} (the {baseline.replace('-', ' ')} run of these scenario files)",
                   err=True)
    run_id = new_run_id()
    root.mkdir(parents=True, exist_ok=True)
    staging = root / f".{run_id}.partial"
    (staging / "audio").mkdir(parents=True)
    try:
        result = _run(files, settings, staging, run_id)
        if baseline_dir is not None:
            result["baseline"] = compare(load_json(baseline_dir / RUN_FILE) or {}, result, baseline_dir.name)
        _atomic_write(staging / RUN_FILE, json.dumps(result, indent=1, default=str))
        from services.commands.evals.report import write_report

        write_report(staging, result, baseline_dir)
        run_dir = root / run_id
        staging.rename(run_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    print_table(result)
    click.echo(f"\nrun {run_id}: {run_dir}/ (run.json, report.html, sessions/ with the audio as heard)")
    if upload:
        _upload(run_dir)
    failed = result["summary"]["failed_checks"] or len((result.get("baseline") or {}).get("regressions", []))
    return 1 if failed else 0


def _run(files: list[Path], settings: Settings, staging: Path, run_id: str) -> dict[str, Any]:
    started_ns = time.time_ns()
    try:
        planned = plan(files, staging / "audio", settings)
    except ScenarioError as exc:
        raise EvalError(str(exc)) from exc
    check_target_up()
    target = openai_target()
    click.echo(f"{len(planned)} scenario(s) x {settings.repeat} from {', '.join(map(str, files))}; "
               + ("offline: the local simulator answers" if target.is_simulator else f"online: {target.base_url}"))
    barge_topics = {t.barge_in_after for p in planned for t in p.scenario.turns if t.barge_in_after}
    pipeline = Pipeline(staging, settings, run_id, barge_topics)
    transcriber = Transcriber()
    scenarios = []
    try:
        offered = pipeline.start()
        problems = unknown_tools(planned, offered)
        if problems:
            raise EvalError("; ".join(problems))
        for repeat in range(1, settings.repeat + 1):
            for number, item in enumerate(planned, 1):  # numbered: two files may use one scenario name
                session = f"{run_id}-{number:02d}-{slug(item.scenario.name)}-{repeat}"
                click.echo(f"  {item.scenario.name} ({repeat}/{settings.repeat}): {len(item.scenario.turns)} turn(s)"
                           + (" over the phone" if settings.phone else ""))
                scenario_started_ns = time.time_ns()
                if settings.phone:  # the phone stage names each call's session
                    session, observed = call_by_phone(pipeline, item)
                else:
                    observed = converse(pipeline, item, session)
                scenario_ended_ns = time.time_ns()
                turns = evaluate(item, observed, pipeline.sessions_dir / session, transcriber)
                scenarios.append({"file": str(item.file), "name": item.scenario.name, "repeat": repeat,
                                  "session": session, "turns": turns, "started_ns": scenario_started_ns,
                                  "ended_ns": scenario_ended_ns, "passed": all(t["passed"] for t in turns)})
    finally:
        pipeline.stop()
    checks = [c for s in scenarios for t in s["turns"] for c in t["checks"]]
    return {"run": run_id, "started_ns": started_ns, "created_ns": time.time_ns(), "files": [str(f) for f in files],
            "target": "simulator" if target.is_simulator else target.base_url,
            "settings": {"instructions": str(settings.instructions) if settings.instructions else None,
                         "tools": settings.tool_modules, "mcp": settings.mcp_commands, "repeat": settings.repeat,
                         "rules": str(settings.rules) if settings.rules else None, "phone": settings.phone},
            "scenarios": scenarios,
            "summary": {"scenarios": len(scenarios), "passed": sum(s["passed"] for s in scenarios),
                        "checks": len(checks), "failed_checks": sum(c["passed"] is False for c in checks),
                        "not_run": sum(c["passed"] is None for c in checks)}}


def _rates(result: dict[str, Any]) -> dict[tuple[str, str, int, str], list[bool]]:
    """(file name, scenario, turn, check) -> outcomes over the repeats (not-run checks left out)."""
    outcomes: dict[tuple[str, str, int, str], list[bool]] = defaultdict(list)
    for scenario in result.get("scenarios", []):
        for turn in scenario["turns"]:
            for check in turn["checks"]:
                if check["passed"] is not None:
                    outcomes[(Path(scenario["file"]).name, scenario["name"], turn["turn"], check["name"])].append(
                        check["passed"])
    return outcomes


def _latencies(result: dict[str, Any]) -> dict[tuple[str, str, int], list[float]]:
    out: dict[tuple[str, str, int], list[float]] = defaultdict(list)
    for scenario in result.get("scenarios", []):
        for turn in scenario["turns"]:
            if turn.get("latency_ms") is not None:
                out[(Path(scenario["file"]).name, scenario["name"], turn["turn"])].append(turn["latency_ms"])
    return out


def compare(before: dict[str, Any], now: dict[str, Any], baseline_name: str) -> dict[str, Any]:
    """What changed since the baseline: checks whose pass rate fell (regressions) or rose, latency deltas."""
    old, new = _rates(before), _rates(now)
    regressions, fixed = [], []
    for key, outcomes in new.items():
        if key not in old:
            continue
        was, is_now = sum(old[key]) / len(old[key]), sum(outcomes) / len(outcomes)
        entry = {"file": key[0], "scenario": key[1], "turn": key[2], "check": key[3],
                 "before": round(was, 3), "now": round(is_now, 3)}
        if is_now < was:
            regressions.append(entry)
        elif is_now > was:
            fixed.append(entry)
    old_latency, new_latency = _latencies(before), _latencies(now)
    deltas = [{"file": k[0], "scenario": k[1], "turn": k[2], "before_ms": round(sum(old_latency[k]) / len(old_latency[k])),
               "now_ms": round(sum(v) / len(v)), "delta_ms": round(sum(v) / len(v) - sum(old_latency[k]) / len(old_latency[k]))}
              for k, v in new_latency.items() if k in old_latency]
    return {"run": baseline_name, "regressions": regressions, "fixed": fixed, "latency": deltas}


def print_table(result: dict[str, Any]) -> None:
    """One row per turn; under a failed one, each failed check in full (name: what was found)."""
    rows = [("scenario", "turn", "result", "latency", "reply as heard")]
    failures: dict[int, list[str]] = {}
    for scenario in result["scenarios"]:
        name = scenario["name"] + (f" #{scenario['repeat']}" if result["settings"]["repeat"] > 1 else "")
        for turn in scenario["turns"]:
            failed = [f"{c['name']}: {c['detail']}" for c in turn["checks"] if c["passed"] is False]
            if failed:
                failures[len(rows)] = failed
            latency = f"{turn['latency_ms']:.0f} ms" if turn.get("latency_ms") is not None else "-"
            rows.append((name, str(turn["turn"]), "pass" if turn["passed"] else "FAIL", latency,
                         (turn.get("reply_heard") or "")[:70]))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    click.echo("")
    for index, row in enumerate(rows):
        click.echo("  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row[:4])) + "  " + row[4])
        for failure in failures.get(index, []):
            click.echo(f"    x {failure}")
    summary = result["summary"]
    not_run = f", {summary['not_run']} not run (offline)" if summary["not_run"] else ""
    click.echo(f"\n{summary['passed']}/{summary['scenarios']} scenario(s) passed; "
               f"{summary['checks'] - summary['failed_checks'] - summary['not_run']}/{summary['checks']} checks held"
               + not_run)
    if result["settings"]["repeat"] > 1:
        flaky = [(key, outcomes) for key, outcomes in sorted(_rates(result).items()) if not all(outcomes)]
        if not flaky:
            click.echo(f"every check held in all {result['settings']['repeat']} repeats")
        else:
            click.echo("pass rates over the repeats (checks that did not always hold):")
        for (_file, scenario, turn, check), outcomes in flaky:
            click.echo(f"  {scenario} turn {turn}: {check}: {sum(outcomes)}/{len(outcomes)}")
    diff = result.get("baseline")
    if diff:
        click.echo(f"against baseline {diff['run']}: {len(diff['regressions'])} regression(s), "
                   f"{len(diff['fixed'])} fixed")
        for entry in diff["regressions"]:
            click.echo(f"  REGRESSION {entry['scenario']} turn {entry['turn']}: {entry['check']} "
                       f"(held {entry['before']:.0%} -> {entry['now']:.0%})")
        for entry in diff["latency"]:
            click.echo(f"  latency {entry['scenario']} turn {entry['turn']}: {entry['before_ms']} -> "
                       f"{entry['now_ms']} ms ({entry['delta_ms']:+d})")


def _upload(run_dir: Path) -> None:
    """`voicebus upload --evals` in a process of its own: the weave client's threads and retries stay there."""
    if not os.environ.get("WANDB_API_KEY"):
        click.echo("not uploaded: WANDB_API_KEY is not set (`voicebus upload --evals` sends it later)")
        return
    command = [sys.executable, "-m", "services.cli", "upload", "--evals", "--root", str(run_dir.parent), run_dir.name]
    code = subprocess.call(command)
    if code != 0:
        click.echo(f"the upload did not complete (exit {code}); the run stays stored: "
                   f"`voicebus upload --evals {run_dir.name}` tries again", err=True)

