"""Summaries recomputed from answer files: speedup (ours, and Spec-Bench's speed.py's), acceptance, identity."""

from __future__ import annotations

import json
import os
import platform
import statistics
from collections import defaultdict
from pathlib import Path

import torch
import transformers
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from eval import spec_bench
from specdec.cpu import cpu_vendor
from specdec.models import ASSETS, BUILTIN_DRAFT, BUILTIN_TARGET, builtin_gguf


def read_answers(path: Path) -> dict[int, dict]:
    """Answer records of one method by question id (the last record of an id wins).

    Raises:
        ValueError: a record in the harness's older layout (`accept_lengths` per turn, no `task`), which
            Spec-Bench's speed.py cannot read; says which file and line.
    """
    if not path.exists():
        return {}
    records = {}
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        record = json.loads(line)
        if "task" not in record or any(isinstance(n, list) for n in record["choices"][0]["accept_lengths"]):
            raise ValueError(
                f"{path}:{number}: an answer record in the harness's older layout (accept_lengths per turn, no "
                f"'task'), which Spec-Bench's speed.py cannot read: move {path.parent} away or pass another "
                "out_dir, and re-run"
            )
        records[record["question_id"]] = record
    return records


def load_tokenizer(name_or_path: str) -> PreTrainedTokenizerBase:
    """The tokenizer `specdec.models.load_model` returns for `name_or_path`, without the model."""
    if str(name_or_path) == BUILTIN_TARGET:
        gguf = builtin_gguf()
        return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if str(name_or_path) == BUILTIN_DRAFT:
        return AutoTokenizer.from_pretrained(ASSETS / BUILTIN_DRAFT)
    return AutoTokenizer.from_pretrained(name_or_path)


def tokens_per_second(record: dict) -> float:
    choice = record["choices"][0]
    return sum(choice["new_tokens"]) / max(sum(choice["wall_time"]), 1e-9)


def summarize(
    answers: dict[str, dict[int, dict]],
    tokenizer: PreTrainedTokenizerBase,
    baseline: str = "baseline",
    sampled: bool = False,
) -> dict:
    """Per method, on the questions it and the baseline both answered, overall and per task:

    - `speedup`: mean per-question tokens/s of the method over that of the baseline, tokens counted as
      generated (`new_tokens`);
    - `spec_bench_speedup`: what Spec-Bench's `evaluation/speed.py` reports for the same records (the
      baseline's tokens re-tokenized from its text with `tokenizer`; `eval.spec_bench.speed`);
    - `mean_accepted_length` (tokens per verification step) and `acceptance_by_depth`;

    and `tokens_per_s`, `identical_share` (None for `sampled` runs, whose outputs are random draws), and for
    specdec's methods `time_shares` (`time_shares`: where the time went; None for the others).
    """
    base = answers[baseline]
    summary = {}
    for method, records in answers.items():
        common = sorted(set(records) & set(base))
        groups = {"overall": common, **_by_task(records, common)}
        lengths = {group: _accept_lengths(records, qids) for group, qids in groups.items()}
        pairs = [records[q] for q in common], [base[q] for q in common]
        summary[method] = {
            "questions": len(common),
            "speedup": {g: _speedup(records, base, qids) for g, qids in groups.items()},
            "spec_bench_speedup": {g: _spec_bench_speedup(*pairs, tokenizer, g) for g in groups},
            "tokens_per_s": statistics.fmean(tokens_per_second(records[q]) for q in common) if common else None,
            "mean_accepted_length": {g: statistics.fmean(n) if n else None for g, n in lengths.items()},
            "acceptance_by_depth": {g: acceptance_by_depth(n) for g, n in lengths.items()},
            "identical_share": None if sampled else _identical(records, base, common),
            "time_shares": {g: time_shares([records[q] for q in qids]) for g, qids in groups.items()},
        }
    return summary


