"""The method study's results over its seeds: whether the preference stage trained, the δ_te
distribution, the β2 sweep against dDPO with paired tests, the held-out prompts and the training
pairs per pair type, the coverage of the several right answers, and each test's power.

Power of McNemar's exact test (two-sided, level α) for a difference Δ in accuracy between two models
on n paired prompts when a share d of them is discordant: the discordant count K is Binomial(n, d),
and given K = k the prompts only the first model gets right are Binomial(k, (d + Δ)/(2d)); the test
rejects when that count falls in the exact test's rejection region of Binomial(k, 1/2). Summed over k.
"""
from __future__ import annotations

import json
import math
import os
from typing import Dict, List, Sequence

from fastdadpo.base.errors import UserError
from fastdadpo.commands.evaluate import subset_summary, text_table
from fastdadpo.demo.report import SeedRun, load_seed_run, mcnemar_exact, spread, verdict
from fastdadpo.demo.study_measures import PAIR_TYPES, heldout_types

DIFFERENCE, ALPHA, POWER = 0.03, 0.05, 0.8  # the effect the study is sized to detect, and how surely
BASELINE, REFERENCE = "after dDPO", "after dSFT"


def _log_pmf(k: int, j: int, p: float) -> float:
    if p <= 0.0:
        return 0.0 if j == 0 else -math.inf
    if p >= 1.0:
        return 0.0 if j == k else -math.inf
    return (math.lgamma(k + 1) - math.lgamma(j + 1) - math.lgamma(k - j + 1) + j * math.log(p)
            + (k - j) * math.log1p(-p))


