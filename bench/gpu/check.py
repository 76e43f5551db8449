"""The Python stages of ``bench/gpu/check.sh``: kernel correctness in bf16 against float64, one
``fastdadpo train`` step at Qwen2.5 shapes, and the summary (JSON + Markdown). Each stage writes its
own JSON under the output folder as it goes, so a stage cut short by its time limit still leaves
what it finished.

    python bench/gpu/check.py correctness --out DIR [--dry-run]
    python bench/gpu/check.py train --out DIR [--deadline-s S] [--dry-run]
    python bench/gpu/check.py summary --out DIR

``--dry-run``: tiny sizes on CPU (the Triton kernels under TRITON_INTERPRET=1, the chunked backend
in bf16 on its CUDA path and the tile-fused kernels in fp32; the train step on tiny models with the
torch backend), to check the script's own code without a GPU.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

# --- kernel correctness --------------------------------------------------------------------------------------

# The configurations: N=8192 tokens, student H=2048, teacher H=4096, Llama-3's and Qwen2.5's vocabularies.
GPU_CONFIGS = [dict(tokens=8192, student_hidden=2048, teacher_hidden=4096, vocab=v) for v in (128256, 151936)]
DRY_CONFIGS = [dict(tokens=40, student_hidden=24, teacher_hidden=40, vocab=v) for v in (97, 131)]
# Each case exercises one path of the backends: both outputs reduced (weights=: the gradient formed
# in the forward sweep), a per-token divergence (recompute both models), per-token log-probs (DPO:
# recompute the student only), the divergence reduced and the log-probs per token (dadpo_token).
CASES = {
    "kd_reduced": dict(kind="forward_kl", targets=True, div_reduced=True, logp_reduced=True),
    "jsd_per_token": dict(kind="jsd", targets=False, div_reduced=False, logp_reduced=False),
    "logprobs_per_token": dict(kind=None, targets=True, div_reduced=False, logp_reduced=False),
    "dadpo_token_shape": dict(kind="reverse_kl", targets=True, div_reduced=True, logp_reduced=False),
}
# bf16 inputs are exact in float64, so the reference sees the same numbers: what differs is fp32
# arithmetic, the bf16 d(loss)/d(logits) the gradient GEMMs take and the bf16 rounding of the
# returned gradients (2^-8 relative at most). The chunked backend's bf16 dh and dW came within
# 4e-3 relative Frobenius of float64 at V = 128k-152k (bench/results/cpu-bf16-accumulation.md).
VALUE_ATOL, VALUE_RTOL, GRAD_REL_FROBENIUS = 2e-2, 2e-2, 2e-2
REFERENCE_ROWS = 512  # rows per block of the float64 reference (~1 GB of fp64 logits per head at V=128k)


def _inputs(config, device, dtype, seed=0):
    import torch

    g = torch.Generator(device=device).manual_seed(seed)
    n, hs, ht, v = config["tokens"], config["student_hidden"], config["teacher_hidden"], config["vocab"]

    def normal(*shape, std=1.0):
        return (torch.randn(*shape, generator=g, device=device) * std).to(dtype)

    targets = torch.randint(0, v, (n,), generator=g, device=device)
    targets[::7] = -100
    return dict(student_hidden=normal(n, hs), student_weight=normal(v, hs, std=2.0 / math.sqrt(hs)),
                teacher_hidden=normal(n, ht), teacher_weight=normal(v + 64, ht, std=2.0 / math.sqrt(ht)),
                targets=targets, mask=torch.rand(n, generator=g, device=device) > 0.1,
                upstream=torch.randn(n, generator=g, device=device) / n,
                upstream2=torch.randn(n, generator=g, device=device) / n)


def _fused(case, t, impl, leaves):
    """(div, logp, loss) with loss = Σ u·div + Σ u2·logp: the outputs a case reduces (``weights=``,
    gradients formed in the forward sweep) in the call's own loss, the others per row."""
    from fastdadpo.kernels import fused_linear_divergence, fused_linear_logprobs

    h, w = leaves
    div_weights = t["upstream"] if case["div_reduced"] else None
    logp_weights = t["upstream2"] if case["logp_reduced"] else None

    def per_row(values, upstream):
        return (values.double() * upstream.double()).sum()

    vocab = t["student_weight"].shape[0]
    if case["kind"] is None:
        out = fused_linear_logprobs(h, w, t["targets"], weights=logp_weights, impl=impl)
        return (None, out.values, out.loss.double()) if logp_weights is not None else (
            None, out, per_row(out, t["upstream2"]))
    out = fused_linear_divergence(h, w, t["teacher_hidden"], t["teacher_weight"], kind=case["kind"], mask=t["mask"],
                                  targets=t["targets"] if case["targets"] else None, vocab_size=vocab, impl=impl,
                                  weights=div_weights, logp_weights=logp_weights)
    if div_weights is not None:
        loss = out.loss.double()
        if out.logps is not None and logp_weights is None:
            loss = loss + per_row(out.logps, t["upstream2"])
        return out.values, out.logps, loss
    div, logp = out if case["targets"] else (out, None)
    return div, logp, per_row(div, t["upstream"]) + (0 if logp is None else per_row(logp, t["upstream2"]))


