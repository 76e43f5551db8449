"""The method study (`fastdadpo demo --study`): McNemar's power against a brute-force enumeration, the
sample size it gives, pair types, δ_te and implicit rewards from hand-made tables, sequence
log-probs against the materialized logits of a real model, answer coverage from known samples, and
the quick study end to end (its report, its refusal of --beta2-sweep)."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from fastdadpo.demo import study_measures
from fastdadpo.demo.study_measures import (PAIR_TYPES, TrainingPairs, heldout_types, pair_type, quantiles,
                                           reward_summary, teacher_margins)
from fastdadpo.demo.report import mcnemar_exact
from fastdadpo.demo.study_report import mcnemar_power, prompts_needed

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _brute_power(n, discordance, difference, alpha):
    """Σ over every (only first, only second) split of n prompts, multinomially weighted, of the exact
    test's rejections: an enumeration independent of the summed-binomial formula."""
    p_first, p_second = (discordance + difference) / 2, (discordance - difference) / 2
    p_same = 1 - discordance
    total = 0.0
    for a in range(n + 1):
        for b in range(n - a + 1):
            weight = (math.factorial(n) / (math.factorial(a) * math.factorial(b) * math.factorial(n - a - b))
                      * p_first ** a * p_second ** b * p_same ** (n - a - b))
            if mcnemar_exact(a, b) < alpha:
                total += weight
    return total


@pytest.mark.parametrize("n,discordance,difference", [(20, 0.3, 0.1), (35, 0.5, 0.2), (40, 0.2, 0.0), (25, 1.0, 0.4)])
def test_power_matches_enumeration(n, discordance, difference):
    assert mcnemar_power(n, discordance, difference, 0.05) == pytest.approx(
        _brute_power(n, discordance, difference, 0.05), abs=1e-9)


def test_power_grows_with_prompts_and_sample_size_is_where_it_reaches_target():
    assert mcnemar_power(200, 0.1) < mcnemar_power(900, 0.1) < mcnemar_power(3000, 0.1)
    needed = prompts_needed(0.10)
    assert mcnemar_power(needed, 0.10) >= 0.8 > mcnemar_power(needed - 40, 0.10)
    # The normal approximation the issue quotes (~870 at 10% discordance): the exact test needs a little more.
    z_a, z_b, p1 = 1.959964, 0.841621, 0.65
    approx = ((z_a * 0.5 + z_b * math.sqrt(p1 * (1 - p1))) / (p1 - 0.5)) ** 2 / 0.10
    assert approx < needed < 1.15 * approx
    assert mcnemar_power(100, 0.0) == 0.0 and mcnemar_power(100, 0.05, 0.06) == 0.0  # impossible effects


def test_pair_types():
    assert pair_type(True, True, True) == "same answer"
    assert pair_type(True, True, False) == "both right"
    assert pair_type(False, True, False) == "teacher wrong" == pair_type(False, False, False)
    assert pair_type(True, False, False) == "student wrong"
    results = {"models": {
        "teacher": {"correct": [True, True, False, True], "responses": ["a", "b", "c", "d "]},
        "after dSFT": {"correct": [True, False, False, True], "responses": ["e", "f", "c", "d"]}}}
    assert heldout_types(results) == ["both right", "student wrong", "same answer", "same answer"]


class _Pairs:
    types = ["same answer", "both right", "student wrong", "student wrong", "teacher wrong"]


def test_margins_and_rewards_from_tables():
    teacher = torch.tensor([[-1.0, -1.0], [-2.0, -3.0], [-1.0, -9.0], [-0.5, -4.0], [-6.0, -1.0]])
    reference = torch.tensor([[-2.0, -2.0], [-2.5, -2.0], [-1.5, -3.0], [-1.0, -2.0], [-3.0, -3.0]])
    delta = teacher_margins(_Pairs(), teacher, reference)
    assert delta == pytest.approx([0.0, 1.5, 6.5, 2.5, -5.0])
    policy = reference + torch.tensor([[0.3, 0.3], [1.0, -1.0], [0.0, -2.0], [-1.0, 0.0], [0.5, 1.0]])
    summary = reward_summary(_Pairs(), policy, reference, beta=0.1)
    assert summary["distinct"]["pairs"] == 4 and summary["distinct"]["accuracy"] == pytest.approx(0.5)
    assert summary["both right"]["margin"] == pytest.approx(0.2)
    assert summary["student wrong"] == pytest.approx({"pairs": 2, "accuracy": 0.5, "margin": 0.05})
    assert summary["teacher wrong"]["accuracy"] == 0.0


def test_quantiles_interpolate_like_numpy():
    values = [3.0, -1.0, 7.5, 2.0, 0.0, -4.0, 10.0]
    got = quantiles(values)
    import numpy as np
    for key, q in (("p10", 0.1), ("p25", 0.25), ("median", 0.5), ("p75", 0.75), ("p90", 0.9)):
        assert got[key] == pytest.approx(float(np.quantile(values, q)))
    assert got["median_abs"] == pytest.approx(float(np.median(np.abs(values)))) and quantiles([]) is None


