"""Curates a data source with a trained run's embeddings -> an `index:` source.

    .venv/bin/python tools/curate.py --workdir=runs/clip --out=runs/curated \
        --keep_fraction=0.7 --dedup_threshold=0.95 --clusters=64 --balance_fraction=0.5
    .venv/bin/python main.py --config=configs/bench.py --workdir=runs/clip_curated \
        --config.data.source=index:runs/curated/index.json

Every record of --source (default: the run's config.data.source, size and seed) is
embedded with the run's newest checkpoint (image, and each caption), scored by its
mean image-caption cosine similarity, then the rules run in this order (each off
unless its flags are given): similarity filter (--keep_fraction of all records and/or
--min_similarity), near-duplicate removal (--dedup_threshold, highest score kept),
TL;DR-style balance (--clusters k-means clusters, --balance_fraction of all records
in --quota=equal|proportional shares, --within_cluster=score|strided). Writes OUT/index.json (+ .npy),
OUT/scores.npz, OUT/report/ (counts.json/.md, scores.png, examples.png) and, with
--shards=N, the kept records as ArrayRecord shards in OUT/shards/.
"""
import os
import sys

from absl import app, flags, logging

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from vlp_jax import cli, errors  # pylint: disable=g-import-not-at-top

# Script: absl's FLAGS; imported (tests): private flags (no clash between tools).
_FLAG_VALUES, _define = cli.tool_flags(__name__)

_WORKDIR = _define(flags.DEFINE_string)("workdir", None, "A trained run (config.json + checkpoints).")
_OUT = _define(flags.DEFINE_string)("out", None, "Output folder (index.json, report/, shards/).")
_STEP = _define(flags.DEFINE_integer)("step", -1, "Checkpoint step (-1: the newest good one).")
_SOURCE = _define(flags.DEFINE_string)("source", "", "Source spec (default: the run's "
                              "config.data.source), e.g. jsonl:/d/a.jsonl, "
                              "arrayrecord:/d/train-*, shapes:hard.")
_SPLIT = _define(flags.DEFINE_string)("split", "train", "Split of the source.")
_SIZE = _define(flags.DEFINE_integer)("size", -1, "Records of the source (0: all; -1: the "
                             "run's config.data.size).")
_SEED = _define(flags.DEFINE_integer)("seed", -1, "Data seed of the source (-1: the run's "
                             "config.seed; the built-in shapes data depends on it) and "
                             "of k-means.")
_BATCH = _define(flags.DEFINE_integer)("batch_size", 256, "Embedding batch size.")
_WORKERS = _define(flags.DEFINE_integer)("workers", 4, "Threads reading records.")
_KEEP = _define(flags.DEFINE_float)("keep_fraction", 0.0, "Similarity rule: keep the top "
                           "fraction of all records by score (0: off).")
_MIN_SIM = _define(flags.DEFINE_float)("min_similarity", None, "Similarity rule: keep records "
                              "scoring >= this cosine (unset: off).")
_DEDUP = _define(flags.DEFINE_float)("dedup_threshold", 0.0, "Near-duplicate rule: image "
                            "cosine >= this is a duplicate (0: off; e.g. 0.95).")
_CLUSTERS = _define(flags.DEFINE_integer)("clusters", 0, "Balance rule: k-means clusters (0: off).")
_BALANCE = _define(flags.DEFINE_float)("balance_fraction", 0.0, "Balance rule: fraction of all "
                              "records kept, shared over the clusters by --quota.")
_WITHIN = _define(flags.DEFINE_enum)("within_cluster", "score", ["score", "strided"],
                            "Balance rule: highest scores of a cluster, or evenly "
                            "spaced members (TL;DR's strided sampling).")
_QUOTA = _define(flags.DEFINE_enum)("quota", "equal", ["equal", "proportional"],
                           "Balance rule: records per cluster: 'equal' shares (small "
                           "clusters whole) or 'proportional' to the cluster's size "
                           "(with --within_cluster=strided: TL;DR's selection).")
_OVERWRITE = _define(flags.DEFINE_bool)("overwrite", False, "Replace an existing OUT/index.json "
                               "(a run may train on it).")
_ITERS = _define(flags.DEFINE_integer)("kmeans_iters", 20, "k-means iterations.")
_INIT = _define(flags.DEFINE_enum)("kmeans_init", "random", ["random", "kmeans++"], "k-means init.")
_SHARDS = _define(flags.DEFINE_integer)("shards", 0, "Also write the kept records as this many "
                               "ArrayRecord shards (0: only the index).")
flags.mark_flags_as_required(["workdir", "out"], flag_values=_FLAG_VALUES)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  from vlp_jax.curation import curate, rules  # pylint: disable=g-import-not-at-top
  logging.set_verbosity(logging.INFO)
  seed = _SEED.value
  options = rules.Options(
      keep_fraction=_KEEP.value, min_similarity=_MIN_SIM.value,
      dedup_threshold=_DEDUP.value, clusters=_CLUSTERS.value,
      balance_fraction=_BALANCE.value, within_cluster=_WITHIN.value,
      kmeans_iters=_ITERS.value, kmeans_init=_INIT.value, quota=_QUOTA.value)
  try:
    summary = curate.run(_WORKDIR.value, _OUT.value, options, _SOURCE.value, _SPLIT.value,
                         _SIZE.value, seed, None if _STEP.value < 0 else _STEP.value,
                         _BATCH.value, _WORKERS.value, _SHARDS.value,
                         overwrite=_OVERWRITE.value)
  except errors.UserError as e:
    print(f"error: {e}", file=sys.stderr, flush=True)
    sys.exit(1)
  print(f"kept {summary['kept']} of {summary['total']} records: "
        f"--config.data.source=index:{summary['index']}")
  if "corruption" in summary:
    c = summary["corruption"]
    print(f"corrupted captions removed: {c['removed_corrupted']} of {c['corrupted']} "
          f"(recall {c['recall']:.3f}, precision {c['precision']:.3f})")


if __name__ == "__main__":
  app.run(main)
