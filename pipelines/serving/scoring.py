"""Scoring a frame of rows with a loaded model, the one path of ``moa batch`` (local and on Ray) and the
server's row numbers: :func:`conform` types file rows as the model's input schema wants, :func:`score_rows` scores
them in batches (a refused row named by its row number in the whole frame: :func:`shift_rows`).

One rule for columns, for every kind and every way in (REST, ``moa batch``, the pyfunc model): a column the model
does not read is ignored and named once (:func:`moa.pipelines.bundle.unread_columns`): the server answers
``"ignored_columns"``, ``moa batch`` writes a line to stderr, the pyfunc model logs a warning. A model does not
read a column its signature does not name, nor ``task`` / ``domain`` when it was trained without tasks / domains
(it knows the one name ``default`` only), so a test file with a ``label`` or ``domain`` column scores as it is."""

from __future__ import annotations

import json
import re
import sys
from typing import Any

import pandas as pd

from moa.experts.errors import UserError
from moa.pipelines.bundle import unread_columns


def shift_rows(message: str, offset: int) -> str:
    """A service's ``row i: ...`` message for a chunk starting at ``offset``, in the request's row numbers."""
    return re.sub(r"^row (\d+)", lambda m: f"row {int(m.group(1)) + offset}", message) if offset else message


def unread_by(model, columns) -> list[str]:
    """:func:`unread_columns` of a loaded ``mlflow.pyfunc`` model (or an MLflow ``ModelInfo``: its signature and
    metadata); none for a model without them."""
    info = getattr(model, "metadata", None)
    if not hasattr(info, "signature"):  # a loaded pyfunc: its MLmodel; a ModelInfo has them itself
        info = model
    return unread_columns(columns, getattr(info, "signature", None), getattr(info, "metadata", None))


def conform(frame: pd.DataFrame, model) -> pd.DataFrame:
    """Rows read from a file, typed as the model's input schema wants: numbers from text cells (CSV), lists from
    JSON text (``"[1, 2]"``) or space-separated ids; empty cells are missing."""
    schema = model.metadata.get_input_schema()
    if schema is None:
        return frame
    frame = frame.copy()
    for spec in schema.inputs:
        if spec.name not in frame.columns:
            continue
        column = frame[spec.name]
        kind = str(getattr(spec.type, "name", spec.type))
        text = column.dtype == object or pd.api.types.is_string_dtype(column)  # pandas 3 reads CSV text as str
        if kind in ("double", "float", "long", "integer") and text:
            frame[spec.name] = pd.to_numeric(column.replace("", None), errors="coerce")
            if kind in ("long", "integer") and frame[spec.name].notna().all():
                frame[spec.name] = frame[spec.name].astype("int64")
        elif spec.type.__class__.__name__ == "Array":
            frame[spec.name] = column.map(_as_sequence)
        if kind in ("double", "float") and pd.api.types.is_integer_dtype(frame[spec.name]):
            frame[spec.name] = frame[spec.name].astype("float64")  # whole numbers: MLflow refuses int64 as double
    return frame


def _as_sequence(value: Any):
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            return json.loads(text)
        return [int(v) if v.lstrip("-").isdigit() else v for v in text.split()]
    return value.tolist() if hasattr(value, "tolist") else value


def score_rows(model, frame: pd.DataFrame, params: dict | None = None, *, batch_size: int = 256,
               progress: bool = True) -> pd.DataFrame:
    """The model's answers for every row, ``batch_size`` rows per call, with a progress bar on stderr; the
    input columns are kept (an answer column whose name an input column has is written ``predicted_<name>``).
    The columns the model does not read are not passed to it (:func:`unread_by`); the answer's
    ``attrs["ignored_columns"]`` names them."""
    from mlflow.exceptions import MlflowException
    from tqdm.auto import tqdm

    ignored = unread_by(model, frame.columns)
    read = frame.drop(columns=ignored)
    outputs = []
    with tqdm(total=len(frame), unit="row", desc="scoring", disable=not progress, file=sys.stderr,
              mininterval=1.0) as bar:
        for lo in range(0, len(frame), batch_size):
            part = read.iloc[lo:lo + batch_size].reset_index(drop=True)
            try:
                outputs.append(pd.DataFrame(model.predict(part, params=params or None)))
            except MlflowException as error:
                raise UserError(shift_rows(error.message, lo)) from None
            bar.update(len(part))
    answers = pd.concat(outputs, ignore_index=True)
    answers.columns = [f"predicted_{c}" if c in frame.columns else c for c in answers.columns]
    result = pd.concat([frame.reset_index(drop=True), answers], axis=1)
    result.attrs["ignored_columns"] = ignored
    return result

