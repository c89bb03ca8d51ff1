"""Beta <-> GA names of Realtime server events (as the openai SDK's types name them).

The gateway publishes GA names on the bus whatever protocol it speaks, so nothing downstream cares;
the simulator uses the reverse map to speak beta to beta clients.
"""

from __future__ import annotations

BETA_TO_GA = {
    "response.audio.delta": "response.output_audio.delta",
    "response.audio.done": "response.output_audio.done",
    "response.audio_transcript.delta": "response.output_audio_transcript.delta",
    "response.audio_transcript.done": "response.output_audio_transcript.done",
    "response.text.delta": "response.output_text.delta",
    "response.text.done": "response.output_text.done",
    "conversation.item.created": "conversation.item.added",
}
GA_TO_BETA = {ga: beta for beta, ga in BETA_TO_GA.items()}
GA_ONLY = {"conversation.item.done", "input_audio_buffer.timeout_triggered",
           "conversation.item.input_audio_transcription.segment",
           # server-side MCP tools came with GA
           "mcp_list_tools.in_progress", "mcp_list_tools.completed", "mcp_list_tools.failed",
           "response.mcp_call_arguments.delta", "response.mcp_call_arguments.done",
           "response.mcp_call.in_progress", "response.mcp_call.completed", "response.mcp_call.failed"}


def to_ga(event_type: str) -> str:
    return BETA_TO_GA.get(event_type, event_type)


def to_beta(event_type: str) -> str | None:
    """The beta name, or None for events the beta protocol does not have."""
    if event_type in GA_ONLY:
        return None
    return GA_TO_BETA.get(event_type, event_type)
