"""`load(data_config)`: config -> prepared (cached) `SequenceDataset`.

Config fields read (all optional except `name`; defaults in `_DEFAULTS`):
  name            one of `DATASET_NAMES`.
  manual_dir      raw files; "" -> $RECATTN_MANUAL_DIR.
  data_dir        prepared datasets; "" -> $RECATTN_DATA_DIR, else
                  ~/.cache/recattn/tfds. Must not lie inside manual_dir.
  download        try pinned URLs when a raw file is missing (default True).
  min_rating      keep ratings >= this; 0 keeps all (default 0).
  min_item_count  drop items with fewer interactions (default 0).
  min_user_count  drop users with fewer interactions after the item filter
                  (default 3: leave-one-out needs train, valid and test items).
  synthetic_num_users / synthetic_num_items / synthetic_mean_len /
  synthetic_seed / synthetic_zipf  synthetic only (defaults 1000 / 500 / 30 /
                  0 / 0.8; zipf is the popularity exponent).
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
# TFDS's own copy of the proto, so reading needs no TensorFlow.
from tensorflow_datasets.proto import tf_example_pb2

from recattn.data.builders import BUILDERS
from recattn.data.builders import make_config
from recattn.data.builders import ORIGINAL_ITEM_IDS
from recattn.data.builders import SequenceBuilder
from recattn.data.dataset import DataError
from recattn.data.dataset import SequenceDataset
from recattn.data.dataset import shard_card
from recattn.data.dataset import shard_users
from recattn.data.preprocessing import DEFAULT_MIN_USER_COUNT
from recattn.data.preprocessing import Preprocessing
from recattn.data.synthetic import SyntheticParams

DATASET_NAMES = tuple(BUILDERS)
_DEFAULTS: dict[str, Any] = {
    "manual_dir": "",
    "data_dir": "",
    "download": True,
    "min_rating": 0.0,
    "min_item_count": 0,
    "min_user_count": DEFAULT_MIN_USER_COUNT,
    "synthetic_num_users": 1000,
    "synthetic_num_items": 500,
    "synthetic_mean_len": 30.0,
    "synthetic_seed": 0,
    "synthetic_zipf": 0.8,
}
_DEFAULT_DATA_DIR = "~/.cache/recattn/tfds"


def _field(data_config: Any, field: str, kind: type) -> Any:
  """Reads a config field, checking its type; bools are not numbers here."""
  value = data_config.get(field, _DEFAULTS.get(field))
  numeric = kind in (int, float)
  ok = isinstance(value, kind) or (kind is float and isinstance(value, int))
  if value is None or (numeric and isinstance(value, bool)) or not ok:
    raise DataError(f"data.{field}={value!r}; allowed: a {kind.__name__}")
  if numeric and value < 0:
    raise DataError(f"data.{field}={value!r}; allowed: a value >= 0")
  return kind(value)


def dataset_name(data_config: Any) -> str:
  name = data_config.get("name", None)
  if name not in BUILDERS:
    raise DataError(
        f"data.name={name!r}; allowed: {', '.join(DATASET_NAMES)}")
  return name


def resolve_dirs(data_config: Any) -> tuple[str, str]:
  """Returns (manual_dir or "", data_dir), applying env fallbacks."""
  manual_dir = (_field(data_config, "manual_dir", str)
                or os.environ.get("RECATTN_MANUAL_DIR", ""))
  data_dir = (_field(data_config, "data_dir", str)
              or os.environ.get("RECATTN_DATA_DIR", "")
              or _DEFAULT_DATA_DIR)
  if manual_dir:
    manual_dir = os.path.abspath(os.path.expanduser(manual_dir))
  data_dir = os.path.abspath(os.path.expanduser(data_dir))
  # The staged raw data is read-only in CI and must never receive caches.
  if manual_dir and os.path.commonpath([manual_dir, data_dir]) == manual_dir:
    raise DataError(f"data.data_dir={data_dir!r} lies inside manual_dir "
                    f"{manual_dir!r}; allowed: a writable folder outside it")
  return manual_dir, data_dir


def make_builder(data_config: Any) -> SequenceBuilder:
  """Returns the TFDS builder for `data_config` (nothing is prepared yet)."""
  name = dataset_name(data_config)
  manual_dir, data_dir = resolve_dirs(data_config)
  prep = Preprocessing(
      min_rating=_field(data_config, "min_rating", float),
      min_item_count=_field(data_config, "min_item_count", int),
      min_user_count=_field(data_config, "min_user_count", int),
  )
  synthetic_params = None
  if name == "synthetic":
    synthetic_params = SyntheticParams(
        num_users=_field(data_config, "synthetic_num_users", int),
        num_items=_field(data_config, "synthetic_num_items", int),
        mean_len=_field(data_config, "synthetic_mean_len", float),
        seed=_field(data_config, "synthetic_seed", int),
        zipf=_field(data_config, "synthetic_zipf", float),
    )
    synthetic_params.validate()
  return BUILDERS[name](
      data_dir=data_dir,
      config=make_config(prep, synthetic_params),
      file_format="array_record",
      manual_dir=manual_dir,
      download=_field(data_config, "download", bool),
  )


def _read_prepared(builder: SequenceBuilder,
                   shard: tuple[int, int] | None = None) -> tuple[
                       np.ndarray, np.ndarray, np.ndarray | None]:
  """Reads the records in one bulk call; returns (items, offsets, times).

  TFDS's generic per-feature decoding costs ~60 us a record (2 s for Video's
  31k users); reading raw bytes and taking the int64 lists straight out of the
  `tf.train.Example` protos is ~4x faster. Counts are checked against the card
  so a format change in TFDS cannot go unnoticed.

  With `shard=(index, count)` only the records of that shard's users
  (`dataset.shard_users`) are read: record i is user i, and array_record
  reads by index, so a process of a P-process run reads 1/P of the data.
  """
  source = builder.as_data_source(
      split="train", deserialize_method=tfds.decode.DeserializeMethod.RAW_BYTES)
  card = builder.info.metadata
  wanted = (np.arange(len(source)) if shard is None
            else shard_users(len(source), *shard))
  records = source.__getitems__(wanted.tolist())
  users, lengths, items, times = [], [], [], []
  for record in records:
    feature = tf_example_pb2.Example.FromString(record).features.feature
    sequence = feature["items"].int64_list.value
    users.append(feature["user"].int64_list.value[0])
    lengths.append(len(sequence))
    items.extend(sequence)
    if card["has_timestamps"]:
      times.extend(feature["timestamps"].int64_list.value)
  if (len(source) != card["users"] or users != wanted.tolist()
      or (shard is None and len(items) != card["interactions"])
      or (card["has_timestamps"] and len(times) != len(items))):
    raise DataError(f"{builder.data_dir}: records do not match the data card; "
                    "delete this folder so it is prepared again")
  offsets = np.zeros(len(records) + 1, np.int64)
  np.cumsum(lengths, out=offsets[1:])
  return (np.array(items, np.int32), offsets,
          np.array(times, np.int64) if card["has_timestamps"] else None)


def original_item_ids(data_config: Any) -> np.ndarray:
  """Returns [num_items] int64: original id of dataset items 1..num_items.

  Raises:
    DataError: if the dataset has not been prepared (call `load` first).
  """
  builder = make_builder(data_config)
  if not builder.is_prepared():
    raise DataError(f"{builder.data_dir} is not prepared; call load() first")
  ids = builder.info.metadata[ORIGINAL_ITEM_IDS]
  if ids is None:  # Synthetic items already are 1..V; see builders.py.
    return np.arange(1, builder.info.metadata["items"] + 1, dtype=np.int64)
  return np.asarray(ids, np.int64)


def load(data_config: Any,
         shard: tuple[int, int] | None = None) -> SequenceDataset:
  """Loads a dataset, preparing it on first use.

  The first call for a (name, preprocessing) pair parses the raw file and
  writes `<data_dir>/<builder>/<config>/<version>/`; later calls only read
  that array_record data.

  Args:
    data_config: `ml_collections.ConfigDict` (or any mapping with `.get`);
      fields in the module docstring.
    shard: `(index, count)`: read only the users `u % count == index`; the
      result equals `load(data_config).shard(index, count)` except that
      `card` has no `time_origin` (it needs every shard's first timestamp;
      the trainer agrees on it across processes).

  Returns:
    The dataset; `card` is the stored data card plus `prepared_dir`.

  Raises:
    DataError: bad config field, missing raw file, or malformed raw data.
  """
  builder = make_builder(data_config)
  if not builder.is_prepared():
    try:
      builder.download_and_prepare(
          download_config=tfds.download.DownloadConfig(
              compute_stats=tfds.download.ComputeStatsMode.SKIP))
    except FileExistsError:
      # Another process (a `--jobs=N` sweep, a second host) prepared the
      # same version while this one did: TFDS removed our copy; use theirs.
      if not make_builder(data_config).is_prepared():
        raise
    # Read back what is on disk, whoever wrote it: a builder made before
    # another process finished has no metadata.
    builder = make_builder(data_config)
  items, offsets, times = _read_prepared(builder, shard)
  card = dict(builder.info.metadata)
  del card[ORIGINAL_ITEM_IDS]  # Up to ~10^5 ids: too big for a card.
  card["prepared_dir"] = os.fspath(builder.data_dir)
  if shard is not None:
    card = shard_card(card, *shard, int(card["users"]), len(offsets) - 1,
                      len(items))
  return SequenceDataset(
      name=card["name"],
      num_items=int(card["items"]),
      items=items,
      offsets=offsets,
      timestamps=times,
      card=card,
  )
