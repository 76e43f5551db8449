"""Hardening against hostile or damaged files: nothing loaded from a checkpoint or cache runs code,
damaged caches are rebuilt (never trusted, never a traceback), checkpoint writes that fail leave the
earlier ones intact, old checkpoints rotate, damaged model weights are clear errors, and recipe
stages are complete only by their completion marker."""
import io
import json
import os
import resource
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml

from fastdadpo.cli import main
from fastdadpo.commands.precompute import cached
from fastdadpo.core.rows import load_examples
from fastdadpo.core.tokenized import tokenize_examples
from fastdadpo.engine.checkpoints import COMPLETE, TAG, check_loadable, latest, rotate
from fastdadpo.engine.deepspeed.checkpoint import deepspeed_safe_globals
from fastdadpo.engine.state import UnsafeState, load_rng_state, load_state, save_rng_state, save_state

TIMEOUT = 600


def _env(**extra):
    return dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", **extra)


def _cli(args, preexec_fn=None):
    return subprocess.run([sys.executable, "-m", "fastdadpo", *args], capture_output=True, text=True, timeout=TIMEOUT,
                          env=_env(), preexec_fn=preexec_fn)


def _flat(text: str) -> str:
    """Without whitespace: the CLI wraps its message at 100 columns, inside paths too."""
    return "".join(text.split())


def _assert_clear_error(result, *fragments):
    """Exit 2, one paragraph (the CLI's message, nothing after it), no traceback, naming ``fragments``."""
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-4000:]
    assert "Traceback" not in result.stderr, result.stderr[-4000:]
    message = result.stderr[result.stderr.index("fastdadpo: error:"):]
    assert "\n\n" not in message.strip(), message
    for fragment in fragments:
        assert _flat(fragment) in _flat(message), message


