"""The recommendation service behind the MLflow model: a bundle of files in, validated top-k requests out.

A *bundle* is a folder of plain files (no pickle):

* ``recommenders/<key>/``: each trained recommender as :meth:`TextSeqRecommender.save` writes it
  (``recommender.json`` + ``recommender.safetensors``: MoA adapter weights, user encoders, catalogue token ids).
  A bundle may hold several: e.g. the domain-expert model for the source domains and an X-Cross model for the
  target domain; ``service.json`` routes each domain to one of them;
* ``items.parquet``: the item table, one row per item: ``item_id`` (the source's id), ``domain``, ``index`` (the
  item's index in its domain's catalogue, 1-based), ``title``;
* ``item_tables.safetensors``: the cached item representations, one ``[n_items + 1, d]`` tensor per domain, so
  serving never runs the item encoder;
* ``service.json``: domains and their recommender, limits (``max_history``, ``max_k``), the item-id type and the
  validation metrics;
* ``config.yaml`` (optional): the training config;
* ``moa_manifest.json``: the sha256 and size of every file, checked at load (a corrupted file is named).

:class:`RecommendationService` answers rows ``(history of item ids, domain)`` with the ``k`` best unseen items of
that domain and their scores. Rows of different domains in one call are grouped by domain, and each group goes
through its domain's item table (encoded by the domain's expert) and user encoder. Bad input raises
:class:`RequestError` (a ``ValueError``) whose message names the row and the problem.
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from safetensors.torch import save_file

from moa.atomic import MANIFEST, atomic_folder, read_json, read_safetensors, readable, verify
from moa.experts.errors import UserError
from moa.recsys.data import RecDataset, left_pad

from moa.pipelines.bundle import RequestError

SERVICE_FILE, ITEMS_FILE, TABLES_FILE, RECOMMENDERS_DIR, CONFIG_FILE = (
    "service.json", "items.parquet", "item_tables.safetensors", "recommenders", "config.yaml")
MAX_HISTORY, MAX_K = 200, 100


def item_table(dataset: RecDataset, domains: Sequence[str]) -> pd.DataFrame:
    """``item_id, domain, index, title`` for the items of ``domains``, ``index`` as in ``dataset.domain(d)``."""
    frames = []
    for domain in domains:
        items = dataset.domain(domain).items
        frames.append(pd.DataFrame({"item_id": items["item_id"].astype(str).to_numpy(), "domain": domain,
                                    "index": items.index.to_numpy(dtype=np.int64), "title": items["title"].to_numpy()}))
    return pd.concat(frames, ignore_index=True)


def write_bundle(directory: str | Path, recommenders: Mapping[str, Any], items: pd.DataFrame, *,
                 metrics: Mapping[str, float] | None = None, config_yaml: str | Path | None = None,
                 max_history: int = MAX_HISTORY, max_k: int = MAX_K) -> Path:
    """Write the serving bundle of trained recommenders (``{key: recommender}``; a domain served by several goes
    to the last one) and return the folder (see the module docstring). The folder is replaced as a whole
    (:func:`moa.atomic.atomic_folder`, with ``moa_manifest.json``): a kill at any moment leaves the old bundle or
    the new one."""
    target = Path(directory)
    with atomic_folder(target) as directory:  # the whole bundle is swapped in at the end, or nothing
        _write_bundle(directory, recommenders, items, metrics, config_yaml, max_history, max_k)
    return target


def _write_bundle(directory: Path, recommenders, items, metrics, config_yaml, max_history, max_k) -> None:
    routes: dict[str, str] = {}
    for key, recommender in recommenders.items():
        if not key or "/" in key or key.startswith("."):
            raise UserError(f"recommender keys must be plain folder names, got {key!r}")
        recommender.save(directory / RECOMMENDERS_DIR / key)
        routes.update(dict.fromkeys(recommender.domains, key))
    missing = sorted(set(routes) - set(items["domain"]))
    if missing:
        raise UserError(f"the item table has no items of the served domains {missing}")
    items = items[items["domain"].isin(list(routes))].reset_index(drop=True)
    tables = {}
    for domain, key in routes.items():
        recommender = recommenders[key].eval()
        n = recommender.item_encoder.n_items(domain)
        have = np.sort(items.loc[items["domain"] == domain, "index"].to_numpy())
        if len(have) != n or not np.array_equal(have, np.arange(1, n + 1)):
            raise UserError(f"the item table must list items 1..{n} of domain {domain!r} once each")
        tables[domain] = recommender.item_table(domain).detach().cpu().contiguous()
    items.to_parquet(directory / ITEMS_FILE, index=False)
    save_file(tables, str(directory / TABLES_FILE))
    id_type = "long" if items["item_id"].astype(str).str.fullmatch(r"-?\d+").all() else "string"
    meta = {"kind": "recommender", "domains": list(routes), "routes": routes, "item_id_type": id_type, "max_history": max_history,
            "max_k": max_k, "metrics": {k: float(v) for k, v in (metrics or {}).items()}}
    (directory / SERVICE_FILE).write_text(json.dumps(meta, indent=2))
    if config_yaml is not None:
        shutil.copyfile(config_yaml, directory / CONFIG_FILE)


def bundle_artifacts(directory: str | Path) -> dict[str, str]:
    """The bundle's parts as MLflow pyfunc ``artifacts`` (name -> local path)."""
    directory = readable(directory)
    parts = {"recommenders": RECOMMENDERS_DIR, "items": ITEMS_FILE, "item_tables": TABLES_FILE,
             "service": SERVICE_FILE, "config": CONFIG_FILE, "manifest": MANIFEST}
    return {name: str(directory / rel) for name, rel in parts.items() if (directory / rel).exists()}


