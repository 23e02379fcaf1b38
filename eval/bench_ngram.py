"""Cost of the n-gram source per decoding step, for growing contexts (issue: must stay a small fraction
of a target forward).

Per step it measures `propose` (index update with the newly accepted tokens + lookup + tree) on a
context of real text tokens, advancing by a few accepted tokens each step, as in decoding; without and
with the shipped cross-request memory (a second lookup per step).

Run: .venv/bin/python -m eval.bench_ngram [--out outputs/bench_ngram.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer

from specdec.drafters import DecodeState, NGramDrafter, NGramMemory
from specdec.drafters.memory import BUILTIN_MEMORY
from specdec.models import ASSETS, BUILTIN_DRAFT

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "tinyshakespeare.txt"


def bench(tokens: list[int], context: int, memory: NGramMemory | None, steps: int = 200, advance: int = 3) -> dict:
    drafter = NGramDrafter(memory=memory, remember=False)  # a new drafter: an empty context index
    drafter.propose(DecodeState(torch.tensor([tokens[:context]]), max_depth=8))  # index the prompt (prefill)
    times, sizes = [], []
    for step in range(steps):
        end = context + advance * (step + 1)
        state = DecodeState(torch.tensor([tokens[:end]]), max_depth=8)
        tic = time.perf_counter()
        tree = drafter.propose(state)
        times.append(time.perf_counter() - tic)
        sizes.append(len(tree))
    return {
        "context": context,
        "memory_tokens": len(memory) if memory is not None else 0,
        "median_ms": 1000 * statistics.median(times),
        "p90_ms": 1000 * sorted(times)[int(0.9 * len(times))],
        "mean_tree_size": statistics.mean(sizes),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("outputs/bench_ngram.json"))
    args = parser.parse_args()
    tokenizer = AutoTokenizer.from_pretrained(ASSETS / BUILTIN_DRAFT)  # the target's tokenizer, shipped with the draft
    tokens = tokenizer(DATA.read_text()[:400_000]).input_ids
    memory = NGramMemory.from_pretrained(BUILTIN_MEMORY)
    results = [bench(tokens, n, m) for m in (None, memory) for n in (1024, 4096, 16384)]
    for r in results:
        print(
            f"context {r['context']:>6}, memory {r['memory_tokens']:>7} tokens: {r['median_ms']:.3f} ms median, "
            f"{r['p90_ms']:.3f} ms p90 per step"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
