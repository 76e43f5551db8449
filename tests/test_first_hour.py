"""A TRL user's first hour (issue 24): the bugs a new user hits, each with a test that failed before
its fix."""
import pytest

from test_fsdp2 import _engine_config
from test_trainer import _config, _env, _metrics, _train, toy  # noqa: F401 (toy: a fixture)


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["deepspeed", "fsdp2"])
def test_resume_with_more_steps_follows_the_new_schedule(toy, tmp_path, engine):
    """A 5-step run resumed to 8 steps steps on the 8-step schedule from the step it resumes: its rates
    are a fresh 8-step run's (before the fix the checkpoint's last rate, 0 at the end of the old
    cosine, was applied to the resumed step)."""
    fresh = tmp_path / "fresh"
    config = _engine_config(toy, tmp_path, "dpo", engine, train__max_steps=8, train__warmup_ratio=0.25)
    _train(config, f"train.output_dir={fresh}")
    extended = tmp_path / "extended"
    _train(config, f"train.output_dir={extended}", "train.max_steps=5")
    _train(config, f"train.output_dir={extended}", "train.resume=true")
    expected = {r["step"]: r["lr"] for r in _metrics(fresh)}
    got = {r["step"]: r["lr"] for r in _metrics(extended)}
    assert sorted(got) == list(range(1, 9))
    assert got[6] > 0
    for step in (6, 7, 8):
        assert got[step] == pytest.approx(expected[step], rel=1e-9), (step, got, expected)


def test_commands_print_no_third_party_noise(toy, tmp_path):
    """DeepSpeed's accelerator guess and torch's FutureWarnings about the collectives DeepSpeed calls
    (hundreds per ZeRO-3 training) are gone from a command's output; a run on the CPU still works."""
    env = {k: v for k, v in _env().items() if k != "DS_ACCELERATOR"}
    config = _config(toy, tmp_path, "dpo", train__max_steps=2)
    result = _train(config, env=env)
    output = result.stdout + result.stderr
    assert "Setting accelerator to CPU" not in output
    assert "FutureWarning: `torch.distributed" not in output
    assert "done: 2 steps" in output
