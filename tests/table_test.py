"""Tables from fake run records: grouping, statistics, formats, refusals."""

import json
import os
import pathlib
import shlex
import shutil
import subprocess
import sys

import jax
import pytest

from recattn import reporting
from recattn import table

ROOT = pathlib.Path(__file__).resolve().parents[1]
TEMPLATE = ROOT / "experiments/001_sasrec_ml1m/runs/sasrec_ml1m"
HR10 = "test/full/hr@10"


def _load(name: str) -> dict:
  return json.loads((TEMPLATE / name).read_text())


def make_run(workdir, hr10=None, seed=0, label=None, config=None, card=None,
             finished=True, peak=None, **final):
  """Writes a run record: the real ML-1M record with a few fields changed."""
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True)
  cfg = _load("config.json")
  cfg["seed"] = seed
  for dotted, value in (config or {}).items():
    *path, last = dotted.split(".")
    node = cfg
    for key in path:
      node = node.setdefault(key, {})
    node[last] = value
  records = {"config.json": cfg, "env.json": _load("env.json"),
             "data_card.json": dict(_load("data_card.json"), **(card or {}))}
  if finished:
    metrics = _load("final_metrics.json")
    if hr10 is not None:
      metrics[HR10] = hr10
    if peak is not None:
      metrics["train/peak_bytes"] = peak
    metrics.update({k.replace("__", "/"): v for k, v in final.items()})
    records["final_metrics.json"] = metrics
  if label is not None:
    records["run.json"] = {"study": "s", "label": label, "seed": seed,
                           "config": "configs/sasrec_ml1m.py", "overrides": {},
                           "command": ["python", "-m", "recattn.main"]}
  for name, obj in records.items():
    (workdir / name).write_text(json.dumps(obj, indent=2, sort_keys=True))
  return str(workdir)


@pytest.fixture
def study(tmp_path):
  """Row a: three seeds (hr@10 .30 .32 .34); b: one seed (.25); c: (.20)."""
  runs = tmp_path / "study" / "runs"
  for seed, hr in enumerate((0.30, 0.32, 0.34)):
    make_run(runs / f"a_seed{seed}", hr, seed=seed)
  make_run(runs / "b_seed0", 0.25, config={"data.max_len": 50})
  make_run(runs / "c__seed3", 0.20, seed=3, config={"model.dim": 64})
  return str(tmp_path / "study")


def _rows(paths, baseline=None, metrics=("hr@10",)):
  runs, _ = table.find_runs(paths)
  groups = table.group_runs(runs)
  return table.compute_rows(groups, "test", "full", list(metrics),
                            baseline or next(iter(groups)))


def test_groups_by_name_without_seed_suffix(study):
  runs, unfinished = table.find_runs([study])
  groups = table.group_runs(runs)
  assert list(groups) == ["a", "b", "c"]
  assert [r.seed for r in groups["a"]] == [0, 1, 2]
  assert [r.seed for r in groups["c"]] == [3]
  assert unfinished == []


def test_groups_by_run_json_label(tmp_path):
  runs = tmp_path / "runs"
  make_run(runs / "x_lr1e-3_s7", 0.3, seed=7, label="sasrec")
  make_run(runs / "y_whatever", 0.4, seed=1, label="sasrec")
  make_run(runs / "z_seed0", 0.5, config={"model.dim": 64})
  groups = table.group_runs(table.find_runs([str(tmp_path)])[0])
  assert list(groups) == ["sasrec", "z"]
  assert [r.seed for r in groups["sasrec"]] == [1, 7]


def test_mean_and_sample_std_against_hand_computed(study):
  rows = _rows([study])
  a = rows[0]
  assert a.seeds == (0, 1, 2)
  mean, std = a.stats["hr@10"]
  assert mean == pytest.approx(0.32, abs=1e-12)
  # ((-.02)^2 + 0 + .02^2) / (3 - 1) = .0004 -> .02
  assert std == pytest.approx(0.02, abs=1e-12)
  assert a.num_params == (226450,)
  assert a.s_per_epoch == pytest.approx(18.11035966873169)


def test_relative_change_against_baseline(study):
  rows = {r.label: r for r in _rows([study], baseline="b")}
  assert rows["b"].rel["hr@10"] is None
  assert rows["a"].rel["hr@10"] == pytest.approx((0.32 - 0.25) / 0.25)
  assert rows["c"].rel["hr@10"] == pytest.approx(-0.2)
  md = table.make_tables([study], baseline="b", metrics=["hr@10"])["md"]
  assert "| `a` | 3 | 0.3200 ± 0.0200 (+28.0%) |" in md
  assert "| `c` | 1 | 0.2000 (-20.0%) |" in md
  with pytest.raises(table.TableError, match="--baseline='nope'"):
    table.make_tables([study], baseline="nope")


