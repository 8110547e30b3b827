"""Result files of a suite run: one JSON per (dataset, task), and a summary as Markdown, CSV and an optional plot.

The per-entry JSON uses CLIP_benchmark's layout and metric keys (``dataset``, ``model``, ``pretrained``, ``task``,
``metrics`` with ``acc1``, ``image_retrieval_recall@5``, ...), so tools that read its results read ours. The summary
shows one main figure per entry, its protocol, and the unweighted mean of the main figures.
"""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

from vlp import atomic
from vlp.eval.suite import Result, Suite


def _number(value) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4f}"
    return str(value)


def unweighted_average(results: list[Result]) -> float:
    values = [r.metrics[r.main_metric] for r in results]
    values = [v for v in values if isinstance(v, (int, float)) and not math.isnan(v)]
    return sum(values) / len(values) if values else math.nan


def write_results(suite: Suite, results: list[Result], model: dict, out: Path, plot: bool = False) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    seen: dict[str, int] = {}
    for r in results:
        slug = r.entry.slug
        seen[slug] = seen.get(slug, 0) + 1
        name = slug if seen[slug] == 1 else f"{slug}__{seen[slug]}"  # the same task twice on one dataset
        path = out / f"{name}.json"
        atomic.write_text(path, json.dumps(r.as_json(model), indent=1, default=str) + "\n")
        written[name] = path
    average = unweighted_average(results)
    written["summary.md"] = _markdown(suite, results, model, average, out / "summary.md")
    written["summary.csv"] = _csv(results, average, out / "summary.csv")
    if plot:
        written["summary.png"] = _plot(suite, results, model, out / "summary.png")
    return written


def _markdown(suite: Suite, results: list[Result], model: dict, average: float, path: Path) -> Path:
    lines = [f"# {suite.name}: {model.get('model')} ({model.get('pretrained')})", "",
             "| dataset | task | metric | value | protocol |", "|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r.entry.dataset.name} | {r.entry.evaluator.task} | {r.main_metric} | "
                     f"{_number(r.metrics[r.main_metric])} | {r.entry.evaluator.protocol() or 'standard'} |")
    lines.append(f"| **average** | unweighted over {len(results)} entries | | {_number(average)} | |")
    notes = _dropped_notes(results)
    if notes:
        lines += ["", "Not evaluated:", *notes]
    warnings = [f"- {r.entry.dataset.name} {r.entry.evaluator.task}: {w}"
                for r in results for w in r.entry.evaluator.warnings]
    if warnings:
        lines += ["", "Warnings:", *warnings]
    atomic.write_text(path, "\n".join(lines) + "\n")
    return path


def _dropped_notes(results: list[Result]) -> list[str]:
    """One line per dataset that holds files or samples the figures leave out, so a reader sees it beside them."""
    lines, seen = [], set()
    for r in results:
        dataset = r.entry.dataset
        if dataset.name in seen:
            continue
        seen.add(dataset.name)
        dropped = dataset.dropped()
        for folder, suffixes in dropped["unsupported_files"].items():
            listed = ", ".join(f"{suffix} {n}" for suffix, n in suffixes.items())
            lines.append(f"- {dataset.name}: {sum(suffixes.values())} files of an unsupported type in {folder} "
                         f"({listed})")
        skipped = dropped["skipped_when_written"]
        if skipped:
            listed = ", ".join(f"{reason} {n}" for reason, n in skipped.items())
            lines.append(f"- {dataset.name}: {sum(skipped.values())} samples skipped when the shards were written "
                         f"({listed})")
    return lines


def _csv(results: list[Result], average: float, path: Path) -> Path:
    keys: list[str] = []
    for r in results:
        keys.extend(k for k in r.metrics if k not in keys)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["dataset", "task", "main_metric", "value", "protocol", *keys])
        for r in results:
            writer.writerow([r.entry.dataset.name, r.entry.evaluator.task, r.main_metric, r.metrics[r.main_metric],
                             r.entry.evaluator.protocol() or "standard", *[r.metrics.get(k, "") for k in keys]])
        writer.writerow(["average", "unweighted", "", average, "", *[""] * len(keys)])
    return path


def _plot(suite: Suite, results: list[Result], model: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    slugs = [r.entry.slug for r in results]

    def label(r: Result) -> str:  # entries sharing dataset and task are told apart by their options
        text = f"{r.entry.dataset.name}\n{r.entry.evaluator.task}\n{r.main_metric}"
        if slugs.count(r.entry.slug) > 1 and r.entry.options:
            text += "\n" + ", ".join(f"{k}={v}" for k, v in r.entry.options.items())
        return text

    labels = [label(r) for r in results]
    values = [r.metrics[r.main_metric] for r in results]
    fig, ax = plt.subplots(figsize=(max(4.0, 1.8 * len(results)), 3.6))
    ax.bar(range(len(values)), values, color="#4c72b0")
    for i, v in enumerate(values):
        ax.text(i, v, _number(v), ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(values)), labels, fontsize=7)
    ax.set_ylim(0, 1.05)
    ax.set_title(f"{suite.name}: {model.get('model')}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
