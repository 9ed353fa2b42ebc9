"""A model URI the registry cannot resolve (an unknown model, version or alias) is one line naming it, from every
command that takes one: ``moa serve`` (the real command, as a subprocess), ``moa batch`` and the expert library."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

MOA = str(Path(sys.executable).with_name("moa"))


@pytest.fixture
def store(tmp_path, monkeypatch):
    """A store holding the model ``known``, version 1 at ``@champion``, and the model ``other``."""
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    client = MlflowClient(uri)
    for name in ("known", "other"):
        client.create_registered_model(name)
    (tmp_path / "model").mkdir()
    version = client.create_model_version("known", source=str(tmp_path / "model"))
    client.set_registered_model_alias("known", "champion", version.version)
    return uri


def test_moa_serve_of_an_unknown_name_is_one_line_naming_the_registered_ones(store, tmp_path):
    done = subprocess.run([MOA, "serve", "--name", "nosuch"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "MLFLOW_TRACKING_URI": store})
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1, done.stderr[-3000:]
    assert "models:/nosuch@champion: no registered model 'nosuch'" in lines[0]
    assert "registered: known, other" in lines[0]


@pytest.mark.parametrize("args, message", [
    (["serve", "--name", "known", "--alias", "gold"],
     "models:/known@gold: model 'known' has no alias @gold (its aliases: @champion -> v1; versions: [1])"),
    (["serve", "--model-uri", "models:/known/3"], "models:/known/3: model 'known' has no version 3 (its versions: [1])"),
    (["batch", "--model-uri", "models:/nosuch/1", "--input", "rows.jsonl"],
     "models:/nosuch/1: no registered model 'nosuch' in this MLflow store (registered: known, other)"),
    (["batch", "--model-uri", "models:/other@champion", "--input", "rows.jsonl"],
     "models:/other@champion: model 'other' has no alias @champion (its aliases: none; versions: [])"),
])
def test_every_command_names_the_missing_model_version_or_alias_in_one_line(store, tmp_path, monkeypatch, capsys,
                                                                           args, message):
    from moa.pipelines.cli.command import main

    monkeypatch.chdir(tmp_path)
    assert main(args) == 2
    error = capsys.readouterr().err
    assert error.strip().splitlines()[-1] == f"moa {args[0]}: error: {message}  (MOA_DEBUG=1 shows the traceback)"
    assert "Traceback" not in error
