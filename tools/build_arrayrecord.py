"""Converts a jsonl / csv / imagefolder / wds (tar shards) source into ArrayRecord shards.

    .venv/bin/python tools/build_arrayrecord.py --source=jsonl:/d/a.jsonl \
        --out=/d/shards/train --num_shards=8 --max_side=512 --workers=4

Bad records (unreadable / missing images, empty captions) are skipped and counted by
kind. Images whose longer side exceeds --max_side are resized and re-encoded as JPEG;
others keep their original bytes. Train on the result with the printed
`--config.data.source=arrayrecord:GLOB`.
"""
import argparse
import collections
import io
import multiprocessing
import os
import re
import sys
from typing import Any, Dict, Iterable, List, Optional, Tuple

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from vlp_jax.data import decode  # pylint: disable=g-import-not-at-top
from vlp_jax.data import sources  # pylint: disable=g-import-not-at-top
from vlp_jax.data import sources_arrayrecord  # pylint: disable=g-import-not-at-top
from vlp_jax.data import sources_wds  # pylint: disable=g-import-not-at-top

# (image path or encoded image bytes, caption(s), extra fields) for one raw record;
# (None, bad kind, {}) for a record already known to be bad.
Raw = Tuple[Any, Any, Dict[str, Any]]


def wds_records(pattern: str) -> Iterable[Raw]:
  """Streams the samples of webdataset tar shards (image bytes, caption, key)."""
  paths = sources_wds.expand_pattern(pattern)
  for path in paths:
    sources_wds.check_readable(path)
  for path in paths:
    for key, files in sources_wds.iter_samples(path):
      element = sources_wds.to_element(path, key, files)
      if "_bad" in element:
        yield None, element["_bad"], {}
      else:
        yield element["image"], element["text"], {"key": element["key"]}


def raw_records(spec: str, split: str = "train", size: int = 0) -> List[Raw]:
  """Image paths and captions of a file-based source, without decoding images."""
  source = sources.make_source(spec, split, size, 0, 224)
  records = getattr(source, "records", None)
  if records is None:
    raise ValueError(f"Source '{spec}' has no file list; use a jsonl:, csv:, wds: or "
                     "imagefolder: source.")
  class_names = getattr(source, "class_names", None)
  out = []
  for path, second in records:
    if class_names is not None:  # imagefolder: (path, label).
      out.append((path, class_names[second], {"label": int(second)}))
    else:
      out.append((path, second, {}))
  return out


def _resize_encode(image_bytes: bytes, max_side: int, quality: int) -> bytes:
  """Validates the image; re-encodes it as JPEG when its longer side > max_side."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  image = decode.decode_image(image_bytes)
  h, w = image.shape[:2]
  if not max_side or max(h, w) <= max_side:
    return image_bytes
  scale = max_side / max(h, w)
  size = (max(1, round(w * scale)), max(1, round(h * scale)))
  img = Image.fromarray(image).resize(size, Image.BICUBIC)
  buf = io.BytesIO()
  img.save(buf, format="JPEG", quality=quality)
  return buf.getvalue()


def process_record(args: Tuple[Raw, int, int]) -> Tuple[Optional[bytes], str]:
  """Raw record -> (serialized record, 'ok') or (None, bad kind)."""
  (path, text, fields), max_side, quality = args
  if path is None:  # Known bad (e.g. a wds sample without image or caption).
    return None, text
  fields = dict(fields)
  key = fields.pop("key", path)
  try:
    captions = decode.clean_captions(text)
    if isinstance(path, bytes):
      data = path
    else:
      try:
        with open(path, "rb") as f:
          data = f.read()
      except FileNotFoundError as e:
        raise decode.BadRecord("missing_file", path) from e
      except (IsADirectoryError, PermissionError) as e:
        raise decode.BadRecord("unreadable", f"{path} ({e})") from e
    image_bytes = _resize_encode(data, max_side, quality)
  except decode.BadRecord as e:
    return None, e.kind
  caption = captions[0] if isinstance(text, str) else captions
  return sources_arrayrecord.encode_record(image_bytes, caption, key=key, **fields), "ok"


def output_glob(out: str, num_shards: int) -> str:
  """The glob matching exactly the shards `write_shards(..., out, num_shards)` writes."""
  if "{shard" in out:
    return re.sub(r"\{[^}]*\}", "*", out)
  return f"{out}-*-of-{num_shards:05d}"


def build(spec: str, out: str, num_shards: int, max_side: int = 512, quality: int = 90,
          workers: int = 2, split: str = "train", progress: bool = True):
  """Writes the shards; returns (shard paths, counts by kind incl. 'ok')."""
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top
  if spec.startswith("wds:"):  # Streamed: never held in memory as a whole.
    records, total = wds_records(spec[len("wds:"):]), None
  else:
    records = raw_records(spec, split)
    total = len(records)
  counts = collections.Counter()
  jobs = ((r, max_side, quality) for r in records)

  def good(results):
    for rec, kind in tqdm(results, total=total, disable=not progress,
                          unit="img", desc="encoding"):
      counts[kind] += 1
      if rec is not None:
        yield rec

  if workers > 1:
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
      paths = sources_arrayrecord.write_shards(
          good(pool.imap(process_record, jobs, chunksize=16)), out, num_shards)
  else:
    paths = sources_arrayrecord.write_shards(good(map(process_record, jobs)), out,
                                             num_shards)
  return paths, counts


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--source", required=True,
                      help="jsonl:/d/a.jsonl, csv:/d/a.csv[?...], imagefolder:/d/train "
                      "or wds:/d/shard-{0000..0099}.tar")
  parser.add_argument("--out", required=True, help="shard path prefix, e.g. /d/shards/train")
  parser.add_argument("--num_shards", type=int, default=1)
  parser.add_argument("--max_side", type=int, default=512, help="0 keeps the original size")
  parser.add_argument("--quality", type=int, default=90)
  parser.add_argument("--workers", type=int, default=2)
  parser.add_argument("--split", default="train")
  parser.add_argument("--no_progress", action="store_true")
  args = parser.parse_args()
  paths, counts = build(args.source, args.out, args.num_shards, args.max_side,
                        args.quality, args.workers, args.split, not args.no_progress)
  ok = counts.pop("ok", 0)
  bad = sum(counts.values())
  print(f"wrote {ok} records to {len(paths)} shard(s); skipped {bad} bad record(s)")
  for kind in sorted(counts):
    print(f"  bad {kind}: {counts[kind]}")
  if ok < len(paths):
    print(f"warning: only {ok} records for {len(paths)} shards; some shards are empty",
          file=sys.stderr)
  if not ok:
    sys.exit(1)
  print(f"--config.data.source=arrayrecord:{output_glob(args.out, args.num_shards)}")


if __name__ == "__main__":
  main()
