"""SigLIP's text tokenizer: a T5-style SentencePiece model (pad 0, EOS 1, unk 2, no
BOS) used as transformers' `SiglipTokenizer` uses it.

Text is canonicalised (lower-cased, ASCII punctuation removed, whitespace runs
collapsed, stripped), encoded with the model's own ids (no shift) and followed by EOS;
rows are [tokens..., EOS, EOS, ...]: SigLIP pads with EOS (`pad_id` = `eos_id`),
`bos_id` is None. Over-long text keeps EOS last (big_vision's "sticky" EOS). As in
transformers, the literal strings '</s>' and '<unk>' in a text become those special
ids.
"""
import os
import re
import string
from typing import List

import numpy as np

from vlp_jax import errors
from vlp_jax.data import tokenizers

_UNDERLINE = "\u2581"  # SentencePiece's word-boundary mark.
_EOS, _UNK = "</s>", "<unk>"
_SPECIALS = re.compile("(" + re.escape(_EOS) + "|" + re.escape(_UNK) + ")")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def canonicalize(text: str) -> str:
  """big_vision's / transformers' SigLIP text canonicalisation."""
  text = text.lower().translate(_PUNCTUATION)
  return re.sub(r"\s+", " ", text).strip()


class SiglipTokenizer(tokenizers.Tokenizer):
  """A SigLIP (T5-style) SentencePiece model from a local file; ids as transformers'
  `SiglipTokenizer(vocab_file)` with `padding='max_length', truncation=True`."""

  def __init__(self, model_path: str):
    import sentencepiece as spm  # pylint: disable=g-import-not-at-top
    self.model_path = os.path.expanduser(model_path)
    if not os.path.isfile(self.model_path):
      raise errors.DataPathError(
          f"SentencePiece model not found at '{self.model_path}'. Pass the path of "
          "SigLIP's spiece.model (or another T5-style .model) as "
          "'siglip:/path/to/spiece.model'.")
    self._sp = spm.SentencePieceProcessor(model_file=self.model_path)
    eos = self._sp.piece_to_id(_EOS)
    unk = self._sp.unk_id()
    if self._sp.id_to_piece(eos) != _EOS:
      raise errors.DataError(
          f"SentencePiece model '{self.model_path}' has no '{_EOS}' piece; a 'siglip:' "
          "model is T5-style (pad 0, '</s>' 1, '<unk>' 2). Use 'sentencepiece:' for a "
          "model with its own BOS and EOS.")
    self.vocab_size = self._sp.get_piece_size()
    self.bos_id, self.eos_id, self.pad_id = None, eos, eos
    self._special_ids = {_EOS: eos, _UNK: unk}
    self._unk_length = len(self._sp.encode(_UNK))

  def _encode_chunk(self, chunk: str) -> List[int]:
    ids = self._sp.encode(_UNK + canonicalize(chunk))
    return ids[self._unk_length:] if len(ids) >= self._unk_length else ids

  def encode(self, text: str) -> List[int]:
    """Ids without the final EOS (transformers' `tokenize` + ids, specials split)."""
    # The whitespace that transformers strips next to specials, canonicalize strips.
    parts = _SPECIALS.split(_UNDERLINE + text.replace(_UNDERLINE, " "))
    ids, first_is_mark = [], False
    for i, part in enumerate(parts):
      if not part:
        continue
      if i % 2:
        ids.append(self._special_ids[part])
      else:
        chunk = self._encode_chunk(part)
        first_is_mark = first_is_mark or (not ids and chunk == [self._mark_id()])
        ids.extend(chunk)
    if first_is_mark and len(ids) > 1 and ids[1] in self._special_ids.values():
      ids = ids[1:]  # transformers drops a lone leading '▁' before a special token.
    return ids

  def _mark_id(self) -> int:
    return self._sp.piece_to_id(_UNDERLINE)

  def tokenize(self, texts, length: int):
    """int32 [N, length]: [tokens..., EOS, EOS, ...]; EOS is not doubled when the text
    itself ends with a literal '</s>' (transformers' `_add_eos_if_not_present`)."""
    if length < 1:
      raise ValueError(f"length must be >= 1 to hold EOS, got {length}.")
    if isinstance(texts, str):
      texts = [texts]
    out = np.full((len(texts), length), self.pad_id, dtype=np.int32)
    for row, ids in enumerate(self.encode_batch(list(texts))):
      ids = ids[:length - 1]
      if not ids or ids[-1] != self.eos_id:
        ids = ids + [self.eos_id]
      out[row, :len(ids)] = ids
    return out

  def _decode_content(self, ids: List[int]) -> str:
    unk = self._special_ids[_UNK]  # Skipped, as transformers' skip_special_tokens.
    return self._sp.decode([i for i in ids if i != unk]).strip()

  def __getstate__(self):
    return {"model_path": self.model_path}

  def __setstate__(self, state):
    self.__init__(state["model_path"])

  def __repr__(self) -> str:
    return f"SiglipTokenizer({self.model_path!r})"
