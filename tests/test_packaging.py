"""Packaging: the repository root never shadows an installed package (Hugging Face's `kernels`, which
transformers imports, above all), the CLI works from the root as the README runs it, and the lock and
the matrix's constraint files stay inside the ranges setup.py claims, with the oldest cell pinned to
exactly their lower bounds."""
import ast
import importlib.metadata
import json
import os
import subprocess
import sys

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REQUIREMENTS = os.path.join(REPO, "requirements")
TIMEOUT = 300


def _from_root(*args):
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    env.pop("PYTHONPATH", None)
    env.pop("PYTHONSAFEPATH", None)
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=TIMEOUT, env=env, cwd=REPO)


def _hf_kernels_installed() -> bool:
    try:
        importlib.metadata.distribution("kernels")
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


def test_kernels_folder_is_not_a_top_level_package():
    assert not os.path.exists(os.path.join(REPO, "kernels", "__init__.py")), (
        "kernels/__init__.py would make the repository's kernels/ a regular package that shadows Hugging "
        "Face's `kernels` for anything run from the root; the package lives in kernels/src/")
    assert os.path.exists(os.path.join(REPO, "kernels", "src", "__init__.py"))
    import fastdadpo.kernels

    assert os.path.dirname(fastdadpo.kernels.__file__) == os.path.join(REPO, "kernels", "src") or (
        "site-packages" in fastdadpo.kernels.__file__)


def test_import_kernels_from_the_root_is_hugging_faces():
    probe = ("import importlib.util, json, kernels, transformers.activations\n"
             "from transformers.utils import import_utils\n"
             "print(json.dumps({'file': getattr(kernels, '__file__', None),"
             " 'path': list(getattr(kernels, '__path__', []))}))")
    result = _from_root("-c", probe)
    assert result.returncode == 0, result.stderr[-3000:]
    found = json.loads(result.stdout.strip().splitlines()[-1])
    if _hf_kernels_installed():
        assert found["file"] and not os.path.abspath(found["file"]).startswith(os.path.join(REPO, "kernels")), found
    else:
        # Without Hugging Face's package the folder is at most an empty namespace: nothing to run.
        assert found["file"] is None


def test_cli_from_the_root_loads_models(tmp_path, student_dir):
    """The demo's first failing stage on a fresh machine was prune (transformers.activations imports
    Hugging Face's `kernels`): run it from the root, as `fastdadpo run` launches every stage."""
    from fastdadpo.demo.synthetic import make_examples

    calibration = tmp_path / "prompts.jsonl"
    calibration.write_text("".join(json.dumps(row) + "\n" for row in make_examples(8, seed=3)))
    result = _from_root("-m", "fastdadpo", "prune", "--model", student_dir, "--ratio", "0.2", "--calibration",
                        str(calibration), "--calibration-samples", "4", "--out", str(tmp_path / "pruned"),
                        "--device", "cpu")
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "pruned" / "config.json").exists()


# --- the lock and the matrix ----------------------------------------------------------------------------


def _setup_requirements() -> dict[str, list[Requirement]]:
    """setup.py's install_requires and extras_require, read without running it."""
    tree = ast.parse(open(os.path.join(REPO, "setup.py"), encoding="utf-8").read())
    call = next(node for node in ast.walk(tree) if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "setup")
    keywords = {keyword.arg: ast.literal_eval(keyword.value) for keyword in call.keywords
                if keyword.arg in ("install_requires", "extras_require")}
    groups = {"install": keywords["install_requires"], **keywords["extras_require"]}
    return {group: [Requirement(line) for line in lines] for group, lines in groups.items()}


def _pins(name: str) -> dict[str, Version]:
    pins = {}
    with open(os.path.join(REQUIREMENTS, name), encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            requirement = Requirement(line)
            specifiers = list(requirement.specifier)
            assert len(specifiers) == 1 and specifiers[0].operator == "==", f"{name}:{number}: not a pin: {line}"
            pins[canonicalize_name(requirement.name)] = Version(specifiers[0].version)
    return pins


def _applies(requirement: Requirement, python_version: str) -> bool:
    if requirement.marker is None:
        return True
    return requirement.marker.evaluate({"python_version": python_version, "platform_system": "Linux",
                                        "sys_platform": "linux", "extra": ""})


@pytest.mark.parametrize("lock, groups", [("lock-cpu.txt", ("install", "dev", "tensorboard", "wandb")),
                                          ("lock-bench.txt", ("bench",))])
def test_lock_pins_every_direct_requirement_inside_its_range(lock, groups):
    pins = {**_pins("lock-cpu.txt"), **_pins(lock)}
    requirements = _setup_requirements()
    for group in groups:
        for requirement in requirements[group]:
            if not _applies(requirement, "3.11"):
                continue
            name = canonicalize_name(requirement.name)
            assert name in pins, f"{lock}: {requirement.name} (setup.py, {group}) is not locked"
            assert requirement.specifier.contains(pins[name], prereleases=True), (
                f"{lock}: {requirement.name}=={pins[name]} is outside setup.py's range {requirement.specifier}")


def test_locks_do_not_overlap():
    assert not set(_pins("lock-cpu.txt")) & set(_pins("lock-bench.txt"))


def test_oldest_cell_pins_exactly_the_lower_bounds():
    """The `oldest` matrix cell is what setup.py claims at its floor: every ranged requirement pinned
    to its lower bound, so a raised floor in setup.py must move the cell with it (and the reverse)."""
    pins = _pins("matrix-oldest.txt")
    expected = {}
    for requirements in _setup_requirements().values():
        for requirement in requirements:
            floors = [s.version for s in requirement.specifier if s.operator == ">="]
            if floors and _applies(requirement, "3.10"):
                expected[canonicalize_name(requirement.name)] = Version(floors[0])
    for name, floor in expected.items():
        assert pins.get(name) == floor, f"matrix-oldest.txt pins {name}=={pins.get(name)}; setup.py's floor is {floor}"
    unranged = {canonicalize_name(r.name) for group in _setup_requirements().values() for r in group
                if not any(s.operator == ">=" for s in r.specifier)}
    assert not unranged & set(pins) - set(expected), "matrix-oldest.txt pins a requirement setup.py leaves open"


def test_gpu_stack_cell_is_inside_the_claimed_ranges():
    pins = _pins("matrix-gpu-stack.txt")
    for requirements in _setup_requirements().values():
        for requirement in requirements:
            name = canonicalize_name(requirement.name)
            if name in pins and _applies(requirement, "3.12"):
                assert requirement.specifier.contains(pins[name], prereleases=True), (
                    f"matrix-gpu-stack.txt: {name}=={pins[name]} outside setup.py's {requirement.specifier}")
    assert pins["torch"].release[:2] == (2, 11) and pins["triton"] == Version("3.6.0")

