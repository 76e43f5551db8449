"""A TRL user's first hour (issue 24): the bugs a new user hits, each with a test that failed before
its fix."""
import math

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


# --- TRL's names ---------------------------------------------------------------------------------------

TRL_TRAIN = {"learning_rate": 3e-3, "per_device_train_batch_size": 2, "gradient_accumulation_steps": 2,
             "num_train_epochs": 2.0, "save_steps": 3, "logging_steps": 1, "eval_steps": 2, "save_total_limit": 1,
             "resume_from_checkpoint": False}
OURS_TRAIN = {"lr": 3e-3, "micro_batch_size": 2, "grad_accum": 2, "epochs": 2.0, "save_every": 3, "log_every": 1,
              "eval_every": 2, "keep_checkpoints": 1, "resume": False}


def _write(tmp_path, name, train):
    import yaml

    path = tmp_path / name
    path.write_text(yaml.safe_dump({"model": {"student": "s"}, "data": {"train": "t.jsonl"}, "objective": {"name": "dpo"},
                                    "train": train}))
    return str(path)


def test_trl_names_load_as_ours(tmp_path):
    from fastdadpo.commands.config import load_config

    theirs = load_config(_write(tmp_path, "trl.yaml", TRL_TRAIN)).train
    ours = load_config(_write(tmp_path, "ours.yaml", OURS_TRAIN)).train
    assert theirs == ours and theirs.save_every == 3 and theirs.keep_checkpoints == 1


def test_both_spellings_refused_and_a_set_of_either_wins(tmp_path):
    from fastdadpo.base.errors import ConfigError
    from fastdadpo.commands.config import load_config

    both = _write(tmp_path, "both.yaml", {"lr": 1e-4, "learning_rate": 2e-4})
    with pytest.raises(ConfigError, match=r"both.yaml: train.(lr and train.learning_rate|learning_rate and train.lr) are the same setting"):
        load_config(both)
    ours = _write(tmp_path, "ours.yaml", {"lr": 1e-4})
    assert load_config(ours, ["train.learning_rate=5e-5"]).train.lr == 5e-5
    trl = _write(tmp_path, "trl.yaml", {"learning_rate": 1e-4})
    assert load_config(trl, ["train.lr=7e-5"]).train.lr == 7e-5
    with pytest.raises(ConfigError, match=r"--set train.learning_rate: train.lr must be > 0"):
        load_config(ours, ["train.learning_rate=-1"])


@pytest.mark.parametrize("key,hint", [
    ("save_step", "did you mean 'train.save_steps', TRL's name for 'train.save_every'?"),
    ("resume_from_checkpont", "did you mean 'train.resume_from_checkpoint', TRL's name for 'train.resume'?"),
    ("learning_rat", "did you mean 'train.learning_rate', TRL's name for 'train.lr'?"),
    ("max_step", "did you mean 'train.max_steps'?"),
])
def test_hints_know_trl_names(tmp_path, key, hint):
    from fastdadpo.base.errors import ConfigError
    from fastdadpo.commands.config import load_config

    with pytest.raises(ConfigError) as error:
        load_config(_write(tmp_path, "c.yaml", {key: 1}))
    assert hint in str(error.value)


def test_trl_metric_names_logged_beside_ours():
    from fastdadpo.commands.trl_names import with_trl_metric_names

    row = with_trl_metric_names({"step": 1, "rewards/accuracy": 0.5, "rewards/margin": 0.2,
                                 "eval/rewards/margin": 0.1, "loss": 0.6})
    assert row["rewards/accuracies"] == 0.5 and row["rewards/margins"] == 0.2 and row["eval/rewards/margins"] == 0.1
    assert row["rewards/accuracy"] == 0.5 and row["loss"] == 0.6


@pytest.mark.slow
def test_a_trl_named_config_trains_identically_to_ours(toy, tmp_path):
    import yaml

    runs = {}
    for name, train in (("ours", OURS_TRAIN), ("trl", TRL_TRAIN)):
        config = yaml.safe_load(open(_config(toy, tmp_path, "dpo", train__max_steps=4)))
        config["train"] = {k: v for k, v in config["train"].items()
                           if k not in ("lr", "micro_batch_size", "grad_accum")}
        config["train"].update(train, output_dir=str(tmp_path / name))
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(config))
        _train(str(path))
        runs[name] = _metrics(tmp_path / name)
    assert len(runs["trl"]) == 4
    for a, b in zip(runs["ours"], runs["trl"]):
        assert {k: v for k, v in a.items() if k not in ("tokens_per_s", "peak_mem_gb")} == \
            {k: v for k, v in b.items() if k not in ("tokens_per_s", "peak_mem_gb")}
    assert "rewards/accuracies" in runs["trl"][-1] and "rewards/margins" in runs["trl"][-1]


