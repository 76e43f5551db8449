"""One TRL training run in its own process, for bench/test_peer_trainers.py:
``python -m bench.peers_trl SPEC.json`` writes ``SPEC["out"]`` (JSON: per-step metrics, step times,
the token ids of every sequence the first step trained on, the process's peak RSS).

Trainers (``SPEC["trainer"]``):

* ``dpo``: ``trl.DPOTrainer``, its default reference handling (a second copy of the starting model
  loaded from the same directory and run, without gradients, on every batch);
* ``dpo-precomputed``: the same with ``precompute_ref_log_probs=True`` (reference log-probs computed
  once over the dataset before training, the reference model then dropped);
* ``gkd``: ``trl.experimental.gkd.GKDTrainer`` offline (``lmbda=0``: never samples from the
  student; ``seq_kd=False``), ``beta=0`` (TRL's generalized JSD at beta 0 is KL(teacher||student),
  forward KL), on the conversations prompt + chosen;
* ``distillation``: ``trl.DistillationTrainer``, ``beta=0`` (forward KL), temperature 1. It only
  trains on-policy (it samples completions from the student); here its single-turn generation is
  replaced by the chosen response's tokens, so it runs its chunked divergence loss on the same
  tokens as the others and the sampling cost is not counted.

Every trainer gets the same settings: fp32, no gradient checkpointing (TRL's default is on;
fastdadpo does not checkpoint), AdamW (0.9, 0.999, 1e-8), no weight decay, a cosine
schedule with no warm-up, gradient clipping at 1.0, one process on the CPU (no DeepSpeed).
"""
from __future__ import annotations

import json
import os
import sys
import time


def _training_args(config_class, spec: dict, **extra):
    return config_class(
        output_dir=os.path.join(spec["work_dir"], "trl"), per_device_train_batch_size=spec["micro_batch_size"],
        gradient_accumulation_steps=1, max_steps=spec["steps"], learning_rate=spec["lr"],
        lr_scheduler_type="cosine", warmup_steps=0, weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.999,
        adam_epsilon=1e-8, max_grad_norm=1.0, seed=spec["seed"], data_seed=spec["seed"], bf16=False, fp16=False,
        gradient_checkpointing=False, logging_steps=1, report_to="none", save_strategy="no", disable_tqdm=True,
        dataloader_num_workers=0, use_cpu=True, **extra)


class _Recorder:
    """Step wall times (on_step_begin to on_step_end) and the first step's token ids."""

    def __init__(self):
        self.step_started = None
        self.step_seconds = []
        self.sequences = None  # [{"prompt": [...], "response": [...]}] of the first step
        self.tokens_per_step = []  # non-pad tokens forwarded through the student

    def callback(self):
        from transformers import TrainerCallback

        recorder = self

        class StepTimer(TrainerCallback):
            def on_step_begin(self, args, state, control, **kwargs):
                recorder.step_started = time.perf_counter()

            def on_step_end(self, args, state, control, **kwargs):
                recorder.step_seconds.append(time.perf_counter() - recorder.step_started)

        return StepTimer()

    def record(self, sequences, tokens: int):
        if self.sequences is None:
            self.sequences = sequences
        self.tokens_per_step.append(int(tokens))


def _split_rows(input_ids, keep, response):
    """Per row: the kept (non-pad) ids, split into prompt and response by the ``response`` mask."""
    rows = []
    for ids, kept, is_response in zip(input_ids.tolist(), keep.tolist(), response.tolist()):
        tokens = [(i, r) for i, k, r in zip(ids, kept, is_response) if k]
        rows.append({"prompt": [i for i, r in tokens if not r], "response": [i for i, r in tokens if r]})
    return rows


