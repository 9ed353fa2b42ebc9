"""moa's scoring server as a process of its own: :class:`ModelServer` starts it (``python -m
moa.pipelines.serving.serve_command``) on a loopback port, waits for ``/ping`` and stops it; :func:`server_env` is
its environment."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from moa.pipelines.serving.server import Limits, free_port, limit_arguments
from moa.pipelines.tracking.store import resolve_tracking_uri

HOST = "127.0.0.1"


def server_env(tracking_uri: str | None = None) -> dict[str, str]:
    """Environment of a model server: the tracking URI, and this interpreter's scripts (uvicorn) on PATH."""
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    return {**os.environ, "PATH": path, "MLFLOW_TRACKING_URI": resolve_tracking_uri(tracking_uri),
            "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}


class ModelServer:
    """moa's scoring server (:mod:`moa.pipelines.serving.serve_command`) for ``model_uri`` on a loopback port, as a
    context manager.

    ``start()`` returns once ``/ping`` answers (or raises with the server's log); ``stop()`` ends the server's
    process group. The server runs in its own process group, with the tracking URI in its environment only
    (``MLFLOW_TRACKING_URI``: a URI may hold credentials, and a command line is visible to every user). ``limits``
    (a :class:`moa.pipelines.serving.server.Limits`) sets the body, row and time limits; ``docs`` turns on ``/docs``;
    ``engine="ray"`` serves with ``replicas`` Ray Serve replicas on a local Ray cluster the server starts.
    """

    def __init__(self, model_uri: str, *, port: int | None = None, host: str = HOST, tracking_uri: str | None = None,
                 workers: int = 1, log_path: str | Path | None = None, startup_timeout: float = 180.0,
                 limits=None, docs: bool = False, engine: str = "uvicorn", replicas: int = 2):
        self.model_uri, self.host, self.port = model_uri, host, port or free_port(host)
        self.tracking_uri = resolve_tracking_uri(tracking_uri)
        self.workers, self.startup_timeout = workers, startup_timeout
        self.limits, self.docs = limits or Limits(), docs
        self.engine, self.replicas = engine, replicas
        self.log_path = Path(log_path) if log_path else None
        self.process: subprocess.Popen | None = None
        self._log = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def command(self) -> list[str]:
        return [sys.executable, "-m", "moa.pipelines.serving.serve_command", "--model-uri", self.model_uri, "--host", self.host,
                "--port", str(self.port), "--workers", str(self.workers), *limit_arguments(self.limits),
                "--engine", self.engine, "--replicas", str(self.replicas), *(["--docs"] if self.docs else [])]

    def start(self) -> "ModelServer":
        env = server_env(self.tracking_uri)
        if self.log_path is not None:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            self._log = open(self.log_path, "wb")
        self.process = subprocess.Popen(self.command(), env=env, stdout=self._log or subprocess.DEVNULL,
                                        stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the model server exited with code {self.process.returncode} before answering; "
                                   f"{self._tail()}")
            try:
                with urllib.request.urlopen(f"{self.url}/ping", timeout=2) as response:
                    if response.status == 200:
                        return self
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            time.sleep(0.25)
        self.stop()
        raise TimeoutError(f"the model server did not answer /ping within {self.startup_timeout:.0f} s; {self._tail()}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGTERM)
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=10)
            except ProcessLookupError:
                pass
        if self._log is not None:
            self._log.close()
            self._log = None

    def _tail(self) -> str:
        if self.log_path is None or not self.log_path.is_file():
            return "(no server log kept: pass log_path)"
        return "server log tail:\n" + self.log_path.read_text(errors="replace")[-3000:]

    def __enter__(self) -> "ModelServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

