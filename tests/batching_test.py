"""Leave-one-out windows, eval negatives and epoch batching, by hand."""

import numpy as np
import pytest

from recattn.data import batching
from recattn.data.dataset import SequenceDataset


def _ds():
  # user 0: 1 2 3 4 5 ; user 1: 6 7 8 ; user 2: 2 9 3 1 7 8
  seqs = [[1, 2, 3, 4, 5], [6, 7, 8], [2, 9, 3, 1, 7, 8]]
  items = np.concatenate(seqs).astype(np.int32)
  offsets = np.concatenate([[0], np.cumsum([len(s) for s in seqs])])
  return SequenceDataset("toy", 9, items, offsets, None, {})


def test_train_windows_predict_next_item_and_hold_out_the_last_two():
  inputs, targets = batching.train_arrays(_ds(), max_len=4)
  # user 1 has a single train item (6): no target, dropped.
  # user 2's train part is 2 9 3 1.
  np.testing.assert_array_equal(inputs, [[0, 0, 1, 2], [0, 2, 9, 3]])
  np.testing.assert_array_equal(targets, [[0, 0, 2, 3], [0, 9, 3, 1]])


def test_all_windows_use_every_training_target_once():
  inputs, targets = batching.train_arrays(_ds(), max_len=2, windows="all")
  # user 0's train part 1 2 3: one window; user 2's 2 9 3 1: two.
  np.testing.assert_array_equal(inputs, [[1, 2], [9, 3], [0, 2]])
  np.testing.assert_array_equal(targets, [[2, 3], [3, 1], [0, 9]])
  last_inputs, _ = batching.train_arrays(_ds(), max_len=2)
  np.testing.assert_array_equal(last_inputs, [[1, 2], [9, 3]])


def test_prefix_windows_make_one_right_aligned_row_per_target():
  inputs, targets = batching.train_arrays(_ds(), max_len=3,
                                          windows="prefixes")
  # user 0's train part 1 2 3 gives 2 rows, user 2's 2 9 3 1 gives 3.
  np.testing.assert_array_equal(
      inputs, [[0, 0, 1], [0, 1, 2], [0, 0, 2], [0, 2, 9], [2, 9, 3]])
  np.testing.assert_array_equal(targets, [[2], [3], [9], [3], [1]])
  # The same targets as the every-position windows, each once.
  _, every = batching.train_arrays(_ds(), max_len=3, windows="all")
  np.testing.assert_array_equal(np.sort(targets[:, 0]),
                                np.sort(every[every > 0]))


def test_eval_windows():
  h, t, starts, ends = batching.eval_arrays(_ds(), "valid", max_len=3)
  np.testing.assert_array_equal(h, [[1, 2, 3], [0, 0, 6], [9, 3, 1]])
  np.testing.assert_array_equal(t, [4, 7, 7])
  h, t, _, _ = batching.eval_arrays(_ds(), "test", max_len=3)
  np.testing.assert_array_equal(h, [[2, 3, 4], [0, 6, 7], [3, 1, 7]])
  np.testing.assert_array_equal(t, [5, 8, 8])
  seen = batching.seen_items(_ds().items, starts, ends, width=5)
  np.testing.assert_array_equal(seen, [[1, 2, 3, 0, 0], [6, 0, 0, 0, 0],
                                       [2, 9, 3, 1, 0]])


def test_item_counts_use_the_training_part_only():
  counts = batching.item_counts(_ds())
  # train parts: [1 2 3] [6] [2 9 3 1]
  np.testing.assert_array_equal(counts, [0, 2, 2, 2, 0, 0, 1, 0, 0, 1])


def test_eval_negatives_avoid_every_item_of_the_user_and_repeat_nothing():
  ds = _ds()
  for strategy in ("uniform", "popularity"):
    negs = batching.sample_eval_negatives(ds, 3, strategy, seed=0)
    assert negs.shape == (3, 3)
    for u in range(3):
      assert not set(negs[u]) & set(ds.sequence(u)), (strategy, u)
      assert len(set(negs[u])) == 3 and negs[u].min() >= 1
    np.testing.assert_array_equal(
        negs, batching.sample_eval_negatives(ds, 3, strategy, seed=0))


