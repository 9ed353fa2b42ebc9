"""bench/routers_real_llm.py on the tiny Llama preset: the truncated (cached) model computes the full model's logits,
teacher-forced exact match is greedy generation's, and the harness runs end to end, reports what its JSON holds and
resumes without running a finished cell again."""

import json
import statistics
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

WORDS = {"alpha": "positive", "beta": "negative"}  # each task's rows carry one word: adapters learn it fast


@pytest.fixture(scope="module")
def trunc(bench_script):
    return bench_script("routers_real_llm_trunc")


@pytest.fixture(scope="module")
def bench(bench_script, trunc):
    return bench_script("routers_real_llm")


def _tiny(router: str = "poly", seed: int = 0):
    """The tiny Llama (2 layers) with MoA on layer 1's q/v, adapters random and non-zero."""
    import moa
    from moa.pipelines.kinds.causal_lm.module import build_causal_lm

    base = build_causal_lm("tiny-llama", None, 0).eval()
    options = {"n_tasks": 2} if router == "poly" else {}
    model = moa.attach(base, moa.MoAConfig(n_experts=4, r=4, router=router, top_k=2, router_options=options,
                                           target_modules=r"model\.layers\.1\.self_attn\.(q_proj|v_proj)"))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return model.eval()


def _rows(lengths, targets=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    rows = [torch.randint(1000, 2000, (n,), generator=gen).tolist() for n in lengths]
    return rows, [[-100] * (len(r) - targets) + r[-targets:] for r in rows]


def test_truncated_model_gives_the_full_models_logits_and_loss(one_thread, trunc):
    model = _tiny()
    rows, labels = _rows([5, 13, 9, 17])
    tasks = torch.tensor([0, 1, 1, 0])
    ids, mask = trunc.pad_right(rows, 0), trunc.pad_right([[1] * len(r) for r in rows], 0)
    padded = trunc.pad_right(labels, -100)
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=mask, task_ids=tasks).logits  # the plain forward, all positions
        states = trunc.frozen_states(model, rows, start=1, batch_size=3)
        with trunc.truncated(model, 1):
            cut = trunc.target_scores(model, trunc.cached_batch(states, labels), task_ids=tasks)
    at = (padded[:, 1:] != -100).nonzero(as_tuple=True)
    assert [len(s) for s in states] == [5, 13, 9, 17]
    torch.testing.assert_close(cut["logits"], full[at], atol=1e-4, rtol=0)
    expected = F.cross_entropy(full[:, :-1].transpose(1, 2), padded[:, 1:], ignore_index=-100, reduction="none").sum(1)
    torch.testing.assert_close(cut["loss_sum"], expected, atol=1e-4, rtol=0)
    assert cut["tokens"].tolist() == [3, 3, 3, 3]
    # not vacuous: the states of another layer (the embeddings) give other logits
    embedded = trunc.frozen_states(model, rows, 0)
    with torch.no_grad(), trunc.truncated(model, 1):
        wrong = trunc.target_scores(model, trunc.cached_batch(embedded, labels), task_ids=tasks)
    assert (wrong["logits"] - full[at]).abs().max() > 1e-2


