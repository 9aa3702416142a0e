"""Time and peak memory of synthetic data at catalogue scale.

  python experiments/005_synthetic_scale/gen_bench.py \
      --out=experiments/005_synthetic_scale/results_cpu.json

For each item count V in `--num_items` (U users, mean length L, so about
U * L interactions), in a fresh process each so that peak RSS is its own:
  * generate: `synthetic.generate` alone (the random stream and the arrays);
  * prepare (with `--prepare`): the TFDS builder path of `data.load` on an
    empty data_dir, split into `prepare_s` (generate + preprocess + write
    array_record + metadata) and `read_s` (reading the prepared records back
    into a `SequenceDataset`).
Peak RSS is `resource.getrusage(RUSAGE_SELF).ru_maxrss` of that process at
the end of the stage, so it includes the interpreter and imports (~200 MB
with TFDS). One run per point: these are wall times on whatever machine runs
it, not medians.
"""

import datetime
import json
import multiprocessing
import os
import platform
import resource
import shutil
import sys
import tempfile
import time

from absl import app
from absl import flags

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

_OUT = flags.DEFINE_string("out", None, "Where to write the JSON results.")
_NUM_ITEMS = flags.DEFINE_list("num_items", ["1000000", "10000000"],
                               "Item counts V, one point each.")
_NUM_USERS = flags.DEFINE_integer("num_users", 333_334, "Users U.")
_MEAN_LEN = flags.DEFINE_float("mean_len", 30.0, "Mean sequence length.")
_ZIPF = flags.DEFINE_float("zipf", 0.8, "Popularity exponent.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed.")
_PREPARE = flags.DEFINE_bool("prepare", True,
                             "Also prepare through the TFDS builder.")
_DEVICE = flags.DEFINE_string("device", platform.processor() or "cpu",
                              "Device description written to the JSON.")


def _peak_rss_mb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB.


def _generate(fields: dict, queue: multiprocessing.Queue) -> None:
  from recattn.data import synthetic  # pylint: disable=g-import-not-at-top
  params = synthetic.SyntheticParams(**fields)
  start = time.perf_counter()
  raw = synthetic.generate(params)
  seconds = time.perf_counter() - start
  queue.put({"stage": "generate", "seconds": round(seconds, 2),
             "interactions": int(raw.items.size),
             "peak_rss_mb": round(_peak_rss_mb())})


def _prepare(fields: dict, queue: multiprocessing.Queue) -> None:
  # pylint: disable=g-import-not-at-top
  import ml_collections
  import tensorflow_datasets as tfds
  from recattn import data
  from recattn.data import loading
  # pylint: enable=g-import-not-at-top
  data_dir = tempfile.mkdtemp(prefix="recattn_synth_bench_")
  try:
    config = ml_collections.ConfigDict({
        "name": "synthetic", "data_dir": data_dir, "download": False,
        **{f"synthetic_{k}": v for k, v in fields.items()}})
    builder = loading.make_builder(config)
    start = time.perf_counter()
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(
            compute_stats=tfds.download.ComputeStatsMode.SKIP))
    prepare_s = time.perf_counter() - start
    prepare_rss = _peak_rss_mb()
    start = time.perf_counter()
    ds = data.load(config)
    read_s = time.perf_counter() - start
    size = sum(os.path.getsize(os.path.join(root, name))
               for root, _, names in os.walk(data_dir) for name in names)
    queue.put({"stage": "prepare", "prepare_s": round(prepare_s, 2),
               "read_s": round(read_s, 2),
               "users": ds.num_users,
               "interactions": ds.num_interactions,
               "prepared_mb": round(size / 2**20, 1),
               "peak_rss_mb_after_prepare": round(prepare_rss),
               "peak_rss_mb": round(_peak_rss_mb())})
  finally:
    shutil.rmtree(data_dir, ignore_errors=True)


def _run_in_fresh_process(target, fields: dict) -> dict:
  context = multiprocessing.get_context("spawn")
  queue = context.Queue()
  process = context.Process(target=target, args=(fields, queue))
  process.start()
  result = queue.get()
  process.join()
  return result


def main(argv):
  del argv
  # pylint: disable=g-import-not-at-top
  import jax
  import numpy as np
  import tensorflow_datasets as tfds
  # pylint: enable=g-import-not-at-top
  points = []
  for num_items in _NUM_ITEMS.value:
    fields = {"num_users": _NUM_USERS.value, "num_items": int(num_items),
              "mean_len": _MEAN_LEN.value, "seed": _SEED.value,
              "zipf": _ZIPF.value}
    point = {**fields, "generate": _run_in_fresh_process(_generate, fields)}
    print(json.dumps(point), flush=True)
    if _PREPARE.value:
      point["prepare"] = _run_in_fresh_process(_prepare, fields)
      print(json.dumps(point["prepare"]), flush=True)
    points.append(point)
  record = {
      "date": datetime.date.today().isoformat(),
      "device": _DEVICE.value,
      "cpu_count": os.cpu_count(),
      "versions": {"python": platform.python_version(),
                   "numpy": np.__version__, "jax": jax.__version__,
                   "tensorflow_datasets": tfds.__version__},
      "points": points,
  }
  if _OUT.value:
    with open(_OUT.value, "w") as f:
      json.dump(record, f, indent=1)
      f.write("\n")
  print(json.dumps(record, indent=1))


if __name__ == "__main__":
  app.run(main)
