r"""Real-time recommendation over HTTP: per-user state, micro-batched engine.

Three layers, each usable without the next (the tests drive all three):

* `StateStore`: every user's engine state in memory, bounded by `max_users`
  with least-recently-used eviction, and atomic snapshots to one file.
* `Service`: requests in original item ids, validated in full before
  anything is queued, mapped to the engine's internal ids and answered by
  one worker thread that drains a queue in micro-batches (up to `max_batch`
  requests, waiting at most `max_wait_ms` after the first). The engine is
  called only from that thread: `observe` and `recommend` once per batch
  each (`recommend` once per `exclude_seen` value), so concurrent clients
  share engine calls.
* `make_server`: a stdlib HTTP front end (JSON in and out), 127.0.0.1 by
  default; `recattn.serve` runs it.

Endpoints:
  POST /v1/events {"user_id": str, "item_id": int, "timestamp": int?}
      -> {"user_id", "events": this user's count}
  GET  /v1/recommendations?user_id=..&k=10&exclude_seen=true
      -> {"user_id", "items": [original ids], "scores" (NaN: null),
          "cold_start": no state held for this user}
  POST /v1/score {"user_id": str, "item_ids": [int, ...]}
      -> {"user_id", "items": the ids as sent, "scores": target-aware
          logits of the model's ranking head (each candidate seen after the
          user's history, not next to the other candidates), "cold_start"};
          501 when the model has no ranking head
  GET  /healthz -> {"status": "ok", **engine.describe(), ...}
  GET  /metrics[?format=prometheus]
  POST /v1/snapshot -> {"path", "users", "bytes", ...}: writes the
      `--snapshot` file (a client cannot choose where the server writes)
Errors are 4xx/5xx with `{"error": message}`; the message names the field
and what is allowed. Never a traceback.

Ordering. A user's events are applied in arrival order: inside one batch
the i-th event of each user goes into the i-th of a sequence of `observe`
calls. Within a batch, events are applied before recommendations, so a
recommendation concurrent with an event may see it (a request sent after a
response sees everything that response acknowledged).

Failure. An engine exception fails that batch's requests of that kind (500)
and stores nothing from them; states of other users, and of these users,
are as before. An event without a timestamp gets the arrival time (unix
seconds).

Snapshot layout: one `.npz` (a zip of `.npy` members, no pickle) written to
a temporary file beside the target, fsynced, then `os.replace`d, so a
reader sees the old file or the new one, never a part:
  meta          uint8 [bytes]: UTF-8 JSON {"format", "version", "user_ids"
                (least recently used first), "keys" ({key: {shape, dtype}}),
                "fingerprint" (num_items, max_len, catalogue_sha256),
                "engine" (describe()), "created", "evictions"}
  events        int64 [U]: events seen per user
  state/<key>   [U, *shape] per key of `engine.new_state()`
"""

import collections
import concurrent.futures
import contextlib
import dataclasses
import hashlib
import http.server
import json
import math
import os
import queue
import re
import sys
import tempfile
import threading
import time
import urllib.parse
import zipfile

from absl import logging
import numpy as np

MAX_K = 1000
MAX_USER_ID_CHARS = 256
MAX_BODY_BYTES = 64 * 1024
_DRAIN_BYTES = 1 << 20  # larger unwanted bodies: close instead of reading
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
_TIME_MAX = 2**31 - 1  # engines keep int32 seconds (time-interval biases)
_K_BUCKETS = (16, 32, 64, 128, 256, 512, 1024)  # engine k, to bound jit shapes
_SNAPSHOT_FORMAT = "recattn-serving-snapshot"
_SNAPSHOT_VERSION = 1


class RequestError(Exception):
  """A request the service refuses; `status` is the HTTP status to send."""

  def __init__(self, status: int, message: str, headers=None):
    super().__init__(message)
    self.status = status
    self.message = message
    self.headers = dict(headers or {})


class EngineError(RequestError):
  """The engine failed on a batch: a 500 for that batch's requests."""

  def __init__(self, message: str):
    super().__init__(500, message)


class SnapshotError(ValueError):
  """A snapshot that cannot be read or used; the message names the file."""


# ---------------------------------------------------------------------------
# State store.


def _state_spec(template: dict) -> dict[str, tuple[tuple[int, ...], str]]:
  return {k: (tuple(np.shape(v)), np.asarray(v).dtype.str)
          for k, v in template.items()}


