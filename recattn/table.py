"""Results tables from run records: mean ± std over seeds, one row per label.

  python -m recattn.table <study dir | run workdirs ...> [--split=test]
      [--protocol=full] [--baseline=<label>] [--metrics=hr@10,ndcg@10,...]
      [--format=md|latex|csv] [--out=<path prefix>]

A positional path holding `runs/` is a study: every workdir under it is used
(unfinished ones are named in the footer). Runs group into rows by
`run.json`'s label, else by the workdir name less its `_seed<k>` suffix.
Runs whose data or evaluation protocol differ are refused, never mixed.
The output depends only on the run records and the command, byte for byte,
so a committed table is regenerated exactly by the command in its footer.
"""

import csv
import dataclasses
import io
import json
import os
import re
import shlex
import statistics
import sys

from absl import app
from absl import flags

DEFAULT_METRICS = ("hr@10", "hr@50", "hr@200", "ndcg@10", "ndcg@50",
                   "ndcg@200", "mrr")
# Fields that define the data and the evaluation protocol: runs that differ
# in any of them cannot share a table. (data.max_len is a model choice.)
DATA_FIELDS = ("name", "builder", "version", "config", "preprocessing",
               "users", "items", "interactions", "synthetic", "source_sha256")
PROTOCOL_FIELDS = ("data.name", "data.train_on_valid", "eval.filter_seen",
                   "eval.num_negatives", "eval.negatives", "eval.select_metric")
# Config fields allowed to differ between the seeds of one row.
PER_RUN_FIELDS = ("seed", "progress", "data.data_dir", "data.manual_dir")
# Config fields added after runs were recorded, with the value that does what
# the code did before the field existed: a run recorded without the field is
# compared as if it had this value. Add a field only when that is exactly so.
ADDED_FIELDS = {
    "model.item_features": "none",  # no side features before f397697
    "model.time_query": "own",  # own-time interval before c8af8f3
    "model.bsarec_alpha": 0.7,  # BSARec's fields (no other model reads
    "model.bsarec_c": 5,  # them) before they existed
    "data.train_on_valid": False,  # validation items held out before f19417a
    "model.dense_init": "torch",  # PyTorch's Linear init before 25f5c4f
    "optimizer.ema_decay": 0.0,  # no parameter averaging before 938d9c2
    "model.ffn_act": "relu",  # SASRec's ReLU feed-forward before 1949185
}
_SEED_SUFFIX = re.compile(r"_{1,2}seed\d+$")


class TableError(ValueError):
  """Runs that cannot be put in one table; the message names why."""


@dataclasses.dataclass(frozen=True)
class Run:
  """One finished run's records. `path` is as reached from the command."""
  path: str
  label: str
  seed: int
  config: dict
  env: dict
  data_card: dict
  final: dict


@dataclasses.dataclass(frozen=True)
class Row:
  """A label's runs, summarised. Stats map metric -> (mean, std or None)."""
  label: str
  seeds: tuple[int, ...]
  stats: dict
  rel: dict  # metric -> relative change of the mean vs baseline, or None
  num_params: tuple[int, ...]  # distinct values over seeds
  s_per_epoch: float | None
  peak_bytes: int | None


@dataclasses.dataclass(frozen=True)
class Table:
  """What the renderers draw: rows, the columns' keys, notes and command."""
  rows: list[Row]
  split: str
  protocol: str
  metrics: list[str]
  notes: list[str]  # the footer, one sentence group per line
  command: str  # regenerates this output exactly


def _read_json(path: str) -> dict:
  with open(path) as f:
    return json.load(f)


