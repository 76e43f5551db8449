"""Config loading: defaults in one place, --set overrides, and a clear error for every bad key or value."""
import glob
import os

import pytest
import torch
import yaml

from fastdadpo.base.errors import ConfigError
from fastdadpo.commands.config import load_config
from fastdadpo.core.objectives import DaDPO, SFT
from fastdadpo.engine.deepspeed.config import student_config, validate_extra

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def base(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"model": {"student": "s", "teacher": "t"}, "data": {"train": "d.jsonl"},
                                    "objective": {"name": "dadpo"}}))
    return str(path)


def test_defaults_and_overrides(base):
    config = load_config(base, ["train.lr=1e-5", "objective.beta2=0.3", "train.max_steps=10",
                                "train.lr=2e-5", "deepspeed.extra.zero_optimization.reduce_bucket_size=5.0e8"])
    assert config.lr == 2e-5  # YAML 1.1 reads 1e-5 as a string; later --set wins
    assert config.objective.beta2 == 0.3 and config.objective.beta1 == 0.1
    assert config.train.max_steps == 10 and config.deepspeed.zero_stage == 3
    assert config.deepspeed.extra == {"zero_optimization": {"reduce_bucket_size": 500000000}}
    assert load_config(base).lr == DaDPO.default_lr == 5e-7
    assert load_config(base, ["objective.name=sft"]).lr == SFT.default_lr == 2e-5


@pytest.mark.parametrize("overrides,message", [
    (["train.lrr=1"], "unknown config key 'train.lrr' (did you mean 'train.lr'?)"),
    (["trian.lr=1"], "unknown config section 'trian'"),
    (["objective.name=kl"], "objective.name is 'kl'"),
    (["objective.beta1=0"], "objective.beta1 must be a finite number > 0"),
    (["objective.beta=0.7"], "objective.beta is not a parameter of objective 'dadpo' (it is a parameter of dpo, "
                             "dadpo_token); 'dadpo' has average_logps, beta1, beta2"),
    (["objective.gamma=3.0"], "objective.gamma is not a parameter of objective 'dadpo'"),
    (["objective.name=kd", "objective.jsd_beta=0.3"], "objective.jsd_beta applies to kind jsd only"),
    (["train.lr=.nan"], "train.lr must be a finite number"),
    (["train.epochs=.inf"], "train.epochs must be a finite number"),
    (["train.timeout_minutes=.nan"], "train.timeout_minutes must be a finite number"),
    (["train.max_grad_norm=-1"], "train.max_grad_norm must be >= 0 (0: off)"),
    (["train.resume=/nonexistent/step-3"], "train.resume is '/nonexistent/step-3', which is not a directory"),
    (["model.dtype=fp8"], "model.dtype is 'fp8'"),
    (["model.liger_kernels=maybe"], "model.liger_kernels is 'maybe'; choose auto, true or false"),
    (["model.liger_kernels=true"], "model.liger_kernels is true, but Liger's kernels are Triton GPU kernels and "
                                   "this machine has no CUDA device"),
    (["objective.name=kd", "objective.kind=jsd", "objective.jsd_beta=1.0"], "objective.jsd_beta must be in (0, 1)"),
    (["objective.name=dpo", "objective.loss_type=kto"], "objective.loss_type is 'kto'"),
    (["objective.name=dpo", "objective.label_smoothing=0.1", "objective.loss_type=ipo"],
     "applies to loss_type sigmoid, robust, exo_pair, not 'ipo'"),
    (["model.teacher=null"], "model.teacher is required by objective 'dadpo'"),
    (["objective.name=adpa"], "model.teacher_reference is required by objective 'adpa'"),
    (["data.max_prompt_length=2000"], "data.max_prompt_length (2000) must be positive and below data.max_length"),
    (["engine=megatron"], "engine.name is 'megatron'; choose deepspeed or fsdp2"),
    (["engine.cpu_offload=true"], "engine.cpu_offload is read by engine fsdp2 only"),
    (["engine=fsdp2", "deepspeed.zero_stage=2"], "deepspeed is read by engine deepspeed only, and this config trains "
                                                 "with engine fsdp2"),
    (["train.micro_batch_size=1.5"], "train.micro_batch_size must be an integer"),
    (["train.lr=fast"], "train.lr must be a number"),
    (["data.packing=yes please"], "data.packing must be true or false"),
    (["deepspeed.zero_stage=4"], "deepspeed.zero_stage must be 0, 1, 2 or 3"),
    (["deepspeed.teacher_offload=true", "deepspeed.zero_stage=2"], "teacher_offload needs deepspeed.zero_stage 3"),
    (["train.lr"], "expected KEY=VALUE"),
])
def test_bad_values_name_the_key(base, overrides, message):
    with pytest.raises(ConfigError) as error:
        load_config(base, overrides)
    assert message in str(error.value)
    # Values given with --set are blamed on that --set; a key the file lacks, on the file.
    blamed = str(error.value).split(": ", 1)[0]
    assert blamed in {base, "--set 'train.lr'"} | {f"--set {o.split('=', 1)[0]}" for o in overrides}
    assert (blamed == base) == (message == "model.teacher_reference is required by objective 'adpa'")


