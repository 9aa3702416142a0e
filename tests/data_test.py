"""Tests for recattn.data: counts pinned to published statistics, strictness.

Tests on the staged data need RECATTN_MANUAL_DIR (CI points it at the staged
folder) and fail, not skip, without it. Prepared datasets are shared through a
session-wide data_dir so each is built once.
"""

from __future__ import annotations

import os
import pathlib
import re
import urllib.error
import urllib.request
import zipfile

import ml_collections
import numpy as np
import pytest

from recattn import data
from recattn.data import loading
from recattn.data import parsing
from recattn.data import sources
from recattn.data import synthetic


@pytest.fixture(scope="session")
def manual_dir() -> str:
  path = os.environ.get("RECATTN_MANUAL_DIR", "")
  if not path or not os.path.isdir(path):
    pytest.fail("RECATTN_MANUAL_DIR must point at the staged data folder "
                f"(got {path!r}), e.g. RECATTN_MANUAL_DIR=/work/shared/data")
  return path


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> str:
  return str(tmp_path_factory.mktemp("tfds"))


def _config(**fields) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(fields)


def _staged(name, manual_dir, data_dir, **fields) -> data.SequenceDataset:
  return data.load(_config(name=name, manual_dir=manual_dir,
                           data_dir=data_dir, **fields))


def _check_csr(ds: data.SequenceDataset):
  assert ds.items.dtype == np.int32 and ds.offsets.dtype == np.int64
  assert ds.offsets[0] == 0 and ds.offsets[-1] == len(ds.items)
  assert np.all(np.diff(ds.offsets) > 0)
  assert ds.items.min() >= 1 and ds.items.max() <= ds.num_items
  assert ds.card["users"] == ds.num_users
  assert ds.card["items"] == ds.num_items
  assert ds.card["interactions"] == len(ds.items)
  if ds.timestamps is not None:
    assert ds.timestamps.dtype == np.int64
    assert ds.timestamps.shape == ds.items.shape


def _prepared_versions(data_dir) -> list[pathlib.Path]:
  """Everything a later load could pick up, or leftovers of a failed one."""
  root = pathlib.Path(data_dir)
  return (list(root.rglob("dataset_info.json"))
          + [p for p in root.rglob("*") if "incomplete" in p.name])


# --- Staged datasets: counts from the papers / staged README. ---


@pytest.mark.parametrize(
    "min_item_count, items, interactions",
    [(0, 3706, 1_000_209), (5, 3416, 999_611)],  # 5: SASRec's ML-1M stats.
)
def test_ml1m_seq_counts(manual_dir, data_dir, min_item_count, items,
                         interactions):
  ds = _staged("ml-1m-seq", manual_dir, data_dir,
               min_item_count=min_item_count)
  _check_csr(ds)
  assert (ds.num_users, ds.num_items, len(ds.items)) == (
      6040, items, interactions)
  assert ds.timestamps is None and not ds.card["has_timestamps"]
  assert ds.card["config"] == f"r0_i{min_item_count}_u3"
  assert ds.card["min_len"] >= (20 if min_item_count == 0 else 3)


def test_ml1m_seq_keeps_file_order_and_sorted_id_mapping(manual_dir, data_dir):
  ds = _staged("ml-1m-seq", manual_dir, data_dir)
  path = os.path.join(manual_dir, "ml-1m-bert4rec-preprocessed/ml-1m.seq.txt")
  with open(path, "rb") as f:
    table = np.fromstring(f.read(), np.int64, sep=" ").reshape(-1, 2)
  # The file is grouped by ascending user id, so no reordering is expected.
  movie_ids = np.unique(table[:, 1])
  np.testing.assert_array_equal(movie_ids[ds.items - 1], table[:, 1])
  np.testing.assert_array_equal(
      ds.lengths(), np.unique(table[:, 0], return_counts=True)[1])
  assert ds.card["source_files"][0]["sha256"] == (
      "41a314c194a8e7e282088f90f8e6b70fc075d63ce72f969745bc8945155c11e8")


