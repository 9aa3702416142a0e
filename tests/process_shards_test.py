"""Process shards without processes: `SequenceDataset.shard`, sharded reads,
per-shard batch order, user-keyed eval negatives, sharded evaluation sums.

The two-process run itself is in multiprocess_test.py.
"""

import jax
import numpy as np
import pytest
from flax import nnx

from configs import test as test_config
from recattn import data as data_lib
from recattn import models
from recattn import sharding
from recattn import train
from recattn.data import batching
from recattn.data.dataset import SequenceDataset
from recattn.evaluation import Evaluator


def _toy(num_users=11, num_items=40, seed=0):
  rng = np.random.default_rng(seed)
  lengths = rng.integers(3, 12, num_users)
  offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
  items = rng.integers(1, num_items + 1, offsets[-1]).astype(np.int32)
  times = 10**9 + rng.integers(0, 10**6, offsets[-1]).astype(np.int64)
  return SequenceDataset("toy", num_items, items, offsets, times,
                         {"users": num_users})


@pytest.mark.parametrize("count", [1, 2, 3, 5, 13])
def test_shards_partition_the_users_and_record_it(count):
  ds = _toy()
  seen = []
  for index in range(count):
    part = ds.shard(index, count)
    ids = part.user_ids()
    np.testing.assert_array_equal(ids % count, index)
    seen.extend(ids.tolist())
    for local, user in enumerate(ids):
      np.testing.assert_array_equal(part.sequence(local), ds.sequence(user))
      span = slice(ds.offsets[user], ds.offsets[user + 1])
      np.testing.assert_array_equal(
          part.timestamps[part.offsets[local]:part.offsets[local + 1]],
          ds.timestamps[span])
    assert part.card["shard"] == {
        "index": index, "count": count, "rule": "user % count == index",
        "users_total": ds.num_users, "users": part.num_users,
        "interactions": part.num_interactions}
    assert part.card["users"] == ds.num_users  # whole-dataset counts kept
    # Relative times count from the whole dataset's first interaction.
    assert part.card["time_origin"] == ds.timestamps.min()
  assert sorted(seen) == list(range(ds.num_users))
  with pytest.raises(ValueError, match="already shard"):
    ds.shard(0, count).shard(0, 1)
  with pytest.raises(ValueError, match="shard index"):
    ds.shard(count, count)


def test_train_rows_of_the_shards_are_the_whole_datasets_rows():
  ds = _toy(num_users=20)
  want_inputs, want_targets = batching.train_arrays(ds, 6, "all")
  want_times = batching.train_times(ds, 6, "all")
  got = [np.concatenate(x) for x in zip(*[
      (*batching.train_arrays(ds.shard(i, 3), 6, "all"),
       batching.train_times(ds.shard(i, 3), 6, "all")) for i in range(3)])]
  key = lambda rows: sorted(map(tuple, rows))
  assert key(np.concatenate([got[0], got[1], got[2]], 1)) == key(
      np.concatenate([want_inputs, want_targets, want_times], 1))


def test_load_with_a_shard_reads_only_that_shards_records(tmp_path):
  c = test_config.get_config()
  with c.unlocked():
    c.data.data_dir = str(tmp_path / "tfds")
  full = data_lib.load(c.data)
  for index in range(3):
    got = data_lib.load(c.data, shard=(index, 3))
    want = full.shard(index, 3)
    for field in ("items", "offsets", "timestamps"):
      np.testing.assert_array_equal(getattr(got, field), getattr(want, field))
    assert got.card["shard"] == want.card["shard"]
    assert got.card["shard"]["users"] == len(range(index, full.num_users, 3))


def test_one_shard_batches_like_the_unsharded_order():
  lengths = np.random.default_rng(0).integers(1, 50, 100)
  for chunk in (0, 3):
    want = list(batching.epoch_batches(lengths, 16, 2, 7, chunk))
    got = list(batching.epoch_batches(lengths, 16, 2, 7, chunk, shard=0,
                                      num_shards=1))
    np.testing.assert_array_equal(np.stack(got), np.stack(want))


