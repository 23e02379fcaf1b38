"""Speculative streaming as a draft source: the target's own predictions at learned stream tokens."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from transformers import PreTrainedModel

from specdec.drafters.base import DecodeState, Drafter, trim
from specdec.tree import Streams, TokenTree

if TYPE_CHECKING:
    from heads.streams import StreamEmbeddings


class StreamDrafter(Drafter):
    """Drafts with no draft model and no draft pass: each verification forward also scores `k` stream tokens below a
    few tree nodes, and the target's states at those below the node that ends the accepted path predict the next `k`
    tokens past the bonus token (`heads/streams.py`: the target's LM head, after the streams' own blocks if any). The
    next tree is built from them as from Medusa heads: stream `j`'s top candidates fill depth `j` of a static shape
    (`choices`), each node scored by the sum of its streams' log-probabilities, trimmed to the plan's budget and
    threshold. Candidates are deterministic proposals, so sampling stays exact.

    Which nodes carry streams: those most likely to end the accepted path, by the tree's scores (a node's path
    probability less its children's). How many: the plan's node budget pays for them (a stream is a token of the
    forward), half of it at most, `max_streamed` nodes at most and one at least; so the controller, which sizes the
    budget from the measured verification cost, decides. A step that ends on a node without streams leaves the next
    step nothing to draft: it verifies the root and its streams only.

    Args:
        streams: `StreamEmbeddings` trained for the target (checked at `start`).
        choices: the static tree shape (Medusa's format); default: the streams' own `choices` (measured best tree,
            saved with trained streams), else the chain of each stream's top candidate.
        max_streamed: most tree nodes that carry streams in one forward.

    Example:
        >>> streams = StreamEmbeddings.from_pretrained("smollm2-135m-instruct-streams", target)
        >>> SpeculativeGenerator(target, StreamDrafter(streams)).generate(input_ids, max_new_tokens=128)
    """

    streaming = True

    def __init__(
        self, streams: StreamEmbeddings, choices: Sequence[Sequence[int]] | None = None, max_streamed: int = 3
    ):
        self.k = streams.config.num_streams
        if choices is None:
            choices = streams.choices or [(0,) * d for d in range(1, self.k + 1)]
        self.choices = [tuple(c) for c in choices]
        if not self.choices or max(len(c) for c in self.choices) > self.k:
            raise ValueError(f"choices must be non-empty and at most {self.k} deep (one depth per stream)")
        if max_streamed < 1:
            raise ValueError(f"max_streamed must be at least 1, got {max_streamed}")
        self.embeddings, self.max_streamed = streams, max_streamed
        self._lm_head = None
        self.topk = max(max(c) for c in self.choices) + 1

    def start(self, target: PreTrainedModel) -> None:
        self.embeddings.check(target)
        self._lm_head = target.get_output_embeddings()

    def stream_budget(self, state: DecodeState) -> int:
        if state.prepare:  # a plain step before a probe: streams below the root, for the probe to draft from
            return self.k
        if state.max_depth < 1 or state.free_only:  # a plain step, or a fallback step's free drafts
            return 0
        if state.budget is None:
            return self.max_streamed * self.k
        return min(self.max_streamed, max(1, state.budget // (2 * self.k))) * self.k

    def streams(self, tree: TokenTree, state: DecodeState) -> Streams:
        groups = self.stream_budget(state) // self.k
        ending = end_probabilities(tree)
        nodes = sorted(range(len(tree)), key=lambda i: (-ending[i], i))[:groups]
        return Streams(tuple(nodes), self.embeddings.embeds.detach())

    @torch.no_grad()
    def propose(self, state: DecodeState) -> TokenTree:
        if state.max_depth < 1 or state.streams is None:
            return TokenTree.chain(state.root)
        logits = self.embeddings.logits(state.streams, self._lm_head)  # [k, V]
        top_lp, top = torch.log_softmax(logits.float(), dim=-1).topk(self.topk, dim=-1)  # [k, topk]
        choices = [c for c in self.choices if len(c) <= state.max_depth]
        tree = TokenTree.from_choices(state.root, choices, top.cpu(), top_lp.cpu())
        return trim(tree, state)


def end_probabilities(tree: TokenTree) -> list[float]:
    """Each node's chance to end the accepted path by the tree's scores: its path probability less its children's
    (unscored trees: `2**-depth` paths, the shallowest nodes first)."""
    if tree.scores is None:
        reach = (0.5 ** tree.depth.double()).tolist()
    else:
        reach = tree.scores.double().exp().tolist()
        reach[0] = 1.0
    ending = list(reach)
    for node, parent in enumerate(tree.parents.tolist()[1:], start=1):
        ending[parent] -= reach[node]
    return [max(e, 0.0) for e in ending]
