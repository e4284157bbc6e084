"""Deliberately corrupted captions, for measuring data curation (`shapes:hard,noisy=F`).

`NoisyCaptions(source, fraction, seed)` gives a fixed subset of round(fraction * N)
records another record's captions: the subset is a seeded permutation's first
entries, and its records pass their captions one step around a cycle in that random
order (a shuffle of the chosen records' captions among themselves, so the captions'
overall distribution is unchanged and no corrupted record keeps its own). The image,
label and every other field stay the record's own. `corrupted` ([N] bool) and
`caption_donor` ([N] int, -1 when clean) say which records were changed, so a
curation report can score its filter against the known corruption.

`shapes` applies it to split 'train' only (evaluation splits stay clean). Two known
limits: `corrupted` marks records given another record's captions without comparing
the texts (that would read every donor up front; a `shapes:hard` record's caption
list, with its positions and sizes, rarely equals another's), and reading a corrupted
record also builds its donor record, image included (the built-in shapes draw the
captions from the same seeded stream as the image, after it), so those records cost
about twice as much to read.
"""
from typing import Any, Dict

import numpy as np

from vlp_jax import errors

_NOISE_STREAM = 7  # SeedSequence tail: the corruption is independent of the data.


class NoisyCaptions:
  """A random-access source whose records' captions are shuffled for a `fraction`."""

  def __init__(self, source, fraction: float, seed: int = 0):
    if not 0.0 <= fraction <= 1.0:
      raise errors.ConfigError(
          f"The caption noise fraction must be in [0, 1], got {fraction}; e.g. "
          "'shapes:hard,noisy=0.3' shuffles the captions of 30% of the records.")
    self.source = source
    self.fraction = float(fraction)
    n = len(source)
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), _NOISE_STREAM]))
    chosen = rng.permutation(n)[:int(round(fraction * n))]
    if len(chosen) == 1:  # One record cannot swap with itself.
      chosen = chosen[:0]
    self.caption_donor = np.full(n, -1, np.int64)
    self.caption_donor[chosen] = np.roll(chosen, -1)
    self.corrupted = self.caption_donor >= 0

  def __len__(self) -> int:
    return len(self.source)

  def __getattr__(self, name):  # class_names, seed, split, ...
    if name.startswith("__") or name == "source":  # Unpickling in worker processes.
      raise AttributeError(name)
    return getattr(self.source, name)

  def __repr__(self) -> str:
    return f"NoisyCaptions({self.source!r}, fraction={self.fraction})"

  def __getitem__(self, index: int) -> Dict[str, Any]:
    index = int(index)
    example = self.source[index]
    donor = int(self.caption_donor[index]) if 0 <= index < len(self) else -1
    if donor >= 0:
      example = dict(example, text=self.source[donor]["text"])
    return example
