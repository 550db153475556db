"""recbole_layersel: a RecBole plugin that turns a pretrained LLM into a fast sequential recommender.

Why each pin: recbole_layersel/compat.py. Install torch first (the README's setup does): CPU users
take `pip install torch==2.13.0`; GPU users install the CUDA build of their choice.
"""

from setuptools import find_packages, setup

setup(
    name="recbole_layersel",
    version="0.1.0",
    description="Layer-selected LLM backbones as RecBole sequential recommenders",
    packages=find_packages(include=["recbole_layersel", "recbole_layersel.*"]),
    python_requires=">=3.11",
    install_requires=[
        "torch>=2.6",
        "recbole==1.2.1",
        "numpy>=1.24,<2",
        "pandas>=2.0,<3",
        "scipy<1.13",
        "setuptools<81",
        "transformers>=5.24,<6",  # masking_utils takes `cache` (past_key_values is removed in 5.40)
        "peft>=0.17",
        "accelerate>=1.0",
        "gguf>=0.10",
        "safetensors",
        "pyyaml",
        "tqdm",
        "matplotlib",
    ],
    extras_require={"dev": ["pytest>=8", "ruff==0.17.6"], "gpu": ["bitsandbytes"]},
)
