"""Caption decoding options: names, defaults, valid ranges and their check, shared by
models/generate.py, the captioning evaluator and tools/caption.py (no jax import).

Methods: 'greedy'; 'beam' (`beam_size`, `length_penalty`: GNMT's
((5 + n) / 6) ** length_penalty divides the log-probability of n generated tokens; so
beam_size 1 is greedy decoding only at length_penalty 0); 'sample' (nucleus sampling:
`top_p`, `temperature`, `seed`; batch i of a run draws with `batch_seed(seed, i)`).
`max_len`: tokens per caption, BOS included; 0 = the model's text context length.
"""
import math
import numbers

from vlp_jax import errors

METHODS = ("greedy", "beam", "sample")
# GNMT's and t5x's length penalty 0.6.
DEFAULTS = {"method": "greedy", "beam_size": 4, "length_penalty": 0.6, "top_p": 0.9,
            "temperature": 1.0, "max_len": 0, "seed": 0}
MIN_TEMPERATURE = 1e-3  # Smaller ones overflow logits / temperature (NaN draws).
SEED_LIMIT = 2 ** 31  # Seeds are int32: batch seeds wrap modulo this.

# key -> (integer, ok, valid, meaning), as `config.check_numbers` reads them.
RANGES = {
    "beam_size": (True, lambda v: v >= 1, ">= 1", "beam search: hypotheses per image"),
    "length_penalty": (False, lambda v: 0 <= v <= 10, "in [0, 10]",
                       "beam search: GNMT alpha, 0 = rank by log-probability"),
    "top_p": (False, lambda v: 0 < v <= 1, "in (0, 1]",
              "sampling: nucleus mass, 1 = plain sampling"),
    "temperature": (False, lambda v: v >= MIN_TEMPERATURE, f">= {MIN_TEMPERATURE}",
                    "sampling: logits are divided by it"),
    "max_len": (True, lambda v: v == 0 or v >= 2, "0 or >= 2",
                "tokens per caption with BOS; 0 = the model's text context length"),
    "seed": (True, lambda v: 0 <= v < SEED_LIMIT, f"in [0, {SEED_LIMIT - 1}]",
             "sampling: PRNG seed"),
}


def batch_seed(seed: int, i: int) -> int:
  """The seed of batch `i`: seed + i, wrapped into int32's non-negative range."""
  return (seed + i) % SEED_LIMIT


def check(method: str, beam_size: int = 4, length_penalty: float = 0.6,
          top_p: float = 0.9, temperature: float = 1.0, max_len: int = 0,
          seed: int = 0, context_length: int = None, where: str = "decode.") -> None:
  """Raises errors.ConfigError naming the bad option (`where` + its name, e.g.
  'config.evals.captioning.' or '--') and its valid range; with `context_length`,
  `max_len` must also be at most it."""
  def bad(key, value, valid):
    raise errors.ConfigError(f"{where}{key}={value!r} is invalid: it must be {valid}.")
  if method not in METHODS:
    bad("method", method, f"one of {list(METHODS)}")
  values = dict(beam_size=beam_size, length_penalty=length_penalty, top_p=top_p,
                temperature=temperature, max_len=max_len, seed=seed)
  for key, value in values.items():
    integer, ok, valid, meaning = RANGES[key]
    kind = numbers.Integral if integer else numbers.Real
    if (isinstance(value, bool) or not isinstance(value, kind)
        or not math.isfinite(value) or not ok(value)):
      bad(key, value, f"{'an integer' if integer else 'a number'} {valid} ({meaning})")
  if context_length is not None and max_len > context_length:
    bad("max_len", max_len, f"at most {context_length} (the model's text context "
        "length: captions are BOS + up to max_len - 1 tokens), or 0 for it")