# --- fastdadpo export ------------------------------------------------------------------------------------

def _export(checkpoint, out, *extra, env=None):
    import subprocess
    import sys

    from test_trainer import REPO, TIMEOUT

    return subprocess.run([sys.executable, "-m", "fastdadpo", "export", str(checkpoint), "--out", str(out), *extra],
                          capture_output=True, text=True, timeout=TIMEOUT, env=env or _env(), cwd=REPO)


@pytest.mark.slow
@pytest.mark.parametrize("engine,ranks", [("deepspeed", 1), ("deepspeed", 2), ("fsdp2", 2)])
def test_export_a_checkpoint_loads_with_from_pretrained(toy, tmp_path, engine, ranks):
    """A mid-run checkpoint of either engine (written by one or two ranks) exported alone: the
    directory from_pretrained loads holds the weights the run had at that step."""
    import torch
    from transformers import AutoModelForCausalLM

    config = _engine_config(toy, tmp_path, "dpo", engine, train__max_steps=3, train__save_every=2)
    run = tmp_path / "run"
    _train(config, f"train.output_dir={run}", ranks=ranks)
    # The reference: the run resumed at its step-2 checkpoint with nothing left to train, which exports
    # the step-2 weights as final/.
    stopped = tmp_path / "stopped"
    _train(config, f"train.output_dir={stopped}", f"train.resume={run / 'checkpoints' / 'step-2'}",
           "train.max_steps=2", ranks=ranks)
    out = tmp_path / "exported"
    result = _export(run / "checkpoints" / "step-2", out)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "step 2" in result.stdout
    exported = AutoModelForCausalLM.from_pretrained(str(out))
    reference = AutoModelForCausalLM.from_pretrained(str(stopped / "final"))
    final = AutoModelForCausalLM.from_pretrained(str(run / "final"))
    moved = False
    for (name, a), b, c in zip(exported.state_dict().items(), reference.state_dict().values(),
                               final.state_dict().values()):
        assert torch.equal(a, b), name
        moved |= not torch.equal(a, c)
    assert moved  # step 2 is not step 3
    assert (out / "tokenizer.json").exists() or (out / "tokenizer_config.json").exists()
    again = _export(run / "checkpoints" / "step-2", out)
    assert again.returncode == 2 and "exists" in again.stderr and "Traceback" not in again.stderr


def test_export_refuses_what_is_not_a_checkpoint(tmp_path):
    result = _export(tmp_path, tmp_path / "out")
    assert result.returncode == 2 and "not a complete fastdadpo checkpoint" in " ".join(result.stderr.split())
    assert "Traceback" not in result.stderr


def test_plan_json_is_json_on_a_cpu_machine():
    """`fastdadpo plan ... --json | python -m json.tool` on a machine without CUDA: nothing but the
    JSON on stdout (DeepSpeed's accelerator warning once came first)."""
    import json
    import subprocess
    import sys

    from test_trainer import REPO

    env = {k: v for k, v in _env().items() if k != "DS_ACCELERATOR"}
    result = subprocess.run([sys.executable, "-m", "fastdadpo", "plan", "configs/qwen2.5-7b-to-1.5b-dadpo.yaml",
                             "--json"], capture_output=True, text=True, timeout=300, env=env, cwd=REPO)
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)
    assert plan["objective"] == "dadpo"
    tool = subprocess.run([sys.executable, "-m", "json.tool"], input=result.stdout, capture_output=True, text=True)
    assert tool.returncode == 0


@pytest.mark.slow
def test_export_a_lora_checkpoint_merged_and_adapter(toy, tmp_path):
    from transformers import AutoModelForCausalLM

    config = _config(toy, tmp_path, "sft", train__max_steps=2, train__save_every=2)
    run = tmp_path / "run"
    _train(config, f"train.output_dir={run}", "model.lora={r: 4, alpha: 8}", "train.lr=1e-2")
    out = tmp_path / "exported"
    result = _export(run / "checkpoints" / "step-2", out)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    import torch

    merged = AutoModelForCausalLM.from_pretrained(str(out)).state_dict()
    final = AutoModelForCausalLM.from_pretrained(str(run / "final")).state_dict()
    assert all(torch.equal(merged[k], final[k]) for k in final)
    assert (tmp_path / "exported-adapter" / "adapter_config.json").exists()
    assert sorted(p.name for p in (tmp_path / "exported-adapter").iterdir()) == \
        sorted(p.name for p in (run / "final-adapter").iterdir())


