"""Grain pipelines: source -> shuffle(seed) -> repeat -> transform -> per-host batches."""
import collections

import grain
import jax
from absl import logging

from vlp_jax.data import robust, sources, tokenizers, transforms


def per_process_batch_size(global_batch: int) -> int:
  n = jax.process_count()
  if global_batch % n:
    raise ValueError(f"batch_size {global_batch} is not divisible by the number of "
                     f"processes ({n}).")
  return global_batch // n


def train_dataset(config, tokenizer) -> grain.IterDataset:
  """The infinite, deterministic training stream of this process's batches.

  Process p reads elements p, p + P, ... of the shuffled stream. Records that cannot
  be read or transformed are dropped and counted (`robust.py`); each batch carries the
  running counts as `_bad_counts` / `_seen` (pop them with `split_bad_counts`). The
  iterator's state (`get_state`/`set_state`) is saved with every checkpoint.
  """
  d = config.data
  source = robust.SafeSource(
      sources.make_source(d.source, "train", d.size, config.seed, d.image_size), d.source)
  ds = grain.MapDataset.source(source).seed(config.seed).shuffle().repeat()
  ds = ds.random_map(robust.safe_transform(transforms.TrainTransform(
      tokenizer, d.image_size, config.model.text.context_length, d.normalization,
      crop_scale=tuple(d.crop_scale), flip=d.flip, clean_captions=True)))
  # After random_map, so an element's augmentation does not depend on process count.
  ds = ds[jax.process_index()::jax.process_count()]
  iter_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=max(1, d.prefetch),
                                                 prefetch_buffer_size=d.prefetch))
  iter_ds = robust.DropBad(iter_ds, d.source, d.max_bad_fraction)
  iter_ds = iter_ds.batch(per_process_batch_size(config.batch_size), drop_remainder=True)
  if d.worker_count > 0:
    iter_ds = iter_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=d.worker_count))
  return iter_ds


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
    raise ValueError(f"Evaluation source '{spec}' ({split}) has no readable examples.")
  return examples, source


def make_tokenizer(data_cfg):
  return tokenizers.get_tokenizer(data_cfg.tokenizer)
