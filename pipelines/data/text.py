"""Your own text data for ``moa fit``: JSONL / CSV / Parquet files -> tokenized, dynamically padded batches.

:class:`TextData` reads train / val / test / predict files (paths or globs), maps task, domain and label names to
ids (sorted, from the training rows only, exposed as :meth:`TextData.vocab` so a model can save them), tokenizes
with the backbone's tokenizer (unless another is named; see :meth:`TextData.use_backbone`), and batches rows of
similar length together (each batch padded only to its own longest row). Two target kinds:

* ``target="label"``: classification. Each task has its own label list (``label_names[task]``); ``labels`` are
  indices within the row's task's list.
* ``target="text"``: causal LM. ``input_ids`` = prompt + target + eos, ``labels`` = the same with -100 on the prompt
  and the padding, plus left-padded ``prompt_input_ids`` and the ``target_text`` for generation.

:class:`TextEncoder` is the pre-processing of one row (template or chat template, tokens, truncation, padding side,
eos cut); the text kinds' services run the same one from their bundle, so serving encodes a row as training does.
Rows longer than ``max_length`` (or targets longer than ``target_max_length``) are cut, with a warning that counts
them; serving can refuse them instead (:meth:`TextEncoder.check_length`).

Bad input (missing file or column, a missing or empty text / target / task / domain value, a task or label that
training never saw, an unreadable file, a bare carriage return inside a CSV/TSV field) raises one ``ValueError``
naming the file, column and row (rows are counted from 0, header excluded).
"""

from __future__ import annotations

import glob
import math
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Literal, Sequence

import lightning as L
import numpy as np
import pandas as pd
import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler, SequentialSampler

from moa.experts.errors import UserError

DEFAULT = "default"
"""The task (domain) name of every row when there is no task (domain) column."""
EXTENSIONS = (".jsonl", ".ndjson", ".json", ".csv", ".tsv", ".parquet", ".pq")


def natural_sorted(names) -> list[str]:
    """Sorted names; numerically when all are integers (labels ``0..K-1`` keep their ids)."""
    names = sorted(set(names))
    if names and all(re.fullmatch(r"-?\d+", n) for n in names):
        return sorted(names, key=int)
    return names


def _missing(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _empty(value) -> bool:
    """An empty (or blank) text: what a CSV/TSV empty cell reads as."""
    return isinstance(value, str) and not value.strip()


def _check_carriage_returns(path: Path, sep: str) -> None:
    """Refuse a bare ``\\r`` (not part of ``\\r\\n``) inside a CSV/TSV field, naming its row and column: pandas writes
    it unquoted (a tweet's text), and readers then split the row there into shifted or empty rows."""
    if not re.search(rb"\r(?!\n)", path.read_bytes()):
        return
    lines = pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False, lineterminator="\n")  # \r stays in cells
    columns = [str(c) for c in lines.columns]
    if columns:
        columns[-1] = columns[-1].removesuffix("\r")  # a \r\n line end
    for column, name in zip(lines.columns, columns):
        cells = lines[column].str.removesuffix("\r") if column == lines.columns[-1] else lines[column]
        bad = np.flatnonzero(cells.str.contains("\r", regex=False).to_numpy())
        if len(bad):
            raise UserError(f"{path} row {bad[0]}: a carriage return (\\r) inside column {name!r} splits the row; "
                            "replace it (e.g. with a space)")


def read_table(path: Path) -> pd.DataFrame:
    """One file as a DataFrame (CSV/TSV cells stay strings); ``ValueError`` naming the file if it can't be read,
    and its row and column for a bare ``\\r`` inside a CSV/TSV field."""
    ext = path.suffix.lower()
    if ext not in EXTENSIONS:
        raise UserError(f"{path}: unsupported file type {ext or '(none)'!r}; use one of {', '.join(EXTENSIONS)}")
    try:
        if ext in (".jsonl", ".ndjson"):
            return pd.read_json(path, lines=True, dtype=False)
        if ext == ".json":  # an array of records
            return pd.read_json(path, dtype=False)
        if ext in (".csv", ".tsv"):
            sep = "," if ext == ".csv" else "\t"
            _check_carriage_returns(path, sep)
            return pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False)
        return pd.read_parquet(path)
    except pd.errors.EmptyDataError:
        return pd.DataFrame()
    except UserError:
        raise
    except Exception as error:  # pandas / pyarrow raise many kinds
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UserError(f"{path}: cannot read as {ext[1:]}: {first}") from error


