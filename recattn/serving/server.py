"""The HTTP front end of a `Service`: stdlib server, JSON in and out.

`make_server` binds 127.0.0.1 by default (`recattn.serve` runs it); each
connection gets a thread (HTTP/1.1 keep-alive) and each request is answered
through the `Service`, which batches the engine calls.

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
"""

import dataclasses
import http.server
import json
import re
import threading
import time
import urllib.parse

from absl import logging

from recattn.serving import monitoring
from recattn.serving import service as service_lib
from recattn.serving.service import RequestError

MAX_BODY_BYTES = 64 * 1024
_DRAIN_BYTES = 1 << 20  # larger unwanted bodies: close instead of reading


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
                       f"{service_lib.type_name(obj)}")
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
  def service(self) -> service_lib.Service:
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
    return (monitoring.prometheus_text(summary) if fmt == "prometheus"
            else summary)

  def _snapshot(self, query, body):
    del query
    if body and body.strip() not in (b"", b"{}"):
      raise RequestError(400, "POST /v1/snapshot takes no body (no path: "
                         "the service writes only its --snapshot file)")
    return self.service.snapshot()


class Server(http.server.ThreadingHTTPServer):
  """A threading HTTP server bound to one `Service`."""

  daemon_threads = True

  def __init__(self, service: service_lib.Service, address: tuple[str, int]):
    self.service = service
    super().__init__(address, _Handler)

  @property
  def url(self) -> str:
    host, port = self.server_address[:2]
    return f"http://{host}:{port}"


def make_server(service: service_lib.Service, host: str = "127.0.0.1",
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