def _critical(k: int, alpha: float) -> int:
    """The largest c with mcnemar_exact(c, k − c) < α (−1 when no split of k is significant)."""
    tail, c = 0.0, -1
    for j in range(k // 2 + 1):
        tail += math.exp(_log_pmf(k, j, 0.5))
        if min(1.0, 2 * tail) >= alpha:
            break
        c = j
    return c


def mcnemar_power(n: int, discordance: float, difference: float = DIFFERENCE, alpha: float = ALPHA) -> float:
    """Power of the exact McNemar test on ``n`` pairs (see the module's docstring)."""
    if not 0 < discordance <= 1 or not 0 <= difference <= discordance:
        return 0.0
    p_first = (discordance + difference) / (2 * discordance)
    power = 0.0
    for k in range(n + 1):
        weight = math.exp(_log_pmf(n, k, discordance))
        if weight < 1e-12:
            continue
        c = _critical(k, alpha)
        if c < 0:
            continue
        low = sum(math.exp(_log_pmf(k, j, p_first)) for j in range(c + 1))
        high = sum(math.exp(_log_pmf(k, j, p_first)) for j in range(k - c, k + 1))
        power += weight * (low + high)
    return power


def prompts_needed(discordance: float, difference: float = DIFFERENCE, alpha: float = ALPHA,
                   power: float = POWER, step: int = 10, limit: int = 100_000) -> int:
    """The smallest n (in ``step``s) at which ``mcnemar_power`` reaches ``power``."""
    n = step
    while n <= limit:
        if mcnemar_power(n, discordance, difference, alpha) >= power:
            return n
        n += step * max(1, n // 500)
    return limit


def _load_measures(out: str, seed: int) -> dict:
    path = os.path.join(out, f"seed-{seed}", "study-measures.json")
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except (OSError, ValueError) as exc:
        raise UserError(f"seed {seed}: cannot read {path} ({exc}); rerun the study to complete it") from None


def _paired(runs: Sequence[SeedRun], model: str, baseline: str, members_of) -> dict:
    """McNemar pooled over the seeds on the prompts ``members_of(run)`` picks, with the discordance."""
    only_model = only_baseline = pairs = 0
    for run in runs:
        first, second = (run.results["models"][m]["correct"] for m in (model, baseline))
        for i in members_of(run):
            if first[i] is None or second[i] is None:
                continue
            pairs += 1
            only_model += first[i] and not second[i]
            only_baseline += second[i] and not first[i]
    return {"pairs": pairs, "only_model": only_model, "only_baseline": only_baseline,
            "p": mcnemar_exact(only_model, only_baseline),
            "difference": (only_model - only_baseline) / pairs if pairs else None,
            "discordance": (only_model + only_baseline) / pairs if pairs else None}


def _by_kind(runs, model, baseline, types_of) -> dict:
    groups = {"all": lambda run: range(len(run.kinds)),
              "single": lambda run: [i for i, k in enumerate(run.kinds) if k == "single"],
              "multi": lambda run: [i for i, k in enumerate(run.kinds) if k == "multi"]}
    for kind in PAIR_TYPES:
        groups[kind] = (lambda wanted: lambda run: [i for i, t in enumerate(types_of[run.seed]) if t == wanted])(kind)
    return {group: _paired(runs, model, baseline, pick) for group, pick in groups.items()}


def summarize_study(out: str, seeds: Sequence[int], state: dict, sweep: Dict[str, float]) -> dict:
    runs = [load_seed_run(os.path.join(out, f"seed-{seed}"), seed) for seed in seeds]
    measures = {seed: _load_measures(out, seed) for seed in seeds}
    types_of = {run.seed: heldout_types(run.results, REFERENCE) for run in runs}
    trained = [BASELINE] + sorted(sweep, key=sweep.get)
    models = ["teacher", REFERENCE] + trained
    table = {}
    for name in models:
        row = {}
        for group in ("all", "single", "multi"):
            per_seed = [subset_summary(run.results, name, run.members.get(group, [])) for run in runs]
            row[f"accuracy {group}"] = spread([s["accuracy"] for s in per_seed])
        row["KL multi"] = spread([subset_summary(run.results, name, run.members.get("multi", []))["forward_kl"]
                                  for run in runs])
        coverage = [measures[run.seed]["coverage"].get(name) for run in runs]
        row["coverage"] = spread([c["coverage"] if c else None for c in coverage])
        row["validity"] = spread([c["validity"] if c else None for c in coverage])
        if name in trained:
            rewards = [measures[run.seed]["rewards"][name] for run in runs]
            row["reward accuracy"] = spread([r["distinct"]["accuracy"] for r in rewards])
            row["reward margin"] = spread([r["distinct"]["margin"] for r in rewards])
            row["per pair type"] = {kind: {"accuracy": spread([r[kind]["accuracy"] for r in rewards]),
                                           "margin": spread([r[kind]["margin"] for r in rewards])}
                                    for kind in PAIR_TYPES if kind != "same answer"}
            row["changed"] = sum(a != b for run in runs for a, b in zip(run.results["models"][name]["responses"],
                                                                        run.results["models"][REFERENCE]["responses"]))
        table[name] = row
    heldout_accuracy = {name: {kind: _pooled_accuracy(runs, name, types_of, kind) for kind in PAIR_TYPES}
                        for name in models}
    paired = {name: _by_kind(runs, name, BASELINE, types_of) for name in trained[1:]}
    paired[BASELINE + " vs dSFT"] = _by_kind(runs, BASELINE, REFERENCE, types_of)
    for name in trained[1:]:
        paired[name + " vs dSFT"] = _by_kind(runs, name, REFERENCE, types_of)
    delta = {"all": _pool_quantiles([measures[s]["delta_te"]["all"] for s in seeds])}
    delta.update({kind: _pool_quantiles([measures[s]["delta_te"][kind] for s in seeds]) for kind in PAIR_TYPES})
    power = {name: {"discordance": test["all"]["discordance"], "pairs": test["all"]["pairs"],
                    "power": mcnemar_power(test["all"]["pairs"], test["all"]["discordance"] or 0.0),
                    "needed": prompts_needed(test["all"]["discordance"]) if test["all"]["discordance"] else None}
             for name, test in paired.items() if " vs " not in name}
    return {"seeds": list(seeds), "prompts_per_seed": runs[0].results["examples"], "state": state,
            "sweep": {name: {"beta2": b, "span": b * state["median_abs_delta_te"]} for name, b in sweep.items()},
            "models": table, "heldout_types": {kind: sum(t.count(kind) for t in types_of.values())
                                               for kind in PAIR_TYPES},
            "heldout_accuracy": heldout_accuracy, "training_types": {kind: sum(measures[s]["types"][kind]
                                                                               for s in seeds)
                                                                     for kind in PAIR_TYPES},
            "delta_te": delta, "paired": paired, "power": power}


def _pooled_accuracy(runs, name, types_of, kind):
    flags = [run.results["models"][name]["correct"][i] for run in runs
             for i, t in enumerate(types_of[run.seed]) if t == kind]
    known = [f for f in flags if f is not None]
    return {"prompts": len(known), "accuracy": sum(known) / len(known) if known else None}


def _pool_quantiles(per_seed: List[dict]) -> dict:
    """Seeds' quantiles combined: the mean of each (the seeds hold equal numbers of pairs)."""
    known = [q for q in per_seed if q]
    if not known:
        return {}
    return {key: sum(q[key] for q in known) / len(known) if key != "n" else sum(q["n"] for q in known)
            for key in known[0]}


# --- text ------------------------------------------------------------------------------------------------

def _cell(stat: dict, percent: bool = True, digits: int = 3) -> str:
    if stat is None or stat.get("mean") is None:
        return "-"
    if percent:
        return f"{stat['mean']:.1%}" + (f" ± {stat['std'] * 100:.1f}" if stat["std"] is not None else "")
    return f"{stat['mean']:.{digits}f}" + (f" ± {stat['std']:.{digits}f}" if stat["std"] is not None else "")


def _label(name: str, summary: dict) -> str:
    entry = summary["sweep"].get(name)
    return f"{name} (β2·m {entry['span']:.2g})" if entry else name


def format_study(summary: dict) -> str:
    seeds, models, state = summary["seeds"], summary["models"], summary["state"]
    n = len(seeds) * summary["prompts_per_seed"]
    lines = [f"{len(seeds)} seeds × {summary['prompts_per_seed']} held-out prompts ({n} paired observations); "
             f"mean ± std over seeds; β1 = 0.1; median |δ_te| m = {state['median_abs_delta_te']:.2f} nats "
             f"({state['measured_on']}), β2 = s/m for s in {', '.join(f'{s:g}' for s in state['spans'])}", "",
             "1. did the preference stage train? (reward accuracy and margin β1·h on the distinct training pairs; "
             "held-out answers changed against dSFT, of " + str(n) + ")", ""]
    trained = [name for name in models if "reward accuracy" in models[name]]
    lines += text_table(["model", "reward acc", "margin", "changed"],
                        [[_label(name, summary), _cell(models[name]["reward accuracy"]),
                          _cell(models[name]["reward margin"], False, 2), str(models[name]["changed"])]
                         for name in trained])
    lines += ["", "2. held-out accuracy, several-answer measures (KL(t||s) per teacher token on several-answer "
                  "prompts; coverage: share of a prompt's right answers among 8 samples at T=1; validity: share "
                  "of those samples that are right)", ""]
    lines += text_table(["model", "acc all", "acc single", "acc multi", "KL multi", "coverage", "validity"],
                        [[_label(name, summary), _cell(m["accuracy all"]), _cell(m["accuracy single"]),
                          _cell(m["accuracy multi"]), _cell(m["KL multi"], False, 4), _cell(m["coverage"]),
                          _cell(m["validity"])] for name, m in models.items()])
    lines += ["", "3. paired tests (McNemar, exact, seeds pooled): only the model : only the baseline right, p; "
                  "held-out pair types from the teacher's and dSFT's greedy answers", ""]
    groups = ["all", "single", "multi"] + list(PAIR_TYPES)
    lines += text_table(["model vs baseline"] + groups,
                        [[(name if " vs " in name else f"{_label(name, summary)} vs dDPO")]
                         + [verdict(test[g]) for g in groups] for name, test in summary["paired"].items()])
    lines += ["", f"4. power to detect a {DIFFERENCE:.0%} accuracy difference against dDPO at α {ALPHA} "
                  f"(from each comparison's measured discordance)", ""]
    lines += text_table(["model", "discordance", "pairs", "power", f"pairs for power {POWER}"],
                        [[_label(name, summary), f"{p['discordance']:.1%}", str(p["pairs"]), f"{p['power']:.2f}",
                          str(p["needed"]) if p["needed"] else "-"] for name, p in summary["power"].items()])
    lines += ["", "5. training pairs per type: count, δ_te quantiles (nats, mean over seeds), and each model's "
                  "reward accuracy / margin on them", ""]
    kinds = [k for k in PAIR_TYPES if k != "same answer"]
    delta = summary["delta_te"]
    lines += text_table(["pair type", "pairs", "δ_te p10", "p25", "median", "p75", "p90"],
                        [[kind, str(summary["training_types"][kind])]
                         + ([f"{delta[kind][q]:.2f}" for q in ("p10", "p25", "median", "p75", "p90")]
                            if delta.get(kind) else ["-"] * 5) for kind in PAIR_TYPES])
    lines += [""]
    lines += text_table(["model"] + kinds,
                        [[_label(name, summary)] + [f"{_cell(models[name]['per pair type'][k]['accuracy'])} / "
                                                    f"{_cell(models[name]['per pair type'][k]['margin'], False, 2)}"
                                                    for k in kinds] for name in trained])
    lines += ["", "6. held-out accuracy per pair type (pooled; prompts: " + ", ".join(
        f"{k} {summary['heldout_types'][k]}" for k in PAIR_TYPES) + ")", ""]
    lines += text_table(["model"] + list(PAIR_TYPES),
                        [[_label(name, summary)] + [_percent(summary["heldout_accuracy"][name][k]["accuracy"])
                                                    for k in PAIR_TYPES] for name in models])
    return "\n".join(lines)


def _percent(value) -> str:
    return "-" if value is None else f"{value:.1%}"
