#!/usr/bin/env python3
"""pipecat's own SmallWebRTC development runner with its OpenAI Realtime bot, pointed at the simulator.

The peer for scripts/bench_serve.py: one pipecat bot per WebRTC connection (`POST /api/offer`), each
a task in the runner's one process, as pipecat's runner does. The bot is pipecat's own pipeline
(SmallWebRTCTransport in and out, OpenAIRealtimeLLMService with server VAD and Whisper
transcription, its context aggregators), unchanged except `base_url`: the simulator's websocket URL,
from `PIPECAT_PEER_REALTIME_URL`. Runs in `.venv-bench` (pip's `voicebus[bench]` extra).

    PIPECAT_PEER_REALTIME_URL=ws://127.0.0.1:8765/v1/realtime \\
        .venv-bench/bin/python scripts/pipecat_webrtc_peer.py --host 127.0.0.1 --port 7860
"""

from __future__ import annotations

import os

from pipecat.pipeline.pipeline import Pipeline
from pipecat.pipeline.runner import PipelineRunner
from pipecat.pipeline.task import PipelineParams, PipelineTask
from pipecat.processors.aggregators.llm_context import LLMContext
from pipecat.processors.aggregators.llm_response_universal import LLMContextAggregatorPair
from pipecat.runner.types import RunnerArguments
from pipecat.runner.utils import create_transport
from pipecat.services.openai.realtime import events
from pipecat.services.openai.realtime.llm import OpenAIRealtimeLLMService
from pipecat.transports.base_transport import TransportParams


async def bot(runner_args: RunnerArguments) -> None:
    """One conversation: pipecat's Realtime pipeline on this connection's SmallWebRTC transport."""
    transport = await create_transport(runner_args, {
        "webrtc": lambda: TransportParams(audio_in_enabled=True, audio_out_enabled=True)})
    session = events.SessionProperties(audio=events.AudioConfiguration(input=events.AudioInput(
        transcription=events.InputAudioTranscription(model="whisper-1"),
        turn_detection=events.TurnDetection(type="server_vad", threshold=0.3, prefix_padding_ms=300,
                                            silence_duration_ms=600))))
    llm = OpenAIRealtimeLLMService(api_key="pipecat-bench", base_url=os.environ["PIPECAT_PEER_REALTIME_URL"],
                                   settings=OpenAIRealtimeLLMService.Settings(model="gpt-realtime",
                                                                              session_properties=session))
    context = LLMContext()
    user_aggregator, assistant_aggregator = LLMContextAggregatorPair(context)
    pipeline = Pipeline([transport.input(), user_aggregator, llm, transport.output(), assistant_aggregator])
    task = PipelineTask(pipeline, params=PipelineParams())

    @transport.event_handler("on_client_disconnected")
    async def on_client_disconnected(_transport, _client) -> None:
        await task.cancel()

    await PipelineRunner(handle_sigint=False).run(task)


if __name__ == "__main__":
    from pipecat.runner.run import main

    main()
