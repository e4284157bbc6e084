"""vlp_jax: vision-language pre-training in JAX/Flax."""
from setuptools import find_packages, setup

INSTALL_REQUIRES = [
    "jax==0.10.2",
    "jaxlib==0.10.2",
    "flax==0.12.8",
    "optax==0.2.8",
    "orbax-checkpoint==0.12.8",
    "grain==0.2.18",
    "tensorflow-datasets==4.9.10",
    "ml-collections==1.1.0",
    "einops==0.8.2",
    "absl-py==2.5.1",
    "numpy==2.4.6",
    "pillow==13.0.0",
    "sentencepiece==0.2.3",
    "tensorboardX==2.6.5",
    "matplotlib==3.11.2",
    "tqdm==4.70.1",
    # CLIP BPE tokenizer (open_clip's text cleaning), hub tokenizer.json, safetensors.
    "ftfy==6.3.1",
    "regex==2026.11.15",
    "tokenizers==0.23.3",
    "safetensors==0.8.0",
]

setup(
    name="vlp_jax",
    version="0.1.0",
    description="Vision-language pre-training (CLIP, SigLIP, CoCa) in JAX/Flax.",
    packages=find_packages(include=["vlp_jax", "vlp_jax.*", "configs"]),
    # CLIP's BPE merges for the built-in 'clip' tokenizer, with their license notice.
    package_data={"vlp_jax.data": ["assets/*.gz", "assets/*.md"]},
    python_requires=">=3.11",
    install_requires=INSTALL_REQUIRES,
    extras_require={
        "test": ["pytest==9.2.0", "pytest-xdist==3.8.0"],
        "gpu": ["jax[cuda12]==0.10.2"],
        "tpu": ["jax[tpu]==0.10.2"],
        # Executing notebooks/colab_demo.ipynb in tests (tests/test_notebook.py).
        "notebook": ["nbformat==5.11.1", "nbclient==0.11.0", "ipykernel==7.4.0"],
        # Only to read TorchScript / legacy torch checkpoints (vlp_jax/interop/).
        "torch": ["torch==2.14.1"],
    },
)
