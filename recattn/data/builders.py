"""TFDS builders that prepare each dataset once as array_record.

One builder class per dataset (its directory name under `data_dir`), one
BuilderConfig per preprocessing setting (e.g. `r0_i5_u3`, synthetic:
`n1000_v500_l30_s0_r0_i0_u3`), so differently filtered versions never share a
cache entry: `<data_dir>/<builder>/<config>/<version>/`.

Records hold one user each, in user order (`disable_shuffling`):
  {"user": int64, "items": [L] int32, "timestamps": [L] int64}
where "timestamps" is empty (length 0) when the source has none. The data card
is the builder's `metadata.json` (`info.metadata`), which also keeps the
original id of every dense item id.

The raw file is parsed, validated and preprocessed in `_split_generators`,
before a single record is written, and TFDS prepares into an `incomplete.*`
directory that it removes when preparation raises, so a bad file leaves no
dataset behind.

Built without TensorFlow: TFDS only needs it for `tf.data` pipelines and
statistics, and neither is used (`compute_stats` is skipped by the loader).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from recattn.data import sources
from recattn.data import synthetic
from recattn.data.preprocessing import Preprocessing
from recattn.data.preprocessing import preprocess
from recattn.data.preprocessing import Sequences

# Metadata key of the [num_items] original item ids (for side information).
ORIGINAL_ITEM_IDS = "original_item_ids"
_ORDERING = ("per user by timestamp, stable (ties keep file order); "
             "file order when the source has no timestamps")
_ID_MAPPING = ("users -> 0..U-1 and items -> 1..V in ascending original id; "
               "0 is padding")


@dataclasses.dataclass(eq=False)
class SequenceConfig(tfds.core.BuilderConfig):
  """A preprocessing setting; its name is the dataset's cache identity."""

  preprocessing: Preprocessing = dataclasses.field(
      default_factory=Preprocessing)
  synthetic: synthetic.SyntheticParams | None = None


def make_config(
    prep: Preprocessing, synthetic_params: synthetic.SyntheticParams | None
) -> SequenceConfig:
  name = prep.config_name()
  if synthetic_params is not None:
    name = f"{synthetic_params.config_name()}_{name}"
  return SequenceConfig(
      name=name, preprocessing=prep, synthetic=synthetic_params,
      description=f"Preprocessing {name}.")


class SequenceBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Base builder: one record per user, preprocessed by the config.

  Subclasses set `SOURCE`, a key of `sources.SOURCES` or "synthetic".
  `manual_dir` and `download` say where raw files come from; they do not
  change the content, so they are not part of the config.
  """

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  SOURCE = ""

  def __init__(self, *, manual_dir: str = "", download: bool = True,
               **kwargs: Any):
    self._manual_dir = manual_dir
    self._download = download
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=f"recattn {self.SOURCE} interaction sequences.",
        features=tfds.features.FeaturesDict({
            "user": tfds.features.Scalar(dtype=np.int64),
            "items": tfds.features.Tensor(shape=(None,), dtype=np.int32),
            "timestamps": tfds.features.Tensor(shape=(None,), dtype=np.int64),
        }),
        disable_shuffling=True,
        metadata=tfds.core.MetadataDict(),
    )

  def _read(self) -> tuple[Sequences, list[dict[str, Any]]]:
    config = self.builder_config
    if self.SOURCE == "synthetic":
      raw = synthetic.generate(config.synthetic)
      return preprocess(
          raw, config.preprocessing, name=self.SOURCE,
          declared_num_items=config.synthetic.num_items), []
    raw, files = sources.read_interactions(
        self.SOURCE, manual_dir=self._manual_dir,
        download_dir=os.path.join(self.data_dir_root, "downloads"),
        download=self._download)
    return preprocess(raw, config.preprocessing, name=self.SOURCE), files

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    del dl_manager  # Raw files are found by `sources.fetch`.
    seqs, files = self._read()
    config = self.builder_config
    original_ids = seqs.original_item_ids
    if self.SOURCE == "synthetic" and np.array_equal(
        original_ids, np.arange(1, original_ids.size + 1)):
      # Already 1..V; as a JSON list, V = 10^7 ids would take ~50 s to write
      # and ~100 MB of metadata.json. `original_item_ids()` rebuilds them.
      original_ids = None
    self.info.metadata.update({
        "name": self.SOURCE,
        "builder": self.name,
        "version": str(self.version),
        "config": config.name,
        "preprocessing": dataclasses.asdict(config.preprocessing),
        "synthetic": (None if config.synthetic is None
                      else dataclasses.asdict(config.synthetic)),
        **seqs.stats(),
        "ordering": _ORDERING,
        "id_mapping": _ID_MAPPING,
        "source_files": files,
        # Dense id i+1 <-> original id; `load` keeps this out of the card.
        # None: the identity (synthetic data only).
        ORIGINAL_ITEM_IDS: (None if original_ids is None
                            else original_ids.tolist()),
    })
    return {"train": self._generate_examples(seqs)}

  def _generate_examples(self, seqs: Sequences):
    no_times = np.zeros(0, np.int64)
    for user in range(len(seqs.offsets) - 1):
      span = slice(seqs.offsets[user], seqs.offsets[user + 1])
      yield user, {
          "user": user,
          "items": seqs.items[span],
          "timestamps": (no_times if seqs.timestamps is None
                         else seqs.timestamps[span]),
      }


class Ml1m(SequenceBuilder, skip_registration=True):
  """MovieLens 1M, GroupLens `ratings.dat`."""
  SOURCE = "ml-1m"


class Ml100k(SequenceBuilder, skip_registration=True):
  """MovieLens 100K, GroupLens `u.data`."""
  SOURCE = "ml-100k"


class Ml20m(SequenceBuilder, skip_registration=True):
  """MovieLens 20M, GroupLens `ratings.csv`."""
  SOURCE = "ml-20m"


class Ml1mPartial(SequenceBuilder, skip_registration=True):
  """ML-1M `ratings.dat` lines of users 1..2999 only (real timestamps)."""
  SOURCE = "ml-1m-partial"


class Ml1mSeq(SequenceBuilder, skip_registration=True):
  """All ML-1M interactions, time-ordered, without timestamps (BERT4Rec)."""
  SOURCE = "ml-1m-seq"


class Video(SequenceBuilder, skip_registration=True):
  """Amazon Video Games as preprocessed by SASRec (`Video.txt`)."""
  SOURCE = "video"


class Beauty(SequenceBuilder, skip_registration=True):
  """Amazon Beauty 5-core, S3-Rec preprocessing."""
  SOURCE = "beauty"


class Sports(SequenceBuilder, skip_registration=True):
  """Amazon Sports_and_Outdoors 5-core, S3-Rec preprocessing."""
  SOURCE = "sports"


class Toys(SequenceBuilder, skip_registration=True):
  """Amazon Toys_and_Games 5-core, S3-Rec preprocessing."""
  SOURCE = "toys"


class Synthetic(SequenceBuilder, skip_registration=True):
  """Seeded synthetic sequences (see `recattn.data.synthetic`)."""
  SOURCE = "synthetic"


BUILDERS: dict[str, type[SequenceBuilder]] = {
    cls.SOURCE: cls
    for cls in (Ml1m, Ml100k, Ml20m, Ml1mPartial, Ml1mSeq, Video, Beauty,
                Sports, Toys, Synthetic)
}
