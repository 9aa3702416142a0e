"""Serving artefacts: the engine's functions as StableHLO (`jax.export`).

  python -m recattn.serving.export --workdir=<trained run> --out=<dir>

writes

  encode.bin, append.bin     `jax.export` serialisations (symbolic batch
                             size `b`): window -> (h, cache), one event ->
                             (h, cache, window); append only for models
                             with an incremental cache
  top_k_<K>.bin              top-K over the catalogue for K in `K_BUCKETS`
                             (up to num_items); `Engine` asks for the
                             smallest K >= k and cuts
  score_<T>.bin              target-aware logits of T candidates per user
                             (`incremental.score_targets`) for T in
                             `SCORE_BUCKETS`; only for models with a
                             ranking head
  params.npz                 the parameters as the flat leaf list p0..pN
  table.npz                  output item vectors `[V + 1, D]` (+ the int8
                             copy and scales with `--scoring=int8`)
  items.npz                  original item ids, popularity order
  meta.json                  window, state spec, flags, provenance

`Engine.from_export(dir)` serves from these with jax and numpy only: no
model, attention or training code is imported (tests check this). The
exported functions run on the platform they were exported for (`--platforms`,
default the exporting machine's).
"""

from __future__ import annotations

import json
import os

from absl import app
from absl import flags
from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

K_BUCKETS = (16, 128, 1024)
SCORE_BUCKETS = (16, 128, 1024)  # the last = engine.MAX_CANDIDATES
FORMAT = 1


def _write_bytes(path: str, data: bytes) -> None:
  tmp = path + ".tmp"
  with open(tmp, "wb") as f:
    f.write(data)
  os.replace(tmp, path)


def export(engine, out: str, platforms: tuple[str, ...] | None = None) -> dict:
  """Exports an in-process engine (`Engine.from_model/from_workdir`).

  Returns the meta dict also written to `<out>/meta.json`.
  """
  from recattn.serving import engine as engine_lib  # pylint: disable=g-import-not-at-top
  if engine._model is None:  # pylint: disable=protected-access
    raise ValueError("export needs an in-process engine (from_model or "
                     "from_workdir)")
  os.makedirs(out, exist_ok=True)
  leaves, treedef = jax.tree.flatten(engine.params)
  w = engine.max_len
  b, = jax.export.symbolic_shape("b")

  def encode(leaves, items, times):
    return engine.encode_fn(jax.tree.unflatten(treedef, leaves), items, times)

  def append(leaves, cache, items, times, item, time):
    return engine.append_fn(jax.tree.unflatten(treedef, leaves), cache, items,
                            times, item, time)

  spec = lambda shape, dtype: jax.ShapeDtypeStruct(shape, jnp.dtype(dtype))
  leaf_specs = [spec(x.shape, x.dtype) for x in leaves]
  window = spec((b, w), "int32")
  cache = {k: spec((b,) + shape, dtype)
           for k, (shape, dtype) in engine.spec.items()
           if k in engine.cache_keys}
  kw = {} if platforms is None else {"platforms": platforms}
  artefacts = {"encode": jax.export.export(jax.jit(encode), **kw)(
      leaf_specs, window, window)}
  if engine.cached:  # otherwise every event re-encodes its window
    artefacts["append"] = jax.export.export(jax.jit(append), **kw)(
        leaf_specs, cache, window, window, spec((b,), "int32"),
        spec((b,), "int32"))
  scores = engine.score_fn is not None and engine.cached
  why_no_score = engine.why_no_score or (
      "" if scores else "exported without an incremental cache")
  if scores:
    def score(leaves, cache, items, times, candidates):
      return engine.score_fn(jax.tree.unflatten(treedef, leaves), cache,
                             items, times, candidates)
    for t in SCORE_BUCKETS:
      artefacts[f"score_{t}"] = jax.export.export(jax.jit(score), **kw)(
          leaf_specs, cache, window, window, spec((b, t), "int32"))
  table = {k: np.asarray(v) for k, v in engine.table.items()}
  ks = [k for k in K_BUCKETS if k < engine.num_items] + [
      min(K_BUCKETS[-1], engine.num_items)]
  for k in sorted(set(ks)):
    artefacts[f"top_k_{k}"] = jax.export.export(
        jax.jit(engine_lib.top_k, static_argnums=3), **kw)(
            {k: spec(v.shape, v.dtype) for k, v in table.items()},
            spec((b, engine.dim), "float32"),
            spec((b, engine.max_seen), "int32"), k)
  for name, exported in artefacts.items():
    _write_bytes(os.path.join(out, f"{name}.bin"), exported.serialize())
  np.savez(os.path.join(out, "params.npz"),
           **{f"p{i}": np.asarray(x) for i, x in enumerate(leaves)})
  np.savez(os.path.join(out, "table.npz"), **table)
  np.savez(os.path.join(out, "items.npz"),
           original_item_ids=engine.original_item_ids,
           popular=engine.popular)
  meta = {
      "format": FORMAT, "max_len": w, "spec": engine.spec,
      "cache_keys": list(engine.cache_keys), "cached": engine.cached,
      "why_not_cached": engine.why_not_cached,
      "uses_time": engine.uses_time, "num_leaves": len(leaves),
      "top_k": sorted(set(ks)),
      "score": list(SCORE_BUCKETS) if scores else [],
      "why_no_score": why_no_score,
      "platforms": list(artefacts["encode"].platforms),
      "info": engine.info, "jax": jax.__version__,
  }
  with open(os.path.join(out, "meta.json.tmp"), "w") as f:
    json.dump(meta, f, indent=1, sort_keys=True)
  os.replace(os.path.join(out, "meta.json.tmp"),
             os.path.join(out, "meta.json"))
  return meta


