"""Tests for the HTTP serving layer (`recattn.serving.service`, `server`,
`state_store` and `monitoring`).

The engine is `serving.fake.FakeEngine` (ranking: the items after the
newest one, l+1, l+2, ...; see its docstring), so every answer is known
exactly. The real HTTP server runs on a free port in a thread and is driven
with `urllib.request` / `http.client`.
"""

import http.client
import json
import os
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest

from recattn.serving import fake
from recattn.serving import server as server_lib
from recattn.serving import service as service_lib
from recattn.serving import state_store

NUM_ITEMS, MAX_LEN = 50, 8


class Client:
  """A running service + server, and a urllib client for it."""

  def __init__(self, engine=None, **kwargs):
    self.engine = engine or fake.FakeEngine(NUM_ITEMS, MAX_LEN)
    self.service = service_lib.Service(self.engine, **kwargs)
    self.server = server_lib.make_server(self.service, port=0)
    self.thread = server_lib.serve_in_thread(self.server, 0.05)

  def close(self):
    self.server.shutdown()
    self.server.server_close()
    self.service.close()

  def request(self, method, path, body=None, headers=None):
    """(status, parsed JSON or text) of one request."""
    if body is not None and not isinstance(body, bytes):
      body = json.dumps(body).encode()
    req = urllib.request.Request(self.server.url + path, data=body,
                                 method=method, headers=headers or {})
    try:
      with urllib.request.urlopen(req, timeout=10) as f:
        status, text, kind = f.status, f.read().decode(), f.headers
    except urllib.error.HTTPError as e:
      status, text, kind = e.code, e.read().decode(), e.headers
    if kind.get("Content-Type") == "application/json":
      return status, json.loads(text)
    return status, text

  def event(self, user, internal_item, timestamp=None):
    body = {"user_id": user,
            "item_id": int(self.engine.original(internal_item))}
    if timestamp is not None:
      body["timestamp"] = timestamp
    status, reply = self.request("POST", "/v1/events", body)
    assert status == 200, reply
    return reply

  def recs(self, user, k=5, exclude_seen=None):
    path = f"/v1/recommendations?user_id={user}&k={k}"
    if exclude_seen is not None:
      path += f"&exclude_seen={str(exclude_seen).lower()}"
    status, reply = self.request("GET", path)
    assert status == 200, reply
    return reply


@pytest.fixture
def make_client():
  clients = []

  def make(**kwargs):
    clients.append(Client(**kwargs))
    return clients[-1]

  yield make
  for c in clients:
    c.close()


@pytest.fixture
def client(make_client):
  return make_client()


def _window(svc, user):
  state, _ = svc.store.get(user, touch=False)
  return [int(i) for i in state["items"] if i]


def test_top_k_in_original_ids(client):
  assert client.event("a", 5) == {"user_id": "a", "events": 1}
  assert client.event("a", 20, timestamp=1_000_000) == {"user_id": "a",
                                                         "events": 2}
  reply = client.recs("a", k=4)
  want = [21, 22, 23, 24]
  assert reply["items"] == client.engine.original(want).tolist()
  assert reply["scores"] == pytest.approx(
      [1 - i / NUM_ITEMS for i in range(4)])
  assert reply["cold_start"] is False and reply["user_id"] == "a"
  state, events = client.service.store.get("a")
  assert events == 2 and state["times"][-1] == 1_000_000


def test_cold_start_does_not_store_the_user(client):
  reply = client.recs("nobody", k=3)
  assert reply["cold_start"] is True
  assert reply["items"] == client.engine.original([1, 2, 3]).tolist()
  assert "nobody" not in client.service.store


def test_exclude_seen(client):
  client.event("a", 7)
  client.event("a", 5)  # Newest 5: ranking 6, 7, 8, 9; 7 and 5 are seen.
  orig = client.engine.original
  assert client.recs("a", 3)["items"] == orig([6, 8, 9]).tolist()
  assert client.recs("a", 3, True)["items"] == orig([6, 8, 9]).tolist()
  assert client.recs("a", 3, False)["items"] == orig([6, 7, 8]).tolist()


