"""REST serving with ``mlflow models serve`` (a real server on a free loopback port) and the batch command.

One server per module: the real recommender (tiny encoder) is registered in a sqlite store under tmp_path,
promoted to ``@champion``, served with ``--env-manager local`` on 127.0.0.1, sent real HTTP requests (good and
bad), and stopped.
"""

import json
import os

import pandas as pd
import pytest
import torch

from moa.pipelines.recommendation import tiny_encoder
from moa.pipelines.registry import register_bundle
from moa.pipelines.service import RecommendationService, item_table, write_bundle
from moa.pipelines.serving import ModelServer, post, request_body
from moa.recsys.data import ml100k
from moa.recsys.models import RecommenderConfig, TextSeqRecommender

DOMAINS = ["comedy", "drama"]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("serving")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    previous = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI",)}
    os.environ["MLFLOW_TRACKING_URI"] = uri
    cwd = os.getcwd()
    os.chdir(root)  # ./mlruns artifacts of the embedded store
    try:
        dataset = ml100k()
        config = RecommenderConfig(encoder=str(tiny_encoder(root / "encoder")), adapted_layers=1, r=4, hidden=16,
                                   inner=32, user_layers=1, max_len=20)
        torch.manual_seed(0)
        model = TextSeqRecommender.build(DOMAINS, {d: dataset.domain(d).texts for d in DOMAINS}, config=config)
        items = item_table(dataset, DOMAINS)
        bundle = write_bundle(root / "bundle", {"experts": model}, items, metrics={"val/ndcg_10": 0.05})
        promotion = register_bundle(bundle, "rec", tracking_uri=uri)
        assert promotion.promoted
        with ModelServer("models:/rec@champion", tracking_uri=uri, log_path=root / "server.log") as server:
            yield {"server": server, "items": items, "bundle": bundle, "dataset": dataset, "root": root, "uri": uri}
        assert server.process.poll() is not None  # stopped
    finally:
        os.chdir(cwd)
        for key, value in previous.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def ids_of(items, domain, n):
    return [int(i) for i in items.loc[items["domain"] == domain, "item_id"].head(n)]


def invoke(served, body, **kwargs):
    return post(f"{served['server'].url}/invocations", body, **kwargs)


def test_server_binds_loopback_and_answers_mixed_domain_batches(served):
    server, items = served["server"], served["items"]
    assert server.host == "127.0.0.1" and "-h" in server.command() and "--env-manager" in server.command()
    histories = [ids_of(items, "comedy", 3), ids_of(items, "drama", 2), ids_of(items, "comedy", 5)[3:]]
    domains = ["comedy", "drama", "comedy"]
    status, reply = invoke(served, request_body(histories, domains, k=4))
    assert status == 200, reply
    expected = RecommendationService.from_bundle(served["bundle"]).recommend(histories, domains, 4)
    assert [row["items"] for row in reply["predictions"]] == expected.items
    for row, got in zip(expected.scores, reply["predictions"]):
        assert got["scores"] == pytest.approx(row, abs=1e-5)
    # dataframe_split works too, and k defaults to 10
    split = {"dataframe_split": {"columns": ["history", "domain"], "data": [[histories[1], "drama"]]}}
    status, reply = invoke(served, split)
    assert status == 200 and len(reply["predictions"][0]["items"]) == 10


BAD = [
    ("unknown item", request_body([[999999]], ["comedy"], 3), "unknown item ids [999999]"),
    ("empty history", request_body([[]], ["comedy"], 3), "empty history"),
    ("unknown domain", request_body([[4]], ["horror"], 3), "unknown domain 'horror'"),
    ("k too large", request_body([[4]], ["comedy"], 1000), "k must be between 1 and 100"),
    ("oversize history", request_body([[4] * 500], ["comedy"], 3), "longer than the limit of 200"),
    ("malformed JSON", '{"dataframe_records": [', "Invalid input"),
    ("wrong item type", request_body([["abc"]], ["comedy"], 3), "history"),
    ("missing column", {"dataframe_records": [{"history": [4]}]}, "missing inputs ['domain']"),
]


@pytest.mark.parametrize("what, body, message", BAD, ids=[b[0] for b in BAD])
def test_bad_requests_get_400_with_a_clear_message_and_the_server_keeps_serving(served, what, body, message):
    status, reply = invoke(served, body)
    assert status == 400, (what, status, reply)
    assert message in reply["message"], reply["message"]
    status, reply = invoke(served, request_body([ids_of(served["items"], "drama", 2)], ["drama"], 2))
    assert status == 200 and len(reply["predictions"][0]["items"]) == 2


def test_wrong_content_type_is_refused(served):
    status, _ = invoke(served, "history,domain\n", content_type="text/plain")
    assert status == 415


def test_batch_command_scores_every_user_to_parquet(served, tmp_path, capsys):
    from moa.pipelines.cli import main

    out = tmp_path / "recs.parquet"
    main(["batch", "--model-uri", "models:/rec@champion", "--out", str(out), "--k", "5", "--tracking-uri",
          served["uri"]])
    frame = pd.read_parquet(out)
    assert f"wrote {len(frame)} rows" in capsys.readouterr().out
    assert set(frame.columns) == {"user_id", "domain", "items", "scores"} and set(frame["domain"]) == set(DOMAINS)
    dataset = served["dataset"]
    for domain in DOMAINS:  # one row per user with interactions in the domain
        part = dataset.domain(domain)
        assert (frame["domain"] == domain).sum() == part.n_users
    assert frame["items"].map(len).eq(5).all()
    row = frame.iloc[0]
    seen = set(dataset.items.loc[dataset.interactions.loc[dataset.interactions["user_id"] == row["user_id"], "item"],
                                 "item_id"].astype(int))
    assert not seen & set(int(i) for i in row["items"])
    assert json.loads(json.dumps(list(map(float, row["scores"])))) == sorted(map(float, row["scores"]), reverse=True)
