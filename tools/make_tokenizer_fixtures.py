"""Writes the reference ids that tests/test_tokenizers_*.py compare vlp_jax's
tokenizers against, from the original libraries:

    REF_PY tools/make_tokenizer_fixtures.py  # REF_PY: a Python with
    # pip install open_clip_torch==3.3.0 transformers==5.24.0 tokenizers==0.23.3 \
    #     sentencepiece==0.2.3 ftfy==6.3.1 regex

into tests/fixtures/tokenizers/ (--out):
  clip.json              open_clip's SimpleTokenizer (the built-in CLIP vocabulary):
                         rows at context 77 and 8, encode ids and decode strings.
  hf_clip_style.json     a small byte-level BPE trained here with `tokenizers`
  + hf_clip_style/tokenizer.json  (BOS + EOS post-processor, lower-casing), and
  hf_t5_style.json       a small Unigram one with a T5-style post-processor ('$A </s>',
  + hf_t5_style/tokenizer.json    no BOS, padding with '<pad>' = 0): rows from
                         transformers' PreTrainedTokenizerFast (padding='max_length',
                         truncation=True).
  siglip.json            transformers' SiglipTokenizer on siglip_tiny.model, a tiny
  + siglip_tiny.model    T5-style SentencePiece model (pad 0, eos 1, unk 2, no BOS)
                         trained here; rows at max_length 64 and 8.
  siglip_ws.json         the same with a model that keeps whitespace runs.
  + siglip_ws.model

Never needed by the tests themselves. The tiny models are trained here on TRAIN;
rerunning rewrites them and every reference together (the `tokenizers` Unigram trainer
is not bit-reproducible, so hf_t5_style may change; the references change with it).
"""
import argparse
import json
import os

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests",
                   "fixtures", "tokenizers")

LONG = ("A very long caption that goes on and on about a sunny beach with palm trees, "
        "blue water, white sand, children building sand castles, dogs running after "
        "frisbees, surfers waiting for the next wave, seagulls circling overhead, an "
        "ice cream stand with a long queue, colourful umbrellas, and in the distance a "
        "lighthouse standing on a rocky cliff under a bright afternoon sky; " * 2)

# Texts every tokenizer is checked on.
CORPUS = [
    "", " ", "\t\n", "a photo of a cat.", "A Photo Of A CAT", "a   photo\tof\na cat",
    "Hello, World!", "wow!!! really?!", "so fun!~ and wow!@# yes!» (CLIP id 0 = '!')",
    "what?! no way!!1", "!", "!!", "!?",
    "It's the dog's bone; they're sure we'll go, I'd say, you've I'm",
    "naïve café — crème brûlée à la carte", "Ångström, Øresund, Straße, ΑΘΗΝΑ",
    "日本語のテキストと漢字", "中文字幕：猫和狗", "한국어 문장입니다", "Привет, мир",
    "emoji 😀🐱‍👤👍🏽 and flags 🇯🇵🇫🇷", "❤️ love ✨ sparkle ✓ check",
    "fish &amp; chips", "rock &#39;n&#39; roll", "&lt;b&gt;bold&lt;/b&gt;",
    "double &amp;amp; escaped", "triple &amp;amp;amp; escaped",
    "<b>tag</b> &amp;amp; &lt;i&gt;", "&quot;quoted&quot; &nbsp;space", "&#x1F600; smile",
    "tab\tseparated\tvalues", "line one\nline two\r\nline three",
    "no\u00a0break\u00a0space", "zero\u200bwidth\u200bjoiner\u200d here",
    "ideographic\u3000space and\u2003em space", "  leading and trailing  ",
    "mojibake cafÃ© and donâ€™t and Ã©tÃ©", "smart “quotes” and ‘single’ ones",
    "dashes – — and ellipsis…", "fullwidth ＡＢＣ １２３", "ligature ﬁne ﬂow",
    "prices $3.99, 100%, 1,000,000 and 2023-10-05", "pi is 3.14159265358979",
    "version v1.2.3-rc4 #hashtag @mention http://example.com/a_b?c=d",
    "under_score snake_case CamelCase kebab-case", "<start_of_text> literal tags",
    "a caption with </s> and <unk> inside", "</s> first", "  <unk>  spaced  </s>  ",
    "SentencePiece ▁mark ▁▁ here",
    "x" * 300, "supercalifragilisticexpialidocious antidisestablishmentarianism",
    LONG, "a " * 100, "😀" * 40,
]

# Training text for the tiny models (not the test corpus, but overlapping in style).
TRAIN = [
    "a photo of a cat", "a photo of a dog", "a picture of the beach at sunset",
    "the quick brown fox jumps over the lazy dog", "two children play in the park",
    "a red car parked next to a blue house", "people walking on a busy street",
    "a bowl of fruit on a wooden table", "mountains covered with snow in winter",
    "an old man reading a newspaper", "a close up of a flower", "birds flying in the sky",
    "hello world", "numbers 0 1 2 3 4 5 6 7 8 9", "café naïve déjà vu", "日本語 中文 한국어",
] * 20


