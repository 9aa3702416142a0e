"""Runs a study's sweep: every (config, overrides, seed) in order.

  python -m recattn.sweep --sweep=experiments/<study>/sweep.py \
      [--root=<dir>] [--list] [--only=<substring>] [--dry_run] [--jobs=N]

Run it from the repository root: config paths are relative to it. The sweep
file defines `get_sweep()`, returning one group or a list of groups:

  {"name": "003_linear_attention",                  # study, in run.json
   "configs": ["configs/sasrec_ml1m.py", "configs/hstu_ml1m.py:large"],
   "overrides": [{}, {"model.attention": "linear"}],  # default [{}]
   "seeds": [0, 1, 2],                              # default [0]
   "common": {"num_epochs": 50}}                    # every run; default {}

Runs are configs x overrides x seeds in that order, groups joined in order
without duplicates. Each run trains in `<root>/<name>` (root: `runs/` beside
the sweep file) through `python -m recattn.main`, its output appended to
`log.txt` and its `run.json` (study, label, seed, config, overrides, command)
written first. Runs with `final_metrics.json` are skipped; interrupted ones
resume; a run another process is training (its workdir's `train.lock`,
`recattn.runlock`) is skipped, not failed. Every run's config is built and
validated before the first starts.
SIGTERM or SIGINT (Ctrl-C) to the runner starts no further run and passes
the stop on to the running trainings, which save their state after the
current step (`recattn.interrupt`); the runner then exits with status 75,
and the same command resumes the study.
`--jobs=N` trains N runs at a time, in sweep order (for an accelerator that
one small run leaves idle, or this project's 2-core CPU, where two at once
train 1.18-1.20x the epochs per hour of one: experiments/000_speed_lean_step,
"Several trainings at once"). Each run's env.json then records
`concurrent_runs` and table footers name those rows; time comparisons want
`--jobs=1`.

Staged studies: `get_sweep(root)` (a parameter named `root`) receives the
run directory, so a sweep file can read its finished runs and add the next
stage's runs, e.g. more seeds of the point that `best()` picks on a
validation metric. After every run has finished, the runner expands the
sweep again and trains the runs it adds, until it adds none.
"""

import concurrent.futures
import dataclasses
import datetime
import difflib
import hashlib
import importlib.util
import inspect
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time

from absl import app
from absl import flags
from ml_collections import config_dict
from ml_collections import config_flags

from recattn import config_check
from recattn import interrupt
from recattn import reporting
from recattn import runlock

FLAGS = flags.FLAGS


def _define_flags() -> None:
  """The CLI's flags: defined only when run as a program (see the end)."""
  flags.DEFINE_string("sweep", None, "Sweep file defining get_sweep().")
  flags.DEFINE_string("root", None, "Run directories; default: `runs/` "
                      "beside the sweep file.")
  flags.DEFINE_bool("list", False, "Print one shell command per run.")
  flags.DEFINE_string("only", None, "Keep runs whose name contains it.")
  flags.DEFINE_bool("dry_run", False, "Print what would run.")
  flags.DEFINE_integer("jobs", 1, "Runs trained at the same time.")
  flags.mark_flag_as_required("sweep")

_KEYS = ("name", "configs", "overrides", "seeds", "common")
_VALUE_TYPES = (bool, int, float, str, tuple, list)
_MAX_LABEL = 120  # characters; with "__seed<k>" a name stays under 150


class SweepError(ValueError):
  """A malformed sweep or run; the message names the file and the problem."""


@dataclasses.dataclass(frozen=True)
class Run:
  """One training run of a sweep."""
  study: str
  config: str  # `configs/<name>.py[:arg]`
  overrides: dict  # field -> value: common, then this run's; without seed
  seed: int
  label: str  # the name without the seed: one row of a results table
  workdir: str

  @property
  def name(self) -> str:
    return os.path.basename(self.workdir)

  @property
  def config_flags(self) -> list[str]:
    return _config_flags(self.config, {**dict(sorted(self.overrides.items())),
                                       "seed": self.seed})

  @property
  def command(self) -> list[str]:
    first, *rest = self.config_flags
    return [sys.executable, "-m", "recattn.main", first,
            f"--workdir={self.workdir}", *rest]

  def record(self) -> dict:
    """The contents of `run.json`, as JSON reads them back."""
    return json.loads(json.dumps({
        "study": self.study, "label": self.label, "seed": self.seed,
        "config": self.config, "overrides": self.overrides,
        "command": self.command}))

  def finished(self) -> bool:
    return os.path.exists(os.path.join(self.workdir, "final_metrics.json"))


