"""Soak benchmark (not a test): one generator kept for thousands of generations, as a service keeps it.

The n-gram source learns from every answer (a cross-request memory with a small capacity, so forgetting is
exercised), the controller keeps learning, and prompts are the Spec-Bench dev split's first turns, over and
over with a changing suffix. It reports resident memory and tokens per second over the first and the last
window of generations, and writes them to a JSON file.

Run: .venv/bin/python -m eval.soak [--generations 2000] [--target tiny|smollm2-135m-instruct] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import specdec
from specdec.chat import chat_input_ids, load_questions
from specdec.drafters import NGramDrafter, NGramMemory
from specdec.models import load_model

QUESTIONS = Path(__file__).parent / "data" / "dev_spec_bench_question.jsonl"


def resident_mb() -> float:
    """Resident set size of this process, from /proc (Linux)."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def tiny_target(vocab_size: int) -> LlamaForCausalLM:
    """A small random Llama with the built-in tokenizer's vocabulary: model time small, bookkeeping visible."""
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
    )  # fmt: skip
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--generations", type=int, default=2000)
    parser.add_argument("--target", default="tiny", help="tiny (a random 2-layer Llama) or a load_model name")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--capacity", type=int, default=50_000, help="the memory's capacity in tokens")
    parser.add_argument("--window", type=int, default=100, help="generations per reported window")
    parser.add_argument("--out", default="outputs/soak.json")
    args = parser.parse_args()

    target, tokenizer = load_model("smollm2-135m-instruct-draft")  # the built-in tokenizer (draft's copy)
    if args.target == "tiny":
        target = tiny_target(len(tokenizer))
    else:
        target, tokenizer = load_model(args.target, dtype="bf16")
    prompts = [chat_input_ids(tokenizer, [{"role": "user", "content": q["turns"][0][:2000]}]) for q in
               load_questions(QUESTIONS)]  # fmt: skip
    memory = NGramMemory(capacity=args.capacity)
    gen = specdec.SpeculativeGenerator(target, NGramDrafter(memory=memory))

    rows, window = [], {"tokens": 0, "seconds": 0.0}
    start = time.perf_counter()
    for i in range(args.generations):
        ids = prompts[i % len(prompts)]
        ids = torch.cat([ids, torch.tensor([[(i * 7919) % 1000 + 100]])], 1)  # no two requests alike
        tic = time.perf_counter()
        out = gen.generate(ids, max_new_tokens=args.max_new_tokens, eos_token_id=None)
        window["seconds"] += time.perf_counter() - tic
        window["tokens"] += out.shape[1] - ids.shape[1]
        if (i + 1) % args.window == 0:
            rows.append(
                {
                    "generations": i + 1,
                    "tokens_per_s": round(window["tokens"] / window["seconds"], 1),
                    "resident_mb": round(resident_mb(), 1),
                    "memory_tokens": len(memory),
                    "controller_bytes": len(pickle.dumps(gen.controller)),
                }
            )
            print(json.dumps(rows[-1]), flush=True)
            window = {"tokens": 0, "seconds": 0.0}
    result = {
        "target": args.target,
        "generations": args.generations,
        "max_new_tokens": args.max_new_tokens,
        "capacity": args.capacity,
        "minutes": round((time.perf_counter() - start) / 60, 1),
        "first": rows[0] if rows else None,
        "last": rows[-1] if rows else None,
        "windows": rows,
        "torch_threads": torch.get_num_threads(),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"written: {args.out}")


if __name__ == "__main__":
    main()