def test_all_items_seen_drops_minus_inf(make_client):
  c = make_client(engine=fake.FakeEngine(num_items=4, max_len=8))
  for i in (1, 2, 3):
    c.event("a", i)
  reply = c.recs("a", k=4)
  assert reply["items"] == c.engine.original([4]).tolist()
  assert len(reply["scores"]) == 1


class _NanColdStartEngine(fake.FakeEngine):
  """Scores users without events NaN, as a popularity fallback may."""

  def recommend(self, states, k, exclude_seen=True):
    ids, scores = super().recommend(states, k, exclude_seen)
    scores[[int(s["count"]) == 0 for s in states]] = np.nan
    return ids, scores


def test_nan_scores_are_null_not_dropped(make_client):
  c = make_client(engine=_NanColdStartEngine(NUM_ITEMS, MAX_LEN))
  reply = c.recs("new", k=3)
  assert reply["items"] == c.engine.original([1, 2, 3]).tolist()
  assert reply["scores"] == [None] * 3 and reply["cold_start"] is True
  c.event("new", 1)
  assert None not in c.recs("new", k=3)["scores"]


def _bad_requests(c):
  item = int(c.engine.original(3))
  too_big = b'{"user_id": "x", "item_id": ' + b"1" * 70_000 + b"}"
  missing = int(c.engine.original_item_ids.max()) + 1
  recs = "/v1/recommendations"
  return [
      # (method, path, body, status, words in the error)
      ("POST", "/v1/events", b"{bad", 400, ["not valid JSON", "item_id"]),
      ("POST", "/v1/events", b"", 400, ["not valid JSON"]),
      ("POST", "/v1/events", [1, 2], 400, ["JSON object"]),
      ("POST", "/v1/events", {"item_id": item}, 400, ["missing", "user_id"]),
      ("POST", "/v1/events", {"user_id": "x"}, 400, ["missing", "item_id"]),
      ("POST", "/v1/events", {"user_id": "x", "item_id": True}, 400,
       ["item_id", "integer", "bool"]),
      ("POST", "/v1/events", {"user_id": "x", "item_id": 3.0}, 400,
       ["item_id", "integer", "float"]),
      ("POST", "/v1/events", {"user_id": "x", "item_id": str(item)}, 400,
       ["item_id", "str"]),
      ("POST", "/v1/events", {"user_id": "x", "item_id": missing}, 400,
       ["not in the catalogue"]),
      ("POST", "/v1/events", {"user_id": "x", "item_id": 10**30}, 400,
       ["not in the catalogue"]),
      ("POST", "/v1/events", {"user_id": 7, "item_id": item}, 400,
       ["user_id", "string", "int"]),
      ("POST", "/v1/events", {"user_id": "", "item_id": item}, 400,
       ["user_id", "1 to 256"]),
      ("POST", "/v1/events", {"user_id": "x" * 257, "item_id": item}, 400,
       ["user_id"]),
      ("POST", "/v1/events",
       {"user_id": "x", "item_id": item, "timestamp": -1}, 400,
       ["timestamp", "0..2147483647", "-1"]),
      ("POST", "/v1/events",
       {"user_id": "x", "item_id": item, "timestamp": 2**31}, 400,
       ["timestamp", str(2**31)]),
      ("POST", "/v1/events",
       {"user_id": "x", "item_id": item, "timestamp": 1.5}, 400,
       ["timestamp", "float"]),
      ("POST", "/v1/events",
       {"user_id": "x", "item_id": item, "timestamp": True}, 400,
       ["timestamp", "bool"]),
      ("POST", "/v1/events",
       {"user_id": "x", "item_id": item, "timestamp": 2**63}, 400,
       ["timestamp"]),
      ("POST", "/v1/events", {"user_id": "x", "item_id": item, "foo": 1}, 400,
       ["unknown field", "foo", "allowed"]),
      ("POST", "/v1/events",
       b'{"user_id": "x", "item_id": 1, "item_id": 2}', 400,
       ["duplicate", "item_id"]),
      ("POST", "/v1/events", too_big, 413, ["65536"]),
      ("POST", "/v1/score", {"item_ids": [item]}, 400, ["missing", "user_id"]),
      ("POST", "/v1/score", {"user_id": "x"}, 400, ["missing", "item_ids"]),
      ("POST", "/v1/score", {"user_id": "x", "item_ids": []}, 400,
       ["item_ids", "non-empty list"]),
      ("POST", "/v1/score", {"user_id": "x", "item_ids": item}, 400,
       ["item_ids", "list", "int"]),
      ("POST", "/v1/score", {"user_id": "x", "item_ids": [item, "7"]}, 400,
       ["item_ids[1]", "integer", "str"]),
      ("POST", "/v1/score", {"user_id": "x", "item_ids": [item, missing]},
       400, ["item_ids[1]", "not in the catalogue"]),
      ("POST", "/v1/score", {"user_id": "x", "item_ids": [item] * 1025}, 400,
       ["1025", "at most 1024"]),
      ("POST", "/v1/score", {"user_id": "x", "item_ids": [item], "k": 1}, 400,
       ["unknown field", "k"]),
      ("GET", "/v1/score", None, 405, ["allows POST"]),
      ("GET", f"{recs}?user_id=x&k=0", None, 400, ["k", "[1, 50]", "0"]),
      ("GET", f"{recs}?user_id=x&k=51", None, 400, ["k", "[1, 50]"]),
      ("GET", f"{recs}?user_id=x&k=-3", None, 400, ["k", "[1, 50]"]),
      ("GET", f"{recs}?user_id=x&k=abc", None, 400, ["k", "abc"]),
      ("GET", f"{recs}?user_id=x&k=2.5", None, 400, ["k"]),
      ("GET", f"{recs}?user_id=x&exclude_seen=yes", None, 400,
       ["exclude_seen", "true or false"]),
      ("GET", f"{recs}?k=3", None, 400, ["missing", "user_id"]),
      ("GET", f"{recs}?user_id=", None, 400, ["user_id"]),
      ("GET", f"{recs}?user_id=x&user_id=y", None, 400, ["twice"]),
      ("GET", f"{recs}?user_id=x&kk=3", None, 400, ["unknown parameter"]),
      ("GET", "/metrics?format=xml", None, 400, ["format", "prometheus"]),
      ("POST", "/v1/snapshot", {"path": "/tmp/x"}, 400, ["path"]),
      ("POST", "/v1/snapshot", {}, 400, ["no snapshot path"]),
      ("GET", "/v2/events", None, 404, ["unknown path", "/v1/events"]),
      ("GET", "/", None, 404, ["unknown path"]),
      ("GET", "/v1/events", None, 405, ["allows POST"]),
      ("POST", recs, {"user_id": "x"}, 405, ["allows GET"]),
      ("PUT", "/v1/events", {"user_id": "x"}, 405, ["allows POST"]),
      ("DELETE", "/healthz", None, 405, ["allows GET"]),
  ]