def test_cached_load_does_not_read_raw_files(manual_dir, data_dir, tmp_path,
                                             monkeypatch):
  first = _staged("ml-1m-seq", manual_dir, data_dir)

  def fail(*args, **kwargs):
    raise AssertionError("raw file parsed again")

  monkeypatch.setattr(sources, "read_interactions", fail)
  # An empty manual dir: the raw file could not even be found.
  second = _staged("ml-1m-seq", str(tmp_path), data_dir)
  np.testing.assert_array_equal(first.items, second.items)
  np.testing.assert_array_equal(first.offsets, second.offsets)
  assert first.card == second.card


def test_ml100k_counts(manual_dir, data_dir):
  ds = _staged("ml-100k", manual_dir, data_dir)
  _check_csr(ds)
  assert (ds.num_users, ds.num_items, len(ds.items)) == (943, 1682, 100_000)
  assert ds.timestamps is not None


def test_ml1m_partial_counts_and_chronology(manual_dir, data_dir):
  ds = _staged("ml-1m-partial", manual_dir, data_dir)
  _check_csr(ds)
  assert (ds.num_users, ds.num_items, len(ds.items)) == (2999, 3615, 487_650)
  within_user = np.ones(len(ds.items) - 1, bool)
  within_user[ds.offsets[1:-1] - 1] = False  # Pairs that cross users.
  assert np.all(np.diff(ds.timestamps)[within_user] >= 0)
  assert ds.timestamps.min() == 970_620_734
  assert ds.timestamps.max() == 1_046_388_675


def test_ml1m_partial_min_rating(manual_dir, data_dir):
  ds = _staged("ml-1m-partial", manual_dir, data_dir, min_rating=4)
  # Ratings 4 and 5 occur 170,579 + 108,545 times (staged README).
  assert len(ds.items) <= 170_579 + 108_545
  assert ds.card["config"] == "r4_i0_u3"


def test_beauty_counts_and_attributes(manual_dir, data_dir):
  config = _config(name="beauty", manual_dir=manual_dir, data_dir=data_dir)
  ds = data.load(config)
  _check_csr(ds)
  assert (ds.num_users, ds.num_items, len(ds.items)) == (22363, 12101, 198_502)
  assert ds.card["min_len"] == 5

  attr_ids, num_attrs = data.load_item_attributes(config, ds)
  assert attr_ids.shape[0] == ds.num_items + 1
  assert attr_ids.dtype == np.int32
  assert not attr_ids[0].any()  # Padding item.
  assert np.all(attr_ids[1:, 0] > 0)  # Every item has an attribute.
  assert len(np.unique(attr_ids[attr_ids > 0])) == 637
  assert num_attrs == attr_ids.max() + 1


@pytest.mark.parametrize(
    "min_user_count, users, items, interactions",
    [
        (0, 31013, 23715, 287_107),  # The published SASRec file as is.
        (3, 30901, 23698, 286_913),  # Default: leave-one-out-ready users.
    ],
)
def test_video_counts(manual_dir, data_dir, min_user_count, users, items,
                      interactions):
  ds = _staged("video", manual_dir, data_dir, min_user_count=min_user_count)
  _check_csr(ds)
  assert (ds.num_users, ds.num_items, len(ds.items)) == (
      users, items, interactions)
  assert ds.card["min_len"] == max(min_user_count, 1)


# --- ML-1M ratings.dat format (the full file is not staged). ---

_RATINGS_DAT = (
    b"5::30::4::200\n"
    b"5::10::3::100\n"
    b"2::10::5::50\n"
    b"5::20::5::200\n"
    b"2::40::2::60\n"
    b"5::40::1::100\n"
    b"2::20::4::40\n"
)


def _write(path: pathlib.Path, content: bytes) -> pathlib.Path:
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_bytes(content)
  return path


