"""TFDS datasets read through `tfds.data_source` (random access, no TensorFlow needed).

Spec: 'tfds:NAME[/CONFIG][:SPLIT][?options]', e.g. 'tfds:cifar10:test',
'tfds:coco_captions:train', 'tfds:eurosat/rgb:train[:80%]'. Without ':SPLIT' the
split the caller asks for ('train', 'validation', ...) is used. Options (URL-query
style, joined by '&'):

  data_dir=DIR         default: $TFDS_DATA_DIR, else TFDS's own default
  image_key=KEY        default: 'image'
  text_key=KEY         default: per dataset, else the first of caption, captions,
                       text, label present
  classnames=FILE      class names for a label field, one per line (or a JSON list);
                       default: the dataset's label names (WordNet ids for imagenet2012)
  download=true        prepare the dataset if it is missing (default: fail instead)

The dataset must be prepared in a random-access format (ArrayRecord), e.g.
`tfds build NAME --file_format=array_record --data_dir=DIR`.

Label fields become text = class name and the source gains `class_names` for zero-shot
evaluation (whose prompt templates are the evaluator's option) and `classification`:
in training its labels become prompt captions (config.data.class_templates).
"""
import json
import os
from typing import Any, Dict, List

import numpy as np

from vlp_jax import errors
from vlp_jax.data import sources_files
from vlp_jax.registry import SOURCES

# Dataset name -> its caption/label field, where the generic lookup would not do.
KNOWN_TEXT_KEYS = {
    "coco_captions": "captions",
    "imagenet2012": "label",
    "imagenet_v2": "label",
    "imagenet2012_real": "original_label",
    "cifar10": "label",
    "cifar100": "label",
    "food101": "label",
    "oxford_iiit_pet": "label",
    "oxford_flowers102": "label",
    "caltech101": "label",
    "dtd": "label",
    "eurosat": "label",
    "stl10": "label",
    "sun397": "label",
    "cars196": "label",
}
TEXT_KEYS = ("caption", "captions", "text", "label")
OPTIONS = ("data_dir", "image_key", "text_key", "classnames", "download")


def parse_arg(arg: str, split: str):
  """'NAME[/CONFIG][:SPLIT][?opts]' -> (name, split, options)."""
  arg, options = sources_files.split_options(arg or "", "tfds", OPTIONS)
  name, sep, spec_split = arg.partition(":")
  if not name:
    raise errors.ConfigError("The tfds source needs a dataset: 'tfds:NAME[/CONFIG][:SPLIT]', "
                     "e.g. 'tfds:cifar10:test'.")
  return name, (spec_split if sep and spec_split else split), options


def _as_str(x) -> str:
  return x.decode("utf-8") if isinstance(x, bytes) else str(x)


def _as_texts(value):
  """A caption field (str, bytes, list/array of them, or {'text': ...}) -> str | [str]."""
  if isinstance(value, dict):
    if "text" not in value:
      raise ValueError(f"Caption field has no 'text' entry (keys: {sorted(value)}).")
    value = value["text"]
  if isinstance(value, (str, bytes)):
    return _as_str(value)
  if isinstance(value, np.ndarray) and value.ndim == 0:
    return _as_str(value.item())
  return [_as_str(v) for v in value]


def _load_names(path: str) -> List[str]:
  if not os.path.isfile(path):
    raise errors.DataPathError(f"Class names file not found: '{path}' (tfds option "
                            "'classnames=FILE': one name per line, or a JSON list).")
  with open(path, encoding="utf-8") as f:
    if path.endswith(".json"):
      return [str(n) for n in json.load(f)]
    return [line.strip() for line in f if line.strip()]


class TfdsSource:
  """Image-text (or image-label) examples of one TFDS split."""

  def __init__(self, name: str, split: str, data_dir=None, image_key="image",
               text_key=None, classnames=None, download=False, size=0):
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    self.name, self.split = name, split
    data_dir = data_dir or os.environ.get("TFDS_DATA_DIR") or None
    shown_dir = data_dir or "the TFDS default (~/tensorflow_datasets)"
    try:
      self._source = tfds.data_source(name, split=split, data_dir=data_dir,
                                      download=download)
    except Exception as e:  # pylint: disable=broad-except
      reason = str(e).split("Possible root causes")[0].strip()
      reason = reason.splitlines()[0].rstrip(".") if reason else repr(e)
      raise errors.DataError(
          f"Cannot open TFDS dataset '{name}' split '{split}' in {shown_dir} ({reason}). "
          "Check the name and split; the dataset must be prepared in ArrayRecord format: "
          f"`tfds build {name} --file_format=array_record --data_dir=DIR`, then set "
          f"TFDS_DATA_DIR=DIR or pass 'tfds:{name}:SPLIT?data_dir=DIR'.") from e
    features = self._source.dataset_info.features
    keys = list(features.keys())
    base = name.split("/")[0]
    text_key = text_key or KNOWN_TEXT_KEYS.get(base)
    if text_key is None:
      text_key = next((k for k in TEXT_KEYS if k in keys), None)
    missing = [k for k in (image_key, text_key) if k is None or k not in keys]
    if missing:
      raise errors.DataError(
          f"TFDS dataset '{name}' has no {' / '.join(repr(k) for k in missing if k)}"
          f"{' caption/label' if text_key is None else ''} field (fields: {keys}). Name "
          f"them with 'tfds:{name}:{split}?image_key=KEY&text_key=KEY'.")
    self.image_key, self.text_key = image_key, text_key
    names = getattr(features[text_key], "names", None)
    self.is_label = names is not None
    self.classification = self.is_label
    if classnames:
      names = _load_names(classnames)
    if self.is_label:
      num = features[text_key].num_classes
      if len(names) != num:
        raise errors.DataError(f"'{classnames}' lists {len(names)} class names; TFDS dataset "
                         f"'{name}' has {num} classes.")
      self.class_names = [n.replace("_", " ") for n in names]
    total = len(self._source)
    self.size = min(size, total) if size else total

  def __len__(self):
    return self.size

  def __getitem__(self, i) -> Dict[str, Any]:
    i = int(i)
    if not 0 <= i < self.size:
      raise IndexError(f"index {i} out of range for {self.size} examples.")
    ex = self._source[i]
    image = np.asarray(ex[self.image_key], dtype=np.uint8)
    if image.ndim == 2:
      image = image[..., None]
    if image.shape[-1] == 1:
      image = np.repeat(image, 3, axis=-1)
    elif image.shape[-1] == 4:
      image = image[..., :3]
    out = {"image": image, "key": f"{self.name}/{self.split}/{i}"}
    if self.is_label:
      label = int(ex[self.text_key])
      out.update(label=label, text=self.class_names[label])
    else:
      out["text"] = _as_texts(ex[self.text_key])
    return out


@SOURCES.register("tfds")
def make_tfds_source(path, split="train", size=0, **unused):
  """'tfds:NAME[/CONFIG][:SPLIT][?options]' (see the module docstring)."""
  name, split, options = parse_arg(path, split)
  download = options.pop("download", "false").lower() in ("1", "true", "yes")
  return TfdsSource(name, split, download=download, size=size, **options)
