"""Causal LMs (``moa.pipelines.kinds.causal_lm.module``): target-token loss, routing by task, per-task perplexity, generation
metrics, predictions to Parquet, the presets, and ``MoAModel.generate`` with beams / several sequences.

Batches follow the text data contract; :func:`make_batch` builds them from (prompt, target, task) triples with
MiniLM's tokenizer, independently of :class:`moa.pipelines.data.text.TextData` (which the last test runs).
"""

import json
import re
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

import moa
from moa.pipelines.kinds.causal_lm.module import MoACausalLM, build_causal_lm, rouge_l
from moa.pretrained import minilm_dir

ROOT = Path(__file__).resolve().parents[1]
PAD, EOS = 0, 102  # MiniLM's [PAD]; [SEP] is the data's eos
TASKS = ["animal", "food"]
COLORS, ANIMALS, FOODS = ["red", "green", "blue", "black"], ["cat", "dog", "bird", "fish"], ["apple", "bread", "rice", "milk"]
TOY = [(c, a, 0) for c, a in zip(COLORS, ANIMALS)] + [(c, f, 1) for c, f in zip(COLORS, FOODS)]  # same prompts


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(minilm_dir()))


def make_batch(triples, tok, rows=None):
    """The contract: prompt + target + eos right-padded, labels -100 on prompt and padding, left-padded prompts."""
    enc = [(tok(p, add_special_tokens=False)["input_ids"], tok(t, add_special_tokens=False)["input_ids"] + [EOS])
           for p, t, _ in triples]
    T, P = max(len(p) + len(t) for p, t in enc), max(len(p) for p, _ in enc)
    ids, labels = torch.full((len(enc), T), PAD), torch.full((len(enc), T), -100)
    mask, prompt_ids = torch.zeros(len(enc), T, dtype=torch.long), torch.full((len(enc), P), PAD)
    prompt_mask = torch.zeros(len(enc), P, dtype=torch.long)
    for i, (p, t) in enumerate(enc):
        n = len(p) + len(t)
        ids[i, :n], mask[i, :n], labels[i, len(p):n] = torch.tensor(p + t), 1, torch.tensor(t)
        prompt_ids[i, P - len(p):], prompt_mask[i, P - len(p):] = torch.tensor(p), 1
    tasks = torch.tensor([task for _, _, task in triples])
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "task_ids": tasks, "domain_ids": tasks,
            "row": torch.arange(len(enc)) if rows is None else torch.tensor(rows),
            "prompt_input_ids": prompt_ids, "prompt_attention_mask": prompt_mask,
            "target_text": [t for _, t, _ in triples]}


class ToyText(L.LightningDataModule):
    """The data module's surface for the causal module: pre-built contract batches."""

    def __init__(self, tok, triples, batch_size=8, repeat=1, target_max_length=4):
        super().__init__()
        self.tokenizer, self.task_names, self.domain_names = tok, TASKS, TASKS
        self.pad_token_id, self.eos_token_id, self.vocab_size = PAD, EOS, len(tok)
        self.target_max_length = target_max_length
        chunks = [list(range(s, min(s + batch_size, len(triples)))) for s in range(0, len(triples), batch_size)]
        self.batches = [make_batch([triples[i] for i in c], tok, rows=c) for c in chunks]
        self.repeat = repeat

    def vocab(self):
        return {"tasks": TASKS, "domains": TASKS, "labels": {}}

    def _loader(self, repeat=1):
        return DataLoader(self.batches * repeat, batch_size=None)

    def train_dataloader(self):
        return self._loader(self.repeat)

    def val_dataloader(self):
        return self._loader()

    def test_dataloader(self):
        return self._loader()

    def predict_dataloader(self):
        return self._loader()


def trainer(**options):
    return L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, **options)


def randomize_experts(model, std=0.3, seed=0):
    torch.manual_seed(seed)
    with torch.no_grad():
        for params in model.param_groups().values():
            for p in params:
                p.normal_(0, std)