class StateStore:
  """Users' engine states: bounded, least recently used evicted first.

  Each user holds (state, events): the engine's state dict, treated as
  immutable (the engine returns new states; the store keeps references),
  and the number of events seen. Thread-safe; `snapshot` copies references
  under the lock and writes without it.
  """

  def __init__(self, template: dict, max_users: int,
               fingerprint: dict | None = None):
    """Makes an empty store.

    Args:
      template: a fresh state (`engine.new_state()`): the keys, shapes and
        dtypes every state and snapshot must have.
      max_users: users held (>= 1); more evict the least recently used.
      fingerprint: JSON-able facts a snapshot must match to be loaded (the
        catalogue and window), beyond its shapes.
    """
    if max_users < 1:
      raise ValueError(f"max_users must be >= 1, got {max_users}")
    self.max_users = max_users
    self.spec = _state_spec(template)
    self.fingerprint = dict(fingerprint or {})
    self._users = collections.OrderedDict()  # user -> (state, events)
    self._lock = threading.Lock()
    self._snapshot_lock = threading.Lock()
    self.evictions = 0

  def __len__(self) -> int:
    return len(self._users)

  def __contains__(self, user_id) -> bool:
    return user_id in self._users

  def get(self, user_id: str, touch: bool = True):
    """(state, events) or None; `touch` marks the user recently used."""
    with self._lock:
      entry = self._users.get(user_id)
      if entry is not None and touch:
        self._users.move_to_end(user_id)
      return entry

  def put(self, user_id: str, state: dict, events: int):
    self.put_many([(user_id, state, events)])

  def put_many(self, entries):
    """Stores (user, state, events) in order (the last is most recent)."""
    with self._lock:
      for user_id, state, events in entries:
        self._users[user_id] = (state, int(events))
        self._users.move_to_end(user_id)
      while len(self._users) > self.max_users:
        self._users.popitem(last=False)
        self.evictions += 1

  def user_ids(self) -> list[str]:
    """Users, least recently used first."""
    with self._lock:
      return list(self._users)

  def check_state(self, state, what: str):
    """Raises ValueError unless `state` has the template's keys/shapes."""
    if not isinstance(state, dict) or set(state) != set(self.spec):
      keys = sorted(state) if isinstance(state, dict) else type(state).__name__
      raise ValueError(f"{what}: keys {keys}, expected {sorted(self.spec)}")
    for key, (shape, dtype) in self.spec.items():
      v = state[key]
      if not isinstance(v, (np.ndarray, np.generic)):
        raise ValueError(f"{what}: state[{key!r}] is {type(v).__name__}, "
                         "expected a numpy array")
      if v.shape != shape or v.dtype.str != dtype:
        raise ValueError(f"{what}: state[{key!r}] is {v.dtype.str}{v.shape}, "
                         f"expected {dtype}{shape}")

  def snapshot(self, path: str, extra_meta: dict | None = None) -> dict:
    """Writes all users atomically to `path` (layout: module docstring).

    On any failure the temporary file is removed and `path` is untouched.
    Returns {"path", "users", "bytes", "seconds"}.
    """
    start = time.perf_counter()
    with self._lock:
      users = list(self._users.items())
      evictions = self.evictions
    meta = {"format": _SNAPSHOT_FORMAT, "version": _SNAPSHOT_VERSION,
            "user_ids": [u for u, _ in users],
            "keys": {k: {"shape": list(s), "dtype": d}
                     for k, (s, d) in self.spec.items()},
            "fingerprint": self.fingerprint, "created": time.time(),
            "evictions": evictions, **(extra_meta or {})}
    path = os.path.abspath(path)
    directory = os.path.dirname(path)
    with self._snapshot_lock:
      os.makedirs(directory, exist_ok=True)
      fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.",
                                 suffix=".tmp", dir=directory)
      try:
        with os.fdopen(fd, "wb") as f:
          with zipfile.ZipFile(f, "w", zipfile.ZIP_STORED,
                               allowZip64=True) as zf:
            _write_npy(zf, "meta", np.frombuffer(
                json.dumps(meta).encode(), np.uint8))
            _write_npy(zf, "events",
                       np.array([e for _, (_, e) in users], np.int64))
            for key, (shape, dtype) in self.spec.items():
              # One key at a time: peak extra memory is one stacked key.
              stacked = np.empty((len(users),) + shape, np.dtype(dtype))
              for i, (_, (state, _)) in enumerate(users):
                stacked[i] = state[key]
              _write_npy(zf, f"state/{key}", stacked)
              del stacked
          f.flush()
          os.fsync(f.fileno())
        os.replace(tmp, path)
      except BaseException:
        with contextlib.suppress(OSError):
          os.unlink(tmp)
        raise
      _fsync_dir(directory)
    return {"path": path, "users": len(users), "bytes": os.path.getsize(path),
            "seconds": time.perf_counter() - start}

  def load(self, path: str) -> dict:
    """Replaces every user with those of the snapshot at `path`.

    Validates the format, the state keys, shapes and dtypes (against the
    template) and the fingerprint before replacing anything; raises
    SnapshotError naming the file otherwise. If the snapshot holds more
    than `max_users`, the most recently used are kept. Returns {"path",
    "users", "dropped"}.
    """
    def fail(problem):
      return SnapshotError(f"snapshot {path}: {problem}")

    if not os.path.exists(path):
      raise fail("no such file")
    try:
      zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as e:
      raise fail(f"not a snapshot (.npz) file: {e}") from e
    with zf:
      names = set(zf.namelist())

      def read(name):
        if f"{name}.npy" not in names:
          raise fail(f"member {name!r} missing (has {sorted(names)})")
        try:
          with zf.open(f"{name}.npy") as f:
            return np.lib.format.read_array(f, allow_pickle=False)
        except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
          raise fail(f"member {name!r} unreadable: {e}") from e

      meta_bytes = read("meta")
      try:
        meta = json.loads(meta_bytes.tobytes())
      except ValueError as e:
        raise fail(f"meta is not JSON: {e}") from e
      if not isinstance(meta, dict) or meta.get("format") != _SNAPSHOT_FORMAT:
        raise fail(f"format is not {_SNAPSHOT_FORMAT!r}")
      if meta.get("version") != _SNAPSHOT_VERSION:
        raise fail(f"version {meta.get('version')!r}, this server reads "
                   f"{_SNAPSHOT_VERSION}")
      for key, want in self.fingerprint.items():
        got = meta.get("fingerprint", {}).get(key)
        if got != want:
          raise fail(f"written for {key}={got!r}, this engine has {want!r}")
      user_ids = meta.get("user_ids")
      if (not isinstance(user_ids, list)
          or not all(isinstance(u, str) for u in user_ids)):
        raise fail("meta.user_ids is not a list of strings")
      if len(set(user_ids)) != len(user_ids):
        raise fail("meta.user_ids has duplicates")
      n = len(user_ids)
      events = read("events")
      if events.shape != (n,) or events.dtype != np.int64 or np.any(
          events < 0):
        raise fail(f"events is {events.dtype}{events.shape}, expected "
                   f"int64({n},) >= 0")
      extra = {name[len("state/"):-len(".npy")] for name in names
               if name.startswith("state/")} - set(self.spec)
      if extra:
        raise fail(f"state keys {sorted(extra)} not in this engine's state "
                   f"{sorted(self.spec)}")
      arrays = {}
      for key, (shape, dtype) in self.spec.items():
        a = read(f"state/{key}")
        if a.shape != (n,) + shape or a.dtype.str != dtype:
          raise fail(f"state/{key} is {a.dtype.str}{a.shape}, this engine's "
                     f"state needs {dtype}{(n,) + shape}")
        arrays[key] = a
    keep = range(max(0, n - self.max_users), n)
    users = collections.OrderedDict(
        (user_ids[i], ({k: a[i].copy() for k, a in arrays.items()},
                       int(events[i]))) for i in keep)
    with self._lock:
      self._users = users
    return {"path": path, "users": len(users), "dropped": n - len(users)}


