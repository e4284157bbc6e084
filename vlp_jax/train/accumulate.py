"""Gradient accumulation that keeps every negative (open_clip's `--accum-freq`).

The global batch of B examples is split into K = `accum_steps` micro-batches of
b = B / K; activation memory is that of one micro-batch plus the cache below.

What is cached follows the objectives' declarations (`OBJECTIVES.register(name,
reads=..., batch_global=...)`, carried by each `WeightedObjective`): the union of the
`reads` of the selected batch-global objectives, less the scalar outputs
(logit_scale, logit_bias). These are per-example outputs with a leading batch axis:
pooled embeddings (image_emb, text_emb) or token arrays (image_tokens, text_tokens)
alike.

* Pass 1 (no gradient, `lax.map`): the cached outputs of every micro-batch are
  computed and kept for the full batch.
* Pass 2 (`lax.scan`, float32 gradient accumulator): micro-batch k's outputs are
  recomputed with gradient and substituted into the cached set. Batch-global
  objectives are evaluated on the full substituted set (and the full batch), so the
  gradient through micro-batch k's outputs is exactly its share of the full-batch
  gradient; per-example objectives (e.g. caption) see micro-batch k only and are
  weighted 1/K. Scalar outputs that a batch-global loss uses directly (logit_scale,
  logit_bias) would get their direct gradient in each of the K steps, so that path is
  scaled by 1/K.

Summed over k this is the full-batch gradient of the batch-global objectives and the
mean over micro-batches of the per-example ones (for caption, which averages over
tokens, this differs from the full-batch token mean when micro-batches hold different
numbers of tokens).

Memory: each cached output costs B x (its per-example size) in its dtype for the
whole global batch B, spread over the data-parallel devices, plus a transient copy of
that size in pass 2 (where micro-batch k is substituted); this is paid only with
accum_steps > 1. Pooled embeddings are small (D=512 in float32 at B=32768: 64 MiB
each); token arrays are not (ViT-B/16 image_tokens [B, 197, 768] in bfloat16 at
B=32768: 32768 * 197 * 768 * 2 bytes ~ 9.9 GB, ~1.2 GB per device over 8). The
objective's own working memory on the full batch comes on top.

Micro-batch k holds rows k, k + K, k + 2K, ... of the batch: with the batch sharded
over the data-parallel devices, each micro-batch is then spread over all of them
(when B / K is divisible by their number) instead of living on 1/K of them.

Dropout: micro-batch k uses `fold_in(rng, k)` in both passes, so pass 2 reproduces
pass 1's outputs. With dropout 0 (the default) the step equals the full-batch step;
with dropout > 0 it equals a full-batch step whose dropout masks are drawn per
micro-batch.

Outputs computed without gradient for the whole batch beforehand (`extra_outputs`:
the momentum teacher's, see `teacher.py`) are given to batch-global objectives whole
and to per-example ones as micro-batch k's rows.
"""
import jax
import jax.numpy as jnp

from vlp_jax.objectives import combine
from vlp_jax.train import teacher as teacher_lib


def cached_output_names(objectives):
  """The outputs pass 1 caches for the whole batch (the scalar ones then dropped):
  the union of the batch-global objectives' `reads`, in declaration order, less the
  teacher's (computed beforehand, without gradient)."""
  names = []
  for obj in objectives:
    if obj.batch_global:
      names.extend(r for r in obj.reads
                   if r not in names and not teacher_lib.is_teacher_output(r))
  return tuple(names)


