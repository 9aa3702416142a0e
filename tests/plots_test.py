"""Figures from fake run records and the real benchmark results."""

import json
import pathlib
import subprocess
import sys

import pytest

from recattn import plots

ROOT = pathlib.Path(__file__).resolve().parents[1]
TEMPLATE = ROOT / "experiments/001_sasrec_ml1m/runs/sasrec_ml1m"
BENCH = ROOT / "experiments/002_attention_cost/results_cpu.json"
BENCH_B1 = ROOT / "experiments/002_attention_cost/memory_b1_cpu.json"
NDCG = "test/full/ndcg@10"
VALID = "valid/full/ndcg@10"


def make_run(workdir, ndcg=0.1, s_per_epoch=10.0, loss_shift=0.0, label=None,
             finished=True, num_epochs=10):
  """The real ML-1M record, cut to `num_epochs` epochs, a few fields changed.

  Epoch e logs train/loss = e + loss_shift; every 5th epoch also logs
  valid/full/ndcg@10 = e / 100 + loss_shift.
  """
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True)
  for name in ("config.json", "env.json"):
    (workdir / name).write_text((TEMPLATE / name).read_text())
  lines = (TEMPLATE / "metrics.jsonl").read_text().splitlines()[:num_epochs]
  records = []
  for line in lines:
    r = json.loads(line)
    e = r["train/epoch"]
    r["train/loss"] = e + loss_shift
    if VALID in r:
      r[VALID] = e / 100 + loss_shift
    records.append(json.dumps(r))
  (workdir / "metrics.jsonl").write_text("\n".join(records) + "\n")
  if finished:
    final = json.loads((TEMPLATE / "final_metrics.json").read_text())
    final.update({NDCG: ndcg, "train/s_per_epoch": s_per_epoch})
    (workdir / "final_metrics.json").write_text(json.dumps(final))
  if label:
    (workdir / "run.json").write_text(json.dumps(
        {"study": "s", "label": label, "seed": 0, "config": "c.py",
         "overrides": {}, "command": ["python", "-m", "recattn.main"]}))
  return str(workdir)


@pytest.fixture
def study(tmp_path):
  """a: seeds 0, 1 (ndcg .10 .14, 10 s 14 s); b: one run named by run.json."""
  runs = tmp_path / "study" / "runs"
  make_run(runs / "a__seed0", 0.10, 10.0, loss_shift=0.0)
  make_run(runs / "a__seed1", 0.14, 14.0, loss_shift=1.0)
  make_run(runs / "b_run7", 0.20, 30.0, label="b")
  make_run(runs / "c__seed0", finished=False)  # still running
  return str(tmp_path / "study")


def _figure_args(kind, study, params_study=None):
  return {"quality_cost": [study], "curves": [study],
          "cost_vs_length": [str(BENCH)],
          "params": [str(params_study.parent)]}[kind]


