"""The in-memory dataset type every model and evaluator reads, and its error."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np


class DataError(ValueError):
  """Bad input data or a bad data config.

  The message is one line that names either `<path>:<line>` of the offending
  input or the config field and its allowed values, so a failed run says what
  to fix without a traceback hunt.
  """


@dataclasses.dataclass(frozen=True)
class SequenceDataset:
  """All users' interaction sequences in CSR layout.

  Attributes:
    name: Dataset name as given in the config, e.g. "ml-1m-seq".
    num_items: Item ids are 1..num_items; 0 is reserved for padding.
    items: [N] int32, every user's sequence concatenated, each in
      chronological order (stable: ties keep the source file's order).
    offsets: [U+1] int64; user u (dense, 0-based) owns
      items[offsets[u]:offsets[u+1]].
    timestamps: [N] int64 unix seconds aligned with `items`, or None when the
      source carries no timestamps.
    card: Data card: name, version, builder config, preprocessing parameters,
      counts, length statistics, source files with their sha256. The counts
      are the whole dataset's; a shard (`shard`) adds `card["shard"]`.
  """

  name: str
  num_items: int
  items: np.ndarray
  offsets: np.ndarray
  timestamps: np.ndarray | None
  card: dict[str, Any]

  @property
  def num_users(self) -> int:
    return len(self.offsets) - 1

  @property
  def num_interactions(self) -> int:
    return len(self.items)

  def sequence(self, user: int) -> np.ndarray:
    """Returns user `user`'s items, [L_u] int32, oldest first."""
    return self.items[self.offsets[user]:self.offsets[user + 1]]

  def lengths(self) -> np.ndarray:
    """Returns [U] int64 sequence lengths."""
    return np.diff(self.offsets)

  def user_ids(self) -> np.ndarray:
    """Returns [U] int64 ids of these users in the whole dataset.

    `0..U-1` for a whole dataset; for a shard, the ids it was cut from, so
    anything keyed by user (evaluation negatives) does not depend on how
    the users were split.
    """
    shard = self.card.get("shard")
    if shard is None:
      return np.arange(self.num_users, dtype=np.int64)
    return shard_users(shard["users_total"], shard["index"], shard["count"])

  def shard(self, index: int, count: int) -> SequenceDataset:
    """The users `u` with `u % count == index`, as a smaller dataset.

    One process's part of a multi-process run (`data.process_shards`): each
    holds and batches only its users. Round robin, not contiguous ranges,
    so shards stay balanced whatever the user order correlates with (ids
    assigned by first appearance, by activity...). `load(..., shard=)`
    reads the same users straight from the prepared records.

    `card["shard"]` records the rule and the shard's counts; `card
    ["time_origin"]` keeps the whole dataset's first timestamp, so relative
    times (`batching.train_times`) are the same in every shard.
    """
    if "shard" in self.card:
      raise ValueError(f"this dataset is already shard {self.card['shard']}")
    users = shard_users(self.num_users, index, count)
    lengths = self.lengths()[users]
    offsets = np.zeros(len(users) + 1, np.int64)
    np.cumsum(lengths, out=offsets[1:])
    # Positions of every kept item, user by user.
    pos = (np.repeat(self.offsets[:-1][users] - offsets[:-1], lengths)
           + np.arange(offsets[-1]))
    card = shard_card(self.card, index, count, self.num_users,
                      len(users), int(offsets[-1]))
    if self.timestamps is not None and "time_origin" not in card:
      card["time_origin"] = (int(self.timestamps.min())
                             if len(self.timestamps) else 0)
    return SequenceDataset(
        name=self.name, num_items=self.num_items, items=self.items[pos],
        offsets=offsets,
        timestamps=None if self.timestamps is None else self.timestamps[pos],
        card=card)


def shard_users(num_users: int, index: int, count: int) -> np.ndarray:
  """Ids of the users of shard `index` of `count`: `u % count == index`."""
  if not 0 <= index < count:
    raise ValueError(f"shard index {index} of {count}: allowed 0..{count - 1}")
  return np.arange(index, num_users, count, dtype=np.int64)


def shard_card(card: dict[str, Any], index: int, count: int,
               users_total: int, users: int, interactions: int) -> dict:
  """`card` plus `card["shard"]`: which users a shard holds, and how many."""
  return {**card, "shard": {"index": index, "count": count,
                            "rule": "user % count == index",
                            "users_total": users_total, "users": users,
                            "interactions": interactions}}


@dataclasses.dataclass(frozen=True)
class StreamEvents:
  """The newest interactions of a dataset, in global time order.

  Attributes:
    users: `[N]` user index in the whole dataset.
    items: `[N]` item ids.
    times: `[N]` int64 unix seconds.
    index: `[N]` position of each event in its user's sequence.
  """

  users: np.ndarray
  items: np.ndarray
  times: np.ndarray
  index: np.ndarray


def time_split(ds: SequenceDataset, fraction: float):
  """Holds out the newest `fraction` of all interactions, for a replay.

  Events are ordered by timestamp, ties by their place in the data (user
  by user, each user's sequence already in time order with a stable
  tie-break), so the held-out events of each user are a suffix of its
  sequence and the split is deterministic. Returns `(prefix, events)`:
  `prefix` holds every user's remaining history, minus users left with
  fewer than 3 events (leave-one-out needs 3; such users start the replay
  with the history they have); `prefix.card["time_split"]` records the
  split. `events` (StreamEvents) are the held-out ones, oldest first.

  Raises:
    DataError: no timestamps, or `fraction` outside (0, 1).
  """
  if ds.timestamps is None:
    raise DataError(f"data.stream_holdout needs timestamps; {ds.name} has "
                    "none (use ml-100k, ml-1m, ml-1m-partial, ml-20m or "
                    "synthetic)")
  if not 0.0 < fraction < 1.0:
    raise DataError(f"config.data.stream_holdout={fraction!r}: must be in "
                    "(0, 1) (0 = off)")
  n = len(ds.items)
  held = int(round(n * fraction))
  order = np.argsort(ds.timestamps, kind="stable")[n - held:]
  lengths = ds.lengths()
  owner = np.repeat(np.arange(ds.num_users), lengths)
  index = np.arange(n) - np.repeat(ds.offsets[:-1], lengths)
  events = StreamEvents(users=owner[order], items=ds.items[order],
                        times=ds.timestamps[order], index=index[order])
  keep_event = np.ones(n, bool)
  keep_event[order] = False
  prefix_len = np.bincount(owner[keep_event], minlength=ds.num_users)
  kept_users = np.flatnonzero(prefix_len >= 3)
  mask = keep_event & np.isin(owner, kept_users)
  offsets = np.zeros(len(kept_users) + 1, np.int64)
  np.cumsum(prefix_len[kept_users], out=offsets[1:])
  card = {**ds.card, "time_split": {
      "fraction": fraction, "held_out": held,
      "first_held_out_time": int(events.times[0]) if held else None,
      "users_kept": int(len(kept_users)),
      "rule": "newest fraction of all interactions by (timestamp, data "
              "order); users with < 3 remaining events dropped"}}
  prefix = SequenceDataset(name=ds.name, num_items=ds.num_items,
                           items=ds.items[mask], offsets=offsets,
                           timestamps=ds.timestamps[mask], card=card)
  return prefix, events
