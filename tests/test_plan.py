"""fastdadpo plan: each memory term on a case computed by hand, the architecture read from a model
directory equal to the real model's parameter count, the activation term against the tensors
transformers really saves for backward, the JSON shape, errors, and every shipped config."""
import glob
import json
import os

import pytest
import yaml

from fastdadpo.commands import architectures, memory_terms, plan
from fastdadpo.commands.architectures import Architecture
from fastdadpo.commands.memory_terms import KernelSweep, Models, Setting

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A hand-sized Llama: embedding 10 x 8 = 80; per layer q 8x8 = 64, k and v 8x4 = 32 each, o 64 (192),
# MLP 3 x 8 x 16 = 384, two norms 16: 592, twice 1184; final norm 8; untied head 80. Total 1352.
ARCH = Architecture(hidden=8, layers=2, heads=2, kv_heads=1, head_dim=4, intermediate=16, vocab=10, tied=False)
# 4 ranks, bf16, ZeRO-3; one pair (chosen + rejected) of 6 tokens: 12 tokens.
GPU = Setting(ranks=4, device="gpu", dtype_bytes=2, zero_stage=3, micro_batch=1, sequences=2, max_length=6,
              reduce_bucket=1000, prefetch_bucket=100, max_live=10**9, persistence_threshold=0)


def test_parameter_count_by_hand():
    assert ARCH.layer_params() == 592
    assert ARCH.params == 1352
    assert ARCH.largest_module_params == 128  # the MLP's 8 x 16 beats the embedding's 10 x 8
    assert ARCH.lora_params(2, ("q_proj", "down_proj")) == 2 * (2 * (8 + 8) + 2 * (16 + 8))


def test_student_terms_by_hand():
    assert memory_terms.student_params_bytes(ARCH, GPU) == 1352 * 2 // 4 == 676
    assert memory_terms.student_grads_bytes(ARCH, GPU) == 676
    assert memory_terms.student_reduce_bucket_bytes(ARCH, GPU) == 1000 * 2
    assert memory_terms.student_reduce_copy_bytes(ARCH, GPU) == 1000 * 2  # reduce-scatter's flat copy of the bucket
    assert memory_terms.bucket_fills_in_backward(ARCH, GPU)  # 1352 gradients > a 1000-element bucket
    assert memory_terms.student_master_bytes(ARCH, GPU) == 4 * 1352 // 4 == 1352
    assert memory_terms.student_moments_bytes(ARCH, GPU) == 8 * 1352 // 4 == 2704
    assert memory_terms.student_step_fp32_grads_bytes(ARCH, GPU) == 1352
    assert memory_terms.student_optimizer_temp_bytes(ARCH, GPU) == 0  # fused AdamW on CUDA
    assert memory_terms.student_allreduce_bytes(ARCH, GPU) == 0
    # largest module 128 + prefetch 100, bf16; no persistent parameters at threshold 0
    assert memory_terms.student_gathered_bytes(ARCH, GPU) == (128 + 100) * 2
    # per layer and token: norms 2 x 8 x 8 = 128; (2H 16 + 4 q_dim 32 + 4I 64 + T 6) x 2 = 236; (2 heads + 2) x 4 = 16
    assert memory_terms.layer_activation_bytes_per_token(ARCH, GPU) == 380
    final_norm = 8 * 8 + 8 * 2
    assert memory_terms.student_activation_bytes(ARCH, GPU, checkpointing=False) == 12 * (2 * 380 + final_norm) == 10080
    assert memory_terms.student_activation_bytes(ARCH, GPU, checkpointing=True) == 12 * (2 * 8 * 2 + 380 + final_norm)
    assert memory_terms.student_backward_workspace_bytes(ARCH, GPU) == 12 * (4 * 16 + 2 * 8) * 2
    sweep = KernelSweep(rows=12)
    # fp32 dW and dh accumulators, and the compacted bf16 hidden rows
    assert memory_terms.kernel_gradient_bytes(sweep, ARCH, GPU) == (10 + 12) * 8 * 4 + 12 * 8 * 2
    lora = Setting(**{**GPU.__dict__, "lora_rank": 2, "lora_targets": ("q_proj",)})
    assert memory_terms.kernel_gradient_bytes(sweep, ARCH, lora) == 12 * 8 * 4 + 12 * 8 * 2  # a frozen head: no dW
    assert memory_terms.student_moments_bytes(ARCH, lora) == 8 * ARCH.lora_params(2, ("q_proj",)) // 4
    assert memory_terms.student_params_bytes(ARCH, lora) == (1352 + ARCH.lora_params(2, ("q_proj",))) * 2 // 4


