"""Scale-out on Ray with one local Ray cluster started on this machine for the module: batch scoring with Ray Data
(``moa batch --engine ray``'s function) and two Ray Serve replicas (``moa serve --engine ray``'s, real HTTP) answer a
registered MiniLM classifier's rows like the trained module itself."""

from __future__ import annotations

import json
import logging
import os

import lightning as L
import pandas as pd
import pytest
import torch

pytest.importorskip("ray")
pytestmark = pytest.mark.slow
WORDS = {"good": ("polarity", "pos"), "bad": ("polarity", "neg"), "cats": ("topic", "animals"),
         "cars": ("topic", "vehicles"), "songs": ("topic", "music")}


@pytest.fixture(scope="module")
def registered(tmp_path_factory):
    from moa.pipelines.kinds.classifier.module import MoAClassifier
    from moa.pipelines.tracking.registry import register_bundle
    from moa.pipelines.data.text import TextData

    root = tmp_path_factory.mktemp("ray")
    rows = [{"text": f"item {i % 7} is about {w}", "label": WORDS[w][1], "task": WORDS[w][0]}
            for i in range(60) for w in [list(WORDS)[i % 5]]]
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = TextData(train=str(root / "train.jsonl"), val=str(root / "train.jsonl"), task_column="task",
                    batch_size=10, max_length=16)
    module = MoAClassifier(backbone="minilm", router="static", n_experts=2, r=4, top_k=1,
                           router_options={"key": "task_ids"}, target_modules=["query", "value"], lr=5e-3)
    torch.set_num_threads(1)
    trainer = L.Trainer(max_epochs=2, logger=False, enable_progress_bar=False, enable_model_summary=False,
                        enable_checkpointing=False, default_root_dir=root, num_sanity_val_steps=0)
    trainer.fit(module, data)
    module.eval()
    bundle = module.write_bundle(root / "bundle", data, metrics={"val/accuracy": 1.0})
    uri = f"sqlite:///{root / 'mlflow.db'}"
    register_bundle(bundle, "clf", tracking_uri=uri)
    texts = [f"item {i % 7} is about {w}" for i in range(24) for w in [list(WORDS)[i % 5]]]
    tasks = [WORDS[t.split()[-1]][0] for t in texts]
    task_ids = {t: i for i, t in enumerate(data.task_names)}
    encoded = data.tokenizer(texts, truncation=True, max_length=16, padding=True, return_tensors="pt")
    with torch.no_grad():  # the trained module's own answers
        probs = module({**encoded, "task_ids": torch.tensor([task_ids[t] for t in tasks]),
                        "domain_ids": torch.zeros(len(texts), dtype=torch.long)}).softmax(-1)
    expected = [data.label_names[t][int(p[: len(data.label_names[t])].argmax())] for t, p in zip(tasks, probs)]
    return {"root": root, "uri": uri, "texts": texts, "tasks": tasks, "expected": expected}


@pytest.fixture(scope="module")
def cluster(registered):
    import ray

    from moa.pipelines.serving.ray_engine import init_ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    init_ray(None, registered["uri"], log_to_driver=True)  # as serve_on_ray starts it: the replicas' log lines here
    yield
    from ray import serve

    serve.shutdown()
    ray.shutdown()


class Lines(logging.Handler):
    def __init__(self):
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def test_ray_data_batch_scores_like_the_module_with_each_answer_on_its_row(registered, cluster):
    """3000 rows in blocks of 20, two actors working at once: each answer is on its own input row (the row's id
    and text are still beside it, the label is the trained module's for that text); Ray's process-wide
    DataContext is left as it was (the order option belongs to the engine's dataset only). The ``id`` and the
    ``domain`` of a model trained without domains are ignored and named, as the local engine names them; Ray logs
    and warns nothing about ``concurrency`` (deprecated: the actor pool is given as ``compute``)."""
    import warnings

    import numpy as np
    import ray

    from moa.pipelines.serving.ray_engine import score_rows_on_ray

    context = ray.data.DataContext.get_current()
    settings = lambda: repr(context) + repr(vars(context.execution_options))  # noqa: E731
    before = settings()
    assert not context.execution_options.preserve_order  # Ray's default: the check below can see a change
    n, texts, expected = 3000, registered["texts"], registered["expected"]
    which = np.random.default_rng(0).integers(0, len(texts), n)
    frame = pd.DataFrame({"id": range(n), "text": [texts[i] for i in which],
                          "task": [registered["tasks"][i] for i in which], "domain": "books"})
    ray_log = Lines()
    logging.getLogger("ray").addHandler(ray_log)
    logging.getLogger("ray.data").addHandler(ray_log)  # (ray.data's own logger may not pass records up)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            answers = score_rows_on_ray("models:/clf@champion", frame, workers=2, batch_size=20,
                                        tracking_uri=registered["uri"])
    finally:
        logging.getLogger("ray").removeHandler(ray_log)
        logging.getLogger("ray.data").removeHandler(ray_log)
    said = ray_log.lines + [str(w.message) for w in caught]
    assert not [line for line in said if "concurrency" in line and "deprecated" in line], said
    assert answers.attrs["ignored_columns"] == ["id", "domain"]
    assert list(answers["id"]) == list(range(n)) and list(answers["text"]) == list(frame["text"])
    assert list(answers["label"]) == [expected[i] for i in which]
    assert all(len(p) == len(labels) for p, labels in zip(answers["probabilities"], answers["labels"]))
    assert ray.data.DataContext.get_current() is context and settings() == before


