"""Cutting a transcript to the part that was heard (used by the gateway and the simulator alike)."""

from __future__ import annotations


def cut_transcript(text: str, fraction: float) -> str:
    """The words whose character-proportional time falls within the first `fraction` of the audio."""
    if fraction >= 1.0:
        return text
    kept: list[str] = []
    position = 0
    for word in text.split():
        position += len(word) + 1
        if position / max(len(text), 1) > fraction:
            break
        kept.append(word)
    return " ".join(kept)
