#!/usr/bin/env python3
"""Run the chaos suite (tests/chaos) and print one table: what was tried, what survived, what was lost.

    .venv/bin/python scripts/chaos_report.py [--readme]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import REPO, machine  # noqa: E402

README_START, README_END = "<!-- chaos:start -->", "<!-- chaos:end -->"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--readme", action="store_true", help="Also write the table into docs/benchmarks.md.")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "chaos.jsonl"
        started = time.monotonic()
        # -n 0: one case at a time, as the figures before were measured (not beside another case)
        result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-n", "0", "-p", "no:cacheprovider",
                                 "tests/chaos"],
                                cwd=REPO, env={**os.environ, "VOICEBUS_CHAOS_REPORT": str(report)},
                                capture_output=True, text=True)
        rows = [json.loads(line) for line in report.read_text().splitlines()] if report.exists() else []
    summary = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else "(no output)"
    lines = [f"chaos_report {time.strftime('%Y-%m-%d')} on {machine()}; {time.monotonic() - started:.0f} s; "
             f"pytest: {summary}", "", "| case | tried | survived | data lost | figures |", "|---|---:|---:|---:|---|"]
    for row in rows:
        figures = {k: v for k, v in row.items() if k not in ("case", "tried", "survived", "lost", "test")}
        if "details" in figures:
            figures["details"] = "; ".join(f"{d['victim']}: healthy in {d['time_to_healthy_s']} s, next turn "
                                           f"{d['next_turn_s']} s" for d in figures["details"])
        text = ", ".join(f"{k}={v}" for k, v in figures.items())
        lines.append(f"| {row['case']} | {row['tried']} | {row['survived']} | {row['lost']} | {text} |")
    table = "\n".join(lines)
    print(table)
    if args.readme and result.returncode == 0:
        readme = REPO / "docs" / "benchmarks.md"
        text = readme.read_text()
        if README_START in text:
            head, rest = text.split(README_START, 1)
            readme.write_text(head + README_START + "\n" + table + "\n" + README_END + rest.split(README_END, 1)[1])
    if result.returncode != 0:
        print(result.stdout[-3000:], file=sys.stderr)
    return result.returncode


if __name__ == "__main__":
    sys.exit(main())
