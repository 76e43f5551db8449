"""The demo's results over its seeds: mean ± standard deviation of every model's figures, per task
family and kind (single or several right answers), a paired test of the preference objectives
against dSFT and dDPO on the same held-out prompts, and the daDPO β2 sweep.

The paired test is McNemar's exact test on per-prompt correctness, pooled over the seeds (each seed
has its own held-out prompts, so every (seed, prompt) is one paired observation): only the prompts
where exactly one of the two models is right carry information, and under "no difference" each of
them is equally likely to go either way, so the two-sided p-value is a binomial tail at 1/2.
"""
from __future__ import annotations

import json
import math
import os
import statistics
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

from fastdadpo.base.errors import UserError
from fastdadpo.commands.evaluate import subset_summary, text_table
from fastdadpo.demo.synthetic import ALL_TASKS, MULTI_ANSWER_TASKS

KINDS = ("single", "multi")
# (model, baseline) pairs tested, in the order they are printed; a pair with a missing model is left out.
COMPARISONS = (("after dDPO", "after dSFT"), ("after daDPO", "after dSFT"), ("after daDPO-token", "after dSFT"),
               ("after daDPO", "after dDPO"), ("after daDPO-token", "after dDPO"))
SIGNIFICANCE = 0.05


@dataclass(frozen=True)
class SeedRun:
    seed: int
    results: dict          # the seed's eval.json
    tasks: List[str]       # each held-out row's task family, in the evaluation's order
    kinds: List[str]       # each held-out row's kind: "single" or "multi"

    @property
    def members(self) -> Dict[str, List[int]]:
        """Row indices per group: "all", each kind and each task family present."""
        return _members(self.tasks, self.kinds)


def load_seed_run(seed_dir: str, seed: int) -> SeedRun:
    paths = {"eval": os.path.join(seed_dir, "eval.json"), "heldout": os.path.join(seed_dir, "data", "heldout.jsonl")}
    try:
        with open(paths["eval"], encoding="utf-8") as handle:
            results = json.load(handle)
        with open(paths["heldout"], encoding="utf-8") as handle:
            rows = [json.loads(line) for line in handle if line.strip()]
    except (OSError, ValueError) as exc:
        raise UserError(f"seed {seed}: cannot read its results ({exc}); rerun the demo to complete it") from None
    if len(rows) != results["examples"]:
        raise UserError(f"{paths['eval']} covers {results['examples']} prompts but {paths['heldout']} holds "
                        f"{len(rows)}; rerun the demo with --fresh")
    return SeedRun(seed, results, [row["task"] for row in rows], [row["kind"] for row in rows])


# --- statistics ------------------------------------------------------------------------------------------

def mcnemar_exact(only_first: int, only_second: int) -> float:
    """Two-sided exact McNemar p-value from the discordant counts. Written here on purpose: it is one
    binomial tail (scipy.stats.binomtest gives the same, tested against an enumeration), and scipy
    would be a dependency of the whole package for these three lines."""
    n = only_first + only_second
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(only_first, only_second) + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def spread(values: Sequence[Optional[float]]) -> dict:
    """Mean and sample standard deviation (None with one value) of the known values."""
    known = [v for v in values if v is not None]
    if not known:
        return {"mean": None, "std": None, "values": list(values)}
    return {"mean": statistics.fmean(known), "std": statistics.stdev(known) if len(known) > 1 else None,
            "values": list(values)}


def _members(tasks: Sequence[str], kinds: Sequence[str]) -> Dict[str, List[int]]:
    groups = {"all": list(range(len(tasks)))}
    for kind in KINDS:
        groups[kind] = [i for i, value in enumerate(kinds) if value == kind]
    for task in dict.fromkeys(tasks):
        groups[task] = [i for i, value in enumerate(tasks) if value == task]
    return {name: members for name, members in groups.items() if members}


def summarize(runs: Sequence[SeedRun], *, beta2: float, sweep: Dict[str, float]) -> dict:
    """Everything the report prints, as plain data (the demo writes it to results.json)."""
    sweep_models = {f"after {name}" for name in sweep}
    names = [name for name in runs[0].results["models"]
             if name not in sweep_models and all(name in run.results["models"] for run in runs)]
    groups_of = [run.members for run in runs]  # computed once: every model and metric reads them
    groups = list(groups_of[0])
    models = {}
    for name in names:
        per_group = {group: {} for group in groups}
        for group in groups:
            seeds = [subset_summary(run.results, name, members[group])
                     for run, members in zip(runs, groups_of) if group in members]
            for metric in ("accuracy", "preference_rate", "forward_kl"):
                per_group[group][metric] = spread([s.get(metric) for s in seeds])
        per_group["all"]["reverse_kl"] = spread([run.results["models"][name]["reverse_kl"] for run in runs])
        models[name] = per_group
    return {"seeds": [run.seed for run in runs], "prompts_per_seed": runs[0].results["examples"],
            "groups": groups, "models": models, "paired": paired_tests(runs, names),
            "sweep": sweep_table(runs[0], beta2, sweep)}


