"""Figures from run records and benchmark results, as PNG and SVG.

  python -m recattn.plots quality_cost <study dir | run workdirs ...> \
      --out=<prefix> [--metric=test/full/ndcg@10] [--x=train/s_per_epoch]
  python -m recattn.plots cost_vs_length <bench.py results json> --out=<prefix>
  python -m recattn.plots curves <study dir | run workdirs ...> \
      --out=<prefix> [--metric=valid/full/ndcg@10] [--per_run]
  python -m recattn.plots params <one variant's runs ...> --out=<prefix> \
      [--metric=valid/full/ndcg@10]

Each writes <prefix>.png (150 dpi) and <prefix>.svg, drawn only from the
records (final_metrics.json, metrics.jsonl, run.json, config.json, env.json)
or from experiments/002_attention_cost/bench.py output. A path holding `runs/`
is a study: its workdirs are used in name order, and those not finished yet
are skipped with a warning. Runs group by run.json's label, else by the
workdir name less its `_seed<k>` / `__seed<k>` suffix. The SVG carries the
command that made it (dc:description) and, for one matplotlib version, is
byte-identical when that command is rerun.
"""

import json
import os
import re
import shlex
import statistics

from absl import app
from absl import flags
from absl import logging
import matplotlib
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

KINDS = ("quality_cost", "cost_vs_length", "curves", "params")
DEFAULT_METRIC = {"quality_cost": "test/full/ndcg@10",
                  "curves": "valid/full/ndcg@10",
                  "params": "valid/full/ndcg@10"}
MIB = 2**20
# final_metrics.json key -> (axis label, divisor).
X_MEASURES = {
    "train/s_per_epoch": ("training time per epoch, median (s)", 1),
    "train/wall_s": ("wall time of the whole run (s)", 1),
    "train/num_params": ("parameters (count)", 1),
    "train/peak_bytes": ("compiled peak memory of a train step (MiB)", MIB),
}
TIME_MEASURES = ("train/s_per_epoch", "train/wall_s")
# Fixed ids and text kept as text, so a rerun gives the same bytes.
SVG_RC = {"svg.hashsalt": "recattn", "svg.fonttype": "none"}
_SEED_SUFFIX = re.compile(r"_{1,2}seed\d+$")
_MARKERS = "os^vD<>ph*"


class PlotError(ValueError):
  """Inputs that cannot be plotted; the message names the file or metric."""


def _read_json(path: str) -> dict:
  try:
    with open(path) as f:
      return json.load(f)
  except FileNotFoundError:
    raise PlotError(f"{path} does not exist") from None
  except json.JSONDecodeError as e:
    raise PlotError(f"{path}:{e.lineno} is not valid JSON ({e.msg})") from None


def find_workdirs(paths: list[str], needed: str) -> list[str]:
  """Expands studies into workdirs that hold the file `needed`.

  A study's workdirs without it are skipped (still running); a workdir named
  explicitly without it is an error.
  """
  out = []
  for p in map(os.path.normpath, paths):
    runs = os.path.join(p, "runs")
    if os.path.isdir(runs):
      for name in sorted(os.listdir(runs)):
        w = os.path.join(runs, name)
        if os.path.exists(os.path.join(w, needed)):
          out.append(w)
        elif os.path.isdir(w):
          logging.warning("skipping %s: no %s yet", w, needed)
    elif not os.path.isdir(p):
      raise PlotError(f"{p} is not a directory")
    elif not os.path.exists(os.path.join(p, needed)):
      raise PlotError(f"{os.path.join(p, needed)} does not exist")
    else:
      out.append(p)
  if not out:
    raise PlotError(f"no run with {needed} in {' '.join(paths)}")
  return out


def run_label(workdir: str) -> str:
  """run.json's label, else the workdir name less its seed suffix."""
  meta = os.path.join(workdir, "run.json")
  label = _read_json(meta).get("label") if os.path.exists(meta) else None
  return label or _SEED_SUFFIX.sub("", os.path.basename(workdir))


