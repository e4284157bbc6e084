"""Grain pipelines: source(s) -> shuffle(seed) -> repeat -> transform -> per-host batches."""
import collections
import functools

import grain
from absl import logging

from vlp_jax import batch_plan, errors
from vlp_jax.data import batches, mixture, robust, sources, sources_wds, tokenizers, transforms


def _train_transform(config, tokenizer):
  d = config.data
  return robust.safe_transform(transforms.TrainTransform(
      tokenizer, d.image_size, config.model.text.context_length, d.normalization,
      crop_scale=tuple(d.crop_scale), flip=d.flip, clean_captions=True))


def _component_seed(seed: int, k: int) -> int:
  return (seed + 1000003 * k) % 2**32


def _is_streamed(spec: str) -> bool:
  return spec.partition(":")[0] == "wds"


def train_dataset(config, tokenizer, plan=None) -> grain.IterDataset:
  """The infinite, deterministic training stream of this process's batches.

  Random-access sources (and mixtures of them): global batch b holds elements
  b*B .. b*B+B-1 of the shuffled, repeated, transformed stream, process p builds rows
  p*B/P .. (p+1)*B/P-1, and a bad record is replaced by a seeded spare of its source
  (`batches.py`), so batches are identical for any worker and process count.
  Streamed (`wds:`) sources drop bad records instead; their batches are identical for
  the same seed, process count and worker count. Each batch carries running bad-record counts as
  `_bad_counts` / `_seen` (pop them with `split_bad_counts`); the iterator's state
  (`get_state`/`set_state`) is saved with every checkpoint.

  `plan` (a `batch_plan.BatchPlan`, default: from the config and process count) gives
  the global batch and this process's rows.
  """
  plan = plan or batch_plan.for_processes(config)
  d = config.data
  specs = mixture.train_specs(d)
  name = d.source if len(specs) == 1 and not d.mixture else "mixture(" + ", ".join(
      f"{s}={w:g}" for s, w in specs) + ")"
  if any(_is_streamed(s) for s, _ in specs):
    stream = _streamed_batches(config, tokenizer, specs, plan)
  else:
    stream = _random_access_batches(config, tokenizer, specs, plan)
  if d.worker_count > 0:
    stream = stream.mp_prefetch(grain.MultiprocessingOptions(num_workers=d.worker_count))
  return robust.BadRecordMonitor(stream, name, d.max_bad_fraction)


def _shuffled_source(config, spec, seed):
  """(the training split of `spec`, shuffled with `seed` and repeated; its length)."""
  d = config.data
  source = robust.SafeSource(
      sources.make_source(spec, "train", d.size, config.seed, d.image_size), spec)
  return grain.MapDataset.source(source).seed(seed).shuffle().repeat(), len(source)


def _random_access_elements(config, tokenizer, spec, seed):
  ds, size = _shuffled_source(config, spec, seed)
  ds = ds.random_map(_train_transform(config, tokenizer))
  return batches.ReplaceBad(ds, size, seed, spec)


def _random_access_batches(config, tokenizer, specs, plan):
  parts = [_random_access_elements(config, tokenizer, spec, _component_seed(config.seed, k))
           for k, (spec, _) in enumerate(specs)]
  elements = parts[0] if len(parts) == 1 else grain.MapDataset.mix(
      parts, [w for _, w in specs])
  ds = batches.ProcessBatches(elements, plan)
  prefetch = max(1, config.data.prefetch)
  return ds.to_iter_dataset(grain.ReadOptions(num_threads=prefetch,
                                              prefetch_buffer_size=prefetch))


def _streamed_batches(config, tokenizer, specs, plan):
  d = config.data
  parts = []
  for k, (spec, _) in enumerate(specs):
    seed = _component_seed(config.seed, k)
    if _is_streamed(spec):
      ds = sources_wds.open_wds(spec.partition(":")[2], seed, d.shuffle_buffer,
                                plan.process_index, plan.process_count)
    else:
      ds = _shuffled_source(config, spec, seed)[0]
      ds = ds[plan.process_index::plan.process_count].to_iter_dataset()
    ds = ds.random_map(_train_transform(config, tokenizer), seed=seed)
    parts.append(ds.map(functools.partial(robust.tag_source, spec)))
  elements = parts[0] if len(parts) == 1 else grain.IterDataset.mix(
      parts, [w for _, w in specs])
  return robust.DropBad(elements).batch(plan.per_process,
                                        drop_remainder=True, batch_fn=batches.collate)


def split_bad_counts(batch):
  """-> (model batch, {'bad/<kind>': n, ..., 'bad/fraction': f}) for this process."""
  batch = dict(batch)
  counts, seen = robust.summarize({"_bad_counts": batch.pop("_bad_counts"),
                                   "_seen": batch.pop("_seen")})
  stats = {f"bad/{k}": v for k, v in counts.items() if v}
  stats["bad/fraction"] = sum(counts.values()) / max(seen, 1)
  return batch, stats


def eval_examples(spec: str, split: str, size: int, data_cfg, seed: int = 0):
  """(examples, source): the first `size` readable examples (normalised image plus raw
  captions and fields), in order; unreadable ones are skipped with a warning."""
  source = robust.SafeSource(
      sources.make_source(spec, split, size, seed, data_cfg.image_size), spec)
  n = min(size, len(source)) if size else len(source)
  transform = robust.safe_transform(
      transforms.EvalTransform(data_cfg.image_size, data_cfg.normalization))
  examples, bad = [], collections.Counter()
  for i in range(n):
    element = transform(source[i])
    if robust.is_bad(element):
      bad[element["_bad"]] += 1
    else:
      examples.append(element)
  if bad:
    logging.warning("Evaluation source '%s' (%s): skipped %d unreadable records %s.",
                    spec, split, sum(bad.values()), dict(bad))
  if not examples:
    raise errors.DataError(
        f"Evaluation source '{spec}' ({split}) has no readable examples.")
  return examples, source


def make_tokenizer(data_cfg):
  return tokenizers.get_tokenizer(data_cfg.tokenizer)