def test_ml1m_chronological_with_stable_ties(tmp_path):
  manual = tmp_path / "manual"
  _write(manual / "ml-1m/ratings.dat", _RATINGS_DAT)
  ds = data.load(_config(name="ml-1m", manual_dir=str(manual),
                         data_dir=str(tmp_path / "tfds")))
  _check_csr(ds)
  # Items by original id: 10->1, 20->2, 30->3, 40->4. Users: 2->0, 5->1.
  # User 5: t=100 {10, 40} then t=200 {30, 20}, each tie in file order.
  np.testing.assert_array_equal(ds.sequence(0), [2, 1, 4])
  np.testing.assert_array_equal(ds.sequence(1), [1, 4, 3, 2])
  np.testing.assert_array_equal(ds.timestamps, [40, 50, 60, 100, 100, 200, 200])
  assert ds.card["source_files"][0]["path"].endswith("ml-1m/ratings.dat")


def test_ml1m_from_zip_and_min_rating(tmp_path):
  manual = tmp_path / "manual"
  manual.mkdir()
  with zipfile.ZipFile(manual / "ml-1m.zip", "w") as archive:
    archive.writestr("ml-1m/ratings.dat", _RATINGS_DAT)
  ds = data.load(_config(name="ml-1m", manual_dir=str(manual),
                         data_dir=str(tmp_path / "tfds"), min_rating=4,
                         min_user_count=1))
  # Kept (rating >= 4): user 2: 20@40, 10@50; user 5: 30@200, 20@200.
  # Items by original id: 10->1, 20->2, 30->3.
  np.testing.assert_array_equal(ds.items, [2, 1, 3, 2])
  np.testing.assert_array_equal(ds.offsets, [0, 2, 4])
  assert ds.card["source_files"][0]["member"] == "ml-1m/ratings.dat"


def test_ml20m_csv_with_header(tmp_path):
  manual = tmp_path / "manual"
  _write(manual / "ml-20m/ratings.csv",
         b"userId,movieId,rating,timestamp\n"
         b"1,2,3.5,1112486027\n1,29,3.5,1112484676\n1,32,3.5,1112484819\n")
  ds = data.load(_config(name="ml-20m", manual_dir=str(manual),
                         data_dir=str(tmp_path / "tfds"), min_rating=3.5))
  np.testing.assert_array_equal(ds.items, [2, 3, 1])
  assert ds.card["config"] == "r3p5_i0_u3"


# --- Synthetic data. ---


def test_synthetic_sizes_and_determinism(tmp_path):
  fields = dict(name="synthetic", synthetic_num_users=300,
                synthetic_num_items=50, synthetic_mean_len=20,
                data_dir=str(tmp_path / "a"))
  ds = data.load(_config(**fields))
  _check_csr(ds)
  assert ds.num_users == 300 and ds.num_items == 50
  assert 18 < ds.card["mean_len"] < 22 and ds.card["min_len"] >= 3
  assert ds.card["synthetic"]["seed"] == 0
  within_user = np.ones(len(ds.items) - 1, bool)
  within_user[ds.offsets[1:-1] - 1] = False
  assert np.all(np.diff(ds.timestamps)[within_user] > 0)

  again = data.load(_config(**{**fields, "data_dir": str(tmp_path / "b")}))
  np.testing.assert_array_equal(ds.items, again.items)
  np.testing.assert_array_equal(ds.timestamps, again.timestamps)
  other = data.load(_config(**fields, synthetic_seed=1))
  assert other.card["config"] != ds.card["config"]
  assert not np.array_equal(ds.items[:1000], other.items[:1000])


@pytest.mark.parametrize("hook", ["download_and_prepare",
                                  "_download_and_prepare"])
def test_another_process_preparing_the_same_version(tmp_path, monkeypatch,
                                                    hook):
  """Two trainings of a `--jobs=N` sweep prepare one dataset at once.

  The other process finishes just before this one starts preparing
  (`download_and_prepare`), or while it writes its own copy
  (`_download_and_prepare`: its final rename then finds the folder taken).
  """
  fields = dict(name="synthetic", synthetic_num_users=50,
                synthetic_num_items=20, synthetic_mean_len=8)
  config = _config(**fields, data_dir=str(tmp_path / "shared"))
  cls = type(loading.make_builder(config))
  real = getattr(cls, hook)

  def other_process_first(self, *args, **kwargs):
    monkeypatch.setattr(cls, hook, real)
    data.load(config)
    return real(self, *args, **kwargs)

  monkeypatch.setattr(cls, hook, other_process_first)
  ds = data.load(config)
  alone = data.load(_config(**fields, data_dir=str(tmp_path / "alone")))
  np.testing.assert_array_equal(ds.items, alone.items)
  np.testing.assert_array_equal(ds.offsets, alone.offsets)
  assert ds.card["users"] == 50 and ds.num_items == alone.num_items
  assert len(_prepared_versions(tmp_path / "shared")) == 1