def _config_flags(config: str, fields: dict) -> list[str]:
  """`recattn.main`'s --config flags for `config` with `fields` set."""
  return [f"--config={config}"] + [
      f"--config.{k}={format_value(v)}" for k, v in fields.items()]


def format_value(value) -> str:
  """Formats an override value the way ml_collections' config flags parse."""
  return repr(tuple(value)) if isinstance(value, (tuple, list)) else str(value)


def run_label(config: str, overrides: dict) -> str:
  """`<config stem>[_<arg>][__<k>=<v>,...]`, safe for file names.

  Keys are sorted. A name that had to be altered (unsafe characters) or cut
  (longer than _MAX_LABEL) ends in a hash of the config and overrides, so
  distinct runs keep distinct names.
  """
  path, _, arg = config.partition(":")
  stem = os.path.splitext(os.path.basename(path))[0] + (f"_{arg}" if arg
                                                        else "")
  parts = [f"{k}={'-'.join(map(str, v)) if isinstance(v, (tuple, list)) else v}"
           for k, v in sorted(overrides.items())]
  raw = "__".join([stem, ",".join(parts)] if parts else [stem])
  label = re.sub(r"[^A-Za-z0-9._,=+-]", "-", raw)
  if label != raw or len(label) > _MAX_LABEL:
    key = json.dumps([config, sorted(overrides.items())])
    digest = hashlib.sha1(key.encode()).hexdigest()[:8]
    label = f"{label[:_MAX_LABEL - 9]}-{digest}"
  return label


def _require(ok: bool, message: str) -> None:
  if not ok:
    raise SweepError(message)


def _check_fields(where: str, fields, what: str) -> None:
  _require(isinstance(fields, dict), f"{where}: {what} must be a dict, got "
           f"{fields!r}")
  for field, value in fields.items():
    _require(isinstance(field, str) and field not in ("", "seed") and
             not field.startswith("config."),
             f"{where}: {what} has field {field!r}; fields are config paths "
             "like 'model.attention', seeds go in 'seeds'")
    _require(isinstance(value, _VALUE_TYPES),
             f"{where}: {what} sets {field}={value!r}; values are ints, "
             "floats, bools, strings or tuples")


def _check_group(where: str, group) -> None:
  """Raises SweepError for the first problem of one group of a sweep file."""
  _require(isinstance(group, dict), f"{where}: a group must be a dict, got "
           f"{group!r}")
  unknown = sorted(set(group) - set(_KEYS))
  _require(not unknown, f"{where}: unknown key(s) {unknown}; allowed: "
           f"{list(_KEYS)}")
  _require(isinstance(group.get("name"), str) and group["name"],
           f"{where}: 'name' must be a non-empty string")
  for key, kind in (("configs", str), ("overrides", dict), ("seeds", int)):
    items = group.get(key, [] if key == "configs" else [None])
    _require(isinstance(items, list) and items, f"{where}: '{key}' must be a "
             f"non-empty list of {kind.__name__}s, got {items!r}")
  for config in group["configs"]:
    _require(isinstance(config, str) and os.path.isfile(
        config.partition(":")[0]), f"{where}: config file {config!r} not "
             f"found (paths are relative to the working directory)")
  for i, fields in enumerate(group.get("overrides", [{}])):
    _check_fields(where, fields, f"'overrides'[{i}]")
  _check_fields(where, group.get("common", {}), "'common'")
  seeds = group.get("seeds", [0])
  _require(all(type(seed) is int for seed in seeds),
           f"{where}: 'seeds' must be ints, got {seeds!r}")
  _require(len(set(seeds)) == len(seeds),
           f"{where}: 'seeds' has duplicates: {seeds}")


