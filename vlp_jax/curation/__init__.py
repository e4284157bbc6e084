"""Data curation with a trained model's embeddings (tools/curate.py; README "Data
curation"): image-text similarity filtering, near-duplicate removal and TL;DR-style
balanced selection over k-means clusters, written as an index file that the
pipeline reads as the `index:` source (vlp_jax/data/sources_index.py).

  kmeans.py   k-means in JAX, row-sharded over any device count
  filters.py  similarity filter, blockwise near-duplicate removal
  select.py   balanced per-cluster quotas, 'score' / 'strided' choice within clusters
  rules.py    the rules in order -> keep mask, per-rule counts
  embed.py    a workdir's model; image / caption embeddings and scores of a source
  report.py   counts (JSON, markdown), score histogram, example grid
  curate.py   all of it: workdir + source -> index file, shards, report
"""