def expand(spec: str, split: str) -> list[Path]:
    """The files of one split: a path, or a glob (sorted matches)."""
    spec = str(Path(spec).expanduser())
    if any(c in spec for c in "*?["):
        paths = [Path(p) for p in sorted(glob.glob(spec, recursive=True)) if Path(p).is_file()]
        if not paths:
            raise UserError(f"{split}: no file matches {spec!r}")
        return paths
    if not Path(spec).is_file():
        raise UserError(f"{split}: file not found: {spec}")
    return [Path(spec)]


def _shuffle_rng(seed: int, epoch: int, stream: int) -> np.random.Generator:
    return np.random.default_rng([seed, epoch, stream])


class EpochShuffle(RandomSampler):
    """A seeded permutation, a new one each epoch (``set_epoch``, or the next iteration without Lightning).

    A ``RandomSampler``, so Lightning's DDP replaces it with a shuffling ``DistributedSampler``."""

    def __init__(self, data_source, seed: int = 0):
        super().__init__(data_source)
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        order = _shuffle_rng(self.seed, self.epoch, 0).permutation(len(self.data_source))
        self.epoch += 1
        return iter(order.tolist())


class LengthBatchSampler(BatchSampler):
    """Batches of rows of similar length, so padding to each batch's longest row wastes little.

    The indices ``sampler`` yields (shuffled for training; a rank's shard under DDP) are cut into pools of
    ``pool * batch_size``, sorted by length (longest first) within each pool and batched; training batches are then
    shuffled (seeded, per epoch). With ``shuffle=False`` the whole split is one pool: sorted by length. With
    ``bucket=False`` batches follow the sampler's order. Every index appears exactly once per epoch.
    """

    def __init__(self, sampler, batch_size: int, drop_last: bool = False, lengths: Sequence[int] = (),
                 bucket: bool = True, shuffle: bool = False, seed: int = 0, pool: int = 50):
        super().__init__(sampler, batch_size, drop_last)
        self.lengths, self.bucket, self.shuffle, self.seed, self.pool = list(lengths), bucket, shuffle, seed, pool

    def __iter__(self) -> Iterator[list[int]]:
        epoch = getattr(self.sampler, "epoch", 0)
        order = list(self.sampler)
        if self.bucket:
            size = self.pool * self.batch_size if self.shuffle else max(len(order), 1)
            order = [i for s in range(0, len(order), size)
                     for i in sorted(order[s:s + size], key=lambda i: -self.lengths[i])]
        batches = [order[s:s + self.batch_size] for s in range(0, len(order), self.batch_size)]
        if self.drop_last and batches and len(batches[-1]) < self.batch_size:
            batches.pop()
        if self.shuffle and self.bucket:
            batches = [batches[i] for i in _shuffle_rng(self.seed, epoch, 1).permutation(len(batches))]
        return iter(batches)


class _Rows(Dataset):
    def __init__(self, rows: list[dict]):
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        return self.rows[i]


