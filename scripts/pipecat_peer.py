#!/usr/bin/env python3
"""pipecat's OpenAI Realtime voice bot on local PyAudio devices, pointed at the voicebus simulator.

The peer for scripts/bench_pipeline.py: pipecat's own pipeline (LocalAudioTransport in and out,
OpenAIRealtimeLLMService with server VAD, its context aggregators), unchanged except `base_url`.
Runs in the `.venv-bench` virtualenv that bench_pipeline.py creates (pip's `voicebus[bench]` extra).

    .venv-bench/bin/python scripts/pipecat_peer.py ws://127.0.0.1:8765/v1/realtime
"""

from __future__ import annotations

import asyncio
import sys


async def main(base_url: str) -> None:
    from pipecat.pipeline.pipeline import Pipeline
    from pipecat.pipeline.runner import PipelineRunner
    from pipecat.pipeline.task import PipelineParams, PipelineTask
    from pipecat.processors.aggregators.llm_context import LLMContext
    from pipecat.processors.aggregators.llm_response_universal import LLMContextAggregatorPair
    from pipecat.services.openai.realtime import events
    from pipecat.services.openai.realtime.llm import OpenAIRealtimeLLMService
    from pipecat.transports.local.audio import LocalAudioTransport, LocalAudioTransportParams

    transport = LocalAudioTransport(LocalAudioTransportParams(audio_in_enabled=True, audio_out_enabled=True,
                                                              audio_in_sample_rate=24000,
                                                              audio_out_sample_rate=24000))
    session = events.SessionProperties(audio=events.AudioConfiguration(input=events.AudioInput(
        transcription=events.InputAudioTranscription(model="whisper-1"),
        turn_detection=events.TurnDetection(type="server_vad", threshold=0.3, prefix_padding_ms=300,
                                            silence_duration_ms=600))))
    llm = OpenAIRealtimeLLMService(api_key="pipecat-bench", base_url=base_url,
                                   settings=OpenAIRealtimeLLMService.Settings(model="gpt-realtime",
                                                                              session_properties=session))
    context = LLMContext()
    user_aggregator, assistant_aggregator = LLMContextAggregatorPair(context)
    pipeline = Pipeline([transport.input(), user_aggregator, llm, transport.output(), assistant_aggregator])
    await PipelineRunner(handle_sigint=True).run(PipelineTask(pipeline, params=PipelineParams()))


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