def _reference(case, t):
    """Float64 values and gradients of Σ u·div + Σ u2·logp, block by block of rows."""
    import torch

    from fastdadpo.kernels import naive_linear_divergence, naive_linear_logprobs

    n = t["student_hidden"].shape[0]
    vocab = t["student_weight"].shape[0]
    weight = t["student_weight"].double().requires_grad_()
    teacher_weight = t["teacher_weight"].double()
    divs, logps, hidden_grads = [], [], []
    for start in range(0, n, REFERENCE_ROWS):
        rows = slice(start, start + REFERENCE_ROWS)
        h = t["student_hidden"][rows].double().requires_grad_()
        div = logp = None
        if case["kind"] is None:
            logp = naive_linear_logprobs(h, weight, t["targets"][rows])
        else:
            out = naive_linear_divergence(h, weight, t["teacher_hidden"][rows].double(), teacher_weight,
                                          kind=case["kind"], mask=t["mask"][rows], vocab_size=vocab,
                                          targets=t["targets"][rows] if case["targets"] else None)
            div, logp = out if case["targets"] else (out, None)
        loss = sum((o * u[rows].double()).sum() for o, u in ((div, t["upstream"]), (logp, t["upstream2"]))
                   if o is not None)
        loss.backward()
        divs.append(None if div is None else div.detach())
        logps.append(None if logp is None else logp.detach())
        hidden_grads.append(h.grad)
    join = (lambda parts: None if parts[0] is None else torch.cat(parts))
    return join(divs), join(logps), torch.cat(hidden_grads), weight.grad


def _errors(actual, expected):
    import torch

    if expected is None:
        return None
    actual = actual.detach().double()
    excess = (actual - expected).abs() - (VALUE_ATOL + VALUE_RTOL * expected.abs())
    return dict(max_abs_error=float((actual - expected).abs().max()), within_tolerance=bool((excess <= 0).all()),
                finite=bool(torch.isfinite(actual).all()))


def _grad_errors(actual, expected):
    import torch

    rel = float((actual.double() - expected).norm() / expected.norm().clamp_min(1e-30))
    return dict(rel_frobenius_error=rel, within_tolerance=rel <= GRAD_REL_FROBENIUS,
                finite=bool(torch.isfinite(actual).all()))