@pytest.mark.parametrize("kind", plots.KINDS)
def test_writes_png_and_reproducible_svg(kind, study, params_study, tmp_path):
  prefix = str(tmp_path / "out" / kind)
  svgs = []
  for _ in range(2):
    fig = plots.make_figure(kind, _figure_args(kind, study, params_study))
    png, svg = plots.save(fig, prefix, description=f"cmd {kind}")
    svgs.append(pathlib.Path(svg).read_bytes())
  assert pathlib.Path(png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert b"<svg" in svgs[0] and b"cmd " + kind.encode() in svgs[0]
  assert b"<dc:date>" not in svgs[0]
  assert svgs[0] == svgs[1]


def test_quality_cost_groups_seeds_by_label(study):
  groups, context = plots.load_quality_cost([study], NDCG, "train/s_per_epoch")
  # c has no final_metrics.json yet: skipped, not an error.
  assert groups == {"a": [(10.0, 0.10), (14.0, 0.14)], "b": [(30.0, 0.20)]}
  assert context == "ml-1m-seq; seen items filtered; cpu x1"
  ax = plots.quality_cost_figure(groups, NDCG, "train/s_per_epoch").axes[0]
  points = {t.get_text(): t.xy for t in ax.texts}
  assert points["1"] == pytest.approx((12.0, 0.12))
  assert points["2"] == pytest.approx((30.0, 0.20))
  legend = ax.figure.legends[0]
  assert [t.get_text() for t in legend.get_texts()] == ["1: a (n=2)", "2: b"]
  assert ax.get_ylabel() == "test NDCG@10, full ranking"
  assert ax.get_xlabel() == "training time per epoch, median (s)"


def test_quality_cost_title_says_when_times_come_from_several_machines(
    study):
  env_path = pathlib.Path(study) / "runs" / "b_run7" / "env.json"
  env = json.loads(env_path.read_text())
  env_path.write_text(json.dumps(dict(env, platform="Linux-other-image")))
  _, context = plots.load_quality_cost([study], NDCG, "train/s_per_epoch")
  assert context.endswith(
      ";\ntimes from 2 machine images, comparable only within one "
      "(table footers list them)")
  # Parameter counts do not depend on the machine.
  _, context = plots.load_quality_cost([study], NDCG, "train/num_params")
  assert "machine images" not in context


def test_quality_cost_explicit_workdirs_and_x(study):
  runs = pathlib.Path(study) / "runs"
  groups, _ = plots.load_quality_cost(
      [str(runs / "b_run7")], "test/sampled_uniform100/hr@10",
      "train/num_params")
  assert groups == {"b": [(226450, pytest.approx(0.8120860927))]}


def test_cost_vs_length_omits_untimed_points_from_time_only():
  results = plots.load_bench(str(BENCH))
  fig = plots.cost_vs_length_figure(results)
  ax_t, ax_m = fig.axes
  time = {l.get_label(): list(l.get_xdata()) for l in ax_t.lines}
  memory = {l.get_label(): (list(l.get_xdata()), list(l.get_ydata()))
            for l in ax_m.lines}
  din = [r for r in results["rows"] if r["variant"] == "din"]
  timed = [r["L"] for r in din if r.get("s") is not None]
  assert len(timed) < len(din)  # over the memory budget at long L: untimed
  assert time["din"] == timed
  assert memory["din"] == ([r["L"] for r in din], pytest.approx(
      [r["peak_bytes"] / 2**20 for r in din]))
  assert "local (window=64)" in memory
  assert ax_t.get_xscale() == ax_m.get_yscale() == "log"
  assert "B = 16384 / L" in fig.get_suptitle()


def test_cost_vs_length_compile_only_file_has_memory_only():
  fig = plots.cost_vs_length_figure(plots.load_bench(str(BENCH_B1)))
  ax_t, ax_m = fig.axes
  assert not ax_t.lines and len(ax_m.lines) == 6
  assert "B=1" in fig.get_suptitle()


def test_curves_mean_per_label_and_per_run(study):
  groups, _ = plots.load_curves([study], VALID)
  assert sorted(groups) == ["a", "b", "c"]  # unfinished runs have curves
  loss_ax, metric_ax = plots.curves_figure(groups, VALID).axes
  lines = {l.get_label(): l for l in loss_ax.lines}
  mean = lines["a (mean ± std, n=2)"]
  assert list(mean.get_xdata()) == list(range(1, 11))
  assert list(mean.get_ydata()) == pytest.approx([e + 0.5 for e in range(1, 11)])
  metric = {l.get_label(): l for l in metric_ax.lines}["b"]
  assert list(metric.get_xdata()) == [5, 10]
  assert list(metric.get_ydata()) == pytest.approx([0.05, 0.10])
  per_run = plots.curves_figure(groups, VALID, per_run=True).axes[0]
  assert len(per_run.lines) == 4


def test_curves_later_record_of_an_epoch_wins(tmp_path):
  w = pathlib.Path(make_run(tmp_path / "r"))
  with open(w / "metrics.jsonl", "a") as f:  # resumed from epoch 5
    f.write(json.dumps({"train/epoch": 5, "train/loss": -1.0,
                        VALID: 0.5}) + "\n")
  (loss, values), = plots.load_curves([str(w)], VALID)[0]["r"]
  assert loss[5] == -1.0 and values[5] == 0.5 and len(loss) == 10


@pytest.mark.parametrize("kind,paths,metric,message", [
    ("quality_cost", ["{s}/runs/a__seed0"], "test/full/ndcg@11",
     "metric 'test/full/ndcg@11' not in {s}/runs/a__seed0/final_metrics.json"),
    ("curves", ["{s}"], "valid/full/ndcg@11",
     "metric 'valid/full/ndcg@11' not in {s}/runs/a__seed0/metrics.jsonl"),
    ("quality_cost", ["{s}/runs/c__seed0"], None,
     "{s}/runs/c__seed0/final_metrics.json does not exist"),
    ("curves", ["{s}/nowhere"], None, "{s}/nowhere is not a directory"),
    ("cost_vs_length", ["{s}/bench.json"], None,
     "{s}/bench.json does not exist"),
    ("histogram", ["{s}"], None, "unknown plot kind 'histogram'"),
])
def test_bad_inputs_name_the_path_or_metric(study, kind, paths, metric,
                                            message):
  paths = [p.format(s=study) for p in paths]
  with pytest.raises(plots.PlotError) as e:
    plots.make_figure(kind, paths, metric)
  assert message.format(s=study) in str(e.value)
  assert "\n" not in str(e.value)


def test_bad_json_names_file_and_line(tmp_path):
  w = pathlib.Path(make_run(tmp_path / "r"))
  with open(w / "metrics.jsonl", "a") as f:
    f.write('{"train/epoch": 11, "train/lo\n')
  with pytest.raises(plots.PlotError, match=r"metrics.jsonl:11 is not valid"):
    plots.load_curves([str(w)], VALID)
  bench = tmp_path / "bench.json"
  bench.write_text(json.dumps({"rows": [{"variant": "dot", "L": 8}]}))
  with pytest.raises(plots.PlotError, match="row 0 lacks peak_bytes"):
    plots.load_bench(str(bench))
  with pytest.raises(plots.PlotError, match="unknown --x 'train/flops'"):
    plots.load_quality_cost([str(w)], NDCG, "train/flops")


def test_cli_writes_files_and_fails_in_one_line(study, tmp_path):
  out = tmp_path / "figs" / "qc"
  cmd = [sys.executable, "-m", "recattn.plots", "quality_cost", study,
         f"--out={out}", "--x=train/wall_s"]
  done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                        check=True)
  assert done.stdout.split() == [f"{out}.png", f"{out}.svg"]
  svg = pathlib.Path(f"{out}.svg").read_text()
  assert f"--metric={NDCG} --x=train/wall_s" in svg  # the regenerate command
  bad = subprocess.run(cmd[:-1] + ["--metric=test/full/ndcg@11"], cwd=ROOT,
                       capture_output=True, text=True)
  assert bad.returncode == 1
  assert bad.stderr.strip().splitlines()[-1] == (
      "error: metric 'test/full/ndcg@11' not in "
      f"{study}/runs/a__seed0/final_metrics.json")