class _Payload:
    """Unpickling this creates ``path``: what a hostile checkpoint or cache would run."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def _payload_pickle(marker) -> bytes:
    buffer = io.BytesIO()
    torch.save({"module": _Payload(marker)}, buffer)
    return buffer.getvalue()


# --- checkpoints: training runs --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def run_with_checkpoint(tmp_path_factory, student_dir, tokenizer):
    """An SFT run of 3 steps, a checkpoint after each, the newest 2 kept (ZeRO-3, one rank); its
    root, config and the step-2 checkpoint."""
    from fastdadpo.demo.synthetic import make_examples

    root = tmp_path_factory.mktemp("hardening")
    rows = [{"prompt": r["prompt"], "chosen": r["answer"]} for r in make_examples(8, seed=4, tasks=("repeat",))]
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = {
        "model": {"student": student_dir},
        "data": {"train": str(root / "train.jsonl"), "max_length": 48, "max_prompt_length": 32,
                 "cache_dir": str(root / "cache")},
        "objective": {"name": "sft"},
        "train": {"micro_batch_size": 2, "grad_accum": 1, "lr": 1e-3, "max_steps": 3, "warmup_ratio": 0.0,
                  "save_every": 1, "keep_checkpoints": 2, "output_dir": str(root / "run"), "seed": 3},
        "deepspeed": {"zero_stage": 3},
    }
    path = root / "sft.yaml"
    path.write_text(yaml.safe_dump(config))
    result = _cli(["train", str(path)])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    step = root / "run" / "checkpoints" / "step-2"
    assert (step / COMPLETE).exists()
    return root, str(path), step


def _resume_copy(run_with_checkpoint, tmp_path, *sets):
    """Train from a copy of the step-2 checkpoint; returns (result, the copy)."""
    _, config, step = run_with_checkpoint
    copy = tmp_path / "step-2"
    shutil.copytree(step, copy)
    return lambda: _cli(["train", config, "--set", f"train.output_dir={tmp_path / 'out'}",
                         "--set", f"train.resume={copy}", "--set", "train.max_steps=3", *sets]), copy


@pytest.mark.slow
def test_pickle_payload_in_a_checkpoint_is_refused(run_with_checkpoint, tmp_path):
    resume, copy = _resume_copy(run_with_checkpoint, tmp_path)
    marker = tmp_path / "payload-ran"
    target = next((copy / TAG).glob("*model_states.pt"))
    target.write_bytes(_payload_pickle(marker))
    result = resume()
    _assert_clear_error(result, str(target), "refused to load", "(it names")
    assert not marker.exists()
    assert not (tmp_path / "out" / "final").exists()


def _damaged_copy(run_with_checkpoint, tmp_path):
    copy = tmp_path / "step-2"
    shutil.copytree(run_with_checkpoint[2], copy)
    check_loadable(str(copy), rank=0, safe_globals=deepspeed_safe_globals())  # the intact copy passes
    return copy


def test_truncated_checkpoint_tensors_are_refused(run_with_checkpoint, tmp_path):
    """What ``train`` checks on every rank before DeepSpeed reads anything (its CLI path is the
    payload test's)."""
    copy = _damaged_copy(run_with_checkpoint, tmp_path)
    target = next((copy / TAG).glob("*optim_states.safetensors"))
    target.write_bytes(target.read_bytes()[:100])
    with pytest.raises(UnsafeState, match="truncated or corrupt") as error:
        check_loadable(str(copy), rank=0, safe_globals=deepspeed_safe_globals())
    assert str(target) in str(error.value)


def test_truncated_checkpoint_structure_is_refused(run_with_checkpoint, tmp_path):
    copy = _damaged_copy(run_with_checkpoint, tmp_path)
    target = next((copy / TAG).glob("*optim_states.pt"))
    target.write_bytes(target.read_bytes()[:200])
    with pytest.raises(UnsafeState, match="truncated or corrupt") as error:
        check_loadable(str(copy), rank=0, safe_globals=deepspeed_safe_globals())
    assert str(target) in str(error.value)


def test_pickled_rng_state_of_an_earlier_version_is_refused(run_with_checkpoint, tmp_path):
    copy = _damaged_copy(run_with_checkpoint, tmp_path)
    os.remove(copy / "rng-rank0.safetensors")
    marker = tmp_path / "payload-ran"
    (copy / "rng-rank0.pt").write_bytes(_payload_pickle(marker))
    with pytest.raises(UnsafeState, match="refused"):
        check_loadable(str(copy), rank=0, safe_globals=deepspeed_safe_globals())
    assert not marker.exists()


def test_full_disk_while_saving_keeps_the_earlier_checkpoints(run_with_checkpoint, tmp_path):
    """A file-size limit makes every write past 64 KiB fail (EFBIG, as ENOSPC would): the save of
    step 4 fails, its partial directory is removed, steps 2 and 3 stay complete, step 3 is named."""
    root, config, step = run_with_checkpoint
    out = tmp_path / "out"
    shutil.copytree(step.parent, out / "checkpoints")

    def limit_file_size():
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 << 10, 64 << 10))

    result = _cli(["train", config, "--set", f"train.output_dir={out}", "--set", "train.resume=true",
                   "--set", "train.max_steps=5"], preexec_fn=limit_file_size)
    _assert_clear_error(result, f"cannot write the checkpoint {out / 'checkpoints' / 'step-4'}", "File too large",
                        f"the last good checkpoint is {out / 'checkpoints' / 'step-3'}")
    assert sorted(os.listdir(out / "checkpoints")) == ["step-2", "step-3"]
    assert sorted(os.listdir(out / "checkpoints" / "step-3")) == sorted(os.listdir(step))
    check_loadable(str(out / "checkpoints" / "step-3"), rank=0, safe_globals=deepspeed_safe_globals())
    assert not (out / "final").exists()


def test_keep_checkpoints_rotates_complete_ones(run_with_checkpoint):
    """The fixture's run saved steps 1, 2, 3 with train.keep_checkpoints=2."""
    checkpoints = run_with_checkpoint[0] / "run" / "checkpoints"
    assert sorted(os.listdir(checkpoints)) == ["step-2", "step-3"]
    assert all((checkpoints / name / COMPLETE).exists() for name in ("step-2", "step-3"))


# --- checkpoints: the format and rotation in-process ------------------------------------------------------------