@dataclass
class Recommendations:
    items: list[list]
    scores: list[list[float]]

    def frame(self) -> pd.DataFrame:
        return pd.DataFrame({"items": self.items, "scores": self.scores})


class RecommendationService:
    """Validated, per-row-domain top-k recommendation from a bundle's files."""

    def __init__(self, recommenders: Mapping[str, Any], items: pd.DataFrame, meta: Mapping[str, Any],
                 tables: Mapping[str, torch.Tensor] | None = None):
        self.meta = dict(meta)
        self.domains = list(self.meta["domains"])
        self.models = {domain: recommenders[key].eval() for domain, key in self.meta["routes"].items()}
        self.max_history, self.max_k = int(self.meta["max_history"]), int(self.meta["max_k"])
        self.integer_ids = self.meta.get("item_id_type") == "long"
        self.index_of: dict[str, dict[str, int]] = {}
        self.id_of: dict[str, np.ndarray] = {}
        self.domain_of: dict[str, str] = {}
        for domain, group in items.groupby("domain", sort=False):
            ids = group["item_id"].astype(str).to_numpy()
            index = group["index"].to_numpy(dtype=np.int64)
            self.index_of[domain] = dict(zip(ids, index.tolist()))
            lookup = np.empty(index.max() + 1, dtype=object)
            lookup[index] = [int(i) for i in ids] if self.integer_ids else list(ids)
            self.id_of[domain] = lookup
            self.domain_of.update(dict.fromkeys(ids, domain))
        for domain, table in (tables or {}).items():
            self.models[domain].use_item_table(domain, table)

    @classmethod
    def from_files(cls, recommenders: str | Path, items: str | Path, service: str | Path,
                   item_tables: str | Path | None = None, manifest: str | Path | None = None) -> "RecommendationService":
        """Load the bundle's parts (``recommenders`` is the folder of recommender folders); with ``manifest`` (the
        bundle's ``moa_manifest.json``, beside the parts) every file is first checked against its sha256."""
        from moa.recsys.loading import load_recommender

        if manifest is not None:
            verify(Path(manifest).parent)
        meta = read_json(service)
        models = {key: load_recommender(Path(recommenders) / key) for key in sorted(set(meta["routes"].values()))}
        tables = read_safetensors(item_tables) if item_tables is not None else None
        try:
            frame = pd.read_parquet(items)
        except Exception as error:  # noqa: BLE001 - re-raised with the file's name
            raise UserError(f"cannot read the item table {items}: {error}") from error
        return cls(models, frame, meta, tables)

    @classmethod
    def from_bundle(cls, directory: str | Path) -> "RecommendationService":
        parts = bundle_artifacts(directory)
        return cls.from_files(parts["recommenders"], parts["items"], parts["service"], parts.get("item_tables"),
                              parts.get("manifest"))

    def n_items(self, domain: str) -> int:
        return len(self.index_of[domain])

    # -- validation
    def _check_k(self, k: Any) -> int:
        if not _is_int(k):
            raise RequestError(f"k must be an integer, got {k!r}")
        k = int(k)
        if not 1 <= k <= self.max_k:
            raise RequestError(f"k must be between 1 and {self.max_k}, got {k}")
        return k

    def _check_row(self, row: int, history: Any, domain: Any, k: int) -> list[int]:
        if not isinstance(domain, str) or domain not in self.index_of:
            raise RequestError(f"row {row}: unknown domain {domain!r}; this model serves {self.domains}")
        if history is None or isinstance(history, (str, bytes)) or not hasattr(history, "__len__"):
            raise RequestError(f"row {row}: history must be a list of item ids, got {type(history).__name__}")
        history = list(history)
        if not history:
            raise RequestError(f"row {row}: empty history; send at least one item id of domain {domain!r}")
        if len(history) > self.max_history:
            raise RequestError(f"row {row}: history of {len(history)} items is longer than the limit of "
                               f"{self.max_history}; send the most recent {self.max_history}")
        lookup = self.index_of[domain]
        keys = [str(int(i)) if self.integer_ids and _is_int(i) else str(i) for i in history]
        unknown = [h for h, key in zip(history, keys) if key not in lookup]
        if unknown:
            elsewhere = {str(h): self.domain_of[str(h)] for h in unknown if str(h) in self.domain_of}
            where = f" (items of other domains: {elsewhere})" if elsewhere else ""
            raise RequestError(f"row {row}: unknown item ids {unknown[:10]} for domain {domain!r}{where}")
        if k > self.n_items(domain) - len(set(keys)):
            raise RequestError(f"row {row}: k={k} is more than the {self.n_items(domain) - len(set(keys))} unseen "
                               f"items of domain {domain!r}")
        return [lookup[key] for key in keys]

    # -- serving
    @torch.no_grad()
    def recommend(self, histories: Sequence[Sequence], domains: Sequence[str], k: int = 10) -> Recommendations:
        """Top-``k`` unseen items (source ids) and scores for each row; rows are grouped by domain."""
        if len(histories) != len(domains):
            raise RequestError(f"got {len(histories)} histories but {len(domains)} domains")
        k = self._check_k(k)
        rows = [self._check_row(i, h, d, k) for i, (h, d) in enumerate(zip(histories, domains))]
        items: list[list] = [[] for _ in rows]
        scores: list[list[float]] = [[] for _ in rows]
        by_domain: dict[str, list[int]] = {}
        for i, domain in enumerate(domains):
            by_domain.setdefault(domain, []).append(i)
        for domain, members in by_domain.items():
            model = self.models[domain]  # kept in eval mode: score() directly, no train/eval toggling per call
            padded = left_pad([rows[i] for i in members], model.config.max_len)
            scores_all = model.score(padded, domain)
            for j, row in enumerate(members):  # every seen item, also those older than the model's window
                scores_all[j, torch.as_tensor(rows[row])] = -math.inf
            values, top = scores_all.topk(k, dim=1)
            for row, ids, vals in zip(members, top.tolist(), values.tolist()):
                keep = [(i, v) for i, v in zip(ids, vals) if math.isfinite(v)]
                items[row] = [self.id_of[domain][i] for i, _ in keep]
                scores[row] = [float(v) for _, v in keep]
        return Recommendations(items, scores)

    def predict_frame(self, frame: pd.DataFrame, k: Any = 10) -> pd.DataFrame:
        """``frame`` with columns ``history`` and ``domain`` -> columns ``items`` and ``scores``."""
        missing = [c for c in ("history", "domain") if c not in frame.columns]
        if missing:
            raise RequestError(f"missing input columns {missing}; send 'history' (item ids) and 'domain'")
        if len(frame) == 0:
            raise RequestError("no rows in the request")
        histories = [_as_list(h) for h in frame["history"]]
        return self.recommend(histories, list(frame["domain"]), k).frame()

    def predict(self, frame: pd.DataFrame, params: Mapping[str, Any] | None = None) -> pd.DataFrame:
        """The served call (every kind's service has it): ``params`` may hold ``k``."""
        params = dict(params or {})
        unknown = sorted(set(params) - {"k"})
        if unknown:
            raise RequestError(f"unknown params {unknown}; this model takes k")
        return self.predict_frame(frame, params.get("k", 10))