def split_microbatches(tree, accum_steps: int):
  """[B, ...] leaves -> [K, B/K, ...]; micro-batch k holds rows k, k + K, k + 2K, ...
  Scalar leaves (the batch's 'step') are the same for every micro-batch: -> [K]."""
  def split(x):
    if jnp.ndim(x) == 0:
      return jnp.broadcast_to(x, (accum_steps,))
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
                      train: bool = True, extra_outputs=None, state_outputs=None):
  """Gradient of the weighted objectives over `accum_steps` micro-batches.

  Args:
    params: model parameters.
    model: the flax module; `model.apply({'params': p}, batch, train, rngs)` returns
      the outputs dict.
    objectives: WeightedObjective list (see `combine.from_config`).
    batch: dict of [B, ...] arrays; B must be divisible by `accum_steps`.
    rng: dropout key; micro-batch k uses `fold_in(rng, k)`.
    accum_steps: the number K of micro-batches.
    train: passed to the model.
    extra_outputs: outputs without gradient for the whole batch ([B, ...] or
      scalars), added to the model's (e.g. the teacher's 'teacher_*').
    state_outputs: arrays that are not per example (the queue's 'queue/*'), given
      whole to every micro-batch's objectives.

  Returns:
    (grads, metrics): grads in the parameters' dtypes; metrics with the keys of
    `step.compute_loss` (batch-global objectives' metrics on the full batch,
    per-example ones averaged over micro-batches).
  """
  k_steps = int(accum_steps)
  combine.check_batch(objectives, batch)
  global_objs = [o for o in objectives if o.batch_global]
  local_objs = [o for o in objectives if not o.batch_global]
  to_cache = cached_output_names(objectives)
  micro = split_microbatches(batch, k_steps)
  extra = jax.lax.stop_gradient(dict(extra_outputs or {}))
  extra_micro = split_microbatches(extra, k_steps)  # [K, b, ...]; scalars [K].
  whole = jax.lax.stop_gradient(dict(state_outputs or {}))
  keys = jax.vmap(lambda k: jax.random.fold_in(rng, k))(jnp.arange(k_steps))

  def forward(p, mb, key):
    return model.apply({"params": p}, mb, train=train, rngs={"dropout": key})

  # Pass 1: the non-scalar outputs batch-global objectives read, every micro-batch,
  # without gradient.
  def embed(xs):
    mb, key = xs
    out = forward(jax.lax.stop_gradient(params), mb, key)
    cached = {k: out[k] for k in to_cache if k in out and jnp.ndim(out[k]) > 0}
    micro_b = next(x.shape[0] for x in jax.tree.leaves(mb) if jnp.ndim(x))
    for name, v in cached.items():
      if v.shape[0] != micro_b:
        raise ValueError(
            f"Accumulation caches the output '{name}' (read by a batch-global "
            f"objective) per example, but its shape {v.shape} has no leading batch "
            f"axis of {micro_b}.")
    return cached

  cache = {}
  if global_objs:
    cache = jax.lax.stop_gradient(jax.lax.map(embed, (micro, keys)))  # [K, b, ...]

  # Pass 2: micro-batch k with gradient, its outputs substituted into the cache.
  local_weights = {o.name: o.weight / k_steps for o in local_objs}

  def loss_k(p, k, mb, key, extra_k):
    out = dict(forward(p, mb, key), **extra_k, **whole)
    results = {}
    if global_objs:
      full = {name: merge_microbatches(cache[name].at[k].set(out[name]))
              for name in cache}
      full.update(extra)
      full.update(whole)
      # Scalar outputs (logit_scale/bias) enter each of the K steps' global loss.
      full.update({name: _scale_grad(v, 1.0 / k_steps) for name, v in out.items()
                   if name not in full and jnp.ndim(v) == 0})
      for obj in global_objs:
        results[obj.name] = combine.call(obj, full, batch)
    for obj in local_objs:
      results[obj.name] = combine.call(obj, out, mb)
    total, _ = combine.combine(objectives, results, out, weights=local_weights)
    scalars = {n: out[n] for n in combine.SCALAR_METRICS if n in out}
    return total, (results, scalars)

  grad_fn = jax.grad(loss_k, has_aux=True)

  def body(acc, xs):
    k, mb, key, extra_k = xs
    grads, aux = grad_fn(params, k, mb, key, extra_k)
    acc = jax.tree.map(lambda a, g: a + g.astype(jnp.float32), acc, grads)
    return acc, aux

  acc0 = jax.tree.map(lambda p: jnp.zeros_like(p, dtype=jnp.float32), params)
  acc, (results, scalars) = jax.lax.scan(
      body, acc0, (jnp.arange(k_steps), micro, keys, extra_micro))
  grads = jax.tree.map(lambda g, p: g.astype(p.dtype), acc, params)

  # Batch-global objectives' values (and the scalar outputs) are the same in every
  # step: report the last. Per-example ones are averaged over the micro-batches.
  def last(tree):
    return jax.tree.map(lambda v: v[-1], tree)

  def mean(tree):
    return jax.tree.map(lambda v: jnp.mean(v, axis=0), tree)

  reduced = {o.name: (last if o.batch_global else mean)(results[o.name])
             for o in objectives}
  _, metrics = combine.combine(objectives, reduced, last(scalars))
  return grads, metrics
