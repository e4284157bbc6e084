"""The evaluation suite: built-in class-name and template sets (sizes, TFDS label
order), the zero-shot `classnames` option and its errors, and every evaluator run
through the config on the shapes data with a tiny model."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from configs import common
from vlp_jax import config as config_lib, errors, models, validation
from vlp_jax.data import classnames, pipeline, shapes, templates
from vlp_jax.data.classnames import datasets, imagenet, prompts
from vlp_jax.train import evaluation, predict

SIZES = {"imagenet": 1000, "cifar10": 10, "cifar100": 100, "stl10": 10, "food101": 101,
         "oxford_iiit_pet": 37, "oxford_flowers102": 102, "dtd": 47, "eurosat": 10,
         "caltech101": 102, "cars196": 196, "sun397": 397, "mnist": 10,
         "svhn_cropped": 10, "resisc45": 45, "patch_camelyon": 2}


def test_builtin_class_name_sets_have_their_sizes_and_unique_names():
  assert {k: len(v) for k, v in classnames.SETS.items()} == SIZES
  for name, names in classnames.SETS.items():
    dup = sorted({n for n in names if names.count(n) > 1})
    # CLIP's ImageNet list names two pairs of classes alike (kept as CLIP has them).
    assert dup == (["missile", "sunglasses"] if name == "imagenet" else []), name
    assert all(n and n == n.strip() for n in names), name
  for alias, target in classnames.ALIASES.items():
    assert classnames.builtin(alias) is classnames.SETS[target]
  assert classnames.SETS["imagenet"][:2] == ("tench", "goldfish")
  for alias in ("imagenet_sketch", "imagenet_a", "imagenet_r", "imagenet_v2"):
    assert classnames.builtin(alias) is classnames.SETS["imagenet"], alias
  assert classnames.builtin("svhn") is classnames.SETS["svhn_cropped"]
  assert classnames.builtin("pcam") is classnames.SETS["patch_camelyon"]


def test_builtin_template_sets_are_valid():
  assert len(prompts.CLIP80) == len(set(prompts.CLIP80)) == 80
  assert prompts.CLIP80[0] == "a bad photo of a {}." and len(prompts.SIMPLE) == 7
  assert set(templates.IMAGENET) <= set(prompts.CLIP80)  # 'imagenet' is a subset.
  assert set(prompts.DATASETS) <= set(classnames.SETS)
  for name, items in templates.BUILTIN.items():
    assert items, name
    for t in items:
      assert templates.template_problem(t) is None, (name, t)
  assert templates.BUILTIN["pets"] == ("a photo of a {}, a type of pet.",)
  assert len(templates.BUILTIN["resisc45"]) == 18 and len(templates.BUILTIN["svhn"]) == 6
  assert templates.BUILTIN["mnist"] == ('a photo of the number: "{}".',)
  assert templates.BUILTIN["pcam"] == ("this is a photo of {}",)


def _norm(name):
  name = name.lower()
  name = name[3:] if re.match(r"^/[a-z]/", name) else name  # SUN397: '/a/abbey'.
  return re.sub(r"[^a-z0-9]", "", name)


# Labels whose CLIP name is not the TFDS name spelt differently.
RENAMED = {
    "oxford_flowers102": {"pink-yellow dahlia?": "pink and yellow dahlia",
                          "ball moss": "air plant"},
    "eurosat": {"AnnualCrop": "annual crop land", "Forest": "forest",
                "HerbaceousVegetation": "brushland or shrubland",
                "Highway": "highway or road",
                "Industrial": "industrial buildings or commercial buildings",
                "Pasture": "pasture land", "PermanentCrop": "permanent crop land",
                "Residential": "residential buildings or homes or apartments",
                "River": "river", "SeaLake": "lake or sea"},
    "caltech101": {"airplanes": "airplane", "background_google": "background",
                   "car_side": "side of a car", "cougar_body": "body of a cougar cat",
                   "cougar_face": "face of a cougar cat",
                   "crocodile_head": "head of a  crocodile",
                   "faces": "off-center face", "faces_easy": "centered face",
                   "flamingo_head": "head of a flamingo", "leopards": "leopard",
                   "motorbikes": "motorbike", "snoopy": "snoopy (cartoon beagle)",
                   "yin_yang": "yin and yang symbol"},
    "svhn_cropped": {str(i): n for i, n in enumerate(
        "zero one two three four five six seven eight nine".split())},
    "patch_camelyon": {"0": "lymph node",
                       "1": "lymph node containing metastatic tumor tissue"},
}


@pytest.mark.parametrize("name", ["food101", "oxford_iiit_pet", "oxford_flowers102",
                                  "dtd", "eurosat", "caltech101", "cars196", "sun397",
                                  "resisc45", "mnist", "svhn_cropped", "patch_camelyon"])
def test_class_names_follow_the_tfds_label_order(name, tmp_path):
  # TFDS knows these label names without the data (cifar10/100 and stl10 read them
  # from the data's own meta files, in CLIP's order; see classnames/datasets.py).
  tfds = pytest.importorskip("tensorflow_datasets")
  labels = tfds.builder(name, data_dir=str(tmp_path)).info.features["label"].names
  ours = classnames.SETS[name]
  assert len(labels) == len(ours)
  renamed = RENAMED.get(name, {})
  for label, ours_name in zip(labels, ours):
    assert renamed.get(label) == ours_name or _norm(label) == _norm(ours_name), (
        label, ours_name)


def test_imagenet_names_follow_the_wordnet_id_order(tmp_path):
  tfds = pytest.importorskip("tensorflow_datasets")
  wnids = tfds.builder("imagenet2012", data_dir=str(tmp_path)).info.features[
      "label"].names
  assert wnids == sorted(wnids) and len(wnids) == 1000
  ours = classnames.SETS["imagenet"]
  # Anchors: n01440764 tench, n01443537 goldfish, n02123045 tabby cat, n15075141
  # toilet tissue.
  for wnid, name in [("n01440764", "tench"), ("n01443537", "goldfish"),
                     ("n02123045", "tabby cat"), ("n15075141", "toilet paper")]:
    assert ours[wnids.index(wnid)] == name
  assert tuple(wnids) == imagenet.IMAGENET_WNIDS


@pytest.mark.parametrize("name", ["imagenet_v2", "imagenet_sketch", "imagenet_a",
                                  "imagenet_r"])
def test_imagenet_variants_use_the_imagenet_labels(name, tmp_path):
  # TFDS labels ImageNet-A/-R with ImageNet's 1,000 labels, not 0..199: an alias.
  tfds = pytest.importorskip("tensorflow_datasets")
  labels = tfds.builder(name, data_dir=str(tmp_path)).info.features["label"].names
  assert tuple(labels) == imagenet.IMAGENET_WNIDS
  assert classnames.builtin(name) is classnames.SETS["imagenet"]


def test_imagenet_a_and_r_subsets():
  wnids = imagenet.IMAGENET_WNIDS
  assert len(wnids) == len(set(wnids)) == 1000 and list(wnids) == sorted(wnids)
  assert set(imagenet.SUBSETS) == {"imagenet_a", "imagenet_r"}
  for name, labels in imagenet.SUBSETS.items():
    assert len(labels) == len(set(labels)) == 200, name
    assert list(labels) == sorted(labels) and 0 <= labels[0] and labels[-1] < 1000
  a = [wnids[i] for i in imagenet.IMAGENET_A]
  r = [wnids[i] for i in imagenet.IMAGENET_R]
  # WordNet ids the TFDS builders' tests find in their fake data; first and last.
  assert {"n01580077", "n01616318", "n07697313"} <= set(a)
  assert {"n01443537", "n01484850", "n12267677"} <= set(r)
  assert (a[0], a[-1], r[0], r[-1]) == ("n01498041", "n12267677", "n01443537",
                                        "n12267677")
  names = classnames.SETS["imagenet"]
  assert [names[i] for i in imagenet.IMAGENET_A[:3]] == ["stingray", "goldfinch", "junco"]
  assert [names[i] for i in imagenet.IMAGENET_R[:3]] == [
      "goldfish", "great white shark", "hammerhead shark"]
  assert len(set(imagenet.IMAGENET_A) & set(imagenet.IMAGENET_R)) == 86


def test_class_subset_scores_the_200_classes_and_maps_the_labels():
  from vlp_jax.evaluators import zeroshot  # pylint: disable=g-import-not-at-top
  names = list(classnames.SETS["imagenet"])
  subset = imagenet.SUBSETS["imagenet_r"]
  labels = np.array([subset[0], subset[5], subset[199], -1])
  outside = next(i for i in range(1000) if i not in set(subset))
  kept, mapped = zeroshot.restrict_to_subset(names, np.append(labels, outside),
                                             "imagenet_r", "config.evals.zs")
  assert kept == [names[i] for i in subset] and len(kept) == 200
  assert mapped.tolist() == [0, 5, 199, -1, -1]
  with pytest.raises(errors.ConfigError, match="needs the 1,000 ImageNet classes"):
    zeroshot.restrict_to_subset(names[:10], labels, "imagenet_r", "config.evals.zs")
  entry = common.eval_entry(type="zeroshot", class_subset="imagenet_b")
  with pytest.raises(errors.ConfigError, match="class_subset='imagenet_b'"):
    zeroshot.check(entry, "config.evals.zs")


# ------------------------------------------------------------- the classnames option


class _Source:
  def __init__(self, names):
    self.class_names = list(names)


def test_resolve_classnames_values(tmp_path):
  src = _Source([f"n{i:08d}" for i in range(1000)])
  w = "config.evals.zs.classnames"
  assert classnames.resolve((), "tfds:imagenet2012", src, w).names == tuple(
      src.class_names)
  assert classnames.resolve("dataset", "tfds:imagenet2012", src, w).origin == "the source"
  auto = classnames.resolve(("auto",), "tfds:imagenet2012:validation?data_dir=/d", src, w)
  assert auto.names == classnames.SETS["imagenet"] and "auto" in auto.origin
  folder = classnames.resolve("auto", "imagefolder:/d/train", src, w)
  assert folder.names == classnames.SETS["imagenet"]  # 1,000 WordNet ids.
  small = _Source(["a", "b"])
  assert classnames.resolve("auto", "shapes:classes", small, w).names == ("a", "b")
  tfds_a = classnames.resolve("auto", "tfds:imagenet_a:test", src, w)
  assert tfds_a.names == classnames.SETS["imagenet"]
  # An ImageNet-R folder (200 WordNet ids): CLIP's names by WordNet id.
  r_folder = _Source([imagenet.IMAGENET_WNIDS[i] for i in imagenet.IMAGENET_R])
  by_wnid = classnames.resolve("auto", "imagefolder:/d/imagenet-r", r_folder, w)
  assert by_wnid.names == tuple(classnames.SETS["imagenet"][i]
                                for i in imagenet.IMAGENET_R)
  assert "WordNet id" in by_wnid.origin and by_wnid.names[0] == "goldfish"
  odd = _Source(["n01443537", "n99999999"])  # Not all ImageNet ids: its own names.
  assert classnames.resolve("auto", "imagefolder:/d", odd, w).names == tuple(
      odd.class_names)
  assert classnames.resolve(("cat", "dog"), "x", small, w).names == ("cat", "dog")
  (tmp_path / "n.txt").write_text("cat\n\ndog\n")
  (tmp_path / "n.json").write_text('["kitten", "puppy"]')
  names = classnames.resolve(str(tmp_path / "n.txt"), "x", small, w).names
  assert names == ("cat", "dog")
  assert classnames.resolve(str(tmp_path / "n.json"), "x", small, w).names == (
      "kitten", "puppy")
  with pytest.raises(errors.DataError, match=r"10 class names but eval source 'x' has 2"):
    classnames.resolve("cifar10", "x", small, w)
  with pytest.raises(errors.DataError, match="has no class names of its own"):
    classnames.resolve((), "jsonl:/d.jsonl", object(), w)


@pytest.mark.parametrize("value,error,pattern", [
    ("cifar_10", errors.ConfigError, r"'cifar_10' is not a class-name set.*Did you mean "
     r"'cifar10'"),
    (("imagenet21k",), errors.ConfigError, r"built-in set \['caltech101'"),
    ("/nowhere/names.txt", errors.DataPathError, "class names file not found"),
])
def test_bad_classnames_are_clear_errors(value, error, pattern):
  c = config_lib.default_config()
  c.evals = {"zs": common.eval_entry(type="zeroshot", source="shapes:classes",
                                     classnames=value)}
  with pytest.raises(error, match=pattern):
    validation.validate(c)


def test_unknown_template_set_names_the_sets():
  c = config_lib.default_config()
  c.evals = {"zs": common.eval_entry(type="zeroshot", templates="clip81")}
  with pytest.raises(errors.ConfigError, match=r"'clip81' is not a built-in template "
                     r"set \[.*'clip80'.*Did you mean 'clip80'"):
    validation.validate(c)


# ------------------------------------------------ every evaluator, tiny model, shapes


def tiny_two_tower(context_length=32):
  """(config, predict fns, params) of a tiny two-tower model on 32 px images with byte
  tokens."""
  c = config_lib.default_config()
  c.model.embed_dim = 16
  c.model.image.update(variant="", width=16, depth=1, mlp_dim=32, num_heads=2,
                       patch_size=8)
  c.model.text.update(vocab_size=260, width=16, depth=1, mlp_dim=32, num_heads=2,
                      context_length=context_length)
  c.data.update(source="shapes", image_size=32, tokenizer="bytes")
  model = models.build_model(c.model)
  tokenizer = pipeline.make_tokenizer(c.data)
  batch = {"image": jnp.zeros((2, 32, 32, 3)),
           "text": jnp.asarray(tokenizer.tokenize(["a", "b"], context_length))}
  params = jax.jit(model.init)(jax.random.key(0), batch)["params"]
  fns = predict.make_predict_fns(model, tokenizer, context_length)
  return c, fns, params


@pytest.fixture(scope="module")
def tiny():
  return tiny_two_tower()


MESH = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))


def _run(c, fns, params, **evals):
  c = c.copy_and_resolve_references()
  c.evals = evals
  validation.validate(c)
  return evaluation.run_evals(evaluation.eval_configs(c), fns, params, 0, mesh=MESH)


COMMON = dict(source="shapes:classes", split="validation", batch_size=8)


def test_zeroshot_fewshot_retrieval_run_on_shapes_with_a_tiny_model(tiny):
  c, fns, params = tiny
  names = tuple(n.upper() for n in shapes.CLASS_NAMES)
  res = _run(
      c, fns, params,
      zs=common.eval_entry(type="zeroshot", size=24, templates="simple",
                           classnames=names, **COMMON),
      fs=common.eval_entry(type="fewshot", size=32, train_size=72, shots=(1, 2),
                           seeds=3, l2_reg=(1.0, 1024.0), holdout=1, **COMMON),
      ret=common.eval_entry(type="retrieval", source="shapes", split="validation",
                            size=16, batch_size=8))
  assert res["eval/zs/num_examples"] == 24
  assert 0 <= res["eval/zs/top1"] <= res["eval/zs/top5"] <= 1
  for k in ("eval/fs/1shot", "eval/fs/2shot"):
    assert 0 <= res[k] <= 1, k
  assert res["eval/fs/num_classes"] == 24
  assert res["eval/fs/1shot_l2"] in (1.0, 1024.0)
  assert res["eval/ret/num_images"] == 16 and res["eval/ret/num_texts"] > 16
  assert 0 <= res["eval/ret/i2t_r1"] <= res["eval/ret/i2t_r5"] <= 1


@pytest.mark.slow  # Compiles the L-BFGS probe for these shapes (~5-10 s on a CPU).
def test_linear_probe_runs_on_shapes_with_a_tiny_model(tiny):
  c, fns, params = tiny
  res = _run(c, fns, params, lp=common.eval_entry(
      type="linear_probe", size=32, train_size=72, val_split="test",
      weight_decays=(1e-3, 1e-1), steps=10, **COMMON))
  assert 0 <= res["eval/lp/top1"] <= res["eval/lp/top5"] <= 1
  assert 0 <= res["eval/lp/val_top1"] <= 1 and res["eval/lp/num_classes"] == 24
  assert res["eval/lp/weight_decay"] in (1e-3, 1e-1) and res["eval/lp/num_train"] == 72


@pytest.mark.parametrize("type_", ["fewshot", "linear_probe"])
def test_fewshot_and_probe_need_labelled_data(type_, tmp_path):
  Image.new("RGB", (8, 8), (200, 0, 0)).save(tmp_path / "a.png")
  (tmp_path / "d.jsonl").write_text('{"image": "a.png", "caption": "red"}\n')
  c = config_lib.default_config()
  c.data.image_size = 8
  c.evals = {"ev": common.eval_entry(type=type_, source=f"jsonl:{tmp_path}/d.jsonl",
                                     batch_size=2)}
  validation.validate(c)
  fns = {"embed_image": lambda p, x: np.ones((len(x), 2), np.float32)}
  with pytest.raises(errors.DataError, match=r"config\.evals\.ev: source 'jsonl:.*' "
                     r"split 'train' has no labelled examples"):
    evaluation.run_evals(evaluation.eval_configs(c), fns, None, 0)


def test_zeroshot_with_a_set_of_another_size_says_so(tiny):
  c, fns, params = tiny
  with pytest.raises(errors.DataError, match=r"built-in 'cifar10' has 10 class names "
                     r"but eval source 'shapes:classes' has 24 classes"):
    _run(c, fns, params, zs=common.eval_entry(
        type="zeroshot", source="shapes:classes", classnames="cifar10", size=8,
        batch_size=8))


def test_class_name_sets_are_used_as_prompts():
  # Stub predict fns record the prompts: classnames and templates reach them.
  seen = []

  def tokenize(texts):
    seen.extend(texts)
    return np.zeros((len(texts), 1), np.int32)
  fns = {"tokenize": tokenize,
         "embed_text": lambda p, t: np.ones((len(t), 2), np.float32),
         "embed_image": lambda p, x: np.ones((len(x), 2), np.float32)}
  c = config_lib.default_config()
  c.data.image_size = 16
  names = [f"thing {i}" for i in range(24)]
  c.evals = {"zs": common.eval_entry(type="zeroshot", source="shapes:classes",
                                     size=4, classnames=tuple(names), templates="pets")}
  validation.validate(c)
  evaluation.run_evals(evaluation.eval_configs(c), fns, None, 0)
  assert seen == [f"a photo of a {n}, a type of pet." for n in names]
  assert len(datasets.SETS) == 15


def test_wordnet_id_class_names_get_a_warning(tmp_path, caplog):
  for wnid in ("n01440764", "n01443537"):
    (tmp_path / wnid).mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / wnid / "0.png")
  fns = {"tokenize": lambda t: np.zeros((len(t), 1), np.int32),
         "embed_text": lambda p, t: np.ones((len(t), 2), np.float32),
         "embed_image": lambda p, x: np.ones((len(x), 2), np.float32)}
  c = config_lib.default_config()
  c.data.image_size = 8
  c.evals = {"zs": common.eval_entry(type="zeroshot", source=f"imagefolder:{tmp_path}")}
  validation.validate(c)
  with caplog.at_level("WARNING"):
    evaluation.run_evals(evaluation.eval_configs(c), fns, None, 0)
  assert "WordNet ids (e.g. 'n01440764')" in caplog.text
  assert "config.evals.zs.classnames=imagenet" in caplog.text
