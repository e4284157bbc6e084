"""Data sources selected by a spec string `NAME[:ARG]`, e.g. 'shapes' or 'jsonl:/d/a.jsonl'.

Every source is random access (`__len__`, `__getitem__`) and yields
{'image': ..., 'text': str | list[str], ...optional fields}, where 'image' is the
encoded bytes for file / record sources (jsonl, csv, imagefolder, arrayrecord, wds;
the transform decodes them, JPEGs at a reduced scale when the crop allows) and a
uint8 [H, W, 3] array for the others; `transforms.as_image_u8` decodes either.

A source is a classification source (`is_classification`) when it has `class_names`
and a truthy `classification` attribute (imagefolder, TFDS label datasets): in training
its examples' 'label' (a class index) becomes a prompt caption and the batch's 'label'
1 + class (+ the classes of earlier mixture components). Other sources are caption
data (batch 'label' 0), whether or not their examples carry a 'label' field.
"""
import json
import os

from vlp_jax import errors
from vlp_jax.data import decode, shapes  # pylint: disable=unused-import  (registers 'shapes')
from vlp_jax.data import sources_arrayrecord, sources_files, sources_tfds, sources_wds  # pylint: disable=unused-import  (register sources)
from vlp_jax.data import sources_index  # pylint: disable=unused-import  (registers 'index')
from vlp_jax.registry import SOURCES


class JsonlSource:
  """BLIP/LLaVA-style annotations: one {"image": path, "caption": str | [str]} per line.

  Relative image paths are resolved against the annotation file's folder.
  """

  def __init__(self, path: str, size: int = 0, **unused):
    if not path:
      raise errors.ConfigError(
          "The jsonl source needs a path: 'jsonl:/path/to/captions.jsonl'.")
    if not os.path.isfile(path):
      sources_files.raise_if_directory(path, "jsonl", (".jsonl",))
      raise errors.DataPathError(
          f"Data file not found: '{path}'. Pass an existing file with "
          "--config.data.source=jsonl:/path/to/captions.jsonl (or use "
          "--config.data.source=shapes for the built-in demo data).")
    root = os.path.dirname(os.path.abspath(path))
    self.records = []
    with open(path) as f:
      for line_no, line in enumerate(f, 1):
        if not line.strip():
          continue
        try:
          rec = json.loads(line)
          image, caption = rec["image"], rec["caption"]
        except (json.JSONDecodeError, KeyError) as e:
          raise errors.DataError(
              f"{path}:{line_no}: expected a JSON object with 'image' and "
              f"'caption' keys ({e}).") from e
        self.records.append((os.path.join(root, image), caption))
    if size:
      self.records = self.records[:size]
    if not self.records:
      raise errors.DataError(f"Data file '{path}' holds no records.")

  def __len__(self):
    return len(self.records)

  def __getitem__(self, i):
    path, caption = self.records[i]
    return {"image": decode.read_file(path), "text": caption, "key": path}


@SOURCES.register("jsonl")
def make_jsonl_source(path, size=0, **unused):
  return JsonlSource(path, size)


def is_classification(source) -> bool:
  """Whether training treats `source`'s examples as classes (see the module docstring)."""
  return bool(getattr(source, "classification", False)) and (
      getattr(source, "class_names", None) is not None)


def make_source(spec: str, split: str, size: int, seed: int, image_size: int):
  """Builds the source named by `spec` ('NAME' or 'NAME:ARG')."""
  name, _, arg = spec.partition(":")
  kwargs = dict(path=arg, split=split, seed=seed, image_size=image_size)
  if size:  # 0 = the source's own size
    kwargs["size"] = size
  return SOURCES.get(name)(**kwargs)