def test_bad_requests_are_4xx_and_leave_state_alone(client):
  client.event("keep", 4)
  client.event("keep", 9)
  before_entry = client.service.store.get("keep", touch=False)
  before_recs = client.recs("keep", 5)
  for method, path, body, status, words in _bad_requests(client):
    got, reply = client.request(method, path, body)
    assert got == status, (method, path, body, reply)
    assert set(reply) == {"error"}, reply
    for w in words:
      assert w in reply["error"], (path, body, reply)
    assert "Traceback" not in reply["error"]
  assert client.service.store.get("keep", touch=False) is before_entry
  assert client.service.store.user_ids() == ["keep"]  # "x" never stored.
  assert client.recs("keep", 5) == before_recs
  assert client.event("keep", 1)["events"] == 3


def test_score_candidates_in_original_ids(client):
  client.event("a", 7)
  orig = client.engine.original
  # Newest item 7: item j scores 1 - ((j - 8) mod N) / N, seen items too.
  status, reply = client.request(
      "POST", "/v1/score",
      {"user_id": "a", "item_ids": orig([9, 7, 8, 9]).tolist()})
  assert status == 200, reply
  assert reply["items"] == orig([9, 7, 8, 9]).tolist()
  assert reply["scores"] == pytest.approx(
      [1 - 1 / NUM_ITEMS, 1 - (NUM_ITEMS - 1) / NUM_ITEMS, 1.0,
       1 - 1 / NUM_ITEMS])
  assert reply["cold_start"] is False
  status, reply = client.request("POST", "/v1/score",
                                 {"user_id": "new", "item_ids": [int(orig(1))]})
  assert status == 200 and reply["cold_start"] is True
  assert "new" not in client.service.store