def load_module(sweep_path: str):
  """Executes a sweep file and returns it as a module (its constants too)."""
  spec = importlib.util.spec_from_file_location("recattn_sweep_file",
                                                sweep_path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def load_runs(sweep_path: str, root: str | None = None) -> list[Run]:
  """Reads a sweep file and expands it into runs, in order, deduplicated."""
  _require(os.path.isfile(sweep_path), f"{sweep_path}: no such file")
  root = root or os.path.join(os.path.dirname(sweep_path), "runs")
  try:
    module = load_module(sweep_path)
    get_sweep = getattr(module, "get_sweep", None)
    if not callable(get_sweep):
      raise SweepError(f"{sweep_path}: defines no get_sweep()")
    staged = "root" in inspect.signature(get_sweep).parameters
    groups = get_sweep(root=root) if staged else get_sweep()
  except SweepError as e:  # raised by a staged file's own checks
    if str(e).startswith(sweep_path):
      raise
    raise SweepError(f"{sweep_path}: {e}") from e
  except Exception as e:  # The file is user code: one line, no traceback.
    raise SweepError(f"{sweep_path}: {type(e).__name__}: {e}") from e
  return load_runs_from_groups(groups, root, sweep_path)


def load_runs_from_groups(groups, root: str, sweep_path: str = "sweep"
                          ) -> list[Run]:
  """Expands `get_sweep()`'s result into runs under `root`, deduplicated.

  `sweep_path` starts every error message.
  """
  single = isinstance(groups, dict)
  groups = [groups] if single else groups
  _require(isinstance(groups, list) and groups, f"{sweep_path}: get_sweep() "
           "must return a dict or a non-empty list of dicts")
  for i, group in enumerate(groups, 1):
    _check_group(sweep_path if single else f"{sweep_path}: group {i}", group)

  runs, seen, labels = [], set(), {}
  for group in groups:
    for config in group["configs"]:
      for overrides in group.get("overrides", [{}]):
        label = run_label(config, overrides)
        merged = {**group.get("common", {}), **overrides}
        # A label is one table row: its seeds must share everything else.
        first = labels.setdefault(label, (config, merged))
        _require(first == (config, merged), f"{sweep_path}: runs "
                 f"{first} and {(config, merged)} would share the name "
                 f"{label}; make their difference part of 'overrides'")
        for seed in group.get("seeds", [0]):
          if (label, seed) not in seen:
            seen.add((label, seed))
            runs.append(Run(group["name"], config, merged, seed, label,
                            os.path.join(root, f"{label}__seed{seed}")))
  return runs


def _parse_config(flag_args: list[str]) -> config_dict.ConfigDict:
  """Builds a config exactly as recattn.main's --config flags would."""
  argv = ["recattn.main", *flag_args]
  flag_values = flags.FlagValues()
  holder = config_flags.DEFINE_config_file(
      "config", None, "", flag_values=flag_values, lock_config=True,
      sys_argv=argv)
  flag_values(argv)
  return holder.value


def _fields(config: config_dict.ConfigDict, prefix: str = "") -> dict:
  out = {}
  for key, value in config.items():
    if isinstance(value, config_dict.ConfigDict):
      out.update(_fields(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = value
  return out


def build_config(config: str, overrides: dict | None = None
                 ) -> config_dict.ConfigDict:
  """The config `recattn.main` would train: `config` with `overrides`."""
  return _parse_config(_config_flags(config, overrides or {}))


def best(runs: list[Run], metric: str = "valid/full/ndcg@10") -> list[Run]:
  """Finished `runs`, best first on a validation `metric` (ties: by name).

  For sweep files that pick a later stage's points from earlier results.

  Raises:
    SweepError: for a test metric (selection uses validation only), an
      unfinished run or a record without `metric`.
  """
  _require(metric.startswith("valid/"), f"best(): {metric!r} is not a "
           "validation metric; selection uses 'valid/...' metrics only")
  scored = []
  for run in runs:
    path = os.path.join(run.workdir, "final_metrics.json")
    _require(run.finished(), f"best(): {run.name} has no {path}")
    with open(path) as f:
      value = json.load(f).get(metric)
    _require(isinstance(value, (int, float)), f"best(): {path} has no "
             f"number {metric!r}")
    scored.append((-value, run.name, run))
  return [run for *_, run in sorted(scored, key=lambda x: x[:2])]


def check(runs: list[Run], sweep_path: str) -> None:
  """Builds and validates every run's config; checks earlier run.json files.

  Raises:
    SweepError: naming the sweep file, the run and the problem.
  """
  defaults = {}
  for run in runs:
    where = f"{sweep_path}: run {run.name}"
    try:
      if run.config not in defaults:
        defaults[run.config] = _fields(
            _parse_config([f"--config={run.config}"]))
      known = defaults[run.config]
      for field in run.overrides:
        if field not in known:
          close = difflib.get_close_matches(field, known, 3)
          raise SweepError(f"{where}: {run.config} has no field {field!r}" +
                           (f"; did you mean {close}?" if close else ""))
      config = _parse_config(run.config_flags)
      config_check.validate(config)
    except flags.Error as e:
      raise SweepError(f"{where}: {str(e).strip().splitlines()[-1]}") from e
    except config_check.ConfigError as e:
      raise SweepError(f"{where}: {e}") from e
    values = _fields(config)
    for field, value in run.overrides.items():
      got = values[field]
      if got != (tuple(value) if isinstance(value, list) else value):
        raise SweepError(f"{where}: {field}={value!r} reads back as {got!r}; "
                         f"the field holds a {type(got).__name__}")
    path = os.path.join(run.workdir, "run.json")
    if os.path.exists(path):
      with open(path) as f:
        old, new = json.load(f), run.record()
      diff = {k: (old.get(k), new[k]) for k in ("config", "overrides", "seed")
              if old.get(k) != new[k]}
      if diff:
        raise SweepError(f"{where}: {path} records a different run "
                         f"(old, new: {diff}); remove {run.workdir} to redo it")


def _clock(seconds: float) -> str:
  return f"{int(seconds // 3600)}:{int(seconds % 3600 // 60):02d}"


class _Stop(interrupt.StopRequest):
  """The runner's stop request: reaches every running training once.

  Entered (signal handlers installed) by `run_all`; `execute` without one
  uses a `_Stop` that is never entered, so never requested.
  """

  def __init__(self):
    super().__init__(on_stop=self._forward)
    self.trainings = set()

  def _forward(self, signum):
    del signum
    for proc in list(self.trainings):
      _terminate(proc)


def _terminate(proc) -> None:
  try:
    proc.send_signal(signal.SIGTERM)
  except ProcessLookupError:  # it has just exited
    pass


def _train(run: Run, jobs: int = 1,
           stop: _Stop | None = None) -> tuple[int | str, float]:
  """Trains one run in its workdir; returns (exit status, seconds).

  With `jobs > 1` the training learns, through `CONCURRENT_ENV`, how many
  trainings share the machine, and its env.json records it. While it runs
  it is in `stop.trainings`, so that a stop request reaches it.
  """
  stop = stop or _Stop()
  os.makedirs(run.workdir, exist_ok=True)
  with open(os.path.join(run.workdir, "run.json"), "w") as f:
    json.dump(run.record(), f, indent=2)
  t0 = time.time()
  with open(os.path.join(run.workdir, "log.txt"), "a") as log:
    log.write(f"=== {datetime.datetime.now().isoformat(timespec='seconds')}"
              f" {shlex.join(run.command)}\n")
    log.flush()
    env = dict(os.environ)
    env.pop(reporting.CONCURRENT_ENV, None)
    if jobs > 1:
      env[reporting.CONCURRENT_ENV] = str(jobs)
    proc = subprocess.Popen(run.command, stdout=log,
                            stderr=subprocess.STDOUT, env=env)
    stop.trainings.add(proc)
    if stop.requested:  # the request came while it started
      _terminate(proc)
    rc = proc.wait()
    stop.trainings.discard(proc)
    seconds = time.time() - t0
    log.write(f"=== exit {rc} after {seconds:.1f} s\n")
  if rc == 0 and not run.finished():
    rc = "no final_metrics.json"
  return rc, seconds


def execute(runs: list[Run], jobs: int = 1,
            stop: _Stop | None = None) -> list[Run]:
  """Trains the unfinished runs, `jobs` at a time; returns the failed ones.

  `jobs > 1` runs several trainings side by side (one accelerator that a
  small model leaves mostly idle, or a CPU that one training leaves partly
  idle); their `s/epoch` then measure a shared machine: each run's env.json
  records `concurrent_runs`, and the table's footer names those rows. Time
  studies with `jobs=1`. Once `stop` is requested no run starts, and runs
  that stop at a checkpoint (exit status `interrupt.EXIT_CODE`) are not
  failures.
  """
  stop = stop or _Stop()
  todo = [run for run in runs if not run.finished()]
  index = {run.name: i for i, run in enumerate(runs, 1)}
  for run in runs:
    if run not in todo:
      print(f"[{index[run.name]}/{len(runs)}] {run.name}: skip (done)",
            flush=True)
  seconds, failed = [], []
  lock = threading.Lock()

  def one(run: Run) -> None:
    tag = f"[{index[run.name]}/{len(runs)}] {run.name}:"
    if stop.requested:
      print(f"{tag} not started (stopping)", flush=True)
      return
    busy = runlock.holder(run.workdir)
    if busy is not None:
      # Another sweep or launch is training it (runlock): leave it to that
      # process; it is not a failure, and a later pass finds it done.
      print(f"{tag} busy: another process trains it ({busy}); skipped",
            flush=True)
      return
    resume = os.path.isdir(os.path.join(run.workdir, "ckpt"))
    print(f"{tag} start{' (resuming)' if resume else ''}", flush=True)
    rc, took = _train(run, min(jobs, len(todo)), stop)
    with lock:
      if rc == interrupt.EXIT_CODE:
        print(f"{tag} stopped at a checkpoint after {took:.1f} s; the same "
              "command resumes it", flush=True)
        return
      seconds.append(took)
      if rc != 0:
        failed.append(run)
      status = "done" if rc == 0 else f"FAILED ({rc})"
      eta = sum(seconds) / len(seconds) * (len(todo) - len(seconds)) / jobs
      print(f"{tag} {status} in {took:.1f} s; ETA {_clock(eta)} for the "
            "rest", flush=True)

  with concurrent.futures.ThreadPoolExecutor(max(1, jobs)) as pool:
    list(pool.map(one, todo))
  return sorted(failed, key=lambda run: index[run.name])


def _expand(sweep_path: str, root: str | None, only: str | None
            ) -> list[Run]:
  """The sweep's runs after `only`, checked; exits with a one-line error."""
  try:
    runs = load_runs(sweep_path, root)
    if only is not None:
      runs = [run for run in runs if only in run.name]
      if not runs:
        raise SweepError(f"{sweep_path}: no run name contains {only!r}")
    check(runs, sweep_path)
  except SweepError as e:
    raise SystemExit(f"error: {e}") from None
  return runs


_MAX_STAGES = 20


def run_all(sweep_path: str, root: str | None = None, only: str | None = None,
            jobs: int = 1) -> None:
  """Trains every unfinished run, stage after stage (see the docstring).

  Raises:
    SystemExit: with a one-line error, or the list of failed runs; with
      status `interrupt.EXIT_CODE` after SIGTERM or SIGINT (module
      docstring).
  """
  if jobs < 1:
    raise SystemExit(f"error: --jobs={jobs} must be >= 1")
  runs = _expand(sweep_path, root, only)
  with _Stop() as stop:
    for stage in range(1, _MAX_STAGES + 1):
      failed = execute(runs, jobs, stop)
      if stop.requested:
        print(f"{stop.reason}: stopped; the same command resumes the "
              "sweep", flush=True)
        raise SystemExit(interrupt.EXIT_CODE)
      if failed:
        raise SystemExit(f"FAILED {len(failed)} of {len(runs)} runs (see "
                         "their log.txt):\n" +
                         "\n".join(r.workdir for r in failed))
      known = {run.name for run in runs}
      runs = _expand(sweep_path, root, only)  # a staged file may add runs now
      added = [run.name for run in runs if run.name not in known]
      if not added:
        return
      print(f"stage {stage + 1}: the sweep adds {len(added)} run(s): "
            f"{', '.join(added)}", flush=True)
    raise SystemExit(f"error: {sweep_path}: still adding runs after "
                     f"{_MAX_STAGES} stages")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  f = FLAGS
  if not (f.list or f.dry_run):
    run_all(f.sweep, f.root, f.only, f.jobs)
    return
  runs = _expand(f.sweep, f.root, f.only)
  if f.list:
    print("\n".join(shlex.join(run.command) for run in runs))
    return
  for i, run in enumerate(runs, 1):
    what = ("skip (done)" if run.finished() else "would resume" if
            os.path.isdir(os.path.join(run.workdir, "ckpt")) else "would run")
    print(f"[{i}/{len(runs)}] {run.name}: {what}\n"
          f"  {shlex.join(run.command)}")


if __name__ == "__main__":
  # Staged sweep files import recattn.sweep: run the CLI in that module, so
  # they share its SweepError and Run with the runner (and flags exist once).
  from recattn import sweep as _module
  _module._define_flags()
  app.run(_module.main)
