"""Workdir + source -> curated index file, optional ArrayRecord shards, report.

    OUT/index.json, OUT/index.npy   the `index:` source (`data/sources_index.py`)
    OUT/scores.npz                  per record: score, readable, keep, cluster
    OUT/report/counts.json|md       records entering / leaving each rule
    OUT/report/scores.png           score histogram, kept vs dropped
    OUT/report/examples.png         kept and dropped pairs with their captions
    OUT/shards/train-*              (with `shards`) the kept records as ArrayRecord
"""
import os
from typing import Dict, Optional

import numpy as np
from absl import logging

from vlp_jax import errors
from vlp_jax.curation import embed, report, rules
from vlp_jax.data import transforms

EXAMPLES = 8  # Of each kind (kept / dropped) in the example grid.


def _corruption(source) -> Optional[np.ndarray]:
  """[N] bool of records whose captions are known to be corrupted (a `NoisyCaptions`
  source, e.g. 'shapes:hard,noisy=0.3'), else None."""
  corrupted = getattr(source, "corrupted", None)
  return None if corrupted is None else np.asarray(corrupted, bool)


def _examples(source, keep, dropped_by, scores, captions, count, corrupted=None):
  """`count` kept (highest scores) and `count` dropped (lowest scores) examples."""
  from vlp_jax.curation import filters  # pylint: disable=g-import-not-at-top
  order = filters.rank_order(np.where(np.isfinite(scores), scores, -np.inf))
  kept = [i for i in order if keep[i]][:count]
  dropped = [i for i in order[::-1] if not keep[i] and captions[i]][:count]
  out = []
  for i in kept + dropped:
    element = source[int(i)]
    if "_bad" in element:
      continue
    out.append({"image": transforms.as_image_u8(element["image"]),
                "caption": captions[i][0],
                "score": float(scores[i]),
                "status": "kept" if keep[i] else f"dropped: {dropped_by[i]}",
                "corrupted": corrupted is not None and bool(corrupted[i])})
  return out


def write_shards(source, indices, out_dir: str, num_shards: int):
  """The records `indices` of `source` as ArrayRecord shards (PNG images, their
  captions, label and key) -> the glob for `arrayrecord:`."""
  import io  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from vlp_jax.data import sources_arrayrecord  # pylint: disable=g-import-not-at-top

  def records():
    for i in indices:
      element = source[int(i)]
      buf = io.BytesIO()
      Image.fromarray(transforms.as_image_u8(element["image"])).save(buf, format="PNG")
      fields = {k: element[k] for k in ("label", "key") if k in element}
      yield sources_arrayrecord.encode_record(buf.getvalue(), element["text"], **fields)

  pattern = os.path.join(out_dir, "train")
  sources_arrayrecord.write_shards(records(), pattern, num_shards)
  return f"{pattern}-*-of-{num_shards:05d}"


def run(workdir: str, out: str, options: rules.Options, source_spec: str = "",
        split: str = "train", size: int = -1, seed: int = -1, step: Optional[int] = None,
        batch_size: int = 256, workers: int = 4, shards: int = 0,
        devices=None, overwrite: bool = False) -> Dict:
  """Curates `source_spec` (default the run's config.data.source; size / seed -1:
  the run's config.data.size / config.seed; the seed also seeds k-means) with the
  model of `workdir`. An existing OUT/index.json is a ConfigError unless
  `overwrite`. Returns the summary written to OUT/report/counts.json."""
  from vlp_jax.data import robust, sources, sources_index  # pylint: disable=g-import-not-at-top
  rules.check(options)
  index_file = os.path.join(out, "index.json")
  sources_index.check_writable(index_file, overwrite)
  model = embed.load_model(workdir, step)
  c = model.config
  spec = source_spec or c.data.source
  size = c.data.size if size < 0 else size
  seed = c.seed if seed < 0 else seed
  options = options._replace(seed=seed)  # k-means is seeded like the data.
  if spec.partition(":")[0] in ("wds", "index"):
    raise errors.ConfigError(
        f"Curate the source itself, not '{spec}': 'wds:' shards are streamed (convert "
        "them with tools/build_arrayrecord.py first) and an 'index:' source is already "
        "a selection.")
  raw = sources.make_source(spec, split, size, seed, c.data.image_size)
  source = robust.SafeSource(raw, spec)
  n = len(source)
  rules.check(options, n)
  logging.info("Embedding %d records of '%s' (%s) with %s step %d.", n, spec, split,
               workdir, model.step)
  emb = embed.embed_records(model, source, batch_size, workers)
  result = rules.apply(emb.image, emb.score, emb.readable, options, devices)
  kept = np.nonzero(result.keep)[0]
  if not len(kept):
    raise errors.DataError(
        f"No record of '{spec}' ({split}) survives the rules {result.counts}; loosen "
        "them (a lower --min_similarity, a larger --keep_fraction, ...).")
  summary = {"source": spec, "split": split, "workdir": os.path.abspath(workdir),
             "step": int(model.step), "total": n, "kept": int(len(kept)),
             "rules": result.counts, "options": options._asdict()}
  corrupted = _corruption(raw)
  if corrupted is not None:
    summary["corruption"] = report.corruption_scores(result.keep, corrupted)
  os.makedirs(out, exist_ok=True)
  index_path = sources_index.write_index(
      index_file, kept, spec, split, n, seed, overwrite=overwrite, rules=result.counts, workdir=summary["workdir"], step=summary["step"])
  np.savez(os.path.join(out, "scores.npz"), score=emb.score, readable=emb.readable,
           keep=result.keep, cluster=(result.clusters if result.clusters is not None
                                      else np.full(n, -1)))
  report_dir = os.path.join(out, "report")
  report.write_counts(report_dir, summary)
  report.score_histogram(os.path.join(report_dir, "scores.png"), emb.score, result.keep,
                         corrupted)
  report.example_grid(os.path.join(report_dir, "examples.png"),
                      _examples(source, result.keep, result.dropped_by, emb.score,
                                emb.captions, EXAMPLES, corrupted),
                      f"{spec} ({split}): kept (highest scores) and dropped (lowest)")
  summary["index"] = index_path
  if shards:
    summary["shards"] = write_shards(source, kept, os.path.join(out, "shards"), shards)
  logging.info("Kept %d of %d records: train on them with "
               "--config.data.source=index:%s", len(kept), n, index_path)
  return summary