# --- TRL's SFT data formats ------------------------------------------------------------------------------

def _rows_file(tmp_path, rows, name="rows.jsonl"):
    import json

    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_sft_formats_read_as_prompt_and_chosen(tmp_path):
    from fastdadpo.core.rows import load_examples

    system = {"role": "system", "content": "Be brief."}
    forms = [
        {"prompt": "Echo: cat", "chosen": "cat"},
        {"prompt": "Echo: cat", "completion": "cat"},
        {"messages": [{"role": "user", "content": "Echo: cat"}, {"role": "assistant", "content": "cat"}]},
    ]
    examples = load_examples(_rows_file(tmp_path, forms), require=("prompt", "chosen"))
    assert [e.prompt for e in examples] == [[{"role": "user", "content": "Echo: cat"}]] * 3
    assert [e.chosen for e in examples] == [[{"role": "assistant", "content": "cat"}]] * 3
    assert all(e.extra == {} for e in examples)
    multi = load_examples(_rows_file(tmp_path, [{"messages": [
        system, {"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
        {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]}], "multi.jsonl"),
        require=("prompt", "chosen"))[0]
    assert [m["content"] for m in multi.prompt] == ["Be brief.", "a", "b", "c"] and multi.chosen[0]["content"] == "d"


@pytest.mark.parametrize("row,message", [
    ({"prompt": "p", "completion": "c", "chosen": "c"}, "both 'completion' and 'chosen'"),
    ({"messages": [{"role": "user", "content": "p"}], "prompt": "p"}, "'messages' and also 'prompt'"),
    ({"messages": [{"role": "user", "content": "only a prompt"}]}, "needs a prompt message followed by an assistant"),
    ({"text": 7}, "field 'text' must be a non-empty string"),  # text rows themselves: tests/test_string_rows.py
])
def test_sft_format_mistakes_are_one_paragraph(tmp_path, row, message):
    from fastdadpo.base.errors import DataError
    from fastdadpo.core.rows import load_examples

    with pytest.raises(DataError, match="rows.jsonl line 1: ") as error:
        load_examples(_rows_file(tmp_path, [row]), require=("prompt", "chosen"))
    assert message in str(error.value)


@pytest.mark.slow
def test_sft_trains_on_messages_rows_as_on_prompt_chosen_rows(toy, tmp_path):
    import json

    rows = [json.loads(line) for line in open(toy["train"])]
    as_messages = [{"messages": [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["chosen"]}]}
                   for r in rows]
    runs = {}
    for name, data in (("pairs", toy["train"]), ("messages", _rows_file(tmp_path, as_messages, "messages.jsonl"))):
        config = _config(toy, tmp_path, "sft", train__max_steps=3, data__train=data)
        _train(config, f"train.output_dir={tmp_path / name}")
        runs[name] = [r["loss"] for r in _metrics(tmp_path / name)]
    assert runs["messages"] == runs["pairs"]


# --- data through datasets.load_dataset -------------------------------------------------------------------

PAIRS = [{"prompt": f"Echo: w{i}", "chosen": f"w{i}", "rejected": "no"} for i in range(5)]


def test_data_paths_datasets_reads(tmp_path):
    """CSV, TSV, gzipped JSON Lines, a glob of files, a folder laid out as a Hub dataset (with a split):
    the same rows as the JSON Lines file."""
    import csv
    import gzip
    import json

    from fastdadpo.core.rows import load_examples

    expected = load_examples(_rows_file(tmp_path, PAIRS, "pairs.jsonl"))
    for name, delimiter in (("pairs.csv", ","), ("pairs.tsv", "\t")):
        with open(tmp_path / name, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=["prompt", "chosen", "rejected"], delimiter=delimiter)
            writer.writeheader()
            writer.writerows(PAIRS)
    with gzip.open(tmp_path / "pairs.jsonl.gz", "wt") as handle:
        handle.write("".join(json.dumps(r) + "\n" for r in PAIRS))
    parts = tmp_path / "parts"
    parts.mkdir()
    _rows_file(parts, PAIRS[:2], "a.jsonl"), _rows_file(parts, PAIRS[2:], "b.jsonl")
    hub = tmp_path / "hub-like" / "data"
    hub.mkdir(parents=True)
    _rows_file(hub, PAIRS, "train.jsonl"), _rows_file(hub, PAIRS[:1], "test.jsonl")

    def same(path):
        got = load_examples(path)
        return [(e.prompt, e.chosen, e.rejected) for e in got] == [(e.prompt, e.chosen, e.rejected) for e in expected]

    for path in ("pairs.csv", "pairs.tsv", "pairs.jsonl.gz", "parts/*.jsonl", "hub-like"):
        assert same(str(tmp_path / path)), path
    assert len(load_examples(str(tmp_path / "hub-like") + ":test")) == 1


def test_data_path_errors_are_one_paragraph(tmp_path, monkeypatch):
    from fastdadpo.base.errors import DataError
    from fastdadpo.core.rows import load_examples

    with pytest.raises(DataError, match=r"nothing-\*\.jsonl: matches no file"):
        load_examples(str(tmp_path / "nothing-*.jsonl"))
    _rows_file(tmp_path, PAIRS, "x.jsonl"), (tmp_path / "x.xlsx").write_text("")
    with pytest.raises(DataError, match="matches files of unknown formats"):
        load_examples(str(tmp_path / "x.*"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(DataError) as error:
        load_examples("no-such-owner/no-such-dataset")
    text = str(error.value)
    assert text.startswith("no-such-owner/no-such-dataset: cannot be read through datasets.load_dataset")
    assert "looked up as a Hugging Face Hub dataset" in text and "\n" not in text
    with pytest.raises(DataError, match="does not exist"):
        load_examples(str(tmp_path / "typo.jsonl"))  # a missing local file is not looked up on the Hub
    (tmp_path / "empty.jsonl").mkdir()  # a directory with a data file's name: local, never the Hub
    with pytest.raises(DataError) as error:
        load_examples(str(tmp_path / "empty.jsonl"))
    assert "a local directory is read as save_to_disk's output" in str(error.value)
    assert "Hub dataset (NAME" not in str(error.value)


# --- progress with ETA in every long stage ----------------------------------------------------------------

def _in_pty(command, columns, env, cwd):
    """The combined output of ``command`` run with stdout and stderr on a pseudo-terminal ``columns`` wide."""
    import fcntl
    import os
    import pty
    import struct
    import subprocess
    import termios

    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 40, columns, 0, 0))
    process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=follower, stderr=follower, env=env, cwd=cwd)
    os.close(follower)
    chunks = []
    while True:
        try:
            data = os.read(leader, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    process.wait(timeout=600)
    os.close(leader)
    return process.returncode, b"".join(chunks).decode("utf-8", "replace")


@pytest.mark.slow
def test_every_long_stage_shows_progress_with_eta_on_a_terminal(toy, tmp_path):
    """Under a pseudo-terminal: tqdm bars with their ETA ("<" between elapsed and remaining) for
    tokenization, the cached log-probs, training, and eval's generation; a zero-width terminal gets the
    plain lines with their ETA instead of nothing; a pipe gets the plain lines."""
    import json
    import re
    import subprocess
    import sys

    from test_trainer import REPO

    env = {k: v for k, v in _env().items() if k not in ("COLUMNS", "LINES")}
    config = _config(toy, tmp_path, "dpo", train__max_steps=3, data__cache_dir=str(tmp_path / "fresh-cache"))
    code, wide = _in_pty([sys.executable, "-m", "fastdadpo", "train", config, "--set",
                          f"train.output_dir={tmp_path / 'wide'}"], 120, env, REPO)
    assert code == 0, wide[-3000:]
    for stage in ("tokenize", "log-probs", "train"):
        assert re.search(stage + r":.*\|.*\[\d\d:\d\d<\d\d:\d\d", wide), (stage, wide[-3000:])
    code, narrow = _in_pty([sys.executable, "-m", "fastdadpo", "train", config, "--set",
                            f"train.output_dir={tmp_path / 'narrow'}", "--set",
                            f"data.cache_dir={tmp_path / 'other-cache'}"], 0, env, REPO)
    assert code == 0, narrow[-3000:]
    assert re.search(r"\[tokenize\] \d+/\d+ rows \(100%\), .* eta \d+s", narrow), narrow[-3000:]
    assert re.search(r"\[fastdadpo\] step 3/3 loss \S+ tok/s \d+ eta \d+s", narrow)
    students = tmp_path / "students.json"
    students.write_text(json.dumps({"trained": str(tmp_path / "wide" / "final")}))
    prompts = _rows_file(tmp_path, [{k: json.loads(line)[k] for k in ("prompt", "answer")} for line in open(toy["eval"])],
                         "prompts.jsonl")  # no chosen: the teacher generates too
    evaluate = [sys.executable, "-m", "fastdadpo", "eval", "--teacher", toy["teacher"], "--students", str(students),
                "--data", prompts, "--max-new-tokens", "4", "--batch-size", "2"]
    code, shown = _in_pty(evaluate, 120, env, REPO)
    assert code == 0, shown[-3000:]
    for stage in ("eval teacher", "eval trained"):
        assert re.search(stage + r":.*\[\d\d:\d\d<\d\d:\d\d", shown), (stage, shown[-3000:])
    piped = subprocess.run(evaluate, capture_output=True, text=True, timeout=600, env=env, cwd=REPO)
    assert re.search(r"\[eval trained\] 6/6 prompts \(100%\), \S+ prompts/s, eta 0s", piped.stderr), piped.stderr


# --- trackers: train.report_to ------------------------------------------------------------------------------

WANDB_STAND_IN = '''
"""A recording stand-in for wandb: every call our trainer makes, appended to $WANDB_RECORD as JSON."""
import json, os

def _record(kind, **payload):
    with open(os.environ["WANDB_RECORD"], "a") as handle:
        handle.write(json.dumps({"call": kind, **payload}) + "\\n")

class _Run:
    def log(self, data, step=None):
        _record("log", data=data, step=step)
    def finish(self):
        _record("finish")

def init(**kwargs):
    _record("init", mode=os.environ.get("WANDB_MODE"), **{k: v for k, v in kwargs.items() if k != "config"},
            config_keys=sorted(kwargs.get("config") or {}))
    return _Run()
'''


def test_report_to_names_and_missing_packages(tmp_path):
    from fastdadpo.base.errors import ConfigError
    from fastdadpo.commands.config import load_config

    path = _write(tmp_path, "c.yaml", {"report_to": "tensorboard"})
    assert load_config(path).train.report_to == ["tensorboard"]
    assert load_config(path, ["train.report_to=none"]).train.report_to == ["none"]
    with pytest.raises(ConfigError, match=r"train.report_to names \['comet'\]; choose from jsonl, tensorboard, wandb"):
        load_config(path, ["train.report_to=[comet]"])
    import importlib.util

    if importlib.util.find_spec("wandb") is None:
        with pytest.raises(ConfigError, match=r"asks for wandb, which is not installed: pip install 'fastdadpo\[wandb\]'"):
            load_config(path, ["train.report_to=[wandb]"])


@pytest.mark.slow
def test_tensorboard_and_wandb_receive_every_step(toy, tmp_path):
    import json

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    stand_in = tmp_path / "stand-in" / "wandb"
    stand_in.mkdir(parents=True)
    (stand_in / "__init__.py").write_text(WANDB_STAND_IN)
    record = tmp_path / "wandb.jsonl"
    env = _env(PYTHONPATH=str(stand_in.parent), WANDB_MODE="offline", WANDB_RECORD=str(record))
    config = _config(toy, tmp_path, "dpo", train__max_steps=3, train__save_every=2)
    run = tmp_path / "run"
    _train(config, f"train.output_dir={run}", "train.report_to=[tensorboard, wandb]", env=env)
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("loss")] == [1, 2, 3]
    assert [e.step for e in events.Scalars("rewards/accuracies")] == [1, 2, 3]
    calls = [json.loads(line) for line in record.read_text().splitlines()]
    init = calls[0]
    assert init["call"] == "init" and init["mode"] == "offline" and init["resume"] == "allow"
    assert init["project"] == "fastdadpo" and init["name"] == "run" and "train" in init["config_keys"]
    assert (run / "wandb-run-id").read_text() == init["id"]
    logged = [c for c in calls if c["call"] == "log"]
    assert [c["step"] for c in logged] == [1, 2, 3] and all("loss" in c["data"] for c in logged)
    assert calls[-1]["call"] == "finish"
    # A resume continues the same W&B run, from the resumed step.
    record.unlink()
    _train(config, f"train.output_dir={run}", "train.report_to=[tensorboard, wandb]", "train.max_steps=4",
           f"train.resume={run / 'checkpoints' / 'step-2'}", env=env)
    calls = [json.loads(line) for line in record.read_text().splitlines()]
    assert calls[0]["id"] == init["id"] and [c["step"] for c in calls if c["call"] == "log"] == [3, 4]


