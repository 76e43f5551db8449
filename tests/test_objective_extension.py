"""A new objective, defined in this file alone, trains, plans and precomputes: all the rest of
fastdadpo needs to know about it is its class and its ``needs()``, registered with
``register_objective``. No change under fastdadpo/ makes room for it."""
import json
import os
import subprocess
import sys
from dataclasses import dataclass

import pytest
import torch
import yaml

from fastdadpo.core.losses import sequence_logps
from fastdadpo.core.objectives import OBJECTIVES, Objective, parameter, register_objective
from fastdadpo.core.step import KernelCall, Needs, ObjectiveOutput
from fastdadpo.kernels import IGNORE_INDEX, fused_linear_divergence

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAME = "test_anchored_reverse_kd"


@dataclass(frozen=True)
class AnchoredReverseKD(Objective):
    """Reverse KL to the teacher on the teacher's responses, plus a pull of each response's sequence
    log-prob toward π_ref's cached one: a teacher online, a table cached, chosen responses only, one
    kernel call whose divergence is reduced and whose log-probs stay per token."""

    name = NAME
    formula = "mean_t KL(π_θ‖π_te) over chosen tokens + `anchor`·mean over pairs (log π_θ(y) − log π_ref(y))²"
    anchor: float = parameter(0.1, "weight of the pull toward π_ref's sequence log-probs", "this test")

    def needs(self) -> Needs:
        return Needs(online=("teacher",), cached=("reference",), fields=("chosen",),
                     kernel_calls=(KernelCall("chosen", teachers=1, reduced=True),))

    def __call__(self, inputs) -> ObjectiveOutput:
        batch, norm = inputs.batch, inputs.normalizers
        chosen = batch.chosen_rows()
        step = fused_linear_divergence(
            inputs.student.hidden, inputs.student.weight, inputs.teacher.hidden, inputs.teacher.weight,
            kind="reverse_kl", mask=chosen, targets=torch.where(chosen, batch.targets, IGNORE_INDEX),
            vocab_size=inputs.vocab_size, weights=chosen.float() / norm.chosen_tokens,
            **inputs.student_options(), **inputs.teacher.logit_options("teacher_"))
        policy = sequence_logps(step.logps, batch.target_sequence, batch.num_sequences)
        pull = ((policy - inputs.reference_logps) ** 2).sum() / norm.pairs
        loss = step.loss + self.anchor * pull
        return ObjectiveOutput(loss, {"loss": loss.detach(), "kd/divergence": step.loss.detach(),
                                      "anchor/pull": pull.detach()})


def register() -> None:
    if NAME not in OBJECTIVES:
        register_objective(AnchoredReverseKD)


@pytest.fixture
def registered():
    register()
    yield
    OBJECTIVES.pop(NAME, None)  # the README's table and the registry tests see the shipped set


def _config(student_dir, teacher_dir, tmp_path) -> dict:
    from fastdadpo.demo.synthetic import make_examples

    rows = [{"prompt": r["prompt"], "chosen": r["answer"]} for r in make_examples(8, seed=3)]
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"model": {"student": student_dir, "teacher": teacher_dir},
            "data": {"train": str(data), "max_length": 48, "cache_dir": str(tmp_path / "cache")},
            "objective": {"name": NAME, "anchor": 0.5},
            "train": {"micro_batch_size": 2, "max_steps": 2, "lr": 1e-3, "warmup_ratio": 0.0,
                      "output_dir": str(tmp_path / "run")},
            "deepspeed": {"zero_stage": 0}}


def test_config_and_plan_read_the_declaration(registered, student_dir, teacher_dir, tmp_path):
    from fastdadpo.commands import memory_terms
    from fastdadpo.commands import plan
    from fastdadpo.commands.config import config_from_mapping
    from fastdadpo.base.errors import ConfigError

    config = config_from_mapping(_config(student_dir, teacher_dir, tmp_path), "test")
    assert isinstance(config.objective, AnchoredReverseKD) and config.objective.anchor == 0.5
    with pytest.raises(ConfigError, match="model.teacher"):  # required, from needs().models
        config_from_mapping({**_config(student_dir, teacher_dir, tmp_path), "model": {"student": student_dir}}, "t")
    setting = plan.setting_from_config(config, ranks=1, device="gpu")
    assert setting.sequences == 1  # chosen only
    [sweep] = memory_terms.kernel_sweeps(config.objective, setting)
    assert (sweep.rows, sweep.teachers, sweep.holds_grads, sweep.with_logps) == (
        setting.micro_batch * setting.max_length, 1, True, True)
    with_reference = dict(_config(student_dir, teacher_dir, tmp_path))
    with_reference["model"] = {**with_reference["model"], "reference": student_dir}
    models = plan.models_from_config(config_from_mapping(with_reference, "test"))
    assert [key for key, _ in models.teachers] == ["teacher"]
    assert [key for key, _ in models.precomputed] == ["reference"]
    report = plan.make_report(config, config_path="test", gpus=1, nodes=1, memory_gb=80.0)
    assert report.largest > 0 and "kernel" in " ".join(t.name for t in report.plan.terms)


_CHILD = """
import importlib.util, sys
spec = importlib.util.spec_from_file_location("objective_extension", sys.argv[1])
module = importlib.util.module_from_spec(spec)
sys.modules["objective_extension"] = module
spec.loader.exec_module(module)
module.register()
from fastdadpo.cli import main
sys.exit(main(sys.argv[2:]))
"""


def _run(*args):
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    return subprocess.run([sys.executable, "-c", _CHILD, os.path.abspath(__file__), *args], capture_output=True,
                          text=True, timeout=600, env=env, cwd=REPO)


def test_it_precomputes_and_trains(student_dir, teacher_dir, tmp_path):
    config_path = tmp_path / "config.yaml"
    config_path.write_text(yaml.safe_dump(_config(student_dir, teacher_dir, tmp_path)))
    first = _run("train", str(config_path), "--precompute-only")
    assert first.returncode == 0, first.stderr[-4000:]
    assert "precomputed once (held for the run; on disk where data.cache_dir is writable): reference log-probs of train" in first.stdout + first.stderr
    [table] = (tmp_path / "cache" / "logps").iterdir()
    written = table.stat().st_mtime_ns
    trained = _run("train", str(config_path))
    assert trained.returncode == 0, trained.stderr[-4000:]
    assert "precomputed once (held for the run; on disk where data.cache_dir is writable): reference log-probs of train" in trained.stdout + trained.stderr
    assert table.stat().st_mtime_ns == written  # read from the cache, not computed again
    with open(tmp_path / "run" / "metrics.jsonl", encoding="utf-8") as handle:
        rows = [json.loads(line) for line in handle]
    assert [r["step"] for r in rows] == [1, 2]
    assert all(r["anchor/pull"] >= 0 and r["kd/divergence"] > 0 for r in rows)
