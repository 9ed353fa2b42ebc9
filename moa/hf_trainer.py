"""HF ``Trainer`` with PEFT's checkpoints for moa models: the adapters, not the frozen base.

``transformers.Trainer._save`` calls ``save_pretrained`` only for a ``PreTrainedModel`` or a ``PeftModel``
(``isinstance``), and resumes adapters only for a ``PeftModel``; any other module is saved whole (its full
``state_dict``, e.g. 92 MB for MiniLM). :class:`MoATrainer` does for a :class:`~moa.MoAModel` what the Trainer does
for a ``PeftModel``.
"""

from __future__ import annotations

import os

import torch
from transformers import Trainer
from transformers.trainer import TRAINING_ARGS_NAME
from transformers.utils import can_return_loss, find_labels

from .config import CONFIG_NAME
from .model import MoAModel, load_saved_state


class MoATrainer(Trainer):
    """``transformers.Trainer`` whose checkpoints of a :class:`~moa.MoAModel` are :meth:`MoAModel.save_pretrained`
    folders (adapters, routers, shared modules, ``modules_to_save``; with the tokenizer and training arguments, as
    the Trainer writes them), which ``train(resume_from_checkpoint=...)``, ``load_best_model_at_end`` and
    :func:`moa.load` read; evaluation finds the wrapped model's labels (``eval_loss``, ``label_ids``). Under
    DeepSpeed / FSDP (which hand ``_save`` a gathered state dict), and for any other model, the Trainer as is."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        model = self._moa_model()
        if model is not None:  # the Trainer reads these off the model's class: a MoAModel's are its wrapped model's
            if self.args.label_names is None:  # else evaluation finds no labels: no eval_loss, no label_ids
                self.label_names = find_labels(type(model.model))
            self.can_return_loss = can_return_loss(type(model.model))

    def _moa_model(self) -> MoAModel | None:
        model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        return model if isinstance(model, MoAModel) else None

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        model = self._moa_model()
        if model is None or state_dict is not None:
            return super()._save(output_dir, state_dict)
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        model.save_pretrained(output_dir)
        tokenizer = self.processing_class
        if tokenizer is None:
            tokenizer = getattr(self.data_collator, "tokenizer", None)
        if tokenizer is not None:
            tokenizer.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        moa_model = self._moa_model() if model is None or model is self.model else None
        if moa_model is None or not os.path.isfile(os.path.join(resume_from_checkpoint, CONFIG_NAME)):
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        load_saved_state(moa_model, resume_from_checkpoint)

    def _load_best_model(self) -> None:
        moa_model, best = self._moa_model(), self.state.best_model_checkpoint
        if moa_model is None or not os.path.isfile(os.path.join(best, CONFIG_NAME)):
            return super()._load_best_model()
        load_saved_state(moa_model, best)
