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
      counts, length statistics, source files with their sha256.
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
