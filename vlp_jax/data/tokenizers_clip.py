"""CLIP's byte-level BPE tokenizer, giving the ids of open_clip's `SimpleTokenizer`.

Text is cleaned as open_clip does (`ftfy.fix_text`, HTML entities unescaped twice,
whitespace runs collapsed, stripped, lower-cased), split with CLIP's regular expression,
mapped byte by byte to printable characters and merged with the BPE ranks of the vocab
file. Ids: the 256 byte symbols, the same with '</w>', one per merge, then
'<start_of_text>' (BOS, 49406) and '<end_of_text>' (EOS, 49407) for the built-in file.

Id 0 is both padding and the token '!' (byte 0x21 is the first byte symbol), exactly as
in open_clip and OpenAI's CLIP: rows are [BOS, tokens..., EOS, 0, ...] and a '!' inside
a caption is also 0. `decode` therefore keeps 0s before the first EOS as '!' and drops
only the trailing zeros of a row without EOS.
"""
import functools
import gzip
import html
import os
from typing import Dict, Iterable, List, Tuple

import numpy as np

from vlp_jax import errors
from vlp_jax.data import tokenizers

ASSETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets")
DEFAULT_VOCAB = os.path.join(ASSETS, "bpe_simple_vocab_16e6.txt.gz")
# open_clip reads merges[1:49152 - 256 - 2 + 1] (line 0 is a header).
_MAX_MERGES = 49152 - 256 - 2
_CACHE_SIZE = 1 << 18  # Distinct words whose BPE is remembered (open_clip: unbounded).


@functools.lru_cache()
def bytes_to_unicode() -> Dict[int, str]:
  """GPT-2/CLIP's reversible map of the 256 bytes to printable characters."""
  bs = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1)))
  cs = bs[:]
  n = 0
  for b in range(256):
    if b not in bs:
      bs.append(b)
      cs.append(256 + n)
      n += 1
  return dict(zip(bs, [chr(c) for c in cs]))


def clean_whitespace(text: str) -> str:
  """open_clip's 'whitespace' cleaning: ftfy, HTML unescape twice, whitespace runs."""
  import ftfy  # pylint: disable=g-import-not-at-top
  text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
  return " ".join(text.split()).strip()


def clean(text: str) -> str:
  """open_clip's 'lower' cleaning (CLIP's): `clean_whitespace`, then lower case."""
  return clean_whitespace(text).lower()


def _bpe(word: Tuple[str, ...], ranks: Dict[Tuple[str, str], int]) -> List[str]:
  """Merges adjacent symbols of `word` by lowest rank until no ranked pair is left."""
  word = list(word)
  while len(word) > 1:
    best, best_rank = None, None
    for pair in zip(word, word[1:]):
      rank = ranks.get(pair)
      if rank is not None and (best_rank is None or rank < best_rank):
        best, best_rank = pair, rank
    if best is None:
      break
    first, second = best
    merged, i = [], 0
    while i < len(word):
      if i < len(word) - 1 and word[i] == first and word[i + 1] == second:
        merged.append(first + second)
        i += 2
      else:
        merged.append(word[i])
        i += 1
    word = merged
  return word


