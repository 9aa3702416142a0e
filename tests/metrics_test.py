"""Ranking metrics on rankings computed by hand."""

import math

import numpy as np
import jax.numpy as jnp

from recattn.evaluation import metrics


def test_rank_of_target_counts_ties_against_the_target():
  scores = jnp.array([[0.1, 0.9, 0.5, 0.3],   # target 0.5 -> 1 above
                      [0.2, 0.2, 0.2, 0.2],   # all tied -> last (rank 3)
                      [0.9, 0.1, 0.1, 0.0]])  # target 0.9 -> first
  target = jnp.array([0.5, 0.2, 0.9])
  np.testing.assert_array_equal(metrics.rank_of_target(scores, target),
                                [1, 3, 0])


def test_metrics_by_hand():
  ranks = jnp.array([0, 1, 4, 9, 10, 199, 250])
  m = {k: np.asarray(v) for k, v in metrics.ranking_metrics(ranks).items()}
  np.testing.assert_allclose(m["hr@1"], [1, 0, 0, 0, 0, 0, 0])
  np.testing.assert_allclose(m["hr@5"], [1, 1, 1, 0, 0, 0, 0])
  np.testing.assert_allclose(m["hr@10"], [1, 1, 1, 1, 0, 0, 0])
  np.testing.assert_allclose(m["hr@200"], [1, 1, 1, 1, 1, 1, 0])
  np.testing.assert_allclose(
      m["ndcg@10"], [1, 1 / math.log2(3), 1 / math.log2(6), 1 / math.log2(11),
                     0, 0, 0], rtol=1e-6)
  np.testing.assert_allclose(m["ndcg@200"][5], 1 / math.log2(201), rtol=1e-6)
  np.testing.assert_allclose(m["mrr"], 1 / (np.array(ranks) + 1.0), rtol=1e-6)
  assert set(m) == {"mrr"} | {f"{n}@{k}" for n in ("hr", "ndcg")
                              for k in metrics.KS}
