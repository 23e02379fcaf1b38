"""The draft-source protocol: propose a token tree, then hear which part of it was accepted."""

from __future__ import annotations

import copy
import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

import torch
from transformers import PreTrainedModel

from specdec.acceptance import Acceptance
from specdec.sampling import Sampling
from specdec.tree import Streams, TokenTree


@dataclass(frozen=True)
class DecodeState:
    """What a draft source may look at when proposing.

    Attributes:
        tokens: `[1, L]` every token so far (prompt and output); `tokens[0, -1]` is the root of the tree
            to propose.
        max_depth: the deepest draft worth proposing (0: draft nothing, this is a plain step).
        budget: most draft nodes (None: the source's own limit).
        threshold: confidence stop: do not extend a branch whose path probability is below it.
        sampling: the warping of the target's sampling (None: greedy decoding). Sources that draw
            tokens at random use it on their own logits and mark those nodes `sampled`.
        generator: the randomness for such draws (set whenever `sampling` is).
        hidden: `[H]` the target's final hidden state at the token before the root (the state whose LM
            head predicted the root), for sources with `uses_hidden_states`; None otherwise or when the
            prompt had a single token.
        step_time: seconds of one plain target step, as the controller measures it (None without one):
            what an accepted draft token saves, for sources that weigh their own cost.
        free_only: a fallback step: only sources with `free` drafting are asked, and the tree is
            verified only if its expected gain pays for its extra verify cost.
        features: `[T, k*H]`, for sources with `hidden_layers` (k of them): the target's hidden states entering
            those decoder layers, concatenated in that order, at the `T` positions its cache gained since the
            last step: positions `L-1-T .. L-2` of `tokens` (`L = tokens.shape[1]`), i.e. the prompt but its
            last token at the first step, then the last tree's accepted path (its root and accepted nodes).
            None otherwise or when the prompt had a single token.
        streams: `[k, H]` the target's final hidden states (its LM head's input) at the `k` streams
            (`Drafter.streams`) it scored below the node that chose the root, in the last verification forward: what
            its predictions of the tokens 1 .. k past the root come from. None when that node carried no streams.
        prepare: a plain step (`max_depth` 0) whose next step will draft: a streaming source scores streams below
            the root in it, so that the next step has something to draft from (`Plan.prepare`).
    """

    tokens: torch.Tensor  # [1, L]
    max_depth: int
    budget: int | None = None
    threshold: float = 0.0
    sampling: Sampling | None = None
    generator: torch.Generator | None = None
    hidden: torch.Tensor | None = None
    step_time: float | None = None
    free_only: bool = False
    features: torch.Tensor | None = None  # [T, k*H]
    streams: torch.Tensor | None = None  # [k, H]
    prepare: bool = False

    @cached_property
    def min_score(self) -> float:
        """`threshold` as a path log-probability."""
        return math.log(self.threshold) if self.threshold > 0 else float("-inf")

    @cached_property
    def root(self) -> int:
        return int(self.tokens[0, -1])


class Drafter(ABC):
    """A draft source. One instance serves one generation at a time.

    Attributes:
        uses_hidden_states: the source reads `DecodeState.hidden` (the verifier then keeps the target's
            hidden states; no extra target forward is run for them).
        hidden_layers: the target's decoder layers whose input hidden states the source reads in
            `DecodeState.features` (EAGLE-3's numbering: layer `i`'s input is layer `i-1`'s output); the verifier
            keeps those layers' states of the accepted tokens only. Empty: none.
        free: drafting costs next to nothing (no model forward, e.g. n-gram lookup): the source is still
            asked in the controller's fallback steps, and its tree verified where it pays (opportunistic
            drafting), so falling back never loses a cheap hit.
        catchup_time: seconds of the last `propose` spent re-reading tokens accepted since the source last
            drafted (a draft model's cache catching up after plain steps), not drafting; the controller
            charges only the rest to drafting.
        streaming: the source adds stream tokens to verification forwards (`stream_budget`, `streams`) and
            drafts from their logits (`DecodeState.streams`).
    """

    uses_hidden_states: bool = False
    hidden_layers: tuple[int, ...] = ()
    free: bool = False
    catchup_time: float = 0.0
    streaming: bool = False

    def fork(self) -> Drafter:
        """A drafter for one more row of a batch: it shares what does not change during a generation (models,
        heads, a cross-request memory, learnt calibrations) and has its own per-generation state, which
        `start` sets up. The default is a shallow copy: right for sources whose `start` replaces every
        attribute that one generation changes in place (caches, indices, buffers). Override it otherwise."""
        return copy.copy(self)

    def start(self, target: PreTrainedModel) -> None:
        """Called once before each generation: check compatibility with `target`, reset state.

        Raises:
            ValueError: when this source cannot draft for `target` (e.g. another vocabulary).
        """

    @abstractmethod
    def propose(self, state: DecodeState) -> TokenTree:
        """A tree rooted at `state.root`, at most `state.max_depth` deep (a root-only tree drafts nothing)."""

    def propose_rows(self, drafters: Sequence[Drafter], states: Sequence[DecodeState]) -> list[TokenTree]:
        """The trees of several rows of a batch (`drafters`: the rows' forks of one source, this one among them;
        `states`: theirs), as each row's `propose` would give them. The default asks each row in turn; a source
        that drafts with a model call overrides it to make one call for all rows."""
        return [drafter.propose(state) for drafter, state in zip(drafters, states, strict=True)]

    def stream_budget(self, state: DecodeState) -> int:
        """Stream tokens this source will add to the verification forward of the step `state` plans (0: none, the
        default). The decoding loop takes them out of the plan's node budget before `propose`: a stream costs what
        a node costs."""
        return 0

    def streams(self, tree: TokenTree, state: DecodeState) -> Streams | None:
        """The `stream_budget(state)` stream tokens to score with `tree` in its verification forward (speculative
        streaming): their logits below the node that ends the accepted path come back as the next
        `DecodeState.streams`. Called only when `stream_budget(state) > 0`."""
        return None

    def commit(self, acceptance: Acceptance) -> None:
        """Called after verification of the last proposed tree, so stateful sources roll forward."""

    def finish(self, new_tokens: list[int]) -> None:
        """Called after each generation with the tokens it produced (sources that learn across requests
        keep them)."""


def trim(tree: TokenTree, state: DecodeState) -> TokenTree:
    """The best `state.budget` nodes of a scored tree, none below the plan's threshold (both keep a node's ancestors:
    a child never scores above its parent, and ties go to the lower index, the parent). The root and the top
    depth-1 candidate always stay, so that acceptance keeps being measured."""
    keep = (tree.scores >= state.min_score).tolist()
    keep[: min(2, len(tree))] = [True] * min(2, len(tree))
    if state.budget is not None and len(tree) - 1 > state.budget:
        scores = tree.scores.tolist()
        for i in sorted(range(1, len(tree)), key=lambda i: (-scores[i], i))[state.budget :]:
            keep[i] = False
    return tree if all(keep) else tree.select(torch.tensor(keep))