class ClipBpeTokenizer(tokenizers.Tokenizer):
  """CLIP's BPE over a gzipped merges file of open_clip's format (default: CLIP's).

  `encode` caches the ids of each distinct word (as open_clip caches its BPE), so the
  per-example cost in a data pipeline is the cleaning and one dict look-up per word.
  """

  def __init__(self, vocab_path: str = DEFAULT_VOCAB):
    import regex  # pylint: disable=g-import-not-at-top
    self.vocab_path = os.path.expanduser(vocab_path)
    if not os.path.isfile(self.vocab_path):
      raise errors.DataPathError(
          f"BPE vocabulary not found at '{self.vocab_path}'. Pass an existing gzipped "
          "merges file (open_clip's bpe_simple_vocab_16e6.txt.gz format) as "
          "'bpe:/path/to/vocab.txt.gz', or use the built-in 'clip' tokenizer.")
    try:
      with gzip.open(self.vocab_path) as f:
        lines = f.read().decode("utf-8").split("\n")
    except (OSError, UnicodeDecodeError) as e:
      raise errors.DataError(
          f"Cannot read BPE vocabulary '{self.vocab_path}' ({e}); it must be a gzipped "
          "UTF-8 text file with a header line and one merge ('a b') per line.") from e
    # As open_clip, an empty line (e.g. the last one of a short file) is kept: it
    # takes an id ('') and never merges, so later ids stay those of open_clip.
    merges = [tuple(line.split()) for line in lines[1:_MAX_MERGES + 1]]
    if not merges or any(len(m) not in (0, 2) for m in merges):
      raise errors.DataError(
          f"BPE vocabulary '{self.vocab_path}' is not a merges file: every line after "
          "the header must hold two symbols separated by a space.")
    self._byte_encoder = bytes_to_unicode()
    self._byte_decoder = {v: k for k, v in self._byte_encoder.items()}
    vocab = list(self._byte_encoder.values())
    vocab += [v + "</w>" for v in vocab] + ["".join(m) for m in merges]
    vocab += ["<start_of_text>", "<end_of_text>"]
    self._encoder = {s: i for i, s in enumerate(vocab)}
    self._decoder = vocab
    self._ranks = {m: i for i, m in enumerate(merges)}
    self._cache: Dict[str, List[int]] = {}
    self._pattern = regex.compile(
        r"<start_of_text>|<end_of_text>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|"
        r"[^\s\p{L}\p{N}]+", regex.IGNORECASE)
    self.vocab_size = len(vocab)
    self.pad_id = 0
    self.bos_id = self._encoder["<start_of_text>"]
    self.eos_id = self._encoder["<end_of_text>"]

  def _word_ids(self, word: str) -> List[int]:
    ids = self._cache.get(word)
    if ids is None:
      if word in ("<start_of_text>", "<end_of_text>"):
        # open_clip's cache maps these to themselves: one id, not their characters.
        ids = [self._encoder[word]]
      else:
        symbols = "".join(self._byte_encoder[b] for b in word.encode("utf-8"))
        ids = [self._encoder[s] for s in _bpe(
            tuple(symbols[:-1]) + (symbols[-1] + "</w>",), self._ranks)]
      if len(self._cache) >= _CACHE_SIZE:
        self._cache.clear()
      self._cache[word] = ids
    return ids

  def encode(self, text: str) -> List[int]:
    """Ids of `text` without BOS/EOS (open_clip's `SimpleTokenizer.encode`)."""
    out = []
    for word in self._pattern.findall(clean(text)):
      out.extend(self._word_ids(word))
    return out

  def _decode_content(self, ids: List[int]) -> str:
    text = "".join(self._decoder[i] for i in ids)
    data = bytearray(self._byte_decoder[c] for c in text if c in self._byte_decoder)
    return data.decode("utf-8", errors="replace").replace("</w>", " ").rstrip()

  def decode(self, ids: Iterable[int]) -> str:
    """open_clip's decode of the ids before the first EOS, BOS skipped, trailing
    space removed. Zeros before EOS are '!'; a row without EOS drops trailing zeros."""
    if not hasattr(ids, "__array__"):
      ids = list(ids)
    ids = np.asarray(ids, dtype=np.int64).reshape(-1).tolist()
    if self.eos_id in ids:
      ids = ids[:ids.index(self.eos_id)]
    else:
      while ids and ids[-1] == self.pad_id:
        ids.pop()
    return self._decode_content(
        [i for i in ids if i != self.bos_id and 0 <= i < self.vocab_size])

  def __getstate__(self):
    return {"vocab_path": self.vocab_path}

  def __setstate__(self, state):
    self.__init__(state["vocab_path"])

  def __repr__(self) -> str:
    return f"ClipBpeTokenizer({self.vocab_path!r})"