def test_default_baseline_is_first_row(study):
  md = table.make_tables([study], metrics=["hr@10"])["md"]
  assert "| `a` | 3 | 0.3200 ± 0.0200 |" in md
  assert "| `b` | 1 | 0.2500 (-21.9%) |" in md
  assert "--baseline=a" in md


def test_single_seed_has_no_std(study):
  md = table.make_tables([study], baseline="b", metrics=["hr@10"])["md"]
  row_b = next(l for l in md.splitlines() if l.startswith("| `b`"))
  assert row_b == "| `b` | 1 | 0.2500 | 226,450 | 18.1 |  |"
  assert "no std where n = 1" in md
  csv_b = next(l for l in table.make_tables(
      [study], baseline="b", metrics=["hr@10"], fmt="csv")["csv"].splitlines()
                if l.startswith("b,"))
  assert csv_b == "b,1,0,0.2500,,,226450,18.11,"


def test_all_formats_hold_numbers_and_footer(tmp_path):
  runs = tmp_path / "s" / "runs"
  make_run(runs / "base_seed0", 0.25, peak=3 * 2**20)
  make_run(runs / "new_model_seed0", 0.30, peak=3 * 2**20,
           config={"model.dim": 64})
  make_run(runs / "new_model_seed1", 0.34, seed=1, peak=3 * 2**20,
           config={"model.dim": 64})
  out = table.make_tables([str(tmp_path / "s")], metrics=["hr@10", "mrr"],
                          out=str(tmp_path / "t"))
  assert set(out) == {"md", "latex", "csv"}
  md, tex, csv = out["md"], out["latex"], out["csv"]
  assert ("| `new_model` | 2 | 0.3200 ± 0.0283 (+28.0%) | 0.1273 ± 0.0000"
          in md)
  assert "| 226,450 | 18.1 | 3.0 |" in md
  assert (r"\texttt{new\_model} & 2 & $0.3200 \pm 0.0283$ (+28.0\%) & "
          r"$0.1273 \pm 0.0000$ (+0.0\%) & 226,450 & 18.1 & 3.0 \\") in tex
  assert ("new_model,2,0 1,0.3200,0.0283,+28.0,0.1273,0.0000,+0.0,226450,"
          "18.11,3145728") in csv
  for text, prefix in ((md, "- "), (tex, "% "), (csv, "# ")):
    assert (f"{prefix}Data: ml-1m-seq (builder ml1m_seq 1.0.0, config "
            "r0_i0_u3; preprocessing min_item_count=0, min_rating=0.0, "
            "min_user_count=3): 6,040 users, 3,706 items, 1,000,209 "
            "interactions.") in text
    assert "second-to-last" in text
    assert "checkpoint selected on valid/full/ndcg@10" in text
    assert "full ranking over all 3,706 items" in text
    assert "removed from full ranking (eval.filter_seen=true)" in text
    assert "Devices: 1 x cpu (jax 0.10.2). Commits: 3abcc44." in text
    assert f"{prefix}Regenerate: " in text
    assert "--out=" + str(tmp_path / "t") in text
  assert r"\caption{Data: ml-1m-seq" in tex


def test_sampled_protocol_footer(study):
  md = table.make_tables([study], protocol="sampled_uniform100",
                         metrics=["ndcg@10"])["md"]
  assert "test sampled_uniform100 NDCG@10" in md
  assert "| `a` | 3 | 0.6020 ± 0.0000 |" in md
  assert "positive + 100 uniform negatives per user" in md


def test_output_is_deterministic(tmp_path):
  def build(order):
    shutil.rmtree(tmp_path / "s", ignore_errors=True)
    for seed in order:
      make_run(tmp_path / "s" / "runs" / f"m_seed{seed}", 0.3 + seed / 100,
               seed=seed)
    return table.make_tables([str(tmp_path / "s")], out="x")
  first = build([0, 1, 2])
  assert build([0, 1, 2]) == first
  assert build([2, 0, 1]) == first  # creation (listing) order is irrelevant


