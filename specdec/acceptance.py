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


_ONE_ARGMAX = 1 << 16  # logits this small (or on a GPU): one argmax over every row costs less than a call per level


def greedy(tree: TokenTree, logits: torch.Tensor) -> Acceptance:
    """The longest root-to-node path whose every token is the target's argmax after its parent.

    Args:
        tree: the verified tree.
        logits: `[N, V]` target logits, row `i` predicting the token after node `i`.

    Returns:
        The deepest such path (the lowest node index among equally deep ones) and the bonus token:
        the argmax after its last node. The result equals plain greedy decoding token for token.
    """
    _check_rows(tree, logits)
    tokens, everything = tree.tokens.tolist(), None
    if logits.device.type != "cpu" or logits.numel() <= _ONE_ARGMAX:  # every row at once: one call, one sync
        everything = logits.argmax(dim=-1).tolist()
    # else level by level, the argmax of accepted nodes only (an argmax over the vocabulary is the costly part)
    level, pred = [0], {}
    while True:
        found = [everything[n] for n in level] if everything is not None else logits[level].argmax(dim=-1).tolist()
        for node, token in zip(level, found, strict=True):
            pred[node] = token
        deeper = sorted(c for node in level for c in tree.children(node) if tokens[c] == pred[node])
        if not deeper:
            break
        level = deeper
    best = level[0]  # the lowest index at the deepest accepted level
    path = tree.path_to(best)
    return Acceptance(path=path, tokens=[*[tokens[n] for n in path[1:]], pred[best]])


def rejection_sample(tree: TokenTree, p: torch.Tensor, generator: torch.Generator) -> Acceptance:
    """Recursive rejection sampling down the tree: the emitted tokens are distributed exactly as `p`.

    At a node, the children are tried in index order. Child `x` with proposal distribution `q` is
    accepted with probability `min(1, p(x) / q(x))`; on rejection `p` becomes the normalised residual
    `max(0, p - q)` and the next sibling is tried. When a child is accepted the walk continues from it
    with the target's `p` there; when none is (or the node has no children), the bonus token is
    sampled from the current `p`, residual included. With a single child per node this is the standard
    speculative sampling rule for chains.

    A child's `q`: for a sampled node (`tree.sampled`), its parent's `tree.draft_probs` row with the
    tokens of the earlier sampled siblings removed (they were drawn without replacement); for a
    deterministic proposal (n-gram, or any tree without `sampled`), a one-hot on its token, so it is
    accepted with probability `p(x)` and removed from `p` when rejected.

    Everything stays on `p`'s device (the target's): only the acceptance tests' scalars reach the host, and
    a node's draft row is copied there once, however many of its sampled children are tried.

    Args:
        tree: the verified tree.
        p: `[N, V]` the target's warped probabilities after each node (`Sampling.probs` of its logits).
        generator: the only source of randomness.
    """
    _check_rows(tree, p)
    p = p.float()
    tokens = tree.tokens.tolist()
    sampled = tree.sampled.tolist() if tree.sampled is not None else [False] * len(tree)
    path, node = [0], 0
    while True:
        residual = p[node]  # [V]
        undrawn = None  # [V] the draft's row at `node` less the sampled siblings tried so far (unnormalised)
        for child in tree.children(node):
            x = tokens[child]
            if sampled[child]:
                if undrawn is None:
                    undrawn = tree.draft_probs[node].to(p.device, torch.float32, copy=True)
                q = undrawn / undrawn.sum()  # [V]
                undrawn[x] = 0.0
                accept = float(residual[x] / q[x])
            else:  # q is one-hot on x: p(x) / q(x) = p(x), and the residual is p without x
                q = None
                accept = float(residual[x])
            if float(torch.rand((), generator=generator)) < min(1.0, accept):
                path.append(child)
                node = child
                break
            if q is None:
                q = residual.clone()
                q[x] = 0.0
                residual = _normalised(q, fallback=residual)
            else:
                residual = _normalised(residual - q, fallback=residual)
        else:
            bonus = _draw(residual, generator)
            return Acceptance(path=path, tokens=[*[tokens[n] for n in path[1:]], bonus])


def _check_rows(tree: TokenTree, scores: torch.Tensor) -> None:
    """Raises ValueError unless `scores` is `[N, V]` for the `N` nodes of `tree`."""
    if scores.dim() != 2 or scores.shape[0] != len(tree):
        raise ValueError(f"expected [{len(tree)}, V] scores for a tree of {len(tree)} nodes, got {tuple(scores.shape)}")


def _draw(weights: torch.Tensor, generator: torch.Generator) -> int:
    """One token from `weights` (`[V]`), with `generator`, on the generator's device."""
    return int(torch.multinomial(weights.to(generator.device), 1, generator=generator))


def _normalised(weights: torch.Tensor, fallback: torch.Tensor) -> torch.Tensor:
    """`max(0, weights)` normalised to sum 1; `fallback` where nothing is left (`p == q` up to rounding)."""
    weights = weights.clamp(min=0)
    total = float(weights.sum())
    return weights / total if total > 1e-12 else fallback


@dataclass(frozen=True)
class Typical:
    """LOSSY, opt-in: Medusa's typical acceptance for sampling.

    A draft token `x` after a node is accepted when `p(x) > min(epsilon, delta * exp(-H(p)))`, with `H`
    the entropy of the target's warped distribution at that node; the longest such path is kept and the
    bonus token is sampled from `p` after it. Faster than rejection sampling when the target is unsure,
    but the output does NOT follow the target's distribution. Defaults: the Medusa paper's.
    """

    epsilon: float = 0.09
    delta: float = 0.3


def typical(tree: TokenTree, p: torch.Tensor, rule: Typical, generator: torch.Generator) -> Acceptance:
    """LOSSY: the deepest path whose tokens all pass `rule` (see `Typical`), plus a bonus token from `p`.

    Args:
        tree: the verified tree.
        p: `[N, V]` the target's warped probabilities after each node.
        rule: the thresholds.
        generator: the only source of randomness (the bonus token).
    """
    _check_rows(tree, p)
    p = p.float()  # on the target's device: only [N] results come to the host
    entropy = -(p * p.clamp(min=1e-30).log()).sum(-1)  # [N]
    threshold = torch.clamp(rule.delta * torch.exp(-entropy), max=rule.epsilon)  # [N]
    passes = torch.ones(len(tree), dtype=torch.bool)  # [N] node's token passes at its parent
    parents = tree.parents[1:].to(p.device)
    passes[1:] = (p[parents, tree.tokens[1:].to(p.device)] > threshold[parents]).cpu()
    accepted = ~(tree.ancestor_mask & ~passes).any(dim=-1)
    best = int(torch.where(accepted, tree.depth, -1).argmax())
    path = tree.path_to(best)
    bonus = _draw(p[best], generator)
    return Acceptance(path=path, tokens=[*tree.tokens[path[1:]].tolist(), bonus])
