"""The HTTP client of moa's scoring server: :func:`post` a request, :func:`request_body` of recommender rows."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any, Sequence


def post(url: str, body: bytes | str | dict, timeout: float = 60.0,
         content_type: str = "application/json") -> tuple[int, Any]:
    """POST to ``url``; returns ``(status, parsed JSON or text)``, for error statuses too."""
    if isinstance(body, dict):
        body = json.dumps(body)
    if isinstance(body, str):
        body = body.encode()
    request = urllib.request.Request(url, data=body, headers={"Content-Type": content_type}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            status, raw = response.status, response.read()
    except urllib.error.HTTPError as err:
        status, raw = err.code, err.read()
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw.decode(errors="replace")


def request_body(histories: Sequence[Sequence], domains: Sequence[str], k: int | None = None) -> dict:
    """The ``/invocations`` JSON for rows of (history, domain), with ``k`` as a param."""
    body: dict[str, Any] = {"dataframe_records": [{"history": list(h), "domain": d} for h, d in zip(histories, domains)]}
    if k is not None:
        body["params"] = {"k": k}
    return body

