"""Structured pruning: ratio 0 reproduces the model (Qwen2 with grouped-query attention, Llama with
tied embeddings); pruned models save, reload and run with the expected sizes; the removed channels,
heads and layers are the least important ones; the command line end to end and on bad input."""
import json
import os
import subprocess
import sys

import pytest
import torch

from fastdadpo import cli
from fastdadpo.base.errors import DataError, UserError
from fastdadpo.commands.prune import checkpoint_dtype
from fastdadpo.core.chat import prompt_ids
from fastdadpo.demo.synthetic import make_examples, save_model_dir, tiny_causal_lm
from fastdadpo.models.prune import (apply_pruning, decoder_geometry, plan_pruning, prunable_parameters, prune_model,
                                    pruning_report, read_calibration)


def _load(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _model(tokenizer, **kwargs):
    return tiny_causal_lm(len(tokenizer), pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                          **kwargs).eval()


@pytest.fixture(scope="module")
def calibration(tokenizer):
    return [prompt_ids(tokenizer, [{"role": "user", "content": row["prompt"]}]) for row in make_examples(24, seed=5)]


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits


@pytest.mark.parametrize("fixture", ["student_dir", "llama_dir"])
def test_ratio_zero_keeps_outputs(request, fixture, tokenizer, calibration):
    model = _load(request.getfixturevalue(fixture))
    pruned = prune_model(model, tokenizer, [], ratio=0.0)
    assert pruned is not model
    assert torch.allclose(_logits(pruned, calibration[0]), _logits(model, calibration[0]), atol=1e-6)
    if model.config.tie_word_embeddings:
        assert pruned.get_output_embeddings().weight.data_ptr() == pruned.get_input_embeddings().weight.data_ptr()


def test_gqa_model_pruned_saved_and_reloaded(tmp_path, tokenizer, calibration):
    # 8 query heads in 2 KV groups of 4: ratio 0.25 removes one query head from each group.
    model = _model(tokenizer, hidden_size=32, layers=2, heads=8, kv_heads=2, intermediate_size=96)
    plan = plan_pruning(model, calibration, ratio=0.25, channel_multiple=1, pad_id=tokenizer.pad_token_id)
    pruned = apply_pruning(model, plan)
    report = pruning_report(model, pruned, plan, ratio=0.25, drop_layers=0)
    path = save_model_dir(pruned, tokenizer, str(tmp_path / "pruned"))
    reloaded = _load(path)
    config = reloaded.config
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (6, 2, 4)
    assert config.num_hidden_layers == 2 and config.intermediate_size == report["intermediate_size"][1] < 96
    assert abs(report["width_removed_fraction"] - 0.25) < 0.01
    assert report["parameters_after"] == sum(p.numel() for p in reloaded.parameters()) < report["parameters_before"]
    assert prunable_parameters(reloaded) == report["prunable_after"]
    assert torch.allclose(_logits(reloaded, calibration[1]), _logits(pruned, calibration[1]))
    # generation exercises the KV cache and the rebuilt layers' indices
    out = reloaded.generate(torch.tensor([calibration[1]]), max_new_tokens=4, do_sample=False,
                            pad_token_id=tokenizer.pad_token_id)
    assert out.shape[1] == len(calibration[1]) + 4 or tokenizer.eos_token_id in out[0].tolist()


def test_multi_head_attention_prunes_kv_heads_with_their_query_heads(tokenizer, calibration):
    model = _model(tokenizer, hidden_size=32, layers=2, heads=4, kv_heads=4)
    pruned = prune_model(model, tokenizer, calibration, ratio=0.25)
    assert (pruned.config.num_attention_heads, pruned.config.num_key_value_heads, pruned.config.head_dim) == (3, 3, 8)
    assert pruned.model.layers[0].self_attn.k_proj.out_features == 24


def test_llama_keeps_heads_its_config_cannot_express_and_its_tied_embeddings(tmp_path, llama_dir, tokenizer,
                                                                               calibration):
    model = _load(llama_dir)   # hidden 32, 4 heads: LlamaConfig refuses 3 heads (32 % 3 != 0)
    plan = plan_pruning(model, calibration, ratio=0.25, pad_id=tokenizer.pad_token_id)
    pruned = apply_pruning(model, plan)
    assert pruned.config.num_attention_heads == 4 and plan.notes and "LlamaConfig" in plan.notes[0]
    assert pruning_report(model, pruned, plan, ratio=0.25, drop_layers=0)["width_removed_fraction"] > 0.2
    reloaded = _load(save_model_dir(pruned, tokenizer, str(tmp_path / "llama")))
    assert reloaded.config.tie_word_embeddings
    assert reloaded.get_output_embeddings().weight.data_ptr() == reloaded.get_input_embeddings().weight.data_ptr()
    assert torch.allclose(_logits(reloaded, calibration[2]), _logits(pruned, calibration[2]), atol=1e-6)


def test_removed_channels_and_heads_are_the_unimportant_ones(tokenizer, calibration):
    model = _model(tokenizer, hidden_size=32, layers=2, heads=8, kv_heads=2, intermediate_size=96, seed=4)
    counts = plan_pruning(model, calibration, ratio=0.3, channel_multiple=1, pad_id=tokenizer.pad_token_id)
    channels_removed = 96 - len(counts.kept_channels[0])
    generator = torch.Generator().manual_seed(0)
    dead_channels, dead_heads = [], []
    with torch.no_grad():
        for layer in model.model.layers:
            # channels whose gate never opens contribute nothing; so do heads whose o_proj columns are zero
            channels = sorted(torch.randperm(96, generator=generator)[:channels_removed].tolist())
            layer.mlp.gate_proj.weight[channels] = 0
            heads = [group * 4 + int(torch.randint(4, (1,), generator=generator)) for group in range(2)]
            for head in heads:
                layer.self_attn.o_proj.weight[:, head * 4:(head + 1) * 4] = 0
            dead_channels.append(channels)
            dead_heads.append(heads)
    plan = plan_pruning(model, calibration, ratio=0.3, channel_multiple=1, pad_id=tokenizer.pad_token_id)
    for layer in range(2):
        assert sorted(set(range(96)) - set(plan.kept_channels[layer])) == dead_channels[layer]
        assert sorted(set(range(8)) - set(plan.kept_heads[layer])) == dead_heads[layer]
        assert plan.kept_kv_heads[layer] == [0, 1]
    pruned = apply_pruning(model, plan)
    # what was removed contributed nothing, so the outputs are unchanged
    assert torch.allclose(_logits(pruned, calibration[3]), _logits(model, calibration[3]), atol=1e-5)


def test_drop_layers_removes_the_layer_that_changes_the_least(tmp_path, tokenizer, calibration):
    model = _model(tokenizer, arch="qwen2", hidden_size=32, layers=3, heads=4, kv_heads=2, seed=6)
    with torch.no_grad():   # layer 1 adds nothing to the residual stream: block influence 0
        model.model.layers[1].self_attn.o_proj.weight.zero_()
        model.model.layers[1].mlp.down_proj.weight.zero_()
    plan = plan_pruning(model, calibration, ratio=0.0, drop_layers=1, pad_id=tokenizer.pad_token_id)
    assert plan.kept_layers == [0, 2]
    assert abs(plan.layer_influence[1]) < 1e-6 < min(plan.layer_influence[0], plan.layer_influence[2])
    reloaded = _load(save_model_dir(apply_pruning(model, plan), tokenizer, str(tmp_path / "shallow")))
    assert reloaded.config.num_hidden_layers == 2 and len(reloaded.config.layer_types) == 2
    assert [layer.self_attn.layer_idx for layer in reloaded.model.layers] == [0, 1]
    assert torch.allclose(_logits(reloaded, calibration[4]), _logits(model, calibration[4]), atol=1e-5)
    reloaded.generate(torch.tensor([calibration[4]]), max_new_tokens=3, do_sample=False,
                      pad_token_id=tokenizer.pad_token_id)


def test_amounts_and_architecture_are_checked(tokenizer, calibration):
    from transformers import GPT2Config, GPT2LMHeadModel

    model = _model(tokenizer, hidden_size=32, layers=2)
    with pytest.raises(UserError, match="ratio"):
        plan_pruning(model, calibration, ratio=1.0)
    with pytest.raises(UserError, match="drop_layers"):
        plan_pruning(model, calibration, ratio=0.1, drop_layers=2)
    with pytest.raises(UserError, match="calibration"):
        plan_pruning(model, [], ratio=0.1)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=1, n_head=2))
    with pytest.raises(UserError, match="Llama/Qwen2/Mistral"):
        decoder_geometry(gpt2)


