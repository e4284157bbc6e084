"""Text tokenizers with a shared contract.

Every tokenizer has `vocab_size`, `pad_id` (always 0), `bos_id`, `eos_id`,
`encode(text) -> list[int]` (no special tokens), `decode(ids) -> str` (stops at the
first EOS, skips PAD and BOS) and `tokenize(texts, length) -> int32 [N, length]`
laid out as [BOS, tokens..., EOS, PAD, ...]; over-long text is truncated so that EOS
stays the last token.

Specs for `get_tokenizer`: "bytes" (built in, no files),
"sentencepiece:/path/to/model" (a local SentencePiece model file), and
"words:/path/to/vocab.txt", "words:shapes" or "words:shapes_hard" (word-level, one word
per line, or the built-in vocabulary of the shapes demo data, or of `shapes:hard` and
`shapes` together).
"""
import os
import re
from typing import Iterable, List, Sequence, Union

import numpy as np

from vlp_jax import errors

VALID_SPECS = ("bytes", "sentencepiece:/path/to/spm.model", "words:/path/to/vocab.txt",
               "words:shapes", "words:shapes_hard")


class Tokenizer:
  """Base class: subclasses set the ids and implement `encode`/`_decode_content`."""

  vocab_size: int
  pad_id: int = 0
  bos_id: int
  eos_id: int

  def encode(self, text: str) -> List[int]:
    raise NotImplementedError

  def _decode_content(self, ids: List[int]) -> str:
    raise NotImplementedError

  def decode(self, ids: Iterable[int]) -> str:
    """Decodes ids up to the first EOS, skipping PAD, BOS and out-of-range ids."""
    content = []
    if not hasattr(ids, "__array__"):
      ids = list(ids)
    for i in np.asarray(ids, dtype=np.int64).reshape(-1).tolist():
      if i == self.eos_id:
        break
      if i in (self.pad_id, self.bos_id) or not 0 <= i < self.vocab_size:
        continue
      content.append(i)
    return self._decode_content(content)

  def tokenize(self, texts: Union[str, Sequence[str]], length: int) -> np.ndarray:
    """Returns int32 [N, length] rows of [BOS, tokens..., EOS, 0, ...]."""
    if length < 2:
      raise ValueError(f"length must be >= 2 to hold BOS and EOS, got {length}.")
    if isinstance(texts, str):
      texts = [texts]
    out = np.full((len(texts), length), self.pad_id, dtype=np.int32)
    for row, text in enumerate(texts):
      ids = [self.bos_id] + self.encode(text)[:length - 2] + [self.eos_id]
      out[row, :len(ids)] = ids
    return out


class ByteTokenizer(Tokenizer):
  """UTF-8 bytes: PAD 0, BOS 1, EOS 2, byte b -> b + 3; vocab_size 259."""

  _OFFSET = 3

  def __init__(self):
    self.pad_id, self.bos_id, self.eos_id = 0, 1, 2
    self.vocab_size = 256 + self._OFFSET

  def encode(self, text: str) -> List[int]:
    return [b + self._OFFSET for b in text.encode("utf-8")]

  def _decode_content(self, ids: List[int]) -> str:
    data = bytes(i - self._OFFSET for i in ids if i >= self._OFFSET)
    return data.decode("utf-8", errors="replace")

  def __repr__(self) -> str:
    return "ByteTokenizer()"