def test_seed_order_on_command_line_does_not_change_numbers(tmp_path):
  paths = [make_run(tmp_path / f"m_seed{s}", 0.3 + s / 7, seed=s)
           for s in range(3)]
  def body(ps):
    out = table.make_tables(ps, out="x")
    return {f: text.split("Regenerate")[0] for f, text in out.items()}
  assert body(paths) == body(paths[::-1])
  assert "m,3,0 1 2," in body(paths[::-1])["csv"]


def test_command_in_footer_regenerates_the_files(study, tmp_path):
  out = str(tmp_path / "tables" / "t")
  cmd = [sys.executable, "-m", "recattn.table", study, "--baseline=b",
         "--metrics=hr@10,ndcg@10", f"--out={out}"]
  subprocess.run(cmd, check=True, cwd=ROOT)
  files = {ext: pathlib.Path(f"{out}.{ext}").read_bytes()
           for ext in ("md", "tex", "csv")}
  footer = files["csv"].decode().splitlines()[-1]
  regen = shlex.split(footer.removeprefix("# Regenerate: "))
  assert regen[:3] == ["python", "-m", "recattn.table"]
  for p in files:
    pathlib.Path(f"{out}.{p}").unlink()
  subprocess.run([sys.executable] + regen[1:], check=True, cwd=ROOT)
  for ext, data in files.items():
    assert pathlib.Path(f"{out}.{ext}").read_bytes() == data
  stdout = subprocess.run(
      [sys.executable, "-m", "recattn.table", study, "--format=csv"],
      check=True, cwd=ROOT, capture_output=True, text=True).stdout
  assert stdout.startswith("label,n,seeds,test/full/hr@10_mean,")


def test_refuses_different_data_version(tmp_path):
  a = make_run(tmp_path / "a", 0.3)
  b = make_run(tmp_path / "b", 0.3, card={"version": "1.1.0"})
  with pytest.raises(table.TableError) as e:
    table.make_tables([a, b])
  assert str(e.value) == (f"runs {a} and {b} differ in data_card.version "
                          "('1.0.0' vs '1.1.0')")


def test_refuses_different_filter_seen(tmp_path):
  a = make_run(tmp_path / "a", 0.3)
  b = make_run(tmp_path / "b", 0.3, config={"eval.filter_seen": False})
  with pytest.raises(table.TableError,
                     match=r"differ in config\.eval\.filter_seen"):
    table.make_tables([a, b])


def test_training_on_validation_items_is_its_own_protocol(tmp_path):
  # The template run predates data.train_on_valid: it held them out.
  held_out = make_run(tmp_path / "a", 0.3,
                      config={"eval.select_metric": "none"})
  refit = make_run(tmp_path / "b", 0.3, config={
      "eval.select_metric": "none", "data.train_on_valid": True})
  with pytest.raises(table.TableError, match=r"differ in "
                     r"config\.data\.train_on_valid \(False vs True\)"):
    table.make_tables([held_out, refit])
  split = [line for line in table.make_tables([refit])["md"].splitlines()
           if line.startswith("- Split:")]
  assert split == ["- Split: leave-one-out per user (validation = "
                   "second-to-last item, test = last); numbers are test; "
                   "validation items trained on too (data.train_on_valid="
                   "true), so no selection: the last epoch is tested."]
  assert "no selection: the last epoch is tested." in (
      table.make_tables([held_out])["md"])


def test_refuses_missing_protocol(study):
  with pytest.raises(table.TableError, match=(
      r"runs/a_seed0 has no test/sampled_popularity100/hr@10 in "
      r"final_metrics.json \(protocols there: \['full', "
      r"'sampled_uniform100'\]\)")):
    table.make_tables([study], protocol="sampled_popularity100")


def test_refuses_unlike_runs_in_one_row(tmp_path):
  a = make_run(tmp_path / "m_seed0", 0.3)
  b = make_run(tmp_path / "x" / "m_seed1", 0.3, seed=1,
               config={"model.dim": 64})
  with pytest.raises(table.TableError, match=r"row 'm' differ in "
                     r"config\.model\.dim \(50 vs 64\)"):
    table.make_tables([a, b])
  c = make_run(tmp_path / "y" / "m_seed0", 0.3)
  with pytest.raises(table.TableError, match="have the same seed 0"):
    table.make_tables([a, c])


