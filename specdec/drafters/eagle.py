"""An EAGLE-3 head as the draft source: dynamic trees (EAGLE-2) on the target's low, middle and high layers."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import torch
from transformers import PreTrainedModel

from specdec.acceptance import Acceptance
from specdec.devices import resident
from specdec.drafters.base import DecodeState, Drafter
from specdec.tree import TokenTree

if TYPE_CHECKING:
    from heads.eagle import EagleHead


class EagleDrafter(Drafter):
    """Drafts with an EAGLE-3 head (`heads.eagle.EagleHead`) on the hidden states the verifier already computed.

    The verifier captures the states entering the head's target layers (`hidden_layers`) at the positions the
    target keeps, and hands them over in `DecodeState.features`. Per step:

    1. Catch up: the positions gained since the last draft go through the head's decoder layer, each with its
       target features and the embedding of the token after it, into the head's own KV cache (the last of them
       pairs the features before the root with the root: its output predicts the root's children).
    2. Grow the tree level by level, as EAGLE-2 does: the newest level's best `branching` nodes by path
       probability (among those that can still make the final tree) go through the head in one batched call, tree
       attention inside the head (each node sees the context and its ancestors; its feature is its parent's
       output); each offers its `branching` most likely children.
    3. Keep the best nodes by path probability: at most the plan's budget (`state.budget`, and `tree_budget`), none
       below its threshold (`state.min_score`), at most `state.max_depth` deep.

    The tree's entries leave the head's cache after each step; accepted positions come back at the next catch-up
    with the target's own features (as EAGLE does). Drafted tokens are deterministic proposals (scores only), so
    rejection sampling stays exact when sampling. Every `propose` takes the state's features, even a plain step's
    (`max_depth == 0`), so that the head's context stays whole; a gap (features never received) restarts its context
    at the first position it has.

    Args:
        head: an `EagleHead` for the target (checked at `start`).
        depth: most draft tokens on a path.
        branching: nodes expanded per level, and children offered by each.
        tree_budget: most draft nodes in the tree (root not counted).

    Example:
        >>> head = EagleHead.from_pretrained("my-eagle-head", target)
        >>> SpeculativeGenerator(target, EagleDrafter(head)).generate(input_ids, max_new_tokens=128)
    """

    def __init__(self, head: EagleHead, depth: int = 5, branching: int = 4, tree_budget: int = 16):
        if depth < 1 or branching < 1 or tree_budget < 1:
            raise ValueError(f"depth, branching and tree_budget must be >= 1, got {depth}, {branching}, {tree_budget}")
        self.head = head
        self.hidden_layers = head.config.layers
        self.depth, self.branching, self.tree_budget = depth, branching, tree_budget
        self._embed = None
        self._reset(0)

    def _reset(self, position: int) -> None:
        """An empty context whose next fed position is `position`."""
        self._cache = self.head.new_cache()
        self._context = 0  # head cache entries that hold fed (accepted) positions; tree entries follow them
        self._pending: list[torch.Tensor] = []  # [T, k*H] features received but not fed yet
        self._received = position  # the target position after the last feature received
        self._idle = 0  # of the pending positions, those received while not drafting
        self._last: torch.Tensor | None = None  # [H] the output at the last fed position (the root's children)

    def start(self, target: PreTrainedModel) -> None:
        self.head.check(target)
        self._embed = resident(target.get_input_embeddings())  # read at every level of every step
        self._reset(0)

    @torch.no_grad()
    def propose(self, state: DecodeState) -> TokenTree:
        if self._embed is None:
            raise RuntimeError("EagleDrafter.start(target) must be called before propose()")
        self.catchup_time = 0.0
        received = self._receive(state)
        budget = self.tree_budget if state.budget is None else min(self.tree_budget, state.budget)
        depth = min(self.depth, state.max_depth)
        if depth < 1 or budget < 1:
            self._idle += received
            return TokenTree.chain(state.root)
        self._catch_up(state.tokens[0])
        if self._last is None:  # no position fed yet (a one-token prompt)
            return TokenTree.chain(state.root)
        return self._grow(state, depth, budget)

    def _receive(self, state: DecodeState) -> int:
        """Keep the state's features (returns how many positions); a gap in positions restarts the context."""
        count = 0 if state.features is None else len(state.features)
        first = state.tokens.shape[1] - 1 - count  # the target position of the first feature
        if first != self._received:
            self._reset(first)
        if count:
            self._pending.append(state.features)
            self._received += count
        return count

    def _catch_up(self, tokens: torch.Tensor) -> None:
        """Feed the pending positions: target features at `p`, embedding of `tokens[p + 1]`."""
        if not self._pending:
            return
        tic = time.perf_counter()
        features = torch.cat(self._pending)  # [P, k*H]
        positions = torch.arange(self._received - len(features), self._received)  # [P]
        self._cache.crop(self._context)  # drop the last tree's entries
        embeds = self._embed(tokens[positions + 1].to(self._embed.weight.device))
        out = self.head(embeds, self.head.project(features), positions, self._cache)  # [P, H]
        self._context, self._last = len(self._cache), out[-1]
        if self._idle:
            self.catchup_time = time.perf_counter() - tic
        self._pending, self._idle = [], 0

    def _grow(self, state: DecodeState, depth: int, budget: int) -> TokenTree:
        """Steps 2 and 3: the dynamic tree, then its best nodes."""
        tree = TokenTree(torch.tensor([state.root]), torch.tensor([-1]), torch.zeros(1))
        outputs = {0: self._last}  # node -> the head's output after it (its children's feature)
        fed: list[int] = []  # tree nodes whose entries follow the context in the head's cache
        frontier, logprobs = [0], self._logprobs(self._last[None])
        for level in range(depth):
            # the first level always gets children, so acceptance is measured even below the threshold
            tree, new = self._children(tree, frontier, logprobs, state.min_score if level else float("-inf"))
            frontier = _expandable(tree, new, budget, state.min_score)[: self.branching]
            if level == depth - 1 or not frontier:
                break
            visible = torch.cat(
                [
                    torch.ones(len(frontier), self._context, dtype=torch.bool),
                    tree.ancestor_mask[frontier][:, fed],
                    torch.eye(len(frontier), dtype=torch.bool),
                ],
                dim=1,
            )
            parents = tree.parents[frontier].tolist()
            out = self.head(
                self._embed(tree.tokens[frontier].to(self._embed.weight.device)),
                torch.stack([outputs[p] for p in parents]),
                self._received - 1 + tree.depth[frontier],
                self._cache,
                visible,
            )  # [F, H]
            fed += frontier
            outputs.update(zip(frontier, out, strict=True))
            logprobs = self._logprobs(out)
        return _best(tree, budget, state.min_score)

    def _logprobs(self, hidden: torch.Tensor) -> torch.Tensor:
        """`[F, H]` outputs -> `[F, V']` log-probabilities over the draft vocabulary (on the head's device)."""
        return torch.log_softmax(self.head.logits(hidden).float(), dim=-1)

    def _children(
        self, tree: TokenTree, frontier: list[int], logprobs: torch.Tensor, min_score: float
    ) -> tuple[TokenTree, list[int]]:
        """`tree` with each frontier node's `branching` most likely children (path score >= `min_score`), added
        best first; and the new nodes."""
        top_lp, top_ids = logprobs.topk(min(self.branching, logprobs.shape[-1]), dim=-1)  # [F, b]
        top_lp, top_ids = top_lp.cpu(), self.head.to_target(top_ids).cpu()  # target ids
        scores = tree.scores[frontier].unsqueeze(-1) + top_lp  # [F, b]
        order = scores.flatten().argsort(descending=True, stable=True)
        order = order[scores.flatten()[order] >= min_score]
        rows, cols = order // top_ids.shape[1], order % top_ids.shape[1]
        n = len(tree)
        grown = TokenTree(
            tokens=torch.cat([tree.tokens, top_ids[rows, cols]]),
            parents=torch.cat([tree.parents, torch.tensor(frontier, dtype=torch.long)[rows]]),
            scores=torch.cat([tree.scores, scores[rows, cols]]),
        )
        return grown, list(range(n, len(grown)))

    def commit(self, acceptance: Acceptance) -> None:
        self._cache.crop(self._context)  # the accepted positions come back with the target's own features


def _ranked(tree: TokenTree) -> list[int]:
    """Draft nodes best first: by path score, ties to the lower index (a parent before its children)."""
    return sorted(range(1, len(tree)), key=lambda i: (-float(tree.scores[i]), i))


def _expandable(tree: TokenTree, nodes: list[int], budget: int, min_score: float) -> list[int]:
    """Of `nodes` (best first), those whose children could still be kept: at or above the threshold and among the
    best `budget` nodes so far (a child scores no higher than its parent and comes after it)."""
    kept = set(_ranked(tree)[:budget])
    return [n for n in nodes if n in kept and float(tree.scores[n]) >= min_score]


def _best(tree: TokenTree, budget: int, min_score: float) -> TokenTree:
    """The best `budget` draft nodes, none below `min_score` but the best first-level one (ancestors are kept:
    a child never ranks above its parent)."""
    keep = torch.zeros(len(tree), dtype=torch.bool)
    keep[0] = True
    for rank, node in enumerate(_ranked(tree)[:budget]):
        keep[node] = rank == 0 or float(tree.scores[node]) >= min_score
    return tree.select(keep)