@pytest.mark.parametrize("chunk", [0, 2])
def test_shard_batches_cover_each_row_once_in_the_agreed_number_of_steps(
    chunk):
  rng = np.random.default_rng(1)
  shard_lengths = [rng.integers(1, 50, n) for n in (37, 29)]
  steps = 5  # ceil(37 / 8)
  plans = []
  for shard, lengths in enumerate(shard_lengths):
    batches = np.stack(list(batching.epoch_batches(
        lengths, 8, 1, 3, chunk, shard=shard, num_shards=2,
        num_batches=steps)))
    assert batches.shape == (steps, 8)
    rows = batches[batches >= 0]
    assert sorted(rows) == list(range(len(lengths)))
    plans.append(batches)
  # Different shards, different row orders; same epoch, same order again.
  assert not np.array_equal(plans[0][plans[0] >= 0][:29],
                            plans[1][plans[1] >= 0])
  again = np.stack(list(batching.epoch_batches(
      shard_lengths[0], 8, 1, 3, chunk, shard=0, num_shards=2,
      num_batches=steps)))
  np.testing.assert_array_equal(again, plans[0])
  with pytest.raises(ValueError, match="cannot hold"):
    list(batching.epoch_batches(shard_lengths[0], 8, 1, 3, chunk, shard=0,
                                num_shards=2, num_batches=4))


def test_shard_epoch_plan_widths_fit_each_batch():
  c = test_config.get_config()
  lengths = np.random.default_rng(2).integers(1, c.data.max_len + 1, 40)
  with c.unlocked():
    c.data.bucket_step = 5
  rows, widths = train.shard_epoch_plan(lengths, 8, 6, 0, c, 1, 2)
  assert rows.shape == (6, 8) and widths.shape == (6,)
  for r, w in zip(rows, widths):
    longest = lengths[r[r >= 0]].max() if np.any(r >= 0) else 1
    assert longest <= w <= c.data.max_len and w % 5 == 0


@pytest.mark.parametrize("strategy", ["uniform", "popularity"])
def test_user_keyed_negatives_do_not_depend_on_the_split(strategy):
  ds = _toy(num_users=30, num_items=25)
  counts = batching.item_counts(ds)
  want = batching.sample_eval_negatives(ds, 8, strategy, 3, by_user=True)
  for index in range(4):
    part = ds.shard(index, 4)
    got = batching.sample_eval_negatives(part, 8, strategy, 3, by_user=True,
                                         counts=counts)
    np.testing.assert_array_equal(got, want[part.user_ids()])
  for u in range(ds.num_users):
    assert not set(want[u]) & set(ds.sequence(u))
    assert len(set(want[u])) == 8
  assert want.min() >= 1 and want.max() <= ds.num_items
  # Another seed, other negatives; the default stream is untouched.
  assert not np.array_equal(
      want, batching.sample_eval_negatives(ds, 8, strategy, 4, by_user=True))
  assert not np.array_equal(
      want, batching.sample_eval_negatives(ds, 8, strategy, 3))


def test_sharded_evaluation_sums_to_the_whole_datasets():
  """Per-shard evaluators (one process, as each process of a run would)
  give metric sums whose total is the whole dataset's evaluation."""
  c = test_config.get_config()
  ds = _toy(num_users=45, num_items=60)
  model = models.create(c.model, num_items=ds.num_items, max_len=8, seed=0)
  graphdef, params = nnx.split(model, nnx.Param)
  mesh = sharding.make_mesh(2, 1)
  params = jax.device_put(params, sharding.replicated(mesh))
  counts = batching.item_counts(ds)
  kwargs = dict(max_len=8, batch_size=8, filter_seen=True, num_negatives=10,
                negatives="popularity", seed=1, with_times=False, mesh=mesh,
                process_shards=True, item_counts=counts)
  want = Evaluator(ds, "test", **kwargs)(graphdef, params)
  total = {k: 0.0 for k in want}
  for index in range(3):
    part = ds.shard(index, 3)
    got = Evaluator(part, "test", **kwargs)(graphdef, params)
    for k, v in got.items():
      total[k] += v * part.num_users / ds.num_users
  for k, v in want.items():
    np.testing.assert_allclose(total[k], v, rtol=1e-5, atol=1e-7, err_msg=k)
  # The default (unsharded) evaluator ranks the same full protocol.
  plain = Evaluator(ds, "test", **{**kwargs, "process_shards": False})(
      graphdef, params)
  for k, v in want.items():
    if "/full/" in k:
      np.testing.assert_allclose(plain[k], v, rtol=1e-5, atol=1e-7,
                                 err_msg=k)