def _write_npy(zf: zipfile.ZipFile, name: str, array: np.ndarray):
  with zf.open(f"{name}.npy", "w", force_zip64=True) as f:
    np.lib.format.write_array(f, np.ascontiguousarray(array),
                              allow_pickle=False)


def _fsync_dir(directory: str):
  """Makes a rename durable; some platforms cannot open a directory."""
  with contextlib.suppress(OSError):
    fd = os.open(directory, os.O_RDONLY)
    try:
      os.fsync(fd)
    finally:
      os.close(fd)


# ---------------------------------------------------------------------------
# Metrics.


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


# ---------------------------------------------------------------------------
# Service.


@dataclasses.dataclass
class _Pending:
  """One queued request."""
  kind: str  # "observe" | "recommend" | "score"
  user_id: str
  future: concurrent.futures.Future
  item: int = 0  # internal id
  time: int = 0
  k: int = 0
  exclude_seen: bool = True
  candidates: tuple = ()  # "score": (internal ids, original ids)


_STOP = object()


def _is_int(value) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def _type_name(value) -> str:
  return "null" if value is None else type(value).__name__


def check_user_id(value) -> str:
  if (not isinstance(value, str) or not value
      or len(value) > MAX_USER_ID_CHARS):
    got = (f"a string of {len(value)} characters" if isinstance(value, str)
           else _type_name(value))
    raise RequestError(400, f"user_id must be a string of 1 to "
                       f"{MAX_USER_ID_CHARS} characters, got {got}")
  return value


