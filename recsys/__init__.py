"""Cross-domain sequential recommendation on top of moa (imports moa core only, never the pipelines).

Modules, each importing only those above it in this list (``tests/test_recsys_layout.py`` checks the graph):

* :mod:`~moa.recsys.data`: datasets and splits. :func:`ml100k` (MovieLens-100K in genre domains,
  :data:`ML100K_DOMAINS`), :func:`load_atomic` (RecBole atomic files), :func:`load_amazon` (Amazon Reviews) give a
  :class:`RecDataset`; its ``leave_one_out()`` a :class:`LeaveOneOut` split (``train`` / ``valid`` / ``test``
  :class:`Stage` objects). :func:`left_pad` batches histories (:data:`PAD` = 0), :func:`training_windows` cuts
  training sequences into next-item windows.
* :mod:`~moa.recsys.metrics`: :func:`ranking_metrics` (HR, NDCG, MRR at k) of :func:`target_ranks`.
* :mod:`~moa.recsys.evaluate`: :func:`~moa.recsys.evaluate.evaluate` (the name of its module: import it from
  there), the shared harness (full ranking, seen items masked) for any
  model with ``score(histories, domain)``; :func:`trainable_parameters` counts what a model trains.
* :mod:`~moa.recsys.layers`: :class:`TransformerBlock` and :func:`look_back_mask`, the user encoders' parts.
* :mod:`~moa.recsys.baselines`: :class:`Popularity` and the ID-based :class:`SASRec`.
* :mod:`~moa.recsys.encoders`: the pretrained backbone (:func:`load_encoder`, :func:`tokenize_items`), the text
  :class:`ItemEncoder` with its domain experts, the per-domain :class:`UserEncoder`.
* :mod:`~moa.recsys.trainer`: the fit loop and per-batch loss of the text recommender.
* :mod:`~moa.recsys.persistence`: its saved folder (``recommender.json`` + ``recommender.safetensors``).
* :mod:`~moa.recsys.recommender`: :class:`TextSeqRecommender` (build, fit, score, recommend, save) and its
  :class:`RecommenderConfig`.
* :mod:`~moa.recsys.xcross`: X-Cross, :func:`build_xcross` a target-domain model from frozen domain experts
  (:class:`XCrossItemEncoder`).
* :mod:`~moa.recsys.loading`: :func:`load_recommender`, any saved recommender (text or X-Cross) back.

The names below are importable from ``moa.recsys`` directly, each loaded on first use: ``import moa.recsys``
stays cheap (no torch, pandas or transformers until a name is used).
"""

from __future__ import annotations

from moa import lazy_exports

_EXPORTS = {
    # data
    "PAD": "data", "ML100K_DOMAINS": "data", "RecDataset": "data", "Stage": "data", "LeaveOneOut": "data",
    "left_pad": "data", "training_windows": "data", "item_text": "data", "ml100k": "data", "load_atomic": "data",
    "read_atomic": "data", "load_amazon": "data",
    # metrics and the harness
    "target_ranks": "metrics", "ranking_metrics": "metrics",
    "EvalResult": "evaluate", "trainable_parameters": "evaluate",  # the harness: moa.recsys.evaluate.evaluate
    # baselines and their parts
    "TransformerBlock": "layers", "look_back_mask": "layers",
    "Popularity": "baselines", "SASRec": "baselines",
    # the text recommender
    "load_encoder": "encoders", "tokenize_items": "encoders", "ItemEncoder": "encoders", "UserEncoder": "encoders",
    "RecommenderConfig": "recommender", "TextSeqRecommender": "recommender",
    "save_recommender": "persistence", "load_recommender": "loading",
    # X-Cross
    "build_xcross": "xcross", "XCrossItemEncoder": "xcross",
}


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)


__all__ = sorted(_EXPORTS)
