"""The second engine, PyTorch FSDP2 (``engine: fsdp2``), against the first: on two gloo ranks every
objective's steps and exported weights equal DeepSpeed ZeRO-3's; its checkpoints resume exactly, on
the same or another number of ranks, and hold no code."""
import os

import pytest
import torch
import yaml
from safetensors.torch import load_file
from test_hardening import _payload_pickle
from test_trainer import OBJECTIVE_SETTINGS, _config, _metrics, _train, toy  # noqa: F401 (toy: a fixture)


def _engine_config(toy, tmp_path, objective: str, engine: str, **overrides) -> str:
    """The trainer tests' config for ``objective``, trained by ``engine`` (FSDP2 reads no deepspeed: section)."""
    path = _config(toy, tmp_path, objective, **{**OBJECTIVE_SETTINGS[objective], **overrides})
    with open(path, encoding="utf-8") as handle:
        config = yaml.safe_load(handle)
    if engine == "fsdp2":
        config.pop("deepspeed")
        config["engine"] = "fsdp2"
    out = f"{path[:-5]}-{engine}.yaml"
    with open(out, "w", encoding="utf-8") as handle:
        yaml.safe_dump(config, handle)
    return out


def _assert_same_steps(actual: list, expected: list, rel: float) -> None:
    assert [r["step"] for r in actual] == [r["step"] for r in expected]
    for a, b in zip(actual, expected):
        assert a["loss"] == pytest.approx(b["loss"], rel=rel, abs=1e-7), a["step"]
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=rel), a["step"]


def test_fsdp2_trains_in_one_process(toy, tmp_path):
    config = _engine_config(toy, tmp_path, "dadpo", "fsdp2", train__max_steps=2)
    result = _train(config)
    assert "PyTorch FSDP2" in result.stdout
    assert [r["step"] for r in _metrics(tmp_path / "run")] == [1, 2]
    assert os.path.exists(tmp_path / "run" / "final" / "model.safetensors")


@pytest.mark.slow
@pytest.mark.parametrize("objective", list(OBJECTIVE_SETTINGS))
def test_fsdp2_steps_and_weights_equal_zero3(toy, tmp_path, objective):
    runs = {}
    for engine in ("deepspeed", "fsdp2"):
        out = tmp_path / engine
        _train(_engine_config(toy, tmp_path, objective, engine, train__max_steps=3, train__output_dir=str(out)),
               ranks=2)
        runs[engine] = (_metrics(out), load_file(str(out / "final" / "model.safetensors")))
    _assert_same_steps(runs["fsdp2"][0], runs["deepspeed"][0], rel=1e-5)
    ours, theirs = runs["fsdp2"][1], runs["deepspeed"][1]
    assert set(ours) == set(theirs)
    # The two engines reduce gradients in another order (flat buckets against per-layer reduce-
    # scatters), so gradients differ in their last bits; AdamW's step divides by sqrt(v) and can turn
    # that into a visible fraction of one update on an element whose gradient is nearly 0. Each step
    # moves an element by at most lr: the weights may differ by 1/1000 of the updates, no more.
    steps, lr = 3, 3e-3
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], rtol=1e-5, atol=1e-3 * steps * lr, msg=name)


@pytest.mark.slow
def test_fsdp2_resume_is_exact_and_reshards(toy, tmp_path):
    """A 2-rank run saved at step 3 continues exactly on 2 ranks, and on 1 rank (its shards joined
    and cut again: the same examples per step with 2 accumulations) to the same steps."""
    full = tmp_path / "full"
    config = _engine_config(toy, tmp_path, "dpo", "fsdp2", train__max_steps=6, train__save_every=3,
                            train__output_dir=str(full))
    _train(config, ranks=2)
    step3 = full / "checkpoints" / "step-3"
    assert sorted(os.listdir(step3 / "state")) == ["rank0.pt", "rank0.safetensors", "rank1.pt", "rank1.safetensors"]
    expected = _metrics(full)[3:]
    same = tmp_path / "same"
    _train(config, f"train.output_dir={same}", f"train.resume={step3}", ranks=2)
    _assert_same_steps(_metrics(same), expected, rel=1e-6)
    one = tmp_path / "one"
    _train(config, f"train.output_dir={one}", f"train.resume={step3}", "train.grad_accum=2")
    _assert_same_steps(_metrics(one), expected, rel=1e-5)


@pytest.mark.slow
def test_pickle_payload_in_an_fsdp2_checkpoint_never_runs(toy, tmp_path):
    out = tmp_path / "run"
    config = _engine_config(toy, tmp_path, "sft", "fsdp2", train__max_steps=2, train__save_every=2)
    _train(config)
    step2 = out / "checkpoints" / "step-2"
    marker = tmp_path / "payload-ran"
    (step2 / "state" / "rank0.pt").write_bytes(_payload_pickle(marker))
    result = _train(config, f"train.output_dir={tmp_path / 'again'}", f"train.resume={step2}", check=False)
    assert result.returncode == 2 and "refused to load" in result.stderr and "Traceback" not in result.stderr
    assert not marker.exists()


@pytest.mark.slow
def test_fsdp2_with_lora_activation_checkpointing_and_cpu_offload(toy, tmp_path):
    """The options a big student needs, together on two ranks: LoRA adapters (everything else frozen,
    the merged export and the adapter), activation checkpointing, and FSDP2's CPU offload."""
    config = _engine_config(toy, tmp_path, "dadpo", "fsdp2", train__max_steps=3, train__gradient_checkpointing=True,
                            model__lora={"r": 4, "alpha": 8.0, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]})
    result = _train(config, "engine.cpu_offload=true", ranks=2)
    assert "CPU offload" in result.stdout
    rows = _metrics(tmp_path / "run")
    assert [r["step"] for r in rows] == [1, 2, 3] and all(r["grad_norm"] > 0 for r in rows)
    assert (tmp_path / "run" / "final" / "model.safetensors").exists()
    assert (tmp_path / "run" / "final-adapter" / "adapter_model.safetensors").exists()