def _flatten(d: dict, prefix: str = "") -> dict:
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flatten(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def load_run(path: str) -> Run:
  """Reads one finished workdir (final_metrics.json must exist)."""
  meta = (_read_json(os.path.join(path, "run.json"))
          if os.path.exists(os.path.join(path, "run.json")) else {})
  try:
    config = _read_json(os.path.join(path, "config.json"))
    card = _read_json(os.path.join(path, "data_card.json"))
    env = _read_json(os.path.join(path, "env.json"))
    final = _read_json(os.path.join(path, "final_metrics.json"))
  except FileNotFoundError as e:
    raise TableError(
        f"run {path} lacks {os.path.basename(e.filename)}") from None
  card = dict(card, source_sha256=sorted(
      f.get("sha256") for f in card.get("source_files") or []))
  name = os.path.basename(os.path.normpath(path))
  return Run(path=path, label=meta.get("label") or _SEED_SUFFIX.sub("", name),
             seed=int(meta.get("seed", config.get("seed", 0))),
             config=config, env=env, data_card=card, final=final)


def find_runs(paths: list[str]) -> tuple[list[Run], list[str]]:
  """Expands studies into workdirs; returns (finished runs, unfinished paths).

  Study workdirs are taken in name order; explicit workdirs in the order
  given. The same workdir reached twice is used once.
  """
  workdirs = []
  for p in paths:
    p = os.path.normpath(p)
    if not os.path.isdir(p):
      raise TableError(f"{p} is not a directory")
    if os.path.isdir(os.path.join(p, "runs")):
      runs_dir = os.path.join(p, "runs")
      workdirs += [os.path.join(runs_dir, n) for n in sorted(os.listdir(
          runs_dir)) if os.path.isdir(os.path.join(runs_dir, n))]
    else:
      workdirs.append(p)
  seen, runs, unfinished = set(), [], []
  for w in workdirs:
    if os.path.realpath(w) in seen:
      continue
    seen.add(os.path.realpath(w))
    if os.path.exists(os.path.join(w, "final_metrics.json")):
      runs.append(load_run(w))
    else:
      unfinished.append(w)
  if not runs:
    raise TableError(f"no finished runs (final_metrics.json) in {paths}")
  return runs, unfinished


def _first_difference(a: dict, b: dict, skip=()) -> str | None:
  for key in sorted(set(a) | set(b)):
    if key not in skip and a.get(key, "<missing>") != b.get(key, "<missing>"):
      return key
  return None


def _config_as_now(config: dict) -> dict:
  """A run's flat config with the fields added since it ran filled in."""
  return {**ADDED_FIELDS, **_flatten(config)}


def _attn_fields_read(config: dict) -> set[str] | None:
  """The `model.attn` fields the run's attention variant reads (None: unknown).

  Each variant reads its own options (`recattn.attention.REGISTRY`) and the
  layer around it reads `dropout`; a later change of another variant's
  default (`low_rank_chunk` 32 -> 64 at 6907349) leaves the run unchanged.
  """
  from recattn import attention  # pylint: disable=g-import-not-at-top

  variant = attention.REGISTRY.get(config.get("model.attention"))
  if variant is None:
    return None
  return {f"model.attn.{f}" for f in (*variant.options, "dropout")}


def _unread_attn_fields(a: dict, b: dict) -> set[str]:
  """`model.attn` fields of `a` or `b` that neither run's variant reads."""
  read_a, read_b = _attn_fields_read(a), _attn_fields_read(b)
  if read_a is None or read_b is None:
    return set()
  read = read_a | read_b
  return {k for k in (*a, *b) if k.startswith("model.attn.") and k not in read}


def group_runs(runs: list[Run]) -> dict[str, list[Run]]:
  """Label -> its runs sorted by seed; labels in order of first appearance.

  The seeds of a row must differ, and so must nothing else in their configs
  that the run reads: a label that hides a config difference would average
  unlike runs. Options of attention variants the row does not use are not
  compared (`_unread_attn_fields`).
  """
  groups = {}
  for r in runs:
    groups.setdefault(r.label, []).append(r)
  for label, members in groups.items():
    members.sort(key=lambda r: (r.seed, r.path))
    ref = _config_as_now(members[0].config)
    for prev, r in zip(members, members[1:]):
      if prev.seed == r.seed:
        raise TableError(f"runs {prev.path} and {r.path} of row {label!r} "
                         f"have the same seed {r.seed}")
      other = _config_as_now(r.config)
      unread = _unread_attn_fields(ref, other)
      key = _first_difference(ref, other, skip=(*PER_RUN_FIELDS, *unread))
      if key:
        raise TableError(
            f"runs {members[0].path} and {r.path} of row {label!r} differ in "
            f"config.{key} ({ref.get(key)!r} vs {other.get(key)!r})")
  return groups


def _identity(run: Run) -> dict:
  """The fields that must agree across a table: its data and protocol."""
  out = {f"data_card.{f}": run.data_card.get(f) for f in DATA_FIELDS}
  config = _config_as_now(run.config)
  out.update({f"config.{f}": config.get(f, "<missing>")
              for f in PROTOCOL_FIELDS})
  return out


def check_comparable(runs: list[Run], split: str, protocol: str,
                     metrics: list[str]) -> None:
  """Raises TableError if data or protocol differ, or a metric is missing."""
  ref = _identity(runs[0])
  for r in runs:
    other = _identity(r)
    key = _first_difference(ref, other)
    if key:
      raise TableError(f"runs {runs[0].path} and {r.path} differ in {key} "
                       f"({ref[key]!r} vs {other[key]!r})")
    for m in metrics:
      if f"{split}/{protocol}/{m}" not in r.final:
        have = sorted({k.split("/")[1] for k in r.final
                       if k.startswith(f"{split}/")})
        raise TableError(f"run {r.path} has no {split}/{protocol}/{m} in "
                         f"final_metrics.json (protocols there: {have})")


def _recorded(runs: list[Run], key: str) -> list:
  return [r.final[key] for r in runs if key in r.final]


def compute_rows(groups: dict[str, list[Run]], split: str, protocol: str,
                 metrics: list[str], baseline: str) -> list[Row]:
  """Mean and sample std (ddof=1) over seeds; relative change vs baseline."""
  if baseline not in groups:
    raise TableError(f"--baseline={baseline!r} is not a row; rows: "
                     f"{list(groups)}")
  values = {(label, m): [r.final[f"{split}/{protocol}/{m}"] for r in runs]
            for label, runs in groups.items() for m in metrics}
  rows = []
  for label, runs in groups.items():
    stats, rel = {}, {}
    for m in metrics:
      v = values[label, m]
      mean, base = statistics.fmean(v), statistics.fmean(values[baseline, m])
      stats[m] = (mean, statistics.stdev(v) if len(v) > 1 else None)
      rel[m] = None if label == baseline or not base else (mean - base) / base
    epoch_s = _recorded(runs, "train/s_per_epoch")
    peaks = _recorded(runs, "train/peak_bytes")
    params = {int(p) for p in _recorded(runs, "train/num_params")}
    rows.append(Row(
        label=label, seeds=tuple(r.seed for r in runs), stats=stats, rel=rel,
        num_params=tuple(sorted(params)),
        s_per_epoch=statistics.fmean(epoch_s) if epoch_s else None,
        # Blank unless every seed recorded it (older runs did not).
        peak_bytes=int(max(peaks)) if len(peaks) == len(runs) else None))
  return rows


def _environments(env: dict) -> list[dict]:
  """The latest environment of an env.json, then the earlier ones a resumed
  run ran on (`recattn.reporting.write_env`)."""
  return [env, *env.get("earlier", [])]


def footer_notes(runs: list[Run], unfinished: list[str], split: str,
                 protocol: str, baseline: str) -> list[str]:
  """What a reader needs to interpret the numbers: data, split, protocol."""
  card, ev = runs[0].data_card, runs[0].config.get("eval", {})
  prep = ", ".join(f"{k}={v}" for k, v in sorted(
      (card.get("preprocessing") or {}).items()))
  sampled = re.fullmatch(r"sampled_([a-z]+)(\d+)", protocol)
  candidates = (f"positive + {sampled[2]} {sampled[1]} negatives per user, "
                "none the user interacted with" if sampled else
                f"full ranking over all {card.get('items', 0):,} items")
  envs = [e for r in runs for e in _environments(r.env)]
  devices = sorted({f"{e.get('device_count')} x {e.get('device_kind')}"
                    f" (jax {e.get('packages', {}).get('jax')})"
                    for e in envs})
  commits = sorted({str(e.get("commit", "unknown"))[:7] +
                    ("-dirty" if "dirty" in str(e.get("commit")) else "")
                    for e in envs})
  lines = [
      f"Data: {card.get('name')} (builder {card.get('builder')} "
      f"{card.get('version')}, config {card.get('config')}; preprocessing "
      f"{prep}): {card.get('users', 0):,} users, {card.get('items', 0):,} "
      f"items, {card.get('interactions', 0):,} interactions.",
      "Split: leave-one-out per user (validation = second-to-last item, "
      f"test = last); numbers are {split}; " + _selection(runs[0].config),
      f"Candidates ({protocol}): {candidates}.",
      "Seen items: " + ("removed from full ranking (eval.filter_seen=true)."
                        if ev.get("filter_seen") else
                        "kept in full ranking (eval.filter_seen=false)."),
      "Cells: mean ± sample std (ddof=1) over n seeds, no std where n = 1; "
      f"(+x%) = change of the mean relative to row {baseline}; s/epoch = "
      "median epoch seconds, mean over seeds; peak = compiled train-step "
      "memory estimate.",
      f"Devices: {', '.join(devices)}. Commits: {', '.join(commits)}.",
  ]
  shared = sorted({(r.label, e["concurrent_runs"]) for r in runs
                   for e in _environments(r.env)
                   if e.get("concurrent_runs", 1) > 1})
  if shared:
    lines.append(
        "Shared device: s/epoch of " + ", ".join(
            f"{label} ({n} trainings at once)" for label, n in shared) +
        " measure trainings that shared the machine (`recattn.sweep "
        "--jobs`), for some or all of their epochs; compare them only with "
        "each other.")
  machines = {}
  for r in runs:
    for e in _environments(r.env):
      machines.setdefault(str(e.get("platform", "unknown")), set()).add(
          r.label)
  if len(machines) > 1:
    lines.append(
        f"Machines: the rows ran on {len(machines)} machine images (env.json "
        "platform); one training's s/epoch differed up to 1.7x between "
        "images and hours (experiments/000_speed_lean_step/README.md, "
        "\"Machine images\"), so compare s/epoch only between rows of one "
        "image and day: " + "; ".join(
            f"{p}: {', '.join(sorted(labels))}"
            for p, labels in sorted(machines.items())) + ".")
  if unfinished:
    lines.append("Unfinished (no final_metrics.json, not in the table): "
                 + ", ".join(unfinished) + ".")
  return lines


def _selection(config: dict) -> str:
  """How the tested checkpoint was chosen, and what was trained on."""
  select = config.get("eval", {}).get("select_metric")
  if not _config_as_now(config)["data.train_on_valid"]:
    return (f"checkpoint selected on {select}." if select != "none" else
            "no selection: the last epoch is tested.")
  return ("validation items trained on too (data.train_on_valid=true), so "
          "no selection: the last epoch is tested.")


def _parts(row: Row, m: str) -> tuple[str, str | None, str | None]:
  """(mean, std or None where n = 1, signed percent or None) as text."""
  mean, std = row.stats[m]
  rel = row.rel[m]
  # Round first, then add 0.0, so a change that rounds to zero prints +0.0.
  pct = None if rel is None else f"{round(100 * rel, 1) + 0.0:+.1f}"
  return f"{mean:.4f}", None if std is None else f"{std:.4f}", pct


def _opt(x, fmt: str) -> str:
  return "" if x is None else format(x, fmt)


def _totals(row: Row, dash: str) -> list[str]:
  """params (a range if seeds differ), s/epoch, peak MiB."""
  return [dash.join(f"{p:,}" for p in row.num_params),
          _opt(row.s_per_epoch, ".1f"),
          _opt(row.peak_bytes and row.peak_bytes / 2**20, ".1f")]


def _header(t: Table) -> list[str]:
  return (["label", "n"] + [f"{t.split} {t.protocol} {m.upper()}"
                            for m in t.metrics] +
          ["params", "s/epoch", "peak MiB"])


def render_markdown(t: Table) -> str:
  """GitHub Markdown table with a bullet-list footer."""
  head = _header(t)
  lines = ["| " + " | ".join(head) + " |",
           "|---|" + "---:|" * (len(head) - 1)]
  for row in t.rows:
    cells = [f"`{row.label}`", str(len(row.seeds))]
    for m in t.metrics:
      mean, std, pct = _parts(row, m)
      cells.append(mean + (f" ± {std}" if std else "") +
                   (f" ({pct}%)" if pct else ""))
    cells += _totals(row, "–")
    lines.append("| " + " | ".join(c.replace("|", r"\|") for c in cells)
                 + " |")
  lines += [""] + [f"- {l}" for l in t.notes]
  return "\n".join(lines + [f"- Regenerate: `{t.command}`"]) + "\n"


_TEX = {"\\": r"\textbackslash{}", "~": r"\textasciitilde{}", "^": r"\^{}",
        "±": r"$\pm$", **{c: "\\" + c for c in "&%$#_{}"}}


def _tex(s: str) -> str:
  return "".join(_TEX.get(c, c) for c in s)


def render_latex(t: Table) -> str:
  """A booktabs table; the footer as % comment lines and as the caption."""
  head = [_tex(h) for h in _header(t)]
  lines = [f"% {l}" for l in t.notes + [f"Regenerate: {t.command}"]] + [
      r"\begin{table}", r"\centering",
      r"\begin{tabular}{l" + "r" * (len(head) - 1) + "}", r"\toprule",
      " & ".join(head) + r" \\", r"\midrule"]
  for row in t.rows:
    cells = [r"\texttt{" + _tex(row.label) + "}", str(len(row.seeds))]
    for m in t.metrics:
      mean, std, pct = _parts(row, m)
      cells.append(f"${mean}" + (rf" \pm {std}" if std else "") + "$" +
                   (rf" ({pct}\%)" if pct else ""))
    cells += _totals(row, "--")
    lines.append(" & ".join(cells) + r" \\")
  lines += [r"\bottomrule", r"\end{tabular}",
            r"\caption{" + _tex(" ".join(t.notes)) + "}", r"\end{table}"]
  return "\n".join(lines) + "\n"


def render_csv(t: Table) -> str:
  """One line per row, plain numbers; the footer as trailing `# ` lines."""
  buf = io.StringIO()
  w = csv.writer(buf, lineterminator="\n")
  w.writerow(["label", "n", "seeds"] +
             [f"{t.split}/{t.protocol}/{m}_{s}" for m in t.metrics
              for s in ("mean", "std", "rel_pct")] +
             ["num_params", "s_per_epoch", "peak_bytes"])
  for row in t.rows:
    values = []
    for m in t.metrics:
      values += [v or "" for v in _parts(row, m)]
    w.writerow([row.label, len(row.seeds), " ".join(map(str, row.seeds))] +
               values + ["-".join(map(str, row.num_params)),
                         _opt(row.s_per_epoch, ".2f"),
                         _opt(row.peak_bytes, "d")])
  return buf.getvalue() + "".join(
      f"# {l}\n" for l in t.notes + [f"Regenerate: {t.command}"])


RENDERERS = {"md": render_markdown, "latex": render_latex, "csv": render_csv}
EXTENSIONS = {"md": "md", "latex": "tex", "csv": "csv"}


def command_line(paths, split, protocol, baseline, metrics, fmt, out) -> str:
  """The command that regenerates this output, every option spelled out."""
  args = ["python", "-m", "recattn.table"] + [os.path.normpath(p)
                                              for p in paths]
  args += [f"--split={split}", f"--protocol={protocol}",
           f"--baseline={baseline}", f"--metrics={','.join(metrics)}"]
  args.append(f"--out={out}" if out else f"--format={fmt}")
  return shlex.join(args)


def make_tables(paths: list[str], split: str = "test",
                protocol: str = "full", baseline: str | None = None,
                metrics=DEFAULT_METRICS, fmt: str = "md",
                out: str | None = None) -> dict[str, str]:
  """Loads, checks, summarises and renders: {format: text}.

  All three formats when `out` is set, else `fmt` only. `baseline` None
  means the first row.
  """
  metrics = list(metrics)
  runs, unfinished = find_runs(paths)
  check_comparable(runs, split, protocol, metrics)
  groups = group_runs(runs)
  baseline = baseline or next(iter(groups))
  rows = compute_rows(groups, split, protocol, metrics, baseline)
  table = Table(
      rows=rows, split=split, protocol=protocol, metrics=metrics,
      notes=footer_notes(runs, unfinished, split, protocol, baseline),
      command=command_line(paths, split, protocol, baseline, metrics, fmt,
                           out))
  return {f: RENDERERS[f](table) for f in (RENDERERS if out else [fmt])}


_SPLIT = flags.DEFINE_enum("split", "test", ["valid", "test"],
                           "Which split's metrics.")
_PROTOCOL = flags.DEFINE_string(
    "protocol", "full", "full | sampled_<uniform|popularity><N>.")
_BASELINE = flags.DEFINE_string(
    "baseline", None, "Label of the row relative changes refer to "
    "(default: the first row).")
_METRICS = flags.DEFINE_list("metrics", list(DEFAULT_METRICS),
                             "Metric names, e.g. hr@10,ndcg@10,mrr.")
_FORMAT = flags.DEFINE_enum("format", "md", list(RENDERERS),
                            "Format printed to stdout (without --out).")
_OUT = flags.DEFINE_string(
    "out", None, "Writes <out>.md, <out>.tex and <out>.csv instead.")


def main(argv):
  if len(argv) < 2:
    raise app.UsageError("give a study directory or run workdirs")
  try:
    tables = make_tables(argv[1:], _SPLIT.value, _PROTOCOL.value,
                         _BASELINE.value, _METRICS.value, _FORMAT.value,
                         _OUT.value)
  except TableError as e:
    raise SystemExit(f"error: {e}") from None
  if not _OUT.value:
    sys.stdout.write(tables[_FORMAT.value])
    return
  os.makedirs(os.path.dirname(_OUT.value) or ".", exist_ok=True)
  for fmt, text in tables.items():
    with open(f"{_OUT.value}.{EXTENSIONS[fmt]}", "w") as f:
      f.write(text)


if __name__ == "__main__":
  app.run(main)