def test_bad_yaml_names_the_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  student: s\n train: [\n")
    with pytest.raises(ConfigError, match="line"):
        load_config(str(path))
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(str(tmp_path / "missing.yaml"))


@pytest.mark.parametrize("extra,message", [
    ({"zero_optimization.stage": 3}, "is dotted"),
    ({"zero_optimisation": {}}, "did you mean 'zero_optimization'"),
    ({"train_micro_batch_size_per_gpu": 4}, "use train.micro_batch_size"),
    ({"optimizer": {"type": "Adam"}}, "fastdadpo uses torch AdamW"),
    ({"zero_optimization": {"stage": 2}}, "use deepspeed.zero_stage"),
    ({"zero_optimization": {"stage3_prefetch_bucket_size": 1.5}}, "must be an integer"),
    ({"zero_optimization": {"no_such_option": 1}}, "Extra inputs are not permitted"),
    ({"zero_optimization": {"offload_param": {"device": "floppy"}}}, "zero_optimization is invalid"),
    ({"zero_optimization": 5}, "deepspeed.extra.zero_optimization must be a mapping"),
    ({"zero_optimization": None}, "deepspeed.extra.zero_optimization must be a mapping"),
    ({"activation_checkpointing": 5}, "deepspeed.extra.activation_checkpointing must be a mapping"),
    ({"checkpoint": {"tag_validation": "bogus"}}, "takes Ignore, Warn or Fail"),
    ({"wall_clock_breakdown": "maybe"}, "deepspeed.extra.wall_clock_breakdown must be true or false"),
    # Inside the sections DeepSpeed reads key by key without checking: the type of its default.
    ({"activation_checkpointing": {"partition_activations": "maybe"}},
     "activation_checkpointing.partition_activations is 'maybe'; DeepSpeed expects true or false"),
    ({"activation_checkpointing": {"partition_activation": True}}, "(did you mean 'partition_activations'?)"),
    ({"flops_profiler": {"profile_step": "1"}}, "flops_profiler.profile_step is '1'; DeepSpeed expects int"),
    ({"aio": {"block_size": "big"}}, "aio.block_size is 'big'"),
    # The sections DeepSpeed validates with its own models, checked by them before any model loads.
    ({"tensorboard": {"enabled": True, "output_pth": "x"}}, "deepspeed.extra.tensorboard is invalid"),
    ({"comms_logger": {"enabled": "maybe"}}, "deepspeed.extra.comms_logger is invalid"),
    ({"hybrid_engine": {"max_out_tokens": 0}}, "deepspeed.extra.hybrid_engine is invalid"),
])
def test_deepspeed_extra_is_validated(extra, message):
    with pytest.raises(ConfigError) as error:
        validate_extra(extra, "c.yaml")
    assert message in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize("extra", [
    {"activation_checkpointing": {"partition_activations": True, "number_checkpoints": 4}},
    {"flops_profiler": {"enabled": False, "recompute_fwd_factor": 1, "output_file": "flops.txt"}},
    {"aio": {"block_size": 1048576, "single_submit": False}},
    {"activation_checkpointing": {"partition_activations": None}, "flops_profiler": {"profile_step": 2}},
    {"tensorboard": {"enabled": False, "output_path": "tb/"}, "comms_logger": {"enabled": False}},
    {"checkpoint": {"tag_validation": "Warn"}, "wall_clock_breakdown": True},
])
def test_valid_deepspeed_extra_sections_are_accepted(extra):
    """What DeepSpeed takes passes: the checks are DeepSpeed's own types, not stricter."""
    assert validate_extra(extra, "c.yaml") == extra


def test_integral_floats_in_deepspeed_sections_become_ints():
    """YAML reads 1.048576e6 as a float: made an int as in zero_optimization; 1.5 is refused."""
    assert validate_extra({"aio": {"block_size": 1.048576e6}}, "c.yaml") == {"aio": {"block_size": 1048576}}
    assert validate_extra({"flops_profiler": {"profile_step": 1.0}}, "c.yaml") == {"flops_profiler": {"profile_step": 1}}
    with pytest.raises(ConfigError, match="deepspeed.extra.flops_profiler.profile_step must be an integer, got 1.5"):
        validate_extra({"flops_profiler": {"profile_step": 1.5}}, "c.yaml")


def test_student_deepspeed_config_merges_extra():
    config = student_config(zero_stage=3, micro_batch_size=4, grad_accum=2, max_grad_norm=1.0, dtype=torch.bfloat16,
                            extra={"zero_optimization": {"stage3_max_live_parameters": "1e9", "offload_optimizer":
                                                         {"device": "cpu"}}}, source="c.yaml")
    assert config["train_micro_batch_size_per_gpu"] == 4 and config["gradient_accumulation_steps"] == 2
    assert config["bf16"] == {"enabled": True} and config["fp16"] == {"enabled": False}
    zero = config["zero_optimization"]
    assert zero["stage"] == 3 and zero["stage3_gather_16bit_weights_on_model_save"] is True
    assert zero["stage3_max_live_parameters"] == 10**9 and zero["offload_optimizer"] == {"device": "cpu"}


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(REPO, "configs", "*.yaml"))),
                         ids=lambda p: os.path.basename(p))
