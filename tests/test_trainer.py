"""`fastdadpo train` end to end on tiny real models: DeepSpeed ZeRO-3 (shards really partitioned),
one process and two gloo ranks under torchrun, every objective, exact resume, SIGTERM, export,
fused vs naive kernels, and clear errors for bad input."""
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml

TIMEOUT = 600


@pytest.fixture(scope="session")
def toy(tmp_path_factory, tokenizer):
    """A learnable preference set (chosen: the right answer, rejected: wrong words) and tiny models:
    a Qwen2 student, a wider teacher with a padded head, and a teacher reference for ADPA."""
    from fastdadpo.demo.synthetic import WORDS, make_examples, save_model_dir, tiny_causal_lm

    root = tmp_path_factory.mktemp("toy")
    models = {}
    for name, kwargs in {"student": dict(hidden_size=32, layers=2, seed=1),
                         "teacher": dict(vocab_size=len(tokenizer) + 64, hidden_size=48, layers=2, seed=2),
                         "teacher_reference": dict(vocab_size=len(tokenizer) + 64, hidden_size=48, layers=2,
                                                   seed=3)}.items():
        model = tiny_causal_lm(kwargs.pop("vocab_size", len(tokenizer)), pad_token_id=tokenizer.pad_token_id,
                               eos_token_id=tokenizer.eos_token_id, **kwargs)
        models[name] = save_model_dir(model, tokenizer, str(root / name))
    rng = random.Random(0)
    rows = [{"prompt": r["prompt"], "chosen": r["answer"], "rejected": " ".join(rng.sample(WORDS, 3)),
             "answer": r["answer"]} for r in make_examples(32, seed=4, tasks=("repeat", "first"))]
    train = root / "train.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in rows))
    evaluation = root / "eval.jsonl"
    evaluation.write_text("".join(json.dumps(r) + "\n" for r in rows[:6]))
    return dict(models, train=str(train), eval=str(evaluation), cache=str(root / "cache"), root=root)


def _config(toy, tmp_path, objective: str, **overrides) -> str:
    config = {
        "model": {"student": toy["student"], "teacher": toy["teacher"], "teacher_reference": toy["teacher_reference"]},
        "data": {"train": toy["train"], "max_length": 64, "max_prompt_length": 40, "cache_dir": toy["cache"]},
        "objective": {"name": objective},
        "train": {"micro_batch_size": 2, "grad_accum": 1, "lr": 3e-3, "max_steps": 6, "warmup_ratio": 0.0,
                  "output_dir": str(tmp_path / "run"), "seed": 7},
        "deepspeed": {"zero_stage": 3, "extra": {"zero_optimization": {"stage3_param_persistence_threshold": 0}}},
    }
    for key, value in overrides.items():
        section, name = key.split("__")
        config[section][name] = value
    path = tmp_path / f"{objective}.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env(**extra):
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    env.update(extra)
    return env


def _train(config: str, *sets: str, ranks: int = 1, env=None, check=True):
    if ranks == 1:
        command = [sys.executable, "-m", "fastdadpo", "train", config]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}",
                   "-m", "fastdadpo", "train", config]
    for item in sets:
        command += ["--set", item]
    # From the repository root, as a user runs it (its folders must not shadow installed packages).
    result = subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT, env=env or _env(), cwd=REPO)
    if check:
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return result


def _metrics(run_dir) -> list:
    with open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


OBJECTIVE_SETTINGS = {
    "sft": {}, "kd": {"objective__ce_weight": 0.5}, "dpo": {}, "dadpo": {}, "dadpo_token": {}, "dckd": {},
    "adpa": {},
}


# daDPO on two ranks stays in the fast tier; the other objectives run in the full suite.
@pytest.mark.parametrize("objective", [pytest.param(name, marks=() if name == "dadpo" else pytest.mark.slow)
                                       for name in OBJECTIVE_SETTINGS])