def test_fields_added_since_a_run_read_as_their_old_behaviour(tmp_path):
  old = make_run(tmp_path / "m_seed0", 0.3)  # recorded before item_features
  assert "item_features" not in json.loads(
      (pathlib.Path(old) / "config.json").read_text())["model"]
  same = make_run(tmp_path / "x" / "m_seed1", 0.3, seed=1,
                  config={"model.item_features": "none"})
  groups = table.group_runs(table.find_runs([old, same])[0])
  assert [r.seed for r in groups["m"]] == [0, 1]
  unlike = make_run(tmp_path / "y" / "m_seed1", 0.3, seed=1,
                    config={"model.item_features": "attributes"})
  with pytest.raises(table.TableError, match=r"config\.model\.item_features "
                     r"\('none' vs 'attributes'\)"):
    table.make_tables([old, unlike])


def test_options_of_an_unused_attention_variant_may_differ(tmp_path):
  def run(path, seed, attention="scaled_dot", **attn):
    attn = {"temperature": 1.0, "dropout": 0.0, "low_rank_chunk": 64, **attn}
    config = {f"model.attn.{k}": v for k, v in attn.items()}
    return make_run(tmp_path / path / f"m_seed{seed}", 0.3, seed=seed,
                    config={"model.attention": attention, **config})

  old = run("a", 0, low_rank_chunk=32)
  groups = table.group_runs(table.find_runs([old, run("b", 1)])[0])
  assert [r.seed for r in groups["m"]] == [0, 1]
  # The variant's own options, and the layer's dropout, must still agree.
  for field, a, b in (("temperature", 1.0, 0.5), ("dropout", 0.0, 0.1)):
    with pytest.raises(table.TableError,
                       match=rf"config\.model\.attn\.{field} \({a} vs {b}\)"):
      table.make_tables([run(f"{field}0", 0), run(field, 1, **{field: b})])
  with pytest.raises(table.TableError,
                     match=r"config\.model\.attn\.low_rank_chunk \(32 vs 64\)"):
    table.make_tables([run("lr0", 0, "low_rank", low_rank_chunk=32),
                       run("lr1", 1, "low_rank")])


def test_unfinished_runs_are_noted(study):
  make_run(pathlib.Path(study) / "runs" / "d_seed0", finished=False)
  md = table.make_tables([study])["md"]
  assert "`d`" not in md
  assert ("- Unfinished (no final_metrics.json, not in the table): "
          f"{study}/runs/d_seed0.") in md


def test_cli_refusal_is_one_line(tmp_path):
  a = make_run(tmp_path / "a", 0.3)
  b = make_run(tmp_path / "b", 0.3, config={"eval.num_negatives": 50})
  proc = subprocess.run([sys.executable, "-m", "recattn.table", a, b],
                        cwd=ROOT, capture_output=True, text=True)
  assert proc.returncode == 1
  assert proc.stdout == ""
  assert proc.stderr == (f"error: runs {a} and {b} differ in "
                         "config.eval.num_negatives (100 vs 50)\n")


def test_footer_names_every_device_a_resumed_run_ran_on(tmp_path):
  # A run started on a GPU and resumed on the CPU keeps both environments
  # (reporting.write_env); the footer names both.
  workdir = make_run(tmp_path / "s" / "runs" / "a_seed0", 0.3)
  env_path = os.path.join(workdir, "env.json")
  gpu = dict(_load("env.json"), device_kind="NVIDIA H200", commit="bd78247")
  with open(env_path, "w") as f:
    json.dump(gpu, f)
  reporting.write_env(env_path)
  with open(env_path) as f:
    env = json.load(f)
  assert env["earlier"] == [gpu] and "earlier" not in env["earlier"][0]
  md = table.make_tables([str(tmp_path / "s")], metrics=["hr@10"])["md"]
  assert "1 x NVIDIA H200 (jax 0.10.2)" in md
  assert f"{jax.device_count()} x {jax.devices()[0].device_kind} (jax" in md
  assert "bd78247" in md


def test_footer_names_rows_trained_on_a_shared_device(tmp_path, monkeypatch):
  # `recattn.sweep --jobs=2` sets reporting.CONCURRENT_ENV for its
  # trainings; a run that shared the machine for part of its epochs (then
  # resumed alone) is named once in the footer, the others not at all.
  shared = make_run(tmp_path / "s" / "runs" / "b_seed0", 0.3)
  make_run(tmp_path / "s" / "runs" / "a_seed0", 0.3)
  env_path = os.path.join(shared, "env.json")
  monkeypatch.setenv(reporting.CONCURRENT_ENV, "2")
  reporting.write_env(env_path)
  monkeypatch.delenv(reporting.CONCURRENT_ENV)
  reporting.write_env(env_path)
  with open(env_path) as f:
    env = json.load(f)
  assert "concurrent_runs" not in env
  assert env["earlier"][-1]["concurrent_runs"] == 2
  md = table.make_tables([str(tmp_path / "s")], metrics=["hr@10"])["md"]
  shared_lines = [l for l in md.splitlines() if "Shared device" in l]
  assert len(shared_lines) == 1, md
  assert "b (2 trainings at once)" in shared_lines[0]
  assert "a (" not in shared_lines[0]


