"""Cross-domain sequential recommendation on top of moa (imports moa core only, never the pipelines).

Modules, each importing only those above it in this list (``tests/test_layout.py`` checks the graph):

* :mod:`~moa.recsys.data`: datasets and splits. :func:`ml100k` (MovieLens-100K in genre domains,
  :data:`ML100K_DOMAINS`), :func:`load_atomic` (RecBole atomic files), :func:`load_amazon` (Amazon Reviews) give a
  :class:`RecDataset`; its ``leave_one_out()`` a :class:`LeaveOneOut` split (``train`` / ``valid`` / ``test``
  :class:`Stage` objects). :func:`left_pad` batches histories (:data:`PAD` = 0), :func:`training_windows` cuts
  training sequences into next-item windows.
* :mod:`~moa.recsys.metrics`: :func:`ranking_metrics` (HR, NDCG, MRR at k) of :func:`target_ranks`.
* :mod:`~moa.recsys.evaluate`: :func:`~moa.recsys.evaluate.evaluate` (the name of its module: import it from
  there), the shared harness (full ranking, seen items masked) for any
  model with ``score(histories, domain)``; :func:`trainable_parameters` counts what a model trains.
* :mod:`~moa.recsys.layers`: :class:`SequenceEncoder`, the one causal encoder of item sequences (SASRec and the
  text recommender's user encoder are subclasses), built from :class:`TransformerBlock` and :func:`look_back_mask`.
* :mod:`~moa.recsys.trainer`: :func:`train`, the one next-item training loop (windows, random batches, full or
  sampled softmax, validation NDCG@10, best weights, early stopping); the text recommender's step.
* :mod:`~moa.recsys.baselines`: :class:`Popularity` and the ID-based :class:`SASRec` (full softmax by default).
* :mod:`~moa.recsys.encoders`: the pretrained backbone (:func:`load_encoder`, :func:`tokenize_items`), the text
  :class:`ItemEncoder` with its domain experts, the per-domain :class:`UserEncoder` (optionally fusing item IDs
  with the text: ``RecommenderConfig(item_ids=True)``).
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
    "left_pad": "data", "training_windows": "data", "item_text": "data", "ml100k": "data", "ml1m": "data",
    "MOVIELENS": "data", "movielens": "data", "load_atomic": "data", "read_atomic": "data", "load_amazon": "data",
    # metrics and the harness
    "target_ranks": "metrics", "ranking_metrics": "metrics",
    "EvalResult": "evaluate", "trainable_parameters": "evaluate",  # the harness: moa.recsys.evaluate.evaluate
    # baselines and their parts
    "SequenceEncoder": "layers", "TransformerBlock": "layers", "look_back_mask": "layers",
    "train": "trainer", "Popularity": "baselines", "SASRec": "baselines",
    # the text recommender
    "load_encoder": "encoders", "tokenize_items": "encoders", "ItemEncoder": "encoders", "UserEncoder": "encoders",
    "RecommenderConfig": "recommender", "TextSeqRecommender": "recommender",
    "save_recommender": "persistence", "load_recommender": "loading",
    # X-Cross
    "build_xcross": "xcross", "XCrossItemEncoder": "xcross",
}


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)


__all__ = sorted(_EXPORTS)