def test_shipped_configs_are_valid(path):
    config = load_config(path)
    assert config.model.student and config.data.train


def test_errors_name_the_file_for_values_it_gave(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: {student: s, teacher: t}\ndata: {train: d.jsonl}\nobjective: {name: dadpo, beta: 0.7}\n")
    with pytest.raises(ConfigError, match=r"c\.yaml: objective\.beta is not a parameter of objective 'dadpo'"):
        load_config(str(path))


def test_dependent_default_follows_the_value_it_depends_on(base):
    config = load_config(base, ["data.max_length=64"])  # max_prompt_length never given: no error
    assert config.data.max_prompt_length is None and config.data.prompt_length == 32
    assert load_config(base).data.prompt_length == 512
    assert load_config(base, ["data.max_length=64", "data.max_prompt_length=40"]).data.prompt_length == 40


def test_duplicate_yaml_keys_are_refused(tmp_path):
    path = tmp_path / "twice.yaml"
    path.write_text("model: {student: s}\ndata: {train: d.jsonl}\ntrain: {lr: 1.0e-5}\ntrain: {max_steps: 3}\n")
    with pytest.raises(ConfigError, match=r"twice\.yaml line 4: .*'train' is written twice \(first at line 3\)"):
        load_config(str(path))


def test_objective_section_round_trips(base):
    config = load_config(base, ["objective.name=dpo", "objective.beta=0.3", "objective.loss_type=ipo"])
    assert config.to_dict()["objective"] == {"name": "dpo", "beta": 0.3, "loss_type": "ipo", "label_smoothing": 0.0,
                                             "average_logps": False}


def test_liger_kernels_auto_is_off_on_cpu(student_dir):
    from fastdadpo.models.loading import apply_liger_kernels, load_causal_lm

    model = load_causal_lm(student_dir, dtype=torch.float32, device=torch.device("cpu"), liger_kernels="auto")
    assert not apply_liger_kernels(model, "auto", "model.student")
    assert not apply_liger_kernels(model, False, "model.student")
    with pytest.raises(ConfigError, match="model.liger_kernels is true, but for model.student"):
        apply_liger_kernels(model, True, "model.student")


def test_attention_implementation_is_flash_attn_only_where_it_runs(monkeypatch):
    """flash-attn (varlen through the packed batches' restarting position ids) on CUDA in half
    precision when installed; PyTorch SDPA everywhere else (packing then uses its block mask)."""
    import importlib.util

    from fastdadpo.models.loading import attention_implementation

    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: object() if name == "flash_attn" else None)
    assert attention_implementation(cuda, torch.bfloat16) == "flash_attention_2"
    assert attention_implementation(cuda, torch.float32) == "sdpa"
    assert attention_implementation(cpu, torch.bfloat16) == "sdpa"
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    assert attention_implementation(cuda, torch.bfloat16) == "sdpa"