def describe_runs(workdirs: list[str]) -> str:
  """Dataset, seen-item filtering and device(s), for titles."""
  data, seen, devices = set(), set(), set()
  for w in workdirs:
    if os.path.exists(os.path.join(w, "config.json")):
      config = _read_json(os.path.join(w, "config.json"))
      data.add(str(config.get("data", {}).get("name")))
      seen.add("seen items filtered" if config.get("eval", {}).get(
          "filter_seen") else "seen items kept")
    if os.path.exists(os.path.join(w, "env.json")):
      env = _read_json(os.path.join(w, "env.json"))
      devices.add(f"{env.get('device_kind')} x{env.get('device_count')}")
  return "; ".join(", ".join(sorted(s)) for s in (data, seen, devices) if s)


def metric_text(metric: str) -> str:
  """'test/full/ndcg@10' -> 'test NDCG@10, full ranking'."""
  parts = metric.split("/")
  if len(parts) != 3:
    return metric
  split, protocol, name = parts
  sampled = re.fullmatch(r"sampled_([a-z]+)(\d+)", protocol)
  how = (f"vs {sampled[2]} {sampled[1]} negatives" if sampled
         else "full ranking" if protocol == "full" else protocol)
  return f"{split} {name.upper()}, {how}"


def load_quality_cost(paths, metric, x) -> tuple[dict, str]:
  """Returns ({label: [(x, metric) per seed]}, description of the runs)."""
  if x not in X_MEASURES:
    raise PlotError(f"unknown --x {x!r}; choose from {', '.join(X_MEASURES)}")
  workdirs = find_workdirs(paths, "final_metrics.json")
  groups = {}
  for w in workdirs:
    path = os.path.join(w, "final_metrics.json")
    final = _read_json(path)
    for key in (metric, x):
      if not isinstance(final.get(key), (int, float)):
        raise PlotError(f"metric {key!r} not in {path}")
    groups.setdefault(run_label(w), []).append(
        (final[x] / X_MEASURES[x][1], final[metric]))
  context = describe_runs(workdirs)
  images = machine_images(workdirs)
  if x in TIME_MEASURES and images > 1:
    # The same training's time differs between machine images and hours
    # (experiments/000_speed_lean_step/README.md, "Machine images").
    context += (f";\ntimes from {images} machine images, comparable only "
                "within one (table footers list them)")
  return groups, context


def machine_images(workdirs: list[str]) -> int:
  """How many machine images (env.json `platform`) the runs ran on."""
  images = set()
  for w in workdirs:
    path = os.path.join(w, "env.json")
    if os.path.exists(path):
      env = _read_json(path)
      images.update(str(e.get("platform", "unknown")) for e in
                    [env, *env.get("earlier", [])])
  return len(images)


def quality_cost_figure(groups: dict, metric: str, x: str,
                        context: str = "") -> Figure:
  """One point per label: mean over seeds, error bars = std.

  Points carry their row number; the legend below the axes maps numbers to
  labels, so long labels never overlap the data.
  """
  fig = _figure((8, 5 + 0.18 * len(groups)))
  ax = fig.add_subplot()
  for i, (label, points) in enumerate(groups.items()):
    xs, ys = zip(*points)
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    ex, ey = ((statistics.stdev(xs), statistics.stdev(ys)) if len(points) > 1
              else (None, None))
    ax.errorbar(mx, my, xerr=ex, yerr=ey, fmt=_MARKERS[i % 10],
                color=f"C{i % 10}", capsize=3, label=f"{i + 1}: {label}" + (
                    f" (n={len(points)})" if len(points) > 1 else ""))
    ax.annotate(str(i + 1), (mx, my), xytext=(5, 4),
                textcoords="offset points", fontsize=8)
  fig.legend(loc="outside lower center", fontsize=7, ncols=1, frameon=False)
  ax.set_xlabel(X_MEASURES[x][0])
  ax.set_ylabel(metric_text(metric))
  ax.set_title(f"Quality vs training cost ({context})\n"
               "mean over seeds, bars = std when n > 1", fontsize=10)
  ax.margins(0.15)
  ax.grid(alpha=0.3)
  return fig


def load_bench(path: str) -> dict:
  """A bench.py results file, its failed rows (with `error`) dropped."""
  results = _read_json(path)
  rows = [r for r in results.get("rows") or [] if "error" not in r]
  if not rows:
    raise PlotError(f"{path} has no benchmark rows")
  for i, r in enumerate(rows):
    missing = [k for k in ("variant", "L", "peak_bytes") if k not in r]
    if missing:
      raise PlotError(f"{path}: row {i} lacks {', '.join(missing)}")
  return dict(results, rows=rows)