def run_correctness(out_dir: str, dry_run: bool) -> dict:
    import torch

    if dry_run:
        os.environ["TRITON_INTERPRET"] = "1"
    from fastdadpo.kernels import chunk_plan, chunked_backend

    device = torch.device("cpu" if dry_run else "cuda")
    # bf16 throughout on the GPU. The dry run: the chunked backend in bf16 on its CUDA path
    # (CUDA_PRECISION_ON_CPU), the tile-fused kernels in fp32 (bf16 tl.dot is wrong under the interpreter).
    chunked_backend.CUDA_PRECISION_ON_CPU = dry_run
    dtypes = {"chunked": torch.bfloat16, "triton": torch.float32 if dry_run else torch.bfloat16}
    results = {"dtype": ", ".join(f"{str(d).replace('torch.', '')} ({impl})" for impl, d in dtypes.items()),
               "device": device.type, "grad_accumulation": chunk_plan.GRAD_ACCUMULATION, "tolerances": dict(
                   value_atol=VALUE_ATOL, value_rtol=VALUE_RTOL, grad_rel_frobenius=GRAD_REL_FROBENIUS), "rows": []}
    path = os.path.join(out_dir, "correctness.json")
    for config in DRY_CONFIGS if dry_run else GPU_CONFIGS:
        inputs = {dtype: _inputs(config, device, dtype) for dtype in set(dtypes.values())}
        for case_name, case in CASES.items():
            references = {dtype: _reference(case, t) for dtype, t in inputs.items()}
            for impl, dtype in dtypes.items():
                t, reference = inputs[dtype], references[dtype]
                row = dict(config, case=case_name, impl=impl, dtype=str(dtype).replace("torch.", ""))
                try:
                    leaves = [t["student_hidden"].clone().requires_grad_(), t["student_weight"].clone().requires_grad_()]
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                        torch.cuda.reset_peak_memory_stats()
                        base = torch.cuda.memory_allocated()
                    started = time.perf_counter()
                    div, logp, loss = _fused(case, t, impl, leaves)
                    loss.backward()
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                        row["peak_bytes_above_inputs"] = torch.cuda.max_memory_allocated() - base
                    row["seconds_first_call"] = time.perf_counter() - started
                    row["div"] = _errors(div, reference[0]) if div is not None else None
                    row["logp"] = _errors(logp, reference[1]) if logp is not None else None
                    row["d_hidden"] = _grad_errors(leaves[0].grad, reference[2])
                    row["d_weight"] = _grad_errors(leaves[1].grad, reference[3])
                    checks = [r for r in (row["div"], row["logp"], row["d_hidden"], row["d_weight"]) if r]
                    row["ok"] = all(r["within_tolerance"] and r["finite"] for r in checks)
                except Exception as error:  # one failing backend or case must not hide the others
                    row.update(ok=False, error=f"{type(error).__name__}: {str(error)[:500]}")
                results["rows"].append(row)
                print(f"correctness {case_name} V={config['vocab']} {impl}: "
                      f"{'ok' if row['ok'] else 'FAILED ' + row.get('error', '')}", flush=True)
                _write_json(path, results)
        del inputs, t
    results["all_ok"] = all(r["ok"] for r in results["rows"])
    _write_json(path, results)
    return results


# --- the train step ------------------------------------------------------------------------------------------

