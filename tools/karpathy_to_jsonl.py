"""Karpathy-split annotations (dataset_coco.json, dataset_flickr30k.json) -> jsonl.

Writes one line per image, {"image": PATH, "caption": [its captions]}, for the images
of the chosen split(s), in the file's order: the `jsonl:` source reads it and the
retrieval evaluator scores each image against all its captions (5 for COCO and
Flickr30k). Image paths are IMAGES_ROOT/[filepath/]filename (COCO entries carry a
`filepath` such as 'val2014'), written relative to the output file's folder.

    .venv/bin/python tools/karpathy_to_jsonl.py --input=/data/dataset_coco.json \\
        --images_root=/data/coco --split=test --output=/data/coco_karpathy_test.jsonl
    .venv/bin/python tools/karpathy_to_jsonl.py --input=/data/dataset_flickr30k.json \\
        --images_root=/data/flickr30k-images --split=test --output=/data/f30k_test.jsonl

then e.g. --config.evals.retrieval.source=jsonl:/data/coco_karpathy_test.jsonl
(`size`=0 for the whole 5k / 1k test split). `--split=train,restval` joins splits.
"""
import argparse
import json
import os
from typing import Sequence

SPLITS = ("train", "restval", "val", "test")


class ConvertError(ValueError):
  """Input the converter cannot use; the message says what to fix."""


def convert(input_path: str, images_root: str, splits: Sequence[str], output: str,
            check_images: bool = True) -> int:
  """Writes the jsonl for `splits` of `input_path`; returns the number of images."""
  bad = [s for s in splits if s not in SPLITS]
  if bad or not splits:
    raise ConvertError(f"Unknown split(s) {bad or list(splits)}; Karpathy splits are "
                       f"{list(SPLITS)} (join several with ',').")
  if not os.path.isfile(input_path):
    raise ConvertError(f"Annotation file not found: '{input_path}' (the Karpathy "
                       "dataset_coco.json / dataset_flickr30k.json).")
  with open(input_path, encoding="utf-8") as f:
    try:
      data = json.load(f)
    except json.JSONDecodeError as e:
      raise ConvertError(f"'{input_path}' is not valid JSON ({e}).") from None
  images = data.get("images") if isinstance(data, dict) else None
  if not isinstance(images, list):
    raise ConvertError(f"'{input_path}' has no 'images' list: not a Karpathy split "
                       "file (dataset_coco.json / dataset_flickr30k.json).")
  out_dir = os.path.dirname(os.path.abspath(output))
  lines, missing = [], []
  for i, im in enumerate(images):
    try:
      if im["split"] not in splits:
        continue
      name = os.path.join(im.get("filepath", ""), im["filename"])
      captions = [s["raw"].strip() for s in im["sentences"]]
    except (KeyError, TypeError) as e:
      raise ConvertError(f"'{input_path}': image {i} lacks {e} (expected 'split', "
                         "'filename' and 'sentences' with 'raw' captions).") from None
    path = os.path.abspath(os.path.join(images_root, name))
    if check_images and not os.path.isfile(path):
      missing.append(path)
    lines.append({"image": os.path.relpath(path, out_dir), "caption": captions})
  if missing:
    shown = ", ".join(f"'{p}'" for p in missing[:3])
    raise ConvertError(
        f"{len(missing)} of {len(lines)} images not found under '{images_root}' (e.g. "
        f"{shown}). Pass the folder holding them (for COCO the one with val2014/, "
        "for Flickr30k flickr30k-images/ itself), or --nocheck_images.")
  if not lines:
    raise ConvertError(f"'{input_path}' has no images in split(s) {list(splits)}.")
  os.makedirs(out_dir, exist_ok=True)
  with open(output, "w", encoding="utf-8") as f:
    for line in lines:
      f.write(json.dumps(line, ensure_ascii=False) + "\n")
  return len(lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--input", required=True, help="dataset_coco.json or "
                      "dataset_flickr30k.json (Karpathy's splits)")
  parser.add_argument("--images_root", required=True, help="folder the image paths "
                      "are relative to")
  parser.add_argument("--split", default="test", help="test | val | train | restval; "
                      "several joined with ','")
  parser.add_argument("--output", required=True, help="the .jsonl to write")
  parser.add_argument("--nocheck_images", action="store_true",
                      help="do not check that every image file exists")
  args = parser.parse_args()
  try:
    n = convert(args.input, args.images_root, args.split.split(","), args.output,
                check_images=not args.nocheck_images)
  except ConvertError as e:
    parser.exit(2, f"error: {e}\n")
  print(f"{args.output}: {n} images")


if __name__ == "__main__":
  main()
