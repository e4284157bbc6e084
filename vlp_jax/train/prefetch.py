"""Device prefetch: batches put on device ahead of the step that consumes them."""
import collections
import json


class DevicePrefetcher:
  """Iterates `transfer(next(source))`, keeping `size` transferred batches in flight.

  `transfer` typically calls `jax.make_array_from_process_local_data`, which starts an
  asynchronous host-to-device copy: while the current step runs, the next `size`
  batches are already on their way with the batch sharding. The source iterator runs
  ahead, so `get_state()` returns the source's state right after the batch most
  recently *yielded* (bytes of JSON, as grain's checkpoint handler expects from a
  non-grain iterator): checkpoints resume exactly at the next unconsumed batch.
  With `limit`, at most that many batches are read from the source (training never
  reads data past its last step).
  """

  def __init__(self, source, transfer, size: int = 2, limit=None):
    self._source, self._transfer, self._size = source, transfer, max(0, size)
    self._left = float("inf") if limit is None else limit
    self._queue = collections.deque()
    self._has_state = hasattr(source, "get_state")
    self._state = self._source_state()

  def _source_state(self):
    return self._source.get_state() if self._has_state else None

  def _pull(self):
    if self._left <= 0:
      raise StopIteration
    item = self._transfer(next(self._source))
    self._left -= 1
    self._queue.append((item, self._source_state()))

  def __iter__(self):
    return self

  def __next__(self):
    if not self._queue:
      self._pull()  # raises StopIteration at the end of the source
    while len(self._queue) < self._size + 1:
      try:
        self._pull()
      except StopIteration:
        break
    item, self._state = self._queue.popleft()
    return item

  def get_state(self) -> bytes:
    if not self._has_state:
      raise TypeError("The source iterator has no get_state(); it cannot be checkpointed.")
    return json.dumps(self._state, indent=4).encode()
