"""A model kind a user writes in their own module plugs into moa with no edit to moa: a tiny linear regressor
(module, bundle writer, service, signature, gate) registered with ``register_kind`` in a file next to the user's
config, found through ``MOA_KINDS``. The real ``moa fit`` (LogBundle registers it), ``moa serve`` over real HTTP
and ``moa batch`` run as subprocesses; the expected answers are computed here from the bundle's saved weights."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pandas as pd
import pytest
import yaml
from safetensors.torch import load_file

from moa.experts.errors import UserError
from moa.pipelines.bundle import ModelKind, get_kind, register_kind
from moa.pipelines.serving.client import post
from moa.pipelines.serving.server import free_port

MOA = str(Path(sys.executable).with_name("moa"))
BOUND = 120  # seconds: the most a wait lasts (never reached when all is well)

USER_MODULE = '''
"""A user's own model kind: y = w . (x1, x2) + b, bundled as safetensors."""
import json
from pathlib import Path

import lightning as L
import pandas as pd
import torch
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader, TensorDataset

from moa.atomic import atomic_folder, readable, verify
from moa.pipelines.bundle import ModelKind, RequestError, register_kind


class ToyData(L.LightningDataModule):
    def __init__(self, n: int = 64):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 2, generator=g)
        self.y = self.x @ torch.tensor([2.0, -3.0]) + 0.5

    def train_dataloader(self):
        return DataLoader(TensorDataset(self.x, self.y), batch_size=16)

    def val_dataloader(self):
        return DataLoader(TensorDataset(self.x, self.y), batch_size=64)


class ToyRegressor(L.LightningModule):
    bundle_kind = "toy-regressor"

    def __init__(self, lr: float = 0.1):
        super().__init__()
        self.lr = lr
        self.linear = torch.nn.Linear(2, 1)

    def _loss(self, batch):
        x, y = batch
        return torch.nn.functional.mse_loss(self.linear(x).squeeze(-1), y)

    def training_step(self, batch, batch_idx):
        return self._loss(batch)

    def validation_step(self, batch, batch_idx):
        self.log("val/mse", self._loss(batch))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)

    def write_bundle(self, directory, datamodule=None, *, metrics=None, base="include"):
        with atomic_folder(Path(directory)) as tmp:
            save_file({k: v.detach().contiguous() for k, v in self.linear.state_dict().items()},
                      str(tmp / "weights.safetensors"))
            meta = {"kind": "toy-regressor", "metrics": {k: float(v) for k, v in (metrics or {}).items()}}
            (tmp / "service.json").write_text(json.dumps(meta))
        return Path(directory)


class ToyService:
    def __init__(self, weights):
        self.weight, self.bias = weights["weight"], weights["bias"]

    @classmethod
    def from_bundle(cls, directory):
        folder = readable(directory)
        verify(folder)
        return cls(load_file(str(folder / "weights.safetensors")))

    def predict(self, frame, params=None):
        if params:
            raise RequestError(f"unknown params {sorted(params)}; a toy regressor takes none")
        missing = [c for c in ("x1", "x2") if c not in frame.columns]
        if missing:
            raise RequestError(f"missing input columns {missing}")
        x = torch.tensor(frame[["x1", "x2"]].to_numpy(dtype="float32"))
        return pd.DataFrame({"y": (x @ self.weight.T + self.bias).squeeze(-1).tolist()})


def signature(meta):
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    return ModelSignature(inputs=Schema([ColSpec("double", "x1"), ColSpec("double", "x2")]),
                          outputs=Schema([ColSpec("double", "y")]))


register_kind(ModelKind(name="toy-regressor", service=ToyService, gate=("val/mse", "min"), signature=signature,
                        input_example=lambda folder: pd.DataFrame({"x1": [1.0], "x2": [2.0]}),
                        modules=("toykind.ToyRegressor",)))
