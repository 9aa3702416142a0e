"""Entry point.

  python -m recattn.main --config=configs/sasrec_ml1m.py[:arg] \
      --workdir=<dir> [--config.<field>=<value> ...]

Parses flags and calls `train.train_and_evaluate`; everything else is a
library importable from notebooks and tests.
"""

import logging as std_logging

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from recattn import train

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file (configs/<name>.py[:arg]).",
    lock_config=True)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Run directory: records, checkpoints; a rerun resumes.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.INFO)
  # Orbax logs every checkpoint operation at INFO; keep its warnings only.
  quiet = lambda r: r.levelno >= std_logging.WARNING or (
      "/orbax/" not in r.pathname)
  logging.get_absl_logger().addFilter(quiet)
  try:
    train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except (train.config_check.ConfigError, train.data_lib.DataError,
          train.NonFiniteLossError) as e:
    # One clear line instead of a traceback: the cause is the input.
    raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
  app.run(main)
