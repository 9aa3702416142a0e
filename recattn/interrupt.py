"""Graceful stops: SIGTERM or SIGINT ends a training at a checkpoint.

A study may take days of machine time on hosts that come and go (a
preemptible VM gets SIGTERM shortly before it goes; a session ends). Inside
`StopRequest()` the first SIGTERM or SIGINT only records a request: the
trainer finishes its current step, saves `latest` (mid-epoch if need be)
and raises `Interrupted`; `recattn.main` then exits with `EXIT_CODE`, and
rerunning the same command resumes exactly where it stopped. Further
signals are logged and ignored (SIGKILL still ends a process at once), so a
signal that reaches both the sweep runner and its training, or arrives
twice, costs nothing.

No JAX here: the sweep runner uses it too.
"""

import signal
import threading

from absl import logging

# sysexits.h EX_TEMPFAIL: a temporary failure; the caller may retry.
EXIT_CODE = 75
SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Interrupted(Exception):
  """A stop was requested; the run saved its state and can be resumed."""


class StopRequest:
  """Context manager: records SIGTERM/SIGINT instead of dying on them.

  `requested` is the first signal's number, or 0. Outside the main thread
  (where Python cannot install handlers) it installs nothing and never
  reports a request. The previous handlers come back on exit.
  """

  def __init__(self, on_stop=None):
    """`on_stop(signum)`, if given, runs once, in the handler of the first
    signal (the sweep runner passes the stop on to its trainings)."""
    self.requested = 0
    self._on_stop = on_stop
    self._previous = {}

  @property
  def reason(self) -> str:
    """The signal's name, or what stopped this process without one."""
    if self.requested:
      return signal.Signals(self.requested).name
    return "a stop requested in another process"

  def _handle(self, signum, frame):
    del frame
    name = signal.Signals(signum).name
    if self.requested:
      logging.warning("%s: already stopping at the next checkpoint", name)
      return
    self.requested = signum
    logging.warning("%s: stopping after the current step at a checkpoint "
                    "(rerun the same command to resume)", name)
    if self._on_stop is not None:
      self._on_stop(signum)

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      for signum in SIGNALS:
        self._previous[signum] = signal.signal(signum, self._handle)
    return self

  def __exit__(self, *exc):
    for signum, handler in self._previous.items():
      signal.signal(signum, handler)
    self._previous.clear()
    return False
