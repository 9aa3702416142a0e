"""One training per workdir: an advisory lock held while a run trains.

Two trainings of one workdir (a sweep that picked up a run another sweep
or a manual launch is training, two sweeps whose `--only` overlap) would
both append to its metrics and write its checkpoints. `hold(workdir)`
takes `<workdir>/train.lock` with `fcntl.flock`, which the kernel releases
when the process ends however it ends (no stale locks after a crash or
SIGKILL), and raises `Busy` naming the holder when another process has it.
"""

import contextlib
import fcntl
import os

LOCK_NAME = "train.lock"


class Busy(RuntimeError):
  """Another live process is training this workdir."""


def _open(workdir: str) -> int:
  return os.open(os.path.join(workdir, LOCK_NAME), os.O_RDWR | os.O_CREAT,
                 0o644)


def _try_lock(fd: int) -> bool:
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except BlockingIOError:
    return False
  return True


def _who(fd: int) -> str:
  text = os.pread(fd, 200, 0).decode(errors="replace").strip()
  return text or "pid unknown"


@contextlib.contextmanager
def hold(workdir: str):
  """Holds the workdir's lock for the block; raises `Busy` if it is held."""
  os.makedirs(workdir, exist_ok=True)
  fd = _open(workdir)
  try:
    if not _try_lock(fd):
      raise Busy(f"{workdir} is being trained by another process "
                 f"({_who(fd)}); let it finish or stop it (SIGTERM saves a "
                 "checkpoint), then rerun to resume")
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} on {os.uname().nodename}\n".encode(), 0)
    yield
  finally:
    os.close(fd)  # releases the lock


def holder(workdir: str) -> str | None:
  """Who trains the workdir now ('pid N on host'), or None if nobody does."""
  if not os.path.exists(os.path.join(workdir, LOCK_NAME)):
    return None
  fd = _open(workdir)
  try:
    if _try_lock(fd):
      return None  # closing the descriptor releases it again
    return _who(fd)
  finally:
    os.close(fd)
