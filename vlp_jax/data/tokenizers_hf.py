"""Hugging Face `tokenizers` files ('hf:/path/tokenizer.json'), read locally.

Rows follow the file's own post-processor: the special tokens it puts before the text
(e.g. CLIP's '<|startoftext|>', Gemma's '<bos>'; none for T5/SigLIP-style files) and
after it (e.g. '</s>'); over-long text loses its last tokens, never those specials
(as the library's own truncation). `bos_id` is the last special before the text (None
if there is none), `eos_id` the last one after it (None if none).

The pad id is, in order: the spec's `pad=` option (an id or a token, e.g.
'hf:/m/tokenizer.json,pad=0' or ',pad=</s>'), the file's padding settings
(`"padding": {"pad_id": ...}`), its '<pad>' / '[PAD]' / '<|pad|>' special token; a
file with none of these needs `pad=`. `clean=whitespace` or `clean=lower` first cleans
text as open_clip's `HFTokenizer` (ftfy, HTML entities, whitespace; `lower` also
lower-cases, as SigLIP 2 expects); the default `clean=none` passes text unchanged.
"""
import os
from typing import List, Optional

from vlp_jax import errors
from vlp_jax.data import tokenizers

_PAD_NAMES = ("<pad>", "[PAD]", "<|pad|>", "<PAD>")
CLEAN = ("none", "whitespace", "lower")


def _clean_fn(clean: str):
  if clean not in CLEAN:
    raise errors.ConfigError(
        f"Unknown 'hf:' option clean={clean!r}; use one of {list(CLEAN)}.")
  if clean == "none":
    return None
  from vlp_jax.data import tokenizers_clip  # pylint: disable=g-import-not-at-top
  if clean == "lower":
    return tokenizers_clip.clean
  return tokenizers_clip.clean_whitespace


def find_file(path: str) -> str:
  """`path` itself, or `path`/tokenizer.json for a folder; raises DataPathError."""
  path = os.path.expanduser(path)
  if os.path.isdir(path):
    path = os.path.join(path, "tokenizer.json")
  if not os.path.isfile(path):
    raise errors.DataPathError(
        f"Tokenizer file not found at '{path}'. Pass an existing Hugging Face "
        "tokenizer.json (or the folder holding it) as 'hf:/path/to/tokenizer.json'.")
  return path


class HfTokenizer(tokenizers.Tokenizer):
  """A `tokenizers.Tokenizer` loaded from a local tokenizer.json (no network)."""

  def __init__(self, path: str, pad: Optional[str] = None, clean: str = "none"):
    import tokenizers as hf_tokenizers  # pylint: disable=g-import-not-at-top
    self.path, self._pad_option, self._clean = find_file(path), pad, clean
    self._clean_fn = _clean_fn(clean)
    try:
      self._tok = hf_tokenizers.Tokenizer.from_file(self.path)
    except Exception as e:  # The library raises a bare Exception on a bad file.
      raise errors.DataError(
          f"Cannot load '{self.path}' as a Hugging Face tokenizer.json: {e}") from e
    padding = self._tok.padding
    self._tok.no_padding()
    self._tok.no_truncation()
    self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
    self._prefix, self._suffix = self._find_specials()
    self.bos_id = self._prefix[-1] if self._prefix else None
    self.eos_id = self._suffix[-1] if self._suffix else None
    self.pad_id = self._find_pad(padding)

  def _find_specials(self):
    """The special ids the post-processor adds before and after a text."""
    for probe in ("a b c", "1", "x"):
      enc = self._tok.encode(probe, add_special_tokens=True)
      mask = enc.special_tokens_mask
      if 0 in mask:
        first = mask.index(0)
        last = len(mask) - 1 - mask[::-1].index(0)
        return list(enc.ids[:first]), list(enc.ids[last + 1:])
    raise errors.DataError(
        f"Cannot tell where '{self.path}' puts its special tokens: probe texts encode "
        "to special tokens only.")

  def _token_id(self, token: str) -> Optional[int]:
    if token.lstrip("-").isdigit():
      return int(token)
    return self._tok.token_to_id(token)

  def _find_pad(self, padding) -> int:
    if self._pad_option is not None:
      pad = self._token_id(self._pad_option)
      if pad is None or not 0 <= pad < self.vocab_size:
        raise errors.ConfigError(
            f"pad={self._pad_option!r} in the 'hf:' spec of '{self.path}' is neither a "
            f"token of it nor an id in [0, {self.vocab_size}).")
      return pad
    if padding and padding.get("pad_id") is not None:
      return int(padding["pad_id"])
    for name in _PAD_NAMES:
      pad = self._tok.token_to_id(name)
      if pad is not None:
        return pad
    raise errors.ConfigError(
        f"'{self.path}' names no padding token (no \"padding\" settings and no "
        f"{list(_PAD_NAMES)} token). Say which id pads rows, e.g. "
        f"'hf:{self.path},pad=0' (open_clip pads with 0) or ',pad=<token>'.")

  def special_ids(self):
    return list(self._prefix), list(self._suffix)

  def _texts(self, texts):
    return [self._clean_fn(t) for t in texts] if self._clean_fn else list(texts)

  def encode(self, text: str) -> List[int]:
    return self._tok.encode(self._texts([text])[0], add_special_tokens=False).ids

  def encode_batch(self, texts) -> List[List[int]]:
    # One by one: the library's batch threads do not mix with forked data workers.
    return [self._tok.encode(t, add_special_tokens=False).ids for t in self._texts(texts)]

  def _decode_content(self, ids: List[int]) -> str:
    return self._tok.decode(ids, skip_special_tokens=True)

  def __getstate__(self):
    return {"path": self.path, "pad": self._pad_option, "clean": self._clean}

  def __setstate__(self, state):
    self.__init__(state["path"], pad=state["pad"], clean=state["clean"])

  def __repr__(self) -> str:
    return f"HfTokenizer({self.path!r}, pad_id={self.pad_id})"