@pytest.mark.slow
def test_the_real_wandb_records_every_step_offline(toy, tmp_path):
    """W&B itself (the locked release, offline: no network, no account): the run is written under the
    output directory with the id kept there, every metric in it, and a resume continues the same run."""
    pytest.importorskip("wandb")
    env = _env(WANDB_MODE="offline", WANDB_SILENT="true", WANDB_DISABLE_GIT="true")
    config = _config(toy, tmp_path, "dpo", train__max_steps=3, train__save_every=2)
    run = tmp_path / "run"
    _train(config, f"train.output_dir={run}", "train.report_to=wandb", env=env)
    run_id = (run / "wandb-run-id").read_text()
    (first,) = (run / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb")
    records = first.read_bytes()  # W&B's protobuf records: the metric names and the config travel as text
    for name in (b"loss", b"rewards/accuracies", b"rewards/margins", b"_step", b"micro_batch_size"):
        assert name in records, name
    _train(config, f"train.output_dir={run}", "train.report_to=wandb", "train.max_steps=4",
           f"train.resume={run / 'checkpoints' / 'step-2'}", env=env)
    assert len(list((run / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb"))) == 2  # the same run id


def test_default_report_writes_no_tensorboard(toy, tmp_path):
    run = tmp_path / "plain"
    _train(_config(toy, tmp_path, "dpo", train__max_steps=1), f"train.output_dir={run}")
    assert (run / "metrics.jsonl").exists() and not (run / "tensorboard").exists()


@pytest.mark.parametrize("name, total, ratio, expected", [
    # By hand, as transformers documents each (warmup steps: ceil(total x ratio), as TRL's trainers count them).
    ("linear", 10, 0.2, [0.0, 0.5] + [(10 - step) / 8 for step in range(2, 10)]),
    ("constant", 10, 0.2, [1.0] * 10),
    ("constant_with_warmup", 10, 0.2, [0.0, 0.5] + [1.0] * 8),
    ("cosine", 6, 0.0, [0.5 * (1 + math.cos(math.pi * step / 6)) for step in range(6)]),
    ("inverse_sqrt", 8, 0.25, [0.0, 0.5] + [1 / math.sqrt((step + 2) / 2) for step in range(6)]),
    # Ours: warmup from 1/warmup (a first step that changes something), then cosine to 0.
    ("warmup_cosine", 6, 0.3, [0.5, 1.0] + [0.5 * (1 + math.cos(math.pi * step / 4)) for step in range(4)]),
])
def test_each_lr_scheduler_type_gives_its_documented_factors(name, total, ratio, expected):
    from fastdadpo.engine.interface import OptimizerSettings

    settings = OptimizerSettings(micro_batch_size=1, grad_accum=1, lr=1.0, weight_decay=0.0, max_grad_norm=1.0,
                                 warmup_ratio=ratio, total_steps=total, schedule=name)
    factor = settings.lr_factor()
    assert [factor(step) for step in range(total)] == pytest.approx(expected, abs=1e-12)


def test_a_trl_config_with_a_linear_schedule_trains_on_it(toy, tmp_path):
    """TRL's `lr_scheduler_type: linear` (its default) under TRL's names: the rates logged are
    transformers' linear schedule (4 steps, 1 of warmup), where ours would log warmup then cosine;
    an unknown type is one paragraph naming the choices."""
    import yaml

    config = _config(toy, tmp_path, "dpo", train__max_steps=4, train__warmup_ratio=0.25)
    raw = yaml.safe_load(open(config))
    raw["train"]["learning_rate"] = raw["train"].pop("lr")
    raw["train"]["lr_scheduler_type"] = "linear"
    with open(config, "w") as handle:
        yaml.safe_dump(raw, handle)
    run = tmp_path / "linear"
    _train(config, f"train.output_dir={run}")
    rates = [row["lr"] for row in _metrics(run) if "lr" in row]
    assert rates == pytest.approx([0.0, 3e-3, 2e-3, 1e-3], abs=1e-12), rates
    result = _train(config, "train.lr_scheduler_type=cosine_with_min_lr", check=False)
    assert result.returncode == 2 and "train.lr_scheduler_type" in result.stderr
    assert "choose from warmup_cosine, linear" in result.stderr and "Traceback" not in result.stderr
