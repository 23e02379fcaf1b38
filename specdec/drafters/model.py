"""A separate small causal LM as the draft source."""

from __future__ import annotations

import time

import torch
from transformers import PreTrainedModel

from specdec import kv, verify
from specdec.acceptance import Acceptance
from specdec.devices import vocab_size
from specdec.drafters.base import DecodeState, Drafter
from specdec.tree import TokenTree, expand_sampled, expand_topk


class ModelDrafter(Drafter):
    """Drafts with any Hugging Face causal LM that shares the target's vocabulary.

    Each level of the tree costs one draft forward: level `d` holds the `branching` most likely nodes at
    depth `d` by path probability, each frontier node offering its `branching` best next tokens.
    `branching=1` gives a chain. A controller's plan (`state.budget`, `state.threshold`) narrows the
    tree further: nodes below the confidence threshold are not added, and drafting stops when none is.
    When sampling (`state.sampling`), children are drawn from the draft's warped distribution instead
    of taken top-k, as lossless rejection sampling needs: `branching` distinct tokens at the root, then
    one child per confident node of the previous level.
    The draft keeps its own KV cache in step with the accepted tokens: the
    accepted path's entries are kept after each step, so the context is never prefilled again.

    Args:
        model: the draft LM (eval mode; eager or sdpa attention).
        depth: most draft tokens on a path.
        branching: children per expanded node and nodes kept per level (1 = chain).
        tree_budget: most draft nodes in the tree (root not counted).

    Example:
        >>> drafter = ModelDrafter(small_model, depth=5, branching=2, tree_budget=10)
        >>> SpeculativeGenerator(target, drafter).generate(input_ids, max_new_tokens=64)
    """

    def __init__(self, model: PreTrainedModel, depth: int = 5, branching: int = 2, tree_budget: int = 10):
        if depth < 1 or branching < 1 or tree_budget < 1:
            raise ValueError(f"depth, branching and tree_budget must be >= 1, got {depth}, {branching}, {tree_budget}")
        verify.check_supported(model.config, role="draft model")
        self.model = model
        self.depth, self.branching, self.tree_budget = depth, branching, tree_budget
        self._cache = None
        self._committed = 0  # draft cache entries that hold accepted tokens
        self._fed = 0  # nodes of the last proposed tree whose entries follow them in the cache

    def start(self, target: PreTrainedModel) -> None:
        if vocab_size(self.model) != vocab_size(target):
            raise ValueError(
                f"the draft model's vocabulary ({vocab_size(self.model)} tokens) differs from the target's "
                f"({vocab_size(target)}); a draft model must use the target's tokenizer"
            )
        self._cache = kv.new_cache(self.model)
        self._committed = 0
        self._fed = 0

    @torch.no_grad()
    def propose(self, state: DecodeState) -> TokenTree:
        if self._cache is None:
            raise RuntimeError("ModelDrafter.start(target) must be called before propose()")
        tree = TokenTree.chain(state.root)
        self._fed, self.catchup_time = 0, 0.0
        if state.max_depth < 1:
            return tree
        # Catch up on the tokens accepted since the last step; the last of them is the root.
        pending = state.tokens[0, self._committed :].tolist()
        chain = TokenTree.chain(pending[0], pending[1:])
        tic = time.perf_counter()
        out = verify.forward_tree(self.model, self._cache, chain, last_logits_only=True)
        if len(pending) > 2:  # more than the last step's bonus token and root: tokens missed while not drafting
            self.catchup_time = verify.wall_time(self.model) - tic
        self._committed = state.tokens.shape[1]
        self._fed = 1  # the root sits at the end of the cache now
        dist = _next_token(out.logits[0, -1:], state)  # [1, V]
        frontier = [0]
        depth = min(self.depth, state.max_depth)
        budget = min(self.tree_budget, state.budget or self.tree_budget)
        for level in range(depth):
            room = budget - (len(tree) - 1)
            # the first level always gets a child, so acceptance is measured even below the threshold
            min_score = state.min_score if level > 0 else float("-inf")
            if state.sampling is None:
                width = min(self.branching, room)
                tree, frontier = expand_topk(tree, frontier, dist, self.branching, width, min_score=min_score)
            else:
                tree, frontier = self._expand_sampled(tree, frontier, dist, min(self.branching, room), min_score, state)
            if not frontier or level == depth - 1 or room <= len(frontier):
                break
            out = verify.forward_tree(self.model, self._cache, tree, start=self._fed)
            self._fed = len(tree)
            dist = _next_token(out.logits[0], state)  # [F, V]
        return tree

    def _expand_sampled(
        self,
        tree: TokenTree,
        frontier: list[int],
        probs: torch.Tensor,
        width: int,
        min_score: float,
        state: DecodeState,
    ) -> tuple[TokenTree, list[int]]:
        """One level of at most `width` children drawn from the draft: one per confident frontier node, the
        rest from the best one. Decided from the parents' scores only, before drawing (see `expand_sampled`)."""
        scores = tree.scores if tree.scores is not None else torch.zeros(len(tree))
        score = {i: float(scores[node]) for i, node in enumerate(frontier)}  # row of probs -> parent's score
        rows = sorted((i for i in score if score[i] >= min_score), key=score.get, reverse=True)[:width]
        if not rows:
            return tree, []
        counts = [1] * len(rows)
        counts[0] += width - len(rows)
        return expand_sampled(tree, [frontier[i] for i in rows], probs[rows], counts, state.generator)

    def commit(self, acceptance: Acceptance) -> None:
        if self._fed == 0:  # nothing was drafted: the cache still holds only accepted tokens
            return
        # The cache holds the context up to the root, then the fed tree nodes 1.._fed-1: keep the accepted ones.
        prefix = self._committed - 1
        in_cache = [node for node in acceptance.path if node < self._fed]
        kv.keep_path(self._cache, prefix, in_cache)
        self._committed = prefix + len(in_cache)
        self._fed = 0


def _next_token(logits: torch.Tensor, state: DecodeState) -> torch.Tensor:
    """`[F, V]` draft logits -> log-probabilities (greedy) or warped probabilities (sampling), on the CPU."""
    if state.sampling is None:
        return torch.log_softmax(logits.float(), dim=-1).cpu()
    return state.sampling.probs(logits).cpu()
