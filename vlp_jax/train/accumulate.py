"""Gradient accumulation that keeps every negative (open_clip's `--accum-freq`).

The global batch of B examples is split into K = `accum_steps` micro-batches of
b = B / K; activation memory is that of one micro-batch plus the cached [B, D]
embeddings.

* Pass 1 (no gradient, `lax.map`): the embeddings of every micro-batch are computed
  and cached for the full batch.
* Pass 2 (`lax.scan`, float32 gradient accumulator): micro-batch k's outputs are
  recomputed with gradient and its embeddings substituted into the cached set.
  Batch-global objectives (those whose function has `needs_all_negatives = True`)
  are evaluated on the full substituted set, so the gradient through micro-batch k's
  embeddings is exactly its share of the full-batch gradient; per-example objectives
  (e.g. caption) see micro-batch k only and are weighted 1/K. Scalar outputs that a
  batch-global loss uses directly (logit_scale, logit_bias) would get their direct
  gradient in each of the K steps, so that path is scaled by 1/K.

Summed over k this is the full-batch gradient of the batch-global objectives and the
mean over micro-batches of the per-example ones (for caption, which averages over
tokens, this differs from the full-batch token mean when micro-batches hold different
numbers of tokens).

Micro-batch k holds rows k, k + K, k + 2K, ... of the batch: with the batch sharded
over the data-parallel devices, each micro-batch is then spread over all of them
(when B / K is divisible by their number) instead of living on 1/K of them.

Dropout: micro-batch k uses `fold_in(rng, k)` in both passes, so pass 2 reproduces
pass 1's embeddings. With dropout 0 (the default) the step equals the full-batch
step; with dropout > 0 it equals a full-batch step whose dropout masks are drawn per
micro-batch.
"""
import jax
import jax.numpy as jnp

# Outputs cached for the full batch in pass 1: what batch-global objectives read
# besides the scalar outputs (logit_scale, logit_bias).
CACHED_KEYS = ("image_emb", "text_emb")


def is_batch_global(objective) -> bool:
  """Whether `objective` (a WeightedObjective) needs the whole batch's negatives."""
  from vlp_jax.registry import OBJECTIVES  # pylint: disable=g-import-not-at-top
  return bool(OBJECTIVES.info(objective.name)["batch_global"])


def split_microbatches(tree, accum_steps: int):
  """[B, ...] leaves -> [K, B/K, ...]; micro-batch k holds rows k, k + K, k + 2K, ..."""
  def split(x):
    n = x.shape[0]
    if n % accum_steps:
      raise ValueError(f"The batch of {n} examples is not divisible into "
                       f"accum_steps={accum_steps} micro-batches.")
    x = x.reshape((n // accum_steps, accum_steps) + x.shape[1:])
    return jnp.swapaxes(x, 0, 1)
  return jax.tree.map(split, tree)


def merge_microbatches(tree):
  """Inverse of `split_microbatches`: [K, b, ...] -> [K * b, ...] in batch order."""
  def merge(x):
    x = jnp.swapaxes(x, 0, 1)
    return x.reshape((x.shape[0] * x.shape[1],) + x.shape[2:])
  return jax.tree.map(merge, tree)


def _scale_grad(x, factor):
  """Same value as `x`; its gradient is multiplied by `factor`."""
  sg = jax.lax.stop_gradient(x)
  return sg + (x - sg) * factor


def accumulated_grads(params, model, objectives, batch, rng, accum_steps: int,
                      train: bool = True):
  """Gradient of the weighted objectives over `accum_steps` micro-batches.

  Args:
    params: model parameters.
    model: the flax module; `model.apply({'params': p}, batch, train, rngs)` returns
      the outputs dict.
    objectives: WeightedObjective list (see `step.objectives_from_config`).
    batch: dict of [B, ...] arrays; B must be divisible by `accum_steps`.
    rng: dropout key; micro-batch k uses `fold_in(rng, k)`.
    accum_steps: the number K of micro-batches.
    train: passed to the model.

  Returns:
    (grads, metrics): grads in the parameters' dtypes; metrics with the keys of
    `step.compute_loss` (batch-global objectives' metrics on the full batch,
    per-example ones averaged over micro-batches).
  """
  k_steps = int(accum_steps)
  global_objs = [o for o in objectives if is_batch_global(o)]
  local_objs = [o for o in objectives if not is_batch_global(o)]
  micro = split_microbatches(batch, k_steps)
  keys = jax.vmap(lambda k: jax.random.fold_in(rng, k))(jnp.arange(k_steps))

  def forward(p, mb, key):
    return model.apply({"params": p}, mb, train=train, rngs={"dropout": key})

  # Pass 1: embeddings of every micro-batch, without gradient.
  def embed(xs):
    mb, key = xs
    out = forward(jax.lax.stop_gradient(params), mb, key)
    return {k: out[k] for k in CACHED_KEYS if k in out}

  cache = {}
  if global_objs:
    cache = jax.lax.stop_gradient(jax.lax.map(embed, (micro, keys)))  # [K, b, ...]

  # Pass 2: micro-batch k with gradient, its embeddings substituted into the cache.
  def loss_k(p, k, mb, key):
    out = forward(p, mb, key)
    losses, metrics = {}, {}
    total = jnp.zeros((), jnp.float32)
    if global_objs:
      full = {name: merge_microbatches(cache[name].at[k].set(out[name]))
              for name in cache}
      # Scalar outputs (logit_scale/bias) enter each of the K steps' global loss.
      full.update({name: _scale_grad(v, 1.0 / k_steps) for name, v in out.items()
                   if name not in full and jnp.ndim(v) == 0})
      for obj in global_objs:
        loss, m = obj.fn(full, batch, obj.cfg)
        total = total + obj.weight * loss
        losses[obj.name] = loss
        metrics.update({f"{obj.name}/{n}": v for n, v in m.items()})
    for obj in local_objs:
      loss, m = obj.fn(out, mb, obj.cfg)
      total = total + (obj.weight / k_steps) * loss
      losses[obj.name] = loss
      metrics.update({f"{obj.name}/{n}": v for n, v in m.items()})
    for name in ("logit_scale", "logit_bias"):
      if name in out:
        metrics[name] = out[name]
    return total, (losses, metrics)

  grad_fn = jax.grad(loss_k, has_aux=True)

  def body(acc, xs):
    k, mb, key = xs
    grads, aux = grad_fn(params, k, mb, key)
    acc = jax.tree.map(lambda a, g: a + g.astype(jnp.float32), acc, grads)
    return acc, aux

  acc0 = jax.tree.map(lambda p: jnp.zeros_like(p, dtype=jnp.float32), params)
  acc, (losses, metrics) = jax.lax.scan(
      body, acc0, (jnp.arange(k_steps), micro, keys))
  grads = jax.tree.map(lambda g, p: g.astype(p.dtype), acc, params)

  # Batch-global objectives' values are the same in every step: report the last.
  # Per-example ones are averaged over the micro-batches.
  local_names = {o.name for o in local_objs}

  def reduce(name, v):
    return jnp.mean(v, axis=0) if name in local_names else v[-1]

  out_metrics = {key: reduce(key.split("/", 1)[0], v) for key, v in metrics.items()}
  total = jnp.zeros((), jnp.float32)
  for obj in objectives:
    total = total + obj.weight * reduce(obj.name, losses[obj.name])
  out_metrics["loss"] = total
  return grads, out_metrics
