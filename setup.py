"""megatron_subnet: Megatron-style trainer for small LMs cut from a pretrained parent and distilled from it."""

from setuptools import find_packages, setup

setup(
    name="megatron_subnet",
    version="0.1.0",
    description="Tensor/pipeline-parallel sub-network selection and distillation on DeepSpeed ZeRO",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["megatron_subnet", "megatron_subnet.*"]),
    install_requires=[
        "torch>=2.4",
        "deepspeed>=0.16",
        "transformers>=4.48",
        "tokenizers",
        "sentencepiece",
        "numpy",
        "mpi4py",
        "safetensors",
        "tqdm",
        "matplotlib",
    ],
    extras_require={
        "test": ["pytest", "ruff", "openmpi", "megatron-core"],
        "gguf": ["gguf", "accelerate"],
        "mpi": ["openmpi"],
    },
)