def test_epoch_batches_cover_every_row_once_and_depend_on_seed_and_epoch():
  lengths = np.arange(1, 101)
  for chunk in (0, 2):
    batches = list(batching.epoch_batches(lengths, 16, epoch=3, seed=1,
                                          chunk_batches=chunk))
    rows = np.concatenate(batches)
    assert all(len(b) == 16 for b in batches)
    np.testing.assert_array_equal(np.sort(rows[rows >= 0]), np.arange(100))
    again = list(batching.epoch_batches(lengths, 16, 3, 1, chunk))
    np.testing.assert_array_equal(np.stack(batches), np.stack(again))
    other = list(batching.epoch_batches(lengths, 16, 4, 1, chunk))
    assert not np.array_equal(np.stack(batches), np.stack(other))


def test_bucketing_groups_similar_lengths():
  rng = np.random.default_rng(0)
  lengths = rng.integers(1, 200, size=2048)
  plain = [lengths[b].max() - lengths[b].min()
           for b in batching.epoch_batches(lengths, 64, 0, 0, 0)]
  grouped = [lengths[b].max() - lengths[b].min()
             for b in batching.epoch_batches(lengths, 64, 0, 0, 8)]
  assert np.mean(grouped) < np.mean(plain) / 4
  assert batching.window_length(np.array([3, 51]), 200, 50) == 100
  assert batching.window_length(np.array([3]), 200, 50) == 50
  assert batching.window_length(np.array([199]), 120, 50) == 120
  assert batching.window_length(np.array([3]), 200, 0) == 200


def test_take_rows_pads_with_zero_rows():
  a = np.arange(6).reshape(3, 2) + 1
  np.testing.assert_array_equal(batching.take_rows(a, np.array([2, -1])),
                                [[5, 6], [0, 0]])


def test_times_are_the_timestamps_of_the_input_items():
  ds = _ds()
  # timestamp = 100 * item id + position, so each window is checkable
  ts = (100 * ds.items + np.arange(len(ds.items))).astype(np.int64) + 10**9
  ds = SequenceDataset("toy", 9, ds.items, ds.offsets, ts, {})
  base = ts.min()
  for windows in batching.TRAIN_WINDOWS:
    inputs, _ = batching.train_arrays(ds, max_len=2, windows=windows)
    times = batching.train_times(ds, max_len=2, windows=windows)
    assert times.shape == inputs.shape
    np.testing.assert_array_equal(times[inputs == 0], 0)
    np.testing.assert_array_equal(
        (times[inputs > 0] + base - 10**9) // 100, inputs[inputs > 0])
  history, _, _, _ = batching.eval_arrays(ds, "test", max_len=4)
  times = batching.eval_times(ds, "test", max_len=4)
  np.testing.assert_array_equal((times[history > 0] + base - 10**9) // 100,
                                history[history > 0])


def test_shifted_times_are_those_of_each_query_s_next_item():
  # model.time_query="next": a query's time is its target's (training) and,
  # at the last history position, the held-out item's (evaluation).
  ds = _ds()
  ts = (100 * ds.items + np.arange(len(ds.items))).astype(np.int64) + 10**9
  ds = SequenceDataset("toy", 9, ds.items, ds.offsets, ts, {})
  base = ts.min()
  item_of = lambda t: (t + base - 10**9) // 100
  for windows in batching.TRAIN_WINDOWS:
    inputs, targets = batching.train_arrays(ds, max_len=2, windows=windows)
    times = batching.train_times(ds, max_len=2, windows=windows, shift=1)
    np.testing.assert_array_equal(times[inputs == 0], 0)
    if windows == "prefixes":  # one target per row, at the last position
      np.testing.assert_array_equal(item_of(times[:, -1]), targets[:, 0])
      continue
    np.testing.assert_array_equal(item_of(times[inputs > 0]),
                                  targets[inputs > 0])
  for split in ("valid", "test"):
    history, held_out, _, _ = batching.eval_arrays(ds, split, max_len=4)
    times = batching.eval_times(ds, split, max_len=4, shift=1)
    own = batching.eval_times(ds, split, max_len=4)
    np.testing.assert_array_equal(item_of(times[:, -1]), held_out)
    real = history[:, :-1] > 0  # a real item's next one is the history's
    np.testing.assert_array_equal(times[:, :-1][real], own[:, 1:][real])
    np.testing.assert_array_equal(times[history == 0], 0)


def test_times_of_a_dataset_without_timestamps_is_an_error():
  with pytest.raises(ValueError, match="no timestamps"):
    batching.train_times(_ds(), max_len=2)
