"""REST serving with moa's scoring server (a real server on a free loopback port) and the batch command.

One server per module: the real recommender (tiny encoder) is registered in a sqlite store under tmp_path,
promoted to ``@champion``, served on 127.0.0.1 with small limits, sent real HTTP requests (good, bad, oversize,
too slow), and stopped. Expected answers come from the bundle's recommender loaded and scored directly, not from
the service object the server runs.
"""

import http.client
import json
import math
import os
import threading
import time
import urllib.request

import pandas as pd
import pytest
import torch

from moa.pipelines.kinds.recommender.module import tiny_encoder
from moa.pipelines.tracking.registry import register_bundle
from moa.pipelines.serving.server import Limits, create_app, serve_in_thread
from moa.pipelines.kinds.recommender.service import item_table, write_bundle
from moa.pipelines.serving.client import post, request_body
from moa.pipelines.serving.process import ModelServer
from moa.recsys.data import left_pad, ml100k
from moa.recsys.loading import load_recommender
from moa.recsys.recommender import RecommenderConfig, TextSeqRecommender

DOMAINS = ["comedy", "children"]  # children has 131 items: small enough to ask for more than the unseen ones
LIMITS = Limits(max_body_bytes=8_000_000, max_rows=50_000, timeout=2.0)
BOUND = 60  # seconds: the most a wait of the timeout test lasts (a safety bound, never reached when all is well)


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
        with ModelServer("models:/rec@champion", tracking_uri=uri, log_path=root / "server.log",
                         limits=LIMITS) as server:
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


def raw(served, body: bytes, headers: dict, method="POST", path="/invocations"):
    """A request with exactly these headers (urllib would add a Content-Type): (status, body text)."""
    server = served["server"]
    connection = http.client.HTTPConnection(server.host, server.port, timeout=60)
    connection.request(method, path, body=body, headers=headers)
    response = connection.getresponse()
    return response.status, response.read().decode(errors="replace")


def health(served):
    with urllib.request.urlopen(f"{served['server'].url}/health", timeout=10) as response:
        return json.loads(response.read())


def expected_top(served, history, domain, k):
    """Top-k unseen items of ``domain`` for ``history`` (source ids), from the bundle's recommender directly."""
    items = served["items"]
    if "direct" not in served:
        served["direct"] = load_recommender(served["bundle"] / "recommenders" / "experts")
    model = served["direct"]
    part = items[items["domain"] == domain]
    index = dict(zip(part["item_id"].astype(int), part["index"].astype(int)))
    source = {v: k for k, v in index.items()}
    local = [index[h] for h in history]
    with torch.no_grad():
        scores = model.score(left_pad([local], model.config.max_len), domain)[0].clone()
    scores[[0, *local]] = -math.inf  # padding and every item of this row's history
    top = scores.topk(k)
    return [source[i] for i in top.indices.tolist()], top.values.tolist()


def assert_good(served, histories, domains, k):
    status, reply = invoke(served, request_body(histories, domains, k=k))
    assert status == 200, reply
    for history, domain, got in zip(histories, domains, reply["predictions"]):
        items, scores = expected_top(served, history, domain, k)
        assert got["items"] == items and not set(got["items"]) & set(history)
        assert got["scores"] == pytest.approx(scores, abs=1e-5)


def test_server_binds_loopback_and_answers_mixed_domain_batches(served):
    server, items = served["server"], served["items"]
    assert server.host == "127.0.0.1" and "moa.pipelines.serving.serve_command" in server.command()
    comedy = ids_of(items, "comedy", 8)
    # row 1's history is row 0's unmasked favourites: masking another row's history would change row 0's answer
    favourites, _ = expected_top(served, [comedy[0]], "comedy", 5)
    histories = [comedy[:3], favourites, ids_of(items, "children", 2), comedy[3:8]]
    assert_good(served, histories, ["comedy", "comedy", "children", "comedy"], 4)
    # dataframe_split works too, and k defaults to 10
    split = {"dataframe_split": {"columns": ["history", "domain"], "data": [[histories[2], "children"]]}}
    status, reply = invoke(served, split)
    assert status == 200 and reply["predictions"][0]["items"] == expected_top(served, histories[2], "children", 10)[0]