def cost_vs_length_figure(results: dict) -> Figure:
  """Time and peak memory against L, log-log, one line per variant.

  Rows not timed (no "s": skipped or compile-only) are left out of the time
  panel only; their memory is XLA's compiled estimate, valid without a run.
  """
  fig = _figure((12, 4.8))
  ax_t, ax_m = fig.subplots(1, 2)
  lines = {}
  for r in results["rows"]:
    opts = ", ".join(f"{k}={v}"
                     for k, v in sorted((r.get("options") or {}).items()))
    name = r["variant"] + (f" ({opts})" if opts else "")
    lines.setdefault(name, []).append(r)
  for i, (name, rows) in enumerate(lines.items()):
    rows = sorted(rows, key=lambda r: r["L"])
    style = dict(color=f"C{i % 10}", marker=_MARKERS[i % 10], label=name)
    timed = [r for r in rows if r.get("s") is not None]
    if timed:
      ax_t.plot([r["L"] for r in timed], [r["s"] for r in timed], **style)
    ax_m.plot([r["L"] for r in rows], [r["peak_bytes"] / MIB for r in rows],
              **style)
  timed_any = any(r.get("s") is not None for r in results["rows"])
  if not timed_any:  # a log axis with no data cannot be drawn
    ax_t.text(0.5, 0.5, "no timed rows (compile-only run)", ha="center",
              transform=ax_t.transAxes)
    ax_t.set(xticks=[], yticks=[])
  ax_t.set(ylabel="time per call, median (s)",
           title="time of one forward+backward call")
  ax_m.set(ylabel="peak memory (MiB)",
           title="peak memory, XLA compiled estimate")
  for ax in (ax_t, ax_m) if timed_any else (ax_m,):
    ax.set(xscale="log", yscale="log")
  for ax in (ax_t, ax_m):
    ax.set_xlabel("sequence length L (tokens)")
    ax.grid(alpha=0.3)
  env = results.get("env", {})
  shape = (f"B={results['batch']}" if results.get("batch") else
           f"B = {results.get('tokens')} / L sequences")
  fig.suptitle(
      f"Attention cost vs sequence length: {env.get('device_kind', '?')} "
      f"x{env.get('device_count', '?')}, {results['rows'][0].get('dtype')}, "
      f"d={results.get('dim')}, H={results.get('heads')}, {shape}, causal",
      fontsize=10)
  fig.legend(*ax_m.get_legend_handles_labels(), loc="outside lower center",
             ncols=min(len(lines), 5), fontsize=8)
  return fig


def load_curves(paths: list[str], metric: str) -> tuple[dict, str]:
  """Returns ({label: [(loss {epoch: v}, metric {epoch: v}) per run]}, text).

  A resumed run logs some epochs twice; the later record wins.
  """
  workdirs = find_workdirs(paths, "metrics.jsonl")
  groups = {}
  for w in workdirs:
    path, loss, values = os.path.join(w, "metrics.jsonl"), {}, {}
    with open(path) as f:
      for lineno, line in enumerate(f, 1):
        try:
          record = json.loads(line) if line.strip() else {}
        except json.JSONDecodeError:
          raise PlotError(f"{path}:{lineno} is not valid JSON") from None
        epoch = record.get("train/epoch")
        if epoch is not None and "train/loss" in record:
          loss[epoch] = record["train/loss"]
        if epoch is not None and metric in record:
          values[epoch] = record[metric]
    if not values:
      raise PlotError(f"metric {metric!r} not in {path}")
    groups.setdefault(run_label(w), []).append((loss, values))
  return groups, describe_runs(workdirs)


