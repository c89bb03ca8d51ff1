#!/usr/bin/env bash
# Make a test utterance: flite speaks TEXT with VOICE, sox converts it to RATE Hz and CHANNELS.
# usage: scripts/make_speech.sh "text" out.wav [voice=slt|rms|awb|kal16] [rate=48000] [channels=1]
# flite rather than espeak-ng: pocketsphinx transcribes flite voices with ~5 % WER, espeak-ng ~85 %.
set -euo pipefail
[ $# -ge 2 ] || { echo "usage: $0 TEXT OUT.wav [VOICE] [RATE] [CHANNELS]" >&2; exit 2; }
text="$1"; out="$2"; voice="${3:-slt}"; rate="${4:-48000}"; channels="${5:-1}"
command -v flite >/dev/null || { echo "make_speech: flite not found (scripts/setup.sh installs it)" >&2; exit 1; }
command -v sox >/dev/null || { echo "make_speech: sox not found (scripts/setup.sh installs it)" >&2; exit 1; }
raw="$(mktemp --suffix=.wav)"; trap 'rm -f "$raw"' EXIT
flite -voice "$voice" -t "$text" -o "$raw"
sox "$raw" -r "$rate" -c "$channels" -b 16 -e signed-integer "$out"
echo "$out: $(soxi -D "$out")s at ${rate} Hz, ${channels} ch, voice $voice"
