"""Tests for the tokenizer contract, the byte and SentencePiece tokenizers and specs
(CLIP BPE, hf: and siglip: against reference ids: tests/test_tokenizers_*.py)."""
import os
import pickle

import numpy as np
import pytest

from vlp_jax.data import shapes
from vlp_jax.data import tokenizers


def _captions(n=150):
  src = shapes.ShapesSource("train", size=n)
  return [t for i in range(n) for t in src[i]["text"]]


def _train_spm(tmp_path, name, **kwargs):
  import sentencepiece as spm
  path = tmp_path / f"{name}.model"
  with open(path, "wb") as f:
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_captions()), model_writer=f, vocab_size=40,
        model_type="unigram", character_coverage=1.0, minloglevel=2, **kwargs)
  return str(path)


def _check_layout(tok, text, length):
  row = tok.tokenize([text], length)[0]
  assert row.dtype == np.int32 and row.shape == (length,)
  assert row[0] == tok.bos_id
  eos_pos = int(np.nonzero(row == tok.eos_id)[0][0])
  assert np.all(row[eos_pos + 1:] == tok.pad_id)
  assert np.all(row[1:eos_pos] != tok.pad_id)
  return row, eos_pos


def test_byte_round_trip_and_ids():
  tok = tokenizers.get_tokenizer("bytes")
  assert (tok.vocab_size, tok.pad_id, tok.bos_id, tok.eos_id) == (259, 0, 1, 2)
  for text in ["a small red circle", "naïve café — 日本語 ✓", ""]:
    ids = tok.encode(text)
    assert all(3 <= i < 259 for i in ids)
    assert len(ids) == len(text.encode("utf-8"))
    assert tok.decode(ids) == text
    assert tok.decode(tok.tokenize(text, 64)[0]) == text
  assert tok.encode("A") == [ord("A") + 3]


def test_byte_layout_padding_and_truncation():
  tok = tokenizers.ByteTokenizer()
  arr = tok.tokenize(["ab", "a much longer caption than fits"], 8)
  assert arr.shape == (2, 8) and arr.dtype == np.int32
  np.testing.assert_array_equal(arr[0], [1, ord("a") + 3, ord("b") + 3, 2, 0, 0, 0, 0])
  assert arr[1, -1] == tok.eos_id and arr[1, 0] == tok.bos_id
  assert tok.decode(arr[1]) == "a much"
  np.testing.assert_array_equal(tok.tokenize("hello", 2), [[1, 2]])
  assert tok.tokenize("x", 4).shape == (1, 4)
  with pytest.raises(ValueError):
    tok.tokenize("x", 1)
  # Decode stops at the first EOS and skips PAD/BOS.
  assert tok.decode([1, 0, ord("h") + 3, 2, ord("x") + 3]) == "h"
  # Truncation inside a multi-byte character decodes with a replacement char.
  assert tok.decode(tok.tokenize("é", 3)[0]) == "\ufffd"


def test_get_tokenizer_errors(tmp_path):
  with pytest.raises(ValueError, match="bytes"):
    tokenizers.get_tokenizer("wordpiece")
  with pytest.raises(ValueError):
    tokenizers.get_tokenizer("sentencepiece:")
  missing = str(tmp_path / "nope.model")
  with pytest.raises(FileNotFoundError, match="nope.model"):
    tokenizers.get_tokenizer(f"sentencepiece:{missing}")


def test_sentencepiece_with_pad_zero(tmp_path):
  path = _train_spm(tmp_path, "pad0", pad_id=0, unk_id=1, bos_id=2, eos_id=3)
  tok = tokenizers.get_tokenizer(f"sentencepiece:{path}")
  assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.vocab_size) == (0, 2, 3, 40)
  text = "a small red circle in the top left"
  assert tok.decode(tok.encode(text)) == text
  assert tok._sp.encode(text, out_type=int) == tok.encode(text)  # No shift.
  row, eos_pos = _check_layout(tok, text, 64)
  assert tok.decode(row) == text
  long_row = tok.tokenize(text, 5)[0]
  assert long_row[0] == tok.bos_id and long_row[-1] == tok.eos_id


