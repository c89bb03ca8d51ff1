"""semantic_vad for the simulator: a turn ends when the phrase sounds finished, not after fixed silence.

OpenAI's semantic VAD is a model of whether the user is done. The simulator's stand-in listens as its
server_vad does (energy, 10 ms frames) for a candidate pause, then reads what was said so far (the same
recogniser that transcribes the turn): a phrase that ends on a word that cannot end one ("and", "the",
"because", "um"...) waits for more, up to the documented maximum for the eagerness (low 8 s, medium and
auto 4 s, high 2 s); a finished phrase ends the turn soon after the pause (sooner the higher the
eagerness). Speech resuming while it waits continues the same turn.
"""

from __future__ import annotations

CANDIDATE_PAUSE_MS = 300  # quiet after words that makes the simulator ask whether the phrase is over
MAX_WAIT_MS = {"low": 8000, "medium": 4000, "auto": 4000, "high": 2000}  # an unfinished phrase, from its last word
FINISHED_WAIT_MS = {"low": 900, "medium": 500, "auto": 500, "high": 300}  # a finished one, from its last word
UNFINISHED_ENDINGS = frozenset({
    "a", "an", "the", "and", "or", "but", "so", "because", "if", "then", "to", "of", "for", "with", "about", "in",
    "on", "at", "from", "into", "my", "your", "our", "their", "his", "her", "its", "that", "which", "who",
    "whose", "when", "while", "like", "um", "uh", "er", "erm", "well", "i", "we", "you"})


def sounds_unfinished(transcript: str) -> bool:
    words = transcript.lower().split()
    return not words or words[-1].strip(".,?!") in UNFINISHED_ENDINGS


def wait_after_words_ms(transcript: str, eagerness: str) -> int:
    """How long after the phrase's last word the turn ends if nobody speaks again."""
    table = MAX_WAIT_MS if sounds_unfinished(transcript) else FINISHED_WAIT_MS
    return table.get(eagerness, table["auto"])
