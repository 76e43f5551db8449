"""The demo's statistics over seeds: the exact McNemar test against its definition and a brute-force
enumeration, mean ± std, per-kind and per-family figures recomputed by hand from per-prompt results,
and the β2 sweep's rows."""
import json
import math

import pytest

from fastdadpo.base.errors import UserError
from fastdadpo.demo.report import SeedRun, format_report, load_seed_run, mcnemar_exact, spread, summarize


def test_mcnemar_exact_matches_enumeration():
    for only_first, only_second in [(0, 0), (1, 0), (5, 5), (9, 2), (2, 9), (30, 12), (0, 7)]:
        n = only_first + only_second
        if n == 0:
            assert mcnemar_exact(0, 0) == 1.0
            continue
        observed = math.comb(n, only_first) / 2 ** n
        # Two-sided: every split at least as unlikely as the observed one, under Binomial(n, 1/2).
        brute = sum(math.comb(n, k) / 2 ** n for k in range(n + 1) if math.comb(n, k) / 2 ** n <= observed + 1e-15)
        assert mcnemar_exact(only_first, only_second) == pytest.approx(min(1.0, brute), rel=1e-12)
    assert mcnemar_exact(9, 1) < 0.05 < mcnemar_exact(6, 2)


def test_spread_is_mean_and_sample_std():
    got = spread([0.5, 0.6, 0.7])
    assert got["mean"] == pytest.approx(0.6) and got["std"] == pytest.approx(0.1)
    assert spread([0.4])["std"] is None and spread([None])["mean"] is None


def _run(seed, correct, outcomes_by_model, kinds, tasks, row_kl):
    tokens = [2] * len(kinds)
    models = {"teacher": {"accuracy": 1.0, "forward_kl": 0.0, "reverse_kl": 0.0, "correct": [True] * len(kinds)}}
    for name, flags in correct.items():
        models[name] = {"accuracy": sum(flags) / len(flags), "correct": flags,
                        "outcomes": outcomes_by_model[name], "row_forward_kl": row_kl[name],
                        "forward_kl": sum(row_kl[name]) / sum(tokens), "reverse_kl": 0.1 * seed}
    return SeedRun(seed, {"examples": len(kinds), "row_tokens": tokens, "models": models}, tasks, kinds)


def test_summary_recomputed_by_hand():
    kinds, tasks = ["single", "single", "multi", "multi"], ["first", "count", "pick", "pair"]
    names = ["after dSFT", "after dDPO", "after daDPO", "after daDPO-b2-0.2"]
    runs = []
    for seed, pattern in enumerate([(1, 0, 1, 0), (1, 1, 0, 0)]):
        correct = {name: [bool((bit + k) % 2) if k else bool(bit) for bit in pattern] for k, name in enumerate(names)}
        outcomes = {name: ["tie" if flag else "loss" for flag in flags] for name, flags in correct.items()}
        row_kl = {name: [0.1 * (k + 1)] * 4 for k, name in enumerate(names)}
        runs.append(_run(seed, correct, outcomes, kinds, tasks, row_kl))
    runs[1].results["models"].pop("after daDPO-b2-0.2")  # the sweep runs in the first seed only
    summary = summarize(runs, beta2=0.02, sweep={"daDPO-b2-0.2": 0.2})
    assert list(summary["models"]) == ["teacher", "after dSFT", "after dDPO", "after daDPO"]
    dsft = summary["models"]["after dSFT"]
    assert dsft["all"]["accuracy"]["values"] == [0.5, 0.5]
    assert dsft["single"]["accuracy"]["values"] == [0.5, 1.0] and dsft["multi"]["accuracy"]["values"] == [0.5, 0.0]
    assert dsft["single"]["preference_rate"]["values"] == [-0.5, 0.0]
    assert dsft["all"]["reverse_kl"]["values"] == [0.0, 0.1]
    assert dsft["pick"]["accuracy"]["values"] == [1.0, 0.0]
    assert summary["models"]["after dDPO"]["multi"]["forward_kl"]["mean"] == pytest.approx(0.4 / 4)  # row sums / tokens
    # dDPO is right exactly where dSFT is wrong: 4 prompts each way over two seeds.
    test = next(t for t in summary["paired"] if t["model"] == "after dDPO" and t["baseline"] == "after dSFT")
    assert (test["all"]["pairs"], test["all"]["only_model"], test["all"]["only_baseline"]) == (8, 4, 4)
    assert test["all"]["p"] == 1.0 and test["multi"]["pairs"] == 4
    assert [row["beta2"] for row in summary["sweep"]] == [0.0, 0.02, 0.2]
    assert summary["sweep"][2]["multi"]["accuracy"] == runs[0].results["models"]["after daDPO-b2-0.2"]["correct"][2:] \
        .count(True) / 2
    text = format_report(summary)
    for part in ("2 seeds × 4 held-out prompts", "50.0% ± 0.0", "after daDPO vs after dDPO", "β2 sweep",
                 "4:4 p=1 n.s.", "several right answers: pick, pair"):
        assert part in text, part


def test_load_seed_run_refuses_mismatched_files(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "eval.json").write_text(json.dumps({"examples": 3, "models": {}}))
    (tmp_path / "data" / "heldout.jsonl").write_text('{"task": "pick", "kind": "multi"}\n')
    with pytest.raises(UserError, match="covers 3 prompts but .* holds 1"):
        load_seed_run(str(tmp_path), 0)
    with pytest.raises(UserError, match="seed 4: cannot read its results"):
        load_seed_run(str(tmp_path / "missing"), 4)