def test_score_without_a_ranking_head_is_501(make_client):
  engine = fake.FakeEngine(NUM_ITEMS, MAX_LEN)
  engine.describe = lambda: {"candidate_scoring": False,
                             "why_no_candidate_scoring": "no head here"}
  c = make_client(engine=engine)
  status, reply = c.request("POST", "/v1/score",
                            {"user_id": "a", "item_ids": [1000]})
  assert status == 501 and "no head here" in reply["error"]


def test_405_has_allow_header_and_keep_alive_survives_errors(client):
  conn = http.client.HTTPConnection("127.0.0.1", client.server.server_port,
                                    timeout=10)
  item = int(client.engine.original(2))

  def call(method, path, body=None):
    data = None if body is None else json.dumps(body)
    conn.request(method, path, body=data)
    r = conn.getresponse()
    return r, json.loads(r.read())

  r, _ = call("GET", "/v1/events", None)
  assert r.status == 405 and r.getheader("Allow") == "POST"
  r, _ = call("POST", "/nowhere", {"a": 1})  # 404 with a body, read off.
  assert r.status == 404
  r, _ = call("POST", "/v1/events", {"user_id": "u", "item_id": "x"})
  assert r.status == 400
  r, reply = call("POST", "/v1/events", {"user_id": "u", "item_id": item})
  assert r.status == 200 and reply["events"] == 1
  r, reply = call("GET", "/v1/recommendations?user_id=u&k=2")
  assert reply["items"] == client.engine.original([3, 4]).tolist()
  conn.close()


def test_keep_alive_requests_are_not_delayed(client):
  # Without TCP_NODELAY each reply waits ~40 ms for a delayed ACK.
  conn = http.client.HTTPConnection("127.0.0.1", client.server.server_port,
                                    timeout=10)
  start = time.perf_counter()
  for _ in range(25):
    conn.request("GET", "/v1/recommendations?user_id=u&k=2")
    assert conn.getresponse().read()
  assert time.perf_counter() - start < 0.75
  conn.close()


def test_content_length_missing_or_chunked(client):
  conn = http.client.HTTPConnection("127.0.0.1", client.server.server_port,
                                    timeout=10)
  conn.putrequest("POST", "/v1/events")
  conn.endheaders()
  r = conn.getresponse()
  assert r.status == 411 and "Content-Length" in json.loads(r.read())["error"]
  conn.close()
  conn = http.client.HTTPConnection("127.0.0.1", client.server.server_port,
                                    timeout=10)
  conn.putrequest("POST", "/v1/events")
  conn.putheader("Transfer-Encoding", "chunked")
  conn.endheaders()  # The server answers before any chunk is sent.
  r = conn.getresponse()
  assert r.status == 411 and "chunked" in json.loads(r.read())["error"]
  conn.close()


def test_engine_failure_fails_only_that_batch(make_client):
  c = make_client(engine=fake.FakeEngine(NUM_ITEMS, MAX_LEN, fail_items=[3]))
  c.event("a", 4)
  entry = c.service.store.get("a", touch=False)
  status, reply = c.request(
      "POST", "/v1/events",
      {"user_id": "a", "item_id": int(c.engine.original(3))})
  assert status == 500
  assert "engine.observe failed" in reply["error"]
  assert "fake failure" in reply["error"] and "Traceback" not in reply["error"]
  assert c.service.store.get("a", touch=False) is entry
  assert c.event("a", 6)["events"] == 2
  assert _window(c.service, "a") == [4, 6]
  _, metrics = c.request("GET", "/metrics")
  assert metrics["engine_errors"] == 1
  assert metrics["requests"]["/v1/events"] == {"200": 2, "500": 1}


