"""Run records: metrics.jsonl + TensorBoard, env.json, JSON files, progress.

Tables are built from these records, never copied from logs.
"""

import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import time

import jax

# Set by `recattn.sweep --jobs=N` (N > 1) for the trainings it starts: how
# many share the machine, so that their seconds per epoch are read as such.
CONCURRENT_ENV = "RECATTN_CONCURRENT_RUNS"

_PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint",
             "tensorflow-datasets", "numpy", "ml-collections")


def write_json(path: str, obj) -> None:
  """Writes atomically, so a killed run never leaves half a file."""
  tmp = f"{path}.tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=2, sort_keys=True)
    f.write("\n")
  os.replace(tmp, path)


def _git_commit() -> str:
  if os.environ.get("RECATTN_COMMIT"):  # named by a launcher that copied
    return os.environ["RECATTN_COMMIT"]  # the tree elsewhere
  here = os.path.dirname(os.path.abspath(__file__))
  try:
    commit = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True,
        text=True, timeout=10, check=True).stdout.strip()
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
        capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    return commit + ("-dirty" if dirty else "")
  except (OSError, subprocess.SubprocessError):
    return "unknown"


def environment() -> dict:
  """Commit, package versions, device kind and count (and `concurrent_runs`
  when the sweep runner trains several at once)."""
  versions = {}
  for name in _PACKAGES:
    try:
      versions[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      versions[name] = None
  devices = jax.devices()
  env = {
      "commit": _git_commit(),
      "python": sys.version.split()[0],
      "platform": platform.platform(),
      "cpu_count": os.cpu_count(),
      "packages": versions,
      "backend": jax.default_backend(),
      "device_kind": devices[0].device_kind,
      "device_count": len(devices),
      "process_count": jax.process_count(),
      "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
  }
  concurrent = os.environ.get(CONCURRENT_ENV, "")
  if concurrent.isdigit() and int(concurrent) > 1:
    env["concurrent_runs"] = int(concurrent)
  return env


def write_env(path: str) -> None:
  """Writes `environment()` to `path`, keeping what a resumed run ran on.

  When `path` already holds an environment (a run resumed, perhaps on
  another machine or commit), the earlier ones move to its `"earlier"` list,
  oldest first, so a record never hides part of its provenance.
  """
  env = environment()
  if os.path.exists(path):
    with open(path) as f:
      old = json.load(f)
    earlier = old.pop("earlier", [])
    env["earlier"] = earlier + [old]
  write_json(path, env)


class MetricWriter:
  """Appends scalars to `metrics.jsonl` and to TensorBoard (tensorboardX)."""

  def __init__(self, workdir: str, resume_step: int = 0):
    self.path = os.path.join(workdir, "metrics.jsonl")
    # A resumed run replays the steps after its checkpoint: drop the records
    # of those steps so every step appears once.
    if os.path.exists(self.path):
      with open(self.path) as f:
        kept = [l for l in f if l.strip() and
                json.loads(l)["step"] <= resume_step]
      with open(self.path, "w") as f:
        f.writelines(kept)
    try:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"),
                               purge_step=resume_step + 1)
    except ImportError:
      self._tb = None

  def write(self, step: int, scalars: dict[str, float]) -> None:
    with open(self.path, "a") as f:
      f.write(json.dumps({"step": step, **scalars}, sort_keys=True) + "\n")
    if self._tb is not None:
      for k, v in scalars.items():
        self._tb.add_scalar(k.replace("@", "_"), v, step)  # TB tag charset
      self._tb.flush()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


class Progress:
  """One-line progress bar on stderr with steps/s and ETA."""

  def __init__(self, total_steps: int, start_step: int = 0,
               enabled: bool = True):
    self.total = total_steps
    self.start_step = start_step
    self.t0 = time.time()
    self.enabled = enabled and total_steps > 0
    self._last = 0.0

  def update(self, step: int, note: str = "", force: bool = False) -> None:
    now = time.time()
    if not self.enabled or (not force and now - self._last < 1.0):
      return
    self._last = now
    rate = (step - self.start_step) / max(now - self.t0, 1e-9)
    eta = (self.total - step) / rate if rate > 0 else float("inf")
    frac = step / self.total
    bar = "#" * int(30 * frac) + "." * (30 - int(30 * frac))
    eta_s = time.strftime("%H:%M:%S", time.gmtime(eta)) if eta < 1e6 else "?"
    sys.stderr.write(f"\r[{bar}] {step}/{self.total} {rate:.2f} steps/s "
                     f"ETA {eta_s} {note}\x1b[K")
    sys.stderr.flush()

  def close(self) -> None:
    if self.enabled:
      sys.stderr.write("\n")
