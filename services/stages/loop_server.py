"""A stage's own asyncio server, on a thread of its own: the web stage's browser link and the phone
stage's line are these. Started from the runner thread, so a port that is taken (or any failure to
serve) is raised there, as the stage's start failing, in one plain line; stopped with bounded waits,
so a stage never hangs on its way out."""

from __future__ import annotations

import asyncio
import logging
import threading

from common.log import kv
from common.stage import StageError

START_TIMEOUT_S = 30.0
log = logging.getLogger("voicebus.stage")


class RemoteOutput:
    """The player's sink contract for an output across a network (a browser, a phone carrier): paced by the
    call's own clock, so nothing here pauses or resumes; what the far side still holds is the stage's to
    subtract from what it sent (its `current_state`)."""

    output_underflows = 0  # the far side conceals its own; what the caller heard is counted there
    paused, pauses, callbacks = False, 0, 0

    def resume(self) -> None:
        pass

    def pause_when_idle(self, buffer: object) -> None:
        pass

    def unheard_s(self) -> float:
        return 0.0

    def drop_unheard(self) -> float:
        return 0.0


class LoopServer:
    what = "server"  # for messages: "the web server did not start"
    busy_port_hint = "--port 0 picks a free port"

    def __init__(self, host: str, port: int, thread_name: str) -> None:
        self.host, self.port = host, port
        self.loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._failed: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=thread_name, daemon=True)

    async def _serve(self) -> None:
        """Start serving (in the loop's thread)."""
        raise NotImplementedError

    async def _shutdown(self) -> None:
        """End what is connected and stop serving (in the loop's thread)."""
        raise NotImplementedError

    def start(self) -> None:
        self._thread.start()
        self._ready.wait(timeout=START_TIMEOUT_S)
        if isinstance(self._failed, OSError):
            raise StageError(f"cannot serve on {self.host}:{self.port}: {self._failed.strerror or self._failed} "
                             f"({self.busy_port_hint})") from self._failed
        if self._failed is not None:
            raise self._failed
        if not self._ready.is_set():
            raise RuntimeError(f"the {self.what} did not start in {START_TIMEOUT_S:.0f} s")

    def stop(self) -> None:
        if self._thread.is_alive():
            future = asyncio.run_coroutine_threadsafe(self._shutdown(), self.loop)
            try:
                future.result(timeout=3)
            except Exception as exc:  # noqa: BLE001 - stopping: say it, do not hang
                log.warning(kv("stop_failed", server=self.what, error=repr(exc)))
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout=2)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_until_complete(self._serve())
        except BaseException as exc:  # noqa: BLE001 - reported to start() in the runner thread
            self._failed = exc
            self._ready.set()
            return
        self._ready.set()
        self.loop.run_forever()
