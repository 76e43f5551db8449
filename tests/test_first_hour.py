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


def test_training_curves_keep_each_runs_colour_and_label_every_panel(tmp_path):
    """dSFT logs no reward accuracy: the preference runs keep their own colours in that panel (before
    the fix the cycle shifted, so daDPO's line there took dSFT's colour), and every panel says whose
    line is whose."""
    import json

    from fastdadpo.commands.plots import training_curves_figure

    runs = {}
    for name, keys in (("dSFT", {"loss": 1.0}), ("dDPO", {"loss": 0.7, "rewards/accuracy": 0.5}),
                       ("daDPO", {"loss": 0.6, "rewards/accuracy": 0.6, "kd/divergence": 0.1})):
        run = tmp_path / name
        run.mkdir()
        (run / "metrics.jsonl").write_text("".join(json.dumps({"step": s, **keys}) + "\n" for s in (1, 2)))
        runs[name] = str(run)
    figure = training_curves_figure(runs)
    colour = {}
    for axis in figure.axes:
        assert axis.get_legend() is not None, axis.get_title()
        for line in axis.get_lines():
            colour.setdefault(line.get_label(), set()).add(line.get_color())
    assert all(len(seen) == 1 for seen in colour.values()), colour
    assert len({next(iter(seen)) for seen in colour.values()}) == 3
    assert [len(axis.get_lines()) for axis in figure.axes] == [3, 2, 1]


@pytest.mark.parametrize("command", ["train", "generate", "prune", "eval", "run", "plan", "demo"])
def test_help_shows_each_default_once_and_none_for_required_options(command):
    """Required options and unset ones say no "(default: None)"; an option whose help gives its own
    default is not given a second one; eval's --max-new-tokens and --batch-size say what they are."""
    import re
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "fastdadpo", command, "--help"], capture_output=True, text=True,
                            timeout=120, env=_env(COLUMNS="200"))
    assert result.returncode == 0, result.stderr
    assert "(default: None)" not in result.stdout and "(default: False)" not in result.stdout
    for line in result.stdout.splitlines():
        assert len(re.findall(r"default", line)) <= 1, line
    if command == "eval":
        text = " ".join(result.stdout.split())
        assert "--max-new-tokens MAX_NEW_TOKENS longest response generated per prompt" in text
        assert "(default: 128)" in text and "(default: 8)" in text
