"""One training per workdir: the lock, its holder, its release."""

import os
import signal
import subprocess
import sys
import textwrap

import pytest

from recattn import runlock


ME = f"pid {os.getpid()} on {os.uname().nodename}"


def test_a_second_hold_is_refused_naming_the_holder(tmp_path):
  workdir = str(tmp_path / "run")
  assert runlock.holder(workdir) is None
  with runlock.hold(workdir):
    # flock is per open file: a second open in this process conflicts too,
    # as another process's would.
    assert runlock.holder(workdir) == ME
    with pytest.raises(runlock.Busy, match=rf"{workdir} is being trained by "
                       rf"another process \(pid {os.getpid()} "):
      with runlock.hold(workdir):
        pass
  assert runlock.holder(workdir) is None
  with runlock.hold(workdir):  # released: taken again
    pass


def test_a_killed_holder_leaves_no_stale_lock(tmp_path):
  workdir = str(tmp_path / "run")
  child = subprocess.Popen(
      [sys.executable, "-c", textwrap.dedent(f"""
          import sys, time
          from recattn import runlock
          with runlock.hold({workdir!r}):
            print("held", flush=True)
            time.sleep(60)
          """)], stdout=subprocess.PIPE, text=True)
  try:
    assert child.stdout.readline() == "held\n"
    assert runlock.holder(workdir) == (
        f"pid {child.pid} on {os.uname().nodename}")
  finally:
    child.send_signal(signal.SIGKILL)
    child.wait()
  assert runlock.holder(workdir) is None
