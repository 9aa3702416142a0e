"""Synthetic data at catalogue scale: identity, power law, counts, wiring."""

import hashlib
import time

import ml_collections
import numpy as np
import pytest

from recattn import data
from recattn.data import DataError
from recattn.data import synthetic
from recattn.data.loading import original_item_ids

# sha256 of the int64 bytes of users, items, timestamps, computed with the
# generator as it was before the `zipf` field and the inverse-CDF sampler
# (rng.choice per position): prepared datasets stay valid only if these hold.
_PINNED = {
    (1000, 500, 30.0, 0):
        "47dd627871445e4dd18d5673553d1c060067474005cfcb042dec7fc97c0c2c77",
    (300, 50, 20.0, 0):
        "5533fc51ba2f5e4124df5ef283e69635eb6a965e959b8cafcae067eebd4d0c20",
    (2000, 300, 30.0, 3):
        "e7d83d51d52380c63ce25201be91069b13280b27c1c3b7ecd1c468dfa27c2364",
    (100, 2, 3.0, 5):
        "c254348de232d76ff5a48f721d4612d29bfea843e5bce3fab1391a56f7f876d5",
}


def _sha256(raw) -> str:
  digest = hashlib.sha256()
  for array in (raw.users, raw.items, raw.timestamps):
    digest.update(np.ascontiguousarray(array, np.int64).tobytes())
  return digest.hexdigest()


def _assert_same(a, b):
  for field in ("users", "items", "timestamps"):
    np.testing.assert_array_equal(getattr(a, field), getattr(b, field))


def _rank_slope(ids: np.ndarray, num_items: int, top: int) -> float:
  """Slope of log count against log rank over the `top` most frequent ids."""
  counts = np.sort(np.bincount(ids, minlength=num_items + 1)[1:])[::-1][:top]
  return np.polyfit(np.log(np.arange(1, top + 1)), np.log(counts), 1)[0]


@pytest.mark.parametrize("key", sorted(_PINNED))
def test_datasets_from_before_zipf_are_unchanged(key):
  params = synthetic.SyntheticParams(*key)
  assert params.zipf == 0.8
  assert _sha256(synthetic.generate(params)) == _PINNED[key]
  assert _sha256(synthetic.generate(params, users_per_chunk=7)) == _PINNED[key]


def test_config_name_adds_zipf_only_when_not_default():
  assert synthetic.SyntheticParams().config_name() == "n1000_v500_l30_s0"
  assert (synthetic.SyntheticParams(zipf=1.2).config_name()
          == "n1000_v500_l30_s0_z1p2")
  assert synthetic.SyntheticParams(zipf=0).config_name().endswith("_z0")


@pytest.mark.parametrize("fields, message", [
    ({"zipf": -0.5}, "data.synthetic_zipf=-0.5"),
    ({"zipf": float("nan")}, "data.synthetic_zipf=nan"),
    ({"num_items": 2**31}, "data.synthetic_num_items=2147483648"),
    ({"num_items": 1}, "data.synthetic_num_items=1"),
])
def test_bad_params_name_the_field(fields, message):
  with pytest.raises(DataError, match=message):
    synthetic.generate(synthetic.SyntheticParams(**fields))


def test_deterministic_and_independent_of_chunking():
  params = synthetic.SyntheticParams(num_users=5000, num_items=100_000,
                                     mean_len=12, seed=4, zipf=1.1)
  whole = synthetic.generate(params, users_per_chunk=10**9)
  _assert_same(whole, synthetic.generate(params))
  _assert_same(whole, synthetic.generate(params, users_per_chunk=333))
  other_seed = synthetic.generate(
      synthetic.SyntheticParams(**{**vars(params), "seed": 5}))
  other_zipf = synthetic.generate(
      synthetic.SyntheticParams(**{**vars(params), "zipf": 1.0}))
  for other in (other_seed, other_zipf):
    n = min(len(other.items), len(whole.items))
    assert np.mean(other.items[:n] != whole.items[:n]) > 0.5