# ---- the pre-processing of a row: training (TextData, Collate) and serving (the text kinds' services) run this code
def _pad(seqs: Sequence[Sequence[int]], value: int, left: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    width = max((len(s) for s in seqs), default=0)
    ids = torch.full((len(seqs), width), value, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for b, s in enumerate(seqs):
        span = slice(width - len(s), width) if left else slice(0, len(s))
        ids[b, span] = torch.tensor(list(s), dtype=torch.long)
        mask[b, span] = 1
    return ids, mask


def pad_inputs(seqs: Sequence[Sequence[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)`` of model inputs (classifier texts, training sequences): right-padded."""
    return _pad(seqs, pad_token_id)


def pad_prompts(seqs: Sequence[Sequence[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)`` of generation prompts: LEFT-padded, so every row's next token follows its
    last column."""
    return _pad(seqs, pad_token_id, left=True)


def decode_generation(tokenizer, new_ids: Sequence[int], eos_token_id: int | Sequence[int] | None) -> str:
    """The text of generated tokens: cut before the first eos (one id or several), decoded without special
    tokens, stripped."""
    eos = {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id or ())
    new_ids = list(new_ids)
    end = next((j for j, i in enumerate(new_ids) if i in eos), len(new_ids))
    return tokenizer.decode(new_ids[:end], skip_special_tokens=True).strip()


CHAT = "chat"
"""The ``prompt_template`` that writes a row's text as the user's turn of the tokenizer's chat template."""


def load_tokenizer(name: str):
    """The tokenizer of a pretrained name (``"minilm"``, ``"smollm2-135m"``: :mod:`moa.pretrained`), a GGUF file or a
    local model folder."""
    from transformers import AutoTokenizer

    from moa.pretrained import NAMES, is_pretrained_name, resolve_pretrained

    path = Path(name).expanduser()
    if not (is_pretrained_name(name) or path.suffix.lower() == ".gguf" or path.is_dir()):
        raise UserError(f"tokenizer: no folder {str(path)!r}; use one of {list(NAMES)}, a .gguf file or a local "
                        "model folder")
    folder = resolve_pretrained(name)
    try:
        return AutoTokenizer.from_pretrained(str(folder))
    except (OSError, ValueError, TypeError) as error:
        raise UserError(f"tokenizer: {folder} has no tokenizer ({str(error).splitlines()[0][:200]}); name one with "
                        "data.init_args.tokenizer") from error


def tokenizer_source(backbone: str) -> str:
    """Where a backbone's tokenizer comes from: the backbone itself (a pretrained name, a GGUF file, a model
    folder), else ``"minilm"``: the random presets (``tiny-llama``, ``tiny-gpt2``, ``tiny-bert``) use MiniLM's
    vocabulary."""
    from moa.pretrained import is_pretrained_name

    path = Path(str(backbone)).expanduser()
    if is_pretrained_name(backbone) or path.suffix.lower() == ".gguf" or path.is_dir():
        return str(backbone)
    return "minilm"


def check_tokenizer(name: str, backbone: str, tokenizer=None) -> None:
    """A named tokenizer must have the vocabulary of the backbone's own: else its token ids would mean other tokens
    to the model (``UserError`` naming both). Skipped when the backbone has no tokenizer of its own."""
    source = tokenizer_source(backbone)
    if str(name) == source:
        return
    try:
        own = load_tokenizer(source)
    except UserError:  # a model folder without a tokenizer: the modules still check the vocabulary's size
        return
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(name)
    if tokenizer.get_vocab() != own.get_vocab():
        whose = "its tokenizer" if source == str(backbone) else "MiniLM's, as every random preset"
        raise UserError(f"tokenizer {str(name)!r} ({len(tokenizer):,} tokens) does not match backbone {backbone!r} "
                        f"({whose}: {len(own):,} tokens): leave data.init_args.tokenizer unset to use the "
                        "backbone's, or name one with the same vocabulary")


def fill_tokenizer(data: Any, model: Any) -> None:
    """For the CLI, before it builds the classes (``data`` / ``model``: their ``class_path`` + ``init_args``
    configs): a :class:`TextData` without a tokenizer gets its model's backbone's (the saved config records it); a
    named one is checked against the backbone, before the model's weights load."""
    import pydoc

    data_class = pydoc.locate(str(getattr(data, "class_path", "")))
    if not (isinstance(data_class, type) and issubclass(data_class, TextData)):
        return
    backbone = getattr(getattr(model, "init_args", None), "backbone", None)
    if not isinstance(backbone, str):
        return
    if data.init_args.get("tokenizer") is None:
        data.init_args["tokenizer"] = tokenizer_source(backbone)
    else:
        check_tokenizer(data.init_args["tokenizer"], backbone)


def _joiner(prompt: str, target: str) -> str:
    """What goes between a prompt and its target: a space, unless one of them has whitespace there."""
    return "" if not prompt or prompt[-1].isspace() or target[:1].isspace() else " "


class TextEncoder:
    """One row's pre-processing, the same in training (:class:`TextData`) and serving (the text services, built
    from the bundle's tokenizer, template and ``max_length``): the prompt from the template, its tokens (classifier
    inputs cut to ``max_length`` in both; generation prompts cut in training only, with a warning, while a server
    generates from the whole prompt and refuses one past the model's context), padded on the kind's side, and a
    generation cut at eos.

    ``prompt_template``: a format string with ``{text}``, ``{task}`` and ``{domain}``, or ``"chat"``: the row's text
    as the user's turn of the tokenizer's chat template, with the assistant's turn opened (e.g. SmolLM2's ChatML).
    ``pad_token_id``: given, else the tokenizer's pad, else its eos, else 0; ``eos_token_id`` (one id or several;
    training appends the first): given, else the tokenizer's eos, else its sep, else the pad.
    """

    def __init__(self, tokenizer, prompt_template: str = "{text}", max_length: int = 128,
                 pad_token_id: int | None = None, eos_token_id: int | Sequence[int] | None = None):
        self.tokenizer, self.prompt_template, self.max_length = tokenizer, prompt_template, int(max_length)
        if prompt_template == CHAT and not getattr(tokenizer, "chat_template", None):
            raise UserError(f"prompt_template 'chat' needs a tokenizer with a chat template; "
                            f"{getattr(tokenizer, 'name_or_path', 'this tokenizer')!r} has none: write the prompt "
                            "as a template with {text}")
        self.pad_token_id = next((i for i in (pad_token_id, tokenizer.pad_token_id, tokenizer.eos_token_id)
                                  if i is not None), 0)
        self.eos_token_id = next((i for i in (eos_token_id, tokenizer.eos_token_id, tokenizer.sep_token_id)
                                  if i is not None), self.pad_token_id)

    def prompt(self, text: str, task: str, domain: str) -> str:
        """The model's input text of a row: the template with its ``{text}``, ``{task}`` and ``{domain}``, or the
        chat template's user turn of ``text``."""
        if self.prompt_template == CHAT:
            return self.tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                                      add_generation_prompt=True)
        return self.prompt_template.format(text=text, task=task, domain=domain)

    def _tokens(self, texts: Sequence[str], special_tokens: bool = False) -> list[list[int]]:
        return self.tokenizer(list(texts), add_special_tokens=special_tokens)["input_ids"]

    def encode_inputs(self, prompts: Sequence[str]) -> tuple[list[list[int]], list[int]]:
        """Classifier inputs (:meth:`input_ids`) and each one's length before the cut."""
        ids = self._tokens(prompts, special_tokens=True)
        lengths = [len(x) for x in ids]
        long = [i for i, n in enumerate(lengths) if n > self.max_length]
        if long:  # the tokenizer cuts them, keeping its special tokens
            cut = self.tokenizer([prompts[i] for i in long], truncation=True, max_length=self.max_length)
            for i, x in zip(long, cut["input_ids"]):
                ids[i] = x
        return ids, lengths

    def input_ids(self, prompts: Sequence[str]) -> list[list[int]]:
        """Classifier inputs: with the special tokens, at most ``max_length`` (cut on the tokenizer's
        ``truncation_side``, saved with it in the bundle)."""
        return self.encode_inputs(prompts)[0]

    def inputs(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """A classifier batch: ``(input_ids, attention_mask)``, right-padded."""
        return pad_inputs(self.input_ids(prompts), self.pad_token_id)

    def prompt_tokens(self, prompts: Sequence[str]) -> list[list[int]]:
        """Generation prompts' tokens, whole (no special tokens): what a server generates from (it refuses what
        exceeds the model's context instead of cutting) and what training cuts to ``max_length``, reporting it."""
        return self._tokens(prompts)

    def encode_prompts(self, prompts: Sequence[str]) -> tuple[list[list[int]], list[int]]:
        """Generation prompts (:meth:`prompt_ids`) and each one's length before the cut."""
        ids = self.prompt_tokens(prompts)
        return [x[-self.max_length:] for x in ids], [len(x) for x in ids]

    def prompt_ids(self, prompts: Sequence[str]) -> list[list[int]]:
        """Generation prompts: no special tokens, the LAST ``max_length`` kept (the end, next to the target)."""
        return self.encode_prompts(prompts)[0]

    def prompts(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """A generation batch: ``(input_ids, attention_mask)`` of the prompts, left-padded."""
        return pad_prompts(self.prompt_ids(prompts), self.pad_token_id)

    def check_length(self, prompts: Sequence[str], special_tokens: bool = False) -> None:
        """Refuse a prompt longer than ``max_length`` tokens (``special_tokens``: count them, as classifier inputs
        do) instead of cutting it: ``UserError`` naming the row and both lengths."""
        for row, ids in enumerate(self._tokens(prompts, special_tokens)):
            if len(ids) > self.max_length:
                raise UserError(f"row {row}: prompt of {len(ids)} tokens exceeds max_length={self.max_length}, the "
                                "longest this model was trained on: shorten it")

    def pair_ids(self, prompts: Sequence[str], targets: Sequence[str], target_max_length: int
                 ) -> tuple[list[list[int]], list[list[int]], list[int], list[int]]:
        """Training pairs: ``(prompt_ids, target_ids, prompt_lengths, target_lengths)`` (lengths before the cut).

        The prompt's tokens are :meth:`prompt_ids`' (what generation starts from). The target's are the tokens that
        follow them when prompt and target are tokenized as one text (joined by a space unless either has
        whitespace there): what the model generates after the prompt, e.g. SmolLM2's ``' Paris'``, not the
        ``'Paris'`` of the target alone. Where the joint tokens do not begin with the prompt's (a token across the
        boundary), the target is tokenized alone. Targets keep their first ``target_max_length`` tokens, then eos.
        """
        prompts, targets = list(prompts), list(targets)
        alone = self.prompt_tokens(prompts)  # cut as encode_prompts cuts them, below
        joint = self._tokens([p + _joiner(p, t) + t for p, t in zip(prompts, targets)])
        target_ids = [j[len(p):] if j[:len(p)] == p else None for p, j in zip(alone, joint)]
        apart = [i for i, y in enumerate(target_ids) if not y]
        for i, y in zip(apart, self._tokens([targets[i] for i in apart]) if apart else []):
            target_ids[i] = y
        eos = self.eos_token_id if isinstance(self.eos_token_id, int) else list(self.eos_token_id)[0]
        return ([x[-self.max_length:] for x in alone], [y[:target_max_length] + [eos] for y in target_ids],
                [len(x) for x in alone], [len(y) for y in target_ids])

    def decode(self, new_ids: Sequence[int]) -> str:
        """A generation's text (:func:`decode_generation` with this eos)."""
        return decode_generation(self.tokenizer, new_ids, self.eos_token_id)


@dataclass
class Collate:
    """Rows -> a batch (see :class:`TextData` for the keys). Picklable, for ``num_workers > 0``."""

    pad_token_id: int
    text: bool

    def __call__(self, rows: list[dict]) -> dict[str, Any]:
        batch: dict[str, Any] = {}
        has_target = "target" in rows[0]
        if self.text:
            prompts = [r["prompt"] for r in rows]
            full = [r["prompt"] + r.get("target", []) for r in rows]
            batch["input_ids"], batch["attention_mask"] = pad_inputs(full, self.pad_token_id)
            if has_target:
                labels = [[-100] * len(r["prompt"]) + r["target"] for r in rows]
                batch["labels"] = pad_inputs(labels, -100)[0]
            batch["prompt_input_ids"], batch["prompt_attention_mask"] = pad_prompts(prompts, self.pad_token_id)
            if has_target:
                batch["target_text"] = [r["target_text"] for r in rows]
        else:
            batch["input_ids"], batch["attention_mask"] = pad_inputs([r["ids"] for r in rows], self.pad_token_id)
            if has_target:
                batch["labels"] = torch.tensor([r["target"] for r in rows], dtype=torch.long)
        for key in ("task_ids", "domain_ids", "row"):
            batch[key] = torch.tensor([r[key] for r in rows], dtype=torch.long)
        return batch


def _warn_cut(split: str, what: str, lengths: Sequence[int], limit: int, option: str, cut: str) -> None:
    """Count the rows longer than ``limit`` tokens in a warning (they are cut, not dropped)."""
    long = [n for n in lengths if n > limit]
    if long:
        warnings.warn(f"{split}: {len(long)} of {len(lengths)} {what} are longer than {option}={limit} tokens (the "
                      f"longest {max(long)}), {cut}: raise data.init_args.{option} to keep them whole", stacklevel=2)


class TextData(L.LightningDataModule):
    """Text classification or generation data from your own JSONL / CSV / Parquet files.

    Batches (dicts of tensors):

    * ``target="label"``: ``input_ids [B, T]``, ``attention_mask [B, T]``, ``task_ids [B]``, ``domain_ids [B]``,
      ``labels [B]`` (index within the row's task's ``label_names[task]``; absent in predict when the predict files
      have no target column) and ``row [B]`` (the row's index within its split, see :meth:`rows`).
    * ``target="text"``: ``input_ids`` = prompt + target + eos (right-padded), ``attention_mask``, ``labels`` =
      ``input_ids`` with -100 on the prompt and the padding, ``prompt_input_ids`` / ``prompt_attention_mask``
      (LEFT-padded prompts, for ``generate``), ``target_text`` (list of str), ``task_ids``, ``domain_ids``, ``row``.
      The target's tokens are those that follow the prompt's when both are tokenized as one text
      (:meth:`TextEncoder.pair_ids`); eos is the tokenizer's eos, else sep, else pad. Predict files without a target
      column give the prompts alone (no ``labels`` / ``target_text``).

    T is each batch's own longest row. Task, domain and label names come from the training rows, sorted
    (numerically when all are integers); after construction (read on first access) and after ``setup``:
    ``task_names``, ``domain_names``, ``label_names``, ``tokenizer``, ``pad_token_id``, ``eos_token_id``,
    ``vocab_size`` and :meth:`vocab`.

    Args:
        train: the training file(s): a path or a glob (``data/train-*.jsonl``); ``.jsonl``/``.ndjson``,
            ``.json`` (an array of records), ``.csv``, ``.tsv``, ``.parquet``.
        val: validation file(s); ``None`` splits ``val_fraction`` of the training rows off instead.
        test: test file(s); ``None`` splits ``test_fraction`` of the training rows off (none when 0).
        predict: file(s) to predict; ``None`` predicts the test split.
        text_column: the column of the input text.
        target_column: the column of the target: a label (``target="label"``) or the target text (``"text"``).
        task_column: the column naming each row's task (``task_ids``); ``None``: one task, ``"default"``.
        domain_column: the column naming each row's domain (``domain_ids``); ``None``: one domain, ``"default"``.
        target: ``"label"`` (classification, one label set per task) or ``"text"`` (causal LM targets).
        tokenizer: ``None`` (the default): the model's backbone's (the CLI fills it in from
            ``model.init_args.backbone``, the text modules at setup: :meth:`use_backbone`; MiniLM's for the random
            presets and until a model says); or a pretrained name (``"minilm"``, ``"smollm2-135m"``), a ``.gguf``
            file or a local model folder with a tokenizer, which must have the backbone's vocabulary.
        max_length: the most tokens of an input (label mode: with the special tokens; text mode: the prompt,
            truncated from the left so its end, next to the target, is kept); longer rows are counted in a warning.
        target_max_length: the most tokens of a target text before the eos (text mode).
        prompt_template: the input built from each row, with fields ``{text}``, ``{task}`` and ``{domain}``; or
            ``"chat"``: the row's text as the user's turn of the tokenizer's chat template (e.g. SmolLM2's).
        batch_size: rows per batch.
        val_fraction: the share of training rows held out for validation when ``val`` is not given (0: no
            validation).
        test_fraction: the share of training rows held out for testing when ``test`` is not given.
        split_seed: the seed of the held-out split (made per task, so each task keeps its share) and of the
            training batch order.
        bucket: group rows of similar length into batches (training: within shuffled pools of 50 batches;
            evaluation: sorted by length). ``False``: shuffled (training) or file-order batches.
        num_workers: ``DataLoader`` worker processes.
    """

    def __init__(
        self,
        train: str,
        val: str | None = None,
        test: str | None = None,
        predict: str | None = None,
        text_column: str = "text",
        target_column: str = "label",
        task_column: str | None = None,
        domain_column: str | None = None,
        target: Literal["label", "text"] = "label",
        tokenizer: str | None = None,
        max_length: int = 128,
        target_max_length: int = 32,
        prompt_template: str = "{text}",
        batch_size: int = 32,
        val_fraction: float = 0.1,
        test_fraction: float = 0.0,
        split_seed: int = 0,
        bucket: bool = True,
        num_workers: int = 0,
    ):
        super().__init__()
        if target not in ("label", "text"):
            raise UserError(f"target must be 'label' or 'text', got {target!r}")
        if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
            raise UserError(f"need 0 <= val_fraction, test_fraction and their sum < 1; got {val_fraction}, {test_fraction}")
        if max_length < 1 or target_max_length < 1 or batch_size < 1:
            raise UserError("max_length, target_max_length and batch_size must be >= 1")
        try:
            prompt_template.format(text="", task="", domain="")
        except (KeyError, IndexError, ValueError) as error:
            raise UserError(f"prompt_template {prompt_template!r}: {error!r}; its fields are {{text}}, {{task}}, "
                             "{domain}") from error
        self.save_hyperparameters()
        self.files = {"train": train, "val": val, "test": test, "predict": predict}
        self.text_column, self.target_column = text_column, target_column
        self.task_column, self.domain_column, self.target = task_column, domain_column, target
        self.tokenizer_name, self.max_length, self.target_max_length = tokenizer, max_length, target_max_length
        self.prompt_template, self.batch_size, self.num_workers = prompt_template, batch_size, num_workers
        self.val_fraction, self.test_fraction, self.split_seed, self.bucket = val_fraction, test_fraction, split_seed, bucket
        self._frames: dict[str, pd.DataFrame] | None = None
        self.backbone: str | None = None  # the model's, once known (use_backbone)
        self._tokenizer = self._encoder = None
        self.datasets: dict[str, _Rows] = {}  # encoded on first use

    # ---- reading and the name -> id maps
    def _read_split(self, split: str) -> pd.DataFrame:
        """A split's rows with standard columns: text, target (if any), task, domain, file, file_row."""
        spec, parts = self.files[split], []
        tables = [(path, read_table(path)) for path in expand(spec, split)]
        with_target = any(self.target_column in t.columns for _, t in tables)
        needed = {self.text_column: "text_column", self.task_column: "task_column",
                  self.domain_column: "domain_column"}
        if split != "predict" or with_target:
            needed[self.target_column] = "target_column"
        for path, table in tables:
            if table.empty:
                continue
            for column, option in needed.items():
                if column is not None and column not in table.columns:
                    raise UserError(f"{path}: no column {column!r} ({option}); its columns are {list(table.columns)}")
            part = pd.DataFrame({"text": table[self.text_column], "file": str(path), "file_row": np.arange(len(table))})
            if self.target_column in needed:
                part["target"] = table[self.target_column]
            part["task"] = table[self.task_column] if self.task_column else DEFAULT
            part["domain"] = table[self.domain_column] if self.domain_column else DEFAULT
            parts.append(part)
        frame = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()
        if frame.empty:
            raise UserError(f"{split}: empty split: no rows in {spec!r}")
        for column in ("text", "target", "task", "domain"):
            if column not in frame.columns:
                continue
            values = frame[column].tolist()
            for i, value in enumerate(values):
                if _missing(value) or _empty(value):  # a CSV/TSV empty cell reads as ""
                    option = {"text": self.text_column, "target": self.target_column, "task": self.task_column,
                              "domain": self.domain_column}[column]
                    what = "missing" if _missing(value) else "empty"
                    raise UserError(f"{frame['file'][i]} row {frame['file_row'][i]}: {what} value in column {option!r}")
            frame[column] = [str(v) for v in values]
        return frame

    def _hold_out(self, frame: pd.DataFrame) -> dict[str, pd.DataFrame]:
        """Split val/test rows off the training rows: a seeded shuffle per task, file order kept within splits."""
        fractions = {"val": self.val_fraction if self.files["val"] is None else 0.0,
                     "test": self.test_fraction if self.files["test"] is None else 0.0}
        rng = np.random.default_rng(self.split_seed)
        chosen: dict[str, list[int]] = {"train": [], "val": [], "test": []}
        for task in natural_sorted(frame["task"]):
            rows = rng.permutation(np.flatnonzero((frame["task"] == task).to_numpy()))
            n_val, n_test = (int(round(fractions[s] * len(rows))) for s in ("val", "test"))
            chosen["val"] += rows[:n_val].tolist()
            chosen["test"] += rows[n_val:n_val + n_test].tolist()
            chosen["train"] += rows[n_val + n_test:].tolist()
        out = {"train": frame.iloc[sorted(chosen["train"])].reset_index(drop=True)}
        for split, fraction in fractions.items():
            if fraction > 0:
                if not chosen[split]:
                    raise UserError(f"{split}: empty split: {split}_fraction={fraction} of {len(frame)} training "
                                     f"rows is no row; give a {split} file or a larger fraction")
                out[split] = frame.iloc[sorted(chosen[split])].reset_index(drop=True)
        if out["train"].empty:
            raise UserError("train: empty split: no training rows left after holding out val/test")
        return out

    def _check_known(self, frame: pd.DataFrame) -> None:
        """Evaluation rows may only use tasks, domains and labels that the training rows have."""
        names = self._names
        tasks, domains = set(names["tasks"]), set(names["domains"])
        for row in frame.itertuples(index=False):
            where = f"{row.file} row {row.file_row}"
            if row.task not in tasks:
                raise UserError(f"{where}: task {row.task!r} (column {self.task_column!r}) does not appear in the "
                                 f"training data, whose tasks are {names['tasks']}")
            if row.domain not in domains:
                raise UserError(f"{where}: domain {row.domain!r} (column {self.domain_column!r}) does not appear in "
                                 f"the training data, whose domains are {names['domains']}")
            if self.target == "label" and "target" in frame.columns and row.target not in self._label_sets[row.task]:
                raise UserError(f"{where}: label {row.target!r} (column {self.target_column!r}) of task "
                                 f"{row.task!r} is not in the training set's labels {names['labels'][row.task]}")

    def prepare(self) -> None:
        """Read the files, split, and build the name -> id maps (once; the attributes call it on first access)."""
        if self._frames is not None:
            return
        frames = self._hold_out(self._read_split("train"))
        for split in ("val", "test", "predict"):
            if self.files[split] is not None:
                frames[split] = self._read_split(split)
        train = frames["train"]
        tasks = natural_sorted(train["task"])
        labels = ({t: natural_sorted(train.loc[train["task"] == t, "target"]) for t in tasks}
                  if self.target == "label" else {})
        self._names = {"tasks": tasks, "domains": natural_sorted(train["domain"]), "labels": labels}
        self._label_sets = {t: set(names) for t, names in labels.items()}
        for split in ("val", "test", "predict"):
            if split in frames:
                self._check_known(frames[split])
        self._frames = frames

    @property
    def task_names(self) -> list[str]:
        self.prepare()
        return self._names["tasks"]

    @property
    def domain_names(self) -> list[str]:
        self.prepare()
        return self._names["domains"]

    @property
    def label_names(self) -> dict[str, list[str]]:
        self.prepare()
        return self._names["labels"]

    def vocab(self) -> dict[str, Any]:
        """The name maps as JSON-able lists (an id is a position): ``{"tasks", "domains", "labels"}``."""
        return {"tasks": list(self.task_names), "domains": list(self.domain_names),
                "labels": {t: list(v) for t, v in self.label_names.items()}}

    def rows(self, split: str) -> pd.DataFrame:
        """The split's rows in ``row`` order: ``text``, ``target``, ``task``, ``domain``, source ``file`` and
        ``file_row``; join predictions back on ``row`` (the position in this frame)."""
        self.prepare()
        if split == "predict" and "predict" not in self._frames:
            split = "test"
        if split not in self._frames:
            option = {"val": "val or val_fraction", "test": "test or test_fraction"}.get(split, split)
            raise UserError(f"no {split} split: set data.init_args.{option}")
        return self._frames[split]

    # ---- tokenizer
    def _tokenizer_source(self) -> str:
        return self.tokenizer_name or (tokenizer_source(self.backbone) if self.backbone else "minilm")

    def use_backbone(self, backbone: str) -> None:
        """The model's backbone (the text modules call this at setup): without a named tokenizer the data takes
        the backbone's (encoding again if it had used another); a named one must have the backbone's vocabulary
        (:func:`check_tokenizer`)."""
        if self.tokenizer_name is not None:
            check_tokenizer(self.tokenizer_name, backbone, self._tokenizer)
        elif tokenizer_source(backbone) != self._tokenizer_source():
            self._tokenizer = self._encoder = None
            self.datasets = {}
        self.backbone = backbone

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self._tokenizer_source())
        return self._tokenizer

    @property
    def encoder(self) -> TextEncoder:
        """The pre-processing of a row (the text services run the same, from the bundle)."""
        if self._encoder is None:
            self._encoder = TextEncoder(self.tokenizer, self.prompt_template, self.max_length)
        return self._encoder

    @property
    def pad_token_id(self) -> int:
        return self.encoder.pad_token_id

    @property
    def eos_token_id(self) -> int:
        return self.encoder.eos_token_id

    @property
    def vocab_size(self) -> int:
        return len(self.tokenizer)

    # ---- tokenized splits and loaders
    def _encode(self, frame: pd.DataFrame, split: str) -> list[dict]:
        encoder = self.encoder
        prompts = [encoder.prompt(x, t, d) for x, t, d in zip(frame["text"], frame["task"], frame["domain"])]
        tasks = {name: i for i, name in enumerate(self.task_names)}
        domains = {name: i for i, name in enumerate(self.domain_names)}
        rows = [{"task_ids": tasks[t], "domain_ids": domains[d], "row": i}
                for i, (t, d) in enumerate(zip(frame["task"], frame["domain"]))]
        has_target = "target" in frame.columns
        if self.target == "label":
            ids, lengths = encoder.encode_inputs(prompts)
            _warn_cut(split, "inputs", lengths, self.max_length, "max_length", "cut")
            for r, x in zip(rows, ids):
                r["ids"] = x
            if has_target:
                label_ids = {t: {y: i for i, y in enumerate(ys)} for t, ys in self.label_names.items()}
                for r, t, y in zip(rows, frame["task"], frame["target"]):
                    r["target"] = label_ids[t][y]
        elif has_target:
            ids, targets, lengths, target_lengths = encoder.pair_ids(prompts, frame["target"].tolist(),
                                                                     self.target_max_length)
            _warn_cut(split, "prompts", lengths, self.max_length, "max_length", "their first tokens cut")
            _warn_cut(split, "targets", target_lengths, self.target_max_length, "target_max_length",
                      "their last tokens cut")
            for r, x, y, text in zip(rows, ids, targets, frame["target"]):
                r["prompt"], r["target"], r["target_text"] = x, y, text
        else:
            ids, lengths = encoder.encode_prompts(prompts)
            _warn_cut(split, "prompts", lengths, self.max_length, "max_length", "their first tokens cut")
            for r, x in zip(rows, ids):
                r["prompt"] = x
        return rows

    def setup(self, stage: str | None = None) -> None:
        """Read the files (:meth:`prepare`); each split is tokenized when its loader is first asked for, with the
        tokenizer of the model's backbone by then (:meth:`use_backbone`)."""
        self.prepare()
        if self.tokenizer_name is not None or self.backbone is not None:
            self.encoder  # a bad tokenizer or template fails here

    def _dataset(self, split: str) -> _Rows:
        if split not in self.datasets:
            self.datasets[split] = _Rows(self._encode(self._frames[split], split))
        return self.datasets[split]

    def _loader(self, split: str, train: bool = False) -> DataLoader:
        self.rows(split)  # the clear error when the split does not exist
        if split == "predict" and "predict" not in self._frames:
            split = "test"
        self.setup()
        data = self._dataset(split)
        lengths = [len(r["ids"]) if "ids" in r else len(r["prompt"]) + len(r.get("target", [])) for r in data.rows]
        sampler = EpochShuffle(data, self.split_seed) if train else SequentialSampler(data)
        batches = LengthBatchSampler(sampler, self.batch_size, False, lengths, self.bucket, train, self.split_seed)
        return DataLoader(data, batch_sampler=batches, num_workers=self.num_workers,
                          collate_fn=Collate(self.pad_token_id, self.target == "text"))

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", train=True)

    def val_dataloader(self):
        self.prepare()
        return self._loader("val") if "val" in self._frames else []

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")

    def predict_dataloader(self) -> DataLoader:
        return self._loader("predict")
