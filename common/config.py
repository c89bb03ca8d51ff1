"""Where the bus lives and which OpenAI endpoint the gateway talks to.

One place reads the environment so that `voicebus up`, `honcho start` and a stage started by hand
all agree on the endpoints.
"""

from __future__ import annotations

import os
import stat
import time
from dataclasses import dataclass
from pathlib import Path

SIMULATOR_DEFAULT_PORT = 8765
SIMULATOR_API_KEY = "voicebus-local-simulator"  # not a secret: the simulator accepts any key


class RunDirError(RuntimeError):
    """The run directory cannot be trusted (another user's, or a symlink): the message says which and why."""


def run_dir() -> Path:
    """The 0700 directory that holds the ipc sockets (created on first use)."""
    configured = os.environ.get("VOICEBUS_RUN_DIR")
    if configured:
        path = Path(configured)
    elif os.environ.get("XDG_RUNTIME_DIR"):
        path = Path(os.environ["XDG_RUNTIME_DIR"]) / "voicebus"
    else:
        path = Path(f"/tmp/voicebus-{os.getuid()}")
    return private_dir(path)


def private_dir(path: Path) -> Path:
    """`path` as a directory only this user can enter: made 0700, or, found there, checked before use.

    In a shared place like /tmp another user could have made it first (and would then own our sockets),
    or planted a symlink to somewhere else: both are refused, never chmod-ed or followed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        path.mkdir(mode=0o700)
    except FileExistsError:
        pass
    info = os.lstat(path)
    if stat.S_ISLNK(info.st_mode):
        raise RunDirError(f"{path} is a symlink: refusing it as voicebus's run directory (its sockets would go "
                          f"where it points); remove it, or set VOICEBUS_RUN_DIR to a directory of your own")
    if not stat.S_ISDIR(info.st_mode):
        raise RunDirError(f"{path} is not a directory; remove it, or set VOICEBUS_RUN_DIR")
    if info.st_uid != os.geteuid():
        raise RunDirError(f"{path} belongs to uid {info.st_uid}, not to you (uid {os.geteuid()}): another user "
                          f"made it first; refusing it (set VOICEBUS_RUN_DIR to a directory of your own)")
    if info.st_mode & 0o077:
        os.chmod(path, 0o700)  # ours and no symlink: tightened
    return path


@dataclass(frozen=True)
class BusConfig:
    """Endpoints of the proxy: publishers connect to `pub`, subscribers to `sub`."""

    pub: str
    sub: str
    curve_dir: Path | None = None

    @property
    def is_tcp(self) -> bool:
        return self.pub.startswith("tcp://") or self.sub.startswith("tcp://")


def bus_config(pub: str | None = None, sub: str | None = None, curve_dir: str | None = None) -> BusConfig:
    """Flags win over `VOICEBUS_BUS_PUB`/`VOICEBUS_BUS_SUB`, which win over ipc:// in the run dir."""
    pub = pub or os.environ.get("VOICEBUS_BUS_PUB")
    sub = sub or os.environ.get("VOICEBUS_BUS_SUB")
    if not pub or not sub:
        directory = run_dir()
        pub = pub or f"ipc://{directory}/bus-pub.sock"
        sub = sub or f"ipc://{directory}/bus-sub.sock"
    curve = curve_dir or os.environ.get("VOICEBUS_CURVE_DIR")
    return BusConfig(pub=pub, sub=sub, curve_dir=Path(curve) if curve else None)


def session_id() -> str:
    """The conversation name carried in every header (`VOICEBUS_SESSION`, else a fresh one)."""
    return os.environ.get("VOICEBUS_SESSION") or new_session_id()


def new_session_id() -> str:
    return time.strftime("s%Y%m%d-%H%M%S-", time.gmtime()) + os.urandom(3).hex()


@dataclass(frozen=True)
class OpenAITarget:
    """Where the gateway and `say` connect, and whether that is the local simulator."""

    base_url: str  # http(s)://host/v1, as the openai SDK takes it
    api_key: str
    is_simulator: bool


def openai_target() -> OpenAITarget:
    """Real OpenAI when `OPENAI_API_KEY` is set; otherwise the simulator (the offline default)."""
    key = os.environ.get("OPENAI_API_KEY")
    if key:
        base = os.environ.get("OPENAI_BASE_URL") or "https://api.openai.com/v1"
        return OpenAITarget(base_url=base.rstrip("/"), api_key=key, is_simulator=False)
    port = int(os.environ.get("VOICEBUS_SIM_PORT", SIMULATOR_DEFAULT_PORT))
    base = os.environ.get("VOICEBUS_SIM_URL") or f"http://127.0.0.1:{port}/v1"
    return OpenAITarget(base_url=base.rstrip("/"), api_key=SIMULATOR_API_KEY, is_simulator=True)


def realtime_ws_url(base_url: str, model: str) -> str:
    """The websocket URL the openai SDK's realtime client derives from its base URL."""
    scheme, rest = base_url.split("://", 1)
    ws_scheme = {"https": "wss", "http": "ws"}.get(scheme, scheme)
    return f"{ws_scheme}://{rest.rstrip('/')}/realtime?model={model}"
