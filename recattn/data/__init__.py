"""Data layer: raw files -> TFDS array_record cache -> `SequenceDataset`.

Public API:
  load(data_config) -> SequenceDataset
  load_item_attributes(data_config, dataset) -> (attr_ids, num_attrs)
  SequenceDataset, DataError, DATASET_NAMES
"""

from recattn.data.attributes import load_item_attributes
from recattn.data.dataset import DataError
from recattn.data.dataset import SequenceDataset
from recattn.data.loading import DATASET_NAMES
from recattn.data.loading import load

__all__ = [
    "DATASET_NAMES",
    "DataError",
    "SequenceDataset",
    "load",
    "load_item_attributes",
]