def paired_tests(runs: Sequence[SeedRun], names: Sequence[str]) -> List[dict]:
    groups_of = [run.members for run in runs]
    tests = []
    for model, baseline in COMPARISONS:
        if model not in names or baseline not in names:
            continue
        entry = {"model": model, "baseline": baseline}
        for group in ("all",) + KINDS:
            only_model = only_baseline = pairs = 0
            for run, members in zip(runs, groups_of):
                first, second = (run.results["models"][m]["correct"] for m in (model, baseline))
                for i in members.get(group, []):
                    if first[i] is None or second[i] is None:
                        continue
                    pairs += 1
                    only_model += first[i] and not second[i]
                    only_baseline += second[i] and not first[i]
            entry[group] = {"pairs": pairs, "only_model": only_model, "only_baseline": only_baseline,
                            "p": mcnemar_exact(only_model, only_baseline)}
        tests.append(entry)
    return tests


def sweep_table(run: SeedRun, beta2: float, sweep: Dict[str, float]) -> List[dict]:
    """daDPO at each β2 of the first seed, β2 = 0 being dDPO (the same loss with β = β1)."""
    if not sweep:
        return []
    points = {0.0: "after dDPO", beta2: "after daDPO", **{value: f"after {name}" for name, value in sweep.items()}}
    members = run.members
    rows = []
    for value in sorted(points):
        row = run.results["models"].get(points[value])
        if row is None:
            continue
        rows.append({"beta2": value, "model": points[value],
                     **{group: subset_summary(run.results, points[value], members[group])
                        for group in ("all",) + KINDS if group in members}})
    return rows


# --- text ------------------------------------------------------------------------------------------------

def _percent(stat: dict) -> str:
    if stat["mean"] is None:
        return "-"
    return f"{stat['mean']:.1%}" + (f" ± {stat['std'] * 100:.1f}" if stat["std"] is not None else "")


def _signed_percent(stat: dict) -> str:
    if stat["mean"] is None:
        return "-"
    return f"{stat['mean']:+.1%}" + (f" ± {stat['std'] * 100:.1f}" if stat["std"] is not None else "")


def _kl(stat: dict) -> str:
    if stat["mean"] is None:
        return "-"
    return f"{stat['mean']:.4f}" + (f" ± {stat['std']:.4f}" if stat["std"] is not None else "")


def verdict(test: dict) -> str:
    """"9:1 p=0.021 better": prompts only the model / only the baseline got right, the p-value, and
    the verdict at the significance level (n.s.: no significant difference)."""
    counts = f"{test['only_model']}:{test['only_baseline']} p={test['p']:.2g}"
    if test["p"] >= SIGNIFICANCE:
        return f"{counts} n.s."
    return f"{counts} " + ("better" if test["only_model"] > test["only_baseline"] else "worse")


def format_report(summary: dict) -> str:
    seeds, models = summary["seeds"], summary["models"]
    plural = "s" if len(seeds) > 1 else ""
    spread_note = " (mean ± std over seeds)" if len(seeds) > 1 else ""
    lines = [f"{len(seeds)} seed{plural} × {summary['prompts_per_seed']} held-out prompts{spread_note}; judge: exact; "
             f"pref = (wins - losses) / pairs; KL per teacher-response token", ""]
    lines += text_table(["model", "accuracy", "KL(t||s)", "KL(s||t)", "pref"],
                    [[name, _percent(m["all"]["accuracy"]), _kl(m["all"]["forward_kl"]), _kl(m["all"]["reverse_kl"]),
                      _signed_percent(m["all"]["preference_rate"])] for name, m in models.items()])
    lines += ["", "by kind of task: one right answer (single) or several (multi)", ""]
    lines += text_table(["model"] + [f"{title} {kind}" for title in ("accuracy", "pref", "KL(t||s)") for kind in KINDS],
                    [[name] + [_percent(m[kind]["accuracy"]) for kind in KINDS]
                     + [_signed_percent(m[kind]["preference_rate"]) for kind in KINDS]
                     + [_kl(m[kind]["forward_kl"]) for kind in KINDS] for name, m in models.items()])
    families = [task for task in ALL_TASKS if task in summary["groups"]]
    lines += ["", "accuracy by task family (several right answers: " + ", ".join(
        f for f in families if f in MULTI_ANSWER_TASKS) + ")", ""]
    lines += text_table(["model"] + families, [[name] + [_percent(m[f]["accuracy"]) for f in families]
                                           for name, m in models.items()])
    if summary["paired"]:
        lines += ["", f"paired test on per-prompt correctness (McNemar, exact; {len(seeds)} seed{plural} pooled): "
                      "prompts only the model : only the baseline got right, p, and the verdict at p < 0.05 "
                      "(n.s.: no significant difference)", ""]
        lines += text_table(["model vs baseline"] + [f"{group}" for group in ("all",) + KINDS],
                        [[f"{t['model']} vs {t['baseline']}"] +
                         [verdict(t[g]) for g in ("all",) + KINDS]
                         for t in summary["paired"]])
    if summary["sweep"]:
        lines += ["", f"daDPO β2 sweep (seed {seeds[0]}; β1 0.1; β2 = 0 is dDPO)", ""]
        lines += text_table(["β2", "accuracy", "acc single", "acc multi", "pref", "KL(t||s)"],
                        [[f"{row['beta2']:g}", _percent(spread([row['all']['accuracy']])),
                          _percent(spread([row.get('single', {}).get('accuracy')])),
                          _percent(spread([row.get('multi', {}).get('accuracy')])),
                          _signed_percent(spread([row['all'].get('preference_rate')])),
                          _kl(spread([row['all']['forward_kl']]))] for row in summary["sweep"]])
    return "\n".join(lines)
