"""The README's quickstart, run verbatim: its bash block, from a directory laid out like the repository
root (the package, docs/ and the virtual environment), must train and load with from_pretrained."""
import os
import re
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def quickstart_block() -> str:
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as handle:
        text = handle.read()
    section = text.split("## Quickstart: train on your data", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 1, "the quickstart has one bash block"
    return blocks[0]


def test_the_quickstart_runs_as_written(tmp_path):
    block = quickstart_block()
    assert len(block.strip().splitlines()) <= 15
    for name in ("fastdadpo", "docs"):
        os.symlink(os.path.join(REPO, name), tmp_path / name)
    os.symlink(sys.prefix, tmp_path / ".venv")  # the environment running the tests: the lock's, in CI
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="2", TOKENIZERS_PARALLELISM="false")
    result = subprocess.run(["bash", "-e", "-c", block], cwd=tmp_path, capture_output=True, text=True, timeout=900,
                            env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "done: 8 steps" in result.stdout + result.stderr
    assert "ForCausalLM(" in result.stdout  # the loaded model printed
    assert (tmp_path / "runs" / "quickstart" / "final" / "config.json").exists()
