#!/usr/bin/env bash
# Stop the PulseAudio rig started by pulse-up.sh (keep-alive stream first, then the daemon).
set -u
export XDG_RUNTIME_DIR="${XDG_RUNTIME_DIR:-/tmp/voicebus-pulse}"
KA="$XDG_RUNTIME_DIR/mic-keepalive.pid"
[ -f "$KA" ] && kill "$(cat "$KA")" 2>/dev/null; rm -f "$KA"
PID_FILE="$XDG_RUNTIME_DIR/pulse/pid"
if [ -f "$PID_FILE" ]; then
  pid="$(cat "$PID_FILE")"; kill "$pid" 2>/dev/null
  for _ in $(seq 60); do kill -0 "$pid" 2>/dev/null || break; sleep 0.05; done
fi
echo "pulse-down: stopped"
