"""`fastdadpo run` and `fastdadpo demo`: the demo in miniature end to end, stages skipped when their
output is complete, an interrupted run continued, and clear errors for bad recipes."""
import glob
import json
import os
import shutil
import subprocess
import sys

import pytest
import yaml

from fastdadpo.base.errors import ConfigError
from fastdadpo.commands.recipe import load_recipe
from fastdadpo.demo.synthetic import ALL_TASKS

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TIMEOUT = 1200


def _env():
    return dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")


def _demo(out, *extra):
    return subprocess.run([sys.executable, "-m", "fastdadpo", "demo", "--quick", "--out", str(out), *extra],
                          capture_output=True, text=True, timeout=TIMEOUT, env=_env(), cwd=REPO)


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    result = _demo(out)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return out, result


@pytest.mark.slow
def test_quick_demo_runs_every_stage(quick_demo):
    out, result = quick_demo
    names = ["teacher", "student (before)", "after dSFT", "after dDPO", "after daDPO", "after daDPO-token"]
    with open(out / "seed-0" / "eval.json", encoding="utf-8") as handle:
        results = json.load(handle)
    assert list(results["models"]) == names
    for name in names[1:]:
        row = results["models"][name]
        assert 0.0 <= row["accuracy"] <= 1.0 and row["forward_kl"] >= 0.0
        assert row["wins"] + row["losses"] + row["ties"] == results["examples"]
    assert results["group_by"] == "task" and set(results["groups"]) <= set(ALL_TASKS)
    for name in names:
        assert name in result.stdout  # the comparison table
    assert "paired test on per-prompt correctness" in result.stdout and "by kind of task" in result.stdout
    for path in ("results.txt", "results.json", "seed-0/curves.png", "seed-0/comparison.png", "seed-0/pairs.jsonl",
                 "seed-0/student-pruned/config.json"):
        assert (out / path).exists(), path
    summary = json.load(open(out / "results.json"))
    assert summary["seeds"] == [0] and summary["models"]["after dSFT"]["all"]["accuracy"]["values"] == \
        [results["models"]["after dSFT"]["accuracy"]]
    # No prompt of a seed's data is one the teacher was trained on, and held-out prompts are unseen.
    taught = {json.loads(line)["prompt"] for line in open(out / "data" / "teacher_train.jsonl")}
    heldout = [json.loads(line) for line in open(out / "seed-0" / "data" / "heldout.jsonl")]
    prompts = {json.loads(line)["prompt"] for line in open(out / "seed-0" / "data" / "prompts.jsonl")}
    assert not (taught | prompts) & {row["prompt"] for row in heldout} and not taught & prompts
    assert all(isinstance(row["answer"], list) and row["kind"] in ("single", "multi") for row in heldout)
    pruned = json.load(open(out / "seed-0" / "student-pruned" / "config.json"))
    teacher = json.load(open(out / "teacher" / "final" / "config.json"))
    assert pruned["intermediate_size"] < teacher["intermediate_size"]


@pytest.mark.slow
def test_rerun_skips_complete_stages_and_continues_an_interrupted_one(quick_demo):
    out, _ = quick_demo
    # Pretend the run was killed during the last training: its final/ never appeared.
    shutil.rmtree(out / "seed-0" / "train" / "daDPO-token" / "final")
    os.remove(out / "seed-0" / "eval.json")
    result = _demo(out)
    assert result.returncode == 0, result.stderr[-3000:]
    log = result.stdout
    for skipped in ("teacher", "prune:", "generate:", "dSFT:", "dDPO:", "daDPO:"):
        assert any(skipped in line and "skipped" in line for line in log.splitlines()), skipped
    assert "train-daDPO-token" in log and "eval:" in log
    assert (out / "seed-0" / "train" / "daDPO-token" / "final" / "config.json").exists()
    assert json.load(open(out / "seed-0" / "eval.json"))["models"]["after daDPO-token"]
    # Results older than a model they cover are stale: evaluated again.
    os.utime(out / "seed-0" / "train" / "dDPO" / "final" / "config.json")
    result = _demo(out)
    assert result.returncode == 0, result.stderr[-3000:]
    assert not any("eval:" in line and "skipped" in line for line in result.stdout.splitlines())
    # A directory holds one demo's settings: stages run with another thread count must not be reused.
    result = _demo(out, "--threads", "2")
    assert result.returncode == 2 and "add --fresh" in result.stderr and "Traceback" not in result.stderr
    for bad, message in ((["--seeds", "0"], "--seeds: 0 must be at least 1"),
                         (["--beta2-sweep", "0.1,x"], "--beta2-sweep: '0.1,x' is not"),
                         (["--beta2-sweep", "0"], "every β2 must be a positive")):
        result = _demo(out, *bad)
        assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr, bad


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(REPO, "configs", "recipes", "*.yaml"))),
                         ids=os.path.basename)