def test_stages_and_offload_by_hand():
    stage0 = Setting(**{**GPU.__dict__, "zero_stage": 0})
    assert memory_terms.student_params_bytes(ARCH, stage0) == 1352 * 2
    assert memory_terms.student_grads_bytes(ARCH, stage0) == 1352 * 2
    assert memory_terms.student_master_bytes(ARCH, stage0) == 4 * 1352  # a full fp32 copy beside bf16 weights
    assert memory_terms.student_moments_bytes(ARCH, stage0) == 8 * 1352
    assert memory_terms.student_allreduce_bytes(ARCH, stage0) == 1352 * 2
    assert memory_terms.student_reduce_bucket_bytes(ARCH, stage0) == 0
    stage2 = Setting(**{**GPU.__dict__, "zero_stage": 2})
    assert memory_terms.student_params_bytes(ARCH, stage2) == 1352 * 2
    assert memory_terms.student_grads_bytes(ARCH, stage2) == 676
    assert memory_terms.student_reduce_bucket_bytes(ARCH, stage2) == 1000 * 2
    offload = Setting(**{**GPU.__dict__, "offload_optimizer": True, "offload_param": True, "teacher_offload": True})
    for term in (memory_terms.student_params_bytes, memory_terms.student_grads_bytes, memory_terms.student_master_bytes,
                 memory_terms.student_moments_bytes, memory_terms.student_step_fp32_grads_bytes, memory_terms.teacher_shard_bytes):
        assert term(ARCH, offload) == 0, term.__name__
    # CPU, fp32: weights are their own master at stage 0; AdamW's sqrt temporary is the largest parameter
    cpu0 = Setting(**{**GPU.__dict__, "device": "cpu", "dtype_bytes": 4, "zero_stage": 0})
    assert memory_terms.student_master_bytes(ARCH, cpu0) == 0
    assert memory_terms.student_step_fp32_grads_bytes(ARCH, cpu0) == 0
    assert memory_terms.student_optimizer_temp_bytes(ARCH, cpu0) == 4 * 128
    cpu3 = Setting(**{**cpu0.__dict__, "zero_stage": 3})
    assert memory_terms.student_reduce_bucket_bytes(ARCH, cpu3) == 1000 * 4  # min(bucket 1000, P 1352) pages written
    assert memory_terms.student_optimizer_temp_bytes(ARCH, cpu3) == 4 * 1352 // 4  # the flat partition
    # the CPU kernels (the chunked algorithm, torch row sweep, 192 MiB budget): all 12 rows in one
    # chunk; log-probs alone work in the student's fp32 logits (no scratch), + 8 per-row fp32 vectors
    assert memory_terms.kernel_workspace_bytes(KernelSweep(rows=12), ARCH, cpu0, 10) == 12 * 10 * 4 + 8 * 12 * 4
    # a divergence with log-probs: student, teacher, one work buffer of a row block (all 12 rows here;
    # one student softmax serves both)
    assert memory_terms.kernel_workspace_bytes(KernelSweep(rows=12, teachers=1), ARCH, cpu0, 10) == 12 * 10 * 4 * 3 + 8 * 12 * 4


def test_teacher_terms_by_hand():
    assert memory_terms.teacher_shard_bytes(ARCH, GPU) == 676
    assert memory_terms.teacher_head_bytes(ARCH, GPU) == 10 * 8 * 2  # a full copy per rank
    assert memory_terms.teacher_gathered_bytes(ARCH, GPU) == (128 + 100) * 2
    assert memory_terms.teacher_forward_bytes(ARCH, GPU) == 12 * (2 * 8 + 3 * 16) * 2
    assert memory_terms.teacher_hidden_bytes(ARCH, GPU) == 2 * 12 * 8 * 2


