"""Text tokenizers with a shared contract.

Every tokenizer has `vocab_size`, `pad_id`, `bos_id`, `eos_id`,
`encode(text) -> list[int]` (no special tokens), `decode(ids) -> str` (stops at the
first EOS, skips PAD and BOS) and `tokenize(texts, length) -> int32 [N, length]`
laid out as [BOS, tokens..., EOS, PAD, ...]; over-long text is truncated so that EOS
stays the last token.

`pad_id` is 0 and `bos_id`/`eos_id` are ints for the built-in tokenizers and
SentencePiece models ('sentencepiece:'). Tokenizers reproducing a pretrained model's
own layout may differ: 'siglip:' and 'hf:' tokenizers may pad with a non-zero id
(SigLIP pads with EOS = 1) and have `bos_id` None (no BOS: T5/SigLIP-style rows are
[tokens..., EOS, PAD, ...]); an 'hf:' tokenizer whose post-processor appends nothing
has `eos_id` None. Code that needs a BOS (caption generation) checks for None. In
CLIP's vocabulary ('clip', 'bpe:') id 0 is both PAD and the token '!', as in open_clip:
its `decode` reads a 0 before the EOS as '!'.

Specs for `get_tokenizer` (`VALID_SPECS`):
  "bytes"                        UTF-8 bytes, built in.
  "clip"                         CLIP's BPE (49,408 ids, open_clip's ids), built in.
  "bpe:/path/vocab.txt.gz"       CLIP-style BPE over another merges file.
  "hf:/path/tokenizer.json[,pad=ID|TOKEN][,clean=whitespace|lower]"
                                 a Hugging Face `tokenizers` file (or a folder holding
                                 tokenizer.json), with its own special tokens.
  "siglip:/path/spiece.model"    SigLIP's T5-style SentencePiece layout (transformers'
                                 SiglipTokenizer: canonicalised text, no BOS, EOS kept,
                                 padded with EOS).
  "sentencepiece:/path/spm.model" a SentencePiece model with BOS and EOS.
  "words:/path/to/vocab.txt", "words:shapes", "words:shapes_hard"
                                 word-level: one word per line, or the built-in
                                 vocabulary of the shapes demo data (of `shapes:hard`
                                 and `shapes` together).
"""
import os
import re
from typing import Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np

from vlp_jax import errors

VALID_SPECS = ("bytes", "clip", "bpe:/path/to/vocab.txt.gz", "hf:/path/to/tokenizer.json",
               "siglip:/path/to/spiece.model", "sentencepiece:/path/to/spm.model",
               "words:/path/to/vocab.txt", "words:shapes", "words:shapes_hard")


class Tokenizer:
  """Base class: subclasses set the ids and implement `encode`/`_decode_content`."""

  vocab_size: int
  pad_id: int = 0
  bos_id: Optional[int]
  eos_id: Optional[int]

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

  def special_ids(self) -> Tuple[List[int], List[int]]:
    """The ids `tokenize` puts before and after the text: ([BOS], [EOS]) by default,
    without the ones that are None."""
    return ([] if self.bos_id is None else [self.bos_id],
            [] if self.eos_id is None else [self.eos_id])

  def encode_batch(self, texts: Sequence[str]) -> List[List[int]]:
    """`encode` of each text."""
    return [self.encode(t) for t in texts]

  def tokenize(self, texts: Union[str, Sequence[str]], length: int) -> np.ndarray:
    """Returns int32 [N, length] rows of [BOS, tokens..., EOS, PAD, ...] (see
    `special_ids`); over-long text loses its last tokens, never the EOS."""
    prefix, suffix = self.special_ids()
    keep = length - len(prefix) - len(suffix)
    if keep < 0 or length < 1:
      raise ValueError(f"length must be >= {max(1, len(prefix) + len(suffix))} to hold "
                       f"the special tokens {prefix + suffix}, got {length}.")
    if isinstance(texts, str):
      texts = [texts]
    out = np.full((len(texts), length), self.pad_id, dtype=np.int32)
    for row, ids in enumerate(self.encode_batch(list(texts))):
      ids = prefix + ids[:keep] + suffix
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
          f"(bos_id={sp_bos}, eos_id={sp_eos}); train it with bos_id and eos_id >= 0, "
          f"or, for a T5/SigLIP-style model without BOS, use the spec "
          f"'siglip:{self.model_path}'.")
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


# Spec kinds taking a path after ':', and the options each takes after the path.
_PATH_KINDS = {"words": None, "sentencepiece": None, "bpe": None, "siglip": None,
               "hf": ("pad", "clean")}
_BUILT_IN = ("bytes", "clip", "words:shapes", "words:shapes_hard")


def parse_spec(spec: str):
  """A tokenizer spec -> (kind, path, options); raises ConfigError for a malformed
  one. Reads no file (`get_tokenizer` checks the path)."""
  if isinstance(spec, str) and spec in _BUILT_IN:
    return spec, "", {}
  kind, _, rest = spec.partition(":") if isinstance(spec, str) else ("", "", "")
  if kind not in _PATH_KINDS or not rest:
    hint = (f" ('{kind}:' needs a path after the colon)" if kind in _PATH_KINDS else "")
    raise errors.ConfigError(
        f"Unknown tokenizer spec {spec!r}{hint}; valid specs: {list(VALID_SPECS)}.")
  allowed = _PATH_KINDS[kind]
  if allowed is None:  # No options: the whole rest is the path (commas allowed).
    return kind, rest, {}
  path, *items = rest.split(",")
  options = {}
  for item in items:
    key, eq, value = item.partition("=")
    if key not in allowed or not eq:
      raise errors.ConfigError(
          f"Unknown option {item!r} in tokenizer spec {spec!r}; '{kind}:' takes "
          f"{[k + '=...' for k in allowed]} after the path, e.g. "
          f"'{kind}:/path/to/tokenizer.json,{allowed[0]}=0' (a path holding a comma "
          "cannot take options).")
    options[key] = value
  return kind, path, options


def get_tokenizer(spec: str) -> Tokenizer:
  """Builds a tokenizer from one of `VALID_SPECS` (see the module docstring)."""
  # pylint: disable=g-import-not-at-top
  kind, path, options = parse_spec(spec)
  if kind == "bytes":
    return ByteTokenizer()
  if kind in ("words:shapes", "words:shapes_hard"):
    from vlp_jax.data import shapes
    return WordTokenizer(shapes.vocabulary() if kind == "words:shapes"
                         else shapes.hard_vocabulary())
  if kind == "words":
    return WordTokenizer.from_file(path)
  if kind == "sentencepiece":
    return SentencePieceTokenizer(path)
  if kind in ("clip", "bpe"):
    from vlp_jax.data import tokenizers_clip
    return tokenizers_clip.ClipBpeTokenizer(*([path] if path else []))
  if kind == "siglip":
    from vlp_jax.data import tokenizers_siglip
    return tokenizers_siglip.SiglipTokenizer(path)
  from vlp_jax.data import tokenizers_hf
  return tokenizers_hf.HfTokenizer(path, **options)
