"""The evaluator on a fake model whose scores are fixed by hand."""

import math

import numpy as np
import jax.numpy as jnp
from flax import nnx

from recattn.data.dataset import SequenceDataset
from recattn.evaluation import Evaluator


class FakeModel(nnx.Module):
  """Scores item j after last item i as table[i, j] (item vectors = I)."""

  def __init__(self, table):
    self.table = nnx.Param(jnp.asarray(table, jnp.float32))

  def encode(self, items, last=None):
    h = self.table[...][items]
    return h if last is None else h[:, -last:]

  def item_vectors(self, ids):
    return jnp.eye(self.table.shape[1])[ids]

  def all_item_vectors(self):
    return jnp.eye(self.table.shape[1])


def _setup():
  # user 0: 1 2 3 4   -> valid: history 1 2, target 3; test: 1 2 3 -> 4
  # user 1: 5 6 1 2 6 -> valid: history 5 6 1, target 2 ; test: ... -> 6
  seqs = [[1, 2, 3, 4], [5, 6, 1, 2, 6]]
  items = np.concatenate(seqs).astype(np.int32)
  offsets = np.array([0, 4, 9])
  ds = SequenceDataset("toy", 6, items, offsets, None, {})
  table = np.zeros((7, 7))
  #            pad   1    2    3    4    5    6
  table[2] = [9.0, 0.9, 0.1, 0.5, 0.2, 0.3, 0.8]  # after 2 (user 0 valid)
  table[1] = [9.0, 0.7, 0.6, 0.1, 0.9, 0.8, 0.2]  # after 1 (user 1 valid)
  return ds, FakeModel(table)


def _eval(ds, model, filter_seen, split="valid"):
  ev = Evaluator(ds, split, max_len=3, batch_size=8, filter_seen=filter_seen,
                 num_negatives=2, negatives="uniform", seed=0)
  graphdef, params = nnx.split(model)
  return ev, ev(graphdef, params)


def test_full_ranking_by_hand_without_and_with_seen_filtering():
  ds, model = _setup()
  # No filtering: user 0 target 3 (0.5) < items 1 (0.9), 6 (0.8): rank 2.
  # user 1 target 2 (0.6) < items 4, 5, 1: rank 3. The padding score 9.0
  # never counts.
  _, m = _eval(ds, model, filter_seen=False)
  assert m["valid/full/hr@1"] == 0.0
  assert m["valid/full/hr@5"] == 1.0
  np.testing.assert_allclose(m["valid/full/mrr"], (1 / 3 + 1 / 4) / 2,
                             rtol=1e-6)
  np.testing.assert_allclose(
      m["valid/full/ndcg@5"], (1 / math.log2(4) + 1 / math.log2(5)) / 2,
      rtol=1e-6)
  # Filtering removes user 0's item 1 and user 1's items 5 and 1 (6 is
  # seen too): ranks 1 and 1.
  _, m = _eval(ds, model, filter_seen=True)
  np.testing.assert_allclose(m["valid/full/mrr"], 0.5, rtol=1e-6)
  assert m["valid/full/hr@1"] == 0.0 and m["valid/full/hr@5"] == 1.0


def test_filtering_keeps_a_repeated_target():
  ds, model = _setup()
  # user 1's test target 6 is also in its history: it must stay rankable.
  _, m = _eval(ds, model, filter_seen=True, split="test")
  assert m["test/full/hr@200"] == 1.0


def test_sampled_ranking_matches_numpy_on_the_drawn_candidates():
  ds, model = _setup()
  ev, m = _eval(ds, model, filter_seen=False)
  table = np.asarray(model.table[...])
  ranks = []
  for u, (last, target) in enumerate([(2, 3), (1, 2)]):
    cand = ev.candidates[u]
    ranks.append(int(np.sum(table[last, cand] >= table[last, target])))
  np.testing.assert_allclose(m["valid/sampled_uniform2/mrr"],
                             np.mean([1 / (r + 1) for r in ranks]), rtol=1e-6)