def test_columns_the_recommender_does_not_read_are_ignored_and_named_once(served, tmp_path, capsys, caplog):
    """A user's extra columns (``user``, ``note``) change no answer: REST names them in ``ignored_columns`` (absent
    when there are none), ``moa batch`` in one stderr line (and copies them to the output), the pyfunc model
    through MLflow's schema (which names them); ``domain`` is read by a recommender, so it is never named."""
    import logging

    import mlflow

    from moa.pipelines.cli.command import main

    comedy, children = ids_of(served["items"], "comedy", 3), ids_of(served["items"], "children", 2)
    rows = [{"user": "u1", "history": comedy, "domain": "comedy", "note": "x"},
            {"user": "u2", "history": children, "domain": "children", "note": None}]
    expected = [expected_top(served, r["history"], r["domain"], 3)[0] for r in rows]
    status, reply = invoke(served, {"dataframe_records": rows, "params": {"k": 3}})
    assert status == 200 and reply["ignored_columns"] == ["user", "note"], reply
    assert [p["items"] for p in reply["predictions"]] == expected
    status, reply = invoke(served, request_body([comedy], ["comedy"], 3))
    assert status == 200 and "ignored_columns" not in reply, reply

    pd.DataFrame(rows * 300).to_parquet(tmp_path / "rows.parquet")  # 600 rows: 3 model calls of 256, named once
    assert main(["batch", "--model-uri", "models:/rec@champion", "--input", str(tmp_path / "rows.parquet"), "--out",
                 str(tmp_path / "out.parquet"), "--k", "3", "--tracking-uri", served["uri"]]) == 0
    err = capsys.readouterr().err
    assert err.count("ignored the columns ['user', 'note']: the model does not read them") == 1, err
    out = pd.read_parquet(tmp_path / "out.parquet")
    assert list(out["user"]) == ["u1", "u2"] * 300 and [list(i) for i in out["items"][:2]] == expected

    mlflow.set_tracking_uri(served["uri"])
    caplog.set_level(logging.WARNING)
    answer = mlflow.pyfunc.load_model("models:/rec@champion").predict(pd.DataFrame(rows), params={"k": 3})
    assert [list(i) for i in answer["items"]] == expected
    # named by MLflow, which drops columns outside the signature before predict (it lists them from a set: any order)
    assert any("'user'" in r.getMessage() and "'note'" in r.getMessage() for r in caplog.records), caplog.records


def test_k_larger_than_the_unseen_items_is_refused(served):
    children = ids_of(served["items"], "children", 1000)
    history = children[:-2]  # all but two of the domain's items
    status, reply = invoke(served, request_body([history], ["children"], 5))
    assert status == 400 and "k=5 is more than the 2 unseen items" in reply["message"], reply
    status, reply = invoke(served, request_body([history], ["children"], 2))
    assert status == 200 and sorted(reply["predictions"][0]["items"]) == sorted(children[-2:])


BAD = [
    ("unknown item", request_body([[999999]], ["comedy"], 3), "unknown item ids [999999]"),
    ("empty history", request_body([[]], ["comedy"], 3), "empty history"),
    ("unknown domain", request_body([[4]], ["horror"], 3), "unknown domain 'horror'"),
    ("k too large", request_body([[4]], ["comedy"], 1000), "k must be between 1 and 100"),
    ("oversize history", request_body([[4] * 500], ["comedy"], 3), "longer than the limit of 200"),
    ("malformed JSON", '{"dataframe_records": [', "Invalid input"),
    ("wrong item type", request_body([["abc"]], ["comedy"], 3), "unknown item ids ['abc']"),
    ("missing column", {"dataframe_records": [{"history": [4]}]}, "missing input columns ['domain']"),
    ("not a frame", {"rows": [1, 2]}, "dataframe_records"),
    ("nested 10k deep", '{"a": ' + "[" * 10_000 + "]" * 10_000 + "}", "nested deeper than"),
    ("row number of a later chunk", request_body([[4]] * 300 + [[999999]], ["comedy"] * 301, 3), "row 300: unknown"),
]