# Qwen2.5's published shapes (config.json of Qwen/Qwen2.5-1.5B and Qwen/Qwen2.5-7B); len(tokenizer) 151,665.
QWEN_STUDENT = dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                    num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True)
QWEN_TEACHER = dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                    num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False)
QWEN_TOKENIZER_SIZE = 151665
DRY_STUDENT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, vocab_size=1100, tie_word_embeddings=True)
DRY_TEACHER = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, vocab_size=1152, tie_word_embeddings=False)
DRY_TOKENIZER_SIZE = 1024
PROMPT_WORDS, ANSWER_WORDS, MAX_LENGTH, MAX_PROMPT_LENGTH = 384, 96, 512, 400  # one word = one token
DRY_PROMPT_WORDS, DRY_ANSWER_WORDS, DRY_MAX_LENGTH, DRY_MAX_PROMPT_LENGTH = 20, 8, 32, 24
STEPS = 3  # the first warms up; tokens/s is the median of the others
WORK = os.path.join("/tmp", "fastdadpo-gpu-check")  # models (reused by later calls on the same machine), runs
SPECIALS = ["<|pad|>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>", "<|endoftext|>"]
CHAT_TEMPLATE = ("{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}<|end|>\n"
                 "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


def _word_tokenizer(size: int):
    """A word-level tokenizer of exactly ``size`` tokens (built instantly, unlike a BPE that large)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(SPECIALS)}
    vocab.update({f"w{i}": len(SPECIALS) + i for i in range(size - len(SPECIALS))})
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<|endoftext|>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.add_special_tokens(SPECIALS)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|end|>", pad_token="<|pad|>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def _build_models(root: str, dry_run: bool) -> Dict[str, str]:
    """Randomly initialised Qwen2.5-shaped student and teacher saved as model folders (reused when there)."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tokenizer = _word_tokenizer(DRY_TOKENIZER_SIZE if dry_run else QWEN_TOKENIZER_SIZE)
    paths = {}
    for name, shape in (("student", DRY_STUDENT if dry_run else QWEN_STUDENT),
                        ("teacher", DRY_TEACHER if dry_run else QWEN_TEACHER)):
        path = os.path.join(root, name)
        paths[name] = path
        complete = os.path.join(path, "fastdadpo-complete")  # written last: a build cut short is redone
        if os.path.exists(complete):
            continue
        config = Qwen2Config(**shape, max_position_embeddings=4096, rope_theta=1e6, pad_token_id=tokenizer.pad_token_id,
                             eos_token_id=tokenizer.eos_token_id, bos_token_id=None, torch_dtype="bfloat16")
        device = "cpu" if dry_run else "cuda"  # initialising 7B parameters on the GPU takes seconds, not minutes
        previous = torch.get_default_dtype()
        torch.set_default_dtype(torch.float32 if dry_run else torch.bfloat16)
        try:
            torch.manual_seed(1 if name == "student" else 2)
            with torch.device(device):
                model = Qwen2ForCausalLM(config)
        finally:
            torch.set_default_dtype(previous)
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
        with open(complete, "w", encoding="utf-8") as handle:
            handle.write("ok\n")
        del model
        if not dry_run:
            torch.cuda.empty_cache()
    return paths


def _write_data(path: str, rows: int, dry_run: bool, tokenizer_size: int) -> None:
    import random

    rng = random.Random(0)
    words = [f"w{i}" for i in range(tokenizer_size - len(SPECIALS))]
    prompt_words, answer_words = (DRY_PROMPT_WORDS, DRY_ANSWER_WORDS) if dry_run else (PROMPT_WORDS, ANSWER_WORDS)
    with open(path, "w", encoding="utf-8") as handle:
        for _ in range(rows):
            row = {"prompt": " ".join(rng.choices(words, k=prompt_words)),
                   "chosen": " ".join(rng.choices(words, k=answer_words)),
                   "rejected": " ".join(rng.choices(words, k=answer_words))}
            handle.write(json.dumps(row) + "\n")


@dataclass
class TrainRun:
    backend: str
    micro_batch_size: int
    returncode: int
    seconds: float
    steps: int
    tokens_per_s: Optional[float]
    peak_memory_bytes: Optional[int]
    first_step_loss: Optional[float]
    out_of_memory: bool
    log_tail: str = ""

    @property
    def fits(self) -> bool:
        return self.returncode == 0 and self.steps > 0


def _train_once(models_dir: Dict[str, str], backend: str, micro_batch_size: int, work: str, dry_run: bool,
                timeout_s: float, syncs_json: Optional[str] = None) -> TrainRun:
    """One ``fastdadpo train`` run of STEPS steps; with ``syncs_json``, under ``sync_probe.py``, which
    records the host syncs of its second step there."""
    import yaml

    run_dir = os.path.join(work, f"{backend}-mb{micro_batch_size}" + ("-syncs" if syncs_json else ""))
    os.makedirs(run_dir, exist_ok=True)
    data = os.path.join(run_dir, "train.jsonl")
    _write_data(data, micro_batch_size * STEPS, dry_run, DRY_TOKENIZER_SIZE if dry_run else QWEN_TOKENIZER_SIZE)
    config = {
        "model": {"student": models_dir["student"], "teacher": models_dir["teacher"]},
        "data": {"train": data, "max_length": DRY_MAX_LENGTH if dry_run else MAX_LENGTH,
                 "max_prompt_length": DRY_MAX_PROMPT_LENGTH if dry_run else MAX_PROMPT_LENGTH,
                 "cache_dir": os.path.join(run_dir, "cache")},
        "objective": {"name": "dadpo_token"},
        "train": {"micro_batch_size": micro_batch_size, "grad_accum": 1, "max_steps": STEPS, "warmup_ratio": 0.0,
                  "output_dir": os.path.join(run_dir, "run"), "seed": 7},
        "deepspeed": {"zero_stage": 3},
    }
    config_path = os.path.join(run_dir, "config.yaml")
    with open(config_path, "w", encoding="utf-8") as handle:
        yaml.safe_dump(config, handle)
    env = dict(os.environ, FASTDADPO_KERNEL_BACKEND=backend, TOKENIZERS_PARALLELISM="false")
    if dry_run:
        env["DS_ACCELERATOR"] = "cpu"
    started = time.perf_counter()
    try:
        command = ([sys.executable, os.path.join(ROOT, "bench", "gpu", "sync_probe.py"), config_path, syncs_json]
                   if syncs_json else [sys.executable, "-m", "fastdadpo", "train", config_path])
        result = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s, env=env, cwd=ROOT)
        returncode, log = result.returncode, result.stdout[-1500:] + result.stderr[-3000:]
    except subprocess.TimeoutExpired as expired:
        returncode, log = -1, f"timed out after {timeout_s:.0f} s: {str(expired.stderr or '')[-2000:]}"
    rows = []
    metrics = os.path.join(run_dir, "run", "metrics.jsonl")
    if os.path.exists(metrics):
        with open(metrics, encoding="utf-8") as handle:
            rows = [json.loads(line) for line in handle if line.strip()]
    steady = rows[1:] or rows
    return TrainRun(backend=backend, micro_batch_size=micro_batch_size, returncode=returncode,
                    seconds=time.perf_counter() - started, steps=len(rows),
                    tokens_per_s=statistics.median(r["tokens_per_s"] for r in steady) if steady else None,
                    peak_memory_bytes=int(max(r["peak_mem_gb"] for r in rows) * 2**30) if rows else None,
                    first_step_loss=rows[0]["loss"] if rows else None,
                    out_of_memory=returncode != 0 and "out of memory" in log.lower(),
                    log_tail="" if returncode == 0 else log[-2500:])


