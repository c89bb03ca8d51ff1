"""`serve`'s embedded Ray: Ray 2.60 cannot bind its gRPC servers to loopback alone (they listen on every
interface, whatever a node advertises), so what keeps another client out is Ray's token auth, required
here, with the token file readable by its owner only. Tried as another local user or host would: joining
with no token, with a wrong one, and with auth turned off on their side."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(240)

REPO = Path(__file__).resolve().parents[2]

# started as `serve` starts it; prints the GCS address and the token file's mode, then waits to be told to go
EMBEDDED = """
import json, stat, sys
from services.serving.serve.server import private_ray_token, start_ray
start_ray(None, 1)
import ray
token = private_ray_token(create=False)
print(json.dumps({"gcs": ray.get_runtime_context().gcs_address,
                  "mode": stat.S_IMODE(token.stat().st_mode)}), flush=True)
sys.stdin.readline()
ray.shutdown()
"""

JOIN = "import ray, sys; ray.init(address=sys.argv[1], logging_level='ERROR'); print('JOINED', flush=True)"


def _env(home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "VOICEBUS_"))}
    return {**env, "HOME": str(home), "PYTHONPATH": str(REPO), **extra}


def test_the_embedded_ray_takes_no_client_without_its_token_and_keeps_the_token_private(tmp_path):
    home, stranger = tmp_path / "operator", tmp_path / "stranger"
    (stranger / ".ray").mkdir(parents=True)
    home.mkdir()
    serve = subprocess.Popen([sys.executable, "-c", EMBEDDED], env=_env(home), cwd=REPO, text=True,
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        line = serve.stdout.readline()
        assert line, serve.stderr.read()
        started = json.loads(line)
        assert started["mode"] == 0o600 and stat.S_IMODE((home / ".ray").stat().st_mode) == 0o700
        outcomes = {}
        (stranger / ".ray" / "auth_token").write_text("not-the-token-" + "0" * 32)
        for name, env in {"no token": _env(tmp_path / "nobody", RAY_AUTH_MODE="token"),
                          "auth off": _env(tmp_path / "nobody", RAY_AUTH_MODE="disabled"),
                          "wrong token": _env(stranger, RAY_AUTH_MODE="token")}.items():
            joined = subprocess.run([sys.executable, "-c", JOIN, started["gcs"]], env=env, capture_output=True,
                                    text=True, timeout=90)
            outcomes[name] = (joined.returncode, "JOINED" in joined.stdout)
        # the operator, with the token, does join: the refusals above are the token's doing
        with_token = subprocess.run([sys.executable, "-c", JOIN, started["gcs"]], env=_env(home, RAY_AUTH_MODE="token"),
                                   capture_output=True,
                                    text=True, timeout=90)
    finally:
        serve.communicate("\n", timeout=60)
    assert all(code != 0 and not joined for code, joined in outcomes.values()), outcomes
    assert with_token.returncode == 0 and "JOINED" in with_token.stdout, with_token.stderr[-2000:]