def curves_figure(groups: dict, metric: str, context: str = "",
                  per_run: bool = False) -> Figure:
  """Loss and `metric` against epoch: mean ± std band per label, or runs."""
  fig = _figure((12, 4.8))
  axes = fig.subplots(1, 2)
  for i, (label, runs) in enumerate(groups.items()):
    for ax, series in zip(axes, zip(*runs)):
      if per_run or len(series) == 1:
        for j, s in enumerate(series):
          ax.plot(sorted(s), [s[e] for e in sorted(s)], color=f"C{i % 10}",
                  label=label if j == 0 else None, alpha=0.8)
        continue
      epochs = sorted(set.intersection(*(set(s) for s in series)))
      mean = [statistics.fmean(s[e] for s in series) for e in epochs]
      std = [statistics.stdev(s[e] for s in series) for e in epochs]
      ax.plot(epochs, mean, color=f"C{i % 10}",
              label=f"{label} (mean ± std, n={len(series)})")
      ax.fill_between(epochs, [m - s for m, s in zip(mean, std)],
                      [m + s for m, s in zip(mean, std)],
                      color=f"C{i % 10}", alpha=0.2, linewidth=0)
  axes[0].set(ylabel="training loss, epoch mean",
              title="train/loss (each run's own loss)")
  axes[1].set(ylabel=metric_text(metric), title=metric)
  for ax in axes:
    ax.set_xlabel("epoch")
    ax.grid(alpha=0.3)
  axes[1].legend(fontsize=8)
  fig.suptitle(f"Training curves ({context})", fontsize=10)
  return fig


# Per-head sizes whose 0 in a config means dim // num_heads
# (models/sasrec.py, models/hstu.py): a panel shows the size the model had.
_PER_HEAD_FIELDS = ("model.qk_dim", "model.v_dim")


def _config_value(workdir: str, field: str):
  path = os.path.join(workdir, "config.json")
  config = value = _read_json(path)
  for part in field.split("."):
    if not isinstance(value, dict) or part not in value:
      raise PlotError(f"{path} has no field {field!r}")
    value = value[part]
  if field in _PER_HEAD_FIELDS and value == 0:
    return config["model"]["dim"] // config["model"]["num_heads"]
  return value


def load_params(paths: list[str], metric: str) -> tuple[dict, str, str]:
  """One-at-a-time parameter runs around a centre (study 009's stage 1).

  The centre is the label whose run.json overrides every other label's
  overrides contain; every other label moves exactly one more field.

  Returns:
    ({field: [(value, [metric per seed], is the centre), ...] sorted by
    value, the centre's value included}, centre label, description).
  """
  workdirs = find_workdirs(paths, "final_metrics.json")
  groups = {}  # label -> (overrides, workdir of one seed, [metric])
  for w in workdirs:
    meta = os.path.join(w, "run.json")
    if not os.path.exists(meta):
      raise PlotError(f"{meta} does not exist: a params plot reads each "
                      "run's overrides from the sweep's run.json")
    record, final = _read_json(meta), _read_json(
        os.path.join(w, "final_metrics.json"))
    if not isinstance(final.get(metric), (int, float)):
      raise PlotError(f"metric {metric!r} not in "
                      f"{os.path.join(w, 'final_metrics.json')}")
    overrides, _, values = groups.setdefault(
        record["label"], (record["overrides"], w, []))
    values.append(final[metric])
  items = {label: {(k, json.dumps(v)) for k, v in o.items()}
           for label, (o, _, _) in groups.items()}
  centres = [a for a in items if all(items[a] <= items[b] for b in items)]
  if len(centres) != 1:
    raise PlotError(f"no single centre among {sorted(items)}: one label's "
                    "overrides must be contained in every other label's")
  centre = centres[0]
  axes = {}
  for label, (overrides, _, values) in groups.items():
    if label == centre:
      continue
    moved = sorted(k for k, _ in items[label] - items[centre])
    if len(moved) != 1:
      raise PlotError(f"run {label} differs from the centre {centre} in "
                      f"{moved}; a params plot moves one field at a time")
    axes.setdefault(moved[0], []).append((overrides[moved[0]], values,
                                          False))
  for field, points in axes.items():
    points.append((_config_value(groups[centre][1], field),
                   groups[centre][2], True))
    points.sort(key=lambda p: p[0])
  return dict(sorted(axes.items())), centre, describe_runs(workdirs)