def test_engine_failure_in_a_batch_stores_nothing_from_it():
  engine = fake.FakeEngine(NUM_ITEMS, MAX_LEN, fail_items=[3])
  with service_lib.Service(engine, max_batch=3, max_wait_ms=500) as svc:
    futures = [svc.submit_observe("good", int(engine.original(5))),
               svc.submit_observe("bad", int(engine.original(3))),
               svc.submit_recommend("other", 2)]
    for f in futures[:2]:
      with pytest.raises(service_lib.EngineError, match="batch of 2"):
        f.result(10)
    assert futures[2].result(10)["cold_start"] is True  # Recommend: fine.
    assert svc.store.user_ids() == []
    assert svc.observe("good", int(engine.original(5)))["events"] == 1


def test_same_user_events_in_one_batch_keep_arrival_order():
  engine = fake.FakeEngine(NUM_ITEMS, MAX_LEN)
  with service_lib.Service(engine, max_batch=64, max_wait_ms=300) as svc:
    seq = {"a": [5, 9, 2, 30, 7, 11], "b": [40, 41, 1], "c": [8]}
    order = [("a", 0), ("b", 0), ("a", 1), ("a", 2), ("c", 0), ("b", 1),
             ("a", 3), ("b", 2), ("a", 4), ("a", 5)]
    futures = [(u, i, svc.submit_observe(u, int(engine.original(seq[u][i]))))
               for u, i in order]
    for u, i, f in futures:
      assert f.result(10) == {"user_id": u, "events": i + 1}
    for u, items in seq.items():
      assert _window(svc, u) == items
    sizes = [n for kind, n, _ in engine.calls if kind == "observe"]
    assert sizes == [3, 2, 2, 1, 1, 1]  # One batch, six ordered rounds.
    # LRU order follows each user's last event: c, b, a.
    assert svc.store.user_ids() == ["c", "b", "a"]


def test_concurrent_clients_keep_each_users_order(make_client):
  c = make_client(max_batch=16, max_wait_ms=2)
  rng = np.random.default_rng(0)
  seqs = {f"u{t}_{j}": rng.integers(1, NUM_ITEMS + 1, MAX_LEN).tolist()
          for t in range(8) for j in range(2)}
  errors = []

  def client_thread(t):
    try:
      for step in range(MAX_LEN):
        for j in range(2):
          user = f"u{t}_{j}"
          assert c.event(user, seqs[user][step])["events"] == step + 1
          c.recs(user, 3)
    except Exception as e:  # pylint: disable=broad-except
      errors.append(e)

  threads = [threading.Thread(target=client_thread, args=(t,))
             for t in range(8)]
  for t in threads:
    t.start()
  for t in threads:
    t.join(30)
  assert not errors, errors
  for user, items in seqs.items():
    assert _window(c.service, user) == items
    assert c.service.store.get(user)[1] == MAX_LEN
  worker = {tid for _, _, tid in c.engine.calls}
  assert len(worker) == 1 and threading.get_ident() not in worker
  _, metrics = c.request("GET", "/metrics")
  assert metrics["events"] == 16 * MAX_LEN
  assert metrics["batch_size"]["count"] <= 2 * 16 * MAX_LEN


def test_lru_eviction_bound(make_client):
  c = make_client(max_users=3)
  for u in ("a", "b", "c"):
    c.event(u, 1)
  c.recs("a")  # a is now the most recent; b the least.
  c.event("d", 2)
  assert c.service.store.user_ids() == ["c", "a", "d"]
  assert c.recs("b")["cold_start"] is True
  for i in range(10):
    c.event(f"n{i}", 3)
  assert len(c.service.store) == 3
  _, metrics = c.request("GET", "/metrics")
  assert metrics["evictions"] == 11 and metrics["users"] == 3
  assert metrics["max_users"] == 3