def test_phases_add_their_terms():
    from fastdadpo.core.objectives import OBJECTIVES

    built = memory_terms.build_plan(Models(student=ARCH, teachers=(("teacher", ARCH),)), OBJECTIVES["dadpo_token"](), GPU)
    by_name = {t.name: t.bytes for t in built.terms}
    assert set(built.phases) == {"student forward/backward", "optimizer step", "teacher forward"}
    for phase, names in built.phases.items():
        assert built.phase_bytes(phase) == sum(by_name[n] for n in names)
    assert built.peak_bytes == max(built.phase_bytes(p) for p in built.phases)
    assert "teacher gathered LM head" in built.phases["student forward/backward"]
    assert "student AdamW moments" in built.phases["optimizer step"]
    assert "student reduce-scatter copy" in built.phases["student forward/backward"]
    one_bucket = memory_terms.build_plan(Models(student=ARCH), OBJECTIVES["dpo"](), Setting(**{**GPU.__dict__,
                                                                                      "reduce_bucket": 5000}))
    assert "student reduce-scatter copy" in one_bucket.phases["gradient reduce-scatter"]
    assert "student reduce-scatter copy" not in one_bucket.phases["student forward/backward"]
    stage0 = memory_terms.build_plan(Models(student=ARCH), OBJECTIVES["dpo"](), Setting(**{**GPU.__dict__, "zero_stage": 0}))
    assert "student stage-0 all-reduce copy" in stage0.phases["gradient all-reduce"]


def test_micro_batch_search_is_the_boundary():
    from fastdadpo.core.objectives import OBJECTIVES

    models, objective = Models(student=ARCH), OBJECTIVES["dpo"]()
    peak_at = lambda mb: memory_terms.build_plan(models, objective, Setting(**{**GPU.__dict__, "micro_batch": mb})).peak_bytes
    memory = peak_at(37)
    assert plan.largest_micro_batch(models, objective, GPU, memory) == 37
    assert plan.largest_micro_batch(models, objective, GPU, peak_at(1) - 1) == 0


@pytest.mark.parametrize("fixture", ["student_dir", "llama_dir"])
def test_architecture_of_a_directory_counts_like_the_model(request, fixture):
    from transformers import AutoModelForCausalLM

    path = request.getfixturevalue(fixture)
    arch = architectures.load_architecture(path, "model.student")
    model = AutoModelForCausalLM.from_pretrained(path)
    assert arch.params == sum(p.numel() for p in model.parameters())  # tied heads counted once
    assert arch.source.endswith("config.json")


