"""Any RecBole atomic dataset, in names: a toy dataset with string item tokens and a domain column trains through
the recommender config (``RecBoleDomains``), and the served bundle answers in the dataset's item tokens."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from moa.pipelines.kinds.recommender.module import RecBoleDomains

ROOT = Path(__file__).resolve().parents[1]


def write_dataset(folder: Path, name: str = "toy") -> Path:
    """Two domains (books ``b0..b11``, games ``g0..g9``), 30 users with 6 books and 5 games each, in time order."""
    folder.mkdir(parents=True, exist_ok=True)
    items = [(f"b{i}", f"book number {i}", "fiction" if i % 2 else "history", "books") for i in range(12)] + \
            [(f"g{i}", f"game number {i}", "arcade", "games") for i in range(10)]
    (folder / f"{name}.item").write_text("item_id:token\ttitle:token_seq\tgenre:token\tdomain:token\n" +
                                         "".join("\t".join(row) + "\n" for row in items))
    lines = ["user_id:token\titem_id:token\trating:float\ttimestamp:float"]
    for u in range(30):
        seq = [f"b{(u + j) % 12}" for j in range(6)] + [f"g{(u + 2 * j) % 10}" for j in range(5)]
        lines += [f"u{u}\t{item}\t4\t{1000 * u + t}" for t, item in enumerate(seq)]
    (folder / f"{name}.inter").write_text("\n".join(lines) + "\n")
    return folder


def test_recbole_domains_from_a_domain_column_or_a_category_map(tmp_path):
    folder = write_dataset(tmp_path / "toy")
    data = RecBoleDomains(str(folder), domain_field="domain")
    data.setup()
    assert data.domains == ["books", "games"] and data.dataset.name == "toy"
    assert sorted(data.dataset.domain("books").items["item_id"]) == sorted(f"b{i}" for i in range(12))
    assert len(data.splits["games"].test.targets) == 30  # one held-out item per user and domain

    (tmp_path / "map.json").write_text(json.dumps({"stories": ["fiction"], "past": ["history"]}))
    mapped = RecBoleDomains(str(folder), domain_map=str(tmp_path / "map.json"), domains=["stories", "past"])
    mapped.setup()
    assert set(mapped.dataset.domain("stories").items["item_id"]) == {f"b{i}" for i in range(1, 12, 2)}

    with pytest.raises(ValueError, match=r"unknown domains \['movies'\] in toy"):
        RecBoleDomains(str(folder), domain_field="domain", domains=["movies"]).setup()
    with pytest.raises(ValueError, match="no domain field 'kind'"):
        RecBoleDomains(str(folder), domain_field="kind").setup()
    with pytest.raises(FileNotFoundError, match="no interaction file"):
        RecBoleDomains(str(tmp_path / "nothing"), domain_field="domain").setup()


@pytest.mark.slow
def test_the_recommender_config_trains_on_any_dataset_and_serves_its_item_tokens(tmp_path, monkeypatch):
    from moa.pipelines.cli.lightning_cli import callback_override, run_cli
    from moa.pipelines.kinds.recommender.module import tiny_encoder
    from moa.pipelines.kinds.recommender.service import RecommendationService

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    folder = write_dataset(tmp_path / "toy")
    run_cli(["fit", "-c", str(ROOT / "configs" / "recsys-experts.yaml"),
             "--data.class_path", "moa.pipelines.kinds.recommender.module.RecBoleDomains",
             "--data.init_args.folder", str(folder), "--data.init_args.domain_field", "domain",
             "--data.init_args.domains", "[books, games]", "--data.init_args.batch_size", "16",
             "--model.init_args.encoder", str(tiny_encoder(tmp_path / "encoder")), "--model.init_args.hidden", "16",
             "--model.init_args.inner", "32", "--model.init_args.negatives", "8", "--model.init_args.verbose", "false",
             *callback_override(ROOT / "configs" / "recsys-experts.yaml", "moa.pipelines.tracking.log_bundle.LogBundle",
                                directory=str(tmp_path / "bundle")), "--trainer.max_epochs", "1",
             "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"])
    service = RecommendationService.from_bundle(tmp_path / "bundle")
    assert service.domains == ["books", "games"] and not service.integer_ids
    answer = service.predict(pd.DataFrame({"history": [["b1", "b2", "b3"], ["g0"]], "domain": ["books", "games"]}),
                             {"k": 5})
    books, games = answer["items"]
    assert len(books) == 5 and set(books) <= {f"b{i}" for i in range(12)} - {"b1", "b2", "b3"}  # its tokens, unseen
    assert set(games) <= {f"g{i}" for i in range(1, 10)}
    from moa.pipelines.bundle import RequestError

    with pytest.raises(RequestError, match=r"unknown item ids \['g1'\] for domain 'books' \(items of other domains: \{'g1': 'games'\}\)"):
        service.predict(pd.DataFrame({"history": [["g1"]], "domain": ["books"]}), {"k": 3})
    with pytest.raises(RequestError, match="k=10 is more than the 9 unseen items"):
        service.predict(pd.DataFrame({"history": [["g1"]], "domain": ["games"]}), {"k": 10})
    # every user of the dataset scored by the registered model, in the dataset's tokens
    from moa.pipelines.tracking.registry import register_bundle
    from moa.pipelines.serving.batch import batch_main

    register_bundle(tmp_path / "bundle", "toy-rec", tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert batch_main(["--model-uri", "models:/toy-rec@champion", "--data", str(folder), "--out",
                       str(tmp_path / "recs.parquet"), "--k", "3"]) == 0
    recs = pd.read_parquet(tmp_path / "recs.parquet")
    from moa.experts.errors import UserError

    with pytest.raises(UserError, match="no user of ml-100k has an item of the model's catalogues"):  # wrong --data
        batch_main(["--model-uri", "models:/toy-rec@champion", "--data", "ml-100k",
                    "--out", str(tmp_path / "x.parquet")])
    assert not (tmp_path / "x.parquet").exists()
    assert len(recs) == 60 and set(recs["domain"]) == {"books", "games"}  # 30 users x 2 domains
    for domain, items in zip(recs["domain"], recs["items"]):
        assert len(items) == 3 and all(i.startswith(domain[0]) for i in items)
