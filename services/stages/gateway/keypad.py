"""Keys a caller pressed on the phone (DTMF, `phone.dtmf`), told to the model as one user turn.

A caller types a number key by key: the keys are gathered until `end_key` (#) is pressed or none
has come for `wait_s`, then said to the model as one text item ("The caller pressed 1 2 #"), with
a response asked for. The first key over a reply that is playing cuts it as speech would (a caller
pressing keys during a menu wants the menu to stop), at the position the phone played.
"""

from __future__ import annotations

from dataclasses import dataclass

END_KEY = "#"
WAIT_S = 1.5  # pipecat's DTMF aggregator waits 2 s; a caller typing a short menu choice is done sooner


def keys_text(keys: str) -> str:
    """What the model is told: every key spelled apart (a model reads "12" as twelve)."""
    return f"The caller pressed {' '.join(keys)} on the phone keypad."


@dataclass
class KeyPad:
    wait_s: float = WAIT_S
    end_key: str = END_KEY
    keys: str = ""
    last_at: float = 0.0
    last_t_ns: int = 0  # bus time of the last key: where the "turn" ended, for latency

    def press(self, key: str, now: float, t_ns: int) -> str | None:
        """A key; the keys typed so far when it ends them (the end key), else None."""
        self.keys += key
        self.last_at, self.last_t_ns = now, t_ns
        return self.take() if key == self.end_key else None

    def due(self, now: float) -> str | None:
        """The keys typed, once none has come for `wait_s`; else None."""
        return self.take() if self.keys and now - self.last_at >= self.wait_s else None

    def take(self) -> str:
        keys, self.keys = self.keys, ""
        return keys
