r"""A bounded load test of the recommendation service (issue 6).

Concurrent clients, each on one keep-alive HTTP connection (`http.client`),
send a fixed number of requests: events (`POST /v1/events`, a random
catalogue item for a random user) and recommendations (`GET
/v1/recommendations`), mixed by `--mix`. Reports throughput, latency
(p50/p99/max) per endpoint, errors (any status but 200, or a broken
connection) and the server's RSS from `GET /metrics`, sampled through the
run (start, middle, end, max), to show whether memory stays flat.

Target, one of:
  --url=http://127.0.0.1:8080   a running `python -m recattn.serve`
  --workdir=<trained run>       starts the service in this process
  --fake                        the same with `serving.fake.FakeEngine`

  python experiments/007_serving/load_test.py --fake --requests=2000 \
      --out=/tmp/load_fake.json
  python experiments/007_serving/load_test.py --workdir=<run> \
      --clients=16 --requests=20000 --users=5000 --mix=0.8 \
      --out=experiments/007_serving/load_<name>.json

In-process targets share this process: their RSS includes the clients, and
client and server compete for the same cores. Against `--url` the catalogue
is not known up front: events use the items of one cold-start
recommendation of k = min(1000, num_items) (`exclude_seen=false`).
`--warmup` requests (not measured) come first, so jit compilations of the
first batch sizes are not in the latencies.
"""

import collections
import http.client
import importlib
import json
import os
import sys
import threading
import time
import urllib.parse

from absl import app
from absl import flags
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
from recattn.serving import fake  # pylint: disable=g-import-not-at-top
from recattn.serving import server as server_lib
from recattn.serving import service as service_lib

FLAGS = flags.FLAGS
flags.DEFINE_string("url", None, "A running service, http://host:port.")
flags.DEFINE_string("workdir", None, "A trained run to serve in-process.")
flags.DEFINE_bool("fake", False, "Serve serving.fake.FakeEngine in-process.")
flags.DEFINE_integer("clients", 8, "Concurrent clients (threads).")
flags.DEFINE_integer("requests", 2000, "Measured requests, all clients.")
flags.DEFINE_integer("warmup", 200, "Unmeasured requests first.")
flags.DEFINE_integer("users", 1000, "Distinct user ids.")
flags.DEFINE_float("mix", 0.8, "Fraction of requests that are events.")
flags.DEFINE_integer("k", 10, "Items per recommendation.")
flags.DEFINE_integer("seed", 0, "Random seed of the request stream.")
flags.DEFINE_float("sample_s", 0.5, "Seconds between RSS samples.")
flags.DEFINE_string("out", "", "Results JSON ('' = print only).")
# In-process service (--workdir, --fake).
flags.DEFINE_integer("max_users", 100_000, "Service --max_users.")
flags.DEFINE_integer("max_batch", 64, "Service --max_batch.")
flags.DEFINE_float("max_wait_ms", 1.0, "Service --max_wait_ms.")
flags.DEFINE_integer("fake_items", 10_000, "FakeEngine catalogue size.")
flags.DEFINE_integer("fake_max_len", 50, "FakeEngine window.")

_ENDPOINTS = ("events", "recommendations")


class _Connection:
  """One keep-alive connection; reconnects after a failure."""

  def __init__(self, host: str, port: int):
    self.host, self.port = host, port
    self.conn = None

  def call(self, method: str, path: str, body=None):
    """(status, parsed JSON); status 0 if the connection failed."""
    data = None if body is None else json.dumps(body)
    headers = {"Content-Type": "application/json"} if data else {}
    try:
      if self.conn is None:
        self.conn = http.client.HTTPConnection(self.host, self.port,
                                               timeout=60)
      self.conn.request(method, path, body=data, headers=headers)
      r = self.conn.getresponse()
      payload = r.read()
      if r.getheader("Connection", "").lower() == "close":
        self.close()
      kind = r.getheader("Content-Type", "")
      return r.status, (json.loads(payload) if "json" in kind
                        else payload.decode())
    except (OSError, http.client.HTTPException) as e:
      self.close()
      return 0, f"{type(e).__name__}: {e}"

  def close(self):
    if self.conn is not None:
      self.conn.close()
      self.conn = None


def _start_in_process():
  """(service, server) on a free port, for --fake or --workdir."""
  if FLAGS.fake:
    engine = fake.FakeEngine(FLAGS.fake_items, FLAGS.fake_max_len)
  else:
    engine_lib = importlib.import_module("recattn.serving.engine")
    engine = engine_lib.Engine.from_workdir(FLAGS.workdir)
  service = service_lib.Service(
      engine, max_users=FLAGS.max_users, max_batch=FLAGS.max_batch,
      max_wait_ms=FLAGS.max_wait_ms)
  server = server_lib.make_server(service, "127.0.0.1", 0)
  server_lib.serve_in_thread(server)
  return service, server


def _catalogue(conn: _Connection, health: dict, service) -> np.ndarray:
  if service is not None:
    return np.asarray(service.engine.original_item_ids)
  k = min(service_lib.MAX_K, int(health["num_items"]))
  status, reply = conn.call(
      "GET", f"/v1/recommendations?user_id=__load_test_probe__&k={k}"
      "&exclude_seen=false")
  if status != 200 or not reply["items"]:
    raise RuntimeError(f"catalogue probe failed: {status} {reply}")
  return np.asarray(reply["items"])