def test_metrics_and_healthz(client):
  client.event("a", 1)
  client.recs("a")
  client.request("GET", "/nope")
  status, health = client.request("GET", "/healthz")
  assert status == 200 and health["status"] == "ok"
  assert health["model"] == "fake" and health["num_items"] == NUM_ITEMS
  status, m = client.request("GET", "/metrics")
  assert status == 200
  assert m["requests"]["/v1/events"] == {"200": 1}
  assert m["requests"]["/v1/recommendations"] == {"200": 1}
  assert m["requests"]["other"] == {"404": 1}
  assert m["events"] == 1 and m["users"] == 1 and m["evictions"] == 0
  assert m["latency_ms"]["/v1/events"]["p99"] > 0
  assert m["engine_ms"]["observe"]["count"] == 1
  assert m["batch_size"]["max"] >= 1
  assert isinstance(m["rss_bytes"], int) and m["rss_bytes"] > 1 << 20
  status, text = client.request("GET", "/metrics?format=prometheus")
  assert status == 200
  assert 'recattn_requests_total{endpoint="/v1/events",status="200"} 1' in text
  assert "recattn_rss_bytes " in text and "recattn_users 1" in text


def _fill(c, users=6):
  for u in range(users):
    for i in range(u + 1):
      c.event(f"u{u}", (7 * u + 3 * i) % NUM_ITEMS + 1, timestamp=100 + i)


def test_snapshot_round_trip(make_client, tmp_path):
  path = str(tmp_path / "snap.npz")
  a = make_client(snapshot_path=path)
  _fill(a)
  a.recs("u2")  # LRU order differs from insertion order.
  status, info = a.request("POST", "/v1/snapshot")
  assert status == 200 and info["users"] == 6 and info["path"] == path
  with np.load(path, allow_pickle=False) as z:  # A plain .npz, no pickle.
    assert z["state/items"].shape == (6, MAX_LEN)
    assert json.loads(z["meta"].tobytes())["user_ids"] == (
        a.service.store.user_ids())
  b = make_client()
  assert b.service.load_snapshot(path)["users"] == 6
  assert b.service.store.user_ids() == a.service.store.user_ids()
  for u in range(6):
    for exclude in (True, False):
      assert b.recs(f"u{u}", 10, exclude) == a.recs(f"u{u}", 10, exclude)
  assert b.event("u3", 1)["events"] == 5
  other = str(tmp_path / "sub" / "other.npz")
  status, info = a.request("POST", "/v1/snapshot", {"path": other})
  assert status == 400 and not os.path.exists(other)


def test_snapshot_load_keeps_most_recent_over_max_users(make_client,
                                                        tmp_path):
  path = str(tmp_path / "snap.npz")
  a = make_client()
  _fill(a)
  a.service.snapshot(path)
  b = make_client(max_users=4)
  assert b.service.load_snapshot(path) == {"path": path, "users": 4,
                                           "dropped": 2}
  assert b.service.store.user_ids() == ["u2", "u3", "u4", "u5"]


def test_bad_snapshots_give_clear_errors(make_client, tmp_path):
  path = str(tmp_path / "snap.npz")
  a = make_client()
  _fill(a)
  a.service.snapshot(path)
  b = make_client()
  garbage = tmp_path / "garbage.npz"
  garbage.write_bytes(b"not a zip at all")
  with pytest.raises(state_store.SnapshotError,
                     match=f"{garbage}.*not a snapshot"):
    b.service.load_snapshot(str(garbage))
  truncated = tmp_path / "truncated.npz"
  truncated.write_bytes(open(path, "rb").read()[:-200])
  with pytest.raises(state_store.SnapshotError, match=str(truncated)):
    b.service.load_snapshot(str(truncated))
  with pytest.raises(state_store.SnapshotError, match="no such file"):
    b.service.load_snapshot(str(tmp_path / "missing.npz"))
  shorter = make_client(engine=fake.FakeEngine(NUM_ITEMS, max_len=5))
  with pytest.raises(state_store.SnapshotError,
                     match=f"{path}: written for max_len=8, this engine has 5"):
    shorter.service.load_snapshot(path)
  other_catalogue = make_client(engine=fake.FakeEngine(NUM_ITEMS, seed=1))
  with pytest.raises(state_store.SnapshotError, match="catalogue_sha256"):
    other_catalogue.service.load_snapshot(path)
  # Same facts, other state layout: named key, dtype and shape.
  template = {"items": np.zeros(MAX_LEN, np.int64),
              "times": np.zeros(MAX_LEN, np.int64),
              "count": np.zeros((), np.int64)}
  store = state_store.StateStore(template, 10)
  with pytest.raises(state_store.SnapshotError,
                     match=r"state/items is <i4\(6, 8\).*<i8\(6, 8\)"):
    store.load(path)
  assert len(b.service.store) == 0  # Nothing loaded by any failure.


