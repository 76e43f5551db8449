"""PNG plots of a recipe's training curves and of its final comparison (matplotlib, no display)."""
from __future__ import annotations

import json
import os
from typing import Dict, List

CURVES = (("loss", "loss"), ("rewards/accuracy", "reward accuracy (preference runs)"),
          ("kd/divergence", "token divergence to the teacher"))
COMPARISON = (("accuracy", "accuracy (held-out)", "{:.0%}"), ("preference_rate", "preference rate vs teacher", "{:+.0%}"),
              ("forward_kl", "KL(teacher‖student) per token", "{:.3f}"))


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _rows(metrics_path: str) -> List[dict]:
    if not os.path.exists(metrics_path):
        return []
    with open(metrics_path, encoding="utf-8") as handle:
        return [row for row in (json.loads(line) for line in handle if line.strip()) if "loss" in row]


def training_curves_figure(runs: Dict[str, str]):
    """The curves' figure: one panel per metric in CURVES that some run logged, one line per run (its
    metrics.jsonl), each run in one colour in every panel (its place in ``runs``: a run that did not
    log a panel's metric leaves its colour unused there rather than shifting the others'), a legend
    in every panel."""
    plt = _pyplot()
    logged = {name: _rows(os.path.join(run_dir, "metrics.jsonl")) for name, run_dir in runs.items()}
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    colour_of = {name: colours[i % len(colours)] for i, name in enumerate(runs)}
    panels = [(key, title) for key, title in CURVES if any(key in row for rows in logged.values() for row in rows)]
    figure, axes = plt.subplots(1, max(1, len(panels)), figsize=(5 * max(1, len(panels)), 3.6), squeeze=False)
    for axis, (key, title) in zip(axes[0], panels):
        for name, rows in logged.items():
            points = [(row["step"], row[key]) for row in rows if key in row]
            if points:
                axis.plot(*zip(*points), label=name, linewidth=1.2, color=colour_of[name])
        axis.set_title(title)
        axis.set_xlabel("optimizer step")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    figure.tight_layout()
    return figure


def plot_training_curves(runs: Dict[str, str], out_png: str) -> str:
    figure = training_curves_figure(runs)
    figure.savefig(out_png, dpi=120)
    _pyplot().close(figure)
    return out_png


def plot_comparison(results: dict, out_png: str) -> str:
    """Bars per model for accuracy, preference rate against the teacher and divergence to it."""
    plt = _pyplot()
    names = list(results["models"])
    figure, axes = plt.subplots(1, len(COMPARISON), figsize=(5 * len(COMPARISON), 3.8))
    for axis, (key, title, fmt) in zip(axes, COMPARISON):
        values = [results["models"][name].get(key) for name in names]
        shown = [v if v is not None else 0.0 for v in values]
        bars = axis.bar(range(len(names)), shown, color=["#555555"] + ["#4C72B0"] * (len(names) - 1))
        for bar, value in zip(bars, values):
            if value is not None:
                axis.annotate(fmt.format(value), (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                              ha="center", va="bottom", fontsize=8)
        axis.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
        axis.set_title(title)
        axis.axhline(0, color="black", linewidth=0.6)
        axis.grid(axis="y", alpha=0.3)
    figure.tight_layout()
    figure.savefig(out_png, dpi=120)
    plt.close(figure)
    return out_png


def plot_recipe(recipe) -> tuple:
    """curves.png and comparison.png next to the recipe's eval.json."""
    runs = {"dSFT": recipe.training_dir("dSFT")}
    runs.update({name: recipe.training_dir(name) for name in recipe.students})
    curves = plot_training_curves(runs, recipe.path("curves.png"))
    with open(recipe.path("eval.json"), encoding="utf-8") as handle:
        comparison = plot_comparison(json.load(handle), recipe.path("comparison.png"))
    return curves, comparison
