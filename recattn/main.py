"""Entry point.

  python -m recattn.main --config=configs/sasrec_ml1m.py[:arg] \
      --workdir=<dir> [--config.<field>=<value> ...]

Several processes (hosts) add `--coordinator_address=host:port
--num_processes=N --process_id=i`, or `--distributed=auto` where JAX can
read them from the cluster (SLURM, Cloud TPU); see docs/distributed.md.

Parses flags and calls `train.train_and_evaluate`; everything else is a
library importable from notebooks and tests. SIGTERM or SIGINT stops the
run after its current step with a checkpoint and exit status 75
(`recattn.interrupt`); the same command resumes it.
"""

import logging as std_logging

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from recattn import distributed
from recattn import interrupt
from recattn import runlock
from recattn import train

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file (configs/<name>.py[:arg]).",
    lock_config=True)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Run directory: records, checkpoints; a rerun resumes.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None,
    "Multi-process: host:port of process 0 (jax.distributed coordinator).")
_NUM_PROCESSES = flags.DEFINE_integer(
    "num_processes", None, "Multi-process: total number of processes.")
_PROCESS_ID = flags.DEFINE_integer(
    "process_id", None, "Multi-process: this process's index, 0-based.")
_DISTRIBUTED = flags.DEFINE_enum(
    "distributed", "off", ["off", "auto"],
    "auto: jax.distributed detects coordinator, process count and id from "
    "the cluster (SLURM, Cloud TPU, ...); env RECATTN_DISTRIBUTED=1 too.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.INFO)
  # Orbax logs every checkpoint operation at INFO; keep its warnings only.
  quiet = lambda r: r.levelno >= std_logging.WARNING or (
      "/orbax/" not in r.pathname)
  logging.get_absl_logger().addFilter(quiet)
  # Before anything touches devices.
  distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value,
                         _PROCESS_ID.value,
                         auto=_DISTRIBUTED.value == "auto")
  try:
    train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except (train.config_check.ConfigError, train.data_lib.DataError,
          train.NonFiniteLossError, runlock.Busy) as e:
    # One clear line instead of a traceback: the cause is the input (or a
    # training of the same workdir still running).
    raise SystemExit(f"error: {e}") from None
  except interrupt.Interrupted as e:
    # SIGTERM / SIGINT: the state is saved; EXIT_CODE tells a launcher
    # (recattn.sweep, a cluster's requeue) that rerunning resumes.
    logging.warning("interrupted: %s", e)
    raise SystemExit(interrupt.EXIT_CODE) from None


if __name__ == "__main__":
  app.run(main)
