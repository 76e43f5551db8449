"""fastdadpo: memory-lean teacher-student distillation (daDPO, dDPO, KD, DCKD, ADPA).

`kernels/src/` is installed as the subpackage `fastdadpo.kernels`. `kernels/` itself has no
`__init__.py`, on purpose: Hugging Face's `kernels` library (which transformers imports) has that
name, and a regular package `kernels` on `sys.path` (the repository root is there for
`python -m ...` and pytest) would shadow it. A folder without `__init__.py` is at most a namespace
package, which the import system passes over for any regular package of the same name.
"""
from setuptools import find_packages, setup

setup(
    name="fastdadpo",
    version="0.1.0",
    description="Fused-kernel distillation trainer: daDPO and relatives without [tokens x vocab] logits",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # The layers (fastdadpo.base, .core, .models, .engine, .commands, .demo) and the kernels.
    packages=find_packages(include=["fastdadpo", "fastdadpo.*"]) + ["fastdadpo.kernels"],
    package_dir={"fastdadpo": "fastdadpo", "fastdadpo.kernels": "kernels/src"},
    package_data={"fastdadpo.demo": ["demo_data/teacher/*"], "fastdadpo.commands": ["plan_data/*.json"]},
    # Every range is tested (scripts/matrix.sh): its floor by the `oldest` cell, which pins each one
    # exactly (requirements/matrix-oldest.txt; tests/test_packaging.py keeps the two equal), its top by
    # the `latest` cell, the exact set in between by the lock (requirements/lock-*.txt, CI's run).
    # torch and triton start at the GPU machine's stack (torch 2.11, triton 3.6).
    install_requires=[
        # torch is pinned by scripts/setup.sh (the lock, or a matrix cell) before this is resolved.
        "torch>=2.11.0",
        "triton>=3.6.0; platform_system == 'Linux'",
        "numpy>=1.26.0",
        "pyyaml>=6.0.1",
        "transformers>=5.17.0",
        "accelerate>=1.10.0",
        "tokenizers>=0.23.1",
        "safetensors>=0.8.0",
        "datasets>=4.4.0",
        "pyarrow>=21.0.0",
        "deepspeed>=0.18.0",
        "peft>=0.17.0",  # LoRA students (model.lora)
        "psutil>=5.9.0",
        "tqdm>=4.66.3",
        "matplotlib>=3.8.0",
    ],
    extras_require={
        "dev": ["pytest>=8.3.0", "pytest-timeout>=2.3.1", "pytest-benchmark>=5.1.0", "hypothesis>=6.100.0"],
        # trl: bench/test_peer_trainers.py (TRL's DPO, GKD and distillation trainers; needs Python 3.11+, and
        # its requirements do not include torch, so it cannot pull a CUDA build over the pinned one).
        # train.report_to: tensorboard and wandb, both locked and tested (W&B in offline mode, no network).
        "tensorboard": ["tensorboard>=2.21.0"],
        "wandb": ["wandb>=0.31.0"],
        "bench": ["pytest-benchmark>=5.1.0", "liger-kernel>=0.6.2", "cut-cross-entropy>=24.12.1",
                  "trl>=1.16; python_version >= '3.11'"],
    },
    entry_points={"console_scripts": ["fastdadpo=fastdadpo.cli:main"]},
)
