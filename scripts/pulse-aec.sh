#!/usr/bin/env bash
# Add PulseAudio's WebRTC echo canceller to the voicebus rig (run scripts/pulse-up.sh first).
# Play into sink voicebus_speaker_aec (player --pulse-sink voicebus_speaker_aec) and capture from
# source voicebus_mic_aec (mic --pulse-source voicebus_mic_aec): what the speaker plays is removed
# from what the mic hears. Measured on the virtual rig (see README): it removes the echo but also
# attenuates a user talking over the assistant, so voicebus's own --echo-guard is the default.
# usage: scripts/pulse-aec.sh [load|unload]
set -euo pipefail
export XDG_RUNTIME_DIR="${XDG_RUNTIME_DIR:-/tmp/voicebus-pulse}"
case "${1:-load}" in
  load)
    pactl list short sources | awk '{print $2}' | grep -qx voicebus_mic_aec || \
      pactl load-module module-echo-cancel source_master=voicebus_mic sink_master=voicebus_speaker \
        aec_method=webrtc source_name=voicebus_mic_aec sink_name=voicebus_speaker_aec \
        'aec_args="analog_gain_control=0 digital_gain_control=0 noise_suppression=0 high_pass_filter=0"' >/dev/null
    echo "echo canceller: play into voicebus_speaker_aec, capture from voicebus_mic_aec" ;;
  unload)
    for id in $(pactl list short modules | awk '/module-echo-cancel/ {print $1}'); do pactl unload-module "$id"; done
    echo "echo canceller unloaded" ;;
  *) echo "usage: $0 [load|unload]" >&2; exit 2 ;;
esac
