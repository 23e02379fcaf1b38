"""The main job: speculative vs plain greedy decoding on the built-in target, on a few shipped prompts.

Prints each answer, tokens/s of plain and speculative decoding, the mean accepted length, and whether
the two outputs are identical; writes the same figures to a JSON file.

Run: .venv/bin/python -m specdec.demo [--dtype fp32|bf16] [--drafter NAME] [--max-new-tokens 128]
                                     [--out outputs/demo.json]

Drafters: `draft` (the shipped distilled draft model), `ngram` (the n-gram source with the shipped
cross-request memory of the target's own answers), `medusa` (the shipped Medusa heads), `composite`
(n-gram with the memory, then the draft model: the default), `eagle` (the shipped EAGLE-3 head, a first, weak one:
`training/train_eagle.py` trains it again), `streams` (speculative streaming: the target drafts its own next tokens at
the shipped stream embeddings inside each verification forward).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from heads.eagle import BUILTIN_EAGLE, EagleHead
from heads.medusa import BUILTIN_HEADS, MedusaHeads
from heads.streams import BUILTIN_STREAMS, StreamEmbeddings
from specdec.chat import chat_input_ids, load_questions
from specdec.cpu import tune_cpu_blas
from specdec.drafters import (
    Composite,
    Drafter,
    EagleDrafter,
    MedusaDrafter,
    ModelDrafter,
    NGramDrafter,
    StreamDrafter,
)
from specdec.drafters.memory import BUILTIN_MEMORY
from specdec.generate import SpeculativeGenerator
from specdec.models import ASSETS, BUILTIN_TARGET, DEFAULT_DRAFTS, load_model


def timed(fn):
    tic = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - tic


DRAFTERS = ("composite", "draft", "ngram", "medusa", "eagle", "streams")


def build_drafter(name: str, target, target_name: str, dtype: str) -> Drafter:
    """One of `DRAFTERS` for the built-in target."""
    if name == "medusa":
        return MedusaDrafter(MedusaHeads.from_pretrained(BUILTIN_HEADS, target))
    if name == "eagle":
        return EagleDrafter(EagleHead.from_pretrained(BUILTIN_EAGLE, target))
    if name == "streams":
        return StreamDrafter(StreamEmbeddings.from_pretrained(BUILTIN_STREAMS, target))
    if name == "ngram":
        return NGramDrafter(memory=BUILTIN_MEMORY)
    draft = ModelDrafter(load_model(DEFAULT_DRAFTS[target_name], dtype=dtype)[0])
    return draft if name == "draft" else Composite([build_drafter("ngram", target, target_name, dtype), draft])


def run(target_name: str, dtype: str, max_new_tokens: int, prompts_path: Path, drafter: str = DRAFTERS[0]) -> dict:
    target, tokenizer = load_model(target_name, dtype=dtype)
    gen = SpeculativeGenerator(target, build_drafter(drafter, target, target_name, dtype))
    settings = dict(max_new_tokens=max_new_tokens, do_sample=False)
    warm = chat_input_ids(tokenizer, [{"role": "user", "content": "Hello!"}])
    target.generate(warm, max_new_tokens=8, do_sample=False)
    gen.generate(warm, max_new_tokens=8)

    results = []
    for question in load_questions(prompts_path):
        ids = chat_input_ids(tokenizer, [{"role": "user", "content": question["turns"][0]}])
        plain, plain_s = timed(lambda ids=ids: target.generate(ids, **settings))
        spec, spec_s = timed(lambda ids=ids: gen.generate(ids, return_dict_in_generate=True, **settings))
        n_plain, n_spec = plain.shape[1] - ids.shape[1], spec.sequences.shape[1] - ids.shape[1]
        result = {
            "category": question["category"],
            "prompt": question["turns"][0],
            "answer": tokenizer.decode(spec.sequences[0, ids.shape[1] :], skip_special_tokens=True),
            "identical": torch.equal(plain, spec.sequences),
            "plain_tokens_per_s": n_plain / plain_s,
            "spec_tokens_per_s": n_spec / spec_s,
            "mean_accepted_length": spec.spec_stats.mean_accepted_length,
        }
        results.append(result)
        print(f"\n### [{result['category']}] {result['prompt'][:100]}\n{result['answer']}\n")
        print(
            f"plain {result['plain_tokens_per_s']:.1f} tok/s | speculative {result['spec_tokens_per_s']:.1f} tok/s"
            f" | mean accepted length {result['mean_accepted_length']:.2f} | identical: {result['identical']}"
        )
    return summarize(results, target_name, dtype, max_new_tokens, drafter)


def summarize(results: list[dict], target_name: str, dtype: str, max_new_tokens: int, drafter: str) -> dict:
    def mean(key: str) -> float:
        return sum(r[key] for r in results) / len(results)

    summary = {
        "target": target_name,
        "drafter": drafter,
        "draft": DEFAULT_DRAFTS[target_name] if drafter in ("draft", "composite") else None,
        "dtype": dtype,
        "max_new_tokens": max_new_tokens,
        "prompts": len(results),
        "plain_tokens_per_s": mean("plain_tokens_per_s"),
        "spec_tokens_per_s": mean("spec_tokens_per_s"),
        "speedup": mean("spec_tokens_per_s") / mean("plain_tokens_per_s"),
        "mean_accepted_length": mean("mean_accepted_length"),
        "identical": sum(r["identical"] for r in results),
        "results": results,
    }
    print(
        f"\n== {len(results)} prompts, {dtype}, drafter {drafter}: plain {summary['plain_tokens_per_s']:.1f} tok/s, "
        f"speculative {summary['spec_tokens_per_s']:.1f} tok/s ({summary['speedup']:.2f}x), mean accepted length "
        f"{summary['mean_accepted_length']:.2f}, identical outputs {summary['identical']}/{len(results)}"
    )
    if dtype == "bf16" and summary["identical"] < len(results):
        print("   (bf16 can flip near-ties between batch shapes; fp32 is token-identical: --dtype fp32)")
    return summary


def main(argv: list[str] | None = None) -> None:
    tune_cpu_blas()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", default=BUILTIN_TARGET, choices=sorted(DEFAULT_DRAFTS))
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="fp32 is token-identical")
    parser.add_argument("--drafter", default=DRAFTERS[0], choices=DRAFTERS)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--prompts", type=Path, default=ASSETS / "demo_prompts.jsonl")
    parser.add_argument("--out", type=Path, default=Path("outputs/demo.json"))
    args = parser.parse_args(argv)
    summary = run(args.target, args.dtype, args.max_new_tokens, args.prompts, args.drafter)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
