"""'hf:' tokenizer.json specs against transformers' PreTrainedTokenizerFast ids
(tests/fixtures/tokenizers/hf_*.json, from tools/make_tokenizer_fixtures.py)."""
import json
import os
import pickle

import numpy as np
import pytest

from vlp_jax import errors
from vlp_jax.data import tokenizers

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "tokenizers")
CLIP_STYLE = os.path.join(FIXTURES, "hf_clip_style", "tokenizer.json")
T5_STYLE = os.path.join(FIXTURES, "hf_t5_style", "tokenizer.json")
# The references padded the CLIP-style file with '<|endoftext|>' (as HF's CLIP does);
# the T5-style file names its own padding ('<pad>' = 0).
SPECS = {"hf_clip_style": f"hf:{CLIP_STYLE},pad=<|endoftext|>",
         "hf_t5_style": f"hf:{os.path.dirname(T5_STYLE)}"}


def _ref(name):
  with open(os.path.join(FIXTURES, f"{name}.json")) as f:
    return json.load(f)


@pytest.mark.parametrize("name", sorted(SPECS))
def test_rows_encode_decode_match_transformers(name):
  ref, tok = _ref(name), tokenizers.get_tokenizer(SPECS[name])
  assert (tok.pad_id, tok.vocab_size) == (ref["pad_id"], ref["vocab_size"])
  for length in ("77", "8"):
    got = tok.tokenize(ref["texts"], int(length))
    for text, row, want in zip(ref["texts"], got, ref["rows"][length]):
      np.testing.assert_array_equal(row, want, err_msg=f"{length} {text!r}")
  for text, ids, decoded in zip(ref["texts"], ref["encode"], ref["decode"]):
    assert tok.encode(text) == ids, repr(text)
    if tok.eos_id not in ids:  # A literal '</s>' is EOS, where decode stops.
      assert tok.decode(ids) == decoded, repr(text)


def test_special_tokens_follow_the_post_processor():
  clip = tokenizers.get_tokenizer(SPECS["hf_clip_style"])
  assert clip.bos_id is not None and clip.eos_id != clip.bos_id
  assert clip.pad_id == clip.eos_id  # pad=<|endoftext|>.
  row = clip.tokenize("a photo of a cat " * 20, 10)[0]
  assert row[0] == clip.bos_id and row[-1] == clip.eos_id
  t5 = tokenizers.get_tokenizer(SPECS["hf_t5_style"])
  assert t5.bos_id is None and (t5.eos_id, t5.pad_id) == (1, 0)
  row = t5.tokenize("a photo of a cat", 40)[0]
  eos = int(np.nonzero(row == t5.eos_id)[0][0])
  assert row[0] != t5.eos_id and np.all(row[eos + 1:] == 0)
  assert t5.decode(row) == "a photo of a cat"
  assert t5.tokenize("a photo of a cat", 1).tolist() == [[t5.eos_id]]
  with pytest.raises(ValueError, match="length"):
    clip.tokenize("x", 1)  # BOS + EOS need 2.


def test_pad_option_by_id_and_pickle():
  tok = tokenizers.get_tokenizer(f"hf:{CLIP_STYLE},pad=0")
  assert tok.pad_id == 0
  row = tok.tokenize("a cat", 8)[0]
  assert row[-1] == 0 and tok.eos_id in row
  clone = pickle.loads(pickle.dumps(tok))
  assert clone.pad_id == 0
  np.testing.assert_array_equal(clone.tokenize("a cat", 8), tok.tokenize("a cat", 8))


def test_clean_option_lowercases_and_fixes_text():
  raw = tokenizers.get_tokenizer(f"{SPECS['hf_t5_style']},clean=none")
  low = tokenizers.get_tokenizer(f"{SPECS['hf_t5_style']},clean=lower")
  assert low.encode("A  Photo &amp; CAT") == raw.encode("a photo & cat")
  assert raw.encode("A Photo") != raw.encode("a photo")


def test_no_post_processor_means_no_specials(tmp_path):
  with open(T5_STYLE) as f:
    data = json.load(f)
  data["post_processor"] = None
  path = tmp_path / "tokenizer.json"
  path.write_text(json.dumps(data))
  tok = tokenizers.get_tokenizer(f"hf:{path}")
  assert tok.bos_id is None and tok.eos_id is None and tok.pad_id == 0
  ids = tok.encode("a photo of a cat")
  row = tok.tokenize("a photo of a cat", 3)[0]
  assert row.tolist() == ids[:3]
  assert tok.decode(tok.tokenize("a cat", 8)[0]) == "a cat"


def test_errors(tmp_path):
  with pytest.raises(errors.DataPathError, match="nope.json.*hf:/path"):
    tokenizers.get_tokenizer(f"hf:{tmp_path / 'nope.json'}")
  with pytest.raises(errors.DataPathError, match="tokenizer.json"):
    tokenizers.get_tokenizer(f"hf:{tmp_path}")  # A folder without tokenizer.json.
  bad = tmp_path / "bad.json"
  bad.write_text("{not json")
  with pytest.raises(errors.DataError, match="bad.json"):
    tokenizers.get_tokenizer(f"hf:{bad}")
  with pytest.raises(errors.ConfigError, match="pad=0"):
    tokenizers.get_tokenizer(f"hf:{CLIP_STYLE}")  # Names no padding.
  with pytest.raises(errors.ConfigError, match="nosuchtoken"):
    tokenizers.get_tokenizer(f"hf:{CLIP_STYLE},pad=nosuchtoken")
  with pytest.raises(errors.ConfigError, match="Unknown option 'size=3'"):
    tokenizers.get_tokenizer(f"hf:{CLIP_STYLE},size=3")
  with pytest.raises(errors.ConfigError, match="clean"):
    tokenizers.get_tokenizer(f"hf:{CLIP_STYLE},pad=0,clean=upper")
