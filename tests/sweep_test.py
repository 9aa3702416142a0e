"""Sweep runner: run names, expansion order, --list, a real tiny sweep that
skips finished runs and resumes an interrupted one, and one-line errors for
bad sweep files and override fields before anything is written."""

import importlib.util
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import textwrap
import threading

import pytest

from recattn import interrupt
from recattn import reporting
from recattn import runlock
from recattn import sweep

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def _in_repo_root(monkeypatch):
  monkeypatch.chdir(ROOT)  # config paths in sweep files are repo-relative


def _sweep_file(tmp_path, body: str) -> str:
  path = tmp_path / "study" / "sweep.py"
  path.parent.mkdir(exist_ok=True)
  path.write_text(textwrap.dedent(body))
  return str(path)


class _Finished:
  """A `subprocess.Popen` stand-in whose training has already returned."""

  def __init__(self, returncode):
    self.returncode = returncode

  def wait(self):
    return self.returncode

  def send_signal(self, signum):
    pass


def _fake_trainings(monkeypatch, fake_main):
  """Runs `fake_main(command, stdout, stderr, env) -> status` per training."""
  monkeypatch.setattr(sweep.subprocess, "Popen", lambda command, **kw:
                      _Finished(fake_main(command, **kw)))


def _workdir(command) -> str:
  """The workdir of a `python -m recattn.main` command the sweep built."""
  return command[4].removeprefix("--workdir=")


def _trained(workdir: str, metrics: dict | None = None) -> int:
  """Writes final metrics as a training that ends does; its status, 0."""
  with open(os.path.join(workdir, "final_metrics.json"), "w") as f:
    json.dump(metrics or {}, f)
  return 0


