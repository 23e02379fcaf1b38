"""Spec-Bench's conventions, as its own code has them (hemingkx/Spec-Bench at commit fd2c1cd).

- Categories. Spec-Bench's `data/spec_bench/question.jsonl` names MT-bench questions by MT-bench's own
  category (writing, roleplay, ...) and every other question by its task (translation, summarization, qa,
  math_reasoning, rag). The project's dev split names every question by its task and keeps MT-bench's
  category in `subcategory`. Answer files carry Spec-Bench's `category`, and the task in `task`.
- Speed. `evaluation/speed.py`, `speed(answers, baseline, tokenizer, task)`, reimplemented by `speed`
  below from what that function does (not a copy; the file is the reference). It filters each file on
  its own: `task="overall"` keeps every record, `task="mt_bench"` the records whose `category` is one of
  MT-bench's eight, any other task the records whose `category` equals it. Per record it takes tokens
  over the summed `wall_time` of its turns: for the method `sum(new_tokens)`, for the baseline the answer
  text re-tokenized, `len(tokenizer(turn).input_ids) - 1` per turn (the - 1 drops the BOS token that
  Llama tokenizers add). The speedup is the mean of the method's per-record tokens/s over the mean of
  the baseline's. Its report also prints `np.mean` of the method's `accept_lengths` concatenated over
  records, which needs each record's `accept_lengths` to be one flat list (`evaluation/eval.py` extends
  it turn by turn).
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

MT_BENCH_CATEGORIES = ("writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem", "humanities")
TASKS = ("mt_bench", "translation", "summarization", "qa", "math_reasoning", "rag")  # speed.py's, in its order


def categories(question: dict) -> tuple[str, str]:
    """`(category, task)` of a question: `category` as Spec-Bench's question file names it (MT-bench's own
    category for MT-bench questions), `task` the Spec-Bench task (`mt_bench` for those), or for a question
    set of another kind its `category` twice.

    Raises:
        ValueError: an `mt_bench` question without `subcategory`, one of MT-bench's categories.
    """
    category = question["category"]
    if category in MT_BENCH_CATEGORIES:  # Spec-Bench's own question file
        return category, "mt_bench"
    if category == "mt_bench":  # the dev split
        sub = question.get("subcategory")
        if sub not in MT_BENCH_CATEGORIES:
            raise ValueError(
                f"question {question.get('question_id')}: an mt_bench question needs 'subcategory', MT-bench's "
                f"own category (one of {', '.join(MT_BENCH_CATEGORIES)}), which Spec-Bench's speed.py filters on; "
                f"got {sub!r}"
            )
        return sub, "mt_bench"
    return category, category


def in_task(record: dict, task: str) -> bool:
    """Whether speed.py's `task` filter keeps an answer record."""
    if task == "overall":
        return True
    if task == "mt_bench":
        return record["category"] in MT_BENCH_CATEGORIES
    return record["category"] == task


@dataclass(frozen=True)
class Speed:
    """What speed.py's `speed()` returns (less the accepted lengths)."""

    tokens_per_s: float  # mean over the method's records of sum(new_tokens) / sum(wall_time)
    baseline_tokens_per_s: float  # the same for the baseline, tokens counted by re-tokenizing its text
    speedup: float  # tokens_per_s / baseline_tokens_per_s


def speed(records: list[dict], baseline: list[dict], tokenizer: PreTrainedTokenizerBase, task: str) -> Speed | None:
    """speed.py's figures for `task` on two lists of answer records (the lines of the two answer files).

    Equal to `speed(method.jsonl, baseline.jsonl, tokenizer_dir, task)` on files that hold exactly these
    records. None where the filter keeps no record of one of them (speed.py's means would be NaN).
    """
    method = [r["choices"][0] for r in records if in_task(r, task)]
    base = [r["choices"][0] for r in baseline if in_task(r, task)]
    if not method or not base:
        return None
    rate = statistics.fmean(sum(c["new_tokens"]) / sum(c["wall_time"]) for c in method)
    base_rate = statistics.fmean(
        sum(len(tokenizer(turn).input_ids) - 1 for turn in c["turns"]) / sum(c["wall_time"]) for c in base
    )
    return Speed(rate, base_rate, rate / base_rate)