def _next_guess(runs: List[TrainRun], capacity: int, static: int) -> Optional[int]:
    """The next micro-batch to try after ``runs`` (None: done): extrapolate from the largest fitting
    run, bisect between fitting and failing ones, stop on a failure other than out-of-memory."""
    if runs[-1].returncode != 0 and not runs[-1].out_of_memory:
        return None  # a real failure: its log is in the results
    fitting = sorted(r.micro_batch_size for r in runs if r.fits)
    failing = sorted(r.micro_batch_size for r in runs if not r.fits)
    if fitting and not failing:
        guess = _next_micro_batch(next(r for r in runs if r.micro_batch_size == fitting[-1]), capacity, static)
    elif failing:
        guess = ((fitting[-1] if fitting else 0) + failing[0]) // 2
    else:
        return None
    return None if guess < 1 or guess in fitting or guess in failing else guess


def _next_micro_batch(run: TrainRun, capacity: int, static: int) -> int:
    """The micro-batch the memory of ``run`` extrapolates to: memory above the model states grows
    linearly in the micro-batch (activations, logits), so B·(capacity·0.9 − static)/(peak − static)."""
    if run.peak_memory_bytes is None or run.peak_memory_bytes <= static:
        return run.micro_batch_size * 2
    scale = (0.9 * capacity - static) / (run.peak_memory_bytes - static)
    return max(run.micro_batch_size + 1, int(run.micro_batch_size * scale))