@pytest.mark.parametrize("what, body, message", BAD, ids=[b[0] for b in BAD])
def test_bad_requests_get_400_with_a_clear_message_and_the_server_keeps_serving(served, what, body, message):
    status, reply = invoke(served, body)
    assert status == 400, (what, status, reply)
    assert set(reply) == {"error_code", "message"} and message in reply["message"], reply
    assert "Traceback" not in json.dumps(reply)
    assert_good(served, [ids_of(served["items"], "children", 2)], ["children"], 2)


@pytest.mark.parametrize("headers", [{}, {"Content-Type": "text/csv"}, {"Content-Type": "text/plain"}],
                         ids=["none", "csv", "plain"])
def test_wrong_or_missing_content_type_is_415_without_traceback(served, headers):
    status, text = raw(served, b"history,domain\n4,comedy\n", headers)
    assert status == 415 and "Traceback" not in text and "application/json" in json.loads(text)["message"]


def test_oversize_body_and_too_many_rows_get_413(served):
    padded = json.dumps(request_body([[4]], ["comedy"], 3)) + " " * LIMITS.max_body_bytes
    status, reply = invoke(served, padded)
    assert status == 413 and f"limit of {LIMITS.max_body_bytes} bytes" in reply["message"], reply
    status, reply = invoke(served, request_body([[4]] * (LIMITS.max_rows + 1), ["comedy"] * (LIMITS.max_rows + 1), 3))
    assert status == 413 and f"more than the limit of {LIMITS.max_rows} rows" in reply["message"], reply
    assert_good(served, [ids_of(served["items"], "comedy", 3)], ["comedy"], 3)


class HeldService:
    """The registered recommender's service with its calls (chunks) counted and the second held until
    ``release`` is set: the deadline always passes mid-request, whatever the speed of the machine."""

    def __init__(self, service):
        self.inner, self.chunks, self.reached, self.release = service, [], threading.Event(), threading.Event()
        self.service = self  # what the server looks at in a loaded pyfunc: .unwrap_python_model().service

    def predict(self, frame, params):
        self.chunks.append(len(frame))
        if len(self.chunks) == 2:
            self.reached.set()
            self.release.wait(BOUND)
        return self.inner.predict(frame, params)

    def unwrap_python_model(self):
        return self


def post_held_past_deadline(url: str, held: HeldService, history: list) -> tuple[int, dict, float]:
    """POST 50 rows to ``url`` while ``held`` holds the second chunk until the request's answer came (the deadline
    passes mid-request), then release it: ``(status, reply, seconds to the answer)``."""
    answer = {}
    started = time.monotonic()
    thread = threading.Thread(target=lambda: answer.update(
        long=post(f"{url}/invocations", request_body([history] * 50, ["comedy"] * 50, 10), timeout=BOUND)))
    thread.start()
    try:
        assert held.reached.wait(BOUND), answer
        thread.join(BOUND)  # the held chunk outlasts the deadline
        elapsed = time.monotonic() - started
        status, reply = answer["long"]
    finally:
        held.release.set()
        thread.join(BOUND)
    return status, reply, elapsed