def test_read_calibration_renders_prompts_responses_and_texts(tmp_path, tokenizer):
    path = tmp_path / "calibration.jsonl"
    rows = [{"prompt": "Count the words: red blue", "chosen": "There are two words."},
            {"prompt": [{"role": "user", "content": "Echo these words: cat dog"}]},
            {"text": "plain text row"}]
    path.write_text("\n".join(json.dumps(row) for row in rows) + "\n\n")
    ids = read_calibration(str(path), tokenizer, samples=10, max_length=1000)
    first_prompt = prompt_ids(tokenizer, [{"role": "user", "content": rows[0]["prompt"]}])
    assert ids[0][:len(first_prompt)] == first_prompt and ids[0][-1] == tokenizer.eos_token_id
    assert ids[1] == prompt_ids(tokenizer, rows[1]["prompt"])
    assert ids[2] == tokenizer("plain text row")["input_ids"]
    assert len(read_calibration(str(path), tokenizer, samples=2, max_length=5)) == 2
    assert all(len(row) <= 5 for row in read_calibration(str(path), tokenizer, samples=3, max_length=5))
    path.write_text(json.dumps({"prompt": "fine"}) + "\n" + json.dumps({"other": 1}) + "\n")
    with pytest.raises(DataError, match="line 2"):
        read_calibration(str(path), tokenizer, samples=10, max_length=100)


