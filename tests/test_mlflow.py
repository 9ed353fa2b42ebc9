"""MLflow registry and the recommendation service: the real recommender (tiny encoder), a real sqlite store.

Covers the serving bundle (safetensors weights, JSON configs, Parquet item table, cached item representations),
request validation and per-row domain routing in-process, the pyfunc model logged from code (no pickle), and the
promotion gate on validation NDCG@10.
"""

import json
import shutil
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import torch
import yaml
from mlflow import MlflowClient

from moa.pipelines.tracking.registry import CHAMPION, log_bundle, register_and_gate, register_bundle
from moa.pipelines.kinds.recommender.module import tiny_encoder
from moa.pipelines.kinds.recommender.service import (SERVICE_FILE, RecommendationService, RequestError, item_table,
                                   write_bundle)
from moa.pipelines.tracking.routing_stats import heatmap_png, usage_entropy
from moa.pipelines.tracking.store import resolve_tracking_uri
from moa.recsys.data import ml100k
from moa.recsys.recommender import RecommenderConfig, TextSeqRecommender

DOMAINS = ["comedy", "drama"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny domain-expert recommender over two ml-100k domains, and its bundle."""
    root = tmp_path_factory.mktemp("mlflow")
    dataset = ml100k()
    encoder = tiny_encoder(root / "encoder")
    config = RecommenderConfig(encoder=str(encoder), adapted_layers=1, r=4, hidden=16, inner=32, user_layers=1,
                               max_len=20)
    torch.manual_seed(0)
    model = TextSeqRecommender.build(DOMAINS, {d: dataset.domain(d).texts for d in DOMAINS}, config=config)
    items = item_table(dataset, DOMAINS)
    bundle = write_bundle(root / "bundle", {"experts": model}, items, metrics={"val/ndcg_10": 0.05})
    return {"root": root, "dataset": dataset, "model": model.eval(), "items": items, "bundle": bundle}


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    return tmp_path


def ids_of(items, domain, n):
    return [int(i) for i in items.loc[items["domain"] == domain, "item_id"].head(n)]


def recommender_top(model, items, history, domain, k):
    """The recommender itself (no service) on one history of source ids: its top ``k`` as source ids, and scores."""
    domain_items = items[items["domain"] == domain]
    index_of = {int(i): int(x) for i, x in zip(domain_items["item_id"], domain_items["index"])}
    source_of = {x: i for i, x in index_of.items()}
    top, scores = model.recommend([[index_of[h] for h in history]], domain, k)
    return [source_of[x] for x in top[0].tolist()], scores[0].tolist()


def test_bundle_files_and_cached_item_tables(world):
    bundle = world["bundle"]
    names = {p.relative_to(bundle).as_posix() for p in bundle.rglob("*") if p.is_file()}
    assert names == {"service.json", "items.parquet", "item_tables.safetensors", "moa_manifest.json",
                     "recommenders/experts/recommender.json", "recommenders/experts/recommender.safetensors",
                     "recommenders/experts/moa_manifest.json"}
    assert not [n for n in names if n.endswith((".pkl", ".pt", ".ckpt"))]
    meta = json.loads((bundle / SERVICE_FILE).read_text())
    assert meta["routes"] == {"comedy": "experts", "drama": "experts"} and meta["item_id_type"] == "long"
    service = RecommendationService.from_bundle(bundle)
    for domain in DOMAINS:  # the cached tables are what the model computes
        cached = service.models[domain].item_table(domain)
        fresh = world["model"].item_table(domain)
        assert torch.allclose(cached, fresh, atol=1e-5)
        assert service.n_items(domain) == world["model"].item_encoder.n_items(domain)


def test_mixed_domain_batch_is_routed_per_row(world):
    service = RecommendationService.from_bundle(world["bundle"])
    items = world["items"]
    comedy, drama = ids_of(items, "comedy", 6), ids_of(items, "drama", 6)
    histories, domains = [comedy[:3], drama[:2], comedy[3:], drama[2:5]], ["comedy", "drama", "comedy", "drama"]
    mixed = service.recommend(histories, domains, k=5)
    for row, (history, domain) in enumerate(zip(histories, domains)):
        # alone: the recommender itself on that row only, its item indices mapped back to source ids
        alone_items, alone_scores = recommender_top(world["model"], items, history, domain, 5)
        assert mixed.items[row] == alone_items
        assert mixed.scores[row] == pytest.approx(alone_scores, abs=1e-5)
        domain_items = set(ids_of(items, domain, 10_000))
        assert set(mixed.items[row]) <= domain_items and not set(mixed.items[row]) & set(history)


@pytest.mark.parametrize("history, domain, k, message", [
    ([999999], "comedy", 5, "unknown item ids [999999]"),
    ([], "comedy", 5, "empty history"),
    ([4], "horror", 5, "unknown domain 'horror'"),
    ([4], "comedy", 101, "k must be between 1 and 100"),
    ([4], "comedy", 0, "k must be between 1 and 100"),
    ([4], "comedy", "ten", "k must be an integer"),
    ([4] * 201, "comedy", 5, "longer than the limit of 200"),
    ("4 13", "comedy", 5, "history must be a list of item ids"),
])
def test_bad_requests_raise_clear_errors(world, history, domain, k, message):
    service = RecommendationService.from_bundle(world["bundle"])
    with pytest.raises(RequestError, match=message.replace("[", r"\[").replace("]", r"\]").replace("(", r"\(")):
        service.recommend([history], [domain], k)


def test_item_of_another_domain_is_named(world):
    service = RecommendationService.from_bundle(world["bundle"])
    drama_item = ids_of(world["items"], "drama", 1)[0]
    with pytest.raises(RequestError, match=f"items of other domains: {{'{drama_item}': 'drama'}}"):
        service.recommend([[drama_item]], ["comedy"], 3)


def test_logged_from_code_with_signature_and_no_pickle(world, store):
    info = log_bundle(world["bundle"], experiment="t")
    local = Path(mlflow.artifacts.download_artifacts(info.model_uri, dst_path=str(store / "download")))
    files = {p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file()}
    assert not [f for f in files if f.endswith((".pkl", ".pickle", ".cloudpickle"))], files
    assert {"artifacts/bundle/recommenders/experts/recommender.safetensors", "artifacts/bundle/items.parquet",
            "artifacts/bundle/item_tables.safetensors", "artifacts/bundle/service.json",
            "artifacts/bundle/moa_manifest.json",
            "input_example.json",
            "serving_input_example.json"} <= files
    mlmodel = yaml.safe_load((local / "MLmodel").read_text())
    assert mlmodel["flavors"]["python_function"]["model_code_path"].endswith("pyfunc_model.py")
    inputs = json.loads(mlmodel["signature"]["inputs"])
    assert [(c["name"], c["type"]) for c in inputs] == [("history", "array"), ("domain", "string")]
    assert json.loads(mlmodel["signature"]["params"])[0]["name"] == "k"
    serving_example = json.loads((local / "serving_input_example.json").read_text())
    assert serving_example["params"] == {"k": 5}

    loaded = mlflow.pyfunc.load_model(info.model_uri)
    frame = pd.DataFrame({"history": [ids_of(world["items"], "comedy", 3), ids_of(world["items"], "drama", 2)],
                          "domain": DOMAINS})
    out = loaded.predict(frame, params={"k": 4})
    for row, (history, domain) in enumerate(zip(frame["history"], DOMAINS)):  # what the recommender itself ranks
        items, scores = recommender_top(world["model"], world["items"], history, domain, 4)
        assert list(out["items"][row]) == items and list(out["scores"][row]) == pytest.approx(scores, abs=1e-5)
    with pytest.raises(mlflow.exceptions.MlflowException, match="unknown domain 'nope'") as err:
        loaded.predict(pd.DataFrame({"history": [[4]], "domain": ["nope"]}))
    assert err.value.get_http_status_code() == 400


def test_register_command_and_the_promotion_gate(world, store, capsys):
    from moa.pipelines.cli.command import main

    client = MlflowClient()
    main(["register", "--bundle", str(world["bundle"]), "--name", "rec"])  # log + register + gate (NDCG@10 0.05)
    printed = capsys.readouterr().out
    assert '"promoted": true' in printed and '"version": "1"' in printed
    first = client.get_model_version("rec", "1")
    assert first.tags["promotion"] == "promoted" and "first version" in first.tags["promotion_reason"]
    uri = f"models:/rec/{first.version}"
    worse = register_and_gate(uri, "rec", 0.04)
    assert not worse.promoted and str(client.get_model_version_by_alias("rec", CHAMPION).version) == "1"
    assert worse.reason == "val/ndcg_10 0.0400 <= champion v1's 0.0500 (max)"
    tags = client.get_model_version("rec", "2").tags
    assert tags["promotion"] == "rejected" and tags["promotion_reason"] == worse.reason and tags["gate_value"] == "0.04"
    assert (tags["gate_metric"], tags["gate_mode"]) == ("val/ndcg_10", "max")
    better = register_and_gate(uri, "rec", 0.20)
    assert better.promoted and better.champion_version == better.version == "3" and better.previous_champion == "1"
    assert {k: str(v) for k, v in client.get_registered_model("rec").aliases.items()} == {CHAMPION: "3"}
    assert client.get_model_version("rec", "3").tags["promotion"] == "promoted"
    tie = register_and_gate(uri, "rec", 0.20)  # a tie does not move the champion
    assert not tie.promoted and str(client.get_model_version_by_alias("rec", CHAMPION).version) == "3"
    champion = mlflow.pyfunc.load_model(f"models:/rec@{CHAMPION}")
    assert champion.metadata.metadata["metrics"]["val/ndcg_10"] == pytest.approx(0.05)


def test_bundle_without_the_gating_metric_is_refused(world, store):
    copy = shutil.copytree(world["bundle"], store / "nometric")
    meta = json.loads((copy / SERVICE_FILE).read_text())
    meta["metrics"] = {}
    (copy / SERVICE_FILE).write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="no metric 'val/ndcg_10'"):
        register_bundle(copy, "rec")


def test_item_table_must_cover_each_catalogue(world, tmp_path):
    partial = world["items"].iloc[:-1]
    with pytest.raises(ValueError, match="must list items 1..534 of domain 'drama'"):
        write_bundle(tmp_path / "b", {"experts": world["model"]}, partial)


def test_tracking_uri_resolution_and_routing_statistics(monkeypatch, tmp_path):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    assert resolve_tracking_uri() == f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracking.internal:5000")
    assert resolve_tracking_uri() == "http://tracking.internal:5000"
    assert resolve_tracking_uri("sqlite:///x.db") == "sqlite:///x.db"
    usage = torch.tensor([[0.25, 0.25, 0.25, 0.25], [1.0, 0.0, 0.0, 0.0]])
    entropy = usage_entropy(usage)
    assert entropy[0] == pytest.approx(torch.log(torch.tensor(4.0)).item()) and entropy[1] == pytest.approx(0.0)
    png = heatmap_png(usage, ["encoder.layer.0.attention.self.query", "encoder.layer.1.attention.self.query"], "t")
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_recsys_configs_train_export_register_and_serve_in_process(world, store):
    """configs/recsys-experts.yaml then configs/recsys-xcross.yaml (tiny encoder, a few steps), as the main job."""
    from moa.pipelines.cli.lightning_cli import callback_override, run_cli
    from moa.pipelines.tracking.log_bundle import LogBundle

    configs = Path(__file__).resolve().parents[1] / "configs"
    fast = ["--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2", "--trainer.enable_progress_bar",
            "false", "--trainer.enable_model_summary", "false", "--model.init_args.verbose", "false"]
    bundle = "moa.pipelines.tracking.log_bundle.LogBundle"
    experts = run_cli(["fit", "-c", str(configs / "recsys-experts.yaml"), "--model.init_args.encoder",
                       str(world["root"] / "encoder"), "--model.init_args.hidden", "16", "--model.init_args.inner", "32",
                       *callback_override(configs / "recsys-experts.yaml", bundle, directory=str(store / "experts")),
                       *fast])
    shipped = next(c for c in experts.trainer.callbacks if isinstance(c, LogBundle))
    assert shipped.metrics["val/ndcg_10"] > 0 and (store / "experts" / "recommenders" / "recommender").is_dir()
    xcross = run_cli(["fit", "-c", str(configs / "recsys-xcross.yaml"), "--model.init_args.sources_from",
                      str(store / "experts"),
                      *callback_override(configs / "recsys-xcross.yaml", bundle, directory=str(store / "bundle")),
                      *fast])
    shipped = next(c for c in xcross.trainer.callbacks if isinstance(c, LogBundle))
    promotion = shipped.promotion
    assert promotion.promoted and promotion.name == "moa-recommender"
    meta = json.loads((store / "bundle" / SERVICE_FILE).read_text())
    assert meta["routes"] == {"comedy": "experts", "action": "experts", "drama": "experts", "children": "xcross"}
    assert meta["metrics"]["val/ndcg_10"] == pytest.approx(shipped.metrics["val/ndcg_10"])
    assert "XCrossRecommender" in (store / "bundle" / "config.yaml").read_text()

    client = MlflowClient()
    runs = client.search_runs([client.get_experiment_by_name("moa-recsys").experiment_id])
    assert {r.info.run_name for r in runs} == {"domain-experts", "xcross"}
    run = next(r for r in runs if r.info.run_name == "xcross")
    assert run.data.metrics["best/val/ndcg_10"] == pytest.approx(shipped.metrics["val/ndcg_10"], abs=1e-6)
    assert {"val/children/ndcg_10", "train/loss_epoch", "val/hr_10"} <= set(run.data.metrics)
    models = mlflow.search_logged_models(experiment_ids=[run.info.experiment_id], output_format="list")
    assert sorted(m.source_run_id for m in models) == sorted(r.info.run_id for r in runs)  # each fit logs its bundle

    champion = mlflow.pyfunc.load_model("models:/moa-recommender@champion")
    history = {"comedy": ids_of(world["items"], "comedy", 3), "drama": ids_of(world["items"], "drama", 3)}
    out = champion.predict(pd.DataFrame({"history": list(history.values()), "domain": list(history)}), params={"k": 3})
    # comedy and drama route to the experts: the first fit's trained recommender (in memory) ranks the same items
    fitted_items = experts.datamodule.item_table(list(history))
    for row, (domain, seen) in enumerate(history.items()):
        items, scores = recommender_top(experts.model.recommender, fitted_items, seen, domain, 3)
        assert list(out["items"][row]) == items and list(out["scores"][row]) == pytest.approx(scores, abs=1e-5)
