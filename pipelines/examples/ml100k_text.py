"""Four small text-classification tasks derived from MovieLens-100K, as JSON lines for :class:`TextData`.

    python -m moa.pipelines.examples.ml100k_text outputs/ml100k-text          # train.jsonl, val.jsonl, test.jsonl

Tasks (columns ``text, label, task, target_text``; ``target_text`` is the label in words, for causal LMs):

* ``genre``: a movie title -> its genre group (children, comedy, action, drama: :data:`ML100K_DOMAINS`).
* ``decade``: a movie title (without its year) -> before 1970, 1970s or 1980s, 1990s.
* ``age``: the titles a user rated first (in time order, joined by "; ") -> under 25, 25-34, 35-49, 50 and over.
* ``occupation``: the same titles -> student, educator, technical, arts, business, other.

Movies (and users) are split once into train / val / test (seeded), so the two movie tasks (and the two user
tasks) share no text across splits; each label keeps at most ``max_per_label`` rows (split proportionally), so the
1990s do not drown the other decades. The data comes from the installed recbole wheel (see
:func:`moa.recsys.data.ml100k`); its licence forbids redistributing it, so the output stays local.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from moa.recsys.data import ml100k, read_atomic

SPLITS = ("train", "val", "test")
AGE_GROUPS = [(24, "under_25", "under 25"), (34, "25_34", "25 to 34"), (49, "35_49", "35 to 49"),
              (200, "50_plus", "50 and over")]
DECADES = [(1969, "before_1970", "before 1970"), (1989, "1970s_1980s", "1970s or 1980s"), (9999, "1990s", "1990s")]
OCCUPATIONS = {
    "student": ("student",),
    "educator": ("educator", "librarian"),
    "technical": ("engineer", "programmer", "technician", "scientist"),
    "arts": ("artist", "writer", "entertainment"),
    "business": ("administrator", "executive", "marketing", "salesman", "lawyer"),
    "other": ("other", "none", "homemaker", "retired", "healthcare", "doctor"),
}
GENRE_WORDS = {"children": "children's film", "comedy": "comedy", "action": "action or thriller", "drama": "drama"}


def _bucket(value: int, groups) -> tuple[str, str]:
    return next((label, words) for upper, label, words in groups if value <= upper)


def _release_years() -> dict[str, int]:
    """item_id -> release year, from the same ml-100k.item file :func:`ml100k` reads (recbole is not imported)."""
    spec = importlib.util.find_spec("recbole")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("MovieLens-100K not found: install the recbole wheel (`pip install --no-deps recbole`)")
    items = read_atomic(Path(spec.submodule_search_locations[0]) / "dataset_example" / "ml-100k" / "ml-100k.item")
    return {i: int(y) for i, y in zip(items["item_id"], items["release_year"]) if str(y).isdigit()}


def _assign(keys: Sequence[str], fractions: Sequence[float], rng: np.random.Generator) -> dict[str, str]:
    """Each key -> a split, by a seeded permutation cut at the fractions."""
    order = [keys[i] for i in rng.permutation(len(keys))]
    cuts = np.cumsum([0, *fractions])
    cuts = (cuts / cuts[-1] * len(order)).round().astype(int)
    return {k: split for split, a, b in zip(SPLITS, cuts[:-1], cuts[1:]) for k in order[a:b]}


def _cap(frame: pd.DataFrame, max_per_label: int, fractions: Sequence[float], rng: np.random.Generator) -> pd.DataFrame:
    """At most ``max_per_label * fraction`` rows of each label in each split (a seeded sample)."""
    share = dict(zip(SPLITS, np.asarray(fractions) / sum(fractions)))
    keep = []
    for (split, _), group in frame.groupby(["split", "label"], sort=True):
        n = min(len(group), int(round(max_per_label * share[split])))
        keep.extend(group.index[np.sort(rng.permutation(len(group))[:n])])
    return frame.loc[sorted(keep)]


def build_tasks(seed: int = 0, n_titles: int = 8, max_per_label: int = 250,
                fractions: Sequence[float] = (0.7, 0.15, 0.15)) -> dict[str, pd.DataFrame]:
    """The four tasks as ``{"train" | "val" | "test": DataFrame[text, label, task, target_text]}``; the same
    frames for the same arguments."""
    data = ml100k()
    rng = np.random.default_rng(seed)
    years = _release_years()
    movies = data.items.assign(year=data.items["item_id"].map(years)).dropna(subset=["year"])
    movies = movies[movies["title"].str.strip() != ""].drop_duplicates("title")  # 23 titles repeat
    movie_split = _assign(movies["item_id"].tolist(), fractions, rng)
    rows = []
    for item_id, title, domain, year in zip(movies["item_id"], movies["title"], movies["domain"], movies["year"]):
        split = movie_split[item_id]
        rows.append(("genre", split, title, domain, GENRE_WORDS[domain]))
        rows.append(("decade", split, title, *_bucket(int(year), DECADES)))

    titles = data.items["title"]
    history = data.interactions.groupby("user_id", sort=False)["item"].apply(lambda s: s.iloc[:n_titles].tolist())
    group_of = {job: group for group, jobs in OCCUPATIONS.items() for job in jobs}
    users = data.users.loc[history.index]
    user_split = _assign(history.index.tolist(), fractions, rng)
    for user_id, items in history.items():
        text = "; ".join(titles.loc[i] for i in items)
        split, user = user_split[user_id], users.loc[user_id]
        rows.append(("age", split, text, *_bucket(int(user["age"]), AGE_GROUPS)))
        group = group_of.get(user["occupation"], "other")
        rows.append(("occupation", split, text, group, group))

    frame = pd.DataFrame(rows, columns=["task", "split", "text", "label", "target_text"])
    frame = pd.concat([_cap(g, max_per_label, fractions, rng) for _, g in frame.groupby("task", sort=True)])
    return {s: frame[frame["split"] == s][["text", "label", "task", "target_text"]].reset_index(drop=True)
            for s in SPLITS}


def write_tasks(out: str | Path, **options) -> dict[str, pd.DataFrame]:
    """:func:`build_tasks` written to ``out/{train,val,test}.jsonl``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    frames = build_tasks(**options)
    for split, frame in frames.items():
        frame.to_json(out / f"{split}.jsonl", orient="records", lines=True, force_ascii=False)
    return frames


def counts(frames: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """Rows per task and label (index) and split (columns)."""
    table = pd.concat({s: f.groupby(["task", "label"]).size() for s, f in frames.items()}, axis=1)
    return table.fillna(0).astype(int)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", help="output folder (train.jsonl, val.jsonl, test.jsonl)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n-titles", type=int, default=8, help="titles per user text (the first rated)")
    parser.add_argument("--max-per-label", type=int, default=250, help="rows per label, all splits together")
    args = parser.parse_args(argv)
    frames = write_tasks(args.out, seed=args.seed, n_titles=args.n_titles, max_per_label=args.max_per_label)
    table = counts(frames)
    print(table.to_string())
    print("total", {s: len(f) for s, f in frames.items()}, "->", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
