"""The recommender kind: text-based sequential recommenders with domain experts."""

from moa.pipelines.bundle import ModelKind, register_kind
from moa.pipelines.kinds.recommender import batch, service

KIND = register_kind(ModelKind(
    name="recommender",
    service=service.RecommendationService,
    gate=("val/ndcg_10", "max"),
    signature=service.signature,
    input_example=lambda folder: (service.input_example(folder), {"k": 5}),
    modules=("moa.pipelines.kinds.recommender.module.DomainExpertRecommender",
             "moa.pipelines.kinds.recommender.module.XCrossRecommender"),
    score_all=batch.score_all,
))
