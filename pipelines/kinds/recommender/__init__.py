"""The recommender kind: text-based sequential recommenders with domain experts."""
