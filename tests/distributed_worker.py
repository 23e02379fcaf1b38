"""One rank of `test_distributed.py`, run under torchrun with 2 CPU processes (gloo).

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/distributed_worker.py MODEL_DIR OUT_DIR

Loads the tiny Llama saved in MODEL_DIR twice: tensor-parallel (`tp_plan="auto"`, each rank holds half of every
layer's heads and MLP columns) and whole (the reference). Rank 1's drafting is made slower on purpose (a sleep),
as a slower device or a busy core would: its own clock would then plan other trees than rank 0's. Writes what each
generation produced and decided to OUT_DIR/rank{R}.json; the test compares the ranks.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch
from torch import distributed as dist
from transformers import AutoModelForCausalLM, StoppingCriteria, StoppingCriteriaList
from transformers.distributed import DistributedConfig

import specdec
from heads import EagleHead, MedusaHeads
from specdec import distributed
from specdec.drafters import Composite, EagleDrafter, MedusaDrafter, ModelDrafter, NGramDrafter
from specdec.drafters.base import Drafter

NEW_TOKENS = 32
SLOW_DRAFT_SECONDS = 0.03  # added to each of rank 1's draft-model proposals


class Slower(Drafter):
    """`drafter`, `seconds` slower per proposal (only the clock differs: same trees)."""

    def __init__(self, drafter: Drafter, seconds: float):
        self.drafter, self.seconds = drafter, seconds

    def start(self, target) -> None:
        self.drafter.start(target)

    def propose(self, state):
        time.sleep(self.seconds)
        return self.drafter.propose(state)

    def commit(self, acceptance) -> None:
        self.drafter.commit(acceptance)

    @property
    def catchup_time(self) -> float:
        return self.drafter.catchup_time


class Shallower(Drafter):
    """`drafter`'s trees cut to one level: on one rank only, a source that disagrees between ranks."""

    def __init__(self, drafter: Drafter):
        self.drafter = drafter

    def start(self, target) -> None:
        self.drafter.start(target)

    def propose(self, state):
        return self.drafter.propose(state).truncate(1)

    def commit(self, acceptance) -> None:
        self.drafter.commit(acceptance)


class StopAfter(StoppingCriteria):
    """Stops after `n` new tokens (a stand-in for a criterion that reads a clock, as `max_time` does)."""

    def __init__(self, prompt_length: int, n: int):
        self.length = prompt_length + n

    def __call__(self, input_ids, scores, **kwargs):
        return torch.tensor([input_ids.shape[1] >= self.length])


def prompt() -> torch.Tensor:
    """`[1, 24]`: 12 random tokens, twice (so that the n-gram source finds something to copy)."""
    ids = torch.randint(3, 128, (1, 12), generator=torch.Generator().manual_seed(0))
    return torch.cat([ids, ids], 1)


def record(out, drafter: Drafter | None = None) -> dict:
    stats = out.spec_stats
    result = {
        "tokens": out.sequences[0].tolist(),
        "plans": stats.plans,
        "tree_sizes": stats.tree_sizes,
        "accept_lengths": stats.accept_lengths,
    }
    if isinstance(drafter, Composite):
        result["ledgers"] = [vars(ledger) for ledger in drafter.ledgers]
    return result


def draft_model(rank: int, model_dir: Path):
    draft = AutoModelForCausalLM.from_pretrained(model_dir / "draft", dtype=torch.float32).eval()
    return Slower(ModelDrafter(draft), SLOW_DRAFT_SECONDS if rank == 1 else 0.0)


def tensor_parallel(rank: int, model_dir: Path) -> dict:
    """Every draft source with the default (timing-based) controller on a tensor-parallel target."""
    config = DistributedConfig(tp_plan="auto", tp_size=dist.get_world_size())
    target = AutoModelForCausalLM.from_pretrained(
        model_dir / "target", distributed_config=config, dtype=torch.float32, attn_implementation="sdpa_tree"
    ).eval()
    whole = AutoModelForCausalLM.from_pretrained(model_dir / "target", dtype=torch.float32).eval()
    ids = prompt()
    results = {
        "sharded": str(type(target.model.layers[0].self_attn.q_proj.weight).__name__),
        "local_q_rows": target.model.layers[0].self_attn.q_proj.weight.to_local().shape[0],
        "plain": whole.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False)[0].tolist(),
    }
    torch.manual_seed(0)  # the same random heads on every rank
    drafters = {
        "ngram": NGramDrafter(),
        "model": draft_model(rank, model_dir),
        "composite": Composite([NGramDrafter(), draft_model(rank, model_dir)], warmup=2, probe_every=4),
        "medusa": MedusaDrafter(MedusaHeads.for_model(target, num_heads=2, path_inputs=True)),
        "eagle": EagleDrafter(EagleHead.for_model(target)),
    }
    for name, drafter in drafters.items():
        gen = specdec.SpeculativeGenerator(target, drafter)  # the default controller
        out = gen.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False, return_dict_in_generate=True)
        results[name] = record(out, drafter)
    # sampling without a generator: each rank's global RNG differs, rank 0's seed is used
    torch.manual_seed(100 + rank)
    gen = specdec.SpeculativeGenerator(target, drafters["composite"])
    out = gen.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=True, return_dict_in_generate=True)
    results["sampled"] = record(out)
    # a stopping criterion that disagrees between ranks (as a clock may): rank 0's decision stops both
    stop = StoppingCriteriaList([StopAfter(ids.shape[1], 10 if rank == 0 else 3)])
    out = gen.generate(ids, max_new_tokens=NEW_TOKENS, stopping_criteria=stop, return_dict_in_generate=True)
    results["stopped"] = record(out)
    # a draft source that disagrees between ranks: an error on both, not a hang in the target's collectives
    drafter = NGramDrafter() if rank == 0 else Shallower(NGramDrafter())
    try:
        specdec.generate(target, ids, drafter=drafter, controller=None, max_new_tokens=NEW_TOKENS)
        results["disagreeing"] = "no error"
    except RuntimeError as error:
        results["disagreeing"] = str(error)
    return results


def replicated(rank: int, model_dir: Path) -> dict:
    """Whole models on every rank decoding the same prompt: on their own clocks, then in lockstep."""
    target = AutoModelForCausalLM.from_pretrained(model_dir / "target", dtype=torch.float32).eval()
    ids = prompt()
    results = {}
    for name, group in (("own_clocks", None), ("lockstep", dist.group.WORLD)):
        drafter = Composite([NGramDrafter(), draft_model(rank, model_dir)], warmup=2, probe_every=4)
        with distributed.lockstep(group):
            out = specdec.generate(
                target, ids, drafter=drafter, max_new_tokens=NEW_TOKENS, return_dict_in_generate=True
            )
        results[name] = record(out, drafter)
    return results


def main(model_dir: Path, out_dir: Path) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.set_num_threads(1)
    tic = time.perf_counter()
    results = {"tensor_parallel": tensor_parallel(rank, model_dir), "replicated": replicated(rank, model_dir)}
    results["seconds"] = time.perf_counter() - tic
    (out_dir / f"rank{rank}.json").write_text(json.dumps(results))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main(Path(sys.argv[1]), Path(sys.argv[2]))