def test_loss_is_cross_entropy_over_target_tokens_only(tok, one_thread):
    triples = [("the quick brown fox", "jumps", 0), ("hello", "big wide world", 1), ("a b", "c", 1)]
    batch = make_batch(triples, tok)
    module = MoACausalLM(router="static", n_experts=2, top_k=1, router_options={"key": "task_ids"})
    randomize_experts(module.model)
    loss, _ = module._loss(batch)
    with torch.no_grad():
        logits = module.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                              task_ids=batch["task_ids"]).logits
    terms = []
    for i, (prompt, target, _) in enumerate(triples):  # positions of the target tokens and eos, from the texts
        start = len(tok(prompt, add_special_tokens=False)["input_ids"])
        n = len(tok(target, add_special_tokens=False)["input_ids"]) + 1
        for j in range(start, start + n):
            terms.append(-torch.log_softmax(logits[i, j - 1].double(), -1)[batch["input_ids"][i, j]])
    assert len(terms) == int((batch["labels"] != -100).sum())
    assert loss.item() == pytest.approx(torch.stack(terms).mean().item(), rel=1e-5)
    # the context reaches the routers: another task's expert gives another loss
    other = dict(batch, task_ids=1 - batch["task_ids"])
    assert abs(module._loss(other)[0].item() - loss.item()) > 1e-3


def greedy_texts(model, tokenizer, batch, max_new_tokens):
    """Greedy generation from the batch's left-padded prompts, routed by its task ids, cut at eos, decoded."""
    prompts = batch["prompt_input_ids"]
    out = model.generate(input_ids=prompts, attention_mask=batch["prompt_attention_mask"], task_ids=batch["task_ids"],
                         domain_ids=batch["domain_ids"], max_new_tokens=max_new_tokens, do_sample=False,
                         eos_token_id=EOS, pad_token_id=PAD)
    texts = []
    for ids in out[:, prompts.shape[1]:].tolist():
        ids = ids[: ids.index(EOS)] if EOS in ids else ids
        texts.append(tokenizer.decode(ids, skip_special_tokens=True).strip())
    return texts


def words(text):
    """ROUGE's tokens: lowercased runs of letters and digits."""
    return re.sub(r"[^a-z0-9]+", " ", text.lower()).split()


def lcs_f_measure(prediction, reference):
    """ROUGE-L F-measure by the longest-common-subsequence table."""
    a, b = words(prediction), words(reference)
    table = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i, x in enumerate(a):
        for j, y in enumerate(b):
            table[i + 1][j + 1] = table[i][j] + 1 if x == y else max(table[i][j + 1], table[i + 1][j])
    lcs = table[-1][-1]
    return 0.0 if lcs == 0 else 2 * (lcs / len(a)) * (lcs / len(b)) / (lcs / len(a) + lcs / len(b))


