"""The classifier's serving flavour: rows ``{text, task, domain}`` of a text bundle
(:mod:`moa.pipelines.kinds.text_bundle`) -> the row's task's label and probabilities."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Mapping

import pandas as pd
import torch

from moa.pipelines.bundle import RequestError
from moa.atomic import read_safetensors
from moa.pipelines.kinds import text_bundle
from moa.pipelines.kinds.text_bundle import CLASSIFIER, HEAD_FILE, TextService


class ClassifierService(TextService):
    """Rows ``{text, task, domain}`` -> ``label``, ``probability``, ``labels``, ``probabilities``."""

    KIND = CLASSIFIER

    @classmethod
    def from_bundle(cls, directory: str | Path) -> "ClassifierService":
        from moa.lightning import ClassificationHead

        from moa.pipelines.kinds.classifier.module import TaskLabelHead

        meta, model, tokenizer, folder = text_bundle.load_text_bundle(directory, cls.KIND, cls.BASE_FALLBACK)
        spec = meta["head"]
        if spec["type"] == "task_labels":
            head = TaskLabelHead(spec["hidden_size"], spec["label_counts"], spec["pooling"])
        else:
            head = ClassificationHead(spec["hidden_size"], spec["n_classes"], spec["pooling"])
        head.load_state_dict(read_safetensors(folder / HEAD_FILE), strict=True)
        return cls(meta, model, tokenizer, head.eval())

    @torch.no_grad()
    def predict_frame(self, frame: pd.DataFrame, params: Mapping[str, Any] | None = None, *,
                      check: Callable[[], None] | None = None) -> pd.DataFrame:
        if params:
            raise RequestError(f"unknown params {sorted(params)}; a classifier takes none")
        prompts, task_ids, domain_ids = self._prompts(frame)
        input_ids, mask = self.encoder.inputs(prompts)  # training's tokens and padding (TextData)
        with self._model_lock:
            outputs = self.model(input_ids=input_ids, attention_mask=mask, task_ids=task_ids,
                                 domain_ids=domain_ids)
            if self.meta["head"]["type"] == "task_labels":
                logits = self.head(outputs.last_hidden_state, mask, task_ids)
            else:
                logits = self.head(outputs.last_hidden_state, mask)
        probs = logits.float().softmax(-1)
        rows = []
        for task, p in zip(task_ids.tolist(), probs):
            labels = self.meta["labels"][self.tasks[task]]
            p = p[: len(labels)].tolist()
            best = max(range(len(labels)), key=p.__getitem__)
            rows.append({"label": labels[best], "probability": p[best], "labels": labels, "probabilities": p})
        return pd.DataFrame(rows)


def signature(meta: Mapping[str, Any]):
    """Inputs ``text`` (``task``, ``domain`` optional); outputs ``label``, ``probability``, ``labels``,
    ``probabilities``."""
    from mlflow.types import ColSpec
    from mlflow.types.schema import Array

    return text_bundle.signature(
        [ColSpec("string", "text")],
        [ColSpec("string", "label"), ColSpec("double", "probability"), ColSpec(Array("string"), "labels"),
         ColSpec(Array("double"), "probabilities")])


def input_example(folder: str | Path) -> pd.DataFrame:
    return text_bundle.input_example(text_bundle.read_meta(folder), "text")