class Service:
  """Validates requests and answers them through a micro-batching worker.

  Public methods are thread-safe; they block until the worker answers
  (`submit_*` return futures instead). Close with `close()` (or use as a
  context manager): queued requests are still answered. The engine's
  `describe()` and `new_state()` are called once here, before the worker
  starts; every other engine call is on the worker thread.
  """

  def __init__(self, engine, *, max_users: int = 100_000,
               max_batch: int = 64, max_wait_ms: float = 1.0,
               snapshot_path: str | None = None, max_queue: int = 10_000,
               request_timeout_s: float = 30.0,
               metrics_window: int = 10_000):
    if max_batch < 1 or max_wait_ms < 0 or max_queue < 1:
      raise ValueError(f"need max_batch >= 1, max_wait_ms >= 0, max_queue "
                       f">= 1; got {max_batch}, {max_wait_ms}, {max_queue}")
    self.engine = engine
    self.num_items = int(engine.num_items)
    self.max_len = int(engine.max_len)
    self.max_k = min(MAX_K, self.num_items)
    self.max_batch = max_batch
    self.max_wait_s = max_wait_ms / 1e3
    self.snapshot_path = snapshot_path
    self.request_timeout_s = request_timeout_s
    # JSON-safe once (numpy scalars, paths): healthz and snapshots use it.
    self.description = json.loads(json.dumps(engine.describe(), default=str))
    original = np.asarray(engine.original_item_ids)
    if original.shape != (self.num_items,) or original.dtype.kind not in "iu":
      raise ValueError(f"engine.original_item_ids is {original.dtype}"
                       f"{original.shape}, expected int[{self.num_items}]")
    self._original = original.astype(np.int64)
    self._order = np.argsort(self._original, kind="stable")
    self._sorted = self._original[self._order]
    dup = np.flatnonzero(self._sorted[1:] == self._sorted[:-1])
    if dup.size:
      raise ValueError(f"engine.original_item_ids has duplicates, e.g. "
                       f"{int(self._sorted[dup[0]])}")
    self._fresh = engine.new_state()
    self.max_candidates = int(getattr(engine, "MAX_CANDIDATES", 1024))
    self.candidate_scoring = bool(self.description.get("candidate_scoring"))
    fingerprint = {
        "num_items": self.num_items, "max_len": self.max_len,
        "catalogue_sha256": hashlib.sha256(self._original.tobytes())
                            .hexdigest()}
    self.store = StateStore(self._fresh, max_users, fingerprint)
    self.store.check_state(self._fresh, "engine.new_state()")
    self.metrics = Metrics(metrics_window)
    self._queue = queue.Queue(max_queue)
    self._max_queue = max_queue
    self._apply_lock = threading.Lock()  # the worker's batches vs. load
    self._lifecycle = threading.Lock()
    self._closed = False
    self._worker = threading.Thread(target=self._run, name="engine-worker",
                                    daemon=True)
    self._worker.start()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()

  # -- Requests. ------------------------------------------------------------

  def internal_id(self, original) -> int | None:
    """The internal id of an original item id; None if not catalogued."""
    if not _is_int(original) or not _INT64_MIN <= original <= _INT64_MAX:
      return None
    pos = int(np.searchsorted(self._sorted, original))
    if pos < self.num_items and self._sorted[pos] == original:
      return int(self._order[pos]) + 1
    return None

  def submit_observe(self, user_id, item_id, timestamp=None):
    """Validates one event and queues it; returns a future of the reply."""
    user_id = check_user_id(user_id)
    if not _is_int(item_id):
      raise RequestError(400, "item_id must be an integer (an original item "
                         f"id of the catalogue), got {_type_name(item_id)}")
    item = self.internal_id(item_id)
    if item is None:
      raise RequestError(400, f"item_id {item_id} is not in the catalogue "
                         f"({self.num_items} items)")
    if timestamp is None:
      timestamp = int(time.time())
    elif not _is_int(timestamp) or not 0 <= timestamp <= _TIME_MAX:
      got = timestamp if _is_int(timestamp) else _type_name(timestamp)
      raise RequestError(400, "timestamp must be an integer in 0.."
                         f"{_TIME_MAX} (unix seconds; the model's int32 "
                         f"time features) or absent, got {got}")
    return self._submit(_Pending("observe", user_id,
                                 concurrent.futures.Future(), item=item,
                                 time=timestamp))

  def submit_recommend(self, user_id, k=10, exclude_seen=True):
    """Validates a recommendation request and queues it (a future)."""
    user_id = check_user_id(user_id)
    if not _is_int(k) or not 1 <= k <= self.max_k:
      got = k if _is_int(k) else _type_name(k)
      raise RequestError(400, f"k must be an integer in [1, {self.max_k}], "
                         f"got {got}")
    if not isinstance(exclude_seen, bool):
      raise RequestError(400, "exclude_seen must be true or false, got "
                         f"{_type_name(exclude_seen)}")
    return self._submit(_Pending("recommend", user_id,
                                 concurrent.futures.Future(), k=k,
                                 exclude_seen=exclude_seen))

  def submit_score(self, user_id, item_ids):
    """Validates a candidate list and queues its scoring (a future)."""
    user_id = check_user_id(user_id)
    if not self.candidate_scoring:
      why = self.description.get("why_no_candidate_scoring") or "unsupported"
      raise RequestError(501, f"this model cannot score candidate lists: "
                         f"{why}")
    if not isinstance(item_ids, list) or not item_ids:
      raise RequestError(400, "item_ids must be a non-empty list of original "
                         f"item ids, got {_type_name(item_ids)}")
    if len(item_ids) > self.max_candidates:
      raise RequestError(400, f"item_ids holds {len(item_ids)} ids; at most "
                         f"{self.max_candidates} per request")
    internal = []
    for i, item_id in enumerate(item_ids):
      if not _is_int(item_id):
        raise RequestError(400, f"item_ids[{i}] must be an integer (an "
                           "original item id of the catalogue), got "
                           f"{_type_name(item_id)}")
      item = self.internal_id(item_id)
      if item is None:
        raise RequestError(400, f"item_ids[{i}] = {item_id} is not in the "
                           f"catalogue ({self.num_items} items)")
      internal.append(item)
    return self._submit(_Pending(
        "score", user_id, concurrent.futures.Future(),
        candidates=(tuple(internal), tuple(int(x) for x in item_ids))))

  def score(self, user_id, item_ids) -> dict:
    """Target-aware scores: {"user_id", "items", "scores", "cold_start"}."""
    return self._wait(self.submit_score(user_id, item_ids))

  def observe(self, user_id, item_id, timestamp=None) -> dict:
    """Appends an event; {"user_id", "events": the user's count}."""
    return self._wait(self.submit_observe(user_id, item_id, timestamp))

  def recommend(self, user_id, k=10, exclude_seen=True) -> dict:
    """Top-k: {"user_id", "items" (original ids), "scores", "cold_start"}.

    Fewer than k items come back only if the engine ranks padding or -inf
    scores (everything else seen) among the top k; those are dropped. A
    NaN score (the engine's "no score", e.g. for a popularity fallback) is
    sent as null.
    """
    return self._wait(self.submit_recommend(user_id, k, exclude_seen))

  def health(self) -> dict:
    facts = {k: v for k, v in self.description.items() if k != "status"}
    return {"status": "ok", **facts, "users": len(self.store),
            "max_users": self.store.max_users}

  def metrics_summary(self) -> dict:
    rss, source = process_rss_bytes()
    return {**self.metrics.summary(), "users": len(self.store),
            "max_users": self.store.max_users,
            "evictions": self.store.evictions,
            "queue_depth": self._queue.qsize(), "rss_bytes": rss,
            "rss_source": source}

  def snapshot(self, path: str | None = None) -> dict:
    """Writes every user's state to `path` (default `snapshot_path`)."""
    path = path if path is not None else self.snapshot_path
    if path is None:
      raise RequestError(400, 'no snapshot path: send {"path": "<file>"} or '
                         "start the server with --snapshot")
    if not isinstance(path, str) or not path:
      raise RequestError(400, "path must be a non-empty string (a file path "
                         f"on the server), got {_type_name(path)}")
    try:
      info = self.store.snapshot(path, {"engine": self.description})
    except OSError as e:
      raise RequestError(500, f"snapshot to {path} failed (previous file "
                         f"kept): {e}") from e
    self.metrics.record_snapshot(info)
    logging.info("Snapshot: %d users to %s (%.1f MB, %.2f s)", info["users"],
                 info["path"], info["bytes"] / 1e6, info["seconds"])
    return info

  def load_snapshot(self, path: str) -> dict:
    """Replaces the store with a snapshot's users (SnapshotError if bad)."""
    with self._apply_lock:
      info = self.store.load(path)
    logging.info("Restored %d users from %s (%d dropped over max_users)",
                 info["users"], path, info["dropped"])
    return info

  def close(self, timeout: float = 30.0):
    """Answers what is queued, then stops the worker. Idempotent."""
    with self._lifecycle:
      if self._closed:
        return
      self._closed = True
      self._queue.put(_STOP)
    self._worker.join(timeout)
    while True:  # Anything left if the worker did not finish in time.
      try:
        p = self._queue.get_nowait()
      except queue.Empty:
        break
      if p is not _STOP and not p.future.done():
        p.future.set_exception(RequestError(503, "service is shutting down"))

  def _submit(self, pending: _Pending) -> concurrent.futures.Future:
    with self._lifecycle:
      if self._closed:
        raise RequestError(503, "service is shutting down")
      try:
        self._queue.put_nowait(pending)
      except queue.Full:
        raise RequestError(503, f"server busy: {self._max_queue} requests "
                           "queued; retry later") from None
    return pending.future

  def _wait(self, future: concurrent.futures.Future) -> dict:
    try:
      return future.result(self.request_timeout_s)
    except concurrent.futures.TimeoutError:
      raise RequestError(503, f"no answer from the engine within "
                         f"{self.request_timeout_s} s") from None

  # -- The worker. ----------------------------------------------------------

  def _run(self):
    stop = False
    while not stop:
      first = self._queue.get()
      if first is _STOP:
        break
      batch = [first]
      deadline = time.monotonic() + self.max_wait_s
      while len(batch) < self.max_batch:
        try:
          p = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
          break
        if p is _STOP:
          stop = True
          break
        batch.append(p)
      self.metrics.record_batch(len(batch))
      try:
        with self._apply_lock:
          self._apply_observes([p for p in batch if p.kind == "observe"])
          self._apply_recommends([p for p in batch if p.kind == "recommend"])
          self._apply_scores([p for p in batch if p.kind == "score"])
      except Exception as e:  # pylint: disable=broad-except
        logging.exception("Worker failed on a batch")
        for p in batch:
          if not p.future.done():
            p.future.set_exception(RequestError(
                500, f"internal error: {type(e).__name__}: {e}"))

  def _engine_failed(self, kind: str, requests, error: Exception):
    logging.error("engine.%s failed on %d requests: %s: %s", kind,
                  len(requests), type(error).__name__, error)
    self.metrics.record_engine_error()
    for p in requests:
      p.future.set_exception(EngineError(
          f"engine.{kind} failed on a batch of {len(requests)} requests: "
          f"{type(error).__name__}: {error}"))

  def _apply_observes(self, requests: list[_Pending]):
    """Applies events in arrival order per user; stores all or nothing."""
    if not requests:
      return
    rounds, seen = [], collections.Counter()
    for p in requests:  # Round i holds each user's i-th event of the batch.
      i = seen[p.user_id]
      seen[p.user_id] += 1
      if i == len(rounds):
        rounds.append([])
      rounds[i].append(p)
    current = {}
    for user_id in seen:
      entry = self.store.get(user_id, touch=False)
      current[user_id] = entry if entry is not None else (self._fresh, 0)
    replies = []
    try:
      for r in rounds:
        states = [current[p.user_id][0] for p in r]
        items = np.array([p.item for p in r], np.int32)
        times = np.array([p.time for p in r], np.int64)
        start = time.perf_counter()
        new = self.engine.observe(states, items, times)
        self.metrics.record_engine("observe", time.perf_counter() - start)
        if not isinstance(new, (list, tuple)) or len(new) != len(r):
          raise ValueError(f"returned {type(new).__name__} of "
                           f"{len(new) if hasattr(new, '__len__') else '?'} "
                           f"states for {len(r)} events")
        for p, s in zip(r, new):
          self.store.check_state(s, "returned state")
          events = current[p.user_id][1] + 1
          current[p.user_id] = (s, events)
          replies.append((p, events))
    except Exception as e:  # pylint: disable=broad-except
      self._engine_failed("observe", requests, e)
      return
    last = {}  # Users in order of their last event: LRU order after this.
    for p in requests:
      last.pop(p.user_id, None)
      last[p.user_id] = None
    self.store.put_many((u, *current[u]) for u in last)
    self.metrics.record_events(len(requests))
    for p, events in replies:
      p.future.set_result({"user_id": p.user_id, "events": events})

  def _apply_recommends(self, requests: list[_Pending]):
    groups = collections.defaultdict(list)
    for p in requests:
      groups[p.exclude_seen].append(p)
    for exclude_seen, group in groups.items():
      states, cold = [], []
      for p in group:
        entry = self.store.get(p.user_id)
        states.append(self._fresh if entry is None else entry[0])
        cold.append(entry is None)
      want = max(p.k for p in group)
      k = min(next(b for b in _K_BUCKETS if b >= want), self.num_items)
      try:
        start = time.perf_counter()
        ids, scores = self.engine.recommend(states, k,
                                            exclude_seen=exclude_seen)
        self.metrics.record_engine("recommend", time.perf_counter() - start)
        ids = np.asarray(ids)
        scores = np.asarray(scores, np.float32)
        if (ids.ndim != 2 or ids.shape != scores.shape
            or ids.shape[0] != len(group)):
          raise ValueError(f"returned ids {ids.shape} and scores "
                           f"{scores.shape} for {len(group)} users, k={k}")
      except Exception as e:  # pylint: disable=broad-except
        self._engine_failed("recommend", group, e)
        continue
      # -inf: excluded (seen); NaN: no score (e.g. a popularity fallback).
      valid = (ids >= 1) & (ids <= self.num_items) & ~np.isneginf(scores)
      original = self._original[np.clip(ids, 1, self.num_items) - 1]
      for i, p in enumerate(group):
        keep = valid[i, :p.k]
        p.future.set_result({
            "user_id": p.user_id,
            "items": original[i, :p.k][keep].tolist(),
            "scores": [None if math.isnan(x) else x
                       for x in scores[i, :p.k][keep].tolist()],
            "cold_start": cold[i]})


  def _apply_scores(self, requests: list[_Pending]):
    if not requests:
      return
    states, cold = [], []
    for p in requests:
      entry = self.store.get(p.user_id)
      states.append(self._fresh if entry is None else entry[0])
      cold.append(entry is None)
    try:
      start = time.perf_counter()
      scores = self.engine.score(states, [p.candidates[0] for p in requests])
      self.metrics.record_engine("score", time.perf_counter() - start)
      if len(scores) != len(requests) or any(
          np.shape(x) != (len(p.candidates[0]),)
          for x, p in zip(scores, requests)):
        raise ValueError(f"returned {len(scores)} score lists of shapes "
                         f"{[np.shape(x) for x in scores][:4]} for "
                         f"{len(requests)} requests")
    except Exception as e:  # pylint: disable=broad-except
      self._engine_failed("score", requests, e)
      return
    for p, x, c in zip(requests, scores, cold):
      p.future.set_result({
          "user_id": p.user_id, "items": list(p.candidates[1]),
          "scores": [float(v) for v in np.asarray(x, np.float32)],
          "cold_start": c})