def test_synthetic_is_learnable():
  raw = synthetic.generate(synthetic.SyntheticParams(
      num_users=2000, num_items=300, mean_len=30, seed=3))
  users, items = raw.users, raw.items
  last = np.flatnonzero(np.append(users[1:] != users[:-1], True))
  targets, contexts = items[last], items[last - 1]
  # Fit on transitions within users, except those into each last item.
  train = np.ones(len(items) - 1, bool)
  train[last[:-1]] = False
  train[last - 1] = False
  bigram = np.zeros((301, 301))
  np.add.at(bigram, (items[:-1][train], items[1:][train]), 1)
  popularity = np.bincount(np.delete(items, last), minlength=301) + 0.0

  def hit_rate(scores):  # [users, items + 1] -> HR@10
    top = np.argsort(-scores, axis=1)[:, :10]
    return np.mean(np.any(top == targets[:, None], axis=1))

  pop_hr = hit_rate(np.broadcast_to(popularity, (len(targets), 301)))
  bigram_hr = hit_rate(bigram[contexts] + 1e-6 * popularity)
  assert bigram_hr > pop_hr + 0.2, (bigram_hr, pop_hr)


# --- Strict parsing and clean failure. ---

_GOOD_DAT = b"1::10::5::100\n1::20::3::101\n1::30::4::102\n"
_BAD_INPUTS = {
    "wrong_field_count": (b"1::10::5::100\n1::20::3\n1::30::4::102\n", 2,
                          "expected 4 fields"),
    "non_numeric": (b"1::10::5::100\n1::2O::3::101\n", 2, "unexpected"),
    "negative_id": (b"1::10::5::100\n1::20::3::101\n-1::30::4::102\n", 3,
                    "negative"),
    "truncated": (b"1::10::5::100\n1::20::3::101\n1::30::4", 3, "truncated"),
    "empty_field": (b"1::10::5::100\n1::::3::101\n", 2, "empty field"),
    "blank_line": (b"1::10::5::100\n\n1::20::3::101\n", 2, "empty line"),
    "float_id": (b"1::10.5::5::100\n", 1, "integer"),
    "empty_file": (b"", 1, "empty file"),
}


@pytest.mark.parametrize("case", sorted(_BAD_INPUTS))
def test_malformed_ratings_fail_cleanly(tmp_path, case):
  content, line, what = _BAD_INPUTS[case]
  manual, data_dir = tmp_path / "manual", str(tmp_path / "tfds")
  path = _write(manual / "ml-1m/ratings.dat", content)
  config = _config(name="ml-1m", manual_dir=str(manual), data_dir=data_dir)
  with pytest.raises(data.DataError) as error:
    data.load(config)
  message = str(error.value)
  assert message.startswith(f"{path}:{line}: "), message
  assert what in message and "\n" not in message
  assert not _prepared_versions(data_dir)

  path.write_bytes(_GOOD_DAT)
  assert data.load(config).num_users == 1


def test_s3rec_user_without_items_fails_cleanly(tmp_path):
  manual, data_dir = tmp_path / "manual", str(tmp_path / "tfds")
  path = _write(manual / "amazon-s3rec/Beauty.txt",
                b"1 5 6 7\n2\n3 5 6 7 8\n")
  config = _config(name="beauty", manual_dir=str(manual), data_dir=data_dir)
  with pytest.raises(data.DataError, match=f"^{path}:2: user has no items"):
    data.load(config)
  assert not _prepared_versions(data_dir)
  path.write_bytes(b"1 5 6 7\n2 5 6 8\n3 5 6 7 8\n")
  assert data.load(config).num_users == 3


