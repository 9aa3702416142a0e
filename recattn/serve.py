r"""Serves a trained run's recommendations over HTTP, in real time.

  python -m recattn.serve --workdir=<trained run> [--port=8080]
      [--host=127.0.0.1] [--max_users=100000] [--snapshot=<path>]
      [--restore_snapshot] [--max_batch=64] [--max_wait_ms=1]
      [--cache=auto|kv|none] [--scoring=exact|int8]
  python -m recattn.serve --export=<dir of recattn.serving.export> ...

`--export` serves exported StableHLO artefacts and parameters; no model or
training code is loaded.

Clients post events (`POST /v1/events`) and ask for top-k items
(`GET /v1/recommendations`); each user's state is updated incrementally by
`recattn.serving.engine.Engine` and held in memory (at most `--max_users`,
least recently used evicted). Endpoints: `recattn/serving/server.py`;
batching: `recattn/serving/service.py`; the snapshot format:
`recattn/serving/state_store.py`.

`--restore_snapshot` loads `--snapshot` at start (a missing file starts
empty, with a warning; an unreadable or mismatched one is an error). On
SIGINT/SIGTERM the server stops taking requests, answers those queued and,
with `--snapshot`, writes every user's state there. The server binds
127.0.0.1 unless `--host` says otherwise: it has no authentication.
`POST /v1/snapshot` writes only the `--snapshot` file.
"""

import importlib
import os
import signal
import threading

from absl import app
from absl import flags
from absl import logging

from recattn.serving import server as server_lib
from recattn.serving import service as service_lib

_WORKDIR = flags.DEFINE_string("workdir", None, "A trained run's workdir.")
_EXPORT = flags.DEFINE_string(
    "export", None, "Directory of `python -m recattn.serving.export` "
    "artefacts (instead of --workdir).")
_CACHE = flags.DEFINE_enum(
    "cache", "auto", ["auto", "kv", "none"],
    "--workdir only: incremental cache (auto: when the model allows; none: "
    "re-encode the window at every event).")
_SCORING = flags.DEFINE_enum(
    "scoring", "exact", ["exact", "int8"],
    "--workdir only: catalogue scan in float32, or in int8 with the best "
    "candidates re-scored exactly (a quarter of the memory traffic).")
_HOST = flags.DEFINE_string("host", "127.0.0.1", "Address to bind.")
_PORT = flags.DEFINE_integer("port", 8080, "Port (0: any free port).")
_MAX_USERS = flags.DEFINE_integer("max_users", 100_000,
                                  "Users held in memory (LRU beyond).")
_SNAPSHOT = flags.DEFINE_string("snapshot", None,
                                "Snapshot file: written on shutdown and by "
                                "POST /v1/snapshot without a path.")
_RESTORE = flags.DEFINE_bool("restore_snapshot", False,
                             "Load --snapshot at start.")
_MAX_BATCH = flags.DEFINE_integer("max_batch", 64,
                                  "Requests per engine micro-batch.")
_MAX_WAIT_MS = flags.DEFINE_float("max_wait_ms", 1.0,
                                  "Wait for a micro-batch to fill (ms).")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if (_WORKDIR.value is None) == (_EXPORT.value is None):
    raise app.UsageError("give exactly one of --workdir and --export")
  if _RESTORE.value and not _SNAPSHOT.value:
    raise app.UsageError("--restore_snapshot needs --snapshot=<path>")
  # Imported here: the engine pulls in JAX and the models.
  engine_lib = importlib.import_module("recattn.serving.engine")
  if _EXPORT.value:
    engine = engine_lib.Engine.from_export(_EXPORT.value)
  else:
    engine = engine_lib.Engine.from_workdir(
        _WORKDIR.value, cache=_CACHE.value, scoring=_SCORING.value)
  describe = engine.describe()
  logging.info("engine: %s", describe)
  logging.info("at most %d users x %d bytes of state = %.1f MiB",
               _MAX_USERS.value, describe["state_bytes"],
               _MAX_USERS.value * describe["state_bytes"] / 2**20)
  logging.info("compiled batch shapes up to %d users in %.1f s",
               _MAX_BATCH.value, engine.warmup(_MAX_BATCH.value))
  service = service_lib.Service(
      engine, max_users=_MAX_USERS.value, max_batch=_MAX_BATCH.value,
      max_wait_ms=_MAX_WAIT_MS.value, snapshot_path=_SNAPSHOT.value)
  if _RESTORE.value:
    if os.path.exists(_SNAPSHOT.value):
      service.load_snapshot(_SNAPSHOT.value)
    else:
      logging.warning("No snapshot at %s yet; starting with no users.",
                      _SNAPSHOT.value)
  server = server_lib.make_server(service, _HOST.value, _PORT.value)
  stop = threading.Event()

  def on_signal(signum, frame):
    del frame
    logging.info("Signal %s: shutting down.", signal.Signals(signum).name)
    stop.set()

  signal.signal(signal.SIGINT, on_signal)
  signal.signal(signal.SIGTERM, on_signal)
  thread = server_lib.serve_in_thread(server)
  logging.info("Serving %s (%s) at %s", _WORKDIR.value or _EXPORT.value,
               service.description.get("model"), server.url)
  print(f"Serving at {server.url}", flush=True)
  while not stop.wait(0.5):
    pass
  server.shutdown()
  thread.join()
  server.server_close()
  service.close()
  if _SNAPSHOT.value:
    service.snapshot(_SNAPSHOT.value)
  logging.info("Stopped.")


if __name__ == "__main__":
  app.run(main)
