"""Two "nodes" on one machine: two torchrun launchers (--nnodes=2, --node_rank 0 and 1, one process
each, a shared static rendezvous on 127.0.0.1, gloo) train exactly what one node with two ranks
trains: the same loss and gradient norm at every step, the same exported model. Both nodes write
their part of each checkpoint (their ZeRO-3 shards and RNG state), and a run resumed on the two
nodes from a mid-run checkpoint reproduces the uninterrupted run's later steps. Under both engines."""
import json
import os
import socket
import subprocess
import sys

import pytest
import yaml

TIMEOUT = 300
pytestmark = pytest.mark.slow  # two launchers, each a ZeRO-3 training: the full suite only
STEPS, SAVE_EVERY = 4, 2


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    from fastdadpo.demo.synthetic import WORDS, make_examples
    import random

    rng = random.Random(0)
    rows = [{"prompt": r["prompt"], "chosen": r["answer"], "rejected": " ".join(rng.sample(WORDS, 3))}
            for r in make_examples(16, seed=5, tasks=("repeat", "first"))]
    path = tmp_path_factory.mktemp("multinode") / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _config(tmp_path, student_dir, teacher_dir, pairs, cache, engine: str = "deepspeed") -> str:
    config = {
        "model": {"student": student_dir, "teacher": teacher_dir},
        "data": {"train": pairs, "max_length": 48, "max_prompt_length": 32, "cache_dir": cache},
        "objective": {"name": "dadpo_token"},  # a teacher online: its shards and head live on both nodes
        "train": {"micro_batch_size": 1, "lr": 3e-3, "max_steps": STEPS, "warmup_ratio": 0.0,
                  "save_every": SAVE_EVERY, "seed": 11, "output_dir": str(tmp_path / "unset")},
        **({"deepspeed": {"zero_stage": 3, "extra": {"zero_optimization": {"stage3_param_persistence_threshold": 0}}}}
           if engine == "deepspeed" else {"engine": engine}),
    }
    path = tmp_path / "multinode.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def _env():
    return dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
                HF_HUB_OFFLINE="1")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _one_node(config: str, *sets: str):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", "fastdadpo", "train", config] + [a for s in sets for a in ("--set", s)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT, env=_env())
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]


def _two_nodes(config: str, *sets: str):
    """Both launchers at once, as two machines would start them; each sees only its node_rank."""
    port = _free_port()
    procs = []
    for node_rank in (0, 1):
        command = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node_rank={node_rank}",
                   "--nproc_per_node=1", "--master_addr=127.0.0.1", f"--master_port={port}",
                   "-m", "fastdadpo", "train", config] + [a for s in sets for a in ("--set", s)]
        procs.append(subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                      env=_env()))
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=TIMEOUT)[0])
    finally:
        for proc in procs:
            if proc.poll() is None:  # a hung node: end our own launchers, never anything else
                proc.kill()
                proc.communicate()
    for node_rank, (proc, output) in enumerate(zip(procs, outputs)):
        assert proc.returncode == 0, f"node {node_rank}:\n{output[-6000:]}"
    return outputs


def _metrics(run_dir) -> list:
    with open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def _weights(run_dir) -> dict:
    from safetensors.torch import load_file

    return load_file(os.path.join(run_dir, "final", "model.safetensors"))


def _same_steps(actual, expected, steps):
    assert [r["step"] for r in actual] == steps
    for a, b in zip(actual, expected):
        for key in ("loss", "grad_norm", "kd/divergence", "rewards/margin"):
            assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-7), (key, a["step"])


@pytest.mark.parametrize("engine", ["deepspeed", "fsdp2"])
def test_two_nodes_equal_one_node_and_resume_across_them(tmp_path, student_dir, teacher_dir, pairs, engine):
    import torch

    config = _config(tmp_path, student_dir, teacher_dir, pairs, str(tmp_path / "cache"), engine)
    one, two, resumed = tmp_path / "one_node", tmp_path / "two_nodes", tmp_path / "resumed"
    _one_node(config, f"train.output_dir={one}")
    outputs = _two_nodes(config, f"train.output_dir={two}")
    assert "world_size=2" in outputs[0] or "2 rank(s)" in outputs[0]

    expected = _metrics(one)
    _same_steps(_metrics(two), expected, list(range(1, STEPS + 1)))
    reference, weights = _weights(one), _weights(two)
    assert reference.keys() == weights.keys()
    for name in reference:
        torch.testing.assert_close(weights[name], reference[name], rtol=1e-6, atol=1e-7, msg=name)

    # Each checkpoint holds both nodes' parts: rank 1 lives only on node 1.
    checkpoints = two / "checkpoints"
    assert sorted(os.listdir(checkpoints)) == [f"step-{s}" for s in range(SAVE_EVERY, STEPS + 1, SAVE_EVERY)]
    for step in os.listdir(checkpoints):
        files = [f for _, _, names in os.walk(checkpoints / step) for f in names]
        assert {"rng-rank0.safetensors", "rng-rank1.safetensors"} <= set(files), files
        for rank in (0, 1):
            shards = f"rank_{rank}_" if engine == "deepspeed" else f"rank{rank}."
            assert any(shards in f and f.endswith(".pt") for f in files), (rank, files)
        assert json.loads((checkpoints / step / "complete.json").read_text())["world_size"] == 2

    # Resume on the two nodes from the mid-run checkpoint: the later steps and the model are the same.
    _two_nodes(config, f"train.output_dir={resumed}", f"train.resume={checkpoints / f'step-{SAVE_EVERY}'}")
    _same_steps(_metrics(resumed), expected[SAVE_EVERY:], list(range(SAVE_EVERY + 1, STEPS + 1)))
    for name, tensor in _weights(resumed).items():
        torch.testing.assert_close(tensor, reference[name], rtol=1e-6, atol=1e-7, msg=name)
