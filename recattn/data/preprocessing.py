"""Filtering, chronological ordering and id remapping of raw interactions.

The choices here define what a dataset *is*, so they are part of its identity
(the TFDS BuilderConfig name) and are written into its data card:

* Filters run once, in this order, as SASRec does (no iteration to a k-core):
  ratings >= `min_rating` (rated sources only), then items with >=
  `min_item_count` interactions, then users with >= `min_user_count`
  interactions left after the item filter.
* Order: each user's interactions are sorted by timestamp with a stable sort,
  so equal timestamps keep the source file's order. Sources without
  timestamps keep file order.
* Ids: users are remapped to 0..U-1 and items to 1..V (0 = padding), both in
  ascending order of the original id. For the Amazon/SASRec files, whose ids
  already are 1..V, this is the identity, so ids stay comparable with the
  published files and their item attribute tables.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from recattn.data.dataset import DataError
from recattn.data.parsing import RawInteractions

# Leave-one-out needs a training item, a validation item and a test item.
DEFAULT_MIN_USER_COUNT = 3


@dataclasses.dataclass(frozen=True)
class Preprocessing:
  """Parameters that change the dataset's content.

  Attributes:
    min_rating: Keep ratings >= this; 0 keeps all (implicit feedback).
    min_item_count: Drop items with fewer interactions (single pass).
    min_user_count: Drop users with fewer interactions after item filtering.
  """

  min_rating: float = 0.0
  min_item_count: int = 0
  min_user_count: int = DEFAULT_MIN_USER_COUNT

  def config_name(self) -> str:
    """Short, filesystem-safe identity, e.g. "r0_i5_u3" or "r3p5_i0_u3"."""
    rating = f"{self.min_rating:g}".replace(".", "p")
    return f"r{rating}_i{self.min_item_count}_u{self.min_user_count}"


@dataclasses.dataclass(frozen=True)
class Sequences:
  """Preprocessed sequences in CSR layout (see `SequenceDataset`)."""

  items: np.ndarray  # [N] int32 in 1..num_items
  offsets: np.ndarray  # [U+1] int64
  timestamps: np.ndarray | None  # [N] int64
  num_items: int
  original_item_ids: np.ndarray  # [num_items] original id of items 1..V

  def stats(self) -> dict[str, Any]:
    lengths = np.diff(self.offsets)
    return {
        "users": int(lengths.size),
        "items": int(self.num_items),
        "interactions": int(self.items.size),
        "mean_len": round(float(lengths.mean()), 4),
        "max_len": int(lengths.max()),
        "min_len": int(lengths.min()),
        "has_timestamps": self.timestamps is not None,
    }


def _keep(raw: RawInteractions, mask: np.ndarray) -> RawInteractions:
  return RawInteractions(
      users=raw.users[mask],
      items=raw.items[mask],
      ratings=None if raw.ratings is None else raw.ratings[mask],
      timestamps=None if raw.timestamps is None else raw.timestamps[mask],
  )


def _count_of_each(ids: np.ndarray) -> np.ndarray:
  """Returns [N]: how often ids[n] occurs in `ids`."""
  _, inverse, counts = np.unique(ids, return_inverse=True, return_counts=True)
  return counts[inverse]


def preprocess(
    raw: RawInteractions,
    prep: Preprocessing,
    *,
    name: str,
    declared_num_items: int | None = None,
) -> Sequences:
  """Filters, orders and remaps `raw` into per-user sequences.

  Args:
    raw: Interactions in file order with original ids.
    prep: Filter parameters.
    name: Dataset name, for error messages.
    declared_num_items: For sources whose item ids already are 1..V by
      construction (synthetic data): keep those ids and report V items even if
      some never occur, unless `min_item_count` filters items.

  Returns:
    The sequences.

  Raises:
    DataError: if a filter cannot apply or leaves nothing.
  """
  if prep.min_rating > 0:
    if raw.ratings is None:
      raise DataError(
          f"data.min_rating={prep.min_rating:g} but {name} has no ratings; "
          "allowed: 0 for implicit-feedback sources")
    raw = _keep(raw, raw.ratings >= prep.min_rating)
  if prep.min_item_count > 0:
    raw = _keep(raw, _count_of_each(raw.items) >= prep.min_item_count)
  if prep.min_user_count > 0 and raw.users.size:
    raw = _keep(raw, _count_of_each(raw.users) >= prep.min_user_count)
  if raw.users.size == 0:
    raise DataError(
        f"{name}: no interactions left after filtering with "
        f"data.min_rating={prep.min_rating:g}, "
        f"data.min_item_count={prep.min_item_count}, "
        f"data.min_user_count={prep.min_user_count}")

  # Two stable sorts: by time, then by user, keeps file order among ties.
  order = np.arange(raw.users.size)
  if raw.timestamps is not None:
    order = np.argsort(raw.timestamps, kind="stable")
  order = order[np.argsort(raw.users[order], kind="stable")]
  users = raw.users[order]
  items = raw.items[order]
  timestamps = None if raw.timestamps is None else raw.timestamps[order]

  _, user_index = np.unique(users, return_inverse=True)
  offsets = np.zeros(user_index.max() + 2, np.int64)
  np.cumsum(np.bincount(user_index), out=offsets[1:])

  if declared_num_items is not None and prep.min_item_count == 0:
    item_ids = np.arange(1, declared_num_items + 1)
    dense_items = items.astype(np.int32)
  else:
    item_ids, item_index = np.unique(items, return_inverse=True)
    dense_items = (item_index + 1).astype(np.int32)
  return Sequences(
      items=dense_items,
      offsets=offsets,
      timestamps=timestamps,
      num_items=int(item_ids.size),
      original_item_ids=item_ids,
  )