# ---------------------------------------------------------------------------
# HTTP.


@dataclasses.dataclass(frozen=True)
class _Route:
  method: str
  handler: str  # _Handler method name
  body: str  # "required", "optional" or "none"


_ROUTES = {
    "/v1/events": _Route("POST", "_events", "required"),
    "/v1/recommendations": _Route("GET", "_recommendations", "none"),
    "/v1/snapshot": _Route("POST", "_snapshot", "optional"),
    "/v1/score": _Route("POST", "_score", "required"),
    "/healthz": _Route("GET", "_healthz", "none"),
    "/metrics": _Route("GET", "_metrics", "none"),
}
_DIGITS = re.compile(r"[0-9]{1,9}")


def _no_duplicate_keys(pairs):
  keys = [k for k, _ in pairs]
  dup = sorted({k for k in keys if keys.count(k) > 1})
  if dup:
    raise RequestError(400, f"duplicate JSON keys {dup}")
  return dict(pairs)


def _json_object(body: bytes, fields: dict[str, str]) -> dict:
  """The body as a JSON object with only `fields` (name -> description)."""
  allowed = ", ".join(f"{k} ({v})" for k, v in fields.items())
  try:
    obj = json.loads(body, object_pairs_hook=_no_duplicate_keys)
  except (ValueError, RecursionError) as e:
    raise RequestError(400, f"body is not valid JSON ({e}); expected an "
                       f"object with {allowed}") from None
  if not isinstance(obj, dict):
    raise RequestError(400, f"body must be a JSON object with {allowed}, got "
                       f"{_type_name(obj)}")
  unknown = sorted(set(obj) - set(fields))
  if unknown:
    raise RequestError(400, f"unknown field(s) {unknown}; allowed: {allowed}")
  return obj


