"""Real ``lmfleet serve sim:...`` replica processes for the gateway's integration
tests: each binds port 0 and reports the port in a file (``--port-file``)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

MODEL = "sim:gwtest"
# fast steps (about 4 ms per token) and an instant "load"
PROFILE = {"gwtest": {"base": "llama-8b-h100", "load_s": 0.05, "fixed_s": 0.004}}


class SimReplica:
    """``lmfleet serve`` on port 0; the port it bound comes back in a file."""

    def __init__(self, tmp: Path, env: dict[str, str], name: str, *flags: str) -> None:
        self.port_file = tmp / f"{name}.port"
        self.port: int | None = None
        self.url = ""
        self.log = open(tmp / f"{name}.log", "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "lmfleet.cli", "serve", MODEL, "--port", "0",
             "--port-file", str(self.port_file), "--host", "127.0.0.1",
             "--disable-uvicorn-access-log", "--api-key", REPLICA_KEY, *flags],
            stdout=self.log, stderr=subprocess.STDOUT, env=env,
        )  # fmt: skip

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"replica exited: {Path(self.log.name).read_text()[-2000:]}")
            if self.port is None:
                if not self.port_file.exists():
                    time.sleep(0.1)
                    continue
                self.port = int(self.port_file.read_text())
                self.url = f"http://127.0.0.1:{self.port}"
            try:
                if httpx.get(self.url + "/health/ready", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError("replica did not become ready")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def close(self) -> None:
        self.kill()
        self.log.close()


#: the replicas run with --api-key: generation and /tokenize need it, the gateway sends it
REPLICA_KEY = "replica-secret"


@contextlib.contextmanager
def sim_replicas(tmp: Path, n: int, *flags: str) -> Iterator[list[SimReplica]]:
    """``n`` ready replicas of the fast test profile, started with ``flags``."""
    profiles = tmp / "profiles.json"
    profiles.write_text(json.dumps(PROFILE))
    env = {**os.environ, "LMFLEET_SIM_PROFILES": str(profiles)}
    reps = [SimReplica(tmp, env, f"replica-{i}", *flags) for i in range(n)]
    try:
        for r in reps:
            r.wait_ready()
        yield reps
    finally:
        for r in reps:
            r.close()