class SentencePieceTokenizer(Tokenizer):
  """A SentencePiece model loaded from a local file, with PAD fixed at id 0.

  If the model was trained with `pad_id=0`, its ids are used as-is and BOS/EOS come
  from the model. Otherwise every SentencePiece id is shifted by +1 so that 0 is free
  for PAD (`vocab_size` = model size + 1); the model's own BOS/EOS are shifted too.
  Either way the model must define BOS and EOS (SentencePiece defaults do).
  """

  def __init__(self, model_path: str):
    import sentencepiece as spm  # Imported lazily: only needed for this tokenizer.
    self.model_path = os.path.expanduser(model_path)
    if not os.path.isfile(self.model_path):
      raise errors.DataPathError(
          f"SentencePiece model not found at '{self.model_path}'. Pass the path of an "
          f"existing .model file as 'sentencepiece:/path/to/spm.model', or use the "
          f"built-in 'bytes' tokenizer.")
    self._sp = spm.SentencePieceProcessor(model_file=self.model_path)
    sp_size = self._sp.get_piece_size()
    sp_bos, sp_eos = self._sp.bos_id(), self._sp.eos_id()
    if sp_bos < 0 or sp_eos < 0:
      raise errors.DataError(
          f"SentencePiece model '{self.model_path}' has no BOS or EOS piece "
          f"(bos_id={sp_bos}, eos_id={sp_eos}); train it with bos_id and eos_id >= 0.")
    self._offset = 0 if self._sp.pad_id() == 0 else 1
    self.pad_id = 0
    self.bos_id = sp_bos + self._offset
    self.eos_id = sp_eos + self._offset
    self.vocab_size = sp_size + self._offset

  def encode(self, text: str) -> List[int]:
    return [i + self._offset for i in self._sp.encode(text, out_type=int)]

  def _decode_content(self, ids: List[int]) -> str:
    return self._sp.decode([i - self._offset for i in ids if i >= self._offset])

  def __getstate__(self):
    return {"model_path": self.model_path}

  def __setstate__(self, state):
    self.__init__(state["model_path"])

  def __repr__(self) -> str:
    return f"SentencePieceTokenizer({self.model_path!r})"


class WordTokenizer(Tokenizer):
  """Word-level tokenizer over a fixed vocabulary: lowercased words and punctuation.

  Ids: pad 0, bos 1, eos 2, unk 3, then the vocabulary in order. Decoding joins words
  with spaces and attaches punctuation to the preceding word.
  """
  _TOKEN = re.compile(r"[a-z0-9]+|[^\sa-z0-9]")

  def __init__(self, words: Sequence[str]):
    self.words = list(dict.fromkeys(words))
    self.bos_id, self.eos_id, self.unk_id = 1, 2, 3
    self._ids = {w: i + 4 for i, w in enumerate(self.words)}
    self.vocab_size = len(self.words) + 4

  @classmethod
  def from_file(cls, path: str) -> "WordTokenizer":
    if not os.path.isfile(path):
      raise errors.DataPathError(
          f"Vocabulary file not found: '{path}'. Pass a text file with one word per line "
          "as --config.data.tokenizer=words:/path/to/vocab.txt.")
    with open(path) as f:
      return cls([line.strip() for line in f if line.strip()])

  def split(self, text: str) -> List[str]:
    return self._TOKEN.findall(text.lower())

  def encode(self, text: str) -> List[int]:
    return [self._ids.get(w, self.unk_id) for w in self.split(text)]

  def _decode_content(self, ids: List[int]) -> str:
    words = [self.words[i - 4] if i >= 4 else "<unk>" for i in ids]
    return re.sub(r" (?=[^\sa-z0-9<])", "", " ".join(words))

  def __repr__(self) -> str:
    return f"WordTokenizer({len(self.words)} words)"


def get_tokenizer(spec: str) -> Tokenizer:
  """Builds a tokenizer from one of `VALID_SPECS`."""
  if spec == "bytes":
    return ByteTokenizer()
  if spec == "words:shapes":
    from vlp_jax.data import shapes  # pylint: disable=g-import-not-at-top
    return WordTokenizer(shapes.vocabulary())
  if spec == "words:shapes_hard":
    from vlp_jax.data import shapes  # pylint: disable=g-import-not-at-top
    return WordTokenizer(shapes.hard_vocabulary())
  if isinstance(spec, str) and spec.startswith("words:") and spec[len("words:"):]:
    return WordTokenizer.from_file(spec[len("words:"):])
  prefix = "sentencepiece:"
  if isinstance(spec, str) and spec.startswith(prefix) and spec[len(prefix):]:
    return SentencePieceTokenizer(spec[len(prefix):])
  raise errors.ConfigError(
      f"Unknown tokenizer spec {spec!r}; valid specs: {list(VALID_SPECS)}.")