def test_activation_term_matches_what_transformers_saves():
    """The tensors a Qwen2 forward keeps for backward (saved-tensor hooks, parameters excluded, each
    storage once) against the planner's activation term, fp32 on CPU, with a padding mask."""
    import torch
    from fastdadpo.demo.synthetic import tiny_causal_lm

    torch.manual_seed(0)
    hidden, layers, heads, kv_heads, inter, batch, length = 64, 3, 4, 2, 192, 3, 40
    model = tiny_causal_lm(500, hidden_size=hidden, layers=layers, heads=heads, kv_heads=kv_heads,
                           intermediate_size=inter)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    ids = torch.randint(0, 500, (batch, length))
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[0, 30:] = 0
    saved = {}

    def pack(t):
        key = t.untyped_storage().data_ptr()
        if key not in params:
            saved[key] = max(saved.get(key, 0), t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model.model(input_ids=ids, attention_mask=mask, use_cache=False)
    measured = sum(saved.values())
    arch = architectures.architecture_from_config(model.config.to_dict())
    planned = memory_terms.student_activation_bytes(arch, Setting(device="cpu", dtype_bytes=4, micro_batch=batch, sequences=1,
                                                          max_length=length), checkpointing=False)
    assert planned == pytest.approx(measured, rel=0.10)


def test_known_tables_by_name_and_by_path():
    arch = architectures.load_architecture("Qwen/Qwen2.5-7B-Instruct", "model.teacher")
    assert (arch.hidden, arch.layers, arch.kv_heads, arch.vocab) == (3584, 28, 4, 152064)
    assert 7.5e9 < arch.params < 7.7e9  # 7.62B published
    student = architectures.load_architecture("runs/qwen2.5-1.5b-dsft/final", "model.student")
    assert student.tied and 1.5e9 < student.params < 1.6e9 and "known architecture" in student.source
    pruned = architectures.load_architecture("runs/vicuna-7b-pruned20-dsft/final", "model.student")
    assert pruned.intermediate == 7712  # the longer hint wins over vicuna-7b
    assert architectures.load_architecture("lmsys/vicuna-7b-v1.5", "model.teacher").intermediate == 11008
    from huggingface_hub import constants

    with pytest.MonkeyPatch.context() as patch:  # no download attempt: the error at once
        patch.setattr(constants, "HF_HUB_OFFLINE", True)
        with pytest.raises(plan.ConfigError, match="model.student.*--arch"):
            architectures.load_architecture("org/unknown-model", "model.student")


def test_any_hub_model_plans_from_its_cached_config(student_dir, tmp_path, monkeypatch):
    """A Hub name no table knows plans from its config.json in the Hugging Face cache, offline; a
    cached config wins over a table's guess for the same name."""
    import shutil

    from huggingface_hub import constants

    snapshot = tmp_path / "hub" / "models--acme--tiny-qwen" / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    shutil.copy(os.path.join(student_dir, "config.json"), snapshot / "config.json")
    (tmp_path / "hub" / "models--acme--tiny-qwen" / "refs").mkdir()
    (tmp_path / "hub" / "models--acme--tiny-qwen" / "refs" / "main").write_text("0123abcd")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    cached = architectures.load_architecture("acme/tiny-qwen", "model.student")
    local = architectures.load_architecture(student_dir, "model.student")
    assert (cached.hidden, cached.layers, cached.vocab, cached.params) == (local.hidden, local.layers, local.vocab,
                                                                          local.params)
    assert cached.source == str(snapshot / "config.json")


def _main(capsys, *argv):
    from fastdadpo.cli import main

    code = main(list(argv))
    return code, capsys.readouterr()


def test_json_output_shape(capsys):
    code, out = _main(capsys, "plan", os.path.join(REPO, "configs", "qwen2.5-7b-to-1.5b-dadpo.yaml"), "--gpus", "8",
                      "--gpu-memory", "80", "--json")
    assert code == 0
    report = json.loads(out.out)
    assert {"terms", "phases", "peak_bytes", "peak_phase", "fits", "largest_micro_batch", "suggestions",
            "with_checkpointing", "without_checkpointing", "models", "setting", "memory_bytes"} <= set(report)
    assert report["ranks"] == 8 and report["memory_bytes"] == 80 * 2**30
    assert report["peak_bytes"] == report["phases"][report["peak_phase"]]["bytes"]
    assert all(isinstance(v, int) and v >= 0 for v in report["terms"].values())
    assert report["with_checkpointing"]["peak_bytes"] < report["without_checkpointing"]["peak_bytes"]
    assert report["largest_micro_batch_with_checkpointing"] >= report["largest_micro_batch_without_checkpointing"] >= 1
    assert report["models"]["student"]["params"] > 1e9


def test_nothing_fits_says_what_to_change(capsys):
    code, out = _main(capsys, "plan", os.path.join(REPO, "configs", "vicuna-7b-pruned-dadpo.yaml"), "--gpus", "1",
                      "--gpu-memory", "24")
    assert code == 0
    assert "largest micro-batch per GPU: 0" in out.out
    assert "offload_optimizer" in out.out and "gradient_checkpointing" in out.out and "ranks" in out.out


@pytest.mark.parametrize("config", sorted(glob.glob(os.path.join(REPO, "configs", "*.yaml"))),
                         ids=os.path.basename)
def test_shipped_configs_plan(capsys, config):
    code, out = _main(capsys, "plan", config, "--gpus", "8", "--gpu-memory", "80")
    assert code == 0, out.err
    assert "largest micro-batch per GPU" in out.out


@pytest.mark.parametrize("content, named", [
    ({"model": {"student": "org/unknown-model"}, "data": {"train": "x.jsonl"}, "objective": {"name": "sft"}},
     "model.student"),
    ({"model": {"student": "Qwen/Qwen2.5-1.5B-Instruct"}, "data": {"train": "x.jsonl"}, "trian": {}}, "trian"),
])
def test_bad_config_is_one_paragraph_exit_2(tmp_path, capsys, content, named):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(content))
    code, out = _main(capsys, "plan", str(path))
    assert code == 2
    assert out.err.startswith("fastdadpo: error:") and named in out.err
    assert "Traceback" not in out.err and "\n\n" not in out.err.strip()