def test_timed_out_work_is_stopped_and_the_server_stays_responsive(served):
    """50 rows in chunks of 10, the second chunk held past the 1 s deadline (the registered model, served in this
    process over real HTTP): 503 at the deadline, the work stops at the next chunk boundary (counted in /health
    by the worker itself; 2 of 5 chunks scored), and the next request is answered."""
    import mlflow

    mlflow.set_tracking_uri(served["uri"])
    held = HeldService(mlflow.pyfunc.load_model("models:/rec@champion").unwrap_python_model().service)
    limits = Limits(timeout=1.0, chunk_rows=10)
    history = ids_of(served["items"], "comedy", 20)
    with serve_in_thread(create_app(held, limits)) as url:
        status, reply, elapsed = post_held_past_deadline(url, held, history)
        assert status == 503 and reply["error_code"] == "TIMEOUT" and "send at most 10 rows" in reply["message"], reply
        assert limits.timeout <= elapsed < limits.timeout + 5
        give_up = time.monotonic() + BOUND
        while (now := json.loads(urllib.request.urlopen(f"{url}/health", timeout=BOUND).read()))["scoring"] \
                or not now["stopped"]:
            assert time.monotonic() < give_up, f"the timed-out work did not stop: {now}"
        assert held.chunks == [10, 10] and now["timed_out"] == 1  # stopped before its third chunk
        status, reply = post(f"{url}/invocations", request_body([history[:5]], ["comedy"], 3))
        assert status == 200 and reply["predictions"][0]["items"] == expected_top(served, history[:5], "comedy", 3)[0]


def test_docs_are_off(served):
    for path in ("/docs", "/openapi.json", "/redoc"):
        status, text = raw(served, None, {}, method="GET", path=path)
        assert status == 404 and "Traceback" not in text


def test_batch_command_scores_every_user_to_parquet(served, tmp_path, capsys):
    from moa.pipelines.cli.command import main

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


# ---- `moa batch` of every user: the newest history, an all-or-nothing output

SHORT_HISTORY = 4


@pytest.fixture(scope="module")
def short_history(served):
    """The served recommender registered again as ``rec-short`` with max_history 4, and a small dataset of ml-100k
    items: user "long" has 10 comedy items (given in shuffled order, each with its own time) and 2 children items,
    user "short" 2 comedy items."""
    from moa.recsys.data import RecDataset

    root, items = served["root"], served["items"]
    model = load_recommender(served["bundle"] / "recommenders" / "experts")
    bundle = write_bundle(root / "bundle-short", {"experts": model}, items, metrics={"val/ndcg_10": 0.05},
                          max_history=SHORT_HISTORY)
    assert register_bundle(bundle, "rec-short", tracking_uri=served["uri"]).promoted
    comedy, children = ids_of(items, "comedy", 12), ids_of(items, "children", 2)
    times = [7, 2, 9, 0, 5, 1, 8, 3, 6, 4]  # the file order is not the time order
    rows = ([("long", comedy[i], 100.0 + t) for i, t in enumerate(times)]
            + [("long", children[0], 50.0), ("long", children[1], 40.0)]
            + [("short", comedy[10], 1.0), ("short", comedy[11], 2.0)])
    interactions = pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp"])
    catalogue = served["dataset"].items.reset_index(drop=True)
    dataset = RecDataset.from_frames("small", interactions, catalogue)
    newest = [comedy[i] for i in sorted(range(10), key=lambda i: times[i])][-SHORT_HISTORY:]
    oldest = [comedy[i] for i in sorted(range(10), key=lambda i: times[i])][:SHORT_HISTORY]
    return {"uri": "models:/rec-short@champion", "dataset": dataset, "newest": newest, "oldest": oldest,
            "children": [children[1], children[0]], "short": comedy[10:12]}


