"""Graceful stop on SIGINT/SIGTERM: finish the current step, checkpoint, exit cleanly."""
import signal
import threading

from absl import logging


class StopRequest:
  """Context manager: while active, SIGINT/SIGTERM set `requested` instead of killing.

  A second SIGINT raises KeyboardInterrupt at once (a hard stop). Handlers are only
  installed from the main thread and are restored on exit.
  """

  SIGNALS = (signal.SIGINT, signal.SIGTERM)

  def __init__(self):
    self.requested = None  # The name of the first signal received.
    self._previous = {}

  def _handle(self, signum, frame):
    del frame
    name = signal.Signals(signum).name
    if self.requested and signum == signal.SIGINT:
      raise KeyboardInterrupt
    self.requested = self.requested or name
    logging.warning("%s received: finishing this step, saving a checkpoint, then "
                    "exiting (Ctrl-C again to stop at once).", name)

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      for sig in self.SIGNALS:
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    return False
