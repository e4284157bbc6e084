"""Grain pipelines: source -> shuffle(seed) -> repeat -> transform -> per-host batches."""
import grain
import jax
import numpy as np

from vlp_jax.data import sources, tokenizers, transforms


def per_process_batch_size(global_batch: int) -> int:
  n = jax.process_count()
  if global_batch % n:
    raise ValueError(f"batch_size {global_batch} is not divisible by the number of "
                     f"processes ({n}).")
  return global_batch // n


def train_dataset(config, tokenizer) -> grain.IterDataset:
  """The infinite, deterministic training stream of this process's batches.

  Its iterator's state (`get_state`/`set_state`) is saved with every checkpoint.
  """
  d = config.data
  source = sources.make_source(d.source, "train", d.size, config.seed, d.image_size)
  ds = grain.MapDataset.source(source).seed(config.seed).shuffle().repeat()
  ds = ds.random_map(transforms.TrainTransform(
      tokenizer, d.image_size, config.model.text.context_length, d.normalization))
  # Process p reads rows [p*b, (p+1)*b) of every global batch: consecutive chunks of
  # b examples, every P-th one. Elements are only read (and decoded) by their owner,
  # and the global batch is the same whatever the number of processes.
  ds = ds.batch(per_process_batch_size(config.batch_size), drop_remainder=True)
  ds = ds[jax.process_index()::jax.process_count()]
  iter_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=max(1, d.prefetch),
                                                 prefetch_buffer_size=d.prefetch))
  if d.worker_count > 0:
    iter_ds = iter_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=d.worker_count))
  return iter_ds


def eval_examples(spec: str, split: str, size: int, data_cfg, seed: int = 0):
  """Yields evaluation examples (normalised image + raw captions/fields) in order."""
  source = sources.make_source(spec, split, size, seed, data_cfg.image_size)
  n = min(size, len(source)) if size else len(source)
  ds = grain.MapDataset.source(source)[:n].map(
      transforms.EvalTransform(data_cfg.image_size, data_cfg.normalization))
  return ds, source


def eval_batches(ds, batch_size: int):
  """Groups an eval MapDataset into lists of examples plus stacked images."""
  for start in range(0, len(ds), batch_size):
    examples = [ds[i] for i in range(start, min(start + batch_size, len(ds)))]
    yield examples, np.stack([e["image"] for e in examples])


def make_tokenizer(data_cfg):
  return tokenizers.get_tokenizer(data_cfg.tokenizer)