'''


def run(args, cwd, env, ok=True):
    done = subprocess.run([MOA, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert (done.returncode == 0) == ok, f"moa {' '.join(args)}: {done.returncode}\n{(done.stdout + done.stderr)[-4000:]}"
    return done.stdout + done.stderr


def expected(bundle: Path, rows: list[tuple[float, float]]) -> list[float]:
    """The regressor by hand from the bundle's saved weights."""
    w = load_file(str(bundle / "weights.safetensors"))
    (a, b), c = w["weight"][0].tolist(), w["bias"].item()
    return [a * x1 + b * x2 + c for x1, x2 in rows]


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    root = tmp_path_factory.mktemp("userkind")
    (root / "toykind.py").write_text(USER_MODULE)
    cfg = {"seed_everything": 0,
           "model": {"class_path": "toykind.ToyRegressor", "init_args": {"lr": 0.1}},
           "data": {"class_path": "toykind.ToyData"},
           "trainer": {"max_epochs": 3, "enable_progress_bar": False, "enable_model_summary": False,
                       "enable_checkpointing": False, "default_root_dir": str(root / "runs"),
                       "logger": {"class_path": "moa.pipelines.tracking.logger.MLflowLogger",
                                  "init_args": {"experiment_name": "toy"}},
                       "callbacks": [{"class_path": "moa.pipelines.tracking.log_bundle.LogBundle",
                                      "init_args": {"directory": str(root / "bundle"), "register_as": "toy"}}]}}
    (root / "fit.yaml").write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}", "OMP_NUM_THREADS": "1",
           "MOA_KINDS": "toykind"}
    env.pop("PYTHONPATH", None)  # the user's module is found from the working directory alone
    run(["fit", "-c", "fit.yaml"], root, env)
    return {"root": root, "env": env, "bundle": root / "bundle"}


def test_fit_registers_the_user_kind_with_its_gate(fitted):
    from mlflow import MlflowClient

    store = fitted["env"]["MLFLOW_TRACKING_URI"]
    meta = json.loads((fitted["bundle"] / "service.json").read_text())
    assert meta["kind"] == "toy-regressor"
    champion = MlflowClient(tracking_uri=store, registry_uri=store).get_model_version_by_alias("toy", "champion")
    assert (champion.tags["gate_metric"], champion.tags["gate_mode"]) == ("val/mse", "min")
    assert float(champion.tags["gate_value"]) == meta["metrics"]["val/mse"]
    # `moa register` of the same bundle: a second version, not better, so the champion stays
    out = run(["register", "--bundle", "bundle", "--name", "toy"], fitted["root"], fitted["env"])
    assert json.loads(out[out.index("{"):out.rindex("}") + 1])["promoted"] is False


def test_serve_answers_over_http(fitted):
    rows = [(1.0, 2.0), (-0.5, 0.25), (3.0, -1.0)]
    port = free_port()
    log = open(fitted["root"] / "serve.log", "wb")
    server = subprocess.Popen([MOA, "serve", "--name", "toy", "--port", str(port)], cwd=fitted["root"],
                              env=fitted["env"], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + BOUND
        while True:  # until the server answers /ping (it loads the model first)
            assert server.poll() is None and time.monotonic() < deadline, \
                (fitted["root"] / "serve.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"{url}/ping", timeout=2):
                    break
            except (urllib.error.URLError, OSError):
                time.sleep(0.2)
        status, body = post(f"{url}/invocations", {"dataframe_records": [{"x1": a, "x2": b} for a, b in rows]})
        assert status == 200, body
        assert [p["y"] for p in body["predictions"]] == pytest.approx(expected(fitted["bundle"], rows), abs=1e-5)
        status, body = post(f"{url}/invocations", {"dataframe_records": [{"x1": 1.0, "x2": 2.0}],
                                                   "params": {"k": 3}})
        assert status == 400, body
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=30)
        log.close()


def test_batch_scores_a_csv_file(fitted):
    root, rows = fitted["root"], [(0.0, 0.0), (1.5, -2.0), (-1.0, 4.0)]
    pd.DataFrame({"id": ["a", "b", "c"], "x1": [r[0] for r in rows], "x2": [r[1] for r in rows]}).to_csv(
        root / "rows.csv", index=False)
    run(["batch", "--model-uri", "models:/toy@champion", "--input", "rows.csv", "--out", "answers.csv"], root,
        fitted["env"])
    answers = pd.read_csv(root / "answers.csv")
    assert list(answers["id"]) == ["a", "b", "c"]
    assert list(answers["y"]) == pytest.approx(expected(fitted["bundle"], rows), abs=1e-5)
    # without --input the kind has nothing of its own to score: one line, nothing written
    out = run(["batch", "--model-uri", "models:/toy@champion", "--out", "all.csv"], root, fitted["env"], ok=False)
    assert "toy-regressor model" in out and "pass --input" in out and "Traceback" not in out
    assert not (root / "all.csv").exists()


def test_an_unplugged_kind_is_one_line_naming_it_and_how_to_plug_it_in(fitted):
    env = {k: v for k, v in fitted["env"].items() if k != "MOA_KINDS"}
    out = run(["register", "--bundle", "bundle", "--name", "toy"], fitted["root"], env, ok=False)
    assert "unknown model kind 'toy-regressor'" in out and "MOA_KINDS" in out and "classifier" in out
    assert "Traceback" not in out


def test_the_registry_in_process():
    kind = get_kind("classifier")
    assert kind.gate == ("val/accuracy", "max") and kind.service.__name__ == "ClassifierService"
    with pytest.raises(UserError, match="already registered"):
        register_kind(ModelKind(name="classifier", service=get_kind("causal-lm").service, gate=("val/loss", "min"),
                                signature=kind.signature, input_example=kind.input_example))
    assert register_kind(kind) is kind  # the same definition again is fine
    with pytest.raises(UserError, match=r"unknown model kind 'nope'.*'recommender'.*MOA_KINDS"):
        get_kind("nope")