def test_every_objective_trains_on_two_ranks(toy, tmp_path, objective):
    """Each objective trains under ZeRO-3 on two gloo ranks; its loss on a fixed held set falls."""
    config = _config(toy, tmp_path, objective, train__max_steps=8, data__eval=toy["eval"], train__eval_every=1,
                     **OBJECTIVE_SETTINGS[objective])
    _train(config, ranks=2)
    rows = _metrics(tmp_path / "run")
    assert [r["step"] for r in rows] == list(range(1, 9))
    held = [r["eval/loss"] for r in rows]
    assert held[-1] < held[0], f"{objective}: the held-set loss did not fall: {held}"
    for key in ("lr", "grad_norm", "tokens_per_s", "peak_mem_gb"):
        assert all(key in r for r in rows)
    if objective in ("dpo", "dadpo", "dadpo_token"):
        assert {"rewards/chosen", "rewards/margin", "rewards/accuracy", "logps/rejected"} <= set(rows[0])
    if objective in ("kd", "dadpo_token", "dckd"):
        assert "kd/divergence" in rows[0]
    if objective == "adpa":
        assert "adpa/advantage" in rows[0]
    assert os.path.exists(tmp_path / "run" / "final" / "model.safetensors")


@pytest.mark.slow
def test_two_ranks_follow_one_rank(toy, tmp_path):
    """2 ranks x micro-batch 1, 1 rank x micro-batch 2 and 1 rank x micro-batch 1 x 2 accumulations
    compute the same steps (global normalizers, the same examples in each optimizer step), with
    activation checkpointing on or off."""
    # An odd eval set: with two ranks one of them runs a dummy micro-batch in the final evaluation,
    # which must not count; every example counts once whatever the layout.
    odd_eval = tmp_path / "eval5.jsonl"
    odd_eval.write_text("".join(open(toy["eval"]).readlines()[:5]))
    runs = {}
    # Activation checkpointing (on in two of the three) recomputes the same activations: the same steps.
    for name, ranks, micro, accum, checkpointing in (("two_ranks", 2, 1, 1, True), ("one_rank", 1, 2, 1, False),
                                                     ("accumulated", 1, 1, 2, True)):
        out = tmp_path / name
        config = _config(toy, tmp_path, "dadpo_token", train__micro_batch_size=micro, train__grad_accum=accum,
                         train__output_dir=str(out), train__max_steps=4, data__eval=str(odd_eval),
                         train__gradient_checkpointing=checkpointing)
        _train(config, ranks=ranks)
        runs[name] = _metrics(out)
    for other in ("one_rank", "accumulated"):
        assert len(runs["two_ranks"]) == len(runs[other]) == 4
        for a, b in zip(runs["two_ranks"], runs[other]):
            for key in ("loss", "kd/divergence", "rewards/margin", "grad_norm"):
                assert a[key] == pytest.approx(b[key], rel=2e-5, abs=1e-6), (other, key, a["step"])
        final_two, final_other = runs["two_ranks"][-1], runs[other][-1]
        for key in ("eval/loss", "eval/kd/divergence", "eval/rewards/margin", "eval/logps/chosen"):
            assert final_two[key] == pytest.approx(final_other[key], rel=2e-5, abs=1e-6), (other, key)


@pytest.mark.slow
def test_resume_reproduces_the_uninterrupted_run(toy, tmp_path):
    full = tmp_path / "full"
    config = _config(toy, tmp_path, "dpo", train__output_dir=str(full), train__save_every=3, train__max_steps=6)
    _train(config)
    assert sorted(os.listdir(full / "checkpoints")) == ["step-3", "step-6"]
    resumed = tmp_path / "resumed"
    _train(config, f"train.output_dir={resumed}", f"train.resume={full / 'checkpoints' / 'step-3'}")
    expected, actual = _metrics(full)[3:], _metrics(resumed)
    assert [r["step"] for r in actual] == [4, 5, 6]
    for a, b in zip(actual, expected):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6, abs=1e-7)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-6)