def time_shares(records: list[dict]) -> dict[str, float] | None:
    """Shares of the records' wall time spent prefilling, drafting (less catch-up), catching up, in verification
    steps, and elsewhere in the loop (`other`: the rest), `fallback`: the share of steps that were plain steps
    the controller chose, and `nodes`: the mean tree size of the steps that verified a tree (root included; 0
    where none did; None in records made before profiles had tree sizes). None where the records carry no
    `profile` (Hugging Face's methods)."""
    choices = [record["choices"][0] for record in records if record["choices"][0].get("profile")]
    if not choices:
        return None
    turns = [(wall, p) for c in choices for wall, p in zip(c["wall_time"], c["profile"], strict=True)]
    total = {key: sum(p[key] for _, p in turns) for key in ("prefill", "draft", "catchup", "verify")}
    wall = sum(w for w, _ in turns)
    shares = {
        "prefill": total["prefill"] / wall,
        "draft": (total["draft"] - total["catchup"]) / wall,
        "catchup": total["catchup"] / wall,
        "verify": total["verify"] / wall,
    }
    shares["other"] = 1.0 - sum(shares.values())
    steps = sum(sum(c["decoding_steps"]) for c in choices)
    shares["fallback"] = sum(p["fallback_steps"] for _, p in turns) / max(steps, 1)
    shares["nodes"] = None
    if all("tree_sizes" in p for _, p in turns):
        trees = [n for _, p in turns for n in p["tree_sizes"] if n > 1]
        shares["nodes"] = sum(trees) / len(trees) if trees else 0.0
    return shares


def _accept_lengths(records: dict, qids: list[int]) -> list[int]:
    return [n for q in qids for n in records[q]["choices"][0]["accept_lengths"]]


def _by_task(records: dict, qids: list[int]) -> dict[str, list[int]]:
    """Question ids by task, in `_task_order`."""
    groups = defaultdict(list)
    for qid in qids:
        groups[records[qid]["task"]].append(qid)
    return {task: groups[task] for task in sorted(groups, key=_task_order)}


def _task_order(task: str) -> tuple[int, str]:
    """ "overall", Spec-Bench's tasks in speed.py's order, then any other task by name."""
    order = ("overall", *spec_bench.TASKS)
    return (order.index(task) if task in order else len(order), task)


def _tasks(summary: dict) -> list[str]:
    """ "overall" and every task some method answered, in `_task_order`."""
    return sorted({task for s in summary.values() for task in s["speedup"]}, key=_task_order)


def _speedup(records: dict, base: dict, qids: list[int]) -> float | None:
    if not qids:
        return None
    return statistics.fmean(tokens_per_second(records[q]) for q in qids) / statistics.fmean(
        tokens_per_second(base[q]) for q in qids
    )


def _spec_bench_speedup(records: list[dict], base: list[dict], tokenizer, task: str) -> float | None:
    speed = spec_bench.speed(records, base, tokenizer, task)
    return None if speed is None else speed.speedup


def acceptance_by_depth(lengths: list[int]) -> dict[str, float]:
    """Share of verification steps that accepted at least d draft tokens, d = 1 .. the most accepted."""
    if not lengths:
        return {}
    return {str(d): sum(n - 1 >= d for n in lengths) / len(lengths) for d in range(1, max(lengths))}


def steps_with_at_most(by_depth: dict[str, float]) -> list[float]:
    """Cumulative share of verification steps that gained at most n tokens, n = 1, 2, ... (index n - 1), from
    `acceptance_by_depth`: a step gains n tokens when it accepts n - 1 draft tokens."""
    return [1 - by_depth.get(str(n), 0.0) for n in range(1, len(by_depth) + 2)]


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
        "cpu_vendor": cpu_vendor(),
        "MKL_CBWR": os.environ.get("MKL_CBWR"),  # specdec.cpu: decides the cost of verifying trees on AMD CPUs
    }


def markdown(summary: dict) -> str:
    """summary.md: speedup per task counted both ways, and acceptance by depth per method and task."""
    tasks = _tasks(summary)
    ours = [[m, *(_fmt(s["speedup"].get(t), "x") for t in tasks), _worst(s), *_overall(s)] for m, s in summary.items()]
    theirs = [[m, *(_fmt(s["spec_bench_speedup"].get(t), "x") for t in tasks)] for m, s in summary.items()]
    drafting = {m: s for m, s in summary.items() if m != "baseline" and s["mean_accepted_length"]["overall"]}
    depth = max((len(d) for s in drafting.values() for d in s["acceptance_by_depth"].values()), default=0)
    by_depth = [
        [
            m,
            task,
            _fmt(s["mean_accepted_length"][task]),
            *(_fmt(shares.get(str(d), 0.0), pct=True) for d in range(1, depth + 1)),
        ]
        for m, s in drafting.items()
        for task, shares in s["acceptance_by_depth"].items()
    ]
    parts = ("prefill", "draft", "catchup", "verify", "other", "fallback")
    timed = [
        [m, task, *(_fmt(shares[k], pct=True) for k in parts), _fmt(shares.get("nodes"))]
        for m, s in summary.items()
        for task, shares in s["time_shares"].items()
        if shares is not None
    ]
    return "\n\n".join(
        [
            "## Speedup over plain decoding (tokens counted as generated)",
            _table(["method", *tasks, "worst task", "tok/s", "mean accepted", "identical"], ours),
            "## Speedup as Spec-Bench's evaluation/speed.py reports it (baseline's tokens re-tokenized from its text)",
            _table(["method", *tasks], theirs),
            "## Acceptance by depth: share of verification steps that accepted at least d draft tokens",
            _table(["method", "task", "mean accepted", *(f">= {d}" for d in range(1, depth + 1))], by_depth),
            "## Where the time went: shares of wall time (draft: less catch-up), of steps that fell back, and the "
            "mean nodes of a verified tree",
            _table(["method", "task", *parts, "nodes"], timed),
        ]
    )


