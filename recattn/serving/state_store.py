"""Users' engine states in memory: bounded, LRU-evicted, snapshotted.

`StateStore` holds every user's engine state in memory, bounded by
`max_users` with least-recently-used eviction, and writes atomic snapshots
to one file (`recattn.serving.service.Service` keeps one store).

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
import contextlib
import json
import os
import tempfile
import threading
import time
import zipfile

import numpy as np

_SNAPSHOT_FORMAT = "recattn-serving-snapshot"
_SNAPSHOT_VERSION = 1


class SnapshotError(ValueError):
  """A snapshot that cannot be read or used; the message names the file."""


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

