"""Host overhead per speculative step: the time `generate` spends outside model forwards (drafting logic,
acceptance, cache bookkeeping, the loop), on a tiny random target, for each draft source at 8, 32 and
64-node trees (`controller=None`: the sources' own settings give those sizes). Target: <= 0.5 ms a step
at 32 nodes. The default vocabulary (128, as the tests' tiny models) leaves host logic alone; `--vocab 49152`
adds the vocabulary-wide work of a SmolLM2-sized LM head (the draft's log-softmax and top-k, argmax).

Overhead = wall time of `generate`'s loop (after the prefill) minus the time inside the target's and the draft
model's forward calls (forward pre/post hooks), divided by the verification steps; the best of `--repeats`
runs after a warm-up (the least disturbed by other work on the machine). What `generate` does once per call
before the prefill (argument checks) is `setup`. Medusa heads' layers and their LM head (a matmul over the draft
vocabulary) count as forwards, the log-softmax and top-k of its rows as overhead. The controller's own cost
(`plan` + `update` per step) is measured apart, on synthetic steps.

Run: taskset -c 0 env OMP_NUM_THREADS=1 .venv/bin/python -m eval.bench_overhead [--profile ngram:32]
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import statistics
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import specdec
from heads.medusa import MedusaHeads
from specdec.control import Controller
from specdec.drafters import MedusaDrafter, ModelDrafter, NGramDrafter
from specdec.tree import best_choices

SIZES = (8, 32, 64)
SOURCES = ("ngram", "medusa", "draft")
MODEL_SETTINGS = {8: (4, 2), 32: (8, 4), 64: (8, 8)}  # draft-model tree nodes -> (depth, branching)


def tiny_llama(vocab: int, layers: int, seed: int) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


def drafter_for(source: str, nodes: int, target, draft):
    if source == "ngram":
        return NGramDrafter(depth=16, branches=8, tree_budget=nodes, remember=False)
    if source == "medusa":  # path heads with a draft vocabulary, as the shipped ones
        heads = MedusaHeads.for_model(target, num_heads=4, path_inputs=True)
        heads.restrict_vocab(torch.arange(min(8192, heads.config.vocab_size)))
        accuracy = torch.tensor([[0.6 * 0.5**r for r in range(10)]] * 4) * torch.tensor([[1.0], [0.8], [0.7], [0.6]])
        return MedusaDrafter(heads.eval(), choices=best_choices(accuracy, nodes))
    depth, branching = MODEL_SETTINGS[nodes]
    return ModelDrafter(draft, depth=depth, branching=branching, tree_budget=nodes)


class ForwardClock:
    """Seconds spent inside the forward calls of some modules (pre/post hooks; a call inside another counts once),
    and when the first call started and ended."""

    def __init__(self, *modules):
        self.reset()
        for module in modules:
            self.watch(module)

    def watch(self, module) -> None:
        module.register_forward_pre_hook(self._start)
        module.register_forward_hook(self._stop)

    def watch_call(self, owner, name: str) -> None:
        """Count the calls of the function `owner.name` as forwards too (an LM head applied as a matmul)."""
        function = getattr(owner, name)

        def timed(*args, **kwargs):
            self._start()
            try:
                return function(*args, **kwargs)
            finally:
                self._stop()

        setattr(owner, name, timed)

    def reset(self) -> None:
        self.seconds, self._tic, self._depth, self.first_start, self.first_end = 0.0, 0.0, 0, None, None

    def _start(self, *_):
        self._depth += 1
        if self._depth == 1:
            self._tic = time.perf_counter()
            self.first_start = self.first_start or self._tic

    def _stop(self, *_):
        self._depth -= 1
        if self._depth == 0:
            toc = time.perf_counter()
            self.seconds += toc - self._tic
            self.first_end = self.first_end or toc


def measure(gen, prompt: torch.Tensor, clock: ForwardClock, new_tokens: int) -> dict:
    """The loop's overhead per step: from the end of the prefill (the first target forward) to the return of
    `generate`, less the forwards in between; `setup_ms`: what `generate` does before the prefill."""
    clock.reset()
    tic = time.perf_counter()
    out = gen.generate(prompt, max_new_tokens=new_tokens, eos_token_id=None, return_dict_in_generate=True)
    toc = time.perf_counter()
    steps = len(out.spec_stats.tree_sizes)
    loop_forwards = clock.seconds - (clock.first_end - clock.first_start)
    return {
        "overhead_ms": 1000 * (toc - clock.first_end - loop_forwards) / steps,
        "forward_ms": 1000 * loop_forwards / steps,
        "setup_ms": 1000 * (clock.first_start - tic),
        "steps": steps,
        "mean_tree_size": statistics.mean(out.spec_stats.tree_sizes),
        "mean_accepted": out.spec_stats.mean_accepted_length,
    }


def controller_us(steps: int = 2000) -> float:
    """Microseconds of `plan()` + `update()` per step, on synthetic steps of a 32-node budget."""
    controller = Controller()
    gen = torch.Generator().manual_seed(0)
    tic = time.perf_counter()
    for _ in range(steps):
        plan = controller.plan()
        size = 1 + (min(plan.budget, 2 * plan.depth) if plan.speculate else 0)
        accepted = int(torch.randint(0, plan.depth + 1, (), generator=gen)) if plan.speculate else 0
        controller.update(plan, size, plan.depth, accepted, 0.6 * plan.depth, 1e-4 * plan.depth, 0.01 + 1e-5 * size)
    return 1e6 * (time.perf_counter() - tic) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--vocab", type=int, default=128, help="the tiny target's vocabulary (49152: SmolLM2's, its [N, V] work shows)"
    )
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--profile", help="SOURCE:NODES: print a cProfile of that case (specdec, heads)")
    parser.add_argument("--out", type=Path, default=Path("outputs/bench_overhead.json"))
    args = parser.parse_args()
    target, draft = tiny_llama(args.vocab, 2, 0), tiny_llama(args.vocab, 1, 1)
    clock = ForwardClock(target, draft)
    # every token of the first 128 many times: the n-gram source finds 8 continuations of any suffix it can see
    prompt = torch.randint(0, min(args.vocab, 128), (1, 1024), generator=torch.Generator().manual_seed(0))
    cases = [(s, n) for s in SOURCES for n in SIZES]
    if args.profile:
        source, nodes = args.profile.split(":")
        cases = [(source, int(nodes))]
    rows = []
    for source, nodes in cases:
        drafter = drafter_for(source, nodes, target, draft)
        if source == "medusa":  # the heads' layers, their LM head and the embeddings of their paths: draft forwards
            for module in (*drafter.heads.blocks, *drafter.heads.path_inputs, target.get_input_embeddings()):
                clock.watch(module)
            clock.watch_call(drafter, "_logits")
        gen = specdec.SpeculativeGenerator(target, drafter, controller=None)
        measure(gen, prompt, clock, args.new_tokens)  # warm-up
        if args.profile:
            profile = cProfile.Profile()
            profile.runcall(measure, gen, prompt, clock, args.new_tokens)
            pstats.Stats(profile).sort_stats("cumulative").print_stats("specdec|heads", 40)
            return
        runs = [measure(gen, prompt, clock, args.new_tokens) for _ in range(args.repeats)]
        row = {"source": source, "nodes": nodes, **min(runs, key=lambda r: r["overhead_ms"])}
        rows.append(row)
        print(
            f"{source:>7} {nodes:>3} nodes: tree {row['mean_tree_size']:5.1f}, overhead {row['overhead_ms']:.3f} "
            f"ms/step (forwards {row['forward_ms']:.3f} ms/step, {row['steps']} steps, "
            f"mean accepted {row['mean_accepted']:.2f}; setup {row['setup_ms']:.1f} ms a call)"
        )
    control = controller_us()
    print(f"controller plan + update: {control:.1f} us/step")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"rows": rows, "controller_us": control, "vocab": args.vocab}, indent=2) + "\n")


if __name__ == "__main__":
    main()