def _params_run(runs, label, overrides, seed, ndcg):
  w = make_run(runs / f"{label}__seed{seed}")
  final_path = pathlib.Path(w) / "final_metrics.json"
  final = json.loads(final_path.read_text())
  final[VALID] = ndcg
  final_path.write_text(json.dumps(final))
  (pathlib.Path(w) / "run.json").write_text(json.dumps(
      {"study": "009", "label": label, "seed": seed, "config": "c.py",
       "overrides": overrides, "command": []}))


@pytest.fixture
def params_study(tmp_path):
  runs = tmp_path / "params" / "runs"
  centre = {"model.attention": "linear"}
  for seed, ndcg in enumerate((0.10, 0.12, 0.14)):
    _params_run(runs, "c", centre, seed, ndcg)
  _params_run(runs, "c_h2", {**centre, "model.num_heads": 2}, 0, 0.2)
  _params_run(runs, "c_h5", {**centre, "model.num_heads": 5}, 0, 0.05)
  _params_run(runs, "c_lr", {**centre, "optimizer.lr": 0.003}, 0, 0.3)
  return runs


def test_params_panels_hold_the_centre_and_its_one_field_moves(params_study):
  axes, centre, _ = plots.load_params([str(params_study.parent)], VALID)
  assert centre == "c"
  # the centre's own values come from its config.json (1 head, lr 1e-3)
  assert axes == {
      "model.num_heads": [(1, [0.10, 0.12, 0.14], True), (2, [0.2], False),
                          (5, [0.05], False)],
      "optimizer.lr": [(0.001, [0.10, 0.12, 0.14], True), (0.003, [0.3],
                                                           False)]}
  fig = plots.params_figure(axes, centre, VALID)
  first = fig.axes[0]
  assert first.get_title() == "model.num_heads"
  assert [t.get_text() for t in first.get_xticklabels()] == ["1", "2", "5"]


def test_params_shows_the_centres_per_head_size_not_its_zero(params_study):
  # qk_dim = 0 means dim // num_heads (50 // 1 in the template's config)
  for w in params_study.glob("c__seed*"):
    config = json.loads((w / "config.json").read_text())
    config["model"]["qk_dim"] = 0
    (w / "config.json").write_text(json.dumps(config))
  _params_run(params_study, "c_dk", {"model.attention": "linear",
                                     "model.qk_dim": 25}, 0, 0.2)
  axes, _, _ = plots.load_params([str(params_study.parent)], VALID)
  assert [(v, c) for v, _, c in axes["model.qk_dim"]] == [(25, False),
                                                          (50, True)]


def test_params_refuses_runs_that_move_two_fields(params_study):
  _params_run(params_study, "c_two", {"model.attention": "linear",
                                      "model.num_heads": 2,
                                      "optimizer.lr": 0.003}, 0, 0.3)
  with pytest.raises(plots.PlotError, match=r"run c_two differs from the "
                     r"centre c in \['model.num_heads', 'optimizer.lr'\]"):
    plots.load_params([str(params_study.parent)], VALID)
