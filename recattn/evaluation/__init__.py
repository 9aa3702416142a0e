"""Ranking metrics and the batched full/sampled evaluator."""

from recattn.evaluation.evaluator import Evaluator
from recattn.evaluation.metrics import KS, rank_of_target, ranking_metrics

__all__ = ["Evaluator", "KS", "rank_of_target", "ranking_metrics"]
