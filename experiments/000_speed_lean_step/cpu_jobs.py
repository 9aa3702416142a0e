"""Training throughput on this CPU: one run at a time against several at once.

  RECATTN_MANUAL_DIR=../shared/data python experiments/000_speed_lean_step/cpu_jobs.py \
      --config=configs/hstu_ml1m.py:large --epochs=3 \
      --out=experiments/000_speed_lean_step/cpu_jobs_hstu_cpu.json

`recattn.sweep --jobs=N` trains N runs side by side. Whether that helps on a
CPU depends on how much of the cores one training leaves idle (XLA:CPU runs
many small fused loops on one thread). For each mode this starts `jobs`
copies of `recattn.main` (seeds 0..jobs-1, `--epochs` epochs, no
evaluation), takes each copy's median `train/epoch_s` after its first epoch
(compilation) and reports runs per hour of the whole machine:

  * `alone`: one training, XLA's default threads (the studies' setting);
  * `pair`: two trainings at once, default threads;
  * `pair_pinned`: two trainings, each on one core (`taskset`) with XLA's
    Eigen thread pool off (`--xla_cpu_multi_thread_eigen=false`).

The copies train the same config on the same data, so they overlap for all
their timed epochs. Time comparisons inside a study stay `--jobs=1`.
"""

import json
import os
import platform
import subprocess
import sys
import tempfile
import time

from absl import app
from absl import flags
import numpy as np

_CONFIG = flags.DEFINE_string("config", "configs/sasrec_ml1m.py",
                              "Config file (and :arg) to train.")
_EPOCHS = flags.DEFINE_integer("epochs", 3, "Epochs per training; the first "
                               "(compilation) is not timed.")
_MODES = flags.DEFINE_list("modes", ["alone", "pair", "pair_pinned"],
                           "Modes to measure, in order.")
_OUT = flags.DEFINE_string("out", None, "Where to write the JSON results.")

MODES = {  # name -> (trainings at once, pinned to one core each)
    "alone": (1, False),
    "pair": (2, False),
    "pair_pinned": (2, True),
}
ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")


def _command(workdir: str, seed: int) -> list[str]:
  return [sys.executable, "-m", "recattn.main", f"--config={_CONFIG.value}",
          f"--workdir={workdir}", f"--config.seed={seed}",
          f"--config.num_epochs={_EPOCHS.value}",
          "--config.eval.select_metric=none",
          f"--config.checkpoint.every_epochs={_EPOCHS.value}"]


def _epoch_seconds(workdir: str) -> list[float]:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  return [r["train/epoch_s"] for r in rows if "train/epoch_s" in r]


def measure(mode: str, tmp: str) -> dict:
  jobs, pinned = MODES[mode]
  env = dict(os.environ)
  if pinned:
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                        " --xla_cpu_multi_thread_eigen=false").strip()
  cores = sorted(os.sched_getaffinity(0))
  procs, workdirs = [], []
  t0 = time.time()
  for i in range(jobs):
    workdir = os.path.join(tmp, f"{mode}_{i}")
    cmd = _command(workdir, i)
    if pinned:
      cmd = ["taskset", "-c", str(cores[i % len(cores)])] + cmd
    # A log file, not a pipe: a full pipe would stall a training while
    # another is waited on.
    with open(f"{workdir}.log", "w") as log:
      procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env,
                                    stdout=log, stderr=subprocess.STDOUT))
    workdirs.append(workdir)
  for p, workdir in zip(procs, workdirs):
    if p.wait():
      with open(f"{workdir}.log") as log:
        tail = log.read()[-3000:]
      raise RuntimeError(f"{mode}: training exited {p.returncode}:\n{tail}")
  wall = time.time() - t0
  epochs = [_epoch_seconds(w) for w in workdirs]
  medians = [float(np.median(e[1:])) for e in epochs]
  return {
      "jobs": jobs, "pinned": pinned, "wall_s": wall,
      "epoch_s": epochs,
      "median_epoch_s": medians,
      # epochs per hour of the machine, all trainings together
      "epochs_per_hour": float(sum(3600.0 / m for m in medians)),
  }


def main(argv):
  del argv
  unknown = [m for m in _MODES.value if m not in MODES]
  if unknown:
    raise app.UsageError(f"--modes: unknown {unknown}; valid: {sorted(MODES)}")
  if _EPOCHS.value < 2:
    raise app.UsageError("--epochs must be >= 2 (the first is not timed)")
  commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                          capture_output=True, text=True).stdout.strip()
  results = {"config": _CONFIG.value, "epochs": _EPOCHS.value,
             "commit": commit or os.environ.get("RECATTN_COMMIT", ""),
             "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
             "cpu_count": os.cpu_count(), "platform": platform.platform(),
             "modes": {}}
  with tempfile.TemporaryDirectory() as tmp:
    for mode in _MODES.value:
      results["modes"][mode] = r = measure(mode, tmp)
      print(f"{mode}: median epoch {r['median_epoch_s']} s, "
            f"{r['epochs_per_hour']:.1f} epochs/hour", flush=True)
  base = results["modes"].get("alone")
  if base:
    for r in results["modes"].values():
      r["throughput_vs_alone"] = r["epochs_per_hour"] / base["epochs_per_hour"]
  if _OUT.value:
    with open(_OUT.value, "w") as f:
      json.dump(results, f, indent=1)
      f.write("\n")
  print(json.dumps({k: v.get("throughput_vs_alone")
                    for k, v in results["modes"].items()}))


if __name__ == "__main__":
  app.run(main)
