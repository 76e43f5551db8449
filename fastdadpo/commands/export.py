"""``fastdadpo export CHECKPOINT --out DIR``: a training checkpoint of either engine as a Hugging Face
model directory that ``from_pretrained`` loads (with LoRA: the merged model in DIR and the adapter
alone in DIR-adapter).

A checkpoint holds the engine's shards (ZeRO partitions, FSDP2 rank files), which only the engine
reads; so export builds the run's student in its engine from the run's ``config.yaml`` (next to
``checkpoints/``), loads the checkpoint exactly as a resume does (files checked, nothing unpickled)
and writes the model as the end of training writes ``final/`` (atomically). A checkpoint written by
W ranks is read by W ranks: run alone, export starts them itself on this machine (``torchrun
--nproc_per_node W``); under a launcher, it uses the launcher's ranks.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile

from fastdadpo.base import collectives
from fastdadpo.base.errors import ConfigError, UserError
from fastdadpo.commands.config import load_config
from fastdadpo.engine.checkpoints import COMPLETE
from fastdadpo.engine.interface import OptimizerSettings
from fastdadpo.models import loading as models
from fastdadpo.models.lora import add_lora


def add_arguments(parser) -> None:
    parser.add_argument("checkpoint", help="a checkpoint directory: OUTPUT_DIR/checkpoints/step-N")
    parser.add_argument("--out", required=True,
                        help="the Hugging Face model directory to write (must not exist; with LoRA the adapter goes "
                             "to OUT-adapter)")
    parser.add_argument("--config",
                        help="the run's config (default: config.yaml in the checkpoint's output directory, which "
                             "training writes there)")


def _checkpoint_ranks(path: str) -> int:
    try:
        with open(os.path.join(path, COMPLETE), encoding="utf-8") as handle:
            return int(json.load(handle)["world_size"])
    except (OSError, ValueError, KeyError, TypeError):
        raise UserError(f"{path}: not a complete fastdadpo checkpoint (no readable {COMPLETE}); give "
                        f"OUTPUT_DIR/checkpoints/step-N of a training run") from None


def _run_config(args) -> str:
    config = args.config or os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(args.checkpoint))),
                                         "config.yaml")
    if not os.path.isfile(config):
        raise UserError(f"{config}: the run's config is not there (training writes config.yaml in its output "
                        f"directory); give it with --config")
    return config


def _relaunch(args, ranks: int) -> int:
    """This command again under ``ranks`` local processes (the checkpoint's writers' count)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}",
               "-m", "fastdadpo", "export", args.checkpoint, "--out", args.out]
    if args.config:
        command += ["--config", args.config]
    print(f"fastdadpo export: {args.checkpoint} was written by {ranks} ranks; reading it with {ranks} local "
          f"processes", file=sys.stderr)
    return subprocess.run(command).returncode


def run(args) -> int:
    ranks = _checkpoint_ranks(args.checkpoint)
    config_path = _run_config(args)
    out = os.path.abspath(args.out)
    if os.path.exists(out):
        raise UserError(f"--out {args.out}: exists; export writes a new directory (remove it or choose another)")
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched == 1 and ranks > 1:
        return _relaunch(args, ranks)
    config = load_config(config_path)
    engine = config.build_engine()
    dist = engine.setup_distributed(timeout_s=config.train.timeout_minutes * 60)
    # Every rank reads its shard and gathers: a rank lost on the way is one paragraph on the others.
    with collectives.peers_lost_reported(dist, lambda: "while exporting",
                                         lambda: f"Nothing was written to {args.out}: run the export again."):
        if dist.world_size != ranks and engine.checkpoint_format().startswith("deepspeed"):
            raise ConfigError(f"{args.checkpoint} was written by {ranks} ranks and this export has {dist.world_size}; "
                              f"a DeepSpeed checkpoint is read by as many ranks as wrote it")
        dtype = models.resolve_dtype(config.model.dtype, dist.device)
        # The optimizer the checkpoint's state fills; its schedule is not used.
        t = config.train
        optimizer = OptimizerSettings(micro_batch_size=t.micro_batch_size, grad_accum=t.grad_accum, lr=config.lr,
                                      weight_decay=t.weight_decay, max_grad_norm=t.max_grad_norm,
                                      warmup_ratio=t.warmup_ratio, schedule=t.lr_scheduler_type, total_steps=1)
        model = engine.load_student(config.model.student, key="model.student", dtype=dtype, device=dist.device,
                                    optimizer=optimizer)
        if config.model.lora is not None:
            add_lora(model, config.model.lora)
        student = engine.build_student(model, dtype=dtype, optimizer=optimizer, dist=dist)
        step = student.load_checkpoint(args.checkpoint)
        tokenizer = models.load_tokenizer(config.model.student, "model.student")
        staging = tempfile.mkdtemp(prefix=".export-", dir=os.path.dirname(out)) if dist.is_main else None
        staging = collectives.broadcast_object(staging)
        try:
            final = student.export(tokenizer, staging, lora=config.model.lora, base_model=config.model.student)
            if dist.is_main:
                os.replace(final, out)
                if config.model.lora is not None:
                    os.replace(os.path.join(staging, "final-adapter"), out + "-adapter")
        finally:
            if dist.is_main:
                shutil.rmtree(staging, ignore_errors=True)
        if dist.is_main:
            adapter = f", the LoRA adapter in {out}-adapter" if config.model.lora is not None else ""
            print(f"fastdadpo export: step {step} of {config_path} -> {out} (Hugging Face format{adapter})")
    return 0
