"""One-line, key=value logs on stderr, and a rate limiter so a flood of bad input cannot flood the log."""

from __future__ import annotations

import logging
import sys
import time

LOG_FORMAT = "%(asctime)s.%(msecs)03d %(levelname)-5s %(name)s %(message)s"
RATE_LIMIT_INTERVAL_S = 5.0


def setup_logging(level: str = "INFO", logger: str | None = None) -> None:
    """The root logger, or only `logger` and its children (in a process whose root logger is not ours:
    a Ray worker's)."""
    if logger is None:
        logging.basicConfig(level=level.upper(), format=LOG_FORMAT, datefmt="%H:%M:%S", stream=sys.stderr,
                            force=True)
        return
    ours = logging.getLogger(logger)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(LOG_FORMAT, datefmt="%H:%M:%S"))
    ours.handlers[:] = [handler]
    ours.setLevel(level.upper())
    ours.propagate = False


def kv(event: str, **fields: object) -> str:
    """`event key=value ...`: easy to grep, easy to read."""
    return " ".join([event, *(f"{k}={v}" for k, v in fields.items())])


class RateLimitedLog:
    """Logs the first occurrence of each reason, then at most one line per interval with a count."""

    def __init__(self, logger: logging.Logger, interval_s: float = RATE_LIMIT_INTERVAL_S) -> None:
        self.logger = logger
        self.interval_s = interval_s
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def warning(self, reason: str, message: str) -> None:
        now = time.monotonic()
        last = self._last.get(reason)
        if last is not None and now - last < self.interval_s:
            self._suppressed[reason] = self._suppressed.get(reason, 0) + 1
            return
        suppressed = self._suppressed.pop(reason, 0)
        self._last[reason] = now
        suffix = f" (+{suppressed} more since last report)" if suppressed else ""
        self.logger.warning("%s%s", message, suffix)
