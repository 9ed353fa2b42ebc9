"""Classification on the user's own text: one label set per task, per-task metrics, names in checkpoints and
predictions (``MoAClassifier`` with ``TextData``, on the pretrained MiniLM)."""

from __future__ import annotations

import json

import lightning as L
import pytest
import torch

from moa.pipelines.kinds.classifier.module import MoAClassifier, TaskLabelHead, macro_f1
from moa.pipelines.data.text import TextData


def test_task_label_head_scores_each_task_in_its_own_label_set():
    torch.manual_seed(0)
    head = TaskLabelHead(8, [2, 3, 1], pooling="first")
    hidden = torch.randn(4, 5, 8)
    tasks = torch.tensor([0, 1, 2, 1])
    logits = head(hidden, None, tasks)
    assert logits.shape == (4, 3)
    # independent: each task's own rows of the stacked linear layer
    full = hidden[:, 0] @ head.scores.classifier.weight.T + head.scores.classifier.bias
    expected = [full[0, 0:2], full[1, 2:5], full[2, 5:6], full[3, 2:5]]
    for row, want in enumerate(expected):
        torch.testing.assert_close(logits[row, : len(want)], want)
    probs = logits.softmax(-1)
    assert probs[0, 2] == 0 and probs[2, 1:].eq(0).all()  # labels outside a task's set get no probability
    with pytest.raises(ValueError, match=r"task_ids must lie in \[0, 2\]"):
        head(hidden, None, torch.tensor([0, 3, 0, 0]))


def test_macro_f1_against_a_hand_computed_example():
    target = torch.tensor([0, 0, 1, 1, 2, 2])
    pred = torch.tensor([0, 1, 1, 1, 0, 2])
    # class 0: tp 1, fp 1, fn 1 -> 0.5; class 1: tp 2, fp 1, fn 0 -> 0.8; class 2: tp 1, fp 0, fn 1 -> 2/3
    assert macro_f1(pred, target) == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def two_task_rows(n: int):
    """Task 'polarity' (good/bad by a word) and task 'topic' (three labels by a word); the same sentences."""
    words = {"good": ("polarity", "pos"), "bad": ("polarity", "neg"), "cats": ("topic", "animals"),
             "cars": ("topic", "vehicles"), "songs": ("topic", "music")}
    rows = []
    for i in range(n):
        word = list(words)[i % len(words)]
        task, label = words[word]
        rows.append({"text": f"item {i % 7} is about {word}", "label": label, "task": task})
    return rows


@pytest.mark.slow
def test_text_classifier_learns_per_task_labels_and_speaks_names(tmp_path, one_thread):
    write_jsonl(tmp_path / "train.jsonl", two_task_rows(60))
    write_jsonl(tmp_path / "val.jsonl", two_task_rows(20))
    data = TextData(train=str(tmp_path / "train.jsonl"), val=str(tmp_path / "val.jsonl"), test=str(tmp_path / "val.jsonl"),
                    task_column="task", batch_size=10, max_length=16)
    module = MoAClassifier(backbone="minilm", router="static", n_experts=2, r=4, top_k=1,
                           router_options={"key": "task_ids"}, target_modules=["query", "value"], lr=5e-3)
    trainer = L.Trainer(max_epochs=4, logger=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=tmp_path, num_sanity_val_steps=0)
    trainer.fit(module, data)
    assert module.names == {"tasks": ["polarity", "topic"], "domains": ["default"],
                            "labels": {"polarity": ["neg", "pos"], "topic": ["animals", "music", "vehicles"]}}
    assert module.head.label_counts == [2, 3]
    metrics = trainer.callback_metrics
    for name in ("val/polarity/accuracy", "val/topic/accuracy", "val/polarity/macro_f1", "val/topic/macro_f1",
                 "val/macro_f1", "val/ece"):
        assert name in metrics, sorted(metrics)
    assert metrics["val/polarity/accuracy"] >= 0.9 and metrics["val/topic/accuracy"] >= 0.9

    # the checkpoint holds the names; a data module with other labels is refused
    checkpoint = torch.load(trainer.checkpoint_callback.best_model_path, weights_only=False)
    assert checkpoint["moa_names"] == module.names

    predictions = trainer.predict(module, data)
    rows = [
        (int(r), t, label)
        for batch in predictions for r, t, label in zip(batch["row"], batch["task"], batch["label"])
    ]
    truth = data.rows("test")
    assert sorted(r for r, _, _ in rows) == list(range(len(truth)))
    correct = sum(label == truth.loc[r, "target"] and t == truth.loc[r, "task"] for r, t, label in rows)
    assert correct / len(rows) >= 0.9
    for _, task, label in rows:
        assert label in data.label_names[task]  # a label of the row's own task


def test_classifier_without_n_classes_needs_named_labels():
    from moa.pipelines.data.tokens import MultiTaskTokens

    module = MoAClassifier(n_experts=2, r=2, top_k=1)
    trainer = L.Trainer(max_steps=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
                        enable_checkpointing=False)
    with pytest.raises(ValueError, match="set model.init_args.n_classes"):
        trainer.fit(module, MultiTaskTokens(n_train=32, n_val=8, n_test=8))


def test_per_task_checkpoint_reloads_without_a_trainer_and_checks_later_data(tmp_path, one_thread):
    write_jsonl(tmp_path / "train.jsonl", two_task_rows(20))
    data = TextData(train=str(tmp_path / "train.jsonl"), val=str(tmp_path / "train.jsonl"), task_column="task",
                    batch_size=10, max_length=16)
    options = dict(backbone_options={"vocab_size": 30522}, n_experts=2, r=2, top_k=1, lr=0.05)  # MiniLM's tokens
    module = MoAClassifier(**options)
    trainer = L.Trainer(max_epochs=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=tmp_path, num_sanity_val_steps=0)
    trainer.fit(module, data)
    path = trainer.checkpoint_callback.best_model_path

    loaded = MoAClassifier.load_from_checkpoint(path)  # no trainer, no data: the head comes from the saved names
    assert loaded.names == module.names and loaded.head.label_counts == [2, 3]
    batch = next(iter(data.val_dataloader()))
    module.eval(), loaded.eval()
    with torch.no_grad():
        trained, reloaded = module(batch), loaded(batch)
        untrained = MoAClassifier.load_from_checkpoint(path)
        untrained.head.load_state_dict(TaskLabelHead(module.hidden_size, [2, 3], "mean").state_dict())
    torch.testing.assert_close(reloaded, trained)
    assert not torch.allclose(untrained.eval()(batch), trained)  # the head's trained weights made the difference

    # data whose names disagree with the checkpoint's: refused when the reloaded module is given it, and when a
    # fresh module built from it resumes the checkpoint
    rows = [{**row, "label": "birds" if row["label"] == "animals" else row["label"]} for row in two_task_rows(20)]
    write_jsonl(tmp_path / "other.jsonl", rows)
    other = TextData(train=str(tmp_path / "other.jsonl"), val=str(tmp_path / "other.jsonl"), task_column="task",
                     batch_size=10, max_length=16)
    evaluate = L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False)
    with pytest.raises(ValueError, match=r"trained on tasks and labels .*'animals'.*the data has .*'birds'"):
        evaluate.validate(loaded, other)
    resume = L.Trainer(max_epochs=2, logger=False, enable_progress_bar=False, enable_model_summary=False,
                       default_root_dir=tmp_path)
    with pytest.raises(ValueError, match=r"trained on tasks and labels .*'animals'.*the data has .*'birds'"):
        resume.fit(MoAClassifier(**options), other, ckpt_path=path)
