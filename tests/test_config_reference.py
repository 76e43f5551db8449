"""The README's config reference is the one generated from the config's dataclasses, is valid YAML,
and loads as a config (with the two required keys filled in) to exactly the defaults."""
import os
import re

import yaml

from fastdadpo.commands.config import Config, config_from_mapping
from fastdadpo.commands.config_reference import config_reference

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _readme_block() -> str:
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as handle:
        text = handle.read()
    match = re.search(r"<!-- config-reference:[^\n]*-->\n```yaml\n(.*?)```", text, flags=re.S)
    assert match, "README.md has no generated config reference"
    return match.group(1)


def test_readme_reference_is_the_generated_one():
    assert _readme_block() == config_reference(), (
        "regenerate: python -c 'from fastdadpo.commands.config_reference import config_reference; "
        "print(config_reference(), end=\"\")' and paste it into README.md's block")


def test_reference_is_a_valid_config_of_the_defaults(tmp_path):
    raw = yaml.safe_load(config_reference())
    assert list(raw) == ["model", "data", "objective", "train", "engine", "deepspeed", "kernels"]
    raw["model"]["student"], raw["data"]["train"] = "student", "train.jsonl"
    raw["model"]["teacher"] = "teacher"  # the default objective, dadpo, needs one
    config = config_from_mapping(raw, "reference")
    defaults = Config()
    for section in ("train", "engine", "deepspeed", "kernels"):
        assert getattr(config, section) == getattr(defaults, section), section
    assert config.data.max_length == defaults.data.max_length and config.objective == defaults.objective


def test_every_key_but_the_obvious_is_commented():
    lines = config_reference().splitlines()
    keys = [i for i, line in enumerate(lines) if re.match(r"^  \w+: ", line)]
    uncommented = [lines[i].split(":")[0].strip() for i in keys
                   if "#" not in lines[i] and not lines[i - 1].lstrip().startswith("#")]
    assert set(uncommented) <= {"dropout", "name", "max_grad_norm", "warmup_ratio"}, uncommented
