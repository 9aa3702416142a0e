"""Streaming replay (recattn.serving.stream) and the time split it uses."""

import numpy as np
import pytest

from configs import base as base_config
from recattn import models
from recattn.data import dataset as dataset_lib
from recattn.serving import engine as engine_lib
from recattn.serving import stream

def _dataset(num_users=30, num_items=40, seed=0):
  rng = np.random.default_rng(seed)
  lengths = rng.integers(2, 25, size=num_users)
  offsets = np.zeros(num_users + 1, np.int64)
  np.cumsum(lengths, out=offsets[1:])
  items = rng.integers(1, num_items + 1, size=offsets[-1]).astype(np.int32)
  # Per-user sorted times with ties, overlapping across users.
  times = np.concatenate([np.sort(rng.integers(0, 50, size=n)) * 100
                          for n in lengths]).astype(np.int64) + 10**9
  return dataset_lib.SequenceDataset(
      name="toy", num_items=num_items, items=items, offsets=offsets,
      timestamps=times, card={"name": "toy"})


def test_time_split_holds_out_the_newest_events_as_user_suffixes():
  ds = _dataset()
  prefix, events = dataset_lib.time_split(ds, 0.3)
  n = len(ds.items)
  assert len(events.items) == round(0.3 * n)
  assert np.all(np.diff(events.times) >= 0)
  for u in range(ds.num_users):
    idx = np.sort(events.index[events.users == u])
    length = ds.offsets[u + 1] - ds.offsets[u]
    # A suffix of the user's sequence.
    np.testing.assert_array_equal(idx, np.arange(length - len(idx), length))
    np.testing.assert_array_equal(
        events.items[events.users == u][np.argsort(
            events.index[events.users == u])], ds.sequence(u)[idx])
  all_kept = np.ones(n, bool)
  all_kept[ds.offsets[events.users] + events.index] = False
  assert ds.timestamps[all_kept].max() <= events.times.min()
  # Users with < 3 remaining events leave the training prefix.
  remaining = ds.lengths() - np.bincount(events.users,
                                         minlength=ds.num_users)
  assert prefix.num_users == int((remaining >= 3).sum())
  assert prefix.card["time_split"]["held_out"] == len(events.items)
  # Deterministic.
  again = dataset_lib.time_split(ds, 0.3)[1]
  np.testing.assert_array_equal(again.users, events.users)


def test_time_split_needs_timestamps_and_a_fraction():
  ds = _dataset()
  with pytest.raises(dataset_lib.DataError, match="stream_holdout"):
    dataset_lib.time_split(ds, 1.5)
  no_times = dataset_lib.SequenceDataset(
      name="x", num_items=ds.num_items, items=ds.items, offsets=ds.offsets,
      timestamps=None, card={})
  with pytest.raises(dataset_lib.DataError, match="timestamps"):
    dataset_lib.time_split(no_times, 0.2)


def _engine(num_items, rank_head=False):
  c = base_config.get_base_config().model
  c.dim, c.num_heads, c.positions, c.rel_bias = 16, 2, "left", "time"
  c.rank_head = rank_head
  model = models.create(c, num_items=num_items, max_len=8, seed=0)
  return engine_lib.Engine.from_model(
      model, max_len=8, original_item_ids=np.arange(num_items) + 1)


def test_batched_replay_equals_one_event_at_a_time():
  ds = _dataset()
  _, events = dataset_lib.time_split(ds, 0.4)
  one = stream.replay(_engine(ds.num_items), ds, events, ks=(5, 10),
                      batch=1)
  many = stream.replay(_engine(ds.num_items), ds, events, ks=(5, 10),
                       batch=64)
  for key in one:
    if not key.startswith(("stream/seconds", "stream/events_per_s")):
      assert one[key] == pytest.approx(many[key]), key
  assert one["stream/events"] == len(events.items)
  # A hand count of the first event's hit, from a fresh state.
  assert 0 <= one["stream/full/hr@5"] <= one["stream/full/hr@10"] <= 1


def test_rerank_reorders_each_top_n_by_the_ranking_head():
  ds = _dataset()
  _, events = dataset_lib.time_split(ds, 0.4)
  engine = _engine(ds.num_items, rank_head=True)
  out = stream.replay(engine, ds, events, ks=(5, 10), batch=64, rerank=10)
  # The same top-10 in another order: HR@10 unchanged, HR@5 may move.
  assert out["stream/rerank10/hr@10"] == out["stream/full/hr@10"]
  assert 0 <= out["stream/rerank10/hr@5"] <= out["stream/rerank10/hr@10"]
  # By hand for the first event: its user's state before the replay.
  first = int(events.users[0])
  state, = engine.start([list(ds.sequence(first)[:int(events.index[0])])],
                        [list(ds.timestamps[ds.offsets[first]:
                                            ds.offsets[first]
                                            + int(events.index[0])])])
  ids, _ = engine.recommend([state], 10)
  scores = engine.score([state], [ids[0]])[0]
  assert len(scores) == 10 and np.all(np.isfinite(scores))