def _cli(tmp_path, *args):
  env = dict(os.environ, RECATTN_DATA_DIR=str(tmp_path / "tfds"),
             # Seeds of one override set compile the same programs.
             JAX_COMPILATION_CACHE_DIR=str(tmp_path / "jax_cache"),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1")
  return subprocess.run([sys.executable, "-m", "recattn.sweep", *args],
                        cwd=ROOT, env=env, capture_output=True, text=True,
                        timeout=600)


def test_names_are_readable_with_sorted_keys():
  label = sweep.run_label("configs/sasrec_ml1m.py", {
      "model.attn.linear_feature": "l2", "model.attention": "linear"})
  assert label == ("sasrec_ml1m__model.attention=linear,"
                   "model.attn.linear_feature=l2")
  assert sweep.run_label("configs/hstu_ml1m.py:large", {}) == "hstu_ml1m_large"
  assert sweep.run_label("configs/test.py", {
      "optimizer.lr": 0.003, "model.attn.din_hidden": (8, 4),
      "eval.filter_seen": True}) == ("test__eval.filter_seen=True,model.attn."
                                     "din_hidden=8-4,optimizer.lr=0.003")


def test_altered_or_long_names_end_in_a_stable_hash():
  unsafe = sweep.run_label("configs/test.py", {"data.data_dir": "/tmp/a b"})
  # Pinned: a changed scheme would orphan the workdirs of earlier sweeps.
  assert unsafe == "test__data.data_dir=-tmp-a-b-210982bb"
  assert sweep.run_label("configs/test.py", {"data.data_dir": "-tmp-a-b"}) == (
      "test__data.data_dir=-tmp-a-b")
  fields = {f"model.attn.option_{i}": "x" * 20 for i in range(10)}
  long = sweep.run_label("configs/test.py", fields)
  other = sweep.run_label("configs/test.py", {**fields,
                                              "model.attn.option_9": "y"})
  assert long == sweep.run_label("configs/test.py",
                                 dict(reversed(fields.items())))
  assert long != other and long[:100] == other[:100]
  assert len(f"{long}__seed99999") < 150
  assert all(re.fullmatch(r"[\w.,=+-]+", n) for n in (unsafe, long, other))


def test_runs_nest_configs_overrides_seeds_and_groups_join_without_repeats(
    tmp_path):
  path = _sweep_file(tmp_path, """
      def get_sweep():
        common = {"num_epochs": 1}
        return [
            {"name": "s", "configs": ["configs/test.py",
                                      "configs/sasrec_ml1m.py:paper"],
             "overrides": [{}, {"model.attention": "linear"}],
             "seeds": [0, 1], "common": common},
            {"name": "s", "configs": ["configs/test.py"],
             "overrides": [{"model.attention": "linear"},
                           {"model.attention": "dot"}],
             "seeds": [1, 2], "common": common},
        ]
      """)
  runs = sweep.load_runs(path)
  lin, dot = "__model.attention=linear", "__model.attention=dot"
  assert [r.name for r in runs] == [
      "test__seed0", "test__seed1", f"test{lin}__seed0", f"test{lin}__seed1",
      "sasrec_ml1m_paper__seed0", "sasrec_ml1m_paper__seed1",
      f"sasrec_ml1m_paper{lin}__seed0", f"sasrec_ml1m_paper{lin}__seed1",
      f"test{lin}__seed2", f"test{dot}__seed1", f"test{dot}__seed2"]
  run = runs[3]
  assert run.label == f"test{lin}" and run.seed == 1 and run.study == "s"
  assert run.overrides == {"num_epochs": 1, "model.attention": "linear"}
  assert run.workdir == str(tmp_path / "study" / "runs" / run.name)
  assert run.command[1:] == [
      "-m", "recattn.main", "--config=configs/test.py",
      f"--workdir={run.workdir}", "--config.model.attention=linear",
      "--config.num_epochs=1", "--config.seed=1"]
  sweep.check(runs, path)  # every config builds and validates
  assert [r.workdir for r in sweep.load_runs(path, root="/x")][0] == (
      "/x/test__seed0")


def test_list_prints_one_command_per_run_and_writes_nothing(tmp_path):
  path = _sweep_file(tmp_path, """
      def get_sweep():
        return {"name": "s", "configs": ["configs/test.py"],
                "overrides": [{}, {"model.attn.din_hidden": (8, 4),
                                   "model.attention": "din"}],
                "seeds": [0, 3]}
      """)
  proc = _cli(tmp_path, f"--sweep={path}", "--list", "--only=din")
  assert proc.returncode == 0, proc.stderr[-2000:]
  lines = proc.stdout.splitlines()
  assert len(lines) == 2
  argv = shlex.split(lines[1])
  workdir = tmp_path / "study" / "runs" / (
      "test__model.attention=din,model.attn.din_hidden=8-4__seed3")
  assert argv == [sys.executable, "-m", "recattn.main",
                  "--config=configs/test.py", f"--workdir={workdir}",
                  "--config.model.attention=din",
                  "--config.model.attn.din_hidden=(8, 4)", "--config.seed=3"]
  assert not (tmp_path / "study" / "runs").exists()


def test_tiny_sweep_runs_skips_and_resumes_only_the_interrupted_run(tmp_path):
  path = _sweep_file(tmp_path, """
      def get_sweep():
        return {"name": "tiny", "configs": ["configs/test.py"],
                # eval.seed changes no compiled program: with the compilation
                # cache only the first run compiles (~10 s; later ones ~4 s).
                "overrides": [{}, {"eval.seed": 1}],
                "seeds": [0, 1],
                "common": {"num_epochs": 1, "mesh.data": 1,
                           "model.num_blocks": 1,
                           "data.synthetic_num_users": 100}}
      """)
  runs_dir = tmp_path / "study" / "runs"
  names = ["test__seed0", "test__seed1", "test__eval.seed=1__seed0",
           "test__eval.seed=1__seed1"]

  first = _cli(tmp_path, f"--sweep={path}")
  assert first.returncode == 0, first.stdout + first.stderr[-3000:]
  assert sorted(os.listdir(runs_dir)) == sorted(names)
  for i, name in enumerate(names, 1):
    assert f"[{i}/4] {name}: start\n" in first.stdout
    assert re.search(rf"\[{i}/4\] {re.escape(name)}: done in [\d.]+ s; "
                     r"ETA \d+:\d\d for the rest", first.stdout), first.stdout
    record = json.loads((runs_dir / name / "run.json").read_text())
    assert record["study"] == "tiny" and record["seed"] == int(name[-1])
    assert record["label"] == name.rsplit("__seed", 1)[0]
    assert record["config"] == "configs/test.py"
    assert record["overrides"]["num_epochs"] == 1
    assert record["command"][-1] == f"--config.seed={record['seed']}"
    assert (runs_dir / name / "final_metrics.json").exists()
  assert "ETA 0:00 for the rest" in first.stdout.splitlines()[-1]

  second = _cli(tmp_path, f"--sweep={path}")
  assert second.returncode == 0, second.stderr[-3000:]
  assert second.stdout.count("skip (done)") == 4
  assert "start" not in second.stdout

  interrupted = runs_dir / names[3]
  (interrupted / "final_metrics.json").unlink()
  dry = _cli(tmp_path, f"--sweep={path}", "--dry_run")
  assert dry.stdout.count("skip (done)") == 3
  assert f"[4/4] {names[3]}: would resume" in dry.stdout

  third = _cli(tmp_path, f"--sweep={path}")
  assert third.returncode == 0, third.stderr[-3000:]
  assert third.stdout.count("skip (done)") == 3
  assert f"[4/4] {names[3]}: start (resuming)\n" in third.stdout
  assert (interrupted / "final_metrics.json").exists()
  log = (interrupted / "log.txt").read_text()
  assert log.count("=== exit 0 after") == 2 and "resumed from epoch 1" in log


def test_a_failed_run_is_reported_and_the_sweep_goes_on(
    tmp_path, monkeypatch, capsys):
  path = _sweep_file(tmp_path, """
      def get_sweep():
        return {"name": "s", "configs": ["configs/test.py"], "seeds": [0, 1]}
      """)
  runs = sweep.load_runs(path)

  def fake_main(command, stdout, stderr, env):
    # one at a time: a training does not inherit a stale sharing count
    assert reporting.CONCURRENT_ENV not in env
    workdir = _workdir(command)
    if workdir.endswith("seed0"):
      return 3
    return _trained(workdir)

  _fake_trainings(monkeypatch, fake_main)
  monkeypatch.setenv(reporting.CONCURRENT_ENV, "4")
  assert sweep.execute(runs) == [runs[0]]
  out = capsys.readouterr().out
  assert re.search(r"\[1/2\] test__seed0: FAILED \(3\) in [\d.]+ s; ETA "
                   r"0:00 for the rest", out), out
  assert "[2/2] test__seed1: done in" in out
  assert "=== exit 3 after" in (tmp_path / "study" / "runs" / "test__seed0" /
                                "log.txt").read_text()


def test_a_run_another_process_trains_is_skipped_untouched(
    tmp_path, monkeypatch, capsys):
  # Two sweeps whose runs overlap (or a sweep that re-expands beside a
  # manual launch) must not train one workdir twice.
  path = _sweep_file(tmp_path, """
      def get_sweep():
        return {"name": "s", "configs": ["configs/test.py"], "seeds": [0, 1]}
      """)
  runs = sweep.load_runs(path)
  started = []

  def fake_main(command, stdout, stderr, env):
    del stdout, stderr, env
    workdir = _workdir(command)
    started.append(os.path.basename(workdir))
    return _trained(workdir)

  _fake_trainings(monkeypatch, fake_main)
  with runlock.hold(runs[0].workdir):
    assert sweep.execute(runs) == []
  out = capsys.readouterr().out
  assert re.search(r"\[1/2\] test__seed0: busy: another process trains it "
                   rf"\(pid {os.getpid()} on .*\); skipped\n", out), out
  assert started == ["test__seed1"]
  assert sorted(os.listdir(runs[0].workdir)) == [runlock.LOCK_NAME]


def test_jobs_train_runs_side_by_side(tmp_path, monkeypatch, capsys):
  path = _sweep_file(tmp_path, """
      def get_sweep():
        return {"name": "s", "configs": ["configs/test.py"],
                "seeds": [0, 1, 2, 3]}
      """)
  runs = sweep.load_runs(path)
  running, most, told = [], [], []
  lock = threading.Lock()
  both_started = threading.Barrier(2, timeout=10)

  def fake_main(command, stdout, stderr, env):
    workdir = _workdir(command)
    with lock:
      running.append(workdir)
      most.append(len(running))
      told.append(env.get(reporting.CONCURRENT_ENV))
    if workdir.endswith(("seed0", "seed1")):
      both_started.wait()  # deadlocks (and times out) if run one at a time
    with lock:
      running.remove(workdir)
    if workdir.endswith("seed2"):
      return 1
    return _trained(workdir)

  _fake_trainings(monkeypatch, fake_main)
  assert sweep.execute(runs, jobs=2) == [runs[2]]
  assert max(most) == 2
  # each training is told it shares the machine (env.json records it)
  assert set(told) == {"2"}
  out = capsys.readouterr().out
  assert out.count(": done in") == 3 and "test__seed2: FAILED (1)" in out


def test_a_stop_reaches_the_running_training_and_starts_no_other(
    tmp_path, monkeypatch, capsys):
  path = _sweep_file(tmp_path, """
      def get_sweep():
        return {"name": "s", "configs": ["configs/test.py"], "seeds": [0, 1]}
      """)
  started, told = [], threading.Event()

  class Training:  # a training that saves and exits 75 when told to stop
    def __init__(self, command, **kwargs):
      started.append(os.path.basename(command[4]))

    def send_signal(self, signum):
      assert signum == signal.SIGTERM
      told.set()

    def wait(self):
      os.kill(os.getpid(), signal.SIGTERM)  # `kill <runner>` meanwhile
      assert told.wait(30), "the runner did not pass the stop on"
      return interrupt.EXIT_CODE

  monkeypatch.setattr(sweep.subprocess, "Popen", Training)
  before = signal.getsignal(signal.SIGTERM)
  with pytest.raises(SystemExit) as stopped:
    sweep.run_all(path)
  assert stopped.value.code == interrupt.EXIT_CODE
  assert started == ["test__seed0"]
  assert signal.getsignal(signal.SIGTERM) is before
  out = capsys.readouterr().out
  assert "[1/2] test__seed0: stopped at a checkpoint after" in out
  assert "[2/2] test__seed1: not started (stopping)" in out
  assert out.splitlines()[-1] == (
      "SIGTERM: stopped; the same command resumes the sweep")


_GOOD = '"name": "s", "configs": ["configs/test.py"]'


@pytest.mark.parametrize("body,message", [
    ("x = 1", "defines no get_sweep()"),
    ("def get_sweep():\n  return {%s, 'overide': [{}]}" % _GOOD,
     r"unknown key\(s\) \['overide'\]; allowed: \['name', 'configs'"),
    ("def get_sweep():\n  return {'name': 's', 'configs': []}",
     "'configs' must be a non-empty list"),
    ("def get_sweep():\n  return {%s, 'overrides': ['model.dim=8']}" % _GOOD,
     r"'overrides'\[0\] must be a dict, got 'model.dim=8'"),
    ("def get_sweep():\n  return {%s, 'seeds': [0, 1, 0]}" % _GOOD,
     r"'seeds' has duplicates: \[0, 1, 0\]"),
    ("def get_sweep():\n  return {%s, 'common': {'seed': 1}}" % _GOOD,
     "seeds go in 'seeds'"),
    ("def get_sweep():\n  return [{%s}, 3]" % _GOOD,
     "group 2: a group must be a dict"),
    ("def get_sweep():\n  return {'name': 's', 'configs': ['configs/no.py']}",
     "config file 'configs/no.py' not found"),
    ("def get_sweep():\n  return 1 / 0", "ZeroDivisionError"),
    ("def get_sweep():\n  return [{%s}, {%s, 'common': {'num_epochs': 3}}]"
     % (_GOOD, _GOOD), "would share the name test; make their difference"),
    ("def get_sweep():\n  return {%s, 'overrides': [{'model.dim': 8.5}]}"
     % _GOOD, "run test__model.dim=8.5__seed0: flag --config.model.dim=8.5: "
     "invalid literal for int"),
    ("def get_sweep():\n  return {%s, 'overrides': [{'model.attention': 'x'}]}"
     % _GOOD, r"config.model.attention='x': allowed values are \['additive'"),
])
def test_bad_sweep_files_stop_naming_the_file_and_problem(
    tmp_path, body, message):
  path = _sweep_file(tmp_path, body)
  with pytest.raises(sweep.SweepError, match=re.escape(path) + ": .*" +
                     message):
    sweep.check(sweep.load_runs(path), path)


def test_changed_overrides_of_an_earlier_run_are_refused(tmp_path):
  path = _sweep_file(tmp_path, "def get_sweep():\n  return {%s}" % _GOOD)
  run, = sweep.load_runs(path)
  os.makedirs(run.workdir)
  with open(os.path.join(run.workdir, "run.json"), "w") as f:
    json.dump({**run.record(), "overrides": {"num_epochs": 3}}, f)
  with pytest.raises(sweep.SweepError, match="records a different run"):
    sweep.check([run], path)


def test_unknown_override_field_stops_before_any_run(tmp_path):
  path = _sweep_file(tmp_path, """
      def get_sweep():
        return {"name": "s", "configs": ["configs/test.py"],
                "overrides": [{}, {"model.atention": "linear"}]}
      """)
  proc = _cli(tmp_path, f"--sweep={path}")
  assert proc.returncode != 0
  assert proc.stderr.strip().splitlines()[-1] == (
      f"error: {path}: run test__model.atention=linear__seed0: "
      "configs/test.py has no field 'model.atention'; did you mean "
      "['model.attention', 'model.positions', 'model.norm']?")
  assert proc.stdout == "" and not (tmp_path / "study" / "runs").exists()


@pytest.mark.parametrize("path", sorted(
    os.path.relpath(os.path.join(d, "sweep.py"), ROOT)
    for d in sorted(os.scandir(os.path.join(ROOT, "experiments")),
                    key=lambda e: e.name)
    if os.path.exists(os.path.join(d, "sweep.py"))) + [
    "experiments/001_sasrec_ml1m/sweep_loss.py",
    "experiments/001_sasrec_ml1m/sweep_refit.py"])
def test_shipped_sweeps_expand_and_every_run_validates(path):
  if path == _PARAMS:
    try:
      runs = sweep.load_runs(path)
    except sweep.SweepError as e:  # until study 003 has its ML-1M results
      assert "--sweep=experiments/003_attention_variants/sweep.py` first" in (
          str(e)), e
      return
  runs = sweep.load_runs(path)
  assert runs and len({r.workdir for r in runs}) == len(runs)
  sweep.check(runs, path)  # also against the run.json of recorded runs


_PARAMS = "experiments/009_algorithm_parameters/sweep.py"


def _finish(run, **metrics):
  os.makedirs(run.workdir, exist_ok=True)
  _trained(run.workdir, metrics)


def test_best_ranks_on_validation_only(tmp_path):
  path = _sweep_file(tmp_path, """
      def get_sweep():
        return {"name": "s", "configs": ["configs/test.py"],
                "seeds": [0, 1, 2]}
      """)
  a, b, c = sweep.load_runs(path)
  _finish(a, **{"valid/full/ndcg@10": 0.2, "test/full/ndcg@10": 0.9})
  _finish(b, **{"valid/full/ndcg@10": 0.3, "test/full/ndcg@10": 0.1})
  assert sweep.best([a, b]) == [b, a]
  with pytest.raises(sweep.SweepError, match="not a validation metric"):
    sweep.best([a, b], "test/full/ndcg@10")
  with pytest.raises(sweep.SweepError, match="test__seed2 has no"):
    sweep.best([a, c])
  with pytest.raises(sweep.SweepError, match="has no number 'valid/full/mrr'"):
    sweep.best([a], "valid/full/mrr")


def test_a_staged_sweep_runs_the_runs_each_stage_adds(
    tmp_path, monkeypatch, capsys):
  path = _sweep_file(tmp_path, """
      import os
      from recattn import sweep

      def get_sweep(root):
        first = {"name": "s", "configs": ["configs/test.py"],
                 "overrides": [{}, {"model.dropout": 0.1}]}
        runs = sweep.load_runs_from_groups([first], root)
        if not all(run.finished() for run in runs):
          return first
        top = sweep.best(runs)[0]
        return [first, {**first, "overrides": [top.overrides],
                        "seeds": [1, 2]}]
      """)
  trained = []

  def fake_main(command, stdout, stderr, env):
    workdir = _workdir(command)
    trained.append(os.path.basename(workdir))
    score = 0.5 if "dropout" in workdir else 0.4
    return _trained(workdir, {"valid/full/ndcg@10": score})

  _fake_trainings(monkeypatch, fake_main)
  sweep.run_all(path)
  assert trained == ["test__seed0", "test__model.dropout=0.1__seed0",
                     "test__model.dropout=0.1__seed1",
                     "test__model.dropout=0.1__seed2"]
  assert ("stage 2: the sweep adds 2 run(s): test__model.dropout=0.1__seed1, "
          "test__model.dropout=0.1__seed2") in capsys.readouterr().out
  sweep.run_all(path)  # everything done: nothing more to train
  assert len(trained) == 4


def _load_params_study():
  spec = importlib.util.spec_from_file_location("params_sweep", _PARAMS)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_parameter_study_starts_from_the_two_best_variants_on_validation(
    tmp_path):
  study = _load_params_study()
  variants = sweep.load_runs(study.VARIANTS_SWEEP, root=str(tmp_path / "003"))
  slow_on_cpu = sweep.load_module(study.VARIANTS_SWEEP).SLOW_ON_CPU
  assert {r.name for r in variants} >= set(slow_on_cpu)
  def reference(run):
    return "loss.name" in run.overrides or (
        "model.item_features" in run.overrides)

  ml1m = [r for r in variants if r.config in study.ML1M_CONFIGS and
          r.seed == 0 and not reference(r) and r.name not in slow_on_cpu]
  # Study 003's reference rows (another loss, item side information) are not
  # variants: never waited for, never chosen (even with the best validation
  # score).
  reference_rows = [r for r in variants if r.config in study.ML1M_CONFIGS
                    and reference(r)]
  assert {tuple(sorted(r.overrides)) for r in reference_rows} == {
      ("loss.item_chunk", "loss.name"), ("model.item_features",)}
  for run in reference_rows:
    _finish(run, **{"valid/full/ndcg@10": 0.9})
  with pytest.raises(sweep.SweepError, match=f"{len(ml1m)} of study 003's "
                     f"{len(ml1m)} ML-1M seed-0 runs are not finished"):
    study.plan(variants, str(tmp_path / "009"))
  for i, run in enumerate(ml1m):
    linear = run.overrides == {"model.attention": "linear"}
    hstu = run.config == "configs/hstu_ml1m.py:large"
    # test metrics favour another row: selection must not read them
    _finish(run, **{"valid/full/ndcg@10": 0.3 if linear else 0.29 if hstu
                    else 0.1 + i / 1000, "test/full/ndcg@10": 0.5 - i / 100})
  root = str(tmp_path / "009")
  groups = study.plan(variants, root)
  assert [(g["configs"], g["seeds"]) for g in groups] == [
      (["configs/sasrec_ml1m.py"], [0]),
      (["configs/hstu_ml1m.py:large"], [0])]
  linear, hstu = groups
  assert linear["overrides"][0] == {"model.attention": "linear"}
  assert {"model.attention": "linear", "model.num_heads": 2} in (
      linear["overrides"])
  assert not any("model.attn.temperature" in o or "model.attn.alpha" in o
                 for o in linear["overrides"])  # linear has no scale
  assert {"model.attn.alpha": 0.5} in hstu["overrides"]  # its alpha is 1
  assert {"model.num_blocks": 16} in hstu["overrides"]
  assert len(linear["overrides"]) == 13 and len(hstu["overrides"]) == 15
  runs = sweep.load_runs_from_groups(groups, root, _PARAMS)
  sweep.check(runs, _PARAMS)  # every point builds a valid config

  # A slow row that finishes later and ranks first brings its own
  # points into the study (every expansion re-plans).
  din, = [r for r in variants if r.name == slow_on_cpu[1]]
  _finish(din, **{"valid/full/ndcg@10": 0.35})
  replanned = study.plan(variants, str(tmp_path / "009b"))
  assert [g["overrides"][0] for g in replanned] == [
      {"model.attention": "din"}, {"model.attention": "linear"}]
  os.remove(os.path.join(din.workdir, "final_metrics.json"))

  for run in runs[:13]:  # linear's stage 1 done: its best point gets 2 seeds
    best = run.overrides.get("optimizer.lr") == 0.003
    _finish(run, **{"valid/full/ndcg@10": 0.4 if best else 0.3})
  groups = study.plan(variants, root)
  assert len(groups) == 3 and groups[1] == {
      **linear, "overrides": [{"model.attention": "linear",
                               "optimizer.lr": 0.003}], "seeds": [1, 2]}