def _query(query: str, fields: dict[str, str]) -> dict[str, str]:
  allowed = ", ".join(f"{k} ({v})" for k, v in fields.items())
  try:
    pairs = urllib.parse.parse_qsl(query, keep_blank_values=True,
                                   strict_parsing=bool(query),
                                   max_num_fields=16)
  except ValueError as e:
    raise RequestError(400, f"malformed query string ({e}); allowed "
                       f"parameters: {allowed}") from None
  out = {}
  for k, v in pairs:
    if k not in fields:
      raise RequestError(400, f"unknown parameter {k!r}; allowed: {allowed}")
    if k in out:
      raise RequestError(400, f"parameter {k!r} given twice")
    out[k] = v
  return out


class _Handler(http.server.BaseHTTPRequestHandler):
  """JSON over HTTP/1.1 keep-alive; every reply has a JSON body."""

  protocol_version = "HTTP/1.1"
  server_version = "recattn-serve"
  sys_version = ""
  timeout = 60  # seconds an idle kept-alive connection is held
  # Headers and body go out in two writes; with Nagle's algorithm the body
  # would wait for the client's delayed ACK (~40 ms) on a kept-alive socket.
  disable_nagle_algorithm = True

  @property
  def service(self) -> Service:
    return self.server.service

  def do_GET(self):  # pylint: disable=invalid-name
    self._handle("GET")

  def do_POST(self):  # pylint: disable=invalid-name
    self._handle("POST")

  def do_PUT(self):  # pylint: disable=invalid-name
    self._handle("PUT")

  def do_DELETE(self):  # pylint: disable=invalid-name
    self._handle("DELETE")

  def do_PATCH(self):  # pylint: disable=invalid-name
    self._handle("PATCH")

  def do_HEAD(self):  # pylint: disable=invalid-name
    self._handle("HEAD")

  def do_OPTIONS(self):  # pylint: disable=invalid-name
    self._handle("OPTIONS")

  def log_message(self, format, *args):  # pylint: disable=redefined-builtin
    logging.debug("%s %s", self.address_string(), format % args)

  def send_error(self, code, message=None, explain=None):
    """The base class's errors (bad request line, headers), as JSON."""
    del explain
    self.close_connection = True
    short = self.responses.get(code, ("error",))[0]
    self._send(code, {"error": message or short})

  def _handle(self, method: str):
    start = time.perf_counter()
    url = urllib.parse.urlsplit(self.path)
    route = _ROUTES.get(url.path)
    endpoint = url.path if route else "other"
    headers = {}
    try:
      if route is None:
        self._discard_body()
        raise RequestError(404, f"unknown path {url.path!r}; endpoints: "
                           + ", ".join(f"{r.method} {p}"
                                       for p, r in _ROUTES.items()))
      if method != route.method:
        self._discard_body()
        raise RequestError(405, f"{url.path} allows {route.method}, not "
                           f"{method}", {"Allow": route.method})
      body = self._read_body(route.body)
      status, payload = 200, getattr(self, route.handler)(url.query, body)
    except RequestError as e:
      status, payload, headers = e.status, {"error": e.message}, e.headers
    except Exception as e:  # pylint: disable=broad-except
      logging.exception("Unhandled error on %s %s", method, self.path)
      status = 500
      payload = {"error": f"internal error: {type(e).__name__}: {e}"}
    # Counted before the reply goes out: a client that has its reply finds
    # the request in /metrics (another connection's handler thread may
    # otherwise answer /metrics first). Latency ends before the write.
    self.service.metrics.record_request(endpoint, status,
                                        time.perf_counter() - start)
    self._send(status, payload, headers)

  def _content_length(self) -> int | None:
    if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
      self.close_connection = True
      raise RequestError(411, "chunked bodies are not supported; send "
                         "Content-Length")
    length = self.headers.get("Content-Length")
    if length is None:
      return None
    if not re.fullmatch(r"[0-9]{1,18}", length.strip()):
      self.close_connection = True
      raise RequestError(400, f"bad Content-Length {length!r}")
    return int(length)

  def _discard_body(self, n: int | None = None):
    """Reads off an unwanted body, so the reply is not lost to a reset.

    Closing a socket with unread input sends a TCP reset, which can destroy
    the reply before the client reads it; bodies past `_DRAIN_BYTES` are
    not worth reading, and their connection is closed.
    """
    if n is None:
      try:
        n = self._content_length()
      except RequestError:
        return
    if not n:
      return
    if n > _DRAIN_BYTES:
      self.close_connection = True
      return
    while n > 0:
      chunk = self.rfile.read(min(n, MAX_BODY_BYTES))
      if not chunk:
        self.close_connection = True
        return
      n -= len(chunk)

  def _read_body(self, policy: str) -> bytes:
    n = self._content_length()
    if policy == "none":
      self._discard_body(n)
      return b""
    if n is None:
      if policy == "optional":
        return b""
      raise RequestError(411, "Content-Length required (a JSON body)")
    if n > MAX_BODY_BYTES:
      self._discard_body(n)
      self.close_connection = True
      raise RequestError(413, f"body of {n} bytes exceeds the limit of "
                         f"{MAX_BODY_BYTES} bytes")
    data = self.rfile.read(n)
    if len(data) != n:
      self.close_connection = True
      raise RequestError(400, f"body ended after {len(data)} of {n} bytes")
    return data

  def _send(self, status: int, payload, headers=None):
    if isinstance(payload, str):
      data, kind = payload.encode(), "text/plain; version=0.0.4"
    else:
      data, kind = json.dumps(payload, allow_nan=False).encode(), (
          "application/json")
    self.send_response(status)
    self.send_header("Content-Type", kind)
    self.send_header("Content-Length", str(len(data)))
    for k, v in (headers or {}).items():
      self.send_header(k, v)
    if self.close_connection:
      self.send_header("Connection", "close")
    self.end_headers()
    if self.command != "HEAD":
      self.wfile.write(data)

  # -- Endpoints: (query, body) -> payload. ---------------------------------

  def _events(self, query, body):
    del query
    obj = _json_object(body, {"user_id": "string",
                              "item_id": "integer original item id",
                              "timestamp": "optional integer unix seconds"})
    for field in ("user_id", "item_id"):
      if field not in obj:
        raise RequestError(400, f"missing field {field!r}")
    return self.service.observe(obj["user_id"], obj["item_id"],
                                obj.get("timestamp"))

  def _score(self, query, body):
    del query
    obj = _json_object(body, {"user_id": "string",
                              "item_ids": "list of integer original item ids"})
    for field in ("user_id", "item_ids"):
      if field not in obj:
        raise RequestError(400, f"missing field {field!r}")
    return self.service.score(obj["user_id"], obj["item_ids"])

  def _recommendations(self, query, body):
    del body
    max_k = self.service.max_k
    q = _query(query, {"user_id": "string",
                       "k": f"integer in [1, {max_k}], default 10",
                       "exclude_seen": "true or false, default true"})
    if "user_id" not in q:
      raise RequestError(400, "missing parameter 'user_id'")
    k = q.get("k", "10")
    if not _DIGITS.fullmatch(k):
      raise RequestError(400, f"k must be an integer in [1, {max_k}], got "
                         f"{k!r}")
    exclude = q.get("exclude_seen", "true")
    if exclude not in ("true", "false"):
      raise RequestError(400, "exclude_seen must be true or false, got "
                         f"{exclude!r}")
    return self.service.recommend(q["user_id"], int(k), exclude == "true")

  def _healthz(self, query, body):
    del query, body
    return self.service.health()

  def _metrics(self, query, body):
    del body
    q = _query(query, {"format": "json (default) or prometheus"})
    fmt = q.get("format", "json")
    if fmt not in ("json", "prometheus"):
      raise RequestError(400, f"format must be json or prometheus, got "
                         f"{fmt!r}")
    summary = self.service.metrics_summary()
    return prometheus_text(summary) if fmt == "prometheus" else summary

  def _snapshot(self, query, body):
    del query
    if body and body.strip() not in (b"", b"{}"):
      raise RequestError(400, "POST /v1/snapshot takes no body (no path: "
                         "the service writes only its --snapshot file)")
    return self.service.snapshot()


class Server(http.server.ThreadingHTTPServer):
  """A threading HTTP server bound to one `Service`."""

  daemon_threads = True

  def __init__(self, service: Service, address: tuple[str, int]):
    self.service = service
    super().__init__(address, _Handler)

  @property
  def url(self) -> str:
    host, port = self.server_address[:2]
    return f"http://{host}:{port}"


def make_server(service: Service, host: str = "127.0.0.1",
                port: int = 8080) -> Server:
  """An HTTP server for `service` (port 0: any free port; see `.url`)."""
  return Server(service, (host, port))


def serve_in_thread(server: Server,
                    poll_interval: float = 0.5) -> threading.Thread:
  """Runs `server.serve_forever` on a daemon thread; stop: `shutdown()`.

  `shutdown()` returns within `poll_interval` seconds.
  """
  thread = threading.Thread(target=server.serve_forever,
                            args=(poll_interval,), name="http-server",
                            daemon=True)
  thread.start()
  return thread