def test_parser_reports_line_across_chunks(monkeypatch):
  monkeypatch.setattr(parsing, "_CHUNK_BYTES", 16)
  text = b"".join(b"%d %d\n" % (u, u + 1) for u in range(1, 40))
  raw = parsing.parse_pairs(text, "x.txt")
  np.testing.assert_array_equal(raw.users, np.arange(1, 40))
  with pytest.raises(data.DataError, match=r"^x\.txt:31: expected 2 fields"):
    parsing.parse_pairs(text.replace(b"31 32\n", b"31\n"), "x.txt")


# --- Missing files, bad configs. ---


def test_missing_file_offline_names_expected_path(tmp_path, monkeypatch):
  def offline(*args, **kwargs):
    raise urllib.error.URLError("no network")

  monkeypatch.setattr(urllib.request, "urlopen", offline)
  config = _config(name="ml-1m", manual_dir=str(tmp_path / "empty"),
                   data_dir=str(tmp_path / "tfds"))
  with pytest.raises(data.DataError) as error:
    data.load(config)
  message = str(error.value)
  assert "download of https://files.grouplens.org" in message
  assert str(tmp_path / "empty" / "ml-1m" / "ratings.dat") in message
  assert "ml-1m.zip" in message
  assert not _prepared_versions(str(tmp_path / "tfds"))


def test_missing_file_without_url_names_expected_path(tmp_path, monkeypatch):
  monkeypatch.delenv("RECATTN_MANUAL_DIR", raising=False)
  with pytest.raises(data.DataError,
                     match="ml-1m-bert4rec-preprocessed/ml-1m.seq.txt.*"
                           "RECATTN_MANUAL_DIR"):
    data.load(_config(name="ml-1m-seq", data_dir=str(tmp_path)))


@pytest.mark.parametrize(
    "fields, match",
    [
        ({"name": "ml-2m"}, "data.name='ml-2m'; allowed: ml-1m, "),
        ({"name": "synthetic", "min_item_count": -1}, "data.min_item_count"),
        ({"name": "synthetic", "min_user_count": 2.5}, "data.min_user_count"),
        ({"name": "synthetic", "synthetic_mean_len": 1}, "synthetic_mean_len"),
        ({"name": "synthetic", "min_rating": 4}, "data.min_rating=4 but"),
    ],
)
def test_bad_config_names_field(tmp_path, fields, match):
  with pytest.raises(data.DataError, match=match):
    data.load(_config(data_dir=str(tmp_path), **fields))


def test_data_dir_inside_manual_dir_is_refused(tmp_path):
  with pytest.raises(data.DataError, match="data.data_dir=.*inside"):
    data.load(_config(name="ml-100k", manual_dir=str(tmp_path),
                      data_dir=str(tmp_path / "cache")))


def test_attributes_only_where_a_file_has_them(manual_dir, data_dir):
  config = _config(name="ml-100k", manual_dir=manual_dir, data_dir=data_dir)
  with pytest.raises(data.DataError, match="allowed: beauty, ml-1m, "
                     "ml-1m-partial, ml-1m-seq, sports, toys$"):
    data.load_item_attributes(config, data.load(config))


def test_ml1m_seq_attributes_are_genres_and_decade(manual_dir, data_dir):
  config = _config(name="ml-1m-seq", manual_dir=manual_dir, data_dir=data_dir)
  ds = data.load(config)
  attr_ids, num_attrs = data.load_item_attributes(config, ds)
  assert attr_ids.shape == (ds.num_items + 1, 7)  # At most 6 genres + decade.
  assert not attr_ids[0].any()
  genres = len(parsing.MOVIELENS_GENRES)
  counts = (attr_ids[1:] > 0).sum(1)
  assert counts.min() == 2  # Every movie: at least one genre and a decade.
  # The decade is each row's last attribute, after 1-6 genres (ids + 1).
  decade = attr_ids[1:][np.arange(ds.num_items), counts - 1]
  assert np.all(decade > genres)
  assert np.all(attr_ids[1:, 0] <= genres)
  # movies.dat line 1 is "1::Toy Story (1995)::Animation|Children's|Comedy";
  # dense item ids follow sorted original ids, so movie 1 is item 1.
  np.testing.assert_array_equal(attr_ids[1, :4], [3, 4, 5, 1 + genres + 9])
  assert num_attrs == attr_ids.max() + 1


