"""Acceptance rules: which part of a verified tree becomes output.

Terms (as in the papers): the target's distribution `p`, the draft's `q`. An *accepted* token is a draft
token the rule keeps; the *bonus* token is the one the target itself adds after the last accepted node,
from that node's logits, so every verification step emits at least one token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from specdec.tree import TokenTree


@dataclass(frozen=True)
class Acceptance:
    """The outcome of one verification step.

    Attributes:
        path: accepted tree nodes from the root (always node 0) to the deepest accepted node.
        tokens: the new tokens: the accepted draft tokens (`tree.tokens[path[1:]]`) then the bonus token.
            `len(tokens) == len(path)`.
    """

    path: list[int]
    tokens: list[int]

    @property
    def num_accepted(self) -> int:
        """Draft tokens accepted (the bonus token not counted)."""
        return len(self.path) - 1


def greedy(tree: TokenTree, logits: torch.Tensor) -> Acceptance:
    """The longest root-to-node path whose every token is the target's argmax after its parent.

    Args:
        tree: the verified tree.
        logits: `[N, V]` target logits, row `i` predicting the token after node `i`.

    Returns:
        The deepest such path (the lowest node index among equally deep ones) and the bonus token:
        the argmax after its last node. The result equals plain greedy decoding token for token.
    """
    pred = logits.argmax(dim=-1).cpu()  # [N] target's choice after each node
    match = torch.ones(len(tree), dtype=torch.bool)  # [N] node's token is its parent's argmax
    match[1:] = tree.tokens[1:] == pred[tree.parents[1:]]
    accepted = ~(tree.ancestor_mask & ~match).any(dim=-1)  # [N] whole root-to-node path matches
    best = int(torch.where(accepted, tree.depth, -1).argmax())
    path = tree.path_to(best)
    return Acceptance(path=path, tokens=[*tree.tokens[path[1:]].tolist(), int(pred[best])])