def test_truncated_peft_model_gives_the_full_models_logits(one_thread, trunc):
    from peft import LoraConfig, get_peft_model

    from moa.pipelines.kinds.causal_lm.module import build_causal_lm

    model = get_peft_model(build_causal_lm("tiny-llama", None, 0), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    rows, labels = _rows([7, 4, 11], targets=2)
    at = (trunc.pad_right(labels, -100)[:, 1:] != -100).nonzero(as_tuple=True)
    with torch.no_grad():
        full = model(input_ids=trunc.pad_right(rows, 0), attention_mask=trunc.pad_right([[1] * len(r) for r in rows], 0)).logits
        states = trunc.frozen_states(model, rows, 1)
        with trunc.truncated(model, 1):
            cut = trunc.target_scores(model, trunc.cached_batch(states, labels))
    torch.testing.assert_close(cut["logits"], full[at], atol=1e-4, rtol=0)


def test_teacher_forced_exact_match_is_greedy_generation(one_thread, trunc):
    """Per row the last label plays eos: greedy ``generate`` (full model, KV cache, left padding) stops there and
    returns target + eos exactly for the rows the teacher-forced argmax says, and for no other."""
    model = _tiny("topk", seed=1)
    prompts, _ = _rows([6, 9, 4, 12, 7, 10], targets=0, seed=3)
    greedy = [model.generate(input_ids=torch.tensor([p]), max_new_tokens=4, do_sample=False)[0, len(p):].tolist()
              for p in prompts]
    assert all(len(set(g)) == len(g) for g in greedy)  # no token twice: a row's "eos" is not among its words
    targets = [greedy[0][:2] + [greedy[0][2]],           # right words, right "eos": a hit
               greedy[1][:1] + [greedy[1][1]],           # a hit of one token
               [greedy[2][0], greedy[2][1] + 1, greedy[2][2]],  # the second token wrong
               greedy[3][:2] + [greedy[3][2] + 1],       # right words, wrong eos: generation runs on
               [greedy[4][0] + 1, greedy[4][1]],         # the first token wrong
               greedy[5][:3] + [greedy[5][3]]]           # a hit of three tokens
    rows = [p + t for p, t in zip(prompts, targets)]
    labels = [[-100] * len(p) + t for p, t in zip(prompts, targets)]
    states = trunc.frozen_states(model, rows, 1)
    with torch.no_grad(), trunc.truncated(model, 1):
        exact = trunc.target_scores(model, trunc.cached_batch(states, labels))["exact"]
    generated = []
    for p, t in zip(prompts, targets):
        left = [0] * 3 + p  # left padding, as generation batches have it
        out = model.generate(input_ids=torch.tensor([left]), attention_mask=torch.tensor([[0] * 3 + [1] * len(p)]),
                             max_new_tokens=len(t) + 2, do_sample=False, eos_token_id=t[-1], pad_token_id=0)
        generated.append(out[0, len(left):].tolist() == t)
    assert generated == [True, True, False, False, False, True]
    assert exact.tolist() == generated


def _corpus(folder: Path) -> Path:
    """A tweets-like folder (task = domain, the word follows it) and a headline-like one (task from column label)."""
    for name, column in (("tweets", "task"), ("heads", "label")):
        (folder / name).mkdir(parents=True)
        for split, n in (("train", 12), ("val", 4), ("test", 4)):
            rows = [{"text": f"{task} says item {i} of {split}", "target": word if name == "tweets" else f"{task} news",
                     "task": task if name == "tweets" else "headline", "label": task, "domain": task}
                    for i in range(n) for task, word in WORDS.items()]
            (folder / name / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def _config(bench, tmp_path: Path):
    tweets = bench.Setting("tweets", "tweets", "task", "exact", 8, val_per_task=3, test_per_task=4, max_length=16)
    settings = (tweets,
                bench.dataclasses.replace(tweets, name="tweets-10pct", fraction=0.25, select_from="tweets",
                                          methods=("peft-r8", "static")),
                bench.Setting("heads", "heads", "label", "rougeL", 8, val_per_task=2, test_per_task=2, max_length=16,
                              target_max_length=4, methods=("peft-r8", "topk")))
    return bench.Config(settings, backbone="tiny-llama", corpora=_corpus(tmp_path / "corpora"),
                        prompt_template="{text} ->", top_layers=1, steps=8, batch_size=4, seeds=(0, 1),
                        lrs=(1e-2, 5e-2), max_new_tokens=4, timing_rounds=2, out=tmp_path / "results" / "llm",
                        work=tmp_path / "work", tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")


@pytest.mark.slow
def test_harness_end_to_end_reports_its_json_and_resumes(tmp_path, one_thread, monkeypatch, bench):
    from mlflow.tracking import MlflowClient

    cfg = _config(bench, tmp_path)
    cfg.settings = (bench.dataclasses.replace(cfg.settings[0], methods=("peft-r8", "topk", "static", "poly")),
                    *cfg.settings[1:])
    results = bench.Bench(cfg, "the command").run()
    cells, selected = results["cells"], results["selected"]
    table = (cfg.out.with_suffix(".md")).read_text()
    assert table.startswith("```\nthe command\n```")
    assert json.loads(cfg.out.with_suffix(".json").read_text())["cells"] == cells
    # the selection is the grid's best on validation, recomputed here from the cells
    for method in ("peft-r8", "topk", "static", "poly"):
        grid = {k: c for k, c in cells.items() if k.startswith(f"tweets/{method}/") and c["seed"] == 0}
        best = max(grid.values(), key=lambda c: statistics.mean(c["val"]["exact"].values())
                   - 1e-6 * statistics.mean(c["val"]["loss"].values()))
        assert (selected[f"tweets/{method}"]["lr"], selected[f"tweets/{method}"]["router_mult"]) == \
            (best["lr"], best["router_mult"])
        assert len(grid) == (3 if method in ("topk", "poly") else 2)  # the router multiplier only where a router learns
    assert selected["tweets-10pct/static"] == selected["tweets/static"]
    # each table row's numbers, from the JSON (exact match x 100, mean ± sd over the two seeds)
    for setting, metric, methods in (("tweets", "exact", ("peft-r8", "topk", "static", "poly")),
                                     ("tweets-10pct", "exact", ("peft-r8", "static")), ("heads", "rougeL", ("peft-r8", "topk"))):
        rows = {}
        for method in methods:
            chosen = selected[f"{setting}/{method}"]
            runs = [cells[bench.cell_key(setting, method, chosen["lr"], chosen["router_mult"], s)] for s in (0, 1)]
            assert all("test" in r for r in runs)
            means = [statistics.mean(r["test"][metric].values()) for r in runs]
            expected = f"{100 * statistics.mean(means):.1f} ± {100 * statistics.stdev(means):.1f}"
            rows[method] = next(line for line in table.splitlines() if line.startswith(f"| {method} |")
                                and f"{setting}" in _section(table, line))
            assert f" {expected} |" in rows[method], (setting, method, rows[method])
        if setting == "tweets":  # the paired delta against peft-r8
            base = {r: statistics.mean(cells[bench.cell_key(setting, "peft-r8", selected[f"{setting}/peft-r8"]["lr"], 1.0, r)]
                                       ["test"]["exact"].values()) for r in (0, 1)}
            chosen = selected["tweets/static"]
            d = [statistics.mean(cells[bench.cell_key(setting, "static", chosen["lr"], chosen["router_mult"], r)]
                                 ["test"]["exact"].values()) - base[r] for r in (0, 1)]
            assert f"| {100 * statistics.mean(d):.1f} ± {100 * statistics.stdev(d):.1f} |" in rows["static"]
    # the floors: each task has one word (its majority: all right), the overall majority word is one task's
    assert "| each task's majority word (reference) | - | 100.0 | 100.0 | 100.0 |" in table
    assert sorted(results["reference"]["tweets"]["overall"].values()) == [0.0, 1.0]
    assert results["check"]["tweets"]["max_abs_logit_diff"] < 1e-4
    static = cells[bench.cell_key("tweets", "static", selected["tweets/static"]["lr"], 1.0, 1)]
    assert sorted(static["test"]["usage"]) == sorted(WORDS)  # one expert per task: usage one-hot, MI = log 2
    assert bench.usage_stats(static["test"]["usage"]) == pytest.approx((0.0, 0.6931), abs=1e-3)
    assert set(results["timing"]["tweets"]) == {"peft-r8", "topk", "static", "poly"}
    client = MlflowClient(cfg.tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name(bench.EXPERIMENT).experiment_id], max_results=1000)
    assert len(runs) >= len(cells)

    def again(*args, **kwargs):
        raise AssertionError("a finished cell ran again")

    # a stop after the grid, before the selected cell's test: the test is read from its saved adapters, no training
    path, key = cfg.out.with_suffix(".json"), bench.cell_key("tweets", "static", selected["tweets/static"]["lr"], 1.0, 0)
    stopped = json.loads(path.read_text())
    del stopped["cells"][key]["test"]
    path.write_text(json.dumps(stopped))
    monkeypatch.setattr(bench, "train", again)
    cells = {**cells, key: {**cells[key], "seconds": None}}
    after = bench.Bench(cfg, "the command").run()["cells"]
    assert {**after, key: {**after[key], "seconds": None}} == cells  # the same test numbers, nothing else ran
    cells = after

    monkeypatch.setattr(bench.Bench, "run_cell", again)
    resumed = bench.Bench(cfg, "the command")
    assert resumed.run()["cells"] == cells
    assert not resumed.cache  # nothing left to do: not even the frozen layers ran


def _section(table: str, line: str) -> str:
    """The heading of the table a line belongs to."""
    before = table[:table.index(line)]
    return before[before.rindex("### "):].splitlines()[0]


def test_settings_of_another_run_are_refused(tmp_path, one_thread, bench):
    cfg = _config(bench, tmp_path)
    cfg.out.parent.mkdir(parents=True)
    cfg.out.with_suffix(".json").write_text(json.dumps({"config": {"steps": 1}, "cells": {}}))
    with pytest.raises(SystemExit, match="other settings"):
        bench.Bench(cfg, "x")


def test_moa_lora_method_is_peft_lora_with_the_same_weights(one_thread, bench, trunc):
    """``lora`` (moa's single adapter, no routing) has PEFT r8's parameters and, given PEFT's A and B, its outputs:
    the control that separates moa's parameterisation from routing."""
    from moa.pipelines.kinds.causal_lm.module import build_causal_lm

    base = build_causal_lm("tiny-llama", None, 0).eval().requires_grad_(False)
    cfg = bench.Config((), backbone="tiny-llama", top_layers=1, rank=4)
    peft, lora = (bench.build(cfg, base, m, 2, 0) for m in ("peft-r8", "lora"))
    gen = torch.Generator().manual_seed(0)
    state = {k: torch.randn(v.shape, generator=gen) * 0.3 for k, v in bench.adapter_state(peft).items()}
    bench.load_adapter_state(peft, state)
    moa_names = {k.replace("base_model.model.", "").replace(".lora_A.weight", ".pool.lora_A")
                 .replace(".lora_B.weight", ".pool.lora_B"): v for k, v in state.items()}
    assert set(moa_names) == set(bench.adapter_state(lora))
    bench.load_adapter_state(lora, moa_names)
    assert bench.n_params(lora) == bench.n_params(peft) and bench.n_params(lora, "router") == 0
    rows, _ = _rows([6, 9])
    ids, mask = trunc.pad_right(rows, 0), trunc.pad_right([[1] * len(r) for r in rows], 0)
    with torch.no_grad():
        plain, got, want = (m(input_ids=ids, attention_mask=mask).logits for m in (base, lora, peft))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert (want - plain).abs().max() > 1e-2  # not vacuous: the adapters change the logits


def test_domain_in_prompt_prefixes_every_row_and_keys_the_cache(tmp_path, one_thread, bench):
    """``tweets-domain`` writes "Domain: <task>" before each text (the same words for every method), keeps the rows,
    and no row's token ids (the frozen-state cache key) are another setting's."""
    from moa.pipelines.data.text import TextEncoder, load_tokenizer, tokenizer_source

    cfg = _config(bench, tmp_path)
    tokenizer = load_tokenizer(tokenizer_source(cfg.backbone))
    encoder = TextEncoder(tokenizer, cfg.prompt_template, 64)
    control = bench.domain_control(cfg.settings[0])
    assert control.methods == ("peft-r8", "static") and control.select_from == "tweets"
    plain, domain = (bench.prepare(cfg, s, encoder) for s in (cfg.settings[0], control))
    for split in ("train", "val", "test"):
        assert [(r.target, r.task) for r in plain[split]] == [(r.target, r.task) for r in domain[split]]
        for p, d in zip(plain[split], domain[split]):
            prefix = tokenizer(f"Domain: {domain['tasks'][d.task]}\n", add_special_tokens=False)["input_ids"]
            assert d.prompt == prefix + p.prompt  # (the tiny tokenizer splits at spaces: the tokens add up)
        assert not {tuple(r.ids) for r in plain[split]} & {tuple(r.ids) for r in domain[split]}
    # the adapters kept for a grid cell are the prompt's own too
    harness = object.__new__(bench.Bench)  # state_path reads only cfg
    harness.cfg = cfg
    assert harness.state_path(cfg.settings[0], "k") != harness.state_path(control, "k")