@pytest.mark.slow
def test_sigterm_checkpoints_then_resume_continues(toy, tmp_path):
    uninterrupted = tmp_path / "uninterrupted"
    config = _config(toy, tmp_path, "sft", train__max_steps=40, train__micro_batch_size=1,
                     train__output_dir=str(uninterrupted))
    _train(config)
    interrupted = tmp_path / "interrupted"
    process = subprocess.Popen([sys.executable, "-m", "fastdadpo", "train", config, "--set",
                                f"train.output_dir={interrupted}"], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env=_env())
    metrics_file = interrupted / "metrics.jsonl"
    deadline = time.time() + TIMEOUT
    while time.time() < deadline and not (metrics_file.exists() and metrics_file.read_text().count("\n") >= 2):
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=TIMEOUT)
    assert process.returncode == 0, stderr[-3000:]
    assert "stopped by SIGTERM" in stdout
    saved = [d for d in os.listdir(interrupted / "checkpoints") if d.startswith("step-")]
    assert len(saved) == 1 and not os.path.exists(interrupted / "final")
    stopped_at = int(saved[0].split("-")[1])
    assert 2 <= stopped_at < 40
    with open(metrics_file, "a", encoding="utf-8") as handle:  # what a kill during an append leaves
        handle.write('{"step": 99, "lo')
    resumed = _train(config, f"train.output_dir={interrupted}", "train.resume=true")
    assert "dropped 1 unreadable line" in resumed.stdout
    expected, actual = _metrics(uninterrupted), _metrics(interrupted)
    assert [r["step"] for r in actual] == list(range(1, 41))
    for a, b in zip(actual, expected):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6, abs=1e-7), a["step"]


@pytest.mark.slow
def test_a_killed_rank_ends_the_others_with_one_paragraph(toy, tmp_path):
    """SIGKILL one of two ranks mid-run: the other ends with one paragraph naming the lost rank and
    the last complete checkpoint (no backend traceback), and the checkpoints written stay complete."""
    import psutil

    out = tmp_path / "run"
    config = _config(toy, tmp_path, "sft", train__max_steps=200, train__micro_batch_size=1, train__save_every=2)
    logs = tmp_path / "logs"
    process = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                                f"--log-dir={logs}", "--redirects=3", "-m", "fastdadpo", "train", config],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    deadline = time.time() + TIMEOUT
    while time.time() < deadline and not ((out / "checkpoints" / "step-2").exists() and process.poll() is None):
        time.sleep(0.1)
    victim = next(child for child in psutil.Process(process.pid).children(recursive=True)
                  if child.environ().get("RANK") == "1" and "fastdadpo" in " ".join(child.cmdline()))
    victim.kill()
    process.communicate(timeout=TIMEOUT)
    assert process.returncode != 0
    (rank0_stderr,) = [path for path in logs.rglob("stderr.log") if path.parent.name == "0"]
    text = rank0_stderr.read_text()
    assert "lost contact with rank(s) 1" in text and "Traceback" not in text, text[-3000:]
    assert "last complete checkpoint is" in " ".join(text.split())
    for name in os.listdir(out / "checkpoints"):
        assert not name.startswith("step-") or (out / "checkpoints" / name / "complete.json").exists()


