"""Writes notebooks/colab_demo.ipynb (edit the cells here, then run this script).

    .venv/bin/python notebooks/make_colab_demo.py

tests/test_notebook.py checks that the committed notebook is this script's output and
executes it end to end on CPU with small settings (`-m slow`).
"""
import os

import nbformat

HERE = os.path.dirname(os.path.abspath(__file__))
PATH = os.path.join(HERE, "colab_demo.ipynb")
BADGE = ("[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)]"
         "(https://colab.research.google.com/github/OWNER/vlp_jax/blob/main/notebooks/"
         "colab_demo.ipynb)")

CELLS = [
    ("md", f"""# vlp_jax on Colab: train, evaluate, import CLIP, sweep

{BADGE}

This notebook installs vlp_jax on a Colab runtime (TPU, GPU or CPU), trains the demo
model (a small CoCa on the built-in `shapes` data) with the batch spread over all
local devices, shows its curves and zero-shot predictions, imports a pretrained CLIP
from a file and classifies images with it, and runs a small evaluation sweep.

Runtime > Change runtime type picks the accelerator. Training and evaluation run as
`main.py` processes, which use the accelerator; the cells that show predictions run
JAX on the CPU inside the notebook, so the two never compete for the device."""),
    ("code", """# Parameters. SMALL = True shrinks every step to a minute or two on a CPU (the
# test tests/test_notebook.py runs the notebook so).
SMALL = False
REPO_URL = "https://github.com/OWNER/vlp_jax"  # The vlp_jax repository to clone: set it.
WORKDIR = "runs/colab"  # Relative to the repository, or absolute (e.g. on Drive).
TRAIN_STEPS = 800  # The demo recipe's.
# A pretrained CLIP to import, from a path (nothing is downloaded here): e.g. an
# open_clip ViT-B-32 .safetensors / .bin / .pt on Drive. "" = the tiny random model
# of the tests (every step runs; its predictions mean nothing).
CLIP_FORMAT = "open_clip"  # 'open_clip', 'openai', 'hf_clip' (a directory), ...
CLIP_CHECKPOINT = ""
CLIP_OPTIONS = {}  # More for vlp_jax.interop.load, e.g. {"image_heads": 12}.
CLIP_TOKENIZER = "clip"  # CLIP's BPE, built in.
CLIP_IMAGES = ""  # A folder of .jpg / .png to classify; "" = shapes images.
CLIP_CLASSES = []  # The class names for CLIP_IMAGES.""", {"tags": ["parameters"]}),
    ("md", """## Install

Inside a checkout (a local Jupyter) nothing is installed. On Colab the repository is
cloned and installed with `pip install -e .` and the extra of the accelerator
(`[tpu]` or `[gpu]`). If Colab asks to restart the session afterwards, do so and run
the cells again from the top (the clone is kept)."""),
    ("code", """import os, shutil, subprocess, sys


def in_repo(d):
  return (os.path.exists(os.path.join(d, "setup.py")) and
          os.path.isdir(os.path.join(d, "vlp_jax")))


here = next((d for d in (".", "..", "vlp_jax") if in_repo(d)), None)
if here is None:
  if "OWNER" in REPO_URL:
    raise ValueError("Set REPO_URL in the parameters cell to the vlp_jax repository.")
  subprocess.run(["git", "clone", "--depth=1", REPO_URL, "vlp_jax"], check=True)
  here = "vlp_jax"
os.chdir(here)
if os.path.exists("/content") and not os.environ.get("VLP_JAX_INSTALLED"):  # Colab.
  tpu = os.path.exists("/dev/accel0") or "COLAB_TPU_ADDR" in os.environ
  extra = "[tpu]" if tpu else ("[gpu]" if shutil.which("nvidia-smi") else "")
  subprocess.run([sys.executable, "-m", "pip", "install", "-q", "-e", "." + extra], check=True)
  os.environ["VLP_JAX_INSTALLED"] = "1"
if os.getcwd() not in sys.path:
  sys.path.insert(0, os.getcwd())
print("vlp_jax at", os.getcwd())"""),
    ("code", """# Settings derived from the parameters.
TINY = {  # configs/demo.py shrunk (SMALL): tiny towers at 32 px, zero-shot only.
    "batch_size": 8, "log_every": 4, "checkpoint_every": 4, "model.embed_dim": 16,
    "model.image.width": 32, "model.image.depth": 1, "model.image.mlp_dim": 64,
    "model.image.num_heads": 2, "model.image.patch_size": 8, "model.text.width": 32,
    "model.text.depth": 1, "model.text.mlp_dim": 64, "model.text.num_heads": 2,
    "model.decoder.depth": 1, "model.decoder.num_queries": 4, "data.image_size": 32,
    "optim.warmup_steps": 2, "evals.zeroshot.every": 4, "evals.zeroshot.size": 24,
    "evals.zeroshot.batch_size": 8, "evals.retrieval.every": -1,
    "evals.captioning.every": -1}
if SMALL:
  TRAIN_STEPS = min(TRAIN_STEPS, 8)
OVERRIDES = dict(TINY if SMALL else {}, total_steps=TRAIN_STEPS)
CLIP_TEXT_POOL = ""  # The checkpoint's.
if not CLIP_CHECKPOINT:  # The tests' tiny random open_clip model (64-id vocabulary).
  CLIP_FORMAT = "open_clip"
  CLIP_CHECKPOINT = "tests/fixtures/interop/clip/open_clip.safetensors"
  CLIP_OPTIONS = {"image_heads": 2, "text_heads": 2}
  CLIP_TOKENIZER = "words:shapes"  # 43 ids: fits its vocabulary.
  # CLIP pools at the highest id, its end token; this tokenizer's end token is not the
  # highest, so pool at the last token instead (the same position for CLIP's ids).
  CLIP_TEXT_POOL = "eos"
DEMO_DIR = os.path.join(WORKDIR, "demo")
SWEEP_DIR = os.path.join(WORKDIR, "eval_sweep")


def sh(*argv):
  \"\"\"Runs a command, its output streamed here; raises if it fails.\"\"\"
  argv = [str(a) for a in argv]
  proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  for line in proc.stdout:
    print(line, end="")
  if proc.wait():
    raise RuntimeError(f"exit status {proc.returncode}: {' '.join(argv)}")


sh(sys.executable, "-c", "import jax; print(jax.device_count(), 'devices:', jax.devices())")"""),
    ("md", """## Train the demo

`configs/demo.py`: a CoCa (contrastive + captioning) on `shapes`. Its mesh,
`config.mesh = {data: -1, fsdp: 1, tensor: 1}`, spreads the batch over all local
devices (8 TPU cores on a TPU runtime). Rerunning the cell resumes from the last
checkpoint; a finished run returns at once."""),
    ("code", """sh(sys.executable, "main.py", "--config=configs/demo.py", f"--workdir={DEMO_DIR}",
   *[f"--config.{k}={v}" for k, v in OVERRIDES.items()])"""),
    ("code", """import json
import matplotlib.pyplot as plt

rows = [json.loads(l) for l in open(os.path.join(DEMO_DIR, "metrics.jsonl")) if l.strip()]
fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4))
for key in ("loss", "clip/loss", "caption/loss"):
  pts = [(r["step"], r[key]) for r in rows if key in r]
  ax1.plot(*zip(*pts), label=key)
ax1.set_title("training loss"); ax1.set_xlabel("step"); ax1.legend()
for key in sorted({k for r in rows for k in r if k.startswith("eval/") and "/num_" not in k}):
  pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), float)]
  ax2.plot(*zip(*pts), marker="o", label=key)
ax2.set_title("evaluation"); ax2.set_xlabel("step"); ax2.legend(fontsize=8)
plt.show()"""),
    ("md", """## Zero-shot predictions

The trained model in this notebook's process (JAX on the CPU): its newest checkpoint,
the first validation images, and the top-3 classes from prompt-ensembled class
embeddings (`vlp_jax.evaluators.zeroshot.top_predictions`)."""),
    ("code", """import jax
jax.config.update("jax_platforms", "cpu")  # The accelerator stays with main.py.
import numpy as np
from configs import demo
from vlp_jax.evaluators import zeroshot
from vlp_jax.train import loop

config = demo.get_config()
config.update_from_flattened_dict(OVERRIDES)
exp = loop.Experiment(config, DEMO_DIR)
params, step, _ = loop.eval_params(exp, DEMO_DIR)
pred = zeroshot.top_predictions(exp.predict_fns, params, exp.eval_configs()["zeroshot"],
                                num=8, k=3, mesh=exp.mesh)


def show(images, titles, colors):
  fig, axes = plt.subplots(1, len(images), figsize=(2.4 * len(images), 3.2))
  for ax, im, title, color in zip(np.atleast_1d(axes), images, titles, colors):
    ax.imshow((im - im.min()) / max(im.max() - im.min(), 1e-6))
    ax.set_title(title, fontsize=7, color=color); ax.axis("off")
  plt.show()


names = pred["class_names"]
show(pred["images"],
     [f"true: {names[l]}\\n" + "\\n".join(f"{names[c]} {p:.2f}" for c, p in zip(t, ps))
      for l, t, ps in zip(pred["labels"], pred["top"], pred["probs"])],
     ["green" if t[0] == l else "red" for l, t in zip(pred["labels"], pred["top"])])
top1 = (pred["top"][:, 0] == pred["labels"]).mean()
print(f"step {step}: top-1 on these images {top1:.2f}")"""),
    ("md", """## Import a pretrained CLIP and classify images

`vlp_jax.interop.load(format, path)` reads another library's checkpoint (open_clip,
OpenAI CLIP, Hugging Face CLIP/SigLIP, big_vision) into a vlp_jax model config and
parameters; nothing is downloaded. Set `CLIP_CHECKPOINT` to a file you have (e.g. on
Drive) and `CLIP_IMAGES` / `CLIP_CLASSES` to your own images; by default the tests'
tiny random model classifies shapes images (its guesses are random)."""),
    ("code", """from vlp_jax import config as config_lib, interop
from vlp_jax.data import pipeline, tokenizers, transforms
from vlp_jax.models import build_model
from vlp_jax.train import predict

clip_cfg, clip_params, clip_size = interop.load(CLIP_FORMAT, CLIP_CHECKPOINT, **CLIP_OPTIONS)
if CLIP_TEXT_POOL:
  clip_cfg.text.pool = CLIP_TEXT_POOL
clip_fns = predict.make_predict_fns(build_model(clip_cfg),
                                    tokenizers.get_tokenizer(CLIP_TOKENIZER),
                                    clip_cfg.text.context_length)
if CLIP_IMAGES:
  from PIL import Image
  files = sorted(f for f in os.listdir(CLIP_IMAGES)
                 if f.lower().endswith((".jpg", ".jpeg", ".png")))[:8]
  images = np.stack([transforms.normalize(transforms.resize_center_crop(
      np.asarray(Image.open(os.path.join(CLIP_IMAGES, f)).convert("RGB")), clip_size), "clip")
                     for f in files])
  labels, classes = [-1] * len(files), list(CLIP_CLASSES)
else:
  data_cfg = config_lib.default_config().data
  data_cfg.update(image_size=clip_size, normalization="clip")
  examples, source = pipeline.eval_examples("shapes", "validation", 8, data_cfg)
  images = np.stack([e["image"] for e in examples])
  labels, classes = [e["label"] for e in examples], list(source.class_names)
with jax.set_mesh(jax.make_mesh((1,), ("data",), devices=jax.devices()[:1])):
  img = np.asarray(clip_fns["embed_image"](clip_params, images))
  txt = np.asarray(clip_fns["embed_text"](clip_params, clip_fns["tokenize"](
      [f"a photo of a {c}." for c in classes])))
img = img / np.linalg.norm(img, axis=-1, keepdims=True)
txt = txt / np.linalg.norm(txt, axis=-1, keepdims=True)
logits = 100 * img @ txt.T
probs = np.exp(logits - logits.max(1, keepdims=True)); probs /= probs.sum(1, keepdims=True)
top = np.argsort(-probs, axis=1)[:, :3]
show(images, ["\\n".join(f"{classes[c]} {p[c]:.2f}" for c in t) for t, p in zip(top, probs)],
     ["green" if t[0] == l else "black" for t, l in zip(top, labels)])"""),
    ("md", """## An evaluation sweep

`experiments/sweep.py` runs one `main.py --mode=eval` per member: here each saved
checkpoint of the demo run x two prompt-template settings. A failing member is
recorded and the sweep goes on; rerunning skips finished members. It writes
`results.csv`, `results.md` (member x metric) and `results.png` (metric against step)."""),
    ("code", """from IPython.display import Image as ShowImage, Markdown, display

sweep_file = os.path.join(WORKDIR, "demo_eval_sweep.py")
os.makedirs(WORKDIR, exist_ok=True)
with open(sweep_file, "w") as f:
  f.write(f'''MODE = "eval"
BASE = "configs/demo.py"
COMMON = {dict(OVERRIDES, **{"evals.retrieval.every": -1, "evals.captioning.every": -1})!r}
CHECKPOINTS = [{{"name": "demo", "workdir": {DEMO_DIR!r},
                 "steps": {"latest" if SMALL else "all"!r}}}]
EVALS = [{{"name": "shapes_templates"}},
         {{"name": "one_template", "evals.zeroshot.templates": "('a photo of a {{}}.',)"}}]
''')
sh(sys.executable, "experiments/sweep.py", sweep_file, f"--workdir={SWEEP_DIR}")
display(Markdown(open(os.path.join(SWEEP_DIR, "results.md")).read()))
display(ShowImage(os.path.join(SWEEP_DIR, "results.png")))"""),
]


def build():
  nb = nbformat.v4.new_notebook()
  nb.metadata.update({
      "kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
      "language_info": {"name": "python"},
      "accelerator": "TPU", "colab": {"provenance": []}})
  for kind, source, *meta in CELLS:
    cell = (nbformat.v4.new_markdown_cell if kind == "md" else nbformat.v4.new_code_cell)(
        source)
    if meta:
      cell.metadata.update(meta[0])
    cell.pop("id", None)  # Stable file contents: no random cell ids.
    nb.cells.append(cell)
  nb.nbformat_minor = 4  # Cell ids arrived in 4.5; without them the output is stable.
  return nb


def main():
  nbformat.write(build(), PATH)
  print("Wrote", PATH)


if __name__ == "__main__":
  main()