def test_sequence_logps_equal_the_materialized_logits(student_dir, tmp_path):
    """The fused table against log_softmax of the full logits on the same token ids, in float32."""
    from transformers import AutoModelForCausalLM

    from fastdadpo.models.loading import load_tokenizer

    rows = [{"prompt": "Echo these words: tiger mouse", "chosen": "You said: tiger mouse",
             "rejected": "You said: tiger", "answer": ["You said: tiger mouse"]},
            {"prompt": "Name a word from: sun moon", "chosen": "It is sun.", "rejected": "It is moon.",
             "answer": ["It is sun.", "It is moon."]},
            {"prompt": "Name a word from: red", "chosen": "It is red.", "rejected": "It is red.",
             "answer": ["It is red."]}]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    pairs = TrainingPairs(str(path), load_tokenizer(student_dir, "m"), max_length=64, max_prompt_length=40)
    assert pairs.types == ["student wrong", "both right", "same answer"]
    table = pairs.sequence_logps(student_dir, batch_size=2)
    model = AutoModelForCausalLM.from_pretrained(student_dir, dtype=torch.float32).eval()
    for row, example in enumerate(pairs.tokenized):
        for column, response in enumerate((example.chosen_ids, example.rejected_ids)):
            ids = torch.tensor([example.prompt_ids + response])
            with torch.no_grad():
                logps = model(ids).logits[0].double().log_softmax(-1)
            start = len(example.prompt_ids) - 1
            expected = sum(float(logps[start + t, token]) for t, token in enumerate(response))
            assert float(table[row, column]) == pytest.approx(expected, abs=1e-4)
    assert float(table[2, 0]) == float(table[2, 1])


def test_answer_coverage_counts_distinct_right_answers(monkeypatch, tmp_path, student_dir):
    rows = [{"prompt": "p1", "answer": ["a", "b", "c"], "kind": "multi", "task": "pick"},
            {"prompt": "p2", "answer": ["x"], "kind": "single", "task": "repeat"},
            {"prompt": "p3", "answer": ["u", "v"], "kind": "multi", "task": "pair"}]
    path = tmp_path / "heldout.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    drawn = ["a", "a", "b", "wrong", " u ", "u", "u", "u"]  # prompt 1: 2 of 3 answers; prompt 3: 1 of 2
    asked = []

    def fake_generate(model, tokenizer, prompts, **kwargs):
        asked.append((len(prompts), kwargs["temperature"]))
        return drawn

    monkeypatch.setattr(study_measures, "generate_texts", fake_generate)
    got = study_measures.answer_coverage(student_dir, str(path), samples=4, max_new_tokens=4, seed=0)
    assert asked == [(8, 1.0)]
    assert got == {"prompts": 2, "samples": 4, "coverage": pytest.approx((2 / 3 + 1 / 2) / 2),
                   "validity": pytest.approx(7 / 8)}


def _env():
    return dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")


@pytest.mark.slow
def test_quick_study_end_to_end(tmp_path):
    out = tmp_path / "study"
    result = subprocess.run([sys.executable, "-m", "fastdadpo", "demo", "--study", "--quick", "--out", str(out)],
                            capture_output=True, text=True, timeout=1200, env=_env(), cwd=REPO)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    state = json.load(open(out / "study.json"))
    assert len(state["beta2"]) == 4 and state["median_abs_delta_te"] > 0
    assert [round(b * state["median_abs_delta_te"], 1) for b in state["beta2"]] == pytest.approx(
        [0.1, 0.3, 1.0, 3.0], rel=0.06)
    summary = json.load(open(out / "results.json"))
    trained = ["after dDPO"] + [f"after daDPO-b2-{b:g}" for b in state["beta2"]]
    assert list(summary["models"]) == ["teacher", "after dSFT"] + trained
    measures = json.load(open(out / "seed-0" / "study-measures.json"))
    assert sum(measures["types"].values()) > 0 and set(measures["types"]) == set(PAIR_TYPES)
    assert set(measures["rewards"]) == set(trained) and set(measures["coverage"]) == {"teacher", "after dSFT",
                                                                                      *trained}
    for section in ("1. did the preference stage train?", "3. paired tests", "4. power", "5. training pairs",
                    "6. held-out accuracy per pair type"):
        assert section in result.stdout
    assert (out / "results.txt").read_text().count("after daDPO-b2-") >= 8
    # A second run reuses every stage and prints the same tables.
    again = subprocess.run([sys.executable, "-m", "fastdadpo", "demo", "--study", "--quick", "--out", str(out)],
                           capture_output=True, text=True, timeout=600, env=_env(), cwd=REPO)
    assert again.returncode == 0 and "[run] train" not in again.stdout
    assert again.stdout.split("min this run")[1] == result.stdout.split("min this run")[1]


def test_study_refuses_a_hand_set_sweep():
    result = subprocess.run([sys.executable, "-m", "fastdadpo", "demo", "--study", "--quick", "--beta2-sweep", "0.1"],
                            capture_output=True, text=True, timeout=300, env=_env(), cwd=REPO)
    assert result.returncode == 2 and "measured δ_te" in result.stderr and "Traceback" not in result.stderr
