"""Summaries recomputed from answer files: speedup (Spec-Bench's definition), accepted lengths, identity."""

from __future__ import annotations

import json
import platform
import statistics
from collections import defaultdict
from pathlib import Path

import torch
import transformers


def read_answers(path: Path) -> dict[int, dict]:
    """Answer records of one method by question id (the last record of an id wins)."""
    if not path.exists():
        return {}
    return {r["question_id"]: r for r in map(json.loads, path.read_text().splitlines()) if r}


def tokens_per_second(record: dict) -> float:
    choice = record["choices"][0]
    return sum(choice["new_tokens"]) / max(sum(choice["wall_time"]), 1e-9)


def summarize(answers: dict[str, dict[int, dict]], baseline: str = "baseline", sampled: bool = False) -> dict:
    """Per method: speedup per category and overall (mean per-prompt tokens/s of the method over that of
    the baseline, on the questions both answered), mean accepted length, acceptance by depth, identity
    (None for `sampled` runs, whose outputs are random draws)."""
    base = answers[baseline]
    summary = {}
    for method, records in answers.items():
        common = sorted(set(records) & set(base))
        by_category = defaultdict(list)
        for qid in common:
            by_category[records[qid]["category"]].append(qid)
        speedup = {cat: _speedup(records, base, qids) for cat, qids in sorted(by_category.items())}
        lengths = [n for qid in common for turn in records[qid]["choices"][0]["accept_lengths"] for n in turn]
        summary[method] = {
            "questions": len(common),
            "speedup": {"overall": _speedup(records, base, common), **speedup},
            "tokens_per_s": statistics.fmean(tokens_per_second(records[q]) for q in common) if common else None,
            "mean_accepted_length": statistics.fmean(lengths) if lengths else None,
            "acceptance_by_depth": _by_depth(lengths),
            "identical_share": None if sampled else _identical(records, base, common),
        }
    return summary


def _speedup(records: dict, base: dict, qids: list[int]) -> float | None:
    if not qids:
        return None
    return statistics.fmean(tokens_per_second(records[q]) for q in qids) / statistics.fmean(
        tokens_per_second(base[q]) for q in qids
    )


def _by_depth(lengths: list[int]) -> dict[str, float]:
    """Share of verification steps that accepted at least d draft tokens."""
    if not lengths:
        return {}
    return {str(d): sum(n - 1 >= d for n in lengths) / len(lengths) for d in range(1, max(lengths))}


def _identical(records: dict, base: dict, qids: list[int]) -> float | None:
    if not qids:
        return None
    same = [records[q]["choices"][0]["token_ids"] == base[q]["choices"][0]["token_ids"] for q in qids]
    return sum(same) / len(same)


def environment() -> dict:
    return {
        "machine": platform.machine(),
        "processor": platform.processor(),
        "cpus": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }


def markdown_table(summary: dict) -> str:
    categories = sorted({c for s in summary.values() for c in s["speedup"] if c != "overall"})
    head = ["method", "speedup", *categories, "tok/s", "mean accepted", "identical"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for method, s in summary.items():
        cells = [method, _fmt(s["speedup"]["overall"], "x")]
        cells += [_fmt(s["speedup"].get(c), "x") for c in categories]
        cells += [_fmt(s["tokens_per_s"]), _fmt(s["mean_accepted_length"]), _fmt(s["identical_share"], "", pct=True)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _fmt(value, suffix: str = "", pct: bool = False) -> str:
    if value is None:
        return "-"
    return f"{100 * value:.0f}%" if pct else f"{value:.2f}{suffix}"


def plot(summary: dict, answers: dict[str, dict[int, dict]], out_dir: Path) -> list[Path]:
    """Speedup per category per method, and the accepted-length histogram, as PNG files."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    categories = ["overall", *sorted({c for s in summary.values() for c in s["speedup"] if c != "overall"})]
    methods = list(summary)
    fig, ax = plt.subplots(figsize=(1.5 + 1.2 * len(categories), 4))
    width = 0.8 / len(methods)
    for i, method in enumerate(methods):
        values = [summary[method]["speedup"].get(c) or 0.0 for c in categories]
        ax.bar([x + i * width for x in range(len(categories))], values, width, label=method)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks([x + width * (len(methods) - 1) / 2 for x in range(len(categories))], categories)
    ax.set_ylabel("speedup vs baseline")
    speedup_png = _save(plt, fig, ax, out_dir / "speedup.png")

    fig, ax = plt.subplots(figsize=(6, 4))
    for method, records in answers.items():
        lengths = [n for r in records.values() for turn in r["choices"][0]["accept_lengths"] for n in turn]
        if lengths and method != "baseline":
            ax.hist(lengths, bins=range(1, max(lengths) + 2), alpha=0.5, label=method, density=True)
    ax.set_xlabel("tokens per verification step")
    ax.set_ylabel("share of steps")
    return [speedup_png, _save(plt, fig, ax, out_dir / "accept_lengths.png")]


def _save(plt, fig, ax, path: Path) -> Path:
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