def params_figure(axes: dict, centre: str, metric: str,
                  context: str = "") -> Figure:
  """One panel per field: mean ± std over seeds per value; centre in black."""
  if not axes:
    raise PlotError(f"only the centre {centre} has finished runs")
  cols = min(4, len(axes))
  rows = -(-len(axes) // cols)
  fig = _figure((3.2 * cols, 2.8 * rows + 0.6))
  panels = fig.subplots(rows, cols, sharey=True, squeeze=False).ravel()
  for ax, (field, points) in zip(panels, axes.items()):
    for x, (_, ys, is_centre) in enumerate(points):
      err = statistics.stdev(ys) if len(ys) > 1 else None
      ax.errorbar(x, statistics.fmean(ys), yerr=err, fmt="o", capsize=3,
                  color="black" if is_centre else "C0")
    ax.plot(range(len(points)),
            [statistics.fmean(ys) for _, ys, _ in points], color="C0",
            alpha=0.5)
    ax.set_xticks(range(len(points)), [f"{v:g}" if isinstance(v, float)
                                       else str(v) for v, _, _ in points])
    ax.set_title(field, fontsize=9)
    ax.grid(alpha=0.3)
  for ax in panels[len(axes):]:
    ax.set_visible(False)
  for ax in panels[::cols]:
    ax.set_ylabel(metric_text(metric), fontsize=8)
  fig.suptitle(f"One parameter at a time around {centre} ({context})\n"
               "mean over seeds, bars = std when n > 1", fontsize=10)
  return fig


def _figure(size) -> Figure:
  """A figure on an Agg canvas, outside pyplot: no GUI, no global state."""
  fig = Figure(figsize=size, layout="constrained")
  FigureCanvasAgg(fig)
  return fig


def make_figure(kind: str, paths: list[str], metric: str | None = None,
                x: str = "train/s_per_epoch", per_run: bool = False) -> Figure:
  """Loads the inputs of `kind` and draws its figure."""
  if kind not in KINDS:
    raise PlotError(f"unknown plot kind {kind!r}; choose from "
                    f"{', '.join(KINDS)}")
  metric = metric or DEFAULT_METRIC.get(kind)
  if kind == "quality_cost":
    groups, context = load_quality_cost(paths, metric, x)
    return quality_cost_figure(groups, metric, x, context)
  if kind == "cost_vs_length":
    if len(paths) != 1:
      raise PlotError("cost_vs_length takes one results json")
    return cost_vs_length_figure(load_bench(paths[0]))
  if kind == "params":
    axes, centre, context = load_params(paths, metric)
    return params_figure(axes, centre, metric, context)
  groups, context = load_curves(paths, metric)
  return curves_figure(groups, metric, context, per_run)


def save(fig: Figure, prefix: str, description: str = "") -> list[str]:
  """Writes <prefix>.png (150 dpi) and a reproducible <prefix>.svg."""
  os.makedirs(os.path.dirname(prefix) or ".", exist_ok=True)
  meta = {"Description": description} if description else {}
  fig.savefig(f"{prefix}.png", dpi=150, metadata=meta)
  with matplotlib.rc_context(SVG_RC):
    fig.savefig(f"{prefix}.svg", metadata=dict(meta, Date=None))
  return [f"{prefix}.png", f"{prefix}.svg"]


def command_line(kind, paths, out, metric, x, per_run) -> str:
  """The command that regenerates the figure, every option spelled out."""
  args = ["python", "-m", "recattn.plots", kind,
          *map(os.path.normpath, paths), f"--out={out}"]
  if kind != "cost_vs_length":
    args.append(f"--metric={metric or DEFAULT_METRIC[kind]}")
  if kind == "quality_cost":
    args.append(f"--x={x}")
  if kind == "curves" and per_run:
    args.append("--per_run")
  return shlex.join(args)


def _define_flags():
  # Only when run as a program: recattn.table defines --out as well, and absl
  # refuses one flag name from two modules imported into one process.
  flags.DEFINE_string("out", None, "Path prefix: writes <out>.png, <out>.svg.")
  flags.DEFINE_string("metric", None, "Metric key; default per kind: "
                      f"{DEFAULT_METRIC}.")
  flags.DEFINE_enum("x", "train/s_per_epoch", list(X_MEASURES),
                    "Training-cost measure of quality_cost.")
  flags.DEFINE_bool("per_run", False, "curves: one line per run, no means.")
  flags.mark_flag_as_required("out")


def main(argv):
  if len(argv) < 3:
    raise app.UsageError(f"give a kind ({', '.join(KINDS)}) and its inputs")
  f = flags.FLAGS
  kind, paths = argv[1], argv[2:]
  try:
    fig = make_figure(kind, paths, f.metric, f.x, f.per_run)
  except PlotError as e:
    raise SystemExit(f"error: {e}") from None
  for path in save(fig, f.out, command_line(kind, paths, f.out, f.metric,
                                            f.x, f.per_run)):
    print(path)


if __name__ == "__main__":
  _define_flags()
  app.run(main)