def test_per_task_perplexity_is_exp_of_the_token_weighted_loss(tok, one_thread):
    module = MoACausalLM(router="static", n_experts=2, top_k=1, router_options={"key": "task_ids"})
    randomize_experts(module.model)
    module.eval()
    prompts = [("red", 0), ("green light", 1), ("blue", 0), ("black", 1), ("one two three", 0)]
    # the greedy generations first (they depend on the prompts only), then targets that some of them match
    drafts = ToyText(tok, [(p, "x", t) for p, t in prompts], batch_size=2)
    with torch.no_grad():
        generated = [text for batch in drafts.batches
                     for text in greedy_texts(module.model, tok, batch, drafts.target_max_length)]
    targets = [generated[0], "a very long answer here", " ".join(words(generated[2])[:1] + ["bird"]), generated[3],
               generated[4]]
    triples = [(p, target, t) for (p, t), target in zip(prompts, targets)]
    data = ToyText(tok, triples, batch_size=2)  # batches mix the tasks
    metrics = trainer().validate(module, datamodule=data, verbose=False)[0]
    sums, counts = torch.zeros(2, dtype=torch.float64), torch.zeros(2)
    module.eval()
    with torch.no_grad():
        for batch in data.batches:
            logits = module.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                  task_ids=batch["task_ids"]).logits.double()
            for i in range(len(batch["row"])):
                for j in torch.nonzero(batch["labels"][i] != -100).flatten().tolist():
                    sums[batch["task_ids"][i]] -= torch.log_softmax(logits[i, j - 1], -1)[batch["input_ids"][i, j]]
                    counts[batch["task_ids"][i]] += 1
    for t, name in enumerate(TASKS):
        assert metrics[f"val/{name}/loss"] == pytest.approx(float(sums[t] / counts[t]), rel=1e-5)
        assert metrics[f"val/{name}/perplexity"] == pytest.approx(float(torch.exp(sums[t] / counts[t])), rel=1e-5)
    assert metrics["val/loss"] == pytest.approx(float(sums.sum() / counts.sum()), rel=1e-5)
    assert metrics["val/perplexity"] == pytest.approx(float(torch.exp(sums.sum() / counts.sum())), rel=1e-5)
    # validate outside fit also generates: exact match (against the reference as the tokenizer round-trips it) and
    # ROUGE-L of those generations, per task and overall
    references = [tok.decode(tok(target, add_special_tokens=False)["input_ids"]).strip() for target in targets]
    exact = [float(g == r) for g, r in zip(generated, references)]
    rouge = [lcs_f_measure(g, r) for g, r in zip(generated, references)]
    assert 0 < sum(exact) < len(exact) and len(set(rouge)) > 2  # the data tells right from wrong
    for name, values in (("exact_match", exact), ("rougeL", rouge)):
        assert metrics[f"val/{name}"] == pytest.approx(sum(values) / len(values), abs=1e-6)
        for t, task in enumerate(TASKS):
            mine = [v for v, (_, task_id) in zip(values, prompts) if task_id == t]
            assert metrics[f"val/{task}/{name}"] == pytest.approx(sum(mine) / len(mine), abs=1e-6), (task, name)


def test_rouge_l_is_the_lcs_f_measure():
    # LCS("the cat sat on the mat", "the cat was on a mat") = the cat on mat: P = R = 4/6
    assert rouge_l("the cat sat on the mat", "the cat was on a mat") == pytest.approx(2 / 3, abs=1e-4)
    # LCS("a b c d", "a c e") = a c: P = 2/4, R = 2/3, F = 2PR / (P + R) = 4/7
    assert rouge_l("a b c d", "a c e") == pytest.approx(4 / 7, abs=1e-4)
    assert rouge_l("Comedy!", "comedy") == pytest.approx(1.0) and rouge_l("drama", "comedy") == 0.0


def test_two_tasks_are_learned_through_static_routing_and_predictions_go_to_parquet(tok, tmp_path, one_thread):
    from moa.pipelines.cli.lightning_cli import ParquetPredictionWriter

    data = ToyText(tok, TOY, repeat=25)  # one batch of the 8 examples; 25 steps an epoch
    module = MoACausalLM(router="static", n_experts=2, top_k=1, router_options={"key": "task_ids"}, lr=1e-2)
    trainer(max_steps=200, limit_val_batches=0).fit(module, datamodule=data)
    metrics = trainer().test(module, datamodule=data, verbose=False)[0]
    for name in TASKS:  # the same prompt, another answer per task
        assert metrics[f"test/{name}/exact_match"] == 1.0 and metrics[f"test/{name}/rougeL"] == pytest.approx(1.0)
    assert metrics["test/exact_match"] == 1.0 and metrics["test/loss"] < 1.5
    output = tmp_path / "predictions.parquet"
    trainer(callbacks=[ParquetPredictionWriter(str(output))]).predict(module, datamodule=data, return_predictions=False)
    import pandas as pd

    frame = pd.read_parquet(output)
    assert list(frame["row"]) == list(range(8)) and list(frame["task"]) == [TASKS[t] for _, _, t in TOY]
    assert list(frame["prompt"]) == [p for p, _, _ in TOY] and list(frame["generation"]) == [t for _, t, _ in TOY]


