"""Real ``lmfleet serve`` processes for integration tests: start, wait, talk, stop."""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai


@dataclass
class ServeProcess:
    proc: subprocess.Popen
    port: int
    log: Path
    api_key: str = "none"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self, **kw) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=self.api_key, max_retries=0, **kw)

    def aclient(self) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=f"{self.url}/v1", api_key=self.api_key, max_retries=0)

    def state(self) -> dict:
        return httpx.get(f"{self.url}/state").json()

    def metric(self, name: str) -> float:
        text = httpx.get(f"{self.url}/metrics").text
        match = re.search(rf"^{name}{{[^}}]*}} (\S+)$", text, re.MULTILINE)
        assert match, f"{name} not in /metrics"
        return float(match.group(1))

    def logs(self) -> str:
        return self.log.read_text(errors="replace")


def launch_serve(
    model: str | None,
    log_dir: Path,
    *flags: str,
    api_key: str = "none",
    env: Mapping[str, str] | None = None,
    timeout: float = 60.0,
) -> ServeProcess:
    """Start ``lmfleet serve MODEL`` (no model argument when None: the built-in
    default) on port 0 and return once it listens: the server
    binds before it loads and writes the bound port to ``--port-file`` (no port is
    picked here and reused, so two tests can never race for one). Output goes to a
    log file in ``log_dir``."""
    fd, name = tempfile.mkstemp(dir=log_dir, prefix="serve-", suffix=".log")
    log = Path(name)
    port_file = log.with_suffix(".port")
    cmd = [
        sys.executable, "-m", "lmfleet.cli", "serve", *([model] if model else []),
        "--host", "127.0.0.1",
        "--port", "0", "--port-file", str(port_file), "--disable-uvicorn-access-log", *flags,
    ]  # fmt: skip
    with open(fd, "wb") as out:
        proc = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, env=dict(env) if env else None
        )
    server = ServeProcess(proc, 0, log, api_key)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            server.port = int(port_file.read_text())
            return server
        except (OSError, ValueError):
            pass
        if proc.poll() is not None:
            raise RuntimeError(f"lmfleet serve exited {proc.returncode}:\n{server.logs()}")
        time.sleep(0.05)
    proc.kill()
    proc.wait(30)
    raise TimeoutError(f"lmfleet serve wrote no port in {timeout:g} s:\n{server.logs()}")


def wait_ready(server: ServeProcess, timeout: float = 60.0, *, live_first: bool = False) -> None:
    """Wait for ``/health`` to turn 200; with ``live_first``, also require that
    ``/health/live`` answered 200 before readiness did."""
    deadline = time.monotonic() + timeout
    saw_live = False
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise RuntimeError(f"server exited early:\n{server.logs()}")
        try:
            if live_first:
                live = httpx.get(f"{server.url}/health/live", timeout=1)
                saw_live = saw_live or live.status_code == 200
            if httpx.get(f"{server.url}/health", timeout=1).status_code == 200:
                assert saw_live or not live_first
                return
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    raise TimeoutError(f"server not ready after {timeout}s:\n{server.logs()}")


def stop_all(servers: Iterable[ServeProcess]) -> None:
    for s in servers:
        if s.proc.poll() is None:
            s.proc.kill()
        s.proc.wait(timeout=30)
