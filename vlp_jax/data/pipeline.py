"""Grain pipelines: source(s) -> shuffle(seed) -> repeat -> transform -> per-host batches."""
import collections
import functools

import grain
from absl import logging

from vlp_jax import batch_plan, errors
from vlp_jax.data import (batches, mixture, ref_probs, robust, sources, sources_wds,
                          templates, tokenizers, transforms, views)


def _train_transform(config, tokenizer, **labels):
  """The training transform; `labels` (class_names, class_templates, label_offset) make
  it turn a classification source's labels into prompt captions."""
  d = config.data
  if d.get("normalize_on_device"):  # uint8 images; TrainSetup.global_batch normalises.
    labels["normalize_on_host"] = False
  return robust.safe_transform(transforms.TrainTransform(
      tokenizer, d.image_size, config.model.text.context_length, d.normalization,
      crop_scale=tuple(d.crop_scale), flip=d.flip, clean_captions=True,
      captions_per_image=d.captions_per_image, image_views=views.image_views(d),
      text_views=views.text_views(d), **labels))


def _component_transforms(config, tokenizer, specs, component_sources):
  """One train transform per mixture component. A classification source's labels
  become 1 + class + the classes of the classification components before it, and its
  captions prompts from config.data.class_templates (resolved per component)."""
  out, offset = [], 0
  for (spec, _), source in zip(specs, component_sources):
    labels = {}
    if source is not None and sources.is_classification(source):
      found = templates.class_templates(config.data.class_templates, spec, source)
      names = tuple(source.class_names)
      logging.info("Training source '%s': classification data, %d classes (batch labels "
                   "%d..%d), %d prompt templates from %s.", spec, len(names), offset + 1,
                   offset + len(names), len(found.templates), found.origin)
      labels = dict(class_names=names, class_templates=found, label_offset=offset)
      offset += len(names)
    out.append(_train_transform(config, tokenizer, **labels))
  return out


def _component_seed(seed: int, k: int) -> int:
  return (seed + 1000003 * k) % 2**32


def _is_streamed(spec: str) -> bool:
  return spec.partition(":")[0] == "wds"


def train_dataset(config, tokenizer, plan=None) -> grain.IterDataset:
  """The infinite, deterministic training stream of this process's batches.

  Each batch holds `batches.BATCH_KEYS`: 'image', 'text', and int32 [B] 'label' (0 for
  caption data, 1 + class + offset for classification data), 'data_type' (0 / 1) and
  'image_id' (hash of the source example's key). With config.data.captions_per_image
  k > 1 every source example gives k consecutive rows (k captions, k crops, one
  image_id); k must divide B/P. config.data.views / .text_views add each row's extra
  views ('views/NAME' [B, count, S, S, 3], 'view_boxes/NAME' [B, count, 4],
  'text_views/NAME' [B, L]; `views.py`), with the same guarantees as below.

  Random-access sources (and mixtures of them): global batch b holds elements
  b*B/k .. (b+1)*B/k-1 of the shuffled, repeated, transformed stream, process p builds
  rows p*B/P .. (p+1)*B/P-1, and a bad record is replaced by a seeded spare of its
  source (`batches.py`), so batches are identical for any worker and process count.
  Streamed (`wds:`) sources drop bad records instead; their batches are identical for
  the same seed, process count and worker count. Each batch carries running bad-record counts as
  `_bad_counts` / `_seen` (pop them with `split_bad_counts`); the iterator's state
  (`get_state`/`set_state`) is saved with every checkpoint.

  `plan` (a `batch_plan.BatchPlan`, default: from the config and process count) gives
  the global batch and this process's rows.
  """
  plan = plan or batch_plan.for_processes(config)
  d = config.data
  templates.check_class_templates(d.class_templates)
  mixture.check_captions_per_image(d.captions_per_image, plan.per_process,
                                   plan.process_count, plan.global_batch)
  specs = mixture.train_specs(d)
  name = d.source if len(specs) == 1 and not d.mixture else "mixture(" + ", ".join(
      f"{s}={w:g}" for s, w in specs) + ")"
  component_sources = [None if _is_streamed(spec) else _train_source(config, spec)
                       for spec, _ in specs]
  component_transforms = _component_transforms(config, tokenizer, specs,
                                               component_sources)
  components = list(zip(specs, component_sources, component_transforms))
  if any(_is_streamed(s) for s, _ in specs):
    stream = _streamed_batches(config, components, plan)
  else:
    stream = _random_access_batches(config, components, plan)
  if d.get("ref_probs"):  # PRIOR's precomputed 'ref_probs' [B, L] (data/ref_probs.py).
    ref_probs.Table(d.ref_probs).check(d.tokenizer, config.model.text.context_length)
    stream = stream.map(ref_probs.Attach(d.ref_probs))
  if d.worker_count > 0:
    stream = stream.mp_prefetch(grain.MultiprocessingOptions(num_workers=d.worker_count))
  return robust.BadRecordMonitor(stream, name, d.max_bad_fraction)


def _train_source(config, spec):
  """The training split of random-access `spec`, bad records as markers."""
  d = config.data
  return robust.SafeSource(
      sources.make_source(spec, "train", d.size, config.seed, d.image_size), spec)


def _shuffled(source, seed):
  """`source` shuffled with `seed` (reshuffled every epoch) and repeated."""
  return grain.MapDataset.source(source).seed(seed).shuffle().repeat()


def _random_access_batches(config, components, plan):
  parts = []
  for k, ((spec, _), source, transform) in enumerate(components):
    seed = _component_seed(config.seed, k)
    ds = _shuffled(source, seed).random_map(transform)
    parts.append(batches.ReplaceBad(ds, len(source), seed, spec))
  elements = parts[0] if len(parts) == 1 else grain.MapDataset.mix(
      parts, [w for (_, w), _, _ in components])
  ds = batches.ProcessBatches(elements, plan, config.data.captions_per_image)
  prefetch = max(1, config.data.prefetch)
  return ds.to_iter_dataset(grain.ReadOptions(num_threads=prefetch,
                                              prefetch_buffer_size=prefetch))


def _streamed_batches(config, components, plan):
  d = config.data
  parts = []
  for k, ((spec, _), source, transform) in enumerate(components):
    seed = _component_seed(config.seed, k)
    if source is None:
      ds = sources_wds.open_wds(spec.partition(":")[2], seed, d.shuffle_buffer,
                                plan.process_index, plan.process_count)
    else:
      ds = _shuffled(source, seed)
      ds = ds[plan.process_index::plan.process_count].to_iter_dataset()
    ds = ds.random_map(transform, seed=seed)
    parts.append(ds.map(functools.partial(robust.tag_source, spec)))
  elements = parts[0] if len(parts) == 1 else grain.IterDataset.mix(
      parts, [w for (_, w), _, _ in components])
  rows = d.captions_per_image
  return robust.DropBad(elements).batch(
      plan.per_process // rows, drop_remainder=True,
      batch_fn=functools.partial(batches.collate, rows_per_element=rows))


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
