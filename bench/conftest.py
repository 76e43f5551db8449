"""pytest wiring for the benchmark suites: options, quick mode, the memory baseline, and what the
results JSON records about the machine and the command."""
from __future__ import annotations

import os
import platform
import shlex
import subprocess


os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

from bench.settings import BenchSettings, add_options, settings_or_none  # noqa: E402


def pytest_addoption(parser):
    add_options(parser)


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: a benchmark at a GPU size (skipped without CUDA)")
    config.addinivalue_line("markers", "cpu: a benchmark at a CPU size")
    config.addinivalue_line("markers", "train: the fastdadpo train step comparison")
    config.addinivalue_line("markers", "peers: fastdadpo train against TRL's trainers (bench/test_peer_trainers.py)")
    settings = BenchSettings.of(config)
    if settings.quick:
        import torch

        # Compiling (inductor's C++ on CPU) takes 10-20 s per graph, minutes over the suite: the quick
        # mode checks that every path runs and agrees, so torch.compile runs its functions eagerly.
        torch.compiler.set_stance("force_eager")


def pytest_sessionfinish(session, exitstatus):
    settings = settings_or_none(session.config)
    if settings is not None:
        settings.memory_baseline.save(machine_description())


# --- what the results JSON records -----------------------------------------------------------------------------

def _lscpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return platform.processor()
    for line in out.splitlines():
        if line.startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def _version(module: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(module)
    except PackageNotFoundError:
        return "not installed"


def machine_description() -> dict:
    import psutil
    import torch

    description = {
        "cpu_model": _lscpu_model(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "versions": {name: _version(name) for name in ("torch", "triton", "transformers", "deepspeed", "liger-kernel",
                                                       "cut-cross-entropy", "trl", "pytest-benchmark")},
    }
    description["kind"] = machine_kind(description)
    return description


def machine_kind(description: dict) -> str:
    """The baselines folder name: GPU model, or CPU core count (bench/baselines/<kind>/)."""
    if description["gpu"]:
        return description["gpu"].lower().replace("nvidia ", "").replace(" ", "-")
    return f"cpu-{description['cpu_cores']}core"


def _command(config) -> str:
    environment = " ".join(f"{key}={shlex.quote(value)}" for key, value in sorted(os.environ.items())
                           if key.startswith("FASTDADPO_") or key in ("OMP_NUM_THREADS", "CUDA_VISIBLE_DEVICES"))
    command = "python -m pytest " + " ".join(shlex.quote(arg) for arg in config.invocation_params.args)
    return f"{environment} {command}".strip()


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["fastdadpo"] = machine_description()


def pytest_benchmark_update_json(config, benchmarks, output_json):
    output_json["fastdadpo"] = {"command": _command(config), "settings": BenchSettings.of(config).describe()}
