"""The MLflow store runs go to: :func:`resolve_tracking_uri` (the lowest piece of tracking; the registry, the
serving side and the logger all resolve their store here)."""

from __future__ import annotations

import os
from pathlib import Path


def resolve_tracking_uri(explicit: str | None = None) -> str:
    """The store runs go to: ``explicit``, else ``$MLFLOW_TRACKING_URI``, else the embedded sqlite store of the
    working directory, by absolute path (MLflow caches stores by URI: a relative one would keep the first
    directory's database in a process that changes directory)."""
    return explicit or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlflow.db'}"

