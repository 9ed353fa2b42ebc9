"""TextData: the user's JSONL / CSV / Parquet files -> batches; and the ml-100k text tasks.

Checked against independent computations: the real MiniLM tokenizer (loaded from disk) run on the raw texts, label
ids recomputed from the raw rows, row coverage counted per epoch.
"""

import json
import os
from collections import Counter

import pandas as pd
import pytest
import torch
from torch.utils.data import DistributedSampler

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from moa.pretrained import minilm_dir  # noqa: E402
from moa.pipelines.data.text import LengthBatchSampler, TextData  # noqa: E402


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(minilm_dir()))


def rows(n=60):
    """Varied lengths; task a has labels pos/neg, task b has 2/10/7 (numeric names), two domains."""
    out = []
    for i in range(n):
        task = "a" if i % 3 else "b"
        label = ("pos", "neg")[i % 2] if task == "a" else ("2", "10", "7")[(i // 3) % 3]
        words = " ".join(["movie", "night", "great", "plot"][(i + j) % 4] for j in range(1 + (i * 7) % 23))
        out.append({"text": f"{words} {i}", "label": label, "task": task, "dom": "x" if i % 2 else "y",
                    "answer": f"the answer is {label}"})
    return out


def write(path, records):
    frame = pd.DataFrame(records)
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    elif path.suffix == ".csv":
        frame.to_csv(path, index=False)
    else:
        frame.to_parquet(path, index=False)
    return str(path)


# ---- formats, globs, vocabulary


@pytest.mark.parametrize("ext", [".jsonl", ".csv", ".parquet"])
def test_formats_give_the_same_rows_vocab_and_batches(tmp_path, ext, tok):
    records = rows()
    train = write(tmp_path / f"train{ext}", records)
    data = TextData(train, task_column="task", domain_column="dom", val_fraction=0.2, batch_size=8, bucket=False)
    data.setup("fit")
    # vocabulary from the raw training rows (the 80 % kept), sorted; numeric labels in numeric order
    kept = data.rows("train")
    assert data.task_names == ["a", "b"] and data.domain_names == ["x", "y"]
    assert data.label_names == {"a": ["neg", "pos"], "b": ["2", "7", "10"]}
    assert data.vocab() == json.loads(json.dumps(data.vocab()))
    assert data.vocab_size == len(tok) and data.pad_token_id == tok.pad_token_id == 0
    # batches: every training row once, ids recomputed from the raw records
    seen = set()
    for batch in data.train_dataloader():
        assert set(batch) == {"input_ids", "attention_mask", "task_ids", "domain_ids", "labels", "row"}
        for b, r in enumerate(batch["row"].tolist()):
            raw = records[kept["file_row"][r]]
            assert kept["text"][r] == raw["text"]
            assert batch["task_ids"][b] == ["a", "b"].index(raw["task"])
            assert batch["domain_ids"][b] == ["x", "y"].index(raw["dom"])
            assert batch["labels"][b] == data.label_names[raw["task"]].index(raw["label"])
            expected = tok(raw["text"])["input_ids"]
            n = int(batch["attention_mask"][b].sum())
            assert batch["input_ids"][b, :n].tolist() == expected
            seen.add(r)
    assert seen == set(range(len(kept)))


def test_glob_reads_every_matching_file_in_sorted_order(tmp_path):
    records = rows(30)
    (tmp_path / "parts").mkdir()
    write(tmp_path / "parts" / "train-1.jsonl", records[10:])
    write(tmp_path / "parts" / "train-0.jsonl", records[:10])
    write(tmp_path / "parts" / "other.jsonl", [{"text": "no", "label": "pos"}])
    data = TextData(str(tmp_path / "parts" / "train-*.jsonl"), val_fraction=0.0)
    frame = data.rows("train")
    assert frame["text"].tolist() == [r["text"] for r in records]
    assert [os.path.basename(f) for f in frame["file"].unique()] == ["train-0.jsonl", "train-1.jsonl"]
    assert data.val_dataloader() == []  # val_fraction 0 and no val file: no validation


def test_seeded_split_is_deterministic_disjoint_and_per_task(tmp_path):
    train = write(tmp_path / "train.jsonl", rows(90))

    def split(seed):
        data = TextData(train, task_column="task", val_fraction=0.2, test_fraction=0.1, split_seed=seed)
        return {s: data.rows(s)["file_row"].tolist() for s in ("train", "val", "test")}

    first, again, other = split(0), split(0), split(1)
    assert first == again and first != other
    everything = first["train"] + first["val"] + first["test"]
    assert sorted(everything) == list(range(90))  # disjoint and complete
    # per task: round(fraction * rows of the task); task a has 60 rows, b 30
    task = {i: ("a" if i % 3 else "b") for i in range(90)}
    assert Counter(task[i] for i in first["val"]) == {"a": 12, "b": 6}
    assert Counter(task[i] for i in first["test"]) == {"a": 6, "b": 3}


# ---- padding and bucketing


def test_each_batch_is_padded_to_its_own_longest_row(tmp_path, tok):
    records = rows()
    data = TextData(write(tmp_path / "t.jsonl", records), val_fraction=0.0, batch_size=7, max_length=20)
    lengths = [min(len(tok(r["text"])["input_ids"]), 20) for r in records]
    widths = set()
    for batch in data.train_dataloader():
        own = [lengths[r] for r in batch["row"].tolist()]
        assert batch["input_ids"].shape[1] == max(own)
        assert batch["attention_mask"].sum(1).tolist() == own
        assert (batch["input_ids"][batch["attention_mask"] == 0] == tok.pad_token_id).all()
        widths.add(batch["input_ids"].shape[1])
    assert len(widths) > 1  # not one global width
    # truncated rows keep [CLS] ... [SEP] within max_length
    longest = max(range(len(records)), key=lambda i: len(records[i]["text"]))
    batch = next(b for b in data.train_dataloader() if longest in b["row"].tolist())
    ids = batch["input_ids"][batch["row"].tolist().index(longest)].tolist()
    assert len(ids) == 20 and ids == tok(records[longest]["text"])["input_ids"][:19] + [tok.sep_token_id]


def test_bucketing_groups_lengths_and_covers_each_row_once_per_epoch(tmp_path, tok):
    records = rows(200)
    path = write(tmp_path / "t.jsonl", records)
    lengths = [len(tok(r["text"])["input_ids"]) for r in records]

    def padding(data):
        loader = data.train_dataloader()
        total, epochs = 0, []
        for epoch in range(2):
            loader.batch_sampler.sampler.set_epoch(epoch)
            order = []
            for batch in loader:
                total += batch["input_ids"].numel() - int(batch["attention_mask"].sum())
                order.append(tuple(batch["row"].tolist()))
            flat = [r for batch in order for r in batch]
            assert sorted(flat) == list(range(200))  # each row exactly once per epoch
            epochs.append(order)
        assert epochs[0] != epochs[1]  # a new order each epoch
        return total, epochs

    bucketed, epochs = padding(TextData(path, val_fraction=0.0, batch_size=8, split_seed=3))
    plain, _ = padding(TextData(path, val_fraction=0.0, batch_size=8, split_seed=3, bucket=False))
    assert bucketed * 4 < plain
    assert padding(TextData(path, val_fraction=0.0, batch_size=8, split_seed=3))[1] == epochs  # seeded
    # within a pool of 50 batches (here: all 25), batches are runs of the length order
    spans = [max(lengths[r] for r in b) - min(lengths[r] for r in b) for b in epochs[0]]
    assert sum(spans) <= max(lengths) - min(lengths) + len(spans)
    widths = [max(lengths[r] for r in b) for b in epochs[0]]
    assert widths != sorted(widths, reverse=True)  # the batches themselves are shuffled
    # evaluation: sorted by length, longest first
    data = TextData(path, val=path, batch_size=8)
    flat = [r for batch in data.val_dataloader() for r in batch["row"].tolist()]
    assert sorted(flat) == list(range(200))
    assert [lengths[r] for r in flat] == sorted(lengths, reverse=True)


def test_length_batches_under_a_distributed_sampler_cover_the_split(tmp_path):
    lengths = [i % 17 for i in range(101)]
    covered = []
    for rank in range(2):
        shard = DistributedSampler(range(101), num_replicas=2, rank=rank, shuffle=True, seed=0)
        batches = list(LengthBatchSampler(shard, 8, False, lengths, shuffle=True))
        covered += [i for b in batches for i in b]
    assert set(covered) == set(range(101)) and len(covered) == 102  # DistributedSampler pads by one


# ---- text mode


def test_text_mode_masks_the_prompt_and_padding_and_left_pads_prompts(tmp_path, tok):
    records = rows(40)
    records[5]["text"] = " ".join(["long"] * 80)  # longer than max_length: truncated from the left
    data = TextData(write(tmp_path / "t.parquet", records), task_column="task", target_column="answer",
                    target="text", prompt_template="{task}: {text} =>", max_length=24, target_max_length=3,
                    val_fraction=0.0, batch_size=6)
    eos = tok.sep_token_id  # BERT: no eos, so [SEP]
    assert data.eos_token_id == eos and data.label_names == {}
    for batch in data.train_dataloader():
        assert set(batch) == {"input_ids", "attention_mask", "labels", "prompt_input_ids", "prompt_attention_mask",
                              "target_text", "task_ids", "domain_ids", "row"}
        width = batch["prompt_input_ids"].shape[1]
        for b, r in enumerate(batch["row"].tolist()):
            raw = records[r]
            prompt = tok(f"{raw['task']}: {raw['text']} =>", add_special_tokens=False)["input_ids"][-24:]
            target = tok(raw["answer"], add_special_tokens=False)["input_ids"][:3] + [eos]
            p, n = len(prompt), len(prompt) + len(target)
            assert batch["input_ids"][b, :n].tolist() == prompt + target
            assert batch["attention_mask"][b].tolist() == [1] * n + [0] * (batch["input_ids"].shape[1] - n)
            labels = batch["labels"][b]
            assert (labels[:p] == -100).all() and (labels[n:] == -100).all()
            assert labels[p:n].tolist() == target
            words = raw["answer"].split()[:3]  # each word one token here
            assert tok.decode(labels[labels != -100]) == " ".join(words) + " [SEP]"
            assert batch["target_text"][b] == raw["answer"]
            # left-padded prompt
            assert batch["prompt_input_ids"][b, width - p:].tolist() == prompt
            assert batch["prompt_attention_mask"][b].tolist() == [0] * (width - p) + [1] * p
            assert (batch["prompt_input_ids"][b, :width - p] == tok.pad_token_id).all()
        assert not any(101 in ids for ids in batch["input_ids"].tolist())  # no [CLS] inside the text
    long = tok("a: " + records[5]["text"] + " =>", add_special_tokens=False)["input_ids"]
    assert len(long) > 24 and tok.decode(long[-24:]).endswith("long = >")


def test_predict_without_targets_and_the_test_fallback(tmp_path):
    records = rows(30)
    train = write(tmp_path / "train.jsonl", records)
    predict = write(tmp_path / "new.csv", [{"text": r["text"], "task": r["task"]} for r in records[:9]])
    data = TextData(train, predict=predict, task_column="task", test_fraction=0.2, batch_size=4)
    batches = list(data.predict_dataloader())
    assert all("labels" not in b for b in batches)
    assert sorted(r for b in batches for r in b["row"].tolist()) == list(range(9))
    assert data.rows("predict")["text"].tolist() == [r["text"] for r in records[:9]]
    fallback = TextData(train, task_column="task", test_fraction=0.2)
    assert fallback.rows("predict")["file_row"].tolist() == fallback.rows("test")["file_row"].tolist()
    assert all("labels" in b for b in fallback.predict_dataloader())
    with pytest.raises(ValueError, match=r"no test split: set data.init_args.test or test_fraction"):
        TextData(train).test_dataloader()
    text = TextData(train, predict=predict, task_column="task", target="text", target_column="answer")
    batch = next(iter(text.predict_dataloader()))
    assert "labels" not in batch and "target_text" not in batch
    assert torch.equal(batch["input_ids"].ne(0).long(), batch["attention_mask"])


# ---- the backbone's tokenizer, targets tokenized after their prompt, long rows


@pytest.fixture(scope="module")
def smol(smollm2_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(smollm2_dir))


def test_the_tokenizer_is_the_backbones_unless_one_is_named(tmp_path, tok, smol, smollm2_dir):
    from moa.pipelines.data.text import fill_tokenizer
    from jsonargparse import Namespace

    train = write(tmp_path / "train.jsonl", rows(8))
    data = TextData(train, val_fraction=0, batch_size=8)
    first = next(iter(data.train_dataloader()))  # no model yet: MiniLM (the random presets' vocabulary)
    texts = data.rows("train")["text"]
    assert first["input_ids"][0, :first["attention_mask"][0].sum()].tolist() == tok(texts[int(first["row"][0])])["input_ids"]
    data.use_backbone("smollm2-135m")  # what the modules do at setup: encoded again with the backbone's
    batch = next(iter(data.train_dataloader()))
    assert data.vocab_size == len(smol) == 49152 and data.eos_token_id == smol.eos_token_id == 2
    for b, r in enumerate(batch["row"].tolist()):
        n = int(batch["attention_mask"][b].sum())
        assert batch["input_ids"][b, :n].tolist() == smol(texts[r])["input_ids"]
    data.use_backbone("tiny-llama")
    assert data.vocab_size == len(tok)
    TextData(train, tokenizer=str(smollm2_dir)).use_backbone("smollm2-135m")  # another name, the same vocabulary
    with pytest.raises(ValueError, match=r"tokenizer 'smollm2-135m' \(49,152 tokens\) does not match backbone "
                                         r"'tiny-llama' \(MiniLM's, as every random preset: 30,522 tokens\)"):
        TextData(train, tokenizer="smollm2-135m").use_backbone("tiny-llama")
    (tmp_path / "weights-only").mkdir()
    with pytest.raises(ValueError, match=r"tokenizer: .*weights-only has no tokenizer"):
        TextData(train, tokenizer=str(tmp_path / "weights-only")).setup()
    # the CLI fills the tokenizer in from the model's backbone before it builds the classes
    model = Namespace(class_path="moa.pipelines.kinds.causal_lm.module.MoACausalLM",
                      init_args=Namespace(backbone="tiny-llama"))
    config = Namespace(class_path="moa.pipelines.data.text.TextData", init_args=Namespace(train=train, tokenizer=None))
    fill_tokenizer(config, model)
    assert config.init_args.tokenizer == "minilm"
    model.init_args.backbone = "smollm2-135m"
    with pytest.raises(ValueError, match=r"tokenizer 'minilm' \(30,522 tokens\) does not match backbone 'smollm2-135m'"):
        fill_tokenizer(config, model)


def test_a_target_gets_the_tokens_that_follow_its_prompt(tmp_path, smol):
    records = [{"text": "Hamlet is the", "label": "Prince of Denmark"},  # joined by a space: ' Prince'
               {"text": "2 + 2 =\n", "label": "4"},                     # the prompt ends in whitespace: no space
               {"text": "Answer: ", "label": "Paris"}]                  # a trailing space token: the target alone
    data = TextData(write(tmp_path / "t.jsonl", records), target="text", tokenizer="smollm2-135m", val_fraction=0,
                    batch_size=3)
    batch = next(iter(data.train_dataloader()))
    eos, order = smol.eos_token_id, batch["row"].tolist()
    for b, record in zip(range(3), [records[r] for r in order]):
        prompt = smol(record["text"], add_special_tokens=False)["input_ids"]
        joined = record["text"] + ("" if record["text"][-1].isspace() else " ") + record["label"]
        whole = smol(joined, add_special_tokens=False)["input_ids"]
        alone = smol(record["label"], add_special_tokens=False)["input_ids"]
        target = whole[len(prompt):] if whole[:len(prompt)] == prompt else alone
        labels = batch["labels"][b]
        assert batch["input_ids"][b, :len(prompt)].tolist() == prompt
        assert labels[labels != -100].tolist() == target + [eos]
    first_target = {order[b]: smol.convert_ids_to_tokens(int(labels[labels != -100][0]))
                    for b, labels in enumerate(batch["labels"])}
    assert first_target == {0: "ĠPrince", 1: "4", 2: "Paris"}  # 'ĠPrince' as generated after the prompt, not 'Prince'


def test_the_chat_template_formats_prompts_and_needs_a_tokenizer_that_has_one(tmp_path, smol):
    from moa.pipelines.data.text import TextEncoder

    train = write(tmp_path / "q.jsonl", [{"text": "Hi there", "label": "Hello"}])
    data = TextData(train, target="text", tokenizer="smollm2-135m", prompt_template="chat", val_fraction=0)
    batch = next(iter(data.train_dataloader()))
    chatml = ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
              "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n")
    assert smol.decode(batch["prompt_input_ids"][0]) == chatml
    assert batch["prompt_input_ids"][0].tolist() == smol(chatml, add_special_tokens=False)["input_ids"]
    assert TextEncoder(smol, "chat").prompt("Hi there", "default", "default") == chatml  # the served prompt
    with pytest.raises(ValueError, match=r"prompt_template 'chat' needs a tokenizer with a chat template"):
        TextData(train, target="text", tokenizer="minilm", prompt_template="chat", val_fraction=0).setup()  # none


def test_rows_longer_than_the_limits_are_counted_in_a_warning_and_serving_can_refuse_them(tmp_path, tok):
    from moa.pipelines.data.text import TextEncoder

    records = [{"text": " ".join(["word"] * n), "label": " ".join(["yes"] * m)} for n, m in
               [(3, 1), (12, 1), (5, 6), (20, 2), (8, 1)]]
    train = write(tmp_path / "t.jsonl", records)
    prompts = [len(tok(r["text"], add_special_tokens=False)["input_ids"]) for r in records]
    targets = [len(tok(r["label"], add_special_tokens=False)["input_ids"]) for r in records]
    data = TextData(train, target="text", max_length=8, target_max_length=4, val_fraction=0)
    with pytest.warns(UserWarning) as caught:
        data.train_dataloader()
    messages = [str(w.message) for w in caught]
    long = [n for n in prompts if n > 8]
    assert f"train: {len(long)} of 5 prompts are longer than max_length=8 tokens (the longest {max(long)})" in messages[0]
    assert f"train: 1 of 5 targets are longer than target_max_length=4 tokens (the longest {max(targets)})" in messages[1]
    labels = TextData(train, max_length=10, val_fraction=0)
    with pytest.warns(UserWarning, match=r"train: 2 of 5 inputs are longer than max_length=10 tokens \(the longest 22\)"):
        labels.train_dataloader()  # with [CLS] and [SEP]
    encoder = TextEncoder(tok, max_length=8)
    encoder.check_length([records[0]["text"], records[4]["text"]])
    with pytest.raises(ValueError, match=r"row 1: prompt of 12 tokens exceeds max_length=8"):
        encoder.check_length([records[0]["text"], records[1]["text"]])


# ---- bad input


def test_every_bad_input_is_one_clear_error(tmp_path):
    good = write(tmp_path / "train.jsonl", rows(30))
    cases = []

    def expect(pattern, **kwargs):
        with pytest.raises(ValueError, match=pattern) as info:
            data = TextData(**{"train": good, "task_column": "task", **kwargs})
            data.setup("fit")
        assert "\n" not in str(info.value)  # one line
        cases.append(pattern)

    expect(r"train: file not found: .*nope\.jsonl", train=str(tmp_path / "nope.jsonl"))
    expect(r"val: no file matches '.*/none-\*\.csv'", val=str(tmp_path / "none-*.csv"))
    expect(r"train\.jsonl: no column 'txt' \(text_column\); its columns are \['text', 'label', 'task', 'dom', "
           r"'answer'\]", text_column="txt")
    expect(r"no column 'topic' \(task_column\)", task_column="topic")
    (tmp_path / "empty.jsonl").write_text("")
    expect(r"val: empty split: no rows in '.*empty\.jsonl'", val=str(tmp_path / "empty.jsonl"))
    expect(r"val: empty split: val_fraction=0\.01 of 30 training rows is no row", val_fraction=0.01)
    val = write(tmp_path / "val.jsonl", [rows(1)[0], {"text": "x", "label": "pos", "task": "c"}])
    expect(r"val\.jsonl row 1: task 'c' \(column 'task'\) does not appear in the training data, whose tasks are "
           r"\['a', 'b'\]", val=val)
    test = write(tmp_path / "test.csv", [{"text": "x", "label": "pos", "task": "a"},
                                         {"text": "y", "label": "3", "task": "b"}])
    expect(r"test\.csv row 1: label '3' \(column 'label'\) of task 'b' is not in the training set's labels "
           r"\['2', '7', '10'\]", test=test)
    (tmp_path / "data.txt").write_text("hello")
    expect(r"data\.txt: unsupported file type '\.txt'; use one of \.jsonl", train=str(tmp_path / "data.txt"))
    (tmp_path / "bad.parquet").write_bytes(b"not parquet")
    expect(r"bad\.parquet: cannot read as parquet: ", train=str(tmp_path / "bad.parquet"))
    (tmp_path / "bad.jsonl").write_text('{"text": "a", "label": "pos"}\nnot json\n')
    expect(r"bad\.jsonl: cannot read as jsonl: ", train=str(tmp_path / "bad.jsonl"), task_column=None)
    hole = write(tmp_path / "hole.jsonl", [{"text": "a", "label": "x"}, {"text": None, "label": "y"}])
    expect(r"hole\.jsonl row 1: missing value in column 'text'", train=hole, task_column=None)
    expect(r"tokenizer: no folder '.*no-model'", tokenizer=str(tmp_path / "no-model"))
    with pytest.raises(ValueError, match="target must be 'label' or 'text'"):
        TextData(good, target="labels")
    with pytest.raises(ValueError, match=r"prompt_template '\{txt\}'"):
        TextData(good, prompt_template="{txt}")
    assert len(cases) == 13


@pytest.mark.parametrize("ext", [".csv", ".tsv", ".jsonl", ".parquet"])
@pytest.mark.parametrize("column", ["text", "label", "task", "dom"])
def test_empty_cells_are_refused_like_missing_values(tmp_path, ext, column):
    """A CSV/TSV empty cell reads as "" (not NaN); an empty (or blank) string is refused in any format, at load
    time, naming the file, the row and the column, in the train split and in the predict split alike."""
    records = rows(12)
    records[7] = {**records[7], column: "" if ext != ".parquet" else "  "}
    path = tmp_path / f"train{ext}"
    if ext == ".tsv":
        pd.DataFrame(records).to_csv(path, sep="\t", index=False)
    else:
        write(path, records)
    with pytest.raises(ValueError, match=rf"train\{ext} row 7: empty value in column '{column}'$"):
        TextData(str(path), task_column="task", domain_column="dom").prepare()
    good = write(tmp_path / "good.jsonl", rows(12))
    if column != "label":  # a predict file's target column is optional; the others are needed
        with pytest.raises(ValueError, match=rf"train\{ext} row 7: empty value in column '{column}'$"):
            TextData(good, predict=str(path), task_column="task", domain_column="dom").prepare()


def test_a_bare_carriage_return_in_a_csv_field_is_refused_with_its_row_and_column(tmp_path):
    """pandas writes a text's lone \\r unquoted (a tweet's, say) and reads it back as a line end: the row splits
    into shifted and empty ones. The load refuses it, naming the file row and the column; \\r\\n line ends are
    fine."""
    records = rows(12)
    frame = pd.DataFrame(records)
    frame.to_csv(tmp_path / "crlf.csv", index=False, lineterminator="\r\n")
    data = TextData(str(tmp_path / "crlf.csv"), task_column="task", domain_column="dom", val_fraction=0.0)
    assert data.rows("train")["text"].tolist() == [r["text"] for r in records]
    assert data.rows("train")["target"].tolist() == [r["label"] for r in records]  # no "\r" left on the last column
    for column, ext, ending in [("text", ".csv", "\n"), ("task", ".tsv", "\r\n"), ("text", ".csv", "\r\n")]:
        broken = frame.copy()
        broken.loc[9, column] = broken.loc[9, column][:2] + "\r" + broken.loc[9, column][2:]
        path = tmp_path / f"cr-{column}{ext}"
        broken.to_csv(path, sep="," if ext == ".csv" else "\t", index=False, lineterminator=ending)
        assert b"\r" + broken.loc[9, column][3:].encode() in path.read_bytes()  # written unquoted
        with pytest.raises(ValueError, match=rf"cr-{column}\{ext} row 9: a carriage return \(\\r\) inside column "
                                             rf"'{column}'"):
            TextData(str(path), task_column="task", domain_column="dom").prepare()


# ---- the ml-100k text tasks


def test_ml100k_text_tasks(tmp_path, tok):
    from moa.pipelines.examples.ml100k_text import AGE_GROUPS, DECADES, OCCUPATIONS, build_tasks, main, write_tasks

    frames = write_tasks(tmp_path / "tasks", seed=0)
    again = build_tasks(seed=0)
    for split in ("train", "val", "test"):
        pd.testing.assert_frame_equal(frames[split], again[split])
        assert list(frames[split].columns) == ["text", "label", "task", "target_text"]
    assert not build_tasks(seed=1)["train"].equals(frames["train"])
    train = frames["train"]
    assert 2000 <= sum(len(f) for f in frames.values()) <= 5000
    per_task = train["task"].value_counts()
    assert set(per_task.index) == {"genre", "decade", "age", "occupation"}
    assert per_task.between(400, 800).all()
    allowed = {"genre": {"children", "comedy", "action", "drama"}, "decade": {d[1] for d in DECADES},
               "age": {a[1] for a in AGE_GROUPS}, "occupation": set(OCCUPATIONS)}
    for frame in frames.values():
        for task, group in frame.groupby("task"):
            assert set(group["label"]) <= allowed[task]
    assert set(train.groupby("task")["label"].nunique()) == {3, 4, 6}
    # no text of a test movie (or user) is in training, for either task on it
    for tasks in (("genre", "decade"), ("age", "occupation")):
        seen = set(train[train["task"].isin(tasks)]["text"])
        assert not seen & set(frames["test"][frames["test"]["task"].isin(tasks)]["text"])
    lengths = [len(ids) for ids in tok(train["text"].tolist())["input_ids"]]
    assert max(lengths) <= 64
    # the files load into TextData with every label known
    folder = tmp_path / "tasks"
    data = TextData(str(folder / "train.jsonl"), val=str(folder / "val.jsonl"), test=str(folder / "test.jsonl"),
                    task_column="task")
    assert data.task_names == ["age", "decade", "genre", "occupation"]
    assert data.label_names["occupation"] == sorted(OCCUPATIONS)
    assert main([str(tmp_path / "cli")]) == 0
    assert (tmp_path / "cli" / "train.jsonl").read_text() == (folder / "train.jsonl").read_text()