def test_exported_model_matches_the_engine(toy, tmp_path):
    """final/ loads with transformers, and its log-probs of the eval set equal those the engine
    computed after the last step (the final evaluation)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fastdadpo.core.batch import collate
    from fastdadpo.core.rows import load_examples
    from fastdadpo.core.tokenized import tokenize_examples

    config = _config(toy, tmp_path, "sft", data__eval=toy["eval"], train__max_steps=5)
    _train(config)
    final_eval = _metrics(tmp_path / "run")[-1]
    assert "eval/logps/chosen" in final_eval
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "run" / "final"), dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(tmp_path / "run" / "final"))
    examples = load_examples(toy["eval"], require=("prompt", "chosen"))
    tokenized, _ = tokenize_examples(examples, tokenizer, max_length=64, max_prompt_length=40,
                                          fields=("chosen",))
    batch = collate(tokenized, pad_token_id=tokenizer.pad_token_id, include_rejected=False)
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    logps = torch.log_softmax(logits.double(), -1).gather(-1, batch.targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    logps = torch.where(batch.targets >= 0, logps, 0.0)
    per_sequence = torch.zeros(batch.num_sequences, dtype=torch.float64).index_add(
        0, batch.target_sequence[batch.targets >= 0], logps[batch.targets >= 0])
    assert float(per_sequence.mean()) == pytest.approx(final_eval["eval/logps/chosen"], rel=1e-5)


@pytest.mark.parametrize("objective", ["dadpo_token", "kd"])
def test_fused_and_naive_paths_agree(toy, tmp_path, objective):
    results = {}
    for backend in ("torch", "naive"):
        out = tmp_path / backend
        config = _config(toy, tmp_path, objective, train__max_steps=1, train__output_dir=str(out))
        _train(config, env=_env(FASTDADPO_KERNEL_BACKEND=backend))
        results[backend] = _metrics(out)[0]
    assert results["torch"]["loss"] == pytest.approx(results["naive"]["loss"], rel=1e-5)
    assert results["torch"]["grad_norm"] == pytest.approx(results["naive"]["grad_norm"], rel=1e-4)


def test_non_finite_loss_stops_with_checkpoints_intact(toy, tmp_path, tokenizer):
    """A student whose embedding of one token (<|system|>, used by one example only) is NaN: the step
    that meets it stops the run with a clear message, before its optimizer step; checkpoints written
    before it stay complete."""
    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken"
    shutil.copytree(toy["student"], broken)
    weights = load_file(str(broken / "model.safetensors"))
    poisoned = tokenizer.convert_tokens_to_ids("<|system|>")
    weights["model.embed_tokens.weight"][poisoned] = float("nan")
    save_file(weights, str(broken / "model.safetensors"), metadata={"format": "pt"})
    data_file = tmp_path / "data.jsonl"
    rows = [json.loads(line) for line in open(toy["train"], encoding="utf-8")][:8]
    rows[5]["prompt"] = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": rows[5]["prompt"]}]
    data_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = _config(toy, tmp_path, "sft", model__student=str(broken), data__train=str(data_file),
                     train__micro_batch_size=1, train__max_steps=8, train__save_every=1)
    result = _train(config, check=False)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "non-finite" in result.stderr and "Traceback" not in result.stderr
    checkpoints = os.listdir(tmp_path / "run" / "checkpoints") if (tmp_path / "run" / "checkpoints").exists() else []
    for name in checkpoints:
        assert name.startswith("step-") and (tmp_path / "run" / "checkpoints" / name / "complete.json").exists()
    rows = _metrics(tmp_path / "run")
    assert len(rows) == len(checkpoints) and all(r["loss"] == r["loss"] for r in rows)


@pytest.mark.slow
def test_divergence_stops_the_run_at_every_zero_stage(toy, tmp_path):
    """An absurd learning rate: the gradient (or the loss) goes non-finite; the run ends with exit
    status 2 and one paragraph, exports no final/ model, and never logs a non-finite row."""
    for stage in (0, 3):
        out = tmp_path / f"zero{stage}"
        config = _config(toy, tmp_path, "sft", train__lr=1e6, train__max_steps=10, train__output_dir=str(out),
                         deepspeed__zero_stage=stage, deepspeed__extra={})
        result = _train(config, check=False)
        assert result.returncode == 2, (stage, result.stdout[-2000:], result.stderr[-3000:])
        assert "non-finite" in result.stderr and "Traceback" not in result.stderr
        assert not (out / "final").exists()
        rows = _metrics(out) if (out / "metrics.jsonl").exists() else []
        assert all(r["loss"] == r["loss"] and r["grad_norm"] == r["grad_norm"] for r in rows)


@pytest.mark.slow
def test_each_row_logs_the_rate_it_applied_and_the_gradient_norm_at_every_stage(toy, tmp_path):
    """Step 1 of a run without warm-up applies the full rate (logged before the scheduler moves on);
    grad_norm is logged under ZeRO-0 too, equal to ZeRO-3's. data.max_length alone (no
    max_prompt_length) is a valid config: the prompt limit follows it."""
    rows = {}
    for stage in (0, 3):
        out = tmp_path / f"zero{stage}"
        config = _config(toy, tmp_path, "sft", train__max_steps=2, train__output_dir=str(out),
                         deepspeed__zero_stage=stage, deepspeed__extra={}, data__max_prompt_length=None)
        _train(config)
        rows[stage] = _metrics(out)
    assert rows[3][0]["lr"] == pytest.approx(3e-3) and rows[3][1]["lr"] < 3e-3
    for a, b in zip(rows[0], rows[3]):
        assert a["grad_norm"] is not None and a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)


@pytest.mark.parametrize("change,message", [
    ({"objective__beta": 0.7}, "objective.beta is not a parameter of objective 'dadpo'"),
    ({"train__lrr": 1.0}, "unknown config key 'train.lrr'"),
    ({"model__teacher": None}, "model.teacher is required by objective 'dadpo'"),
    ({"deepspeed__extra": {"zero_optimization.stage3_prefetch_bucket_size": 5}}, "dotted"),
    ({"train__micro_batch_size": "two"}, "train.micro_batch_size must be an integer"),
])
def test_bad_configs_are_clear_errors(toy, tmp_path, change, message):
    config = _config(toy, tmp_path, "dadpo", **change)
    result = _train(config, check=False)
    assert result.returncode == 2
    assert message in " ".join(result.stderr.split()) and "Traceback" not in result.stderr


def test_bad_data_is_a_clear_error(toy, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "a", "chosen": \n')
    result = _train(_config(toy, tmp_path, "dpo", data__train=str(bad)), check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"{bad} line 2" in " ".join(result.stderr.split())


@pytest.mark.slow
def test_tied_embeddings_student_on_two_ranks(toy, tmp_path, llama_dir):
    """A Llama student whose LM head is its input embedding (one ZeRO-3 parameter, two uses)."""
    from transformers import AutoModelForCausalLM

    config = _config(toy, tmp_path, "kd", model__student=llama_dir, train__max_steps=3)
    _train(config, ranks=2)
    rows = _metrics(tmp_path / "run")
    assert len(rows) == 3 and all(r["loss"] == r["loss"] for r in rows)
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "run" / "final"))
    assert model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    trained = model.get_input_embeddings().weight
    original = AutoModelForCausalLM.from_pretrained(llama_dir).get_input_embeddings().weight
    assert not torch.equal(trained, original)


@pytest.mark.slow
def test_lora_student_trains_on_two_ranks_and_exports_merged_and_adapter(toy, tmp_path):
    """model.lora under ZeRO-3 on two ranks: only the adapters train (the loss falls), final/ is the
    merged model and loads with plain transformers, final-adapter/ is a PEFT adapter whose merge
    gives final/'s weights."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    config = _config(toy, tmp_path, "kd", train__max_steps=8, data__eval=toy["eval"], train__eval_every=4,
                     model__lora={"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj", "down_proj"]})
    result = _train(config, ranks=2)
    assert "LoRA: r 4, alpha 8 on 6 modules" in result.stdout
    rows = _metrics(tmp_path / "run")
    assert rows[-1]["eval/loss"] < rows[3]["eval/loss"]
    final = AutoModelForCausalLM.from_pretrained(str(tmp_path / "run" / "final"), dtype=torch.float32).state_dict()
    pristine = AutoModelForCausalLM.from_pretrained(toy["student"], dtype=torch.float32).state_dict()
    base = AutoModelForCausalLM.from_pretrained(toy["student"], dtype=torch.float32)
    merged = PeftModel.from_pretrained(base, str(tmp_path / "run" / "final-adapter")).merge_and_unload().state_dict()
    assert set(final) == set(merged) == set(pristine)
    for key, value in final.items():
        torch.testing.assert_close(value, merged[key], rtol=1e-5, atol=1e-6, msg=key)
    adapted = [k for k in final if k.endswith(("q_proj.weight", "v_proj.weight", "down_proj.weight"))]
    assert len(adapted) == 6 and all(not torch.equal(final[k], pristine[k]) for k in adapted)
    assert all(torch.equal(final[k], pristine[k]) for k in final if k not in adapted)  # frozen: untouched


