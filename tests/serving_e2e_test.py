"""A trained run served over HTTP: the real engine behind the real service."""

import json
import os
import subprocess
import sys
import urllib.request

import numpy as np
import pytest

from configs import test as test_config
from recattn import train
from recattn.data import loading as data_lib
from recattn.serving import engine as engine_lib
from recattn.serving import export as export_lib
from recattn.serving import server as server_lib
from recattn.serving import service as service_lib


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  root = tmp_path_factory.mktemp("serving_e2e")
  c = test_config.get_config()
  with c.unlocked():
    c.data.data_dir = str(root / "tfds")
    c.mesh.data = 1
    c.num_epochs = 2
    c.model.positions = "left"
    c.model.rel_bias = "time"
    c.data.stream_holdout = 0.1  # for the streaming replay below
  train.train_and_evaluate(c, str(root / "run"))
  return str(root / "run"), c


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _serve(engine):
  service = service_lib.Service(engine, max_users=100, max_batch=8)
  server = server_lib.make_server(service, "127.0.0.1", 0)
  thread = server_lib.serve_in_thread(server, poll_interval=0.05)
  return service, server, thread


def _call(url, method="GET", body=None):
  data = None if body is None else json.dumps(body).encode()
  req = urllib.request.Request(url, data=data, method=method,
                               headers={"Content-Type": "application/json"})
  with urllib.request.urlopen(req, timeout=60) as r:
    return json.loads(r.read())


def test_http_recommendations_equal_the_engine_on_the_same_events(workdir):
  path, config = workdir
  engine = engine_lib.Engine.from_workdir(path)
  assert engine.cached and engine.uses_time
  original = data_lib.original_item_ids(config.data)
  ds = data_lib.load(config.data)
  service, server, thread = _serve(engine)
  try:
    long = np.argsort(-ds.lengths(), kind="stable")[:3]
    assert ds.lengths()[long].min() >= 22  # > max_len (20)
    users = {f"user-{u}": (ds.sequence(u)[:22], ds.timestamps[
        ds.offsets[u]:ds.offsets[u] + 22]) for u in long}
    for t in range(22):  # interleaved across users, longer than max_len
      for name, (items, times) in users.items():
        reply = _call(server.url + "/v1/events", "POST",
                      {"user_id": name, "item_id": int(original[items[t] - 1]),
                       "timestamp": int(times[t])})
        assert reply["events"] == t + 1
    for name, (items, times) in users.items():
      got = _call(server.url + f"/v1/recommendations?user_id={name}&k=7")
      states = [engine.new_state()]
      for item, ts in zip(items, times):
        states = engine.observe(states, [item], [ts])
      ids, scores = engine.recommend(states, 7)
      assert got["items"] == [int(original[i - 1]) for i in ids[0]]
      np.testing.assert_allclose(got["scores"], scores[0], rtol=1e-5)
      # The state equals a full forward pass over the last max_len events.
      np.testing.assert_allclose(
          states[0]["h"], engine.full_forward([items], [times])[0],
          atol=1e-5, rtol=1e-5)
      assert not set(got["items"]) & {int(original[i - 1]) for i in items}
    health = _call(server.url + "/healthz")
    assert health["status"] == "ok" and health["cached"]
  finally:
    server.shutdown()
    thread.join()
    server.server_close()
    service.close()


def test_exported_engine_serves_the_same(workdir, tmp_path):
  path, _ = workdir
  engine = engine_lib.Engine.from_workdir(path)
  export_lib.export(engine, str(tmp_path / "export"))
  exported = engine_lib.Engine.from_export(str(tmp_path / "export"))
  results = []
  for e in (engine, exported):
    service, server, thread = _serve(e)
    try:
      for t in range(5):
        _call(server.url + "/v1/events", "POST",
              {"user_id": "u", "item_id": int(e.original_item_ids[t * 3]),
               "timestamp": 1000 + 60 * t})
      results.append(_call(server.url + "/v1/recommendations?user_id=u&k=10"))
    finally:
      server.shutdown()
      thread.join()
      server.server_close()
      service.close()
  assert results[0]["items"] == results[1]["items"]
  np.testing.assert_allclose(results[0]["scores"], results[1]["scores"],
                             rtol=1e-5)


def test_stream_replay_entry_point(workdir, tmp_path):
  path, config = workdir
  with open(os.path.join(path, "data_card.json")) as f:
    assert json.load(f)["time_split"]["fraction"] == 0.1
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             RECATTN_DATA_DIR=config.data.data_dir)
  out = tmp_path / "stream.json"
  run = subprocess.run(
      [sys.executable, "-m", "recattn.serving.stream", f"--workdir={path}",
       f"--out={out}", "--finetune_every=200", "--finetune_steps=1"],
      capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
  assert run.returncode == 0, run.stderr[-3000:]
  metrics = json.loads(out.read_text())["metrics"]
  assert metrics["stream/events"] > 0
  assert 0 <= metrics["stream/full/ndcg@10"] <= metrics["stream/full/hr@10"]
