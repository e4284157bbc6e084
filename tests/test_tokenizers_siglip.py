"""'siglip:' SentencePiece specs against transformers' SiglipTokenizer ids
(tests/fixtures/tokenizers/siglip.json on siglip_tiny.model, a T5-style model with
pad 0, eos 1, unk 2 and no BOS, from tools/make_tokenizer_fixtures.py)."""
import json
import os
import pickle

import numpy as np
import pytest

from vlp_jax import errors
from vlp_jax.data import tokenizers, tokenizers_siglip
from tests.test_tokenizers import _train_spm

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "tokenizers")
MODEL = os.path.join(FIXTURES, "siglip_tiny.model")


@pytest.fixture(scope="module")
def ref():
  with open(os.path.join(FIXTURES, "siglip.json")) as f:
    return json.load(f)


def test_model_keeping_whitespace_runs():
  """transformers drops a lone leading '▁' before a special token ('</s> first')."""
  with open(os.path.join(FIXTURES, "siglip_ws.json")) as f:
    ref_ws = json.load(f)
  tok = tokenizers.get_tokenizer(f"siglip:{os.path.join(FIXTURES, 'siglip_ws.model')}")
  for length in ("64", "8"):
    got = tok.tokenize(ref_ws["texts"], int(length))
    for text, row, want in zip(ref_ws["texts"], got, ref_ws["rows"][length]):
      np.testing.assert_array_equal(row, want, err_msg=repr(text))


@pytest.fixture(scope="module")
def tok():
  return tokenizers.get_tokenizer(f"siglip:{MODEL}")


def test_ids_and_layout(tok, ref):
  assert (tok.pad_id, tok.eos_id, tok.bos_id) == (ref["pad_id"], ref["eos_id"], None)
  assert (tok.pad_id, tok.eos_id, tok.vocab_size) == (1, 1, ref["vocab_size"])
  row = tok.tokenize("a photo of a cat", 64)[0]
  n = len(tok.encode("a photo of a cat"))
  assert n > 0 and row[n] == tok.eos_id and np.all(row[n:] == 1)


@pytest.mark.parametrize("length", ["64", "8"])
def test_rows_match_transformers(tok, ref, length):
  got = tok.tokenize(ref["texts"], int(length))
  for text, row, want in zip(ref["texts"], got, ref["rows"][length]):
    np.testing.assert_array_equal(row, want, err_msg=repr(text))
  assert any(row[-1] == tok.eos_id and row[-2] != tok.eos_id for row in got)  # Cut.


def test_decode(tok, ref):
  for text, row, decoded in zip(ref["texts"], ref["rows"]["64"], ref["decode"]):
    if "</s>" not in text:  # A literal '</s>' is EOS, where decode stops.
      assert tok.decode(row) == decoded, repr(text)


def test_canonicalize_and_pickle(tok):
  assert tokenizers_siglip.canonicalize("  A Photo,\tof a CAT!! ") == "a photo of a cat"
  assert tok.encode("A Photo, of a CAT!!") == tok.encode("a photo of a cat")
  clone = pickle.loads(pickle.dumps(tok))
  np.testing.assert_array_equal(clone.tokenize("a dog", 8), tok.tokenize("a dog", 8))


def test_errors_and_sentencepiece_hint(tmp_path):
  with pytest.raises(errors.DataPathError, match="nope.model.*siglip:"):
    tokenizers.get_tokenizer(f"siglip:{tmp_path / 'nope.model'}")
  no_eos = _train_spm(tmp_path, "noeos", eos_id=-1)
  with pytest.raises(errors.DataError, match="</s>"):
    tokenizers.get_tokenizer(f"siglip:{no_eos}")
  # 'sentencepiece:' still needs BOS and points at 'siglip:' for T5-style models.
  with pytest.raises(errors.DataError, match=f"siglip:{MODEL}"):
    tokenizers.get_tokenizer(f"sentencepiece:{MODEL}")


def test_caption_generation_without_bos_is_a_clear_error(tok):
  from vlp_jax.models import interface  # pylint: disable=g-import-not-at-top
  from vlp_jax.train import predict  # pylint: disable=g-import-not-at-top

  class Captioner:  # Just what `interface.can_generate` looks for.
    pass
  for name in interface.GENERATION:
    setattr(Captioner, name, lambda *a, **k: None)
  fns = predict.make_predict_fns(Captioner(), tok, 16)
  with pytest.raises(errors.ConfigError, match="BOS.*data.tokenizer=clip"):
    fns["generate"]({}, np.zeros((1, 8, 8, 3), np.float32))