def test_a_refused_row_is_named_by_its_row_in_the_input_not_in_its_ray_batch(registered, cluster):
    from moa.experts.errors import UserError
    from moa.pipelines.serving.ray_engine import score_rows_on_ray

    n = 1000
    frame = pd.DataFrame({"text": [registered["texts"][i % 24] for i in range(n)],
                          "task": [registered["tasks"][i % 24] for i in range(n)]})
    frame.loc[700, "task"] = "nope"  # in the 8th Ray batch of 100
    with pytest.raises(UserError, match=r"^row 700: unknown task 'nope'") as info:
        score_rows_on_ray("models:/clf@champion", frame, workers=1, batch_size=100, tracking_uri=registered["uri"])
    assert "\n" not in str(info.value) and "Traceback" not in str(info.value)


def test_ray_serve_replicas_answer_like_the_module(registered, cluster, capfd):
    """Two replicas answer like the module; with ``access_log`` each replica's ``moa.server`` lines (the answered
    request, the refused one) reach this process's output, as ``moa serve --access-log`` prints them."""
    import time

    from moa.pipelines.serving.ray_engine import serve_on_ray
    from moa.pipelines.serving.client import post
    from moa.pipelines.serving.server import free_port

    port = free_port()  # next to last in the module: its replicas hold the cluster's CPUs until serve.shutdown()
    serve_on_ray("models:/clf@champion", replicas=2, port=port, tracking_uri=registered["uri"], access_log=True,
                 blocking=False)
    url = f"http://127.0.0.1:{port}"
    rows = [{"text": x, "task": t} for x, t in zip(registered["texts"], registered["tasks"])]
    status, body = post(f"{url}/invocations", {"dataframe_records": rows})
    assert status == 200, body
    assert [p["label"] for p in body["predictions"]] == registered["expected"]
    status, body = post(f"{url}/invocations", {"dataframe_records": [{"text": "x", "task": "nope"}]})
    assert status == 400 and "unknown task 'nope'" in body["message"]
    status, body = post(f"{url}/invocations", b"{}", content_type="text/csv")
    assert status == 415 and "Traceback" not in json.dumps(body)
    printed, give_up = "", time.monotonic() + 60
    while not all(line in printed for line in ("moa.server INFO 200 POST /invocations",
                                                "moa.server WARNING 400 POST /invocations INVALID_PARAMETER_VALUE")):
        assert time.monotonic() < give_up, printed[-4000:]  # Ray forwards the replicas' lines in the background
        time.sleep(0.1)
        printed += "".join(capfd.readouterr())


def test_a_batch_while_serve_replicas_hold_every_cpu_says_so_instead_of_hanging(registered, cluster):
    """After the test above, its two replicas hold both CPUs of the cluster: Ray Data would wait for a free one
    (forever: its first step is a task); the batch ends within seconds with one line saying so."""
    import ray

    from moa.experts.errors import UserError
    from moa.pipelines.serving.ray_engine import score_rows_on_ray

    assert ray.available_resources().get("CPU", 0) < 1  # the replicas' (the serve app is still up)
    frame = pd.DataFrame({"text": registered["texts"][:4], "task": registered["tasks"][:4]})
    with pytest.raises(UserError, match=r"^no CPU of the Ray cluster is free \(all 2 are held, e\.g\. by the replicas"):
        score_rows_on_ray("models:/clf@champion", frame, workers=2, batch_size=2, tracking_uri=registered["uri"])


def test_cpus_held_by_a_job_that_just_ended_are_waited_for_not_called_full():
    """A finished Ray Data job's actors give their CPUs back a moment after it returns: a batch right after it waits
    for them (briefly) instead of refusing; a cluster that stays full is refused after the wait."""
    from moa.pipelines.serving.ray_engine import _a_cpu_frees_up

    class Cluster:  # free CPUs as Ray reports them, poll by poll
        def __init__(self, free):
            self.free, self.polls = list(free), 0

        def available_resources(self):
            self.polls += 1
            return {"CPU": self.free.pop(0)} if len(self.free) > 1 else {"CPU": self.free[0]}

    releasing = Cluster([0, 0, 2])
    assert _a_cpu_frees_up(releasing, seconds=5) and releasing.polls == 3
    assert not _a_cpu_frees_up(Cluster([0]), seconds=0.5)