def test_every_user_batch_scores_each_users_newest_history(served, short_history, tmp_path):
    from moa.pipelines.serving.batch import score_all_users

    out = tmp_path / "recs.jsonl"
    score_all_users(short_history["uri"], out, k=5, dataset=short_history["dataset"], tracking_uri=served["uri"])
    frame = pd.read_json(out, lines=True, dtype=False)  # .jsonl by the extension
    got = {(u, d): (list(i), list(s)) for u, d, i, s in frame[["user_id", "domain", "items", "scores"]].itertuples(
        index=False)}
    assert set(got) == {("long", "comedy"), ("long", "children"), ("short", "comedy")}
    newest_items, newest_scores = expected_top(served, short_history["newest"], "comedy", 5)
    oldest_items, _ = expected_top(served, short_history["oldest"], "comedy", 5)
    assert newest_items != oldest_items  # the test tells the two apart
    items, scores = got[("long", "comedy")]
    assert [int(i) for i in items] == newest_items and scores == pytest.approx(newest_scores, abs=1e-5)
    for key, history in [(("long", "children"), short_history["children"]), (("short", "comedy"),
                                                                             short_history["short"])]:
        items, scores = got[key]
        expected_items, expected_scores = expected_top(served, history, key[1], 5)
        assert [int(i) for i in items] == expected_items and scores == pytest.approx(expected_scores, abs=1e-5)


def test_every_user_batch_output_is_written_whole_or_not_at_all(served, short_history, tmp_path, monkeypatch):
    """A write that fails half-way leaves the previous output as it was and no partial file."""
    from moa.pipelines.serving.batch import score_all_users

    out = tmp_path / "recs.parquet"
    out.write_bytes(b"the previous output")

    def fails_half_way(frame, path, *args, **kwargs):
        with open(path, "wb") as handle:
            handle.write(b"PAR1 half a file")
        raise OSError("No space left on device")

    monkeypatch.setattr(pd.DataFrame, "to_parquet", fails_half_way)
    with pytest.raises(OSError, match="No space left"):
        score_all_users(short_history["uri"], out, k=3, dataset=short_history["dataset"], tracking_uri=served["uri"])
    assert out.read_bytes() == b"the previous output" and list(tmp_path.iterdir()) == [out]
    monkeypatch.undo()
    result = score_all_users(short_history["uri"], out, k=3, dataset=short_history["dataset"],
                             tracking_uri=served["uri"])
    written = pd.read_parquet(out)
    assert len(written) == len(result) == 3 and list(tmp_path.iterdir()) == [out]
    assert [list(map(int, i)) for i in written["items"]] == [list(map(int, i)) for i in result["items"]]


def test_refused_requests_are_logged_to_the_server_process_stderr(served):
    """The server process (ModelServer: its stdout and stderr go to server.log) writes one line per refused
    request, with status, method, path, error code and the message; the line is written before the answer."""
    log_path = served["root"] / "server.log"
    for body, status, line in [
        ('{"dataframe_records": [', 400, "400 POST /invocations BAD_REQUEST: Invalid input: the body is not valid JSON"),
        (request_body([[4]], ["horror"], 3), 400, "400 POST /invocations INVALID_PARAMETER_VALUE: row 0: unknown "
         "domain 'horror'"),
    ]:
        got, reply = invoke(served, body)
        assert got == status, reply
        assert line in log_path.read_text(errors="replace"), served["server"]._tail()
    got, _ = raw(served, b"{}", {"Content-Type": "text/csv"})
    assert got == 415 and "415 POST /invocations UNSUPPORTED_MEDIA_TYPE: Content-Type must be application/json" \
        in log_path.read_text(errors="replace")
    got, _ = raw(served, None, {}, method="GET", path="/nowhere")
    assert got == 404 and "404 GET /nowhere NOT_FOUND" in log_path.read_text(errors="replace")


