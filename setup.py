"""fastdadpo: memory-lean teacher-student distillation (daDPO, dDPO, KD, DCKD, ADPA).

`kernels/` is installed as the subpackage `fastdadpo.kernels`: a top-level package named
`kernels` would collide with the Hugging Face `kernels` library that transformers imports.
"""
from setuptools import setup

setup(
    name="fastdadpo",
    version="0.1.0",
    description="Fused-kernel distillation trainer: daDPO and relatives without [tokens x vocab] logits",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=["fastdadpo", "fastdadpo.kernels"],
    package_dir={"fastdadpo": "fastdadpo", "fastdadpo.kernels": "kernels"},
    package_data={"fastdadpo": ["demo_data/teacher/*", "plan_data/*.json"]},
    install_requires=[
        # torch is pinned by scripts/setup.sh (CPU build) before this runs; any 2.4+ works.
        "torch>=2.4",
        "triton>=3.0; platform_system == 'Linux'",
        "numpy",
        "pyyaml",
        "transformers>=4.46",
        "accelerate",
        "tokenizers",
        "safetensors",
        "datasets",
        "pyarrow",
        "deepspeed>=0.15",
        "peft>=0.13",  # LoRA students (model.lora)
        "psutil",
        "tqdm",
        "matplotlib",
    ],
    extras_require={
        "dev": ["pytest>=8", "pytest-timeout", "pytest-benchmark>=4", "hypothesis>=6"],
        # trl: bench/test_peer_trainers.py (TRL's DPO, GKD and distillation trainers; needs Python 3.11+, and
        # its requirements do not include torch, so it cannot pull a CUDA build over the pinned one).
        "bench": ["pytest-benchmark>=4", "liger-kernel>=0.5", "cut-cross-entropy",
                  "trl>=1.16; python_version >= '3.11'"],
    },
    entry_points={"console_scripts": ["fastdadpo=fastdadpo.cli:main"]},
)