def test_sentencepiece_default_pad_is_shifted(tmp_path):
  path = _train_spm(tmp_path, "default")  # unk 0, bos 1, eos 2, pad -1.
  tok = tokenizers.SentencePieceTokenizer(path)
  assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.vocab_size) == (0, 2, 3, 41)
  text = "a photo of a large blue square in the center."
  ids = tok.encode(text)
  assert ids == [i + 1 for i in tok._sp.encode(text, out_type=int)]
  assert min(ids) >= 1 and max(ids) < tok.vocab_size
  assert tok.decode(ids) == text
  batch = tok.tokenize([text, "a red circle"], 80)
  assert batch.shape == (2, 80)
  for row, t in zip(batch, [text, "a red circle"]):
    _check_layout(tok, t, 80)
    assert tok.decode(row) == t
  clone = pickle.loads(pickle.dumps(tok))
  np.testing.assert_array_equal(clone.tokenize(text, 32), tok.tokenize(text, 32))


def test_sentencepiece_without_eos_errors(tmp_path):
  path = _train_spm(tmp_path, "noeos", eos_id=-1)
  with pytest.raises(ValueError, match="EOS"):
    tokenizers.SentencePieceTokenizer(path)


_FIX = os.path.join(os.path.dirname(__file__), "fixtures", "tokenizers", "")
ALL_SPECS = ("bytes", "clip", "words:shapes", f"siglip:{_FIX}siglip_tiny.model",
             f"hf:{_FIX}hf_t5_style", f"hf:{_FIX}hf_clip_style/tokenizer.json,pad=0")


@pytest.mark.parametrize("spec", ALL_SPECS)
def test_contract_of_every_kind(spec):
  """Layout [BOS?, tokens..., EOS, PAD...], EOS kept when cut, decode up to EOS."""
  tok = tokenizers.get_tokenizer(spec)
  assert tok.bos_id is None or 0 <= tok.bos_id < tok.vocab_size
  assert 0 <= tok.eos_id < tok.vocab_size and 0 <= tok.pad_id < tok.vocab_size
  text = "a small red circle"
  ids = tok.encode(text)
  head = [] if tok.bos_id is None else [tok.bos_id]
  row = tok.tokenize([text], 40)[0]
  assert row.dtype == np.int32
  n = len(head) + len(ids)
  np.testing.assert_array_equal(row[:n + 1], head + ids + [tok.eos_id])
  assert np.all(row[n + 1:] == tok.pad_id)
  assert tok.decode(row) == tok.decode(ids) != ""
  assert "small" in tok.decode(row)
  cut = tok.tokenize([text * 10], len(head) + 3)[0]
  assert cut.tolist() == head + (tok.encode(text * 10))[:2] + [tok.eos_id]


def test_parse_spec_and_validation():
  assert tokenizers.parse_spec("clip") == ("clip", "", {})
  assert tokenizers.parse_spec("sentencepiece:/a,b.model") == (
      "sentencepiece", "/a,b.model", {})
  assert tokenizers.parse_spec("hf:/m/tokenizer.json,pad=</s>,clean=lower") == (
      "hf", "/m/tokenizer.json", {"pad": "</s>", "clean": "lower"})
  for bad, match in [("hf:", "needs a path"), ("bpe", "valid specs"),
                     ("siglip:", "needs a path"), ("hf:/m,lower", "Unknown option")]:
    with pytest.raises(ValueError, match=match):
      tokenizers.parse_spec(bad)
  from vlp_jax import cli, errors, validation  # pylint: disable=g-import-not-at-top
  config = cli.load_config_file("configs/clip_b16.py")
  assert config.data.tokenizer == "clip"
  config.data.tokenizer = "gpt2"
  with pytest.raises(errors.ConfigError, match="'gpt2'.*clip"):
    validation.validate(config)
