"""Outputs of the extra views and of the projected local tokens, shared by the
two-tower and CoCa families (the multi-view methods: TCL, PyramidCLIP, SigLIP 2).

For each image view group NAME in the batch ('views/NAME' [B, K, S, S, 3], see
`vlp_jax/data/views.py`) the image tower embeds the B*K crops and the model returns

    view_emb/NAME      [B, K, D]     normalised, like image_emb
    view_tokens/NAME   [B, K, N, W]  the tower's patch tokens, like image_tokens
    view_local_emb/NAME [B, K, N, D] those tokens through the image projection, not
                                normalised, like image_local_emb (below)

and for each text view NAME ('text_views/NAME' [B, L]):

    text_view_emb/NAME     [B, D]     normalised, like text_emb
    text_view_tokens/NAME  [B, L, W]  like text_tokens

Local (token-level) embeddings, for objectives that contrast a global embedding with
its own tokens (TCL's local mutual information):

    image_local_emb  [B, N, D]  every patch token through the image projection, NOT
                                normalised (pooling commutes with the linear
                                projection, so an objective may pool, then normalise)
    text_local_emb   [B, T, D]  every text position through the text projection
    text_local_mask  [B, T]     float32, 1 = a real token (the text tower's mask)

Unused outputs cost nothing: they are computed inside the jitted step and XLA
removes what no objective reads.
"""
from typing import Callable, Dict, FrozenSet, Mapping

import jax.numpy as jnp

IMAGE_VIEW, TEXT_VIEW = "views/", "text_views/"
VIEW_EMB, VIEW_TOKENS, VIEW_LOCAL = "view_emb/", "view_tokens/", "view_local_emb/"
TEXT_VIEW_EMB, TEXT_VIEW_TOKENS = "text_view_emb/", "text_view_tokens/"
LOCAL_OUTPUTS = ("image_local_emb", "text_local_emb", "text_local_mask")
# Output prefix -> (batch prefix that produces it, config.data entry that names it).
VIEW_OUTPUT_PREFIXES = {VIEW_EMB: (IMAGE_VIEW, "views"),
                        VIEW_TOKENS: (IMAGE_VIEW, "views"),
                        VIEW_LOCAL: (IMAGE_VIEW, "views"),
                        TEXT_VIEW_EMB: (TEXT_VIEW, "text_views"),
                        TEXT_VIEW_TOKENS: (TEXT_VIEW, "text_views")}


def view_output_names(data_cfg, local: bool = True) -> FrozenSet[str]:
  """The view outputs a model returns for batches of `config.data` (its `views` and
  `text_views` groups); `local=False`: without 'view_local_emb/NAME'."""
  out = set()
  for prefix, (_, entry) in VIEW_OUTPUT_PREFIXES.items():
    if prefix == VIEW_LOCAL and not local:
      continue
    groups = data_cfg.get(entry) if data_cfg is not None else None
    out.update(prefix + name for name in (groups or {}).keys())
  return frozenset(out)


def view_group(output: str):
  """'view_emb/global' -> ('views', 'global'); None for a name that is no view output."""
  for prefix, (_, entry) in VIEW_OUTPUT_PREFIXES.items():
    if output.startswith(prefix):
      return entry, output[len(prefix):]
  return None


def add_view_outputs(out: Dict, batch: Mapping, embed_image: Callable,
                     embed_text: Callable, project_image: Callable,
                     train: bool) -> Dict:
  """Adds the outputs of every view in `batch` to `out` (in place; returned).

  `embed_image(images, train)` -> (emb [n, D], tokens [n, N, W]) and
  `embed_text(tokens, train)` -> (emb [n, D], feats [n, L, W]) are the model's towers;
  `project_image(tokens)` the image projection without normalisation (None: no
  'view_local_emb/NAME').
  """
  for key in sorted(batch):
    if key.startswith(IMAGE_VIEW):
      name, views = key[len(IMAGE_VIEW):], batch[key]
      b, k = views.shape[:2]
      emb, tokens = embed_image(views.reshape((b * k,) + views.shape[2:]), train)
      out[VIEW_EMB + name] = emb.reshape((b, k) + emb.shape[1:])
      out[VIEW_TOKENS + name] = tokens.reshape((b, k) + tokens.shape[1:])
      if project_image is not None:
        local = project_image(tokens)
        out[VIEW_LOCAL + name] = local.reshape((b, k) + local.shape[1:])
    elif key.startswith(TEXT_VIEW):
      name = key[len(TEXT_VIEW):]
      out[TEXT_VIEW_EMB + name], out[TEXT_VIEW_TOKENS + name] = embed_text(
          batch[key], train)
  return out


def local_embeddings(project_image: Callable, project_text: Callable, image_tokens,
                     text_tokens, text_mask) -> Dict:
  """The local outputs ('image_local_emb', 'text_local_emb', 'text_local_mask') from
  the towers' tokens and the projections' un-normalised linear maps (either token
  array may be None when its input is absent; `project_image` None: no image
  locals)."""
  out = {}
  if image_tokens is not None and project_image is not None:
    out["image_local_emb"] = project_image(image_tokens)
  if text_tokens is not None:
    out["text_local_emb"] = project_text(text_tokens)
    out["text_local_mask"] = text_mask.astype(jnp.float32)
  return out