def test_a_timed_out_request_names_the_options_and_is_logged(served, caplog):
    """The 503 (a chunk held past the deadline, as in the timeout test above: 10 of 50 rows scored in the 1 s)
    names the limits to change and to what at that pace: --timeout 5 lets such a request finish, --max-rows 10
    refuses it up front (each with its value now); the server logs it (WARNING, ``moa.server``); with access_log
    an answered request is an INFO line, without it only refused ones are logged."""
    import logging

    import mlflow

    mlflow.set_tracking_uri(served["uri"])
    history = ids_of(served["items"], "comedy", 20)
    for access_log in (True, False):
        held = HeldService(mlflow.pyfunc.load_model("models:/rec@champion").unwrap_python_model().service)
        limits = Limits(timeout=1.0, chunk_rows=10, max_rows=321)
        caplog.clear()
        caplog.set_level(logging.INFO, logger="moa.server")
        with serve_in_thread(create_app(held, limits, access_log=access_log)) as url:
            status, reply, _ = post_held_past_deadline(url, held, history)
            assert status == 503 and reply["error_code"] == "TIMEOUT", reply
            message = reply["message"]
            assert "was stopped after 10 of 50 rows; send at most 10 rows per request" in message, message
            assert "--timeout 5 (now 1) to let such requests finish" in message, message
            assert "--max-rows 10 (now 321) to refuse them up front with 413" in message, message
            status, reply = post(f"{url}/invocations", request_body([history[:5]], ["comedy"], 3))
            assert status == 200, reply
        lines = [(r.levelno, r.getMessage()) for r in caplog.records if r.name == "moa.server"]
        assert (logging.WARNING, f"503 POST /invocations TIMEOUT: {message}"[:len("503 POST /invocations TIMEOUT: ") + 197]
                + ("..." if len(message) > 200 else "")) in lines, lines
        answered = [m for level, m in lines if level == logging.INFO and m.startswith("200 POST /invocations")]
        assert len(answered) == (1 if access_log else 0), lines


def test_the_default_max_rows_follows_the_timeout():
    """A request the server accepts by default has the time to finish at ROWS_PER_SECOND: the default --max-rows
    is --timeout x ROWS_PER_SECOND (30 s: 3000 rows, not the 10 000 that 30 s could not score here); one given
    is kept; the 503 before any chunk finished still names both options."""
    import argparse

    from moa.pipelines.serving.server import ROWS_PER_SECOND, add_arguments, limits_of, timeout_message

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert limits_of(parser.parse_args([])).max_rows == Limits().max_rows == 30 * ROWS_PER_SECOND == 3000
    assert limits_of(parser.parse_args(["--timeout", "90"])).max_rows == 9000
    assert limits_of(parser.parse_args(["--timeout", "90", "--max-rows", "10000"])).max_rows == 10_000
    assert Limits(timeout=0.001).max_rows == 1
    with pytest.raises(ValueError, match="max_rows must be a positive integer, got 0"):
        Limits(max_rows=0)
    message = timeout_message(Limits(), "rows", rows=0, of=3000)
    assert "larger --timeout (seconds; now 30)" in message and "smaller --max-rows (now 3000)" in message


def test_serve_help_shows_every_default(tmp_path):
    """``moa serve --help`` (the installed command, in a process of its own) shows each option's default."""
    import subprocess
    import sys
    from pathlib import Path

    from moa.pipelines.serving.server import limit_arguments

    moa = Path(sys.executable).parent / "moa"
    env = {**os.environ, "COLUMNS": "80"}
    done = subprocess.run([str(moa), "serve", "--help"], capture_output=True, text=True, timeout=120, cwd=tmp_path,
                          env=env)
    assert done.returncode == 0, done.stderr
    text = " ".join(done.stdout.split()).split(" options: ", 1)[1]  # past the usage; help lines wrap anywhere
    assert "--port PORT TCP port (default: 5055)" in text, text
    assert "--alias ALIAS alias of the version to serve (default: champion)" in text, text
    assert "(default: moa-recommender)" in text and "(default: 127.0.0.1)" in text, text
    options = limit_arguments(Limits())  # ["--max-rows", "10000", ...]: the defaults, as the server is started
    for option, value in zip(options[::2], options[1::2]):
        after = text.split(f"{option} {option[2:].upper().replace('-', '_')}", 1)[1]
        assert after.split("(default: ", 1)[1].split(")", 1)[0] == value, (option, value, text)
