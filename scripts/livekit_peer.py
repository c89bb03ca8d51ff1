#!/usr/bin/env python3
"""LiveKit Agents' OpenAI Realtime voice agent in console mode, pointed at the voicebus simulator.

The peer for scripts/bench_pipeline.py: LiveKit's own `AgentSession` with livekit-plugins-openai's
`RealtimeModel` (server VAD, its defaults) and the framework's console mode, which does local audio
I/O with sounddevice (PortAudio) and needs no LiveKit server. Unchanged but for `base_url`. Runs in
the `.venv-bench` virtualenv that bench_pipeline.py creates (pip's `voicebus[bench]` extra).

    .venv-bench/bin/python scripts/livekit_peer.py http://127.0.0.1:8765/v1 console
"""

from __future__ import annotations

import sys

from livekit.agents import Agent, AgentSession, JobContext, WorkerOptions, cli
from livekit.plugins import openai

BASE_URL = sys.argv.pop(1)


async def entrypoint(ctx: JobContext) -> None:
    session = AgentSession(llm=openai.realtime.RealtimeModel(model="gpt-realtime", base_url=BASE_URL,
                                                             api_key="livekit-bench"))
    await session.start(agent=Agent(instructions="You are a helpful voice assistant."), room=ctx.room)


if __name__ == "__main__":
    cli.run_app(WorkerOptions(entrypoint_fnc=entrypoint))
