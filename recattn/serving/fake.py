"""A small deterministic engine with the serving protocol, for tests.

`FakeEngine` stands in for `recattn.serving.engine.Engine` wherever the
service must run without a trained model: the unit tests and the load
test's `--fake` smoke run. Its answers are easy to state, so tests can
check them exactly:

* state: the last `max_len` internal item ids (left-padded with 0, newest
  last), their timestamps and the event count;
* scores: with `l` the newest item (0 for a fresh user), item `j` scores
  `1 - ((j - l - 1) mod N) / N`, so the ranking is l+1, l+2, ... (wrapping
  after N); `exclude_seen` gives the items in the window -inf;
* candidate scores (`score`): the same scores of the given items, seen or
  not.

Original ids are `1000 + 7 * i` for i = 0..N-1, permuted with `seed`, so
they are neither sorted nor equal to the internal ids.
"""

import collections
import threading
import time

import numpy as np


class FakeEngineError(RuntimeError):
  """Raised by `FakeEngine.observe` for an item in `fail_items`."""


class FakeEngine:
  """The serving engine protocol over a toy "next item" model.

  Attributes:
    max_len: window of remembered items.
    num_items: internal ids are 1..num_items.
    original_item_ids: [num_items] int64; internal id i is
      `original_item_ids[i - 1]`.
    fail_items: internal ids whose `observe` raises (engine failure tests).
    delay_s: sleep per engine call (to make micro-batches form in tests).
    calls: the most recent engine calls, as (kind, batch size, thread id).
  """

  def __init__(self, num_items: int = 50, max_len: int = 8, seed: int = 0,
               fail_items=(), delay_s: float = 0.0):
    rng = np.random.default_rng(seed)
    self.max_len = max_len
    self.num_items = num_items
    self.original_item_ids = rng.permutation(
        np.arange(num_items, dtype=np.int64) * 7 + 1000)
    self.fail_items = set(int(i) for i in fail_items)
    self.delay_s = delay_s
    self.calls = collections.deque(maxlen=1000)

  def original(self, internal) -> np.ndarray:
    """Original ids of internal ids (any shape)."""
    return self.original_item_ids[np.asarray(internal) - 1]

  def internal(self, original: int) -> int:
    """The internal id of one original id."""
    return int(np.flatnonzero(self.original_item_ids == original)[0]) + 1

  def _record(self, kind: str, n: int):
    self.calls.append((kind, n, threading.get_ident()))
    if self.delay_s:
      time.sleep(self.delay_s)

  def new_state(self) -> dict[str, np.ndarray]:
    return {"items": np.zeros(self.max_len, np.int32),
            "times": np.zeros(self.max_len, np.int64),
            "count": np.zeros((), np.int64)}

  def observe(self, states, items, times):
    self._record("observe", len(states))
    items = np.asarray(items)
    if items.shape != (len(states),):
      raise ValueError(f"items shape {items.shape}, {len(states)} states")
    bad = self.fail_items.intersection(items.tolist())
    if bad:
      raise FakeEngineError(f"fake failure on items {sorted(bad)}")
    out = []
    for i, s in enumerate(states):
      t = -1 if times is None else int(times[i])
      out.append({
          "items": np.append(s["items"][1:], np.int32(items[i])),
          "times": np.append(s["times"][1:], np.int64(t)),
          "count": np.asarray(s["count"] + 1)})
    return out

  def recommend(self, states, k: int, exclude_seen: bool = True):
    self._record("recommend", len(states))
    n, big_n = len(states), self.num_items
    window = np.stack([s["items"] for s in states]).astype(np.int64)
    last = window[:, -1]
    j = np.arange(1, big_n + 1)
    dist = (j[None, :] - last[:, None] - 1) % big_n
    scores = (1.0 - dist / big_n).astype(np.float32)
    if exclude_seen:
      seen = np.zeros((n, big_n + 1), bool)
      seen[np.arange(n)[:, None], window] = True
      scores[seen[:, 1:]] = -np.inf
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return ((order + 1).astype(np.int32),
            np.take_along_axis(scores, order, axis=1))

  def score(self, states, candidates):
    self._record("score", len(states))
    out = []
    for s, c in zip(states, candidates):
      last = int(s["items"][-1])
      dist = (np.asarray(c, np.int64) - last - 1) % self.num_items
      out.append((1.0 - dist / self.num_items).astype(np.float32))
    return out

  def warmup(self, max_batch: int, k: int = 10) -> float:
    del max_batch, k  # nothing to compile
    return 0.0

  def describe(self) -> dict:
    return {"model": "fake", "variant": "next_item", "max_len": self.max_len,
            "num_items": self.num_items, "workdir": None, "commit": None,
            "candidate_scoring": True,
            "state_bytes": sum(v.nbytes for v in self.new_state().values())}
