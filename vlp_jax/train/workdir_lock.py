"""One training run per workdir: `workdir/run.lock`, taken atomically, released at exit.

The lock file is JSON naming the holder (host, pid, process start time, start time,
command line, process count); a background thread refreshes its modification time
every `stale_after_s / 4` seconds (the heartbeat). A lock is stale, and is taken over
with a warning, when its holder is gone: on the same host, its pid is no longer running
(or is a zombie, or now belongs to a process started at another time); on another host
(a shared file system), its heartbeat is older than `stale_after_s`. Otherwise
`acquire` raises `WorkdirLockedError` naming the holder.

Multi-host runs take one lock per run: process 0 holds it, every process learns the
outcome before anything else happens (`acquire_for_run`). Evaluation (`--mode=eval`)
takes no lock: it only reads.
"""
import contextlib
import datetime
import json
import os
import socket
import sys
import threading
import time
import uuid

import jax
import numpy as np
from absl import logging

from vlp_jax import errors

LOCK_NAME = "run.lock"


def _proc_start_ticks(pid: int):
  """The process's start time in clock ticks since boot (Linux), else None."""
  try:
    with open(f"/proc/{pid}/stat") as f:
      fields = f.read().rsplit(")", 1)[1].split()
    return fields[0], int(fields[19])  # (state, starttime)
  except (OSError, IndexError, ValueError):
    return None


def _pid_alive(pid: int, start_ticks=None) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # Someone else's live process.
    pass
  info = _proc_start_ticks(pid)
  if info is None:
    return True
  state, ticks = info
  if state == "Z":  # Exited, not yet reaped.
    return False
  return start_ticks is None or ticks == start_ticks


def _describe(holder: dict) -> str:
  return (f"host {holder.get('host', '?')}, pid {holder.get('pid', '?')}, started "
          f"{holder.get('start_time', '?')}, command: {holder.get('command', '?')}")


def stale_reason(holder: dict, heartbeat_age_s: float, stale_after_s: float):
  """Why the lock of `holder` is stale (a sentence), or None if its holder may be alive."""
  if holder.get("host") == socket.gethostname():
    pid = holder.get("pid")
    if not isinstance(pid, int) or not _pid_alive(pid, holder.get("proc_start_ticks")):
      return f"its process (pid {pid}) on this host is no longer running"
    return None
  if heartbeat_age_s > stale_after_s:
    return (f"its heartbeat is {heartbeat_age_s:.0f} s old (more than "
            f"config.lock_stale_after_s={stale_after_s:g})")
  return None


class WorkdirLock:
  """The lock of one run on `workdir` (see the module docstring)."""

  def __init__(self, workdir: str, stale_after_s: float = 600.0):
    self.path = os.path.join(workdir, LOCK_NAME)
    self.stale_after_s = float(stale_after_s)
    self.token = uuid.uuid4().hex
    self._stop = threading.Event()
    self._thread = None

  def _record(self) -> dict:
    info = _proc_start_ticks(os.getpid())
    return {"host": socket.gethostname(), "pid": os.getpid(),
            "proc_start_ticks": info and info[1], "token": self.token,
            "start_time": datetime.datetime.now().astimezone().isoformat(
                timespec="seconds"),
            "command": " ".join(sys.argv), "num_processes": jax.process_count()}

  def _read(self):
    """(holder dict, heartbeat age in s), or (None, None) if the file is gone."""
    try:
      with open(self.path) as f:
        text = f.read()
      age = time.time() - os.path.getmtime(self.path)
    except FileNotFoundError:
      return None, None
    try:
      return json.loads(text), age
    except json.JSONDecodeError:  # Being written, or cut short by a crash.
      return {"host": "?", "pid": None}, age

  def acquire(self):
    """Takes the lock, taking over a stale one; raises WorkdirLockedError if held."""
    for _ in range(5):
      try:
        fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
      except FileExistsError:
        holder, age = self._read()
        if holder is None:
          continue  # Released meanwhile: try again.
        # An unreadable lock (host '?') counts as another host's: held until its
        # heartbeat is older than stale_after_s.
        reason = stale_reason(holder, age, self.stale_after_s)
        if reason is None:
          raise errors.WorkdirLockedError(
              f"Another run is using {os.path.dirname(self.path)} ({_describe(holder)}); "
              f"its lock is {self.path}. Wait for it to finish or stop it, or use another "
              "--workdir. If that run is dead (e.g. on another host), delete the lock "
              f"file; a lock whose heartbeat is older than lock_stale_after_s="
              f"{self.stale_after_s:g} s is taken over automatically.")
        aside = f"{self.path}.stale-{uuid.uuid4().hex[:8]}"
        try:
          os.rename(self.path, aside)  # Atomic: of two takers, one wins.
        except FileNotFoundError:
          continue
        os.remove(aside)
        logging.warning("Took over the lock of %s: %s (%s).", os.path.dirname(self.path),
                        reason, _describe(holder))
        continue
      with os.fdopen(fd, "w") as f:
        json.dump(self._record(), f)
        f.flush()
        os.fsync(f.fileno())
      self._thread = threading.Thread(target=self._heartbeat, daemon=True,
                                      name="vlp_jax_lock_heartbeat")
      self._thread.start()
      return self
    raise errors.WorkdirLockedError(f"Could not take the lock {self.path}: other "
                                    "processes keep taking it. Is another run starting?")

  def _heartbeat(self):
    while not self._stop.wait(max(self.stale_after_s / 4, 0.05)):
      try:
        os.utime(self.path)
      except OSError:
        pass

  def release(self):
    """Stops the heartbeat and removes the lock file if it is still ours."""
    self._stop.set()
    if self._thread is not None:
      self._thread.join()
      self._thread = None
    holder, _ = self._read()
    if holder is not None and holder.get("token") == self.token:
      os.remove(self.path)


@contextlib.contextmanager
def acquire_for_run(workdir: str, stale_after_s: float):
  """Holds the run's lock for the block: process 0 takes it; all processes raise if it
  could not (so none starts training on a workdir in use)."""
  lock, error = None, None
  if jax.process_index() == 0:
    try:
      lock = WorkdirLock(workdir, stale_after_s).acquire()
    except errors.WorkdirLockedError as e:
      error = e
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    ok = multihost_utils.broadcast_one_to_all(np.int32(error is None))
    if not ok and error is None:
      error = errors.WorkdirLockedError(
          f"Process 0 could not take the lock of {workdir}: another run is using it "
          "(process 0's log names it).")
  if error is not None:
    raise error
  try:
    yield lock
  finally:
    if lock is not None:
      lock.release()
