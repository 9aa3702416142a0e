"""Real-time recommendation over HTTP: per-user state, micro-batched engine.

Three layers, each usable without the next (the tests drive all three):

* `state_store.StateStore`: every user's engine state in memory, bounded
  by `max_users` with least-recently-used eviction, and atomic snapshots to
  one file (their layout: `state_store`).
* `Service` (this module): requests in original item ids, validated in full
  before anything is queued, mapped to the engine's internal ids and
  answered by one worker thread that drains a queue in micro-batches (up to
  `max_batch` requests, waiting at most `max_wait_ms` after the first). The
  engine is called only from that thread: `observe` and `recommend` once
  per batch each (`recommend` once per `exclude_seen` value), so concurrent
  clients share engine calls. Counters and latencies: `monitoring`.
* `server.make_server`: a stdlib HTTP front end (JSON in and out; the
  endpoints: `server`); `recattn.serve` runs it.

Ordering. A user's events are applied in arrival order: inside one batch
the i-th event of each user goes into the i-th of a sequence of `observe`
calls. Within a batch, events are applied before recommendations, so a
recommendation concurrent with an event may see it (a request sent after a
response sees everything that response acknowledged).

Failure. An engine exception fails that batch's requests of that kind (500)
and stores nothing from them; states of other users, and of these users,
are as before. An event without a timestamp gets the arrival time (unix
seconds).
"""

import collections
import concurrent.futures
import dataclasses
import hashlib
import json
import math
import queue
import threading
import time

from absl import logging
import numpy as np

from recattn.serving import monitoring
from recattn.serving import state_store

MAX_K = 1000
MAX_USER_ID_CHARS = 256
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
_TIME_MAX = 2**31 - 1  # engines keep int32 seconds (time-interval biases)
_K_BUCKETS = (16, 32, 64, 128, 256, 512, 1024)  # engine k, to bound jit shapes


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


def type_name(value) -> str:
  """A value's type as error messages name it (JSON's "null" for None)."""
  return "null" if value is None else type(value).__name__


def check_user_id(value) -> str:
  if (not isinstance(value, str) or not value
      or len(value) > MAX_USER_ID_CHARS):
    got = (f"a string of {len(value)} characters" if isinstance(value, str)
           else type_name(value))
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
    self.store = state_store.StateStore(self._fresh, max_users, fingerprint)
    self.store.check_state(self._fresh, "engine.new_state()")
    self.metrics = monitoring.Metrics(metrics_window)
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
                         f"id of the catalogue), got {type_name(item_id)}")
    item = self.internal_id(item_id)
    if item is None:
      raise RequestError(400, f"item_id {item_id} is not in the catalogue "
                         f"({self.num_items} items)")
    if timestamp is None:
      timestamp = int(time.time())
    elif not _is_int(timestamp) or not 0 <= timestamp <= _TIME_MAX:
      got = timestamp if _is_int(timestamp) else type_name(timestamp)
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
      got = k if _is_int(k) else type_name(k)
      raise RequestError(400, f"k must be an integer in [1, {self.max_k}], "
                         f"got {got}")
    if not isinstance(exclude_seen, bool):
      raise RequestError(400, "exclude_seen must be true or false, got "
                         f"{type_name(exclude_seen)}")
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
                         f"item ids, got {type_name(item_ids)}")
    if len(item_ids) > self.max_candidates:
      raise RequestError(400, f"item_ids holds {len(item_ids)} ids; at most "
                         f"{self.max_candidates} per request")
    internal = []
    for i, item_id in enumerate(item_ids):
      if not _is_int(item_id):
        raise RequestError(400, f"item_ids[{i}] must be an integer (an "
                           "original item id of the catalogue), got "
                           f"{type_name(item_id)}")
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
    rss, source = monitoring.process_rss_bytes()
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
                         f"on the server), got {type_name(path)}")
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
