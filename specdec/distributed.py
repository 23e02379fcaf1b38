"""Several processes decoding one sequence together: every rank must draft the same tree.

Under tensor parallelism (transformers' `tp_plan="auto"` under `torchrun`) each process holds a shard of the target,
and every forward is a collective: if two ranks fed different trees, the collectives would mismatch (a hang, or an
error on shapes). The target's logits are the same on every rank (the LM head's output is gathered), so the
acceptance rule agrees everywhere; what does not agree is each rank's clock. Decisions taken from measured times:

- the controller's plans (depth, node budget, confidence threshold, fallback and probes) and its `pays()` for an
  opportunistic free tree, all from its cost model, fed each step's draft and verify seconds;
- the drafters' confidence threshold: the plan's, so the controller's;
- `Composite`'s skip accounting: each source's drafting seconds against the time its accepted tokens save;
- a stop by `max_time` or another stopping criterion that reads the clock.

Within `lockstep(group)`, each of these takes rank 0's measurement (`rank_zero`), broadcast before it enters any
account, so every rank's controller and `Composite` hold the same numbers and decide the same. The seed of a
default sampling generator is rank 0's too. `SpeculativeGenerator` enters `lockstep` by itself for a
tensor-parallel target (the group of its `tp` mesh); ranks that run replicated models on the same prompt enter it
themselves, e.g. `with lockstep(torch.distributed.group.WORLD): gen.generate(...)`. Outside `lockstep` nothing is
broadcast, so processes that each decode their own prompts (data parallelism) never wait for each other. Before each
verification the ranks also compare their trees (`check_same_tree`): a rank that drafted another tree is an error on
every rank, not a hang in the target's collectives.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar

import torch
from torch import distributed as dist

_GROUP: ContextVar = ContextVar("specdec_lockstep_group", default=None)


def tensor_parallel_group(model) -> object | None:
    """The process group over which `model` is tensor-parallel (its `tp` mesh's), None for a model that is not."""
    if (getattr(model, "tp_size", None) or 1) <= 1:
        return None
    manager = getattr(model, "_mesh_manager", None)
    mesh = manager.get_mesh("tp") if manager is not None else model._device_mesh["tp"]
    return mesh.get_group()


@contextmanager
def lockstep(group) -> Iterator[None]:
    """Within the block, the ranks of `group` decode in lockstep: timing-based decisions take rank 0's measurements.

    `group=None` changes nothing (an enclosing block's group stays in force). Every rank of the group must run the
    same generation calls, in the same order, with the same prompts, options and seeds.
    """
    if group is None:
        yield
        return
    token = _GROUP.set(group)
    try:
        yield
    finally:
        _GROUP.reset(token)


def active_group() -> object | None:
    """The group of the enclosing `lockstep` block when it has more than one rank, else None."""
    group = _GROUP.get()
    if group is None or not dist.is_initialized() or dist.get_world_size(group) <= 1:
        return None
    return group


def rank_zero(*values: float) -> tuple[float, ...]:
    """Rank 0's `values` on every rank of the enclosing `lockstep` group (one broadcast); unchanged outside one."""
    return tuple(_broadcast(values, torch.float64))


def rank_zero_int(value: int) -> int:
    """Rank 0's integer (e.g. a seed: exact beyond float precision) within `lockstep`; unchanged outside it."""
    return int(_broadcast([value], torch.int64)[0])


def check_same_tree(tree) -> None:
    """Within `lockstep`: every rank must be about to verify the same tree (one all-reduce of its size and a checksum
    of its tokens and parents), else a clear error on every rank instead of mismatched collectives (a hang).

    Raises:
        RuntimeError: the ranks drafted different trees (a source whose output depends on something other than the
            tokens and rank 0's times, e.g. a replicated draft model whose kernels round differently per device).
    """
    group = active_group()
    if group is None:
        return
    checksum = zlib.crc32(torch.stack([tree.tokens, tree.parents]).to(torch.int64).cpu().numpy().tobytes())
    mine = [len(tree), checksum]
    extremes = torch.tensor([*mine, *(-v for v in mine)], dtype=torch.int64, device=_device(group))  # [4]
    dist.all_reduce(extremes, op=dist.ReduceOp.MAX, group=group)  # the largest and (negated) smallest of each
    most, least = extremes[:2].tolist(), (-extremes[2:]).tolist()
    if most != least:
        raise RuntimeError(
            f"the ranks drafted different trees (sizes {least[0]} to {most[0]}): every rank must run the same draft "
            f"sources on the same prompt, options and seeds; a draft model replicated on several devices must "
            f"compute identically"
        )


def _device(group) -> torch.device:
    """Where `group`'s collectives take tensors: the CPU for gloo, this process's GPU for NCCL."""
    if "gloo" in str(dist.get_backend(group)):
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


def _broadcast(values: Sequence[float | int], dtype: torch.dtype) -> list:
    group = active_group()
    if group is None:
        return list(values)
    tensor = torch.tensor(list(values), dtype=dtype, device=_device(group))  # [len(values)]
    dist.broadcast(tensor, group=group, group_src=0)
    return tensor.tolist()
