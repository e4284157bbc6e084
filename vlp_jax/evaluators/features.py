"""Frozen image features of labelled splits, for the few-shot and linear-probe
evaluators: the model's image embedding (`predict_fns['embed_image']`) of every
labelled example (label >= 0) of `cfg.source` in a split."""
from typing import NamedTuple

import numpy as np

from vlp_jax import errors
from vlp_jax.evaluators import common


class Features(NamedTuple):
  """Image features [N, D] float32, their labels [N] int64, and the class count."""
  x: np.ndarray
  y: np.ndarray
  num_classes: int


def labelled_features(predict_fns, params, cfg, split: str, size: int,
                      where: str) -> Features:
  """Embeds the labelled examples of `cfg.source` split `split` (first `size`,
  0 = all); the class count is the source's, else the largest label + 1."""
  from vlp_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  examples, source = pipeline.eval_examples(cfg.source, split, size, cfg.data)
  labels = np.array([e.get("label", -1) for e in examples], np.int64)
  keep = np.nonzero(labels >= 0)[0]
  if not keep.size:
    raise errors.DataError(
        f"{where}: source '{cfg.source}' split '{split}' has no labelled examples "
        "(a 'label' field >= 0); use a classification source, e.g. 'shapes:classes', "
        "'tfds:cifar10' or 'imagefolder:DIR/{split}'.")
  images = np.stack([examples[i]["image"] for i in keep])
  x = common.run_padded(predict_fns["embed_image"], params, images, cfg.batch_size)
  names = getattr(source, "class_names", None)
  num_classes = len(names) if names is not None else int(labels.max()) + 1
  return Features(np.asarray(x, np.float32), labels[keep], num_classes)


def train_and_test(predict_fns, params, cfg, where: str):
  """(train, test) features of `cfg.train_split` (first `cfg.train_size`) and
  `cfg.split` (first `cfg.size`), both with the larger of their class counts."""
  train = labelled_features(predict_fns, params, cfg, cfg.train_split,
                            cfg.train_size, where)
  test = labelled_features(predict_fns, params, cfg, cfg.split, cfg.size, where)
  num_classes = max(train.num_classes, test.num_classes)
  return (train._replace(num_classes=num_classes),
          test._replace(num_classes=num_classes))


def moments(train: np.ndarray):
  """(mean, std + 1e-5) of each feature of `train`, as [1, D] rows."""
  return train.mean(axis=0, keepdims=True), train.std(axis=0, keepdims=True) + 1e-5


def standardize(train: np.ndarray, *others: np.ndarray):
  """(train, *others) with each feature scaled by the train mean and std (+1e-5)."""
  mean, std = moments(train)
  return tuple((a - mean) / std for a in (train,) + others)
