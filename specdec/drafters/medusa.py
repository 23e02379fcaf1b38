"""Medusa heads as the draft source: candidates from the target's own last hidden state."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from transformers import PreTrainedModel

from specdec.devices import resident
from specdec.drafters.base import DecodeState, Drafter, trim
from specdec.tree import TokenTree

if TYPE_CHECKING:
    from heads.medusa import MedusaHeads


class MedusaDrafter(Drafter):
    """Drafts with Medusa heads on the hidden state the verifier already computed: no extra target forward.

    Per step the heads read the target's final hidden state at the last accepted node (the one whose LM
    head chose the root), head `k` gives its top candidates for depth `k + 1`, and a static tree shape
    (`choices`) picks which ranks to combine. Path-conditioned heads (`path_inputs=True`) also read the
    tokens from the root to the node they extend, so the tree is filled one depth at a time, with one
    batched head call per depth for all the nodes that get children. Each node's score is the sum of its
    heads' log-probabilities along the path; a controller's plan trims the tree to its best `budget` nodes
    and drops nodes below its threshold. Candidates are deterministic proposals, so sampling stays exact too.

    Args:
        heads: `MedusaHeads` trained for the target (checked at `start`).
        choices: the static tree shape (Medusa's format: tuples of candidate ranks per depth); default:
            the heads' own `choices` (measured best tree, saved with trained heads), else the chain of
            each head's top candidate.

    Example:
        >>> heads = MedusaHeads.from_pretrained("smollm2-135m-instruct-medusa", target)
        >>> SpeculativeGenerator(target, MedusaDrafter(heads)).generate(input_ids, max_new_tokens=128)
    """

    uses_hidden_states = True

    def __init__(self, heads: MedusaHeads, choices: Sequence[Sequence[int]] | None = None):
        num_heads = heads.config.num_heads
        if choices is None:
            choices = heads.choices or [(0,) * d for d in range(1, num_heads + 1)]
        self.choices = [tuple(c) for c in choices]
        if not self.choices or max(len(c) for c in self.choices) > num_heads:
            raise ValueError(f"choices must be non-empty and at most {num_heads} deep (one depth per head)")
        self.heads = heads
        self.topk = max(max(c) for c in self.choices) + 1
        self._weights = self._embed = self._vocab = None

    def start(self, target: PreTrainedModel) -> None:
        self.heads.check(target)
        self._weights = self.heads.lm_weights(target.get_output_embeddings())  # [V', H] per head
        self._embed = resident(target.get_input_embeddings())  # path-conditioned heads embed at every step
        self._vocab = self.heads.vocab.tolist() if self.heads.config.draft_vocab else None

    def _logits(self, weight: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """The heads' LM head: `[P, H]` features -> `[P, V']` logits over the draft vocabulary."""
        return torch.nn.functional.linear(features, weight)

    def _top(self, weight: torch.Tensor, features: torch.Tensor) -> tuple[list[list[float]], list[list[int]]]:
        """Top candidates for `[P, H]` features under LM-head `weight`: log-probabilities (over the draft
        vocabulary) and token ids, `P` lists of `topk` each."""
        top_lp, top = torch.log_softmax(self._logits(weight, features).float(), dim=-1).topk(self.topk, dim=-1)
        top_lp, top = top_lp.tolist(), top.tolist()
        if self._vocab is not None:  # draft vocabulary rows -> token ids
            top = [[self._vocab[t] for t in row] for row in top]
        return top_lp, top

    @torch.no_grad()
    def propose(self, state: DecodeState) -> TokenTree:
        if state.max_depth < 1 or state.hidden is None:
            return TokenTree.chain(state.root)
        if self._weights is None:
            raise RuntimeError("MedusaDrafter.start(target) must be called before propose()")
        choices = [c for c in self.choices if len(c) <= state.max_depth]
        if self.heads.config.path_inputs:  # each depth costs a head call: build only what the budget keeps
            choices = _first(choices, state.budget)
            if not choices:
                return TokenTree.chain(state.root)
            return trim(self._path_tree(state, choices), state)
        features = self.heads.features(state.hidden)  # [K, H]
        if self.heads.lm_heads is None:  # shared LM head: one matmul for all heads
            top_lp, top_tok = self._top(self._weights[0], features)  # [K, k]
        else:
            tops = [self._top(w, f.unsqueeze(0)) for w, f in zip(self._weights, features, strict=True)]
            top_lp, top_tok = ([row for lp, _ in tops for row in lp], [row for _, tok in tops for row in tok])
        tree = TokenTree.from_choices(state.root, choices, torch.tensor(top_tok), torch.tensor(top_lp))
        return trim(tree, state)

    def _path_tree(self, state: DecodeState, choices: list[tuple[int, ...]]) -> TokenTree:
        """The `choices` tree for path-conditioned heads: depth by depth, head `d` runs once on the paths of
        all depth-`d` nodes that have children (path = root + the node's tokens). A node below the plan's
        threshold gets no children: theirs would score lower still, and `trim` would drop them (so each
        depth that nothing reaches saves a head call)."""
        paths: dict[tuple[int, ...], list[int]] = {(): [state.root]}  # each node's tokens from the root
        node: dict[tuple[int, ...], int] = {(): 0}  # each choice's node, numbered depth by depth in choice order
        tokens, parents, scores = [state.root], [-1], [0.0]
        for depth in range(1, max(len(c) for c in choices) + 1):
            level = sorted(c for c in choices if len(c) == depth)
            expanding = sorted({c[:-1] for c in level if c[:-1] in node and _expands(c[:-1], node, scores, state)})
            if not expanding:
                break
            path = torch.tensor([paths[p] for p in expanding], device=state.hidden.device)  # [P, depth]
            hidden = state.hidden.expand(len(expanding), -1)
            features = self.heads.head_features(depth - 1, hidden, path, self._embed)
            top_lp, top_tok = self._top(self._weights[depth - 1], features)
            rows = {parent: row for row, parent in enumerate(expanding)}
            for choice in level:
                parent, rank = choice[:-1], choice[-1]
                if parent in rows:  # siblings are distinct top-k picks: no two share a token
                    token = top_tok[rows[parent]][rank]
                    node[choice], paths[choice] = len(tokens), [*paths[parent], token]
                    tokens.append(token)
                    parents.append(node[parent])
                    scores.append(scores[node[parent]] + top_lp[rows[parent]][rank])
        return TokenTree(torch.tensor(tokens), torch.tensor(parents), torch.tensor(scores))


def _expands(
    choice: tuple[int, ...], node: dict[tuple[int, ...], int], scores: list[float], state: DecodeState
) -> bool:
    """Whether `choice`'s node gets children: the root always, other nodes when they reach the plan's threshold."""
    return not choice or scores[node[choice]] >= state.min_score


def _first(choices: list[tuple[int, ...]], budget: int | None) -> list[tuple[int, ...]]:
    """The first `budget` choices whose parents are kept (saved choices come best first, so for them this is
    the best tree of that size)."""
    kept: set[tuple[int, ...]] = set()
    for choice in choices:
        if budget is not None and len(kept) >= budget:
            break
        if len(choice) == 1 or choice[:-1] in kept:
            kept.add(choice)
    return [c for c in choices if c in kept]