def test_state_files_round_trip_without_pickle(tmp_path):
    from collections import OrderedDict

    shared = torch.arange(6.0)
    state = {"module": OrderedDict(a=shared, b=shared, c=shared[2:4], empty=torch.empty(0)),
             "optimizer": {"state": {0: {"exp_avg": torch.ones(3, dtype=torch.bfloat16), "step": 7}},
                           "param_groups": [{"lr": 1e-3, "params": [0]}]},
             "lr_scheduler": {"base_lrs": [1e-3], "lr_lambdas": [None]}, "shape": torch.Size([2, 3]), "t": (1, "x")}
    path = str(tmp_path / "state.pt")
    save_state(state, path)
    torch.load(path, weights_only=True)  # the structure alone: plain containers
    loaded = load_state(path)
    assert isinstance(loaded["module"], OrderedDict) and list(loaded["module"]) == ["a", "b", "c", "empty"]
    assert torch.equal(loaded["module"]["a"], shared) and loaded["module"]["a"] is loaded["module"]["b"]
    assert torch.equal(loaded["module"]["c"], shared[2:4]) and loaded["module"]["empty"].shape == (0,)
    assert loaded["optimizer"]["state"][0]["exp_avg"].dtype == torch.bfloat16
    assert loaded["optimizer"]["state"][0]["step"] == 7 and loaded["shape"] == torch.Size([2, 3])
    assert loaded["lr_scheduler"] == state["lr_scheduler"] and loaded["t"] == (1, "x")


def test_rng_state_round_trips(tmp_path):
    import random

    path = str(tmp_path / "rng.safetensors")
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    random.gauss(0, 1), np.random.standard_normal()  # cached Gaussians are part of the state
    save_rng_state(path)
    expected = (random.random(), random.gauss(0, 1), np.random.standard_normal(), torch.rand(3))
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    load_rng_state(path)
    actual = (random.random(), random.gauss(0, 1), np.random.standard_normal(), torch.rand(3))
    assert actual[:3] == expected[:3] and torch.equal(actual[3], expected[3])


def _fake_checkpoint(root, step, complete=True):
    path = root / "checkpoints" / (f"step-{step}" if complete else f".step-{step}.partial")
    path.mkdir(parents=True)
    if complete:
        (path / COMPLETE).write_text(json.dumps({"step": step, "world_size": 1}))
    return path


def test_rotate_keeps_the_newest_complete_checkpoints(tmp_path):
    for step in (1, 2, 3, 4):
        _fake_checkpoint(tmp_path, step)
    incomplete = tmp_path / "checkpoints" / "step-5"  # no complete.json: never counted, never deleted
    incomplete.mkdir()
    _fake_checkpoint(tmp_path, 2, complete=False)  # a dead leftover of an interrupted save
    _fake_checkpoint(tmp_path, 6, complete=False)  # newer than every complete one: may still finish
    assert rotate(str(tmp_path), 2, is_main=False) == []
    removed = rotate(str(tmp_path), 2, is_main=True)
    assert len(removed) == 3
    assert sorted(os.listdir(tmp_path / "checkpoints")) == [".step-6.partial", "step-3", "step-4", "step-5"]
    assert latest(str(tmp_path)).endswith("step-4")
    rotate(str(tmp_path), 0, is_main=True)  # 0 keeps all
    assert sorted(os.listdir(tmp_path / "checkpoints")) == [".step-6.partial", "step-3", "step-4", "step-5"]


# --- caches ------------------------------------------------------------------------------------------------------

@pytest.fixture
def examples(tmp_path):
    rows = [{"prompt": f"repeat {w}", "chosen": w, "rejected": "no"} for w in ("red cat", "blue sky", "green tree")]
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return load_examples(str(path))


def _tokenize(examples, tokenizer, cache_dir):
    return tokenize_examples(examples, tokenizer, max_length=32, max_prompt_length=16, cache_dir=str(cache_dir))


def _cache_file(cache_dir):
    (name,) = [n for n in os.listdir(cache_dir) if n.endswith(".safetensors")]
    return cache_dir / name