def _worst(s: dict) -> str:
    """The task with the lowest speedup and its speedup ("rag 0.95x"): a method is only as good as it is there."""
    tasks = {t: v for t, v in s["speedup"].items() if t != "overall" and v is not None}
    if not tasks:
        return "-"
    worst = min(tasks, key=tasks.get)
    return f"{worst} {_fmt(tasks[worst], 'x')}"


def _overall(s: dict) -> list[str]:
    return [_fmt(s["tokens_per_s"]), _fmt(s["mean_accepted_length"]["overall"]), _fmt(s["identical_share"], pct=True)]


def _table(head: list[str], rows: list[list[str]]) -> str:
    lines = [head, ["---"] * len(head), *rows]
    return "\n".join("| " + " | ".join(cells) + " |" for cells in lines)


def _fmt(value, suffix: str = "", pct: bool = False) -> str:
    if value is None:
        return "-"
    return f"{100 * value:.0f}%" if pct else f"{value:.2f}{suffix}"


def plot(summary: dict, out_dir: Path) -> list[Path]:
    """PNG files: speedup per task per method (bars); for the methods that draft, acceptance by depth and the
    cumulative share of steps by tokens gained (one line per method each)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {method: f"C{i}" for i, method in enumerate(summary)}  # a method keeps its colour in every plot
    tasks = _tasks(summary)
    fig, ax = plt.subplots(figsize=(1.5 + 1.2 * len(tasks), 4))
    width = 0.8 / len(summary)
    for i, (method, s) in enumerate(summary.items()):
        values = [s["speedup"].get(t) or 0.0 for t in tasks]
        ax.bar([x + i * width for x in range(len(tasks))], values, width, label=method, color=colors[method])
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks([x + width * (len(summary) - 1) / 2 for x in range(len(tasks))], tasks)
    ax.set_ylabel("speedup vs baseline")
    paths = [_save(fig, ax, out_dir / "speedup.png")]

    drafting = {m: s["acceptance_by_depth"]["overall"] for m, s in summary.items() if m != "baseline"}
    drafting = {m: by_depth for m, by_depth in drafting.items() if by_depth}
    fig, ax = plt.subplots(figsize=(6, 4))
    for method, by_depth in drafting.items():
        ax.plot([int(d) for d in by_depth], list(by_depth.values()), marker="o", label=method, color=colors[method])
    _shares(ax, "draft depth d", "steps accepting at least d draft tokens")
    paths.append(_save(fig, ax, out_dir / "acceptance_by_depth.png"))

    fig, ax = plt.subplots(figsize=(6, 4))
    for method, by_depth in drafting.items():
        shares = steps_with_at_most(by_depth)
        ax.step(range(1, len(shares) + 1), shares, where="post", marker="o", label=method, color=colors[method])
    _shares(ax, "tokens gained per verification step, n", "steps gaining at most n tokens")
    paths.append(_save(fig, ax, out_dir / "tokens_per_step.png"))
    return paths


def _shares(ax, xlabel: str, ylabel: str) -> None:
    """Integer ticks on x, shares as percentages on y."""
    from matplotlib.ticker import MaxNLocator, PercentFormatter

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.yaxis.set_major_formatter(PercentFormatter(1.0))
    ax.set_ylim(0, 1.02)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)


def _save(fig, ax, path: Path) -> Path:
    import matplotlib.pyplot as plt

    if ax.get_legend_handles_labels()[0]:  # not when no method accepted a draft token
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
