"""Throughput of batched speculative decoding vs `target.generate` on the same left-padded batches (#27).

For each batch size B, `--batches` batches of B prompts (dev questions, the tasks in turn, chat template, left
padding; the first B x `--batches` questions) are decoded greedily by `target.generate` and by `SpeculativeGenerator`
with each method, taking turns, `--repeats` times (median per batch); the figure is new tokens per second over all
of them (each row's tokens up to and including its EOS, not the padding after it), with the speedup over
`target.generate` measured in the same run, and the share of rows identical
to `target.generate`'s (fp32 is exact; bf16 can flip near-ties). Method `plain` drafts nothing: every step is a
plain batched step through specdec's loop, which measures the loop's overhead over `target.generate`.

Run: .venv/bin/python -m eval.bench_batch [--batch-sizes 1 4 8 16] [--batches 1] [--methods plain
     ngram draft composite medusa medusa_ngram eagle] [--dtype fp32|bf16] [--max-new-tokens 64]
     [--target smollm2-135m-instruct|tiny] [--out outputs/bench_batch.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from functools import partial
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from heads.eagle import BUILTIN_EAGLE, EagleHead
from heads.medusa import BUILTIN_HEADS, MedusaHeads
from specdec.chat import chat_input_ids, load_questions
from specdec.cpu import tune_cpu_blas
from specdec.drafters import Composite, Drafter, EagleDrafter, MedusaDrafter, ModelDrafter, NGramDrafter
from specdec.drafters.base import DecodeState
from specdec.drafters.memory import BUILTIN_MEMORY
from specdec.generate import SpeculativeGenerator
from specdec.models import BUILTIN_TARGET, DEFAULT_DRAFTS, load_model, parse_dtype
from specdec.tree import TokenTree

QUESTIONS = Path(__file__).parent / "data" / "dev_spec_bench_question.jsonl"


class NoDraft(Drafter):
    """Drafts nothing: each step is a plain target step through specdec's loop."""

    def propose(self, state: DecodeState) -> TokenTree:
        return TokenTree.chain(state.root)


def batches(
    tokenizer, sizes: list[int], pad: int, count: int = 1
) -> dict[int, list[tuple[torch.Tensor, torch.Tensor]]]:
    """Per batch size B: `count` batches of `[B, L]` left-padded input ids (the first B x `count` questions, tasks in
    turn), each with its mask."""
    questions = load_questions(QUESTIONS)
    by_task: dict[str, list[dict]] = {}
    for q in questions:
        by_task.setdefault(q["category"], []).append(q)
    interleaved = [q for group in zip(*by_task.values(), strict=False) for q in group]
    prompts = [chat_input_ids(tokenizer, [{"role": "user", "content": q["turns"][0]}])[0] for q in interleaved]
    prompts = [p[-192:] for p in prompts]  # long RAG prompts would dominate the batch's padding
    if max(sizes) * count > len(prompts):
        raise ValueError(f"{max(sizes)} x {count} prompts asked for, the dev split has {len(prompts)}")
    return {size: [_left_padded(prompts[k * size : (k + 1) * size], pad) for k in range(count)] for size in sizes}