def test_bad_flags_exit_2(capsys):
    code, out = _main(capsys, "plan", os.path.join(REPO, "configs", "qwen2.5-7b-to-1.5b-dadpo.yaml"), "--gpus", "0")
    assert code == 2 and "--gpus" in out.err


def test_training_headline_is_one_line(student_dir, tmp_path):
    import torch
    from fastdadpo.commands.config import config_from_mapping

    config = config_from_mapping({"model": {"student": student_dir}, "data": {"train": "x.jsonl", "max_length": 32},
                                  "objective": {"name": "sft"}}, "test")
    line = plan.training_headline(config, 1, torch.device("cpu"))
    assert line.startswith("plan: peak ") and "largest micro-batch" in line and "\n" not in line
    broken = config_from_mapping({"model": {"student": "org/unknown"}, "data": {"train": "x.jsonl"},
                                  "objective": {"name": "sft"}}, "test")
    assert plan.training_headline(broken, 1, torch.device("cpu")).startswith("plan: unavailable")


def test_fsdp2_is_planned_with_its_own_terms(student_dir):
    """Against ZeRO-3 on the same ranks: no reduce bucket, no separate fp32 master, fp32 weights, the
    gradients out of the forward (freed after each step), and the note saying how it is planned."""
    from fastdadpo.commands.config import config_from_mapping

    def report(engine):
        config = config_from_mapping({"model": {"student": student_dir}, "data": {"train": "x.jsonl", "max_length": 32},
                                      "objective": {"name": "sft"}, "engine": {"name": engine}}, "test")
        return plan.make_report(config, config_path="test", gpus=2, nodes=1, memory_gb=80.0)

    zero3, fsdp2 = report("deepspeed"), report("fsdp2")
    terms = {t.name: t.bytes for t in fsdp2.plan.terms}
    assert terms["student reduce bucket"] == terms["student fp32 master weights"] == 0
    assert {t.name: t.bytes for t in zero3.plan.terms}["student reduce bucket"] > 0
    assert "student gradients" not in fsdp2.plan.phases["student forward/backward"]
    assert "student gradients" in fsdp2.plan.phases["optimizer step"]
    assert fsdp2.notes == [plan.FSDP2_NOTE] and not zero3.notes and fsdp2.setting.engine == "fsdp2"


@pytest.mark.parametrize("config_json, message", [
    ({"hidden_size": -32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64,
      "vocab_size": 100}, "hidden_size is -32; a model's shape is positive integers"),
    ({"hidden_size": 32, "num_hidden_layers": 2.5, "num_attention_heads": 4, "intermediate_size": 64,
      "vocab_size": 100}, "num_hidden_layers is 2.5"),
    ([1, 2, 3], "must hold a JSON object, found a list"),
    ({"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 3,
      "intermediate_size": 64, "vocab_size": 100}, "num_attention_heads 4 is not a multiple of num_key_value_heads 3"),
    ({"hidden_size": 30, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64,
      "vocab_size": 100}, "hidden_size 30 is not a multiple of num_attention_heads 4 and the config gives no head_dim"),
])
def test_impossible_model_shapes_are_refused(tmp_path, config_json, message):
    """A config.json whose shape no model has is an error naming the field, never a plan with
    negative parameters that 'fits'."""
    from fastdadpo.base.errors import ConfigError

    (tmp_path / "config.json").write_text(json.dumps(config_json))
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        architectures.load_architecture(str(tmp_path), "model.student")