def clip_fixture():
  import open_clip  # pylint: disable=g-import-not-at-top
  tok = open_clip.SimpleTokenizer()
  rows = {str(n): tok(CORPUS, context_length=n).tolist() for n in (77, 8)}
  encoded = [tok.encode(t) for t in CORPUS]
  return {"source": f"open_clip {open_clip.__version__} SimpleTokenizer()",
          "texts": CORPUS, "rows": rows, "encode": encoded,
          "decode": [tok.decode(ids) for ids in encoded],
          "vocab_size": tok.vocab_size, "sot": tok.sot_token_id, "eot": tok.eot_token_id}


def _train_hf(kind):
  """A small tokenizer.json: 'clip_style' (byte BPE, BOS/EOS) or 't5_style'."""
  # pylint: disable=g-import-not-at-top
  from tokenizers import (Tokenizer, decoders, models, normalizers, pre_tokenizers,
                          processors, trainers)
  if kind == "clip_style":
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|startoftext|>", "<|endoftext|>"]
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TRAIN, trainer)
    bos, eos = (tok.token_to_id(s) for s in specials)
    tok.post_processor = processors.TemplateProcessing(
        single="<|startoftext|> $A <|endoftext|>",
        special_tokens=[("<|startoftext|>", bos), ("<|endoftext|>", eos)])
    return tok, "<|endoftext|>"
  tok = Tokenizer(models.Unigram())
  tok.normalizer = normalizers.NFKC()
  tok.pre_tokenizer = pre_tokenizers.Metaspace()
  tok.decoder = decoders.Metaspace()
  trainer = trainers.UnigramTrainer(
      vocab_size=150, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>")
  tok.train_from_iterator(TRAIN, trainer)
  tok.post_processor = processors.TemplateProcessing(
      single="$A </s>", special_tokens=[("</s>", tok.token_to_id("</s>"))])
  tok.enable_padding(pad_id=tok.token_to_id("<pad>"), pad_token="<pad>")
  return tok, "<pad>"


def hf_fixture(kind, out):
  from transformers import PreTrainedTokenizerFast  # pylint: disable=g-import-not-at-top
  tok, pad_token = _train_hf(kind)
  folder = os.path.join(out, f"hf_{kind}")
  os.makedirs(folder, exist_ok=True)
  path = os.path.join(folder, "tokenizer.json")
  tok.save(path)
  ref = PreTrainedTokenizerFast(tokenizer_file=path, pad_token=pad_token)
  rows = {str(n): ref(CORPUS, padding="max_length", truncation=True,
                      max_length=n)["input_ids"] for n in (77, 8)}
  encoded = [ref(t, add_special_tokens=False)["input_ids"] for t in CORPUS]
  return {"source": f"transformers PreTrainedTokenizerFast(pad_token={pad_token!r})",
          "texts": CORPUS, "rows": rows, "encode": encoded,
          "decode": [ref.decode(ids, skip_special_tokens=True) for ids in encoded],
          "pad_id": ref.pad_token_id, "vocab_size": len(ref)}


def siglip_fixture(out, name, **train_options):
  """`name`.model trained here and transformers' SiglipTokenizer's ids with it."""
  import sentencepiece as spm  # pylint: disable=g-import-not-at-top
  from transformers import SiglipTokenizer  # pylint: disable=g-import-not-at-top
  path = os.path.join(out, f"{name}.model")
  with open(path, "wb") as f:
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(TRAIN), model_writer=f, vocab_size=96,
        hard_vocab_limit=False,
        model_type="unigram", character_coverage=1.0, pad_id=0, eos_id=1, unk_id=2,
        bos_id=-1, num_threads=1, minloglevel=2,
        normalization_rule_name="identity", **train_options)  # No NFKC table: 1 KB.
  ref = SiglipTokenizer(vocab_file=path)
  rows = {str(n): ref(CORPUS, padding="max_length", truncation=True,
                      max_length=n)["input_ids"] for n in (64, 8)}
  return {"source": f"transformers SiglipTokenizer(vocab_file={name}.model)",
          "texts": CORPUS, "rows": rows, "pad_id": ref.pad_token_id,
          "eos_id": ref.eos_token_id, "vocab_size": ref.vocab_size,
          "decode": [ref.decode(r, skip_special_tokens=True) for r in rows["64"]]}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default=OUT, help="fixture folder")
  out = os.path.abspath(parser.parse_args().out)
  os.makedirs(out, exist_ok=True)
  fixtures = {"clip.json": clip_fixture(),
              "hf_clip_style.json": hf_fixture("clip_style", out),
              "hf_t5_style.json": hf_fixture("t5_style", out),
              "siglip.json": siglip_fixture(out, "siglip_tiny"),
              # Keeps whitespace runs: exercises transformers' lone-'▁' rule.
              "siglip_ws.json": siglip_fixture(out, "siglip_ws",
                                               remove_extra_whitespaces=False)}
  for name, data in fixtures.items():
    with open(os.path.join(out, name), "w") as f:
      json.dump(data, f, ensure_ascii=False, separators=(",", ":"))
      f.write("\n")
    print("wrote", os.path.join(out, name))


if __name__ == "__main__":
  main()
