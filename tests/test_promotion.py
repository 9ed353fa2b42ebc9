"""The promotion gate on a real sqlite store: concurrent registrations (their losing interleaving forced), exact
comparison of close values, bad metrics refused
before anything is logged, and the comparison with the current champion (not the previous version)."""

import json
import os

import mlflow
import pytest
from mlflow import MlflowClient

from moa.pipelines.tracking.registry import CHAMPION, register_and_gate, register_bundle
from moa.pipelines.kinds.recommender.service import SERVICE_FILE

MODEL_CODE = """
import mlflow
class Echo(mlflow.pyfunc.PythonModel):
    def predict(self, context, model_input, params=None):
        return model_input
mlflow.models.set_model(Echo())
"""


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A sqlite store with one logged (tiny) model whose URI every test registers."""
    root = tmp_path_factory.mktemp("promotion")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    saved = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = uri
    mlflow.set_tracking_uri(uri)
    (root / "echo.py").write_text(MODEL_CODE)
    experiment = mlflow.create_experiment("fixture", artifact_location=(root / "artifacts").as_uri())
    with mlflow.start_run(experiment_id=experiment):
        info = mlflow.pyfunc.log_model(name="echo", python_model=str(root / "echo.py"))
    yield {"root": root, "uri": uri, "model_uri": info.model_uri}
    if saved is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = saved


def champion(name):
    version = MlflowClient().get_model_version_by_alias(name, CHAMPION)
    return str(version.version), version.tags["gate_value"]


def all_runs():
    client = MlflowClient()
    ids = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(ids)


def test_gate_compares_with_the_champion_not_the_previous_version(store):
    uri = store["model_uri"]
    assert register_and_gate(uri, "order", 0.5).promoted  # A
    assert not register_and_gate(uri, "order", 0.2).promoted  # B, worse than A
    between = register_and_gate(uri, "order", 0.3)  # C beats B (the previous version) but not A (the champion)
    assert not between.promoted and between.champion_version == "1"
    assert between.reason == "val/ndcg_10 0.3000 <= champion v1's 0.5000 (max)"
    assert champion("order") == ("1", "0.5")


def test_concurrent_registrations_leave_the_better_version_as_champion(store, monkeypatch):
    """The losing interleaving, forced: the worse registration reads the champion (none yet) and is held just
    before it moves the alias until the better one has finished, or is blocked on the promotion lock. Unlocked,
    the better one then also reads no champion, takes the alias, and the worse one overwrites it: wrong every
    time. With the lock, the better one waits, reads the worse one as champion and beats it."""
    import fcntl
    import threading
    import types

    import moa.pipelines.tracking.registry as registry

    worse_at_write, better_blocked = threading.Event(), threading.Event()
    release_worse = threading.Event()  # the better registration finished or waits for the lock
    real_set_alias = registry._set_alias

    def set_alias(client, name, alias, version):
        if threading.current_thread().name == "worse":
            worse_at_write.set()
            assert release_worse.wait(120), "the better registration neither finished nor waited for the lock"
        real_set_alias(client, name, alias, version)

    def flock(fd, operation):  # the real flock, noting when the better registration has to wait for it
        if operation == fcntl.LOCK_EX and threading.current_thread().name == "better":
            try:
                return fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                better_blocked.set()
                release_worse.set()
        return fcntl.flock(fd, operation)

    monkeypatch.setattr(registry, "_set_alias", set_alias)
    monkeypatch.setattr(registry, "fcntl", types.SimpleNamespace(**{k: getattr(fcntl, k) for k in dir(fcntl)
                                                                     if k.startswith("LOCK_")}, flock=flock))
    results, errors = {}, []

    def register(metric):
        try:
            results[threading.current_thread().name] = register_and_gate(store["model_uri"], "race", metric)
        except BaseException as error:  # noqa: BLE001 - reported below
            errors.append(error)
        finally:
            if threading.current_thread().name == "better":
                release_worse.set()

    worse = threading.Thread(target=register, args=(0.3,), name="worse")
    better = threading.Thread(target=register, args=(0.6,), name="better")
    worse.start()
    assert worse_at_write.wait(120), f"the worse registration never reached its alias write: {errors}"
    better.start()
    for thread in (worse, better):
        thread.join(120)
    assert not errors and not worse.is_alive() and not better.is_alive(), errors
    assert champion("race") == (results["better"].version, "0.6"), "the worse version ended as champion"
    assert better_blocked.is_set()  # the two gates did overlap, and the lock ordered them
    assert results["better"].promoted and results["better"].previous_champion == results["worse"].version
    assert results["better"].champion_version == results["better"].version


def test_close_values_are_compared_exactly_and_older_rounded_tags_still_read(store):
    """0.1234562 is worse than the champion's 0.12345649 (a 6-digit tag, 0.123456, let it win); the tag holds
    the exact value. A champion tagged by older moa with the 6-digit string is compared with that value."""
    uri, name = store["model_uri"], "close"
    first = register_and_gate(uri, name, 0.12345649)
    assert float(champion(name)[1]) == 0.12345649
    worse = register_and_gate(uri, name, 0.1234562)
    assert not worse.promoted and worse.reason == "val/ndcg_10 0.1234562 <= champion v1's 0.12345649 (max)"
    assert champion(name) == (first.version, repr(0.12345649))
    low = register_and_gate(uri, "close-min", 0.12345649, metric_name="val/loss", mode="min")
    assert not register_and_gate(uri, "close-min", 0.1234565, metric_name="val/loss", mode="min").promoted
    assert champion("close-min") == (low.version, repr(0.12345649))

    MlflowClient().set_model_version_tag(name, first.version, "gate_value", f"{0.12345649:.6g}")  # older moa's tag
    assert not register_and_gate(uri, name, 0.1234559).promoted  # below 0.123456
    legacy_beaten = register_and_gate(uri, name, 0.1234562)  # above the tag's 0.123456
    assert legacy_beaten.promoted and "champion v1's 0.123456 (max)" in legacy_beaten.reason
    assert champion(name) == (legacy_beaten.version, repr(0.1234562))


BAD = [("nan", float("nan")), ("inf", float("inf")), ("-inf", float("-inf")), ("none", None),
       ("string", "0.7"), ("bool", True), ("list", [0.7])]


@pytest.mark.parametrize("what, metric", BAD, ids=[b[0] for b in BAD])
def test_bad_metric_registers_nothing(store, what, metric):
    client = MlflowClient()
    with pytest.raises(ValueError, match="gating metric"):
        register_and_gate(store["model_uri"], f"bad-{what}", metric)
    assert client.search_model_versions(f"name='bad-{what}'") == []


@pytest.mark.parametrize("what, metric", [*BAD[:5], ("missing", ...)], ids=[*(b[0] for b in BAD[:5]), "missing"])
def test_bundle_with_a_bad_metric_is_refused_before_anything_is_logged(store, tmp_path, what, metric):
    """Only service.json exists: the refusal must come before logging reads (or logs) anything else."""
    (tmp_path / SERVICE_FILE).write_text(json.dumps(
        {"domains": ["comedy"], "item_id_type": "long", "metrics": {} if metric is ... else {"val/ndcg_10": metric}}))
    runs = len(all_runs())
    with pytest.raises(ValueError, match="val/ndcg_10"):
        register_bundle(tmp_path, f"bundle-{what}")
    assert len(all_runs()) == runs  # no orphan run
    assert MlflowClient().search_model_versions(f"name='bundle-{what}'") == []


@pytest.mark.parametrize("tag", ["nan", "inf", "garbage", None])
def test_a_champion_without_a_usable_metric_does_not_block_later_versions(store, tag):
    """A champion left by older code with a NaN, infinite, unparsable or missing metric tag is replaced."""
    client, name = MlflowClient(), f"legacy-{tag}"
    first = register_and_gate(store["model_uri"], name, 0.9)
    if tag is None:
        client.delete_model_version_tag(name, first.version, "gate_value")
    else:
        client.set_model_version_tag(name, first.version, "gate_value", tag)
    later = register_and_gate(store["model_uri"], name, 0.1)
    assert later.promoted and "no usable metric" in later.reason
    assert champion(name) == (later.version, "0.1")
    assert not register_and_gate(store["model_uri"], name, 0.05).promoted  # and the gate works again


def test_min_gate_promotes_the_lower_value_against_the_champion(store):
    """A loss gate: lower wins, compared with the champion (not the previous version); a tie keeps it."""
    uri, name = store["model_uri"], "loss-gated"
    first = register_and_gate(uri, name, 2.0, metric_name="val/loss", mode="min")
    assert first.promoted
    assert not register_and_gate(uri, name, 3.0, metric_name="val/loss", mode="min").promoted
    assert not register_and_gate(uri, name, 2.5, metric_name="val/loss", mode="min").promoted  # beats 3.0, not 2.0
    assert not register_and_gate(uri, name, 2.0, metric_name="val/loss", mode="min").promoted  # a tie
    lower = register_and_gate(uri, name, 1.5, metric_name="val/loss", mode="min")
    assert lower.promoted and lower.reason == "val/loss 1.5000 < champion v1's 2.0000 (min)"
    assert champion(name) == (lower.version, "1.5")
    tags = MlflowClient().get_model_version(name, lower.version).tags
    assert (tags["gate_metric"], tags["gate_mode"]) == ("val/loss", "min")


def test_a_gate_on_another_metric_than_the_champions_is_refused_before_registering(store, tmp_path):
    uri, name = store["model_uri"], "one-gate"
    register_and_gate(uri, name, 0.8, metric_name="val/accuracy", mode="max")
    for metric, mode in (("val/loss", "min"), ("val/accuracy", "min"), ("val/macro_f1", "max")):
        with pytest.raises(ValueError, match=r"gated on val/accuracy \(max\)"):
            register_and_gate(uri, name, 0.9, metric_name=metric, mode=mode)
    assert len(MlflowClient().search_model_versions(f"name='{name}'")) == 1
    # the same refusal from a bundle comes before anything is logged
    (tmp_path / SERVICE_FILE).write_text(json.dumps({"kind": "classifier", "metrics": {"val/loss": 0.3}}))
    runs = len(all_runs())
    with pytest.raises(ValueError, match=r"gated on val/accuracy \(max\)"):
        register_bundle(tmp_path, name, metric="val/loss", mode="min")
    assert len(all_runs()) == runs
    with pytest.raises(ValueError, match="mode must be 'max'"):
        register_and_gate(uri, "modes", 0.5, mode="up")


class _Toy:  # the service of the lineage test's kind (never loaded: the kind gives no input example)
    @classmethod
    def from_bundle(cls, directory):
        return cls()


def _fit_a_toy_bundle(root):
    """A real (tiny) fit with moa's MLflow logger and LogBundle: its bundle, and the fit's run id."""
    import lightning as L
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    from moa.pipelines.bundle import register_kind
    from moa.pipelines.tracking.log_bundle import LogBundle
    from moa.pipelines.tracking.logger import MLflowLogger

    register_kind(TOY_KIND)

    class Toy(L.LightningModule):
        bundle_kind = "promotion-toy"

        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(2, 1)

        def training_step(self, batch, batch_idx):
            return self.linear(batch[0]).pow(2).mean()

        def validation_step(self, batch, batch_idx):
            self.log("val/mse", self.linear(batch[0]).pow(2).mean())

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

        def write_bundle(self, directory, datamodule=None, *, metrics=None, base="include"):
            from moa.atomic import atomic_folder

            with atomic_folder(directory) as tmp:
                (tmp / SERVICE_FILE).write_text(json.dumps({"kind": "promotion-toy", "metrics": metrics}))
            return directory

    data = DataLoader(TensorDataset(torch.randn(8, 2)), batch_size=4)
    logger = MLflowLogger(experiment_name="toy-fit")
    trainer = L.Trainer(max_epochs=1, logger=logger, callbacks=[LogBundle(str(root / "bundle"))],
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=str(root), accelerator="cpu")
    trainer.fit(Toy(), data, data)
    return root / "bundle", logger.run_id


def _register(capsys, *args):
    from moa.pipelines.tracking.registry import main

    assert main(list(args)) == 0
    return json.loads(capsys.readouterr().out)


def test_register_without_run_id_logs_into_the_fits_run_and_names_the_promoted_champion(store, tmp_path, capsys):
    """`moa register --bundle` of a fit's bundle: the version's run is the fit's (its params and metrics), no new
    run appears; the printed champion_version is the version just promoted (a first version)."""
    bundle, fit_run = _fit_a_toy_bundle(tmp_path)
    client = MlflowClient()
    assert json.loads((bundle / "mlflow_run.json").read_text())["run_id"] == fit_run
    runs = {r.info.run_id for r in all_runs()}
    mlflow.set_experiment("another-experiment")  # made active earlier in the process (another register): no matter
    printed = _register(capsys, "--bundle", str(bundle), "--name", "lineage")
    assert printed["promoted"] and printed["version"] == "1"
    assert printed["champion_version"] == printed["version"] == champion("lineage")[0]
    assert printed["previous_champion"] is None
    version = client.get_model_version("lineage", printed["version"])
    assert version.run_id == fit_run
    assert {r.info.run_id for r in all_runs()} == runs  # logged into the fit's run, not a new one
    assert "val/mse" in client.get_run(fit_run).data.metrics

    # a run the store does not have (another store's bundle): a new run, as before, with a note
    (bundle / "mlflow_run.json").write_text(json.dumps({"run_id": "0" * 32}))
    with pytest.warns(UserWarning, match="not in the store"):
        again = _register(capsys, "--bundle", str(bundle), "--name", "lineage")
    new_run = client.get_model_version("lineage", again["version"]).run_id
    assert new_run not in runs and client.get_run(new_run).info.experiment_id == \
        client.get_experiment_by_name("moa-promotion-toy").experiment_id
    assert not again["promoted"] and again["champion_version"] == "1"  # a tie keeps v1


def _toy_kind():
    from moa.pipelines.bundle import ModelKind

    return ModelKind(name="promotion-toy", service=_Toy, gate=("val/mse", "min"), signature=lambda meta: None,
                     input_example=lambda folder: None)


TOY_KIND = _toy_kind()


def test_the_recorded_fit_run_holds_no_tracking_uri(tmp_path):
    """The bundle is shipped (logged, copied): ``mlflow_run.json`` holds the run id only, never the store's URI,
    which may carry credentials."""
    from moa.pipelines.tracking.registry import record_run, recorded_run

    path = record_run(tmp_path, "a" * 32)
    assert json.loads(path.read_text()) == {"run_id": "a" * 32} and recorded_run(tmp_path) == "a" * 32