def test_generation_during_fit_only_every_n_epochs(tok, one_thread):
    seen = []

    class Keys(L.Callback):
        def on_validation_end(self, trainer, module):  # after the module logged its epoch metrics
            seen.append(sorted(k for k in trainer.callback_metrics if k.startswith("val/")))

    module = MoACausalLM(generate_every_n_epochs=2, max_new_tokens=2)
    trainer(max_epochs=2, num_sanity_val_steps=0, callbacks=[Keys()]).fit(module, datamodule=ToyText(tok, TOY))
    assert "val/animal/perplexity" in seen[0] and "val/exact_match" not in seen[0]
    assert "val/exact_match" in seen[1] and "val/food/rougeL" in seen[1]


def test_generation_stops_at_the_data_eos_and_at_every_eos_of_the_model(tok, one_thread):
    """A model whose generation config names several eos ids (Llama 3 style) stops at each of them, and at the
    data's eos that training appended; the texts are cut there."""
    stop = tok.convert_tokens_to_ids("stop")
    module = MoACausalLM(router="static", n_experts=2, top_k=1, router_options={"key": "task_ids"}, max_new_tokens=4,
                         backbone_options={"eos_token_id": [stop, EOS]})
    calls = []
    generate = module.model.generate

    def recording(**kwargs):  # put the model's other eos second in each row's new tokens
        calls.append(kwargs["eos_token_id"])
        out = generate(**kwargs).clone()
        out[:, kwargs["input_ids"].shape[1] + 1] = stop
        return out

    module.model.generate = recording
    batch = make_batch(TOY[:2], tok)
    trainer().validate(module, datamodule=ToyText(tok, TOY[:2]))
    assert module.eos_token_id == [EOS, stop] and calls == [[EOS, stop]]  # the data's first
    texts = module.generate_texts(batch)
    assert all(len(tok(t, add_special_tokens=False)["input_ids"]) <= 1 for t in texts)


@pytest.fixture(scope="module")
def routed_llama():
    base = build_causal_lm("tiny-llama", seed=1)
    model = moa.attach(base, moa.MoAConfig(n_experts=2, r=4, router="static", top_k=1,
                                           router_options={"key": "task_ids"},
                                           target_modules=["q_proj", "v_proj", "o_proj", "down_proj"]))
    randomize_experts(model, std=0.5)
    return model.eval()


def test_generate_with_task_ids_equals_each_row_alone(routed_llama, tok, one_thread):
    model = routed_llama
    batch = make_batch([("the red house on the hill", "x", 0), ("green", "y", 1)], tok)  # left-padded prompts
    ids, mask, tasks = batch["prompt_input_ids"], batch["prompt_attention_mask"], batch["task_ids"]

    def gen(i=None, **options):
        rows = slice(None) if i is None else slice(i, i + 1)
        out = model.generate(input_ids=ids[rows], attention_mask=mask[rows], task_ids=tasks[rows], max_new_tokens=5,
                             pad_token_id=PAD, eos_token_id=-1, **options)  # no eos: every row runs 5 tokens
        return out[:, -5:]

    cases = [dict(do_sample=False),
             dict(do_sample=False, num_beams=2, num_return_sequences=2),
             dict(do_sample=False, num_beams=2),
             dict(do_sample=True, top_k=1, num_return_sequences=2)]  # top-1 sampling: deterministic
    for options in cases:
        together = gen(**options)
        n = options.get("num_return_sequences", 1)
        assert together.shape[0] == 2 * n, options
        for i in range(2):
            assert torch.equal(together[i * n:(i + 1) * n], gen(i, **options)), options
    # the task matters: the first prompt under the other task generates something else
    other = model.generate(input_ids=ids[:1], attention_mask=mask[:1], task_ids=[1], max_new_tokens=5,
                           pad_token_id=PAD, eos_token_id=-1, do_sample=False)[:, -5:]
    assert not torch.equal(other, gen(0, do_sample=False))
    # real sampling, several sequences per row: the batch grows to B * n and a seed fixes the draws
    torch.manual_seed(3)
    first = gen(do_sample=True, num_return_sequences=3, top_k=0)
    torch.manual_seed(3)
    assert first.shape[0] == 6 and torch.equal(first, gen(do_sample=True, num_return_sequences=3, top_k=0))


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])
def test_preset_saves_and_reloads_from_its_folder(name, tok, tmp_path, one_thread):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from moa.pipelines.kinds.causal_lm.module import main

    folder = tmp_path / name
    assert main(["--save-preset", name, str(folder), "--seed", "4"]) == 0
    loaded = AutoModelForCausalLM.from_pretrained(str(folder))
    built = build_causal_lm(name, seed=4).eval()
    ids = torch.tensor([tok("a small test")["input_ids"]])
    with torch.no_grad():
        assert torch.allclose(loaded(input_ids=ids).logits, built(input_ids=ids).logits, atol=1e-6)
    assert loaded.config.vocab_size == len(tok) == 30522
    assert (loaded.config.eos_token_id, loaded.config.pad_token_id) == (tok.sep_token_id, tok.pad_token_id)
    assert loaded.generation_config.eos_token_id == EOS
    assert AutoTokenizer.from_pretrained(str(folder))("a small test")["input_ids"] == ids[0].tolist()
    module = MoACausalLM(backbone=str(folder), n_experts=2, top_k=1)  # a local folder is one flag away
    assert module.model.model.config.model_type == loaded.config.model_type and module.model.moa_layers()


