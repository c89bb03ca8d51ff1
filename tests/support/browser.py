"""Drive Debian's Chromium headless over the DevTools protocol (websocket-client, no extra package).

For the web stage's tests and benchmark: a real browser with a fake microphone that plays a WAV
(`--use-file-for-fake-audio-capture`), real WebRTC, real WebAudio.
"""

from __future__ import annotations

import base64
import contextlib
import itertools
import json
import os
import shutil
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import websocket

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome")


class BrowserError(RuntimeError):
    pass


def find_chromium() -> str:
    for name in CHROMIUM_NAMES:
        path = shutil.which(name)
        if path:
            return path
    raise BrowserError(f"no Chromium found (looked for {', '.join(CHROMIUM_NAMES)}); `bash scripts/setup.sh` "
                       "installs Debian's chromium")


class Chromium:
    """One headless Chromium with one page; `evaluate` runs JS in it and returns the value."""

    def __init__(self, url: str, fake_mic_wav: Path | None = None, allow_mic: bool = True,
                 log_path: Path | None = None, timeout_s: float = 30) -> None:
        self.profile = Path(tempfile.mkdtemp(prefix="vb-chromium-"))
        args = [find_chromium(), "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
                "--no-default-browser-check", "--disable-extensions", "--disable-background-networking",
                "--autoplay-policy=no-user-gesture-required", "--remote-debugging-port=0",
                f"--user-data-dir={self.profile}", "--use-fake-device-for-media-stream"]
        if allow_mic:
            args.append("--use-fake-ui-for-media-stream")  # answers the permission prompt with "allow"
        else:
            args.append("--deny-permission-prompts")
        if fake_mic_wav is not None:
            args.append(f"--use-file-for-fake-audio-capture={fake_mic_wav}%noloop")
        self._log = open(log_path or os.devnull, "wb")  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen([*args, "about:blank"], stdout=self._log, stderr=self._log)
        self._ids = itertools.count(1)
        self.console: list[str] = []  # console lines seen while waiting for answers
        self.ws = self._connect(timeout_s)
        self.call("Page.enable")
        self.call("Runtime.enable")
        if url:
            self.navigate(url)

    def _connect(self, timeout_s: float) -> websocket.WebSocket:
        port_file = self.profile / "DevToolsActivePort"
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise BrowserError(f"chromium exited with {self.proc.returncode} at start")
            if port_file.exists() and port_file.read_text().strip():
                port = port_file.read_text().split()[0]
                with contextlib.suppress(OSError, ValueError):
                    targets = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=5))
                    pages = [t for t in targets if t.get("type") == "page"]
                    if pages:
                        return websocket.create_connection(pages[0]["webSocketDebuggerUrl"], timeout=timeout_s,
                                                           suppress_origin=True)
            time.sleep(0.1)
        raise BrowserError(f"chromium did not open its DevTools port in {timeout_s:.0f} s")

    def call(self, method: str, timeout_s: float = 30, **params: Any) -> dict[str, Any]:
        """One DevTools command; waits for its answer (events meanwhile: console lines are kept)."""
        ident = next(self._ids)
        self.ws.send(json.dumps({"id": ident, "method": method, "params": params}))
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self.ws.settimeout(max(0.1, deadline - time.monotonic()))
            message = json.loads(self.ws.recv())
            if message.get("id") == ident:
                if "error" in message:
                    raise BrowserError(f"{method}: {message['error'].get('message')}")
                return message.get("result", {})
            if message.get("method") == "Runtime.consoleAPICalled":
                args = message["params"].get("args", [])
                self.console.append(" ".join(str(a.get("value", a.get("description", ""))) for a in args))
        raise BrowserError(f"{method}: no answer in {timeout_s:.0f} s")

    def navigate(self, url: str) -> None:
        self.call("Page.navigate", url=url)
        self.wait_for("document.readyState === 'complete'", timeout_s=15)

    def evaluate(self, expression: str, timeout_s: float = 30) -> Any:
        result = self.call("Runtime.evaluate", timeout_s=timeout_s, expression=expression, awaitPromise=True,
                           returnByValue=True)
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            raise BrowserError(f"page error: {details.get('exception', {}).get('description') or details.get('text')}")
        return result.get("result", {}).get("value")

    def wait_for(self, expression: str, timeout_s: float = 30, interval_s: float = 0.1) -> Any:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            value = self.evaluate(expression)
            if value:
                return value
            time.sleep(interval_s)
        raise BrowserError(f"timed out after {timeout_s:.0f} s waiting for: {expression}")

    def recording(self, name: str = "played") -> tuple[np.ndarray, int, float]:
        """What a voicebus page opened with ?record=1 kept: (int16 samples, rate, wall ns of the first).

        "played": what reached its speaker (the first sample's time is when it was output);
        "mic": what its microphone gave the page (time: when the page's audio graph processed it).
        """
        recording = self.evaluate(f"voicebus.recording({name!r})", timeout_s=60)
        if not recording:
            raise BrowserError(f"the page recorded no {name} audio (opened without ?record=1, or nothing played)")
        samples = np.frombuffer(base64.b64decode(recording["pcm"]), dtype="<i2")
        return samples, int(recording["rate"]), float(recording["t0_ms"]) * 1e6

    def screenshot(self, path: Path) -> Path:
        data = self.call("Page.captureScreenshot", format="png")["data"]
        path.write_bytes(base64.b64decode(data))
        return path

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.ws.close()
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        self._log.close()
        shutil.rmtree(self.profile, ignore_errors=True)

    def kill(self) -> None:
        """Vanish without hanging up (as a crashed tab or a lost laptop does)."""
        self.proc.kill()
        self.proc.wait(timeout=5)

    def __enter__(self) -> Chromium:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()