def test_the_deepspeed_launchers_local_rank_argument_moves_to_the_environment(monkeypatch):
    from fastdadpo.cli import take_launcher_local_rank

    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert take_launcher_local_rank(["train", "--local_rank=3", "c.yaml", "--set", "a=1"]) == [
        "train", "c.yaml", "--set", "a=1"]
    assert os.environ["LOCAL_RANK"] == "3"
    assert take_launcher_local_rank(["train", "c.yaml", "--local-rank", "5"]) == ["train", "c.yaml"]


def test_only_a_lost_peer_is_reported_as_one():
    """An out-of-memory error or a bug of this rank keeps its own error; a failed collective becomes
    the one paragraph about a lost rank."""
    from fastdadpo.base.collectives import DistInfo, peers_lost_reported
    from fastdadpo.base.errors import UserError

    info = DistInfo(rank=0, world_size=2, local_rank=0, device=torch.device("cpu"))
    for error in (torch.OutOfMemoryError("CUDA out of memory"), RuntimeError("mat1 and mat2 shapes cannot be multiplied")):
        with pytest.raises(type(error)):
            with peers_lost_reported(info, lambda: "at step 3", lambda: "resume"):
                raise error
    with pytest.raises(UserError, match="lost contact with rank\\(s\\) 1 at step 3"):
        with peers_lost_reported(info, lambda: "at step 3", lambda: "Resume from ckpt."):
            raise RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed by peer")


# --- bad input a careless or unlucky user writes: one paragraph naming the file or key, never a traceback ---

@pytest.mark.parametrize("overrides,message", [
    (["train.grad_accum=²"], "train.grad_accum must be an integer"),
    (["train.epochs=" + "9" * 400], "train.epochs must be a finite number, got 9999"),
    (["train.micro_batch_size=" + "9" * 25], "train.micro_batch_size is 9999"),
    (["train.seed=1180591620717411303424"], "train.seed is 1180591620717411303424, beyond any sensible value"),
    (["train.seed=4294967296"], "train.seed must be below 2^32"),
    (["objective.name=[dpo, kd]"], "objective.name is ['dpo', 'kd']; choose one of"),
    (["train={1: 2}"], "key 1 under train is not a string"),
    (["kernels.backend=cuda"], "kernels.backend is 'cuda'; choose one of chunked"),
    (["kernels.chunk_budget_mb=0"], "kernels.chunk_budget_mb must be > 0 MiB"),
])
def test_careless_values_are_one_paragraph(base, overrides, message):
    with pytest.raises(ConfigError) as error:
        load_config(base, overrides)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_careless_files_are_one_paragraph(base, tmp_path):
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes(b"model:\n  student: caf\xe9\n")
    with pytest.raises(ConfigError, match=r"latin1.yaml line 2: not UTF-8 \(byte 0xe9\)"):
        load_config(str(latin1))
    laughs = tmp_path / "laughs.yaml"
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 9)]
    laughs.write_text("\n".join(lines) + "\n")
    with pytest.raises(ConfigError, match="expands to more than 100,000 values"):
        load_config(str(laughs))
    null_key = tmp_path / "null-key.yaml"
    null_key.write_text("null: 1\n")
    with pytest.raises(ConfigError, match="key None under the top level is not a string"):
        load_config(str(null_key))
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    for key in ("train.output_dir", "data.cache_dir"):
        with pytest.raises(ConfigError, match=f"{key} is .*a-file.* is a file, not a directory"):
            load_config(base, [f"{key}={a_file}/out"])


def test_engine_section_picks_the_engine(base):
    from fastdadpo.engine.deepspeed.engine import DeepSpeedEngine
    from fastdadpo.engine.fsdp2.engine import FSDP2Engine

    assert isinstance(load_config(base).build_engine(), DeepSpeedEngine)
    fsdp2 = load_config(base, ["engine=fsdp2"])
    assert fsdp2.engine.name == "fsdp2" and isinstance(fsdp2.build_engine(), FSDP2Engine)
    offloaded = load_config(base, ["engine.name=fsdp2", "engine.cpu_offload=true"]).build_engine()
    assert offloaded.cpu_offload and "CPU offload" in offloaded.describe()
    with open(base, encoding="utf-8") as handle:
        raw = yaml.safe_load(handle)
    with open(base, "w", encoding="utf-8") as handle:
        yaml.safe_dump({**raw, "engine": "fsdp2"}, handle)  # the short form, then a key of the section
    assert load_config(base, ["engine.cpu_offload=true"]).build_engine().cpu_offload
