"""Draft sources made to fail, for the harness (`methods=[..., useless, collapsing]`): the controller must lose
(almost) nothing with them, and they must stay exact like every source.

- `Useless`: random tokens, a chain as deep as the plan allows, scored as if confident. It is never accepted
  (beyond chance), so the controller has to fall back to plain steps and keep probing rarely.
- `Collapsing`: another source for the first `after` new tokens of each generation, random tokens from then
  on: acceptance collapses halfway through the answer, after the controller has learnt to trust the source.
"""

from __future__ import annotations

import torch

from specdec.acceptance import Acceptance
from specdec.drafters.base import DecodeState, Drafter
from specdec.tree import TokenTree


class Useless(Drafter):
    """Random token chains from a seeded generator; each node claims probability 0.9 of its parent's."""

    def __init__(self, vocab_size: int, depth: int = 4, seed: int = 0):
        self.vocab_size, self.depth = vocab_size, depth
        self.rng = torch.Generator().manual_seed(seed)

    def propose(self, state: DecodeState) -> TokenTree:
        depth = min(self.depth, state.max_depth)
        if depth < 1:
            return TokenTree.chain(state.root)
        tokens = torch.randint(0, self.vocab_size, (depth,), generator=self.rng).tolist()
        scores = torch.log(torch.tensor(0.9)) * torch.arange(depth + 1)
        chain = TokenTree.chain(state.root, tokens)
        return TokenTree(chain.tokens, chain.parents, scores=scores)


class Collapsing(Drafter):
    """`source` for the first `after` new tokens of a generation, then `Useless`."""

    def __init__(self, source: Drafter, vocab_size: int, after: int = 64):
        self.source, self.after = source, after
        self.useless = Useless(vocab_size)
        self._prompt_length: int | None = None
        self._asked: Drafter | None = None

    @property
    def uses_hidden_states(self) -> bool:
        return self.source.uses_hidden_states

    @property
    def catchup_time(self) -> float:
        return self._asked.catchup_time if self._asked is not None else 0.0

    def start(self, target) -> None:
        self.source.start(target)
        self._prompt_length = None

    def propose(self, state: DecodeState) -> TokenTree:
        if self._prompt_length is None:
            self._prompt_length = state.tokens.shape[1]
        collapsed = state.tokens.shape[1] - self._prompt_length >= self.after
        self._asked = self.useless if collapsed else self.source
        return self._asked.propose(state)

    def commit(self, acceptance: Acceptance) -> None:
        # the source keeps its state in step even while it is not asked (its catch-up, as in a fallback)
        if self._asked is self.source:
            self.source.commit(acceptance)

    def finish(self, new_tokens: list[int]) -> None:
        self.source.finish(new_tokens)
