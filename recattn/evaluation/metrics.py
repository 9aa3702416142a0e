"""Ranking metrics from the 0-based rank of the held-out item (pure jnp).

With one relevant item per user, HR@K = [rank < K], NDCG@K =
[rank < K] / log2(rank + 2) and MRR = 1 / (rank + 1) (untruncated).
"""

import jax
import jax.numpy as jnp

KS = (1, 5, 10, 20, 50, 200)


def rank_of_target(scores: jax.Array, target_scores: jax.Array) -> jax.Array:
  """0-based rank `[B]` of each target among `scores: [B, C]`.

  Ties count against the target (pessimistic), so a model that scores every
  item equally ranks the target last, not first.
  """
  higher = jnp.sum(scores >= target_scores[:, None], axis=-1)
  return higher - 1  # the target's own score is among `scores`


def ranking_metrics(ranks: jax.Array, ks=KS) -> dict[str, jax.Array]:
  """Per-user metrics `{name: [B]}` from 0-based ranks `[B]`."""
  ranks = ranks.astype(jnp.float32)
  out = {"mrr": 1.0 / (ranks + 1.0)}
  for k in ks:
    hit = (ranks < k).astype(jnp.float32)
    out[f"hr@{k}"] = hit
    out[f"ndcg@{k}"] = hit / jnp.log2(ranks + 2.0)
  return out