@pytest.mark.parametrize("line, error", [
    (b"7::Sabrina (1995)::Comedy|Romantik", "unknown genre 'Romantik'"),
    (b"7::Sabrina::Comedy", "title 'Sabrina' does not end with a year"),
    (b"7::Sabrina (1995)", "expected MovieID::Title::Genres, got 2 fields"),
    (b"x7::Sabrina (1995)::Comedy", "MovieID 'x7' is not a number"),
    (b"1::Again (1995)::Comedy", "movie 1 already has a line"),
])
def test_malformed_movies_name_file_and_line(tmp_path, line, error):
  manual, data_dir = tmp_path / "manual", str(tmp_path / "tfds")
  _write(manual / "ml-1m/ratings.dat", _RATINGS_DAT)
  path = _write(manual / "ml-1m/movies.dat",
                b"1::Toy Story (1995)::Animation\n" + line + b"\n")
  config = _config(name="ml-1m", manual_dir=str(manual), data_dir=data_dir)
  with pytest.raises(data.DataError, match=f"^{path}:2: {re.escape(error)}"):
    data.load_item_attributes(config, data.load(config))


def test_ml1m_attributes_from_the_zip(tmp_path):
  manual = tmp_path / "manual"
  manual.mkdir()
  with zipfile.ZipFile(manual / "ml-1m.zip", "w") as archive:
    archive.writestr("ml-1m/ratings.dat", _RATINGS_DAT)
    archive.writestr("ml-1m/movies.dat", "\n".join([
        "10::Un film (1932)::Drama|War", "20::Zw\u00f6lf (2000)::Comedy",
        "30::Three (1999)::Film-Noir", "40::Four (1919)::Western"]).encode(
            "latin-1"))
  config = _config(name="ml-1m", manual_dir=str(manual),
                   data_dir=str(tmp_path / "tfds"))
  attr_ids, num_attrs = data.load_item_attributes(config, data.load(config))
  # Items 10, 20, 30, 40 -> 1..4; genre ids + 1, then 19 + decade index.
  np.testing.assert_array_equal(
      attr_ids, [[0, 0, 0], [8, 17, 22], [5, 29, 0], [10, 28, 0], [18, 20, 0]])
  assert num_attrs == 30


def test_attributes_follow_filtered_item_ids(tmp_path):
  manual, data_dir = tmp_path / "manual", str(tmp_path / "tfds")
  # Item 6 occurs once and is dropped by min_item_count=2: dense ids 5->1, 7->2.
  _write(manual / "amazon-s3rec/Beauty.txt", b"1 5 6 7\n2 5 7 5\n")
  _write(manual / "amazon-s3rec/Beauty_item2attributes.json",
         b'{"5": [0, 3], "6": [1], "7": [2]}')
  config = _config(name="beauty", manual_dir=str(manual), data_dir=data_dir,
                   min_item_count=2)
  ds = data.load(config)
  attr_ids, num_attrs = data.load_item_attributes(config, ds)
  np.testing.assert_array_equal(attr_ids, [[0, 0], [1, 4], [3, 0]])
  assert num_attrs == 5


def test_malformed_attributes_name_file_and_line(tmp_path):
  manual, data_dir = tmp_path / "manual", str(tmp_path / "tfds")
  _write(manual / "amazon-s3rec/Beauty.txt", b"1 5 6 7\n")
  path = _write(manual / "amazon-s3rec/Beauty_item2attributes.json",
                b'{"5": [0],\n "6": [1,}')
  config = _config(name="beauty", manual_dir=str(manual), data_dir=data_dir)
  ds = data.load(config)
  with pytest.raises(data.DataError, match=f"^{path}:2: "):
    data.load_item_attributes(config, ds)
