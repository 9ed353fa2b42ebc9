"""bench/expert_library.py end to end on the tiny Llama preset: experts fit in separate `moa fit` runs, registered,
composed and scored; the oracle's score equals PEFT generating with each registered adapter alone; a second run
resumes from the results file."""

import json
from pathlib import Path

import pytest
import torch

WORDS = {"alpha": "positive", "beta": "negative"}  # each domain's rows all carry one sentiment word


def _corpus(folder: Path) -> Path:
    folder.mkdir()
    for split, n in (("train", 110), ("test", 6)):
        rows = [{"text": f"{domain} says item {i} of {split}", "target": word, "label": word, "task": domain,
                 "domain": domain} for i in range(n) for domain, word in WORDS.items()]
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def _peft_accuracy(bench, settings, expert, domain: str) -> float:
    """The expert's PEFT adapter alone, through PEFT, on its domain's test rows (scored as the bench scores)."""
    from peft import PeftModel

    from moa.pipelines.kinds.causal_lm.module import build_causal_lm

    rows = [r for r in bench.read_jsonl(settings.work / "seed0" / "data" / "test.jsonl") if r["domain"] == domain]
    file = bench.write_jsonl(settings.work / f"peft-{domain}.jsonl", rows)
    model = PeftModel.from_pretrained(build_causal_lm("tiny-llama", None, 0).eval(), str(expert["folder"])).eval()
    return bench.accuracy(settings, model, bench.text_data(settings, file, 0, bucket=True), lambda batch: {})[domain]


@pytest.mark.slow
def test_expert_library_bench_composes_registered_experts_and_resumes(tmp_path, monkeypatch, bench_script):
    torch.set_num_threads(1)
    bench = bench_script("expert_library")
    settings = bench.Settings(
        corpus=_corpus(tmp_path / "tweets"), work=tmp_path / "work", out=tmp_path / "results" / "lib",
        domains=tuple(WORDS), seeds=(0,), steps=12, router_steps=2, test_rows=6, lr=0.05, backbone="tiny-llama",
        fit_args=("--model.init_args.target_modules=[q_proj,v_proj]", "--trainer.logger=false",
                  "--data.init_args.prompt_template={text} ->"))
    results = bench.run(settings, "test")
    cells = results["cells"]
    assert set(cells) == {f"{m}/seed0" for m in bench.methods(settings)}
    assert all(set(WORDS) <= set(cell) for cell in cells.values())
    # the experts learnt their domain's word (the comparison below is not 0 == 0) and the base did not
    assert cells["oracle/seed0"] == pytest.approx({**cells["oracle/seed0"], "alpha": 1.0, "beta": 1.0})
    assert cells["base/seed0"]["alpha"] == cells["base/seed0"]["beta"] == 0.0
    # the oracle = each registered expert alone through PEFT, from the adapters the registry URIs resolved to
    uris = json.loads((settings.work / "seed0" / "uris.json").read_text())
    assert uris == {d: f"models:/tweets-{d}/1" for d in WORDS}
    experts, _ = bench.train_experts(settings, 0, bench.split_rows(settings, 0))  # resolved again, nothing refit
    for expert, domain in zip(experts, WORDS):
        assert _peft_accuracy(bench, settings, expert, domain) == cells["oracle/seed0"][domain]
    table = (settings.out.with_suffix(".txt")).read_text()
    assert table.startswith("$ test") and "| oracle | 1.000 | 1.000 | 1.000 | 1 |" in table

    def refit(*args, **kwargs):
        raise AssertionError("a finished cell ran again")

    monkeypatch.setattr(bench, "run_method", refit)
    assert bench.run(settings, "again")["cells"] == cells