def test_truncated_tokenization_cache_is_rebuilt(examples, tokenizer, tmp_path, capsys):
    expected, _ = _tokenize(examples, tokenizer, tmp_path)
    entry = _cache_file(tmp_path)
    entry.write_bytes(entry.read_bytes()[: entry.stat().st_size // 2])
    again, _ = _tokenize(examples, tokenizer, tmp_path)
    assert again == expected
    err = capsys.readouterr().err
    assert err.count("tokenizing again") == 1 and "unreadable" in err and "Traceback" not in err
    assert _tokenize(examples, tokenizer, tmp_path)[0] == expected and capsys.readouterr().err == ""


def test_tampered_tokenization_cache_is_rebuilt(examples, tokenizer, tmp_path, capsys):
    from safetensors import safe_open
    from safetensors.torch import save_file

    expected, _ = _tokenize(examples, tokenizer, tmp_path)
    entry = _cache_file(tmp_path)
    with safe_open(str(entry), framework="pt") as handle:
        metadata = handle.metadata()
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    tensors["chosen_flat"] = tensors["chosen_flat"] + 1  # other token ids, the digest left as it was
    save_file(tensors, str(entry), metadata=metadata)
    again, _ = _tokenize(examples, tokenizer, tmp_path)
    assert again == expected
    assert "do not match their digest" in capsys.readouterr().err


def test_pickle_payload_in_a_tokenization_cache_never_runs(examples, tokenizer, tmp_path, capsys):
    expected, _ = _tokenize(examples, tokenizer, tmp_path)
    entry = _cache_file(tmp_path)
    marker = tmp_path / "payload-ran"
    entry.write_bytes(_payload_pickle(marker))  # a pickle where the entry should be
    assert _tokenize(examples, tokenizer, tmp_path)[0] == expected
    assert not marker.exists() and "tokenizing again" in capsys.readouterr().err


def _cached(cache_dir, compute, messages):
    return cached(str(cache_dir), {"kind": "test", "model": "m"}, compute, True, lambda value: value,
                             log=messages.append)


def test_damaged_log_prob_cache_is_rebuilt(tmp_path):
    table = torch.arange(8.0).reshape(4, 2)
    calls, messages = [], []

    def compute():
        calls.append(1)
        return table.clone()

    assert torch.equal(_cached(tmp_path, compute, messages), table) and len(calls) == 1
    assert torch.equal(_cached(tmp_path, compute, messages), table) and len(calls) == 1 and not messages
    (entry,) = (tmp_path / "logps").iterdir()
    content = entry.read_bytes()
    entry.write_bytes(content[:-8] + np.float32(99.0).tobytes() + content[-4:])  # one value changed
    assert torch.equal(_cached(tmp_path, compute, messages), table) and len(calls) == 2
    assert len(messages) == 1 and "do not match their digest" in messages[0]
    entry.write_bytes(content[: len(content) // 2])  # truncated
    assert torch.equal(_cached(tmp_path, compute, messages), table) and len(calls) == 3
    assert len(messages) == 2 and "unreadable" in messages[1]
    marker = tmp_path / "payload-ran"
    entry.write_bytes(_payload_pickle(marker))  # a pickle where the entry should be
    assert torch.equal(_cached(tmp_path, compute, messages), table) and len(calls) == 4
    assert not marker.exists() and len(messages) == 3


# --- damaged model weights ---------------------------------------------------------------------------------------

@pytest.fixture
def truncated_student(student_dir, tmp_path):
    broken = tmp_path / "broken-student"
    shutil.copytree(student_dir, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return str(broken)


def test_truncated_weights_in_train_are_a_clear_error(run_with_checkpoint, truncated_student, tmp_path):
    _, config, _ = run_with_checkpoint
    result = _cli(["train", config, "--set", f"model.student={truncated_student}",
                   "--set", f"train.output_dir={tmp_path / 'out'}"])
    _assert_clear_error(result, "model.student", truncated_student, "truncated or corrupt")


def test_truncated_weights_in_generate_are_a_clear_error(teacher_dir, truncated_student, tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "repeat red"}) + "\n")
    assert main(["generate", "--teacher", teacher_dir, "--student", truncated_student, "--prompts", str(prompts),
                 "--out", str(tmp_path / "pairs.jsonl"), "--max-new-tokens", "2"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and _flat(f"--student: the weights in '{truncated_student}'") in _flat(err)
    assert "truncated or corrupt" in " ".join(err.split())


def test_truncated_weights_in_prune_are_a_clear_error(truncated_student, tmp_path, capsys):
    assert main(["prune", "--model", truncated_student, "--out", str(tmp_path / "pruned"), "--ratio", "0"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and _flat(f"--model: the weights in '{truncated_student}'") in _flat(err)
    assert not (tmp_path / "pruned").exists()


# --- recipe stages ------------------------------------------------------------------------------------------------

def test_a_pruned_directory_without_its_marker_is_pruned_again(student_dir, tmp_path):
    """A pruned directory holding only config.json (a killed prune) is not taken as done."""
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"repeat {w}", "answer": w}) + "\n"
                               for w in ("red", "blue", "green", "stone")))
    recipe = {"output_dir": str(tmp_path / "out"), "teacher": student_dir, "student": student_dir,
              "prompts": str(prompts), "prune": {"ratio": 0.25, "calibration_samples": 4, "calibration_length": 16}}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    pruned = tmp_path / "out" / "student-pruned"
    pruned.mkdir(parents=True)
    shutil.copy(os.path.join(student_dir, "config.json"), pruned / "config.json")
    from fastdadpo.commands.recipe import Runner, load_recipe

    said = []
    Runner(load_recipe(str(path)), ["prune"], echo=said.append).run()  # the prune itself: a subprocess
    assert any("not a finished prune" in line for line in said) and not any("skipped" in line for line in said)
    assert (pruned / "model.safetensors").exists() and (pruned / "pruning_report.json").exists()
    assert (tmp_path / "out" / "stages" / "prune.json").exists()
    said.clear()
    Runner(load_recipe(str(path)), ["prune"], echo=said.append).run()
    assert said == [f"[run] prune: {pruned} complete, skipped"]


# --- one run per output directory, and the end of a run never loses it ----------------------------------------

def test_a_fresh_run_into_an_earlier_runs_checkpoints_is_refused(run_with_checkpoint):
    root, config, _ = run_with_checkpoint
    result = _cli(["train", config])  # the fixture's own output_dir, without resume
    _assert_clear_error(result, f"train.output_dir {root / 'run'} holds an earlier run's checkpoints",
                        "--set train.resume=true")


def test_resuming_another_runs_checkpoint_is_refused(run_with_checkpoint, tmp_path):
    _, config, step = run_with_checkpoint
    result = _cli(["train", config, "--set", f"train.output_dir={tmp_path / 'other'}", "--set",
                   f"train.resume={step}", "--set", "objective.name=kd", "--set", f"model.teacher={step.parents[2]}"])
    assert result.returncode == 2 and "Traceback" not in result.stderr


def test_two_runs_in_one_output_dir_are_refused(run_with_checkpoint, tmp_path):
    from fastdadpo.base.files import DirectoryLock

    _, config, _ = run_with_checkpoint
    out = tmp_path / "busy"
    out.mkdir()
    lock = DirectoryLock(str(out))
    assert lock.acquire() is None  # this test process is "the other run"
    try:
        result = _cli(["train", config, "--set", f"train.output_dir={out}"])
        _assert_clear_error(result, f"train.output_dir {out} is in use by another fastdadpo run (pid {os.getpid()}")
        assert not (out / "metrics.jsonl").exists()
    finally:
        lock.release()
    assert DirectoryLock(str(out)).acquire() is None  # released with its holder


def test_a_failed_export_leaves_a_checkpoint_and_exports_on_resume(run_with_checkpoint, tmp_path):
    """save_every 0 still checkpoints the last step; an export that cannot be written ends in one
    paragraph, and resuming then only exports."""
    _, config, _ = run_with_checkpoint
    out = tmp_path / "out"
    out.mkdir()
    (out / ".final.partial").write_text("in the way")  # the export's directory cannot be made
    sets = ["--set", f"train.output_dir={out}", "--set", "train.save_every=0", "--set", "train.max_steps=2"]
    _assert_clear_error(_cli(["train", config, *sets]), f"cannot write the final model to {out / 'final'}",
                        f"its last checkpoint is {out / 'checkpoints' / 'step-2'}", "train.resume=true")
    assert sorted(os.listdir(out / "checkpoints")) == ["step-2"] and not (out / "final").exists()
    os.remove(out / ".final.partial")
    result = _cli(["train", config, *sets, "--set", "train.resume=true"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert (out / "final" / "model.safetensors").exists()
    assert [json.loads(line)["step"] for line in open(out / "metrics.jsonl")] == [1, 2]


# --- values refused where they enter -----------------------------------------------------------------------------

def test_a_fifo_as_data_is_refused_not_read_forever(tmp_path):
    from fastdadpo.base.errors import DataError

    fifo = tmp_path / "rows.jsonl"
    os.mkfifo(fifo)
    with pytest.raises(DataError, match="not a regular file"):
        load_examples(str(fifo))


@pytest.mark.parametrize("args,fragment", [
    (["generate", "--teacher", "t", "--student", "s", "--prompts", "p.jsonl", "--out", "o.jsonl", "--temperature",
      "nan"], "--temperature must be 0 (greedy) or a positive finite number, got nan"),
    (["generate", "--teacher", "t", "--student", "s", "--prompts", "p.jsonl", "--out", "o.jsonl", "--temperature",
      "inf"], "--temperature must be 0 (greedy) or a positive finite number, got inf"),
    (["generate", "--teacher", "t", "--student", "s", "--prompts", "p.jsonl", "--out", "o.jsonl",
      "--timeout-minutes", "0"], "--timeout-minutes must be a positive number, got 0.0"),
    (["eval", "--teacher", "t", "--student", "s", "--data", "p.jsonl", "--out", "."], "--out: . cannot be written"),
    (["eval", "--teacher", "t", "--student", "s", "--data", "p.jsonl", "--device", "meta"],
     "--device: 'meta' is not a device fastdadpo runs on"),
])
def test_bad_command_values_end_in_one_paragraph(args, fragment):
    _assert_clear_error(_cli(args), fragment)


def _broken_copy(student_dir, tmp_path, how: str):
    broken = tmp_path / f"student-{how}"
    shutil.copytree(student_dir, broken)
    config = json.loads((broken / "config.json").read_text())
    if how == "config-list":
        (broken / "config.json").write_text(json.dumps([config]))
    elif how == "config-without-hidden-size":
        config.pop("hidden_size")
        (broken / "config.json").write_text(json.dumps(config))
    elif how == "pickled-weights":
        os.remove(broken / "model.safetensors")
        (broken / "pytorch_model.bin").write_bytes(_payload_pickle(tmp_path / "payload-ran"))
    elif how == "corrupt-tokenizer":
        (broken / "tokenizer.json").write_text('{"version": "1.0", "model": ')
    return broken


@pytest.mark.parametrize("how,fragment", [
    ("config-list", "cannot load"), ("config-without-hidden-size", "its config.json has no hidden_size, so transformers used its class default"),
    ("pickled-weights", "unpickling it could run code"), ("corrupt-tokenizer", "cannot load a tokenizer"),
])
def test_a_broken_model_directory_ends_in_one_paragraph(run_with_checkpoint, student_dir, tmp_path, how, fragment):
    _, config, _ = run_with_checkpoint
    broken = _broken_copy(student_dir, tmp_path, how)
    result = _cli(["train", config, "--set", f"model.student={broken}", "--set", f"train.output_dir={tmp_path / 'o'}"])
    _assert_clear_error(result, "model.student", fragment)
    assert not (tmp_path / "payload-ran").exists()


def test_unreadable_and_damaged_data_are_named(tmp_path):
    import datasets

    from fastdadpo.base.errors import DataError

    saved = tmp_path / "saved"
    datasets.Dataset.from_list([{"prompt": "p", "chosen": "c", "rejected": "r"}]).save_to_disk(str(saved))
    assert len(load_examples(str(saved))) == 1
    (saved / "state.json").write_text("{ not json")
    with pytest.raises(DataError, match="a saved dataset that cannot be read"):
        load_examples(str(saved))
    if os.geteuid() != 0:  # root reads anything
        locked = tmp_path / "locked.jsonl"
        locked.write_text('{"prompt": "p", "chosen": "c", "rejected": "r"}\n')
        locked.chmod(0)
        with pytest.raises(DataError, match="cannot be read by this user"):
            load_examples(str(locked))


def test_a_cache_that_cannot_be_written_is_said_and_skipped(examples, tokenizer, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("a file where the cache's folder should be")
    expected, _ = _tokenize(examples, tokenizer, tmp_path / "fine")
    assert _tokenize(examples, tokenizer, blocker / "cache")[0] == expected
    err = capsys.readouterr().err
    assert "tokenization cache" in err and "not written" in err and "Traceback" not in err


def test_resuming_under_another_zero_stage_is_refused(run_with_checkpoint, tmp_path):
    _, config, step = run_with_checkpoint
    result = _cli(["train", config, "--set", f"train.output_dir={tmp_path / 'o'}", "--set", f"train.resume={step}",
                   "--set", "deepspeed.zero_stage=0"])
    _assert_clear_error(result, f"train.resume: {step} was written by another run",
                        "engine 'deepspeed zero 3' (this config: 'deepspeed zero 0')")


def test_a_full_disk_during_the_export_keeps_the_run_and_exports_on_resume(run_with_checkpoint, tmp_path):
    """The run's last checkpoint is there; the export alone meets a write limit (EFBIG, as ENOSPC
    would): one paragraph naming it, nothing partial left; without the limit, resuming exports."""
    _, config, step = run_with_checkpoint
    out = tmp_path / "out"
    shutil.copytree(step.parent, out / "checkpoints")  # steps 2 and 3: step 3 is the run's last
    sets = ["--set", f"train.output_dir={out}", "--set", "train.resume=true"]

    def limit_file_size():
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 << 10, 64 << 10))

    result = _cli(["train", config, *sets], preexec_fn=limit_file_size)
    _assert_clear_error(result, f"cannot write the final model to {out / 'final'}", "File too large",
                        f"its last checkpoint is {out / 'checkpoints' / 'step-3'}")
    assert not (out / "final").exists() and not (out / ".final.partial").exists()
    result = _cli(["train", config, *sets])
    assert result.returncode == 0, result.stderr[-3000:]
    assert (out / "final" / "model.safetensors").exists()


@pytest.mark.parametrize("make, message", [
    (lambda path: path.mkdir(), "is a directory, not a file"),
    (lambda path: os.mkfifo(path), "is not a regular file"),
    (lambda path: None, "does not exist"),
])
def test_a_config_path_that_is_no_file_says_what_it_is(tmp_path, make, message):
    """A directory or a FIFO given as the config is named as such (not 'does not exist'), and a FIFO
    is never opened (it would block)."""
    from fastdadpo.base.errors import ConfigError
    from fastdadpo.base.yaml_files import read_yaml_mapping

    path = tmp_path / "config.yaml"
    make(path)
    with pytest.raises(ConfigError, match=f"config file {path} {message}"):
        read_yaml_mapping(str(path), "config")


def test_a_process_group_that_cannot_form_is_said_as_it_is(tmp_path):
    """MASTER_PORT held by another job: rank 0 fails at once with the port named, not the
    lost-rank paragraph meant for a rank that never joined (which only a timeout shows)."""
    import socket
    import subprocess
    import sys

    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen(1)
        env = dict(os.environ, RANK="0", WORLD_SIZE="2", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(holder.getsockname()[1]))
        script = ("from fastdadpo.base.errors import UserError\nfrom fastdadpo.engine.launch import setup\n"
                  "try:\n    setup(60)\nexcept UserError as exc:\n    print(exc)\n")
        result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert "rank 0 of 2: the process group could not form" in result.stdout, result.stdout + result.stderr[-2000:]
    assert "EADDRINUSE" in result.stdout and "lost contact" not in result.stdout
