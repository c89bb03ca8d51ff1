"""Was that an interruption? With the false-interruption policy on, the user speaking over a reply pauses
it instead of cutting it, and what they said decides: a backchannel ("mhmm", "yeah", "ok") or nothing
recognisable, short, resumes the reply where it paused, and nothing is truncated; anything else is an
interruption, cut at the played position as a barge-in always is.

LiveKit's `resume_false_interruption` resumes on a timer alone (a cough and "stop" look the same until
the timer runs out); here the words decide, and speech too long to be a backchannel decides at once.
Two gates come first, as pipecat's interruption strategies have them: speech shorter than
`min_speech_s` (a cough, a chair) and fewer than `min_words` words ("wait" alone, when 2 are asked
for) never cut the reply.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

BACKCHANNELS = frozenset({
    "mhmm", "mm", "mmm", "hmm", "mm hmm", "uh huh", "uhhuh", "ah", "oh", "yeah", "yes", "yep", "ok", "okay",
    "right", "sure", "i see", "got it", "alright", "all right", "nice", "cool", "wow", "huh"})
MAX_BACKCHANNEL_S = 1.5  # speech longer than this is not a backchannel, whatever it says
# a hum as a recogniser writes it: "hmm" comes out as "h m m", "mm" as "m m"
HUM = re.compile(r"[mhn]{1,4}")
MAX_BACKCHANNEL_WORDS = 4  # the same for words: "yeah yeah ok" is one, "yes but what about that" is not


@dataclass
class InterruptionPolicy:
    backchannels: frozenset[str] = field(default_factory=lambda: BACKCHANNELS)
    max_speech_s: float = MAX_BACKCHANNEL_S
    max_words: int = MAX_BACKCHANNEL_WORDS
    min_speech_s: float = 0.0  # shorter speech never interrupts
    min_words: int = 0  # fewer words never interrupt (0: the backchannel list alone decides)

    def too_long(self, speech_s: float) -> bool:
        return speech_s > self.max_speech_s

    def judge(self, transcript: str, speech_s: float | None) -> tuple[bool, str]:
        """(resume, why): whether the paused reply goes on, and the reason the trace gives for it."""
        if speech_s is not None and speech_s < self.min_speech_s:
            return True, f"shorter than {self.min_speech_s:g} s"
        words = re.findall(r"[a-z']+", transcript.lower())
        if len(words) < self.min_words:
            return True, f"fewer than {self.min_words} word{'s' if self.min_words > 1 else ''}"
        if self.is_backchannel(transcript):
            return True, "backchannel" if words else "nothing recognisable"
        return False, "not a backchannel"

    def is_backchannel(self, transcript: str) -> bool:
        """Nothing recognisable, or only backchannel words (each, or the whole phrase, in the list)."""
        words = re.findall(r"[a-z']+", transcript.lower())
        if not words:
            return True
        if len(words) > self.max_words:
            return False
        return " ".join(words) in self.backchannels or all(word in self.backchannels or HUM.fullmatch(word)
                                                             for word in words)
