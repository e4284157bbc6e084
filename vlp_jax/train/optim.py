"""AdamW (or LAMB) with linear warmup + cosine decay, weight decay on kernels only, clipping."""
import flax.linen as nn
import jax
import optax


def lr_schedule(optim_cfg, total_steps: int) -> optax.Schedule:
  """Linear warmup from 0 to `lr`, then cosine decay to `lr * end_lr_ratio`."""
  warmup = min(optim_cfg.warmup_steps, max(total_steps - 1, 0))
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=optim_cfg.lr, warmup_steps=warmup,
      decay_steps=max(total_steps, warmup + 1),
      end_value=optim_cfg.lr * optim_cfg.end_lr_ratio)


def decay_mask(params):
  """True for dense kernels; False for norms, biases, embeddings, probes, logit scale."""
  def is_kernel(path, _):
    return getattr(path[-1], "key", None) == "kernel"
  return jax.tree_util.tree_map_with_path(
      is_kernel, params, is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata))


# config.optim.name -> optax optimizer with decoupled weight decay. LAMB (You et al.)
# scales each layer's Adam update by its trust ratio ||w|| / ||update|| (FILIP).
OPTIMIZERS = {"adamw": optax.adamw, "lamb": optax.lamb}


def make_optimizer(optim_cfg, total_steps: int):
  """Returns (optax transform, schedule)."""
  schedule = lr_schedule(optim_cfg, total_steps)
  parts = []
  if optim_cfg.grad_clip_norm > 0:
    parts.append(optax.clip_by_global_norm(optim_cfg.grad_clip_norm))
  make = OPTIMIZERS[optim_cfg.name]
  parts.append(make(schedule, b1=optim_cfg.b1, b2=optim_cfg.b2, eps=optim_cfg.eps,
                    weight_decay=optim_cfg.weight_decay, mask=decay_mask))
  return optax.chain(*parts), schedule