@pytest.mark.slow
def test_cached_log_probs_are_reused_across_runs(toy, tmp_path):
    config = _config(toy, tmp_path, "dadpo", train__max_steps=1, data__cache_dir=str(tmp_path / "cache"))
    first = _train(config, f"train.output_dir={tmp_path / 'first'}")
    second = _train(config, f"train.output_dir={tmp_path / 'second'}")
    assert "computing reference log-probs" in first.stdout and "computing teacher log-probs" in first.stdout
    assert "computing" not in second.stdout
    assert _metrics(tmp_path / "first")[0]["loss"] == _metrics(tmp_path / "second")[0]["loss"]


@pytest.mark.slow
def test_cached_log_probs_follow_examples_when_rows_are_dropped(toy, tmp_path):
    """A row dropped at tokenization (empty chosen) shifts list positions against data rows; the
    cached reference and teacher log-probs must still belong to their own examples: the same steps
    as on the file without that row."""
    lines = open(toy["train"]).readlines()
    empty = json.dumps({"prompt": "say nothing", "chosen": "", "rejected": "x"}) + "\n"
    with_dropped = tmp_path / "with_dropped.jsonl"
    with_dropped.write_text("".join(lines[:3]) + empty + "".join(lines[3:]))
    runs = {}
    for name, train_file in (("clean", toy["train"]), ("with_dropped", str(with_dropped))):
        out = tmp_path / name
        config = _config(toy, tmp_path, "dadpo", data__train=train_file, train__max_steps=3,
                         train__output_dir=str(out), data__cache_dir=str(tmp_path / f"cache-{name}"))
        result = _train(config)
        runs[name] = _metrics(out)
    assert "dropped 1" in result.stdout + result.stderr
    for a, b in zip(runs["clean"], runs["with_dropped"]):
        for key in ("loss", "rewards/margin", "rewards/chosen", "grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), (key, a["step"])


# --- soft-capped logits: a Gemma-2-shaped student and teacher at V = 256,000 --------------------------------

GEMMA_VOCAB = 256_000


@pytest.fixture(scope="module")
def gemma(tmp_path_factory):
    """A tokenizer that fills a 256,000-row head (a BPE on the task's texts, padded with entries no
    input reaches, so divergences run over every row) and tiny Gemma-2 models built from their
    config: final_logit_softcapping 30 and attn_logit_softcapping 50 as Gemma 2 has, tied
    embeddings, heads scaled so raw logits reach several caps (the cap bends them)."""
    from tokenizers import Tokenizer
    from transformers import Gemma2Config, Gemma2ForCausalLM, PreTrainedTokenizerFast

    from fastdadpo.demo.synthetic import build_tokenizer, save_model_dir, task_corpus

    learned = build_tokenizer(task_corpus(400, seed=0), vocab_size=320)
    state = json.loads(learned.backend_tokenizer.to_str())
    vocab = state["model"]["vocab"]
    for index in range(len(vocab), GEMMA_VOCAB):
        vocab[f"\u2400{index}"] = index  # outside the byte-level alphabet: never produced
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(state)), eos_token="<|end|>",
                                        pad_token="<|pad|>")
    tokenizer.chat_template = learned.chat_template
    assert len(tokenizer) == GEMMA_VOCAB
    root = tmp_path_factory.mktemp("gemma")
    paths = {}
    for name, hidden, seed in (("student", 16, 1), ("teacher", 24, 2)):
        config = Gemma2Config(vocab_size=GEMMA_VOCAB, hidden_size=hidden, intermediate_size=2 * hidden,
                              num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                              query_pre_attn_scalar=8, sliding_window=16, max_position_embeddings=128,
                              final_logit_softcapping=30.0, attn_logit_softcapping=50.0,
                              pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                              bos_token_id=None)
        torch.manual_seed(seed)
        model = Gemma2ForCausalLM(config)
        with torch.no_grad():
            model.get_output_embeddings().weight.normal_(0.0, 12.0 / hidden**0.5)
        paths[name] = save_model_dir(model, tokenizer, str(root / name))
    return paths