def test_shipped_recipes_are_valid(path):
    recipe = load_recipe(path)
    names = [name for name, _, _ in recipe.trainings()]
    expected = {"adpa-plus.yaml": {"DCKD", "ADPA", "ADPA+"}}.get(os.path.basename(path), {"dDPO", "daDPO"})
    assert names[0] == "dSFT" and expected <= set(names[1:])


def test_bad_recipes_are_clear_errors(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({"output_dir": "x", "teacher": "t", "student": "s", "prompts": "p",
                                    "stages": ["train"]}))
    with pytest.raises(ConfigError, match="unknown recipe keys stages"):
        load_recipe(str(path))
    path.write_text(yaml.safe_dump({"output_dir": "x", "teacher": "t"}))
    with pytest.raises(ConfigError, match="'student' is required"):
        load_recipe(str(path))
    # A training's config is checked when the recipe loads, not when its stage comes.
    base = {"output_dir": "x", "teacher": "t", "student": "s", "prompts": "p"}
    path.write_text(yaml.safe_dump(dict(base, students={"daDPO": {"objective": {"name": "dadpo", "beta1": -1}}})))
    with pytest.raises(ConfigError, match=r"training daDPO.*beta1"):
        load_recipe(str(path))
    path.write_text(yaml.safe_dump(dict(base, train_common={"train": {"learnin_rate": 1e-5}})))
    with pytest.raises(ConfigError, match=r"training dSFT.*learnin_rate"):
        load_recipe(str(path))
    path.write_text(yaml.safe_dump(dict(base, students={"daDPO": "dadpo"})))
    with pytest.raises(ConfigError, match="students must map display names"):
        load_recipe(str(path))
    path.write_text(yaml.safe_dump(dict(base, launcher="torchrun 'x")))
    with pytest.raises(ConfigError, match="launcher \"torchrun 'x\" is not a command line"):
        load_recipe(str(path))
    path.write_text(yaml.safe_dump(dict(base, generate={"temperature": float("nan")})))
    with pytest.raises(ConfigError, match="generate.temperature is nan; numbers must be finite"):
        load_recipe(str(path))
    # Values are parsed and checked by generate itself when the recipe loads, not at the stage.
    for section, message in [({"temperature": "hot"}, "argument --temperature: invalid float value: 'hot'"),
                             ({"top_p": 1.5}, "--top-p must be in (0, 1], got 1.5"),
                             ({"max_new_tokens": 0}, "--max-new-tokens must be at least 1, got 0"),
                             ({"keep_chosen": "yes"}, "generate.keep_chosen must be true or false, got 'yes'"),
                             ({"allow_http": 1}, "generate.allow_http must be true or false, got 1"),
                             ({"student_model_name": "s"}, "names a served student, which a recipe does not have")]:
        path.write_text(yaml.safe_dump(dict(base, generate=section)))
        with pytest.raises(ConfigError) as error:
            load_recipe(str(path))
        assert str(error.value).startswith(f"{path}: generate") and message in str(error.value), error.value
    result = subprocess.run([sys.executable, "-m", "fastdadpo", "run", str(path), "--stages", "train,polish"],
                            capture_output=True, text=True, timeout=TIMEOUT, env=_env(), cwd=REPO)
    assert result.returncode == 2 and "unknown stage(s) polish" in result.stderr
    assert "Traceback" not in result.stderr