def signature(meta: Mapping[str, Any]):
    """Inputs ``history`` (array of item ids), ``domain``; outputs ``items``, ``scores``; param ``k`` (default 10)."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema
    from mlflow.types.schema import Array

    item_id_type = meta["item_id_type"]
    return ModelSignature(
        inputs=Schema([ColSpec(Array(item_id_type), "history"), ColSpec("string", "domain")]),
        outputs=Schema([ColSpec(Array(item_id_type), "items"), ColSpec(Array("double"), "scores")]),
        params=ParamSchema([ParamSpec("k", "long", 10)]),
    )


def input_example(bundle: str | Path, rows_per_domain: int = 1) -> pd.DataFrame:
    """One short history per domain from the bundle's item table."""
    bundle = Path(bundle)
    items = pd.read_parquet(bundle / ITEMS_FILE)
    meta = json.loads((bundle / SERVICE_FILE).read_text())
    cast = int if meta["item_id_type"] == "long" else str
    histories, domains = [], []
    for domain in meta["domains"]:
        ids = items.loc[items["domain"] == domain, "item_id"].head(3 * rows_per_domain).tolist()
        for r in range(rows_per_domain):
            histories.append([cast(i) for i in ids[3 * r:3 * r + 3]])
            domains.append(domain)
    return pd.DataFrame({"history": histories, "domain": domains})


def _is_int(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    return isinstance(value, (int, np.integer)) or (isinstance(value, (float, np.floating)) and float(value).is_integer())


def _as_list(value: Any):
    if isinstance(value, np.ndarray):
        return value.tolist()
    return value