def run_train(out_dir: str, dry_run: bool, deadline_s: float) -> dict:
    started = time.perf_counter()
    import torch

    work = WORK
    models_dir = _build_models(os.path.join(work, "models-dry" if dry_run else "models"), dry_run)
    path = os.path.join(out_dir, "train.json")
    results = {"objective": "dadpo_token", "student": DRY_STUDENT if dry_run else QWEN_STUDENT,
               "teacher": DRY_TEACHER if dry_run else QWEN_TEACHER, "tokens_per_sequence_max":
               DRY_MAX_LENGTH if dry_run else MAX_LENGTH, "zero_stage": 3, "runs": [],
               "model_build_s": time.perf_counter() - started}
    _write_json(path, results)
    backends = ("chunked", "naive")
    capacity = torch.cuda.get_device_properties(0).total_memory if torch.cuda.is_available() else 8 * 2**30
    # Model states under ZeRO-3 on one rank: student bf16 weights + fp32 master + Adam moments (16 bytes
    # a parameter), the frozen teacher in bf16 (2).
    static = 16 * _parameters(DRY_STUDENT if dry_run else QWEN_STUDENT) + 2 * _parameters(
        DRY_TEACHER if dry_run else QWEN_TEACHER)
    # Round 1: both backends at the same micro-batch (the like-for-like step, same first loss); then
    # each backend's next guess in turn (extrapolated from its peak memory, or bisected after an
    # out-of-memory) while time is left.
    next_micro_batch = {backend: 2 if dry_run else 4 for backend in backends}
    tried: Dict[str, List[TrainRun]] = {backend: [] for backend in backends}
    for _ in range(1 if dry_run else 4):
        for backend in backends:
            micro_batch = next_micro_batch[backend]
            if micro_batch is None:
                continue
            left = deadline_s - (time.perf_counter() - started)
            estimate = max([r["seconds"] for r in results["runs"]] or [60.0])
            if left < 1.2 * estimate:
                results.setdefault("skipped", []).append(f"{backend} micro-batch {micro_batch}: {left:.0f} s left")
                next_micro_batch[backend] = None
                continue
            run = _train_once(models_dir, backend, micro_batch, work, dry_run, timeout_s=max(30.0, left - 5))
            tried[backend].append(run)
            results["runs"].append(dict(asdict(run), fits=run.fits))
            _write_json(path, results)
            print(f"train {backend} micro-batch {micro_batch}: "
                  f"{'fits' if run.fits else 'out of memory' if run.out_of_memory else 'FAILED'} "
                  f"({run.seconds:.0f} s, {run.tokens_per_s or 0:.0f} tok/s)", flush=True)
            next_micro_batch[backend] = _next_guess(tried[backend], capacity, static)
    largest = {backend: max([r.micro_batch_size for r in runs if r.fits] or [0]) for backend, runs in tried.items()}
    firsts = [runs[0] for runs in tried.values() if runs]
    if (len(firsts) == 2 and all(r.fits and r.first_step_loss is not None for r in firsts)
            and firsts[0].micro_batch_size == firsts[1].micro_batch_size):
        # Same data, same seed, same micro-batch: the fused and materialized steps compute one loss.
        results["first_step_losses_agree"] = math.isclose(firsts[0].first_step_loss, firsts[1].first_step_loss,
                                                          rel_tol=1e-3)
    results["largest_micro_batch"] = largest
    # The host syncs of one training step with the default kernels (sync_probe.py), at the first
    # micro-batch that fit: the kernels' own calls should show one nonzero each, nothing else.
    fitting = [r for r in tried["chunked"] if r.fits]
    left = deadline_s - (time.perf_counter() - started)
    if fitting and left > 1.2 * fitting[0].seconds:
        syncs_json = os.path.join(out_dir, "host-syncs.json")
        probe = _train_once(models_dir, "chunked", fitting[0].micro_batch_size, work, dry_run,
                            timeout_s=max(30.0, left - 5), syncs_json=syncs_json)
        results["host_syncs"] = _read_json(syncs_json) or {"error": probe.log_tail or "no result"}
        print(f"host syncs in one step: {results['host_syncs'].get('total')}", flush=True)
    else:
        results.setdefault("skipped", []).append(f"host-sync probe: {left:.0f} s left")
    results["seconds"] = time.perf_counter() - started
    _write_json(path, results)
    return results


def _parameters(shape: dict) -> int:
    h, i, layers, v = shape["hidden_size"], shape["intermediate_size"], shape["num_hidden_layers"], shape["vocab_size"]
    kv = h // shape["num_attention_heads"] * shape["num_key_value_heads"]
    per_layer = h * (h + 2 * kv) + (h + 2 * kv) + h * h + 3 * h * i + 2 * h
    return layers * per_layer + v * h * (1 if shape["tie_word_embeddings"] else 2) + h


# --- summary -------------------------------------------------------------------------------------------------

def _read_json(path: str):
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except (OSError, ValueError):
        return None


def _write_json(path: str, data) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as handle:
        json.dump(data, handle, indent=1, default=str)
    os.replace(tmp, path)


def _machine() -> dict:
    import torch

    return {"gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "python": platform.python_version(), "torch": torch.__version__,
            "triton": _version("triton"), "cpu_cores": os.cpu_count()}


def _version(module: str) -> str:
    try:
        return __import__(module).__version__
    except Exception:  # a missing or broken package is recorded, not fatal
        return "not importable"


def _gib(value) -> str:
    return "" if value is None else f"{value / 2**30:.2f} GiB"


