"""Orbax checkpoints: `latest` for resuming, `best` chosen on validation.

A checkpoint holds the train state pytree plus a small JSON of loop
bookkeeping (epoch, best validation score, patience). Saved at epoch ends
only, so that with the per-epoch data order and per-step RNG derived from
the seed, a resumed run replays exactly the uninterrupted one.
"""

import os

import orbax.checkpoint as ocp


class Checkpoints:
  """The `latest` and `best` checkpoint managers under `<workdir>/ckpt`."""

  def __init__(self, workdir: str):
    root = os.path.join(os.path.abspath(workdir), "ckpt")
    opts = ocp.CheckpointManagerOptions(max_to_keep=1, create=True)
    self.latest = ocp.CheckpointManager(os.path.join(root, "latest"),
                                        options=opts)
    self.best = ocp.CheckpointManager(os.path.join(root, "best"),
                                      options=opts)

  @staticmethod
  def _save(manager, step: int, state, meta: dict) -> None:
    manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
                 force=True)

  @staticmethod
  def _restore(manager, template, step=None):
    step = manager.latest_step() if step is None else step
    if step is None:
      return None
    out = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(template),
        meta=ocp.args.JsonRestore()))
    return out.state, out.meta

  def save_latest(self, step: int, state, meta: dict) -> None:
    self._save(self.latest, step, state, meta)

  def save_best(self, step: int, state, meta: dict) -> None:
    self._save(self.best, step, state, meta)

  def restore_latest(self, template):
    """(state, meta) of the newest `latest` checkpoint, or None."""
    return self._restore(self.latest, template)

  def restore_best(self, template):
    """(state, meta) of the best-on-validation checkpoint, or None."""
    self.best.wait_until_finished()
    return self._restore(self.best, template)

  def close(self) -> None:
    self.latest.wait_until_finished()
    self.best.wait_until_finished()
    self.latest.close()
    self.best.close()
