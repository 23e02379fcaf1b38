"""Medusa heads as the draft source: candidates from the target's own last hidden state."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from transformers import PreTrainedModel

from specdec.drafters.base import DecodeState, Drafter
from specdec.tree import TokenTree

if TYPE_CHECKING:
    from heads.medusa import MedusaHeads


class MedusaDrafter(Drafter):
    """Drafts with Medusa heads on the hidden state the verifier already computed: no extra target forward.

    Per step the heads read the target's final hidden state at the last accepted node (the one whose LM
    head chose the root), head `k` gives its top candidates for depth `k + 1`, and a static tree shape
    (`choices`) picks which ranks to combine. Each node's score is the sum of its heads' log-probabilities
    along the path; a controller's plan trims the tree to its best `budget` nodes and drops nodes below
    its threshold. Candidates are deterministic proposals, so sampling stays exact too.

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
        self._lm_head = None

    def start(self, target: PreTrainedModel) -> None:
        self.heads.check(target)
        self._lm_head = target.get_output_embeddings()

    @torch.inference_mode()
    def propose(self, state: DecodeState) -> TokenTree:
        if state.max_depth < 1 or state.hidden is None:
            return TokenTree.chain(state.root)
        if self._lm_head is None:
            raise RuntimeError("MedusaDrafter.start(target) must be called before propose()")
        logits = self.heads(state.hidden.unsqueeze(0), self._lm_head)[:, 0]  # [K, V]
        top_lp, top_tok = torch.log_softmax(logits.float(), dim=-1).topk(self.topk, dim=-1)  # [K, k]
        choices = [c for c in self.choices if len(c) <= state.max_depth]
        tree = TokenTree.from_choices(state.root, choices, top_tok.cpu(), top_lp.cpu())
        return _trim(tree, state)


def _trim(tree: TokenTree, state: DecodeState) -> TokenTree:
    """The best `state.budget` nodes by score, none below the threshold (both keep a node's ancestors:
    a child never scores above its parent, and ties go to the lower index, the parent)."""
    keep = tree.scores >= state.min_score
    keep[: min(2, len(tree))] = True  # the root and the top depth-1 candidate: acceptance keeps being measured
    if state.budget is not None and len(tree) - 1 > state.budget:
        order = sorted(range(1, len(tree)), key=lambda i: (-float(tree.scores[i]), i))
        keep[order[state.budget :]] = False
    return tree.select(keep)
