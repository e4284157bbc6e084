"""Recipe arguments: `configs/NAME.py:runlocal` and unknown arguments."""
import pytest

from vlp_jax import cli, errors, validation
from vlp_jax.perf import flops

B16 = ("clip_b16", "siglip_b16", "coca_b16", "filip_b16", "unicl_b16",
       "pyramidclip_b16", "tcl_b16", "m3ae_b16", "siglip2_b16")


@pytest.mark.parametrize("name", B16)
def test_runlocal_keeps_the_family_and_shrinks_the_run(name):
  full = cli.load_config_file(f"configs/{name}.py")
  local = cli.load_config_file(f"configs/{name}.py:runlocal")
  validation.validate(local)
  assert local.model.name == full.model.name
  assert dict(local.objectives) == dict(full.objectives)
  assert local.model.image.pool == full.model.image.pool
  assert local.model.use_logit_bias == full.model.use_logit_bias
  assert local.data.source == "shapes" and local.total_steps <= 20
  assert all(e.source == "shapes" for e in local.evals.values())
  # Orders of magnitude less compute per sample than the recipe.
  assert flops.train_flops_per_sample(local) < flops.train_flops_per_sample(full) / 100


def test_unknown_recipe_argument_names_the_valid_ones():
  with pytest.raises(errors.ConfigKeyError, match=r"Unknown recipe argument 'runlocl'.*"
                     r"\['runlocal', 'small'\]"):
    cli.load_config_file("configs/clip_b16.py:runlocl")


def test_unknown_recipe_argument_on_the_command_line_is_one_line(tmp_path):
  import subprocess, sys  # pylint: disable=g-import-not-at-top,multiple-imports
  proc = subprocess.run(
      [sys.executable, "main.py", "--config=configs/clip_b16.py:runlocl",
       f"--workdir={tmp_path}"], capture_output=True, text=True, timeout=120)
  assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
  assert "error: Unknown recipe argument 'runlocl'" in proc.stderr


def test_method_recipes():
  filip = cli.load_config_file("configs/filip_b16.py")
  assert dict(filip.objectives) == {"filip": 1.0} and filip.model.token_embed_dim == 256
  assert filip.optim.name == "lamb" and filip.batch_size == 40960
  assert filip.optim.lr == pytest.approx(2e-3 * (40960 / 512) ** 0.5)
  unicl = cli.load_config_file("configs/unicl_b16.py")
  assert dict(unicl.objectives) == {"unicl": 1.0} and len(unicl.data.mixture) == 2
  assert not unicl.model.text.prefix_conditioning
  local = cli.load_config_file("configs/unicl_b16.py:runlocal,prefix")
  validation.validate(local)
  assert local.model.text.prefix_conditioning
  assert [s for s, _ in local.data.mixture] == ["shapes:hard,classes", "shapes:hard"]


@pytest.mark.parametrize("name", B16)
def test_text_pool_fits_the_tokenizer(name):
  """CLIP's BPE ('clip'): id 0 is both padding and '!', EOS the highest id, so causal
  CLIP-family towers pool at argmax without a padding mask; SigLIP's bidirectional
  tower and CoCa (whose default layout pools at EOS itself) keep 'eos' + the mask,
  as do all `:runlocal` runs (word tokenizers: EOS 2 is not the highest id)."""
  full = cli.load_config_file(f"configs/{name}.py")
  local = cli.load_config_file(f"configs/{name}.py:runlocal")
  assert full.data.tokenizer == "clip"
  if name == "tcl_b16":  # TCL's BERT-like tower: bidirectional, pooled at BOS ([CLS]).
    assert all((x.model.text.pool, x.model.text.padding_mask, x.model.text.causal) ==
               ("first", True, False) for x in (full, local))
    return
  argmax = name in ("clip_b16", "filip_b16", "unicl_b16", "pyramidclip_b16")
  assert (full.model.text.pool, full.model.text.padding_mask) == (
      ("argmax", False) if argmax else ("eos", True))
  assert argmax == full.model.text.causal or name in ("coca_b16", "siglip2_b16")
  assert local.data.tokenizer.startswith("words:")
  assert (local.model.text.pool, local.model.text.padding_mask) == ("eos", True)
  if name == "unicl_b16":
    prefixed = cli.load_config_file("configs/unicl_b16.py:prefix")
    assert prefixed.model.text.pool == "argmax" and not prefixed.model.text.padding_mask