def test_footer_has_no_shared_device_line_for_runs_alone(study):
  md = table.make_tables([study], metrics=["hr@10"])["md"]
  assert "Shared device" not in md
  # One machine image: nothing to warn about.
  assert "Machines:" not in md


def test_footer_groups_rows_by_machine_image(tmp_path):
  # Row b's seed 1 was resumed on another image (its earlier environment
  # keeps the first); the footer names each image once with its rows.
  make_run(tmp_path / "s" / "runs" / "a_seed0", 0.3)
  b1 = make_run(tmp_path / "s" / "runs" / "b_seed1", 0.3, seed=1)
  make_run(tmp_path / "s" / "runs" / "b_seed2", 0.3, seed=2)
  env_path = os.path.join(b1, "env.json")
  with open(env_path) as f:
    env = json.load(f)
  first = env["platform"]
  env["earlier"] = [dict(env)]
  env["platform"] = "Linux-other-image"
  with open(env_path, "w") as f:
    json.dump(env, f)
  md = table.make_tables([str(tmp_path / "s")], metrics=["hr@10"])["md"]
  lines = [l for l in md.splitlines() if "Machines:" in l]
  assert len(lines) == 1, md
  assert "on 2 machine images" in lines[0]
  assert f"{first}: a, b;" in lines[0]
  assert lines[0].endswith("Linux-other-image: b.")


@pytest.mark.parametrize("committed", sorted(
    str(p.relative_to(ROOT)) for p in ROOT.glob("experiments/*/table_*.csv")))
def test_committed_tables_regenerate_byte_for_byte(committed, tmp_path):
  # The footer's command, run from a copy of the tree that holds only the
  # studies' run records (a table may compare runs of several studies),
  # must write the committed .md, .tex and .csv again.
  footer = (ROOT / committed).read_text().splitlines()[-1]
  command = shlex.split(footer.removeprefix("# Regenerate: "))
  assert command[:3] == ["python", "-m", "recattn.table"], footer
  # A workdir only this checkout has (an unfinished or uncommitted run)
  # would regenerate here and fail on a fresh clone.
  if (ROOT / ".git").exists():
    for arg in command[3:]:
      if not arg.startswith("--") and not (ROOT / arg / "runs").is_dir():
        record = f"{arg}/final_metrics.json"
        tracked = subprocess.run(["git", "ls-files", "--error-unmatch",
                                  record], cwd=ROOT, capture_output=True)
        assert tracked.returncode == 0, (
            f"{committed} names {arg}, whose final_metrics.json is not "
            "committed")
  for runs in ROOT.glob("experiments/*/runs"):
    (tmp_path / runs.parent.relative_to(ROOT)).mkdir(parents=True)
    (tmp_path / runs.relative_to(ROOT)).symlink_to(runs)
  env = dict(os.environ, PYTHONPATH=str(ROOT))
  subprocess.run([sys.executable, *command[1:]], check=True, cwd=tmp_path,
                 env=env, capture_output=True)
  stem = committed.removesuffix(".csv")
  for ext in ("md", "tex", "csv"):
    assert (tmp_path / f"{stem}.{ext}").read_bytes() == (
        ROOT / f"{stem}.{ext}").read_bytes(), f"{stem}.{ext}"


@pytest.mark.skipif(not (ROOT / ".git").exists(), reason="needs the git tree")
def test_every_committed_run_record_is_a_finished_run():
  # A run still training writes config/env/metrics records that are not
  # git-ignored; committing them (`git add experiments`) would ship a row
  # that every table leaves out as unfinished. Committed run directories
  # must hold the final metrics.
  listed = subprocess.run(["git", "ls-files", "--", "experiments"], cwd=ROOT,
                          capture_output=True, text=True, check=True).stdout
  files = {pathlib.PurePosixPath(line) for line in listed.splitlines()}
  records = {f.parent for f in files
             if f.name == "config.json" and f.parent.parent.name == "runs"}
  assert records, "no committed run records under experiments/*/runs"
  unfinished = sorted(str(d) for d in records
                      if d / "final_metrics.json" not in files)
  assert not unfinished, (
      f"committed runs without final_metrics.json: {unfinished}")