def _load(path: str):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def _rows(path: str):
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def run_dpo(spec: dict, recorder: _Recorder, precompute: bool):
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    tokenizer = AutoTokenizer.from_pretrained(spec["student"])
    args = _training_args(DPOConfig, spec, beta=spec["beta"], loss_type=["sigmoid"], max_length=spec["max_length"],
                          precompute_ref_log_probs=precompute, disable_dropout=True)
    trainer = DPOTrainer(model=_load(spec["student"]), args=args, processing_class=tokenizer,
                         train_dataset=Dataset.from_list(_rows(spec["pairs"])))
    collator = trainer.data_collator

    def recording_collator(examples):
        batch = collator(examples)
        rows = _split_rows(batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
        half = len(rows) // 2  # DPO's batch: the chosen sequences, then the rejected ones
        recorder.record([{"prompt": c["prompt"], "chosen": c["response"], "rejected": r["response"]}
                         for c, r in zip(rows[:half], rows[half:])], batch["attention_mask"].sum())
        return batch

    trainer.data_collator = recording_collator
    return trainer


def run_gkd(spec: dict, recorder: _Recorder):
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    tokenizer = AutoTokenizer.from_pretrained(spec["student"])
    args = _training_args(GKDConfig, spec, lmbda=0.0, beta=0.0, seq_kd=False, max_length=spec["max_length"],
                          disable_dropout=True)
    rows = [{"messages": row["prompt"] + row["chosen"]} for row in _rows(spec["pairs"])]
    trainer = GKDTrainer(model=_load(spec["student"]), teacher_model=_load(spec["teacher"]), args=args,
                         processing_class=tokenizer, train_dataset=Dataset.from_list(rows))
    collator = trainer.data_collator

    def recording_collator(examples):
        batch = collator(examples)
        rows = _split_rows(batch["input_ids"], batch["attention_mask"], batch["labels"] != -100)
        recorder.record([{"prompt": r["prompt"], "chosen": r["response"]} for r in rows],
                        batch["attention_mask"].sum())
        return batch

    trainer.data_collator = recording_collator
    return trainer


def run_distillation(spec: dict, recorder: _Recorder):
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import DistillationConfig, DistillationTrainer

    tokenizer = AutoTokenizer.from_pretrained(spec["student"])
    pairs = _rows(spec["pairs"])
    # The chosen response's tokens, keyed by the prompt's: the template's rendering of prompt +
    # chosen minus the prompt's rendering, as DPOTrainer and GKD's collator cut it.
    completions = {}
    for row in pairs:
        prompt_ids = tokenizer.apply_chat_template(row["prompt"], add_generation_prompt=True, tokenize=True,
                                                   return_dict=True)["input_ids"]
        full = tokenizer.apply_chat_template(row["prompt"] + row["chosen"], tokenize=True,
                                             return_dict=True)["input_ids"]
        assert full[:len(prompt_ids)] == prompt_ids, "the chat template renders the prompt differently in context"
        completions[tuple(prompt_ids)] = full[len(prompt_ids):]

    class OfflineDistillationTrainer(DistillationTrainer):
        def _generate_single_turn(self, prompt_ids, images, multimodal_fields, has_tool_images=False):
            completion_ids = [list(completions[tuple(ids)]) for ids in prompt_ids]
            recorder.record([{"prompt": list(p), "chosen": c} for p, c in zip(prompt_ids, completion_ids)],
                            sum(len(p) + len(c) for p, c in zip(prompt_ids, completion_ids)))
            return completion_ids

    args = _training_args(DistillationConfig, spec, beta=0.0, temperature=1.0, shuffle_dataset=False,
                          max_completion_length=spec["max_length"], disable_dropout=True)
    return OfflineDistillationTrainer(model=_load(spec["student"]), teacher_model=_load(spec["teacher"]), args=args,
                                      processing_class=tokenizer,
                                      train_dataset=Dataset.from_list([{"prompt": row["prompt"]} for row in pairs]))


def main(spec_path: str) -> None:
    import torch

    from bench.memory import peak_rss_bytes

    with open(spec_path, encoding="utf-8") as handle:
        spec = json.load(handle)
    torch.manual_seed(spec["seed"])
    recorder = _Recorder()
    builders = {"dpo": lambda: run_dpo(spec, recorder, precompute=False),
                "dpo-precomputed": lambda: run_dpo(spec, recorder, precompute=True),
                "gkd": lambda: run_gkd(spec, recorder), "distillation": lambda: run_distillation(spec, recorder)}
    started = time.perf_counter()
    trainer = builders[spec["trainer"]]()
    trainer.add_callback(recorder.callback())
    setup_seconds = time.perf_counter() - started
    trainer.train()
    steps = [entry for entry in trainer.state.log_history if "loss" in entry and "step" in entry]
    import trl

    result = {"steps": steps, "step_seconds": recorder.step_seconds, "tokens_per_step": recorder.tokens_per_step,
              "first_step_sequences": recorder.sequences, "setup_seconds": setup_seconds,
              "self_peak_rss_bytes": peak_rss_bytes(), "trl_version": trl.__version__,
              "reference": {"dpo": "reference model loaded and run on every batch (TRL's default)",
                            "dpo-precomputed": "reference log-probs precomputed over the dataset before training "
                                               "(precompute_ref_log_probs=True), reference model dropped",
                            }.get(spec["trainer"])}
    with open(spec["out"], "w", encoding="utf-8") as handle:
        json.dump(result, handle)


if __name__ == "__main__":
    main(sys.argv[1])
