"""A player whose listener is one remote caller at a time (a browser, a phone line): each caller is a
conversation of its own, and nothing of the last one reaches the next.

The web and phone stages share this: the first caller takes the session the stage was started with
(unless someone ended it first: an eval ends the launch session before its scenarios), each later
one a new session; a message stamped with another session (the rest of the last caller's reply) is
dropped, and so is reply audio that arrives while nobody is on the line. Both are counted.
"""

from __future__ import annotations

from typing import Any

from common.config import new_session_id
from common.envelope import Message
from common.stage import SESSION_END
from services.stages.player import PlayerStage


class CallerStage(PlayerStage):
    def __init__(self, **player: Any) -> None:
        super().__init__(**player)
        self.conversations = 0
        self.other_session_dropped = 0  # messages of a conversation that is over
        self.unheard_dropped = 0  # assistant audio that arrived while no caller was on the line
        # set (the server loop's thread) once the caller's session is adopted, cleared when they are gone
        self.caller_on_line = False
        self._launch_session_ended = False

    def not_for_this_caller(self, message: Message) -> bool:
        """True (and counted) for a message that must not reach the caller on the line now."""
        if message.header.session != self.out.stamper.session and not message.topic.startswith("health."):
            self.other_session_dropped += 1  # the last caller's reply still arriving: not for this one
            return True
        if message.topic == "audio.assistant" and not self.caller_on_line:
            # the rest of a reply to a caller who is gone (its session is still this one until the next
            # caller): nobody hears it, so it is not played, nor reported ten times a second
            self.unheard_dropped += 1
            return True
        return False

    def on_session(self, topic: str, session: str, previous: str) -> None:
        super().on_session(topic, session, previous)
        if topic == SESSION_END and session == self.out.stamper.session and not self.caller_on_line:
            self._launch_session_ended = True  # ended before anyone called: the next caller starts afresh

    def caller_arrived(self) -> str:
        """The session of the caller who has just connected (adopted at once: the caller's audio is
        published from the server loop's thread with it)."""
        fresh = self.conversations > 0 or self._launch_session_ended
        session = new_session_id() if fresh else self.out.stamper.session
        self.conversations += 1
        self.adopt_session(session)
        self.caller_on_line = True
        return session

    def caller_left(self) -> str:
        """The session that has just ended with the caller's leaving."""
        self.caller_on_line = False
        return self.out.stamper.session

    def caller_counters(self) -> dict[str, Any]:
        return {"conversations": self.conversations, "other_session_dropped": self.other_session_dropped,
                "unheard_dropped": self.unheard_dropped}