def test_failed_snapshot_keeps_the_previous_file(make_client, tmp_path,
                                                 monkeypatch):
  path = str(tmp_path / "snap.npz")
  c = make_client(snapshot_path=path)
  c.event("first", 1)
  assert c.request("POST", "/v1/snapshot")[0] == 200
  old = open(path, "rb").read()
  _fill(c)

  def broken_fsync(fd):
    raise OSError(28, "No space left on device")

  monkeypatch.setattr(state_store.os, "fsync", broken_fsync)
  status, reply = c.request("POST", "/v1/snapshot")
  assert status == 500
  assert "previous file kept" in reply["error"] and path in reply["error"]
  assert "No space left" in reply["error"]
  monkeypatch.undo()
  assert open(path, "rb").read() == old
  assert os.listdir(tmp_path) == ["snap.npz"]  # No temporary file left.
  restored = make_client()
  restored.service.load_snapshot(path)
  assert restored.service.store.user_ids() == ["first"]


def test_close_answers_queued_requests_then_refuses():
  engine = fake.FakeEngine(NUM_ITEMS, MAX_LEN, delay_s=0.05)
  svc = service_lib.Service(engine, max_batch=2)
  futures = [svc.submit_observe(f"u{i}", int(engine.original(1)))
             for i in range(6)]
  svc.close()
  assert [f.result(1)["events"] for f in futures] == [1] * 6
  with pytest.raises(service_lib.RequestError, match="shutting down"):
    svc.submit_recommend("u0")


def test_full_queue_is_503():
  engine = fake.FakeEngine(NUM_ITEMS, MAX_LEN, delay_s=0.2)
  with service_lib.Service(engine, max_batch=1, max_queue=2) as svc:
    with pytest.raises(service_lib.RequestError) as e:
      for _ in range(10):
        svc.submit_recommend("u")
    assert e.value.status == 503 and "busy" in e.value.message


def test_load_test_smoke(tmp_path):
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  out = tmp_path / "load.json"
  subprocess.run(
      [sys.executable, "experiments/007_serving/load_test.py", "--fake",
       "--clients=3", "--requests=150", "--warmup=20", "--users=40",
       "--max_users=30", "--fake_items=300", f"--out={out}"],
      cwd=root, check=True, capture_output=True, timeout=60)
  report = json.loads(out.read_text())
  assert report["errors"] == 0
  assert sum(e["count"] for e in report["endpoints"].values()) == 150
  assert report["server"]["users"] <= 30
  assert report["rss_bytes"]["end"] > 0


_SERVE_WITH_FAKE = """
import sys, types
from absl import app
from recattn import serve
from recattn.serving import fake
stub = types.ModuleType("recattn.serving.engine")
stub.Engine = types.SimpleNamespace(
    from_workdir=lambda workdir, **kw: fake.FakeEngine(50, 8))
sys.modules["recattn.serving.engine"] = stub
app.run(serve.main)
"""


def test_serve_entry_point_snapshots_on_sigterm(tmp_path):
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  snap = tmp_path / "snap.npz"
  cmd = [sys.executable, "-c", _SERVE_WITH_FAKE, "--workdir=unused",
         "--port=0", f"--snapshot={snap}", "--restore_snapshot"]
  for run in range(2):
    proc = subprocess.Popen(cmd, cwd=root, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
      line = proc.stdout.readline()
      assert line.startswith("Serving at http://127.0.0.1:"), (
          line, proc.stderr.read() if proc.poll() is not None else "")
      url = line.split()[-1]
      engine = fake.FakeEngine(50, 8)
      body = json.dumps({"user_id": "a",
                         "item_id": int(engine.original(3))}).encode()
      with urllib.request.urlopen(urllib.request.Request(
          url + "/v1/events", data=body, method="POST"), timeout=10) as f:
        assert json.loads(f.read())["events"] == run + 1  # Restored.
    finally:
      proc.terminate()
      proc.wait(20)
    assert proc.returncode == 0, proc.stderr.read()
    assert snap.exists()