def test_text_data_fit_then_moa_predict_writes_one_generation_per_row(tok, tmp_path, monkeypatch, one_thread):
    from moa.pipelines.cli.command import main

    monkeypatch.chdir(tmp_path)
    data = tmp_path / "data"
    data.mkdir()
    for split in ("train", "val", "test"):  # the columns of moa.pipelines.examples.ml100k_text
        with open(data / f"{split}.jsonl", "w") as f:
            for prompt, target, task in TOY:
                f.write(json.dumps({"text": prompt, "label": target, "task": TASKS[task], "target_text": target}) + "\n")
    paths = [f"--data.init_args.{s}={data / f'{s}.jsonl'}" for s in ("train", "val", "test")]
    small = ["--trainer.logger", "false", "--trainer.enable_progress_bar", "false", "--data.init_args.batch_size", "8",
             "--trainer.enable_model_summary", "false", *paths]
    config = str(ROOT / "configs" / "causal-static.yaml")
    main(["fit", "-c", config, "--trainer.max_epochs", "1", "--trainer.log_every_n_steps", "1", *small])
    last = tmp_path / "runs" / "checkpoints" / "last.ckpt"
    assert last.is_file()
    output = tmp_path / "predictions.parquet"
    done = subprocess.run(
        [str(Path(sys.executable).with_name("moa")), "predict", "-c", config, "--ckpt_path", str(last), *small,
         "--trainer.callbacks+=moa.pipelines.cli.lightning_cli.ParquetPredictionWriter", f"--trainer.callbacks.output={output}"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    import pandas as pd

    frame = pd.read_parquet(output).sort_values("row")
    assert list(frame["row"]) == list(range(len(TOY)))
    assert list(frame["task"]) == [TASKS[t] for _, _, t in TOY]
    assert set(frame.columns) >= {"row", "task", "prompt", "generation"}
    # each row's generation is the checkpoint's own greedy continuation of that row's prompt, alone
    import yaml

    data_args = yaml.safe_load(Path(config).read_text())["data"]["init_args"]
    module = MoACausalLM.load_from_checkpoint(str(last), map_location="cpu").eval()
    expected = []
    for prompt, _, task in TOY:
        ids = torch.tensor([tok(data_args["prompt_template"].format(text=prompt, task=TASKS[task]),
                                add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            out = module.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), task_ids=torch.tensor([task]),
                                        domain_ids=torch.zeros(1, dtype=torch.long), do_sample=False,
                                        max_new_tokens=data_args["target_max_length"], eos_token_id=EOS,
                                        pad_token_id=PAD)
        new = out[0, ids.shape[1]:].tolist()
        expected.append(tok.decode(new[: new.index(EOS)] if EOS in new else new, skip_special_tokens=True).strip())
    assert list(frame["generation"]) == expected and any(expected)
