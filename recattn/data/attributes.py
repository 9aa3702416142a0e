"""Item side features: categorical attributes of each item.

S3-Rec's category and brand ids (`beauty`, `sports`, `toys`), and MovieLens
genres plus release decade from ML-1M's movies.dat (`ml-1m`, `ml-1m-seq`,
`ml-1m-partial`).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from recattn.data import loading
from recattn.data import sources
from recattn.data.dataset import SequenceDataset


def load_item_attributes(
    data_config: Any, dataset: SequenceDataset
) -> tuple[np.ndarray, int]:
  """Loads the dataset's item attributes aligned with its item ids.

  Works after any filtering: each dataset item is looked up by its original
  id, kept in the prepared dataset's metadata. Attribute ids are shifted by
  one so that 0 can pad; an item missing from the file gets no attributes.

  Args:
    data_config: The config `dataset` was loaded with.
    dataset: The loaded dataset (one of `sources.attribute_datasets()`).

  Returns:
    attr_ids: [num_items + 1, max_attrs] int32; row i holds item i's
      attribute ids + 1, padded with 0; row 0 (the padding item) is all 0.
    num_attrs: Attribute vocabulary size including padding (max id + 1).

  Raises:
    DataError: dataset without attributes, or a malformed file.
  """
  name = loading.dataset_name(data_config)
  manual_dir, data_dir = loading.resolve_dirs(data_config)
  table, _ = sources.read_item_attributes(
      name, manual_dir=manual_dir, download_dir=f"{data_dir}/downloads",
      download=data_config.get("download", True))
  item_ids = loading.original_item_ids(data_config)
  assert len(item_ids) == dataset.num_items, "config does not match dataset"
  rows = [table.get(int(item), []) for item in item_ids]
  max_attrs = max(1, max(len(row) for row in rows))
  attr_ids = np.zeros((dataset.num_items + 1, max_attrs), np.int32)
  for i, row in enumerate(rows, start=1):
    attr_ids[i, :len(row)] = np.asarray(row, np.int32) + 1
  return attr_ids, int(attr_ids.max()) + 1