def test_gemma2_head_options_reproduce_the_models_own_logits(gemma):
    """What head_logit_options reads from a Gemma-2 config, given to the kernels, gives the
    log-probs of the model's own forward (which soft-caps its logits), and they are far from the
    uncapped ones."""
    from transformers import AutoModelForCausalLM

    from fastdadpo.models.loading import final_hidden_states, head_logit_options, head_weight
    from fastdadpo.kernels import fused_linear_logprobs

    model = AutoModelForCausalLM.from_pretrained(gemma["student"], dtype=torch.float32)
    options = head_logit_options(model.config, "model.student")
    assert options == {"softcap": 30.0, "logit_scale": 1.0}
    ids = torch.randint(0, 300, (1, 12), generator=torch.Generator().manual_seed(0))
    targets = torch.randint(0, GEMMA_VOCAB, (1, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = model(ids).logits
        expected = torch.log_softmax(logits, -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        hidden = final_hidden_states(model, ids)
        fused = fused_linear_logprobs(hidden, head_weight(model), targets, impl="torch", **options)
        uncapped = fused_linear_logprobs(hidden, head_weight(model), targets, impl="torch")
    assert float(logits.abs().max()) > 20  # the cap matters here
    torch.testing.assert_close(fused, expected, atol=1e-4, rtol=1e-4)
    assert float((uncapped - expected).abs().max()) > 1.0


def test_head_options_from_each_config_name():
    """Each config name maps to a soft cap or a scale as its architecture's forward applies it;
    names whose meaning differs or is unknown stay refused with the reason."""
    from types import SimpleNamespace as Config

    from fastdadpo.base.errors import ConfigError
    from fastdadpo.models.loading import head_logit_options

    assert head_logit_options(Config(model_type="qwen2"), "k") == {"softcap": None, "logit_scale": 1.0}
    assert head_logit_options(Config(model_type="gemma2", final_logit_softcapping=30.0), "k")["softcap"] == 30.0
    assert head_logit_options(Config(model_type="gemma2", final_logit_softcapping=None), "k")["softcap"] is None
    assert head_logit_options(Config(model_type="cohere", logit_scale=0.0625), "k")["logit_scale"] == 0.0625
    assert head_logit_options(Config(model_type="granite", logits_scaling=8.0), "k")["logit_scale"] == 0.125
    assert head_logit_options(Config(model_type="minicpm3", logits_scaling=4.0), "k")["logit_scale"] == 0.25
    assert head_logit_options(Config(model_type="hyperclovax", logits_scaling=2.0), "k")["logit_scale"] == 2.0
    for config, message in ((Config(model_type="llama", logits_scaling=8.0), "logits_scaling=8.0"),
                            (Config(model_type="x", output_multiplier_scale=0.5), "output_multiplier_scale"),
                            (Config(model_type="gemma2", final_logit_softcapping=-3.0), "final_logit_softcapping")):
        with pytest.raises(ConfigError, match=message):
            head_logit_options(config, "model.teacher")


@pytest.mark.slow
def test_gemma2_soft_capped_models_train_with_dadpo_token_on_two_ranks(toy, tmp_path, gemma):
    """The must-show: a Gemma-2-shaped student and teacher (soft-capped logits, V = 256,000) train
    with dadpo_token under 2-rank ZeRO-3 with the fused kernels; and on one rank the fused first
    step equals the materialized (naive) one, loss and gradient norm."""
    common = dict(model__student=gemma["student"], model__teacher=gemma["teacher"], model__teacher_reference=None,
                  data__max_length=40, data__max_prompt_length=24, train__micro_batch_size=1)
    config = _config(toy, tmp_path, "dadpo_token", train__max_steps=2, **common)
    _train(config, ranks=2)
    rows = _metrics(tmp_path / "run")
    assert [r["step"] for r in rows] == [1, 2]
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["kd/divergence"]) for r in rows)
    assert rows[-1]["loss"] != rows[0]["loss"]
    assert os.path.exists(tmp_path / "run" / "final" / "model.safetensors")
    first = {}
    for backend in ("torch", "naive"):
        out = tmp_path / backend
        config = _config(toy, tmp_path, "dadpo_token", train__max_steps=1, train__output_dir=str(out),
                         data__cache_dir=str(tmp_path / "cache"), **common)
        _train(config, env=_env(FASTDADPO_KERNEL_BACKEND=backend))
        first[backend] = _metrics(out)[0]
    # fp32 sums over 256,000 columns of logits near the cap: both paths are within ~7e-5 of float64
    # (the kernels' own tests compare with float64 at 1e-4 and below); a cap missing from either
    # path moves the divergence by whole nats.
    assert first["torch"]["loss"] == pytest.approx(first["naive"]["loss"], rel=2e-4)
    assert first["torch"]["kd/divergence"] == pytest.approx(first["naive"]["kd/divergence"], rel=2e-4)
    assert first["torch"]["grad_norm"] == pytest.approx(first["naive"]["grad_norm"], rel=2e-4)


def test_a_failing_run_leaves_a_finished_runs_config(toy, tmp_path):
    """A run that stops on bad input in a finished run's output_dir (exit 2) leaves that run's
    config.yaml as it was: the file is written only once every input has loaded."""
    data = tmp_path / "data.jsonl"
    data.write_text(open(toy["train"], encoding="utf-8").read())
    config = _config(toy, tmp_path, "sft", train__max_steps=1, data__train=str(data))
    _train(config)
    written = (tmp_path / "run" / "config.yaml").read_bytes()
    # The same run continued (a fresh one over its checkpoints is refused up front), its data file
    # since damaged: it fails on the data, after the output directory's checks.
    data.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "a", "chosen": \n')
    failed = _train(config, "train.resume=true", "train.lr=1e-4", check=False)
    assert failed.returncode == 2, failed.stderr[-3000:]
    assert "data.jsonl line 2: malformed JSON" in " ".join(failed.stderr.split())
    assert (tmp_path / "run" / "config.yaml").read_bytes() == written


def test_a_resume_with_other_models_or_over_a_final_model_is_refused(toy, tmp_path):
    """A checkpoint records its models by path and by a fingerprint of their files: a resume with
    another teacher, or with other weights put at the same path, is another run; and a fresh run
    never replaces an earlier run's final model."""
    teacher = tmp_path / "teacher"
    shutil.copytree(toy["teacher"], teacher)
    config = _config(toy, tmp_path, "dadpo", train__max_steps=1, train__save_every=1, model__teacher=str(teacher))
    _train(config)
    run = tmp_path / "run"
    other = _train(config, "train.resume=true", f"model.teacher={toy['teacher_reference']}", check=False)
    assert other.returncode == 2 and "was written by another run: its model.teacher" in " ".join(other.stderr.split())
    shutil.copy(os.path.join(toy["teacher_reference"], "model.safetensors"), teacher / "model.safetensors")
    swapped = _train(config, "train.resume=true", check=False)
    assert swapped.returncode == 2 and f"model.teacher ({teacher}) holds other weights" in \
        " ".join(swapped.stderr.split())
    shutil.rmtree(run / "checkpoints")
    fresh = _train(config, check=False)
    assert fresh.returncode == 2 and "holds an earlier run's final model" in " ".join(fresh.stderr.split())
    assert "Traceback" not in other.stderr + swapped.stderr + fresh.stderr


@pytest.mark.slow
def test_a_rank_stopped_during_setup_ends_the_other_with_one_paragraph(toy, tmp_path):
    """Rank 1 SIGSTOPped as soon as it starts (before the process group forms, or while models load):
    rank 0 gives up at train.timeout_minutes with the lost-rank paragraph, never a gloo or store
    traceback, and never waits for the default 30 minutes."""
    import psutil

    config = _config(toy, tmp_path, "dpo", train__max_steps=2, train__timeout_minutes=0.25)
    logs = tmp_path / "logs"
    process = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                                f"--log-dir={logs}", "--redirects=3", "-m", "fastdadpo", "train", config],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(),
                               start_new_session=True)
    victim, rank0 = None, None
    try:
        deadline = time.time() + 60
        def rank1():
            for child in psutil.Process(process.pid).children(recursive=True):
                try:  # the rank itself, not a helper process it starts (a compiler) with its environment
                    if child.environ().get("RANK") == "1" and "fastdadpo" in " ".join(child.cmdline()):
                        return child
                except psutil.Error:  # gone between the listing and the look
                    pass
            return None

        while victim is None and time.time() < deadline:
            victim = rank1()
            time.sleep(0.01)
        assert victim is not None, "rank 1 never started"
        victim.suspend()
        stopped_at = time.time()
        while time.time() < stopped_at + 150 and rank0 is None:
            found = [p for p in logs.rglob("stderr.log") if p.parent.name == "0"]
            if found and "lost contact" in found[0].read_text():
                rank0 = found[0].read_text()
            time.sleep(0.2)
        waited = time.time() - stopped_at
    finally:
        if victim is not None and victim.is_running():
            victim.kill()
        process.communicate(timeout=TIMEOUT)
    seen = {p.parent.name: p.read_text()[-2500:] for p in logs.rglob("stderr.log")}
    assert rank0 is not None, f"rank 0 never gave up on the stopped rank: {seen}"
    assert waited < 120, waited  # 15 s per collective, not the default 30 minutes
    text = " ".join(rank0.split())
    # Stopped before it joined the process group, or while the models loaded: either phase is named.
    assert ("lost contact with rank(s) 1 while forming the process group" in text
            or "lost contact with rank(s) 1 while setting up" in text), rank0[-3000:]
    assert "Traceback" not in rank0, rank0[-3000:]