def run_summary(out_dir: str) -> dict:
    stages = _read_json(os.path.join(out_dir, "stages.json")) or {}
    correctness = _read_json(os.path.join(out_dir, "correctness.json"))
    train = _read_json(os.path.join(out_dir, "train.json"))
    kernels = _read_json(os.path.join(out_dir, "bench-kernels.json"))
    summary = {"machine": _machine(), "stages": stages, "correctness": correctness, "train": train,
               "bench_kernels_json": "bench-kernels.json" if kernels else None}
    _write_json(os.path.join(out_dir, "gpu-check.json"), summary)
    lines = ["# GPU check (bench/gpu/check.sh)", "", f"Machine: {summary['machine']}", "", "## Stages", "",
             "| stage | exit status | seconds |", "|---|---|---|"]
    lines += [f"| {name} | {info.get('rc')} | {info.get('seconds')} |" for name, info in stages.items()]
    if correctness:
        lines += ["", f"## Kernels against float64 ({correctness.get('dtype')}; values within "
                      f"{VALUE_ATOL} + {VALUE_RTOL}·|ref|, gradients within {GRAD_REL_FROBENIUS} relative Frobenius)",
                  "", "| V | case | backend | ok | div max err | logp max err | dh rel err | dW rel err | peak above "
                      "inputs | first call s |", "|---|---|---|---|---|---|---|---|---|---|"]
        for row in correctness.get("rows", []):
            cell = (lambda key, field: "" if not row.get(key) else f"{row[key][field]:.2e}")
            lines.append(f"| {row['vocab']} | {row['case']} | {row['impl']} | {'yes' if row['ok'] else 'NO'} | "
                         f"{cell('div', 'max_abs_error')} | {cell('logp', 'max_abs_error')} | "
                         f"{cell('d_hidden', 'rel_frobenius_error')} | {cell('d_weight', 'rel_frobenius_error')} | "
                         f"{_gib(row.get('peak_bytes_above_inputs'))} | {row.get('seconds_first_call', 0):.2f} |"
                         + (f" {row['error'][:120]}" if row.get("error") else ""))
    if kernels:
        lines += ["", "## Kernel benchmarks", "", "See `gpu-kernels.md` (bench/report.py) for the full table.", "",
                  "| benchmark | mean ms | peak above inputs |", "|---|---|---|"]
        for bench in kernels.get("benchmarks", []):
            extra = bench.get("extra_info", {})
            lines.append(f"| {bench['name']} | {bench['stats']['mean'] * 1e3:.1f} | "
                         f"{_gib(extra.get('peak_memory_bytes'))} |")
    if train:
        lines += ["", f"## fastdadpo train step ({train.get('objective')}, ZeRO-3, one GPU)", "",
                  f"Largest micro-batch that fits: {train.get('largest_micro_batch')}; first-step losses of "
                  f"the two backends at the same micro-batch agree: {train.get('first_step_losses_agree')}", "",
                  "| backend | micro-batch | fits | tokens/s | peak memory | first loss | seconds |",
                  "|---|---|---|---|---|---|---|"]
        for run in train.get("runs", []):
            lines.append(f"| {run['backend']} | {run['micro_batch_size']} | {'yes' if run['fits'] else 'no'} | "
                         f"{run['tokens_per_s'] or 0:.0f} | {_gib(run['peak_memory_bytes'])} | "
                         f"{run['first_step_loss'] or ''} | {run['seconds']:.0f} |")
        syncs = train.get("host_syncs")
        if syncs:
            lines += ["", f"Host syncs in step 2 (`sync_probe.py`, {syncs.get('device')}: "
                          f"`set_sync_debug_mode(\"warn\")` on CUDA): {syncs.get('total')}", "",
                      "| count | where (innermost: the call, then this repository's frame) |", "|---|---|"]
            lines += [f"| {entry['count']} | `{entry['where']}` |" for entry in syncs.get("syncs", [])]
    with open(os.path.join(out_dir, "gpu-check.md"), "w", encoding="utf-8") as handle:
        handle.write("\n".join(lines) + "\n")
    return summary


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("stage", choices=("correctness", "build-models", "train", "summary"))
    parser.add_argument("--out", required=True)
    parser.add_argument("--dry-run", action="store_true")
    parser.add_argument("--deadline-s", type=float, default=240.0, help="train: stop starting runs after this")
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    if args.stage == "correctness":
        return 0 if run_correctness(args.out, args.dry_run).get("all_ok") else 1
    if args.stage == "build-models":
        _build_models(os.path.join(WORK, "models-dry" if args.dry_run else "models"), args.dry_run)
        return 0
    if args.stage == "train":
        run_train(args.out, args.dry_run, args.deadline_s)
        return 0
    run_summary(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
