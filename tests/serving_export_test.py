"""Exported serving functions (jax.export) give the in-process results."""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from configs import base as base_config
from recattn import models
from recattn.serving import engine as engine_lib
from recattn.serving import export as export_lib

NUM_ITEMS = 40
MAX_LEN = 8


def _engine(attention, rel_bias="none", positions="left", rank_head=False):
  c = base_config.get_base_config().model
  c.attention = attention
  c.dim = 16
  c.num_heads = 2
  c.rel_bias = rel_bias
  c.positions = positions
  c.rank_head = rank_head
  model = models.create(c, num_items=NUM_ITEMS, max_len=MAX_LEN, seed=1)
  return engine_lib.Engine.from_model(
      model, max_len=MAX_LEN, original_item_ids=np.arange(NUM_ITEMS) * 7,
      max_seen=16, info={"test": True})


def _replay(engine, n=MAX_LEN + 3, users=3, seed=0):
  rng = np.random.default_rng(seed)
  items = rng.integers(1, NUM_ITEMS + 1, size=(users, n))
  times = np.cumsum(rng.integers(1, 999, size=(users, n)), 1) + 10**9
  states = [engine.new_state() for _ in range(users)]
  hs = []
  for t in range(n):
    states = engine.observe(states, items[:, t], times[:, t])
    hs.append(np.stack([s["h"] for s in states]))
  return states, np.stack(hs)


@pytest.mark.parametrize("attention,rel_bias,positions", [
    ("scaled_dot", "position+time", "left"),
    ("linear", "none", "left"),
    ("scaled_dot", "none", "right"),  # not cacheable: re-encodes
])
def test_export_matches_in_process(tmp_path, attention, rel_bias, positions):
  engine = _engine(attention, rel_bias, positions)
  meta = export_lib.export(engine, str(tmp_path))
  assert meta["cached"] == (positions != "right")
  loaded = engine_lib.Engine.from_export(str(tmp_path))
  assert loaded.spec == engine.spec
  states_a, h_a = _replay(engine)
  states_b, h_b = _replay(loaded)
  np.testing.assert_allclose(h_b, h_a, rtol=1e-6, atol=1e-6)
  for k in (5, 16, 20):
    ids_a, scores_a = engine.recommend(states_a, k)
    ids_b, scores_b = loaded.recommend(states_b, k)
    np.testing.assert_array_equal(ids_b, ids_a)
    np.testing.assert_allclose(scores_b, scores_a, rtol=1e-6, atol=1e-6)
  # Any batch size runs on the one export (symbolic batch dimension).
  states_c, _ = _replay(loaded, users=5, seed=3)
  assert len(loaded.recommend(states_c, 3)[0]) == 5


@pytest.mark.parametrize("attention,rel_bias", [("scaled_dot", "time"),
                                               ("linear", "none")])
def test_candidate_scores_exported_and_in_process(tmp_path, attention,
                                                  rel_bias):
  engine = _engine(attention, rel_bias, rank_head=True)
  assert engine.describe()["candidate_scoring"]
  export_lib.export(engine, str(tmp_path))
  loaded = engine_lib.Engine.from_export(str(tmp_path))
  states, _ = _replay(engine, n=5)
  rng = np.random.default_rng(2)
  lists = [rng.integers(1, NUM_ITEMS + 1, n) for n in (1, 7, 20)]
  got = engine.score(states, lists)
  assert [len(x) for x in got] == [1, 7, 20]
  # One list at a time, or each candidate alone: the same logits.
  for i, c in enumerate(lists):
    alone = [engine.score([states[i]], [[item]])[0][0] for item in c]
    np.testing.assert_allclose(got[i], alone, rtol=1e-5, atol=1e-5)
  exported = loaded.score(_replay(loaded, n=5)[0], lists)
  for a, b in zip(got, exported):
    np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-6)


def test_engines_without_a_ranking_head_say_why(tmp_path):
  engine = _engine("scaled_dot")
  assert not engine.describe()["candidate_scoring"]
  assert "rank_head" in engine.describe()["why_no_candidate_scoring"]
  with pytest.raises(ValueError, match="rank_head"):
    engine.score([engine.new_state()], [[1]])
  export_lib.export(engine, str(tmp_path))
  loaded = engine_lib.Engine.from_export(str(tmp_path))
  with pytest.raises(ValueError, match="rank_head"):
    loaded.score([loaded.new_state()], [[1]])


def test_exported_engine_needs_no_model_code(tmp_path):
  export_lib.export(_engine("hstu", "position+time"), str(tmp_path))
  script = textwrap.dedent(f"""
      import sys
      # Any import of model, attention, training or flax code fails.
      for name in ("flax", "recattn.models", "recattn.attention",
                   "recattn.train", "recattn.serving.incremental",
                   "recattn.data"):
        sys.modules[name] = None
      from recattn.serving import engine
      e = engine.Engine.from_export({str(tmp_path)!r})
      s = e.observe([e.new_state()], [3], [10**9])
      s = e.observe(s, [4], [10**9 + 60])
      ids, scores = e.recommend(s, 5)
      assert ids.shape == (1, 5) and 3 not in ids[0] and 4 not in ids[0]
      print("ok", e.describe()["cached"])
  """)
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, "-c", script], capture_output=True,
                       text=True, env=env, cwd=os.path.dirname(
                           os.path.dirname(os.path.abspath(__file__))),
                       timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "ok True" in out.stdout


def test_missing_export_dir_says_how_to_make_one(tmp_path):
  with pytest.raises(FileNotFoundError, match="recattn.serving.export"):
    engine_lib.Engine.from_export(str(tmp_path))