def load(directory: str, engine_cls):
  """An `engine_cls` (serving.engine.Engine) over exported artefacts."""
  path = os.path.join(directory, "meta.json")
  try:
    with open(path) as f:
      meta = json.load(f)
  except FileNotFoundError:
    raise FileNotFoundError(
        f"{path}: not an export directory (make one with python -m "
        "recattn.serving.export --workdir=<run> --out=<dir>)") from None
  if meta.get("format") != FORMAT:
    raise ValueError(f"{path}: format {meta.get('format')!r}, this code "
                     f"reads format {FORMAT}")

  def read(name):
    with open(os.path.join(directory, f"{name}.bin"), "rb") as f:
      return jax.export.deserialize(bytearray(f.read()))

  encode = read("encode")
  append = read("append") if meta["cached"] else None
  top = {k: read(f"top_k_{k}") for k in meta["top_k"]}
  with np.load(os.path.join(directory, "params.npz")) as z:
    leaves = [jnp.asarray(z[f"p{i}"]) for i in range(meta["num_leaves"])]
  with np.load(os.path.join(directory, "table.npz")) as z:
    table = {k: jnp.asarray(z[k]) for k in z.files}
  with np.load(os.path.join(directory, "items.npz")) as z:
    original, popular = z["original_item_ids"], z["popular"]

  def top_k_fn(table, h, seen, k):
    bucket = min([b for b in top if b >= k] or [max(top)])
    ids, scores = top[bucket].call(table, h, seen)
    return ids[:, :k], scores[:, :k]

  scorers = {t: read(f"score_{t}") for t in meta.get("score", [])}

  def score_fn(leaves, cache, items, times, candidates):
    t = candidates.shape[1]
    bucket = min(b for b in scorers if b >= t)
    pad = np.ones((candidates.shape[0], bucket - t), np.int32)
    logits = scorers[bucket].call(leaves, cache, items, times,
                                  np.concatenate([candidates, pad], 1))
    return logits[:, :t]

  info = dict(meta["info"], exported_from=os.path.abspath(directory))
  return engine_cls(
      encode_fn=encode.call, append_fn=append and append.call,
      top_k_fn=top_k_fn,
      params=leaves, table=table,
      spec={k: (tuple(s), d) for k, (s, d) in meta["spec"].items()},
      cache_keys=tuple(meta["cache_keys"]), max_len=meta["max_len"],
      cached=meta["cached"], why_not_cached=meta["why_not_cached"],
      uses_time=meta["uses_time"], original_item_ids=original,
      popular=popular, info=info,
      score_fn=score_fn if scorers else None,
      why_no_score=meta.get("why_no_score", "not exported"))


def _define_flags():
  """Flags of the entry point (defined only when run as a program, so that
  importing this module next to other entry points cannot clash)."""
  global _WORKDIR, _OUT, _WHICH, _CACHE, _SCORING, _PLATFORMS
  _WORKDIR = flags.DEFINE_string("workdir", None, "Trained run to export.")
  _OUT = flags.DEFINE_string("out", None, "Output directory.")
  _WHICH = flags.DEFINE_enum("which", "best", ["best", "latest"], "Checkpoint.")
  _CACHE = flags.DEFINE_enum("cache", "auto", ["auto", "kv", "none"],
                             "Incremental cache (auto: when the model allows).")
  _SCORING = flags.DEFINE_enum("scoring", "exact", ["exact", "int8"],
                               "Catalogue scan: float32, or int8 + exact "
                               "re-scoring of the best candidates.")
  _PLATFORMS = flags.DEFINE_list("platforms", None,
                                 "Export for these platforms (cpu, cuda, tpu); "
                                 "default: this machine's.")


def main(argv):
  del argv
  from recattn.serving import engine as engine_lib  # pylint: disable=g-import-not-at-top
  engine = engine_lib.Engine.from_workdir(_WORKDIR.value, which=_WHICH.value,
                                          cache=_CACHE.value,
                                          scoring=_SCORING.value)
  meta = export(engine, _OUT.value,
                tuple(_PLATFORMS.value) if _PLATFORMS.value else None)
  logging.info("exported to %s: %s", _OUT.value, meta)


if __name__ == "__main__":
  _define_flags()
  flags.mark_flags_as_required(["workdir", "out"])
  app.run(main)