def _run_phase(host, port, n, items, seed, results):
  """Sends n requests over FLAGS.clients connections; appends to results."""
  counter = iter(range(n))
  lock = threading.Lock()

  def client(c):
    rng = np.random.default_rng([seed, c])
    conn = _Connection(host, port)
    while True:
      with lock:
        if next(counter, None) is None:
          break
      user = f"user{rng.integers(FLAGS.users)}"
      if rng.random() < FLAGS.mix:
        endpoint = "events"
        args = ("POST", "/v1/events",
                {"user_id": user, "item_id": int(rng.choice(items))})
      else:
        endpoint = "recommendations"
        args = ("GET", "/v1/recommendations?" + urllib.parse.urlencode(
            {"user_id": user, "k": FLAGS.k}))
      start = time.perf_counter()
      status, reply = conn.call(*args)
      results.append((endpoint, time.perf_counter() - start, status,
                      None if status == 200 else str(reply)[:200]))
    conn.close()

  threads = [threading.Thread(target=client, args=(c,))
             for c in range(FLAGS.clients)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()


def _summary(results) -> dict:
  out = {}
  for endpoint in _ENDPOINTS:
    rows = [r for r in results if r[0] == endpoint]
    lat = np.array([r[1] for r in rows]) * 1e3
    out[endpoint] = {
        "count": len(rows), "errors": sum(r[2] != 200 for r in rows)}
    if rows:
      out[endpoint].update(
          p50_ms=float(np.percentile(lat, 50)),
          p99_ms=float(np.percentile(lat, 99)), max_ms=float(lat.max()),
          mean_ms=float(lat.mean()))
  return out


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  targets = [bool(FLAGS.url), bool(FLAGS.workdir), FLAGS.fake]
  if sum(targets) != 1:
    raise app.UsageError("give exactly one of --url, --workdir, --fake")
  if not 0 <= FLAGS.mix <= 1 or FLAGS.clients < 1 or FLAGS.users < 1:
    raise app.UsageError("need 0 <= --mix <= 1, --clients >= 1, --users >= 1")
  service = server = None
  if FLAGS.url:
    url = urllib.parse.urlsplit(FLAGS.url)
    host, port = url.hostname, url.port or 80
  else:
    service, server = _start_in_process()
    host, port = server.server_address[:2]
  probe = _Connection(host, port)
  status, health = probe.call("GET", "/healthz")
  if status != 200:
    raise RuntimeError(f"{host}:{port}/healthz: {status} {health}")
  items = _catalogue(probe, health, service)

  samples, done = [], threading.Event()
  t0 = time.perf_counter()

  def sample():
    status, m = probe.call("GET", "/metrics")
    if status == 200:
      samples.append({"t": time.perf_counter() - t0,
                      "rss_bytes": m["rss_bytes"], "users": m["users"],
                      "queue_depth": m["queue_depth"]})

  def sampler():
    while not done.wait(FLAGS.sample_s):
      sample()

  sample()
  if FLAGS.warmup:
    _run_phase(host, port, FLAGS.warmup, items, FLAGS.seed + 1, [])
  sample()
  sampler_thread = threading.Thread(target=sampler, daemon=True)
  sampler_thread.start()
  results = []
  start = time.perf_counter()
  _run_phase(host, port, FLAGS.requests, items, FLAGS.seed, results)
  seconds = time.perf_counter() - start
  done.set()
  sampler_thread.join()
  sample()
  _, final = probe.call("GET", "/metrics")
  probe.close()
  if server is not None:
    server.shutdown()
    server.server_close()
    service.close()

  rss = [s["rss_bytes"] for s in samples if s["rss_bytes"] is not None]
  errors = [r for r in results if r[2] != 200]
  report = {
      "target": FLAGS.url or ("fake" if FLAGS.fake else FLAGS.workdir),
      "in_process": service is not None,
      "flags": {f: FLAGS[f].value for f in (
          "clients", "requests", "warmup", "users", "mix", "k", "seed",
          "max_users", "max_batch", "max_wait_ms", "fake_items",
          "fake_max_len")},
      "engine": health,
      "catalogue_items_used": int(len(items)),
      "seconds": seconds,
      "throughput_rps": len(results) / seconds,
      "errors": len(errors),
      "error_samples": sorted({f"{r[2]} {r[3]}" for r in errors})[:10],
      "endpoints": _summary(results),
      "rss_bytes": {
          "start": rss[0] if rss else None,  # Before the warmup.
          "after_warmup": rss[1] if len(rss) > 1 else None,
          "middle": rss[len(rss) // 2] if rss else None,
          "end": rss[-1] if rss else None, "max": max(rss, default=None)},
      "rss_samples": samples,
      "server": {k: final.get(k) for k in (
          "users", "evictions", "events", "engine_errors", "batch_size",
          "engine_ms", "latency_ms", "rss_source")},
  }
  text = json.dumps(report, indent=2)
  if FLAGS.out:
    os.makedirs(os.path.dirname(os.path.abspath(FLAGS.out)), exist_ok=True)
    with open(FLAGS.out, "w") as f:
      f.write(text + "\n")
  ep = report["endpoints"]
  print(f"{len(results)} requests in {seconds:.2f} s: "
        f"{report['throughput_rps']:.0f} req/s, {len(errors)} errors")
  for name in _ENDPOINTS:
    if ep[name]["count"]:
      print(f"  {name}: n={ep[name]['count']} p50={ep[name]['p50_ms']:.2f} "
            f"p99={ep[name]['p99_ms']:.2f} max={ep[name]['max_ms']:.2f} ms")
  r = report["rss_bytes"]
  if r["start"] is not None:
    print("  rss MB: " + ", ".join(
        f"{k}={v / 2**20:.1f}" for k, v in r.items() if v is not None))
  if FLAGS.out:
    print(f"Wrote {FLAGS.out}")


if __name__ == "__main__":
  app.run(main)
