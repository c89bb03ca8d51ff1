#!/usr/bin/env bash
# The whole suite on a fresh clone with `stress-ng --cpu N` beside it: what CI sees when it shares a machine.
# usage: bash scripts/suite_under_load.sh [CLONE_DIR] [CPU_WORKERS]   (needs stress-ng: apt-get install stress-ng)
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
clone="${1:-$(mktemp -d /tmp/voicebus-load-XXXXXX)}"
workers="${2:-2}"
command -v stress-ng >/dev/null || { echo "stress-ng is not installed (apt-get install stress-ng)" >&2; exit 2; }
[ -d "$clone/.git" ] || git clone -q "$repo" "$clone"
cd "$clone"
echo "suite_under_load: $(git log --oneline -1) in $clone, stress-ng --cpu $workers beside it, $(date -u +%FT%TZ)"
bash scripts/setup.sh >"$clone/setup.log" 2>&1
stress-ng --cpu "$workers" --timeout 0 --quiet &
stress=$!
trap 'kill $stress 2>/dev/null || true' EXIT
started=$(date +%s)
set +e
CI=true .venv/bin/python -m pytest -q -p no:cacheprovider >"$clone/suite.log" 2>&1
code=$?
tail -40 "$clone/suite.log"
echo "suite_under_load: the whole output is in $clone/suite.log"
set -e
echo "suite_under_load: exit $code after $(( $(date +%s) - started )) s"
exit "$code"
