"""Service metrics: request counters, latency windows, Prometheus text.

`Metrics` counts requests by endpoint and status and keeps the most recent
latencies per endpoint, engine call times and micro-batch sizes in bounded
windows; `prometheus_text` renders its summary for
`GET /metrics?format=prometheus`. `process_rss_bytes` is the memory figure
they report.
"""

import collections
import os
import sys
import threading
import time

import numpy as np


def process_rss_bytes() -> tuple[int | None, str]:
  """(resident set size in bytes, source); (None, "unavailable") if unknown.

  /proc/self/statm gives the current RSS (Linux); elsewhere the peak from
  getrusage is the best available, and says so.
  """
  try:
    with open("/proc/self/statm") as f:
      return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE"), "statm"
  except (OSError, ValueError, IndexError):
    pass
  try:
    import resource  # pylint: disable=g-import-not-at-top
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak * (1 if sys.platform == "darwin" else 1024), "peak_rusage"
  except (ImportError, OSError, ValueError):
    return None, "unavailable"


class _Window:
  """The last `size` values of a measure, with an all-time count."""

  def __init__(self, size: int):
    self.values = collections.deque(maxlen=size)
    self.count = 0

  def add(self, value: float):
    self.values.append(value)
    self.count += 1

  def summary(self, scale: float = 1.0) -> dict:
    out = {"count": self.count, "window": len(self.values)}
    if self.values:
      v = np.asarray(self.values, np.float64) * scale
      out.update(p50=float(np.percentile(v, 50)),
                 p99=float(np.percentile(v, 99)), max=float(v.max()),
                 mean=float(v.mean()))
    return out


class Metrics:
  """Counters and bounded latency windows; thread-safe."""

  def __init__(self, window: int = 10_000):
    self._lock = threading.Lock()
    self._window = window
    self.started = time.time()
    self.requests = collections.Counter()  # (endpoint, status) -> count
    self.latency = collections.defaultdict(lambda: _Window(self._window))
    self.engine = collections.defaultdict(lambda: _Window(self._window))
    self.batch_sizes = _Window(window)
    self.events = 0
    self.engine_errors = 0
    self.snapshots = {"count": 0, "last": None}

  def record_request(self, endpoint: str, status: int, seconds: float):
    with self._lock:
      self.requests[(endpoint, status)] += 1
      self.latency[endpoint].add(seconds)

  def record_batch(self, size: int):
    with self._lock:
      self.batch_sizes.add(size)

  def record_engine(self, kind: str, seconds: float):
    with self._lock:
      self.engine[kind].add(seconds)

  def record_events(self, n: int):
    with self._lock:
      self.events += n

  def record_engine_error(self):
    with self._lock:
      self.engine_errors += 1

  def record_snapshot(self, info: dict):
    with self._lock:
      self.snapshots["count"] += 1
      self.snapshots["last"] = dict(info, time=time.time())

  def summary(self) -> dict:
    with self._lock:
      requests = collections.defaultdict(dict)
      for (endpoint, status), n in sorted(self.requests.items()):
        requests[endpoint][str(status)] = n
      return {
          "uptime_s": time.time() - self.started,
          "requests": dict(requests),
          "events": self.events,
          "engine_errors": self.engine_errors,
          "latency_ms": {e: w.summary(1e3)
                         for e, w in sorted(self.latency.items())},
          "engine_ms": {k: w.summary(1e3)
                        for k, w in sorted(self.engine.items())},
          "batch_size": self.batch_sizes.summary(),
          "snapshots": dict(self.snapshots),
      }


def prometheus_text(summary: dict) -> str:
  """The JSON metrics as Prometheus text exposition (version 0.0.4)."""
  lines = []

  def metric(name, kind, help_text, samples):
    lines.append(f"# HELP recattn_{name} {help_text}")
    lines.append(f"# TYPE recattn_{name} {kind}")
    for labels, value in samples:
      if value is None:
        continue
      label = ",".join(f'{k}="{v}"' for k, v in labels.items())
      lines.append(f"recattn_{name}{{{label}}} {value}" if label
                   else f"recattn_{name} {value}")

  metric("requests_total", "counter", "HTTP requests by endpoint and status.",
         [({"endpoint": e, "status": s}, n)
          for e, by in summary["requests"].items() for s, n in by.items()])
  for name, key, help_text in (
      ("events_total", "events", "Events applied to user states."),
      ("engine_errors_total", "engine_errors", "Engine calls that raised."),
      ("evictions_total", "evictions", "Users evicted from the store.")):
    metric(name, "counter", help_text, [({}, summary[key])])
  for name, key, help_text in (
      ("users", "users", "Users in the store."),
      ("queue_depth", "queue_depth", "Requests waiting for the worker."),
      ("rss_bytes", "rss_bytes", "Resident set size of the process."),
      ("uptime_seconds", "uptime_s", "Seconds since the service started.")):
    metric(name, "gauge", help_text, [({}, summary[key])])
  metric("latency_ms", "summary", "Request latency over a recent window.",
         [({"endpoint": e, "quantile": q}, w.get(p))
          for e, w in summary["latency_ms"].items()
          for q, p in (("0.5", "p50"), ("0.99", "p99"))])
  metric("engine_ms", "summary", "Engine call time over a recent window.",
         [({"kind": e, "quantile": q}, w.get(p))
          for e, w in summary["engine_ms"].items()
          for q, p in (("0.5", "p50"), ("0.99", "p99"))])
  metric("batch_size", "summary", "Requests per micro-batch (recent).",
         [({"quantile": q}, summary["batch_size"].get(p))
          for q, p in (("0.5", "p50"), ("0.99", "p99"))])
  return "\n".join(lines) + "\n"
