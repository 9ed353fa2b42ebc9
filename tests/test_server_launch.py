"""``ModelServer`` gives the tracking URI (which may hold credentials) to the server process in its environment
only: the server's command line, readable by every user of the machine, does not hold it, and the server still
finds the registered model through it (from a working directory whose default store does not have it)."""

from __future__ import annotations

import sys
import urllib.request
from pathlib import Path

import mlflow
import pytest

from moa.pipelines.serving.process import ModelServer

MODEL_CODE = """
import mlflow
class Echo(mlflow.pyfunc.PythonModel):
    def predict(self, context, model_input, params=None):
        return model_input
mlflow.models.set_model(Echo())
"""


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/<pid>/cmdline and environ")
def test_the_server_gets_the_tracking_uri_from_its_environment_not_its_command_line(tmp_path, monkeypatch):
    store = tmp_path / "store"
    store.mkdir()
    uri = f"sqlite:///{store / 'mlflow.db'}"
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        (store / "echo.py").write_text(MODEL_CODE)
        experiment = mlflow.create_experiment("echo", artifact_location=(store / "artifacts").as_uri())
        with mlflow.start_run(experiment_id=experiment):
            info = mlflow.pyfunc.log_model(name="echo", python_model=str(store / "echo.py"),
                                           registered_model_name="echo", pip_requirements=["mlflow"])
        assert info.registered_model_version == 1
    finally:
        mlflow.set_tracking_uri(previous)
    elsewhere = tmp_path / "elsewhere"  # the server's working directory: its default store has no model
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)

    server = ModelServer("models:/echo/1", tracking_uri=uri, log_path=tmp_path / "server.log", startup_timeout=120)
    assert "--tracking-uri" not in server.command() and uri not in " ".join(server.command())
    with server:
        pid = server.process.pid
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        assert b"moa.pipelines.serving.serve_command" in argv  # the server itself, not a wrapper
        assert not [arg for arg in argv if str(store).encode() in arg or b"tracking" in arg], argv
        environ = dict(item.split(b"=", 1) for item in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0") if item)
        assert environ[b"MLFLOW_TRACKING_URI"] == uri.encode()
        with urllib.request.urlopen(f"{server.url}/ping", timeout=10) as response:  # answers once the model loaded
            assert response.status == 200