@pytest.mark.parametrize("zipf", [0.5, 0.8, 1.2])
def test_sampler_is_a_power_law_with_the_given_exponent(zipf):
  rng = np.random.default_rng(0)
  cdf = synthetic.popularity_cdf(10_000, zipf, rng)
  assert cdf.shape == (10_000,) and cdf[-1] == 1.0
  assert np.all(np.diff(cdf) > 0)
  items = synthetic.draw_items(cdf, rng.random(10**6))
  assert items.min() >= 1 and items.max() <= 10_000
  assert abs(_rank_slope(items, 10_000, 300) + zipf) < 0.03


def test_dataset_popularity_follows_the_exponent():
  num_items = 10_000
  slopes = {}
  for zipf in (0.5, 0.8, 1.2):
    # Length 3 only: a third of all items start a sequence (pure Zipf draws).
    starts = synthetic.generate(synthetic.SyntheticParams(
        num_users=100_000, num_items=num_items, mean_len=3, zipf=zipf)).items
    assert abs(_rank_slope(starts[::3], num_items, 100) + zipf) < 0.05
    # Whole sequences: uniform Markov successors flatten the head a little
    # (measured: -0.37, -0.67, -0.89 for 0.5, 0.8, 1.2).
    raw = synthetic.generate(synthetic.SyntheticParams(
        num_users=20_000, num_items=num_items, mean_len=30, zipf=zipf))
    slopes[zipf] = _rank_slope(raw.items, num_items, 100)
    assert -zipf < slopes[zipf] < -0.65 * zipf, (zipf, slopes[zipf])
  assert slopes[0.5] > slopes[0.8] > slopes[1.2]


def _check_counts_and_order(raw, params):
  users, items, times = raw.users, raw.items, raw.timestamps
  assert users.dtype == items.dtype == times.dtype == np.int64
  assert users.shape == items.shape == times.shape
  # Users 1..U in order, each at least 3 interactions, lengths 3 + Poisson.
  assert np.all(np.diff(users) >= 0)
  lengths = np.bincount(users, minlength=params.num_users + 1)[1:]
  assert lengths.size == params.num_users and lengths.min() >= 3
  spread = 5 * np.sqrt((params.mean_len - 3) / params.num_users)
  assert abs(lengths.mean() - params.mean_len) < spread
  assert items.min() >= 1 and items.max() <= params.num_items
  same_user = users[1:] == users[:-1]
  assert np.all(np.diff(times)[same_user] > 0)


def test_counts_ids_and_timestamps():
  params = synthetic.SyntheticParams(num_users=20_000, num_items=50_000,
                                     mean_len=17.5, seed=2)
  _check_counts_and_order(synthetic.generate(params), params)


def test_catalogue_scale_generation_is_quick():
  # A guard against a return of O(V) work per position, not a benchmark
  # (experiments/005_synthetic_scale times 10^7 interactions).
  params = synthetic.SyntheticParams(num_users=100_000, num_items=10**6,
                                     mean_len=30)
  start = time.perf_counter()
  raw = synthetic.generate(params)
  assert time.perf_counter() - start < 60
  _check_counts_and_order(raw, params)
  assert raw.items.size > 2.9 * 10**6
  # Most of the catalogue is reachable, not just the popular head.
  assert np.unique(raw.items).size > 0.5 * params.num_items


def test_load_reads_zipf_and_rebuilds_identity_ids(tmp_path):
  config = ml_collections.ConfigDict({
      "name": "synthetic", "data_dir": str(tmp_path), "download": False,
      "synthetic_num_users": 200, "synthetic_num_items": 40,
      "synthetic_mean_len": 10, "synthetic_zipf": 1.2})
  ds = data.load(config)
  assert ds.card["config"] == "n200_v40_l10_s0_z1p2_r0_i0_u3"
  assert ds.card["synthetic"]["zipf"] == 1.2
  raw = synthetic.generate(synthetic.SyntheticParams(
      num_users=200, num_items=40, mean_len=10, zipf=1.2))
  np.testing.assert_array_equal(ds.items, raw.items)
  np.testing.assert_array_equal(ds.timestamps, raw.timestamps)
  np.testing.assert_array_equal(original_item_ids(config), np.arange(1, 41))

  config.synthetic_zipf = 0.8
  assert data.load(config).card["config"] == "n200_v40_l10_s0_r0_i0_u3"