def test_the_checkpoint_dtype_is_the_default(tmp_path, tokenizer):
    bf16 = save_model_dir(_model(tokenizer, hidden_size=32, layers=1).to(torch.bfloat16), tokenizer,
                          str(tmp_path / "bf16"))
    assert checkpoint_dtype(bf16) == torch.bfloat16


def test_cli_end_to_end(tmp_path, student_dir):
    calibration = tmp_path / "prompts.jsonl"
    calibration.write_text("".join(json.dumps(row) + "\n" for row in make_examples(12, seed=7)))
    out = tmp_path / "pruned"
    result = subprocess.run([sys.executable, "-m", "fastdadpo", "prune", "--model", student_dir, "--ratio", "0.2",
                             "--drop-layers", "1", "--calibration", str(calibration), "--calibration-samples", "8",
                             "--out", str(out), "--device", "cpu"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "parameters" in result.stdout and "layers 2 -> 1" in result.stdout
    report = json.loads((out / "pruning_report.json").read_text())
    model = _load(str(out))
    assert model.config.num_hidden_layers == 1 and model.config.use_cache
    assert sum(p.numel() for p in model.parameters()) == report["parameters_after"] < report["parameters_before"]
    assert (out / "tokenizer.json").exists()


def test_cli_bad_input_is_one_paragraph_without_traceback(tmp_path, student_dir):
    result = subprocess.run([sys.executable, "-m", "fastdadpo", "prune", "--model", str(tmp_path / "missing"),
                             "--out", str(tmp_path / "out"), "--calibration", "x.jsonl"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert result.stderr.startswith("fastdadpo: error: --model:") and "missing" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("case", ["ratio", "no_calibration", "malformed_calibration", "nonempty_out"])
def test_cli_bad_input(case, tmp_path, student_dir, capsys):
    out = tmp_path / "out"
    calibration = tmp_path / "calibration.jsonl"
    calibration.write_text('{"prompt": "Count the words: red"}\n')
    args = ["prune", "--model", student_dir, "--out", str(out), "--calibration", str(calibration), "--device", "cpu"]
    expected = {"ratio": "ratio", "no_calibration": "--calibration", "malformed_calibration": "line 2",
                "nonempty_out": "--out"}[case]
    if case == "ratio":
        args += ["--ratio", "1.5"]
    elif case == "no_calibration":
        args = args[:5] + ["--device", "cpu"]
    elif case == "malformed_calibration":
        calibration.write_text('{"prompt": "Count the words: red"}\n{"prompt": \n')
    else:
        os.makedirs(out)
        (out / "config.json").write_text("{}")
    assert cli.main(args) == 2
    stderr = capsys.readouterr().err
    assert stderr.startswith("fastdadpo: error:") and expected in stderr and "Traceback" not in stderr
