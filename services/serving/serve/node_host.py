"""One Ray actor per node that runs every conversation placed on that node.

A Ray actor is a worker process of its own: one per conversation cost ~57 MB PSS and ~2 % of a
core (an idle Ray worker, and the front door's status calls to each), a quarter of what a
conversation's own stages cost (README, Benchmarks). So each node has one host, and a conversation
is a `Conversation` (its stage set's launcher, a thread) inside it. Ray still decides where a
conversation goes and holds its slot: the front door reserves a placement group of one
`conversation` bundle and hands the conversation to the host of the node Ray put it on. The
conversations stay apart where it matters: each has its own bus, run dir, stage processes and
session; they share only this launcher process, which does no audio work.

The host is a threaded actor (its calls are short, but `ready` waits for a stage set to start), and
`statuses` answers for all its conversations at once, so the front door asks each node, not each
conversation, twice a second.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from common.log import kv
from services.serving.serve.conversation import Conversation

# calls served at once: every `ready` waits (up to its timeout) for a stage set to start, every
# `offer` for its web stage's answer; a node holds a few tens of conversations at most
HOST_CONCURRENCY = 64

log = logging.getLogger("voicebus.serve")


class UnknownConversation(KeyError):
    """The front door named a conversation this host does not run (stopped, or never started)."""


class NodeHost:
    """A Ray actor (see `services.serving.serve.front`): the conversations of this node, by session."""

    def __init__(self, settings: dict[str, Any]) -> None:
        import ray

        from common.log import setup_logging

        # a Ray worker's root logger is Ray's: ours say what this node's conversations do at serve's level
        setup_logging(settings.get("log_level", "INFO"), logger="voicebus")
        self.settings = settings
        # every conversation here shares these (trace dir, simulator URL): its stages inherit them
        os.environ.update(settings.get("env", {}))
        self.node_id = ray.get_runtime_context().get_node_id()
        self.host = settings.get("media_host") or ray.util.get_node_ip_address()
        self.conversations: dict[str, Conversation] = {}
        self._warm_zygote()

    @staticmethod
    def _warm_zygote() -> None:
        """Import the stages once, now, at full priority: every conversation's stages fork from it."""
        from services.launcher import default_zygote
        from services.zygote import ZygoteError

        zygote = default_zygote()
        if zygote is not None:
            try:
                zygote.start()
            except ZygoteError as exc:  # the first conversation tries again, and reports it
                log.warning(kv("zygote_failed", error=str(exc)))

    def where(self) -> dict[str, Any]:
        return {"node_id": self.node_id, "host": self.host, "pid": os.getpid()}

    def start(self, session: str, prewarm: bool = False, kind: str = "browser") -> None:
        """Start a stage set for `session` (returns at once; `ready` waits for it): a browser's, or a
        phone call's (`kind` "phone")."""
        if session in self.conversations:
            raise ValueError(f"conversation {session} already runs here")
        self.conversations[session] = Conversation(session, self.settings, self.node_id, self.host, prewarm, kind)
        log.info(kv("conversation_started", session=session, prewarm=prewarm, kind=kind, here=len(self.conversations)))

    def ready(self, session: str) -> dict[str, Any]:
        where = self._get(session).ready()
        from services.launcher import default_zygote, release_zygote_imports

        zygote = default_zygote()
        if zygote is not None and not zygote.released:  # the first set here runs: the rest of the imports can go
            release_zygote_imports(zygote)
        return where

    def offer(self, session: str, body: dict[str, Any]) -> dict[str, Any]:
        return self._get(session).offer(body)

    def phone_stream(self, session: str) -> dict[str, str]:
        return self._get(session).phone_stream()

    def hurry(self, session: str) -> None:
        """A caller waits for this prewarmed set (a no-op if it is gone meanwhile: sent without waiting)."""
        if session in self.conversations:
            self.conversations[session].hurry()

    def statuses(self) -> dict[str, dict[str, Any]]:
        """Every conversation's status, by session (one call a node per reaper round). One whose status
        fails says so instead ({"status_error": ...}): its neighbours' answers still arrive."""
        answers: dict[str, dict[str, Any]] = {}
        for session, conversation in list(self.conversations.items()):
            try:
                answers[session] = conversation.status()
            except Exception as exc:  # noqa: BLE001 - reported, asked again next round
                log.warning(kv("status_failed", session=session, error=repr(str(exc)[:200])))
                answers[session] = {"status_error": f"{type(exc).__name__}: {str(exc)[:200]}"}
        return answers

    def stop(self, session: str) -> dict[str, Any]:
        """Stop one conversation's processes and forget it: its last status ({} if it was not running:
        a start that failed half way is stopped the same way, without waiting for the answer)."""
        conversation = self.conversations.get(session)
        if conversation is None:
            return {}
        try:
            return conversation.stop()
        finally:
            self.conversations.pop(session, None)
            log.info(kv("conversation_stopped", session=session, here=len(self.conversations)))

    def _get(self, session: str) -> Conversation:
        try:
            return self.conversations[session]
        except KeyError:
            raise UnknownConversation(session) from None
