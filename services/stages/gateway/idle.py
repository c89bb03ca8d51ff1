"""Nobody has spoken for a while: ask whether they are still there, and after a few unanswered asks end
the call (what a phone agent does; OpenAI's `idle_timeout_ms` only makes the model improvise a reply).

The line is quiet when the user is not speaking, no response is being made and nothing is playing at
the listener. Quiet for `timeout_s`: the gateway speaks the prompt (a response whose instructions say
it exactly). The user speaking starts the count of prompts again; quiet again after `max_prompts`
prompts: the conversation ends (`rt.gateway.idle_end`; a web stage hangs up on it).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class IdleWatch:
    timeout_s: float
    prompt: str = "Are you still there?"
    max_prompts: int = 2
    quiet_since: float | None = None
    prompts: int = 0
    ended: bool = False

    def heard_user(self) -> None:
        """They spoke: whatever was asked is answered."""
        self.prompts, self.quiet_since = 0, None

    def check(self, quiet: bool, now: float) -> str | None:
        """"prompt" or "end" when it is time for one (each once), else None."""
        if self.ended or not quiet:
            self.quiet_since = None
            return None
        if self.quiet_since is None:
            self.quiet_since = now
            return None
        if now - self.quiet_since < self.timeout_s:
            return None
        self.quiet_since = None  # quiet again only after what is said now has been said
        if self.prompts < self.max_prompts:
            self.prompts += 1
            return "prompt"
        self.ended = True
        return "end"