def _left_padded(rows: list[torch.Tensor], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, p in enumerate(rows):
        ids[i, width - len(p) :], mask[i, width - len(p) :] = p, 1
    return ids, mask


def new_tokens(sequences: torch.Tensor, prompt_width: int, eos: set[int]) -> list[list[int]]:
    """Each row's new tokens up to and including its first EOS."""
    rows = []
    for row in sequences[:, prompt_width:].tolist():
        end = next((i + 1 for i, t in enumerate(row) if t in eos), len(row))
        rows.append(row[:end])
    return rows


def build(method: str, target, target_name: str, dtype: str) -> Drafter:
    if method == "plain":
        return NoDraft()
    if method == "ngram":  # the shipped memory holds the built-in target's answers
        return NGramDrafter(memory=BUILTIN_MEMORY if target_name == BUILTIN_TARGET else None, remember=False)
    if method in ("medusa", "medusa_ngram"):  # the shipped heads (trained for the built-in target)
        medusa = MedusaDrafter(MedusaHeads.from_pretrained(BUILTIN_HEADS, target))
        if method == "medusa":
            return medusa
        return Composite([NGramDrafter(memory=BUILTIN_MEMORY, remember=False), medusa])
    if method == "eagle":
        return EagleDrafter(EagleHead.from_pretrained(BUILTIN_EAGLE, target))
    draft = ModelDrafter(load_model(DEFAULT_DRAFTS[target_name], dtype=dtype)[0])
    if method == "draft":
        return draft
    return Composite([NGramDrafter(memory=BUILTIN_MEMORY, remember=False), draft])


def tiny_target(dtype: torch.dtype):
    """A random 2-layer Llama with SmolLM2's vocabulary (49152 tokens) and the built-in tokenizer."""
    _, tokenizer = load_model(BUILTIN_TARGET, dtype=dtype)
    config = LlamaConfig(vocab_size=49152, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    torch.manual_seed(0)
    target = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa_tree", dtype=dtype).eval()
    return target, tokenizer


def interleaved(runs: dict, repeats: int) -> tuple[dict, dict[str, float]]:
    """Each run's last result and median seconds, the runs taking turns (so that a machine whose load changes
    slows them all alike)."""
    outs, times = {}, {name: [] for name in runs}
    for _ in range(repeats):
        for name, fn in runs.items():
            tic = time.perf_counter()
            outs[name] = fn()
            times[name].append(time.perf_counter() - tic)
    return outs, {name: statistics.median(t) for name, t in times.items()}


def main(argv: list[str] | None = None) -> None:
    tune_cpu_blas()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 8, 16])
    parser.add_argument("--methods", nargs="+", default=["plain", "ngram", "draft", "composite"])
    parser.add_argument("--dtype", default="fp32")  # bf16 is slower with the quantized GGUF kernels (float32 math)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batches", type=int, default=1, help="batches of each size (disjoint questions)")
    parser.add_argument("--target", default=BUILTIN_TARGET, help=f"{BUILTIN_TARGET} or tiny (a random 2-layer Llama)")
    parser.add_argument("--out", type=Path, default=Path("outputs/bench_batch.json"))
    args = parser.parse_args(argv)
    dtype = parse_dtype(args.dtype)
    if args.target == "tiny":
        target, tokenizer = tiny_target(dtype)
        args.methods = [m for m in args.methods if m in ("plain", "ngram")]  # no draft or heads for a random target
    else:
        target, tokenizer = load_model(args.target, dtype=args.dtype)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos = {tokenizer.eos_token_id}
    settings = dict(max_new_tokens=args.max_new_tokens, do_sample=False, pad_token_id=pad)
    gens = {m: SpeculativeGenerator(target, build(m, target, args.target, args.dtype)) for m in args.methods}
    data = batches(tokenizer, args.batch_sizes, pad, args.batches)
    warm_ids, warm_mask = data[min(args.batch_sizes)][0]
    target.generate(warm_ids, attention_mask=warm_mask, **{**settings, "max_new_tokens": 4})
    for gen in gens.values():  # warm-up, and the controller's first measurements
        gen.generate(warm_ids, attention_mask=warm_mask, **{**settings, "max_new_tokens": 8})

    results = []
    for size, groups in data.items():
        totals = {name: {"tokens": 0, "seconds": 0.0} for name in ["target.generate", *gens]}
        per_method = {m: {"identical": 0, "row_steps": 0, "fallback_steps": 0, "steps": 0} for m in gens}
        for k, (ids, mask) in enumerate(groups):
            runs = {"target.generate": partial(target.generate, ids, attention_mask=mask, **settings)}
            for method, gen in gens.items():
                runs[method] = partial(gen.generate, ids, attention_mask=mask, return_dict_in_generate=True, **settings)
            outs, seconds = interleaved(runs, args.repeats)
            expected = new_tokens(outs["target.generate"], ids.shape[1], eos)
            totals["target.generate"]["tokens"] += sum(map(len, expected))
            totals["target.generate"]["seconds"] += seconds["target.generate"]
            for method in gens:
                stats, got = outs[method].spec_stats, new_tokens(outs[method].sequences, ids.shape[1], eos)
                totals[method]["tokens"] += sum(map(len, got))
                totals[method]["seconds"] += seconds[method]
                tally = per_method[method]
                tally["identical"] += sum(a == b for a, b in zip(got, expected, strict=True))
                rows = getattr(stats, "rows", [stats])  # one prompt: a SpecStats
                tally["row_steps"] += sum(len(row.accept_lengths) for row in rows)
                tally["fallback_steps"] += stats.fallback_steps
                tally["steps"] += len(stats.plans) or stats.target_forwards - 1
            done = {m: round(seconds["target.generate"] / seconds[m], 2) for m in gens}
            print(f"B={size:>2} batch {k + 1}/{len(groups)}: speedup {done}", flush=True)
        base = totals["target.generate"]
        base_rate = base["tokens"] / base["seconds"]
        row = {"batch_size": size, "batches": len(groups), "target_generate_tokens_per_s": base_rate, "methods": {}}
        for method in gens:
            rate, tally = totals[method]["tokens"] / totals[method]["seconds"], per_method[method]
            row["methods"][method] = {
                "tokens_per_s": rate,
                "speedup": rate / base_rate,
                "identical_rows": tally["identical"] / (size * len(groups)),
                "mean_accepted_length": totals[method]["tokens"] / max(tally["row_steps"], 1),
                "fallback_steps": tally["fallback_steps"],
                "steps": tally["steps"],
            }
            print(
                f"B={size:>2} {method:>12}: {rate:7.1f} tok/s vs target.generate {base_rate:7.1f} "
                f"({rate / base_rate:.2f}x), mean accepted {row['methods'][method]['mean_accepted_length']:.2f}, "
                f"identical rows {row['methods'][method]['identical_rows']:.2f}",
                flush=True,
            )
        results.append(row)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        summary = {"target": args.target, "dtype": args.dtype, "max_new_tokens": args.max_new_tokens,
                   "repeats": args.repeats, "threads": torch.get_num_threads(), "results": results}  # fmt: skip
        args.out.write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
