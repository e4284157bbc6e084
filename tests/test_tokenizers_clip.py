"""CLIP's BPE tokenizer ('clip', 'bpe:') against open_clip's SimpleTokenizer ids
(tests/fixtures/tokenizers/clip.json, from tools/make_tokenizer_fixtures.py)."""
import gzip
import json
import os
import pickle

import numpy as np
import pytest

from vlp_jax import errors
from vlp_jax.data import tokenizers, tokenizers_clip

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "tokenizers")


@pytest.fixture(scope="module")
def ref():
  with open(os.path.join(FIXTURES, "clip.json")) as f:
    return json.load(f)


@pytest.fixture(scope="module")
def tok():
  return tokenizers.get_tokenizer("clip")


def test_special_ids_and_vocab(tok, ref):
  assert (tok.vocab_size, tok.pad_id, tok.bos_id, tok.eos_id) == (
      ref["vocab_size"], 0, ref["sot"], ref["eot"]) == (49408, 0, 49406, 49407)
  assert os.path.isfile(tokenizers_clip.DEFAULT_VOCAB)  # Shipped as package data.


@pytest.mark.parametrize("length", ["77", "8"])
def test_rows_match_open_clip(tok, ref, length):
  got = tok.tokenize(ref["texts"], int(length))
  assert got.dtype == np.int32
  for text, row, want in zip(ref["texts"], got, ref["rows"][length]):
    np.testing.assert_array_equal(row, want, err_msg=repr(text))


def test_encode_and_decode_match_open_clip(tok, ref):
  for text, ids, decoded in zip(ref["texts"], ref["encode"], ref["decode"]):
    assert tok.encode(text) == ids, repr(text)
    # open_clip's decode of the same ids, without its trailing space (and BOS, which
    # a literal '<start_of_text>' in the text encodes to).
    assert tok.decode(ids) == decoded.replace("<start_of_text>", "").rstrip(), repr(text)
  assert any(0 in ids for ids in ref["encode"])  # The corpus covers '!' = id 0.


def test_truncation_keeps_eos_and_pad_bang_ambiguity(tok):
  row = tok.tokenize("a dog " * 100, 77)[0]
  assert row[0] == tok.bos_id and row[-1] == tok.eos_id and 0 not in row
  text = "wow!@# nice!~"
  ids = tok.encode(text)
  assert ids.count(0) == 2  # '!' before another symbol is id 0, as padding is.
  row = tok.tokenize(text, 16)[0]
  assert tok.decode(row) == "wow !@# nice !~"  # Zeros before EOS are '!'.
  assert tok.decode(ids + [0, 0, 0]) == "wow !@# nice !~"  # No EOS: trailing 0s = pad.
  assert tok.decode([tok.bos_id, 320, 1125, tok.eos_id, 2368]) == "a photo"


def test_cache_and_pickle(tok):
  text = "a photo of a zebra crossing"
  first = tok.encode(text)
  assert "zebra" in tok._cache and tok.encode(text) == first
  clone = pickle.loads(pickle.dumps(tok))
  assert len(pickle.dumps(tok)) < 1000  # Only the path travels to data workers.
  np.testing.assert_array_equal(clone.tokenize(text, 77), tok.tokenize(text, 77))


def test_bpe_spec_with_another_vocab(tmp_path, tok):
  same = tokenizers.get_tokenizer(f"bpe:{tokenizers_clip.DEFAULT_VOCAB}")
  np.testing.assert_array_equal(same.tokenize(["a cat", "émoji 😀"], 10),
                                tok.tokenize(["a cat", "émoji 😀"], 10))
  small = tmp_path / "small.txt.gz"
  with gzip.open(small, "wt", encoding="utf-8") as f:
    f.write("#version: 0.2\nc a\nca t</w>\n")
  other = tokenizers.get_tokenizer(f"bpe:{small}")
  # Two merges and, as in open_clip, the empty last line: 512 + 3 + 2 ids.
  assert other.vocab_size == 517 and (other.bos_id, other.eos_id) == (515, 516)
  assert other.encode("cat") == [513] and other.tokenize("cat", 4).tolist() == [
      [515, 513, 516, 0]]
  assert other.decode(other.tokenize("cat", 4)[0]) == "cat"


def test_bad_vocab_files(tmp_path):
  with pytest.raises(errors.DataPathError, match="nope.txt.gz.*bpe:"):
    tokenizers.get_tokenizer(f"bpe:{tmp_path / 'nope.txt.gz'}")
  plain = tmp_path / "plain.txt"
  plain.write_text("not gzip")
  with pytest.raises(errors.DataError, match="gzipped"):
    tokenizers.get_tokenizer(f"bpe:{plain}")
  bad = tmp_path / "bad.txt.gz"
  with gzip.open(bad, "wt") as f:
    f.write("header\na b c\n")
  with pytest.raises(errors.DataError, match="merges"):
    tokenizers.get_tokenizer(f"bpe:{bad}")
