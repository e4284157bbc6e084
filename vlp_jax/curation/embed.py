"""A trained workdir's model, and the image and caption embeddings of a source's records.

`load_model(workdir)` reads the run's config.json and newest good checkpoint (as
`--mode=eval` does: `train.loop.eval_params`) and returns the jitted predict fns.
`embed_records` reads every record in order (threads), embeds its image and each of
its captions in fixed-size batches, and scores the record by the mean cosine
similarity of its image with its captions (a record's captions are all trained on).
"""
import concurrent.futures
import time
from typing import List, NamedTuple, Optional

import jax
import ml_collections
import numpy as np
from absl import logging

from vlp_jax import errors
from vlp_jax.curation import filters
from vlp_jax.train import saved_config


class Model(NamedTuple):
  config: ml_collections.ConfigDict
  params: object
  step: int
  predict_fns: dict
  mesh: object  # The jitted fns run under it (`jax.set_mesh`).


class Embedded(NamedTuple):
  image: np.ndarray   # [N, D] float32, L2-normalised (zeros for unreadable records)
  score: np.ndarray   # [N] float32 mean image-caption cosine (-inf when unreadable)
  readable: np.ndarray  # [N] bool
  captions: List[List[str]]  # each record's captions ([] when unreadable)


def load_model(workdir: str, step: Optional[int] = None) -> Model:
  """The run's model, parameters (checkpoint `step`, default the newest) and
  predict fns. ConfigError when the model has no image and text embeddings."""
  config = saved_config.load(workdir)  # Before the imports below: a quick error.
  from vlp_jax import models  # pylint: disable=g-import-not-at-top
  produced = models.output_names(config.model)
  if not {"image_emb", "text_emb"} <= produced:
    switch = models.output_switch(config.model.name, "image_emb")
    raise errors.ConfigError(
        f"The model of '{workdir}' ('{config.model.name}') has no image and text "
        "embeddings under its config" + (f" (it needs {switch})" if switch else "") +
        "; curation scores image-text pairs with a contrastive model.")
  exp, params, got, where = saved_config.load_experiment(config, workdir, step)
  logging.info("Curating with %s.", where)
  return Model(config, params, got, exp.predict_fns, exp.mesh)


def _read(source, transform, i):
  from vlp_jax.data import robust  # pylint: disable=g-import-not-at-top
  element = transform(source[i])
  return None if robust.is_bad(element) else element


def embed_records(model: Model, source, batch_size: int = 256, workers: int = 4,
                  log_every: int = 50) -> Embedded:
  """Embeds every record of `source` (a `robust.SafeSource`) in order."""
  from vlp_jax.data import robust, transforms  # pylint: disable=g-import-not-at-top
  from vlp_jax.evaluators import common  # pylint: disable=g-import-not-at-top
  d = model.config.data
  transform = robust.safe_transform(transforms.EvalTransform(d.image_size,
                                                             d.normalization))
  fns, n = model.predict_fns, len(source)
  images, scores, readable, captions = [], [], np.zeros(n, bool), []
  start_time = time.time()
  with concurrent.futures.ThreadPoolExecutor(max(1, workers)) as pool, \
      jax.set_mesh(model.mesh):
    for b, start in enumerate(range(0, n, batch_size)):
      ids = range(start, min(n, start + batch_size))
      elements = list(pool.map(lambda i: _read(source, transform, i), ids))
      ok = [e is not None for e in elements]
      readable[start:start + len(ids)] = ok
      good = [e for e in elements if e is not None]
      texts = [e["text"] for e in good]
      captions += [list(e["text"]) if e is not None else [] for e in elements]
      img = np.zeros((len(ids), 0), np.float32)
      score = np.full(len(ids), -np.inf, np.float32)
      if good:
        emb = common.run_padded(fns["embed_image"], model.params,
                                np.stack([e["image"] for e in good]), batch_size)
        emb = filters.normalize(emb)
        flat = [t for ts in texts for t in ts]
        owner = np.repeat(np.arange(len(good)), [len(ts) for ts in texts])
        txt = filters.normalize(common.embed_texts(fns, model.params, flat, batch_size))
        cos = np.einsum("nd,nd->n", emb[owner], txt)
        mean = np.bincount(owner, cos, len(good)) / np.maximum(
            np.bincount(owner, minlength=len(good)), 1)
        img = np.zeros((len(ids), emb.shape[1]), np.float32)
        img[np.array(ok)] = emb
        score[np.array(ok)] = mean
      images.append(img)
      scores.append(score)
      if log_every and (b + 1) % log_every == 0:
        done = start + len(ids)
        logging.info("Embedded %d/%d records (%.0f records/s).", done, n,
                     done / max(time.time() - start_time, 1e-9))
  dim = max((a.shape[1] for a in images), default=0)
  image = np.concatenate([np.pad(a, ((0, 0), (0, dim - a.shape[1]))) for a in images])
  return Embedded(image, np.concatenate(scores), readable, captions)

