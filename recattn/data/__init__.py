"""Data layer: raw files -> TFDS array_record cache -> `SequenceDataset`.

Public API:
  load(data_config) -> SequenceDataset
  load_item_attributes(data_config, dataset) -> (attr_ids, num_attrs)
  SequenceDataset, DataError, DATASET_NAMES, ATTRIBUTE_DATASETS
"""

from recattn.data.attributes import load_item_attributes
from recattn.data.dataset import DataError
from recattn.data.dataset import SequenceDataset
from recattn.data.loading import DATASET_NAMES
from recattn.data.loading import load
from recattn.data.sources import attribute_datasets

# Datasets whose items have categorical attributes (`model.item_features`).
ATTRIBUTE_DATASETS = attribute_datasets()

__all__ = [
    "ATTRIBUTE_DATASETS",
    "DATASET_NAMES",
    "DataError",
    "SequenceDataset",
    "load",
    "load_item_attributes",
]
