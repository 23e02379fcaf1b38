"""Token trees: what a draft source proposes and the verifier scores in one forward.

A `TokenTree` holds `N` nodes in topological order. Node 0 is the root: the last accepted token, whose
target logits give the distribution of the first new token. Every other node `i` has a parent
`parents[i] < i`, so a single pass from left to right visits parents before children. A chain is a tree
whose parents are `i - 1`; chains and trees share every code path.

Builders are pure functions:

- `TokenTree.chain(root, tokens)`: one path.
- `TokenTree.trie(root, sequences)`: candidate continuations, shared prefixes merged.
- `TokenTree.from_choices(root, choices, candidates)`: static tree shapes (Medusa style).
- `expand_topk(tree, frontier, logprobs, branching, budget)`: one level of best-first expansion.
- `best_choices(accuracy, budget)`: the static shape with the most expected accepted tokens.
- `expand_sampled(tree, frontier, probs, counts, generator)`: one level of children drawn from the draft,
  for lossless speculative sampling.

`Streams` are learned query tokens verified along with a tree, below some of its nodes (speculative streaming).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property

import torch


@dataclass(frozen=True)
class TokenTree:
    """A tree of draft tokens rooted at the last accepted token.

    Args:
        tokens: `[N]` token ids; `tokens[0]` is the root (last accepted token).
        parents: `[N]` parent index of each node; `parents[0] == -1` and `parents[i] < i`.
        scores: `[N]` optional draft log-probability of the path from the root to each node
            (0 at the root). Draft sources use it to rank and prune; verification ignores it.
        sampled: `[N]` optional bool: node `i` was drawn at random from its parent's row of `draft_probs`
            (siblings drawn in index order, without replacement). Other nodes are deterministic
            proposals (n-gram matches, top-k picks). Only lossless sampling reads it.
        draft_probs: `[N, V]` the draft's next-token distribution after each node that has sampled
            children (other rows unused); required when any node is sampled.

    Raises:
        ValueError: if the shapes disagree or the parents are not in topological order.

    Example:
        >>> tree = TokenTree.trie(5, [[1, 2], [1, 3], [4]])
        >>> tree.tokens.tolist(), tree.parents.tolist()
        ([5, 1, 2, 3, 4], [-1, 0, 1, 1, 0])
    """

    tokens: torch.Tensor  # [N] long
    parents: torch.Tensor  # [N] long
    scores: torch.Tensor | None = field(default=None, compare=False)  # [N] float
    sampled: torch.Tensor | None = field(default=None, compare=False)  # [N] bool
    draft_probs: torch.Tensor | None = field(default=None, compare=False)  # [N, V] float

    def __post_init__(self) -> None:
        if self.tokens.dim() != 1 or self.tokens.shape != self.parents.shape or len(self.tokens) == 0:
            raise ValueError(
                f"tokens and parents must be non-empty 1-D tensors of one length, got "
                f"{tuple(self.tokens.shape)} and {tuple(self.parents.shape)}"
            )
        parents = self._parent_list
        if parents[0] != -1 or any(not 0 <= p < i for i, p in enumerate(parents) if i > 0):
            raise ValueError(f"parents must be -1 for the root and point to an earlier node, got {parents}")
        if self.scores is not None and self.scores.shape != self.tokens.shape:
            raise ValueError(f"scores must have shape {tuple(self.tokens.shape)}, got {tuple(self.scores.shape)}")
        if self.sampled is not None and (self.sampled.shape != self.tokens.shape or bool(self.sampled[0])):
            raise ValueError("sampled must be a [N] bool tensor that is False at the root")
        if self.is_sampled and (self.draft_probs is None or self.draft_probs.shape[0] != len(self.tokens)):
            raise ValueError("a tree with sampled nodes needs draft_probs of shape [N, V]")

    @cached_property
    def is_chain(self) -> bool:
        """Every node's parent is the node before it (a single path)."""
        return self._parent_list == list(range(-1, len(self) - 1))

    # ---------------------------------------------------------------- builders

    @staticmethod
    def chain(root: int, tokens: Sequence[int] = ()) -> TokenTree:
        """A single path `root -> tokens[0] -> tokens[1] -> ...`."""
        n = len(tokens) + 1
        return TokenTree(
            tokens=torch.tensor([root, *tokens], dtype=torch.long),
            parents=torch.arange(-1, n - 1, dtype=torch.long),
        )

    @staticmethod
    def trie(
        root: int,
        sequences: Sequence[Sequence[int]],
        scores: Sequence[Sequence[float]] | None = None,
        budget: int | None = None,
    ) -> TokenTree:
        """Merge candidate continuations of `root` into one tree; shared prefixes become shared nodes.

        Args:
            root: the last accepted token.
            sequences: candidate continuations, best first; nodes are numbered in the order first seen.
            scores: optional path log-probability of each token of each sequence; a node shared by several
                sequences keeps the highest.
            budget: most nodes to add (root not counted); later sequences are cut where it runs out.
        """
        tokens, parents, node_scores = [root], [-1], [0.0]
        children: dict[tuple[int, int], int] = {}  # (parent node, token) -> node
        for s, seq in enumerate(sequences):
            node = 0
            for k, tok in enumerate(seq):
                score = scores[s][k] if scores is not None else 0.0
                key = (node, int(tok))
                if key in children:
                    node_scores[children[key]] = max(node_scores[children[key]], score)
                elif budget is not None and len(tokens) > budget:
                    break
                else:
                    children[key] = len(tokens)
                    tokens.append(int(tok))
                    parents.append(node)
                    node_scores.append(score)
                node = children[key]
        return TokenTree(
            torch.tensor(tokens, dtype=torch.long),
            torch.tensor(parents, dtype=torch.long),
            torch.tensor(node_scores) if scores is not None else None,
        )

    @staticmethod
    def from_choices(
        root: int,
        choices: Sequence[Sequence[int]],
        candidates: torch.Tensor,
        candidate_scores: torch.Tensor | None = None,
    ) -> TokenTree:
        """A static tree shape filled with per-depth candidates (the Medusa tree format).

        Args:
            root: the last accepted token.
            choices: paths of candidate ranks, e.g. `[(0,), (1,), (0, 0)]`: `(0, 0)` is the top
                candidate at depth 2 under the top candidate at depth 1. Every prefix of a choice
                must itself be a choice (or be empty).
            candidates: `[depth, k]` token ids; row `d` holds the ranked candidates for depth `d + 1`.
            candidate_scores: `[depth, k]` optional log-probabilities of the candidates; a node's score is
                the sum along its path.

        Raises:
            ValueError: if a choice's prefix is missing or a rank exceeds `candidates`.
        """
        order = sorted({tuple(c) for c in choices}, key=lambda c: (len(c), c))
        index: dict[tuple[int, ...], int] = {(): 0}
        tokens, parents, scores = [root], [-1], [0.0]
        for choice in order:
            if choice[:-1] not in index:
                raise ValueError(f"choice {choice} has no parent choice {choice[:-1]}")
            depth, rank = len(choice) - 1, choice[-1]
            if depth >= candidates.shape[0] or rank >= candidates.shape[1]:
                raise ValueError(f"choice {choice} is outside candidates of shape {tuple(candidates.shape)}")
            index[choice] = len(tokens)
            tokens.append(int(candidates[depth, rank]))
            parents.append(index[choice[:-1]])
            if candidate_scores is not None:
                scores.append(scores[parents[-1]] + float(candidate_scores[depth, rank]))
        return TokenTree(
            torch.tensor(tokens, dtype=torch.long),
            torch.tensor(parents, dtype=torch.long),
            torch.tensor(scores) if candidate_scores is not None else None,
        )

    # ---------------------------------------------------------------- derived structure

    def __len__(self) -> int:
        return len(self.tokens)

    @cached_property
    def _parent_list(self) -> list[int]:
        return self.parents.tolist()

    @cached_property
    def _depths(self) -> list[int]:
        """Each node's distance from the root. The tree's structure is read in Python: one tensor operation per
        node costs more than the whole list on a CPU."""
        depths = [0] * len(self)
        for i, p in enumerate(self._parent_list[1:], start=1):
            depths[i] = depths[p] + 1
        return depths

    @cached_property
    def depth(self) -> torch.Tensor:
        """`[N]` distance from the root (root = 0)."""
        return torch.tensor(self._depths, dtype=torch.long)

    @cached_property
    def ancestor_mask(self) -> torch.Tensor:
        """`[N, N]` bool: `mask[i, j]` is True when `j` is `i` or one of its ancestors."""
        n = len(self)
        rows = bytearray(n * n)  # row i: its parent's row, and itself (built in bytes: 8x faster than indexing)
        for i, p in enumerate(self._parent_list):
            if p >= 0:
                rows[i * n : (i + 1) * n] = rows[p * n : (p + 1) * n]
            rows[i * n + i] = 1
        return torch.frombuffer(rows, dtype=torch.bool).view(n, n)

    @cached_property
    def leaves(self) -> list[int]:
        """Nodes without children, in index order."""
        has_child = set(self._parent_list[1:])
        return [i for i in range(len(self)) if i not in has_child]

    @cached_property
    def paths(self) -> list[list[int]]:
        """Root-to-leaf node paths, one per leaf, each starting at 0."""
        return [self.path_to(leaf) for leaf in self.leaves]

    def path_to(self, node: int) -> list[int]:
        """Node indices from the root to `node`, both included."""
        path, parents = [node], self._parent_list
        while path[-1] > 0:
            path.append(parents[path[-1]])
        return path[::-1]

    def children(self, node: int) -> list[int]:
        """`node`'s children, in index order."""
        return list(self._children.get(node, ()))

    @cached_property
    def _children(self) -> dict[int, list[int]]:
        children: dict[int, list[int]] = {}
        for node, parent in enumerate(self._parent_list[1:], start=1):
            children.setdefault(parent, []).append(node)
        return children

    @property
    def max_depth(self) -> int:
        return max(self._depths)

    @property
    def is_sampled(self) -> bool:
        """Whether any node was drawn at random from the draft (see `sampled`)."""
        return self.sampled is not None and bool(self.sampled.any())

    @property
    def expected_gain(self) -> float:
        """Expected accepted draft tokens if `scores` are calibrated path log-probabilities (0 if unscored)."""
        return 0.0 if self.scores is None or len(self) == 1 else float(self.scores[1:].exp().sum())

    # ---------------------------------------------------------------- transforms

    def add_chain(self, node: int, tokens: Sequence[int], score: float = -30.0) -> TokenTree:
        """This tree with a chain of `tokens` below `node` (new nodes last, in order). Their scores are `score`
        (a path log-probability: the default says "no confidence"); they are deterministic proposals."""
        n, k = len(self), len(tokens)
        if k == 0:
            return self
        parents = torch.tensor([node, *range(n, n + k - 1)], dtype=torch.long)
        return TokenTree(
            torch.cat([self.tokens, torch.tensor(list(tokens), dtype=torch.long)]),
            torch.cat([self.parents, parents]),
            None if self.scores is None else torch.cat([self.scores, self.scores.new_full((k,), score)]),
            None if self.sampled is None else torch.cat([self.sampled, self.sampled.new_zeros(k)]),
            None
            if self.draft_probs is None
            else torch.cat([self.draft_probs, self.draft_probs.new_zeros(k, self.draft_probs.shape[1])]),
        )

    def select(self, keep: torch.Tensor) -> TokenTree:
        """The subtree of nodes where `keep` (`[N]` bool) is True; a kept node needs a kept parent.

        Sampled siblings are drawn in index order without replacement: keep a prefix of them, or the later
        ones' proposal distributions no longer say what they were drawn from.

        Raises:
            ValueError: if the root is dropped or a kept node's parent is dropped.
        """
        keep_list = keep.tolist()
        parents = self.parents.tolist()
        if not keep_list[0] or any(k and not keep_list[p] for k, p in zip(keep_list[1:], parents[1:], strict=True)):
            raise ValueError("select() must keep the root and the parent of every kept node")
        new_index = torch.cumsum(keep.long(), 0) - 1  # old node -> new node
        kept = torch.nonzero(keep).flatten()
        new_parents = torch.where(kept == 0, -1, new_index[self.parents[kept].clamp(min=0)])
        scores = None if self.scores is None else self.scores[kept]
        sampled = None if self.sampled is None else self.sampled[kept]
        draft_probs = None if self.draft_probs is None else self.draft_probs[kept]
        return TokenTree(self.tokens[kept], new_parents, scores, sampled, draft_probs)

    def limit(self, budget: int | None) -> TokenTree:
        """At most `budget` draft nodes (the root not counted; None: no limit). Scored deterministic trees keep
        their best nodes by path score (a node only with its parent); sampled or unscored trees keep their first
        nodes in index order, so that sampled siblings stay a prefix."""
        if budget is None or len(self) - 1 <= budget:
            return self
        keep = torch.zeros(len(self), dtype=torch.bool)
        if self.scores is None or self.is_sampled:
            keep[: budget + 1] = True
            return self.select(keep)
        keep[0] = True
        parents, scores, kept = self.parents.tolist(), self.scores.tolist(), 0
        for node in sorted(range(1, len(self)), key=lambda i: (-scores[i], i)):
            if kept == budget:
                break
            if keep[parents[node]]:
                keep[node] = True
                kept += 1
        return self.select(keep)

    def truncate(self, max_depth: int) -> TokenTree:
        """Drop the nodes deeper than `max_depth` (0 leaves only the root)."""
        if self.max_depth <= max_depth:
            return self
        return self.select(self.depth <= max(max_depth, 0))


@dataclass(frozen=True)
class Streams:
    """Extra query tokens for a tree's verification forward (speculative streaming, `heads/streams.py`).

    After each of `nodes`, the `k` vectors `embeds` sit at depths +1 .. +k below it: stream `j` of node `n` sees
    `n`'s path (its ancestors and itself) and `n`'s streams before `j`, and nothing sees a stream, so the tree's
    own logits are unchanged. They are fed after the tree's nodes, node by node, `k` each.

    Args:
        nodes: the tree nodes that carry streams (distinct, any order).
        embeds: `[k, H]` the stream vectors (the target's input embedding space).
    """

    nodes: tuple[int, ...]
    embeds: torch.Tensor  # [k, H]

    def __post_init__(self) -> None:
        if not self.nodes or len(set(self.nodes)) != len(self.nodes) or self.embeds.dim() != 2:
            raise ValueError(f"streams need distinct nodes and [k, H] embeds, got {self.nodes}, {self.embeds.shape}")

    @property
    def k(self) -> int:
        return self.embeds.shape[0]

    def __len__(self) -> int:
        """Stream tokens in the forward."""
        return len(self.nodes) * self.k

    def rows(self, node: int, tree_size: int) -> slice | None:
        """Where `node`'s streams sit in the forward's logits (after the tree's `tree_size` rows); None without."""
        if node not in self.nodes:
            return None
        start = tree_size + self.nodes.index(node) * self.k
        return slice(start, start + self.k)

    def depth(self, tree: TokenTree) -> torch.Tensor:
        """`[S]` each stream's depth in the tree: its node's + 1 .. + k."""
        steps = torch.arange(1, self.k + 1)
        return (tree.depth[list(self.nodes)][:, None] + steps).flatten()

    def ancestor_mask(self, tree: TokenTree) -> torch.Tensor:
        """`[S, N + S]` bool: what each stream sees of the tree's nodes and the streams (itself included)."""
        n, k = len(tree), self.k
        seen = torch.zeros(len(self), n + len(self), dtype=torch.bool)
        own = torch.ones(k, k, dtype=torch.bool).tril()
        for i, node in enumerate(self.nodes):
            rows = slice(i * k, (i + 1) * k)
            seen[rows, :n] = tree.ancestor_mask[node]
            seen[rows, n + i * k : n + (i + 1) * k] = own
        return seen


def best_choices(accuracy: torch.Tensor, budget: int) -> list[tuple[int, ...]]:
    """The static tree (Medusa choices) of `budget` nodes with the highest expected accepted length.

    A node `(r1, ..., rd)` is accepted when the rank-`r1` candidate at depth 1, ..., the rank-`rd` one at
    depth d are all right; taking the ranks' accuracies as independent, its probability is
    `accuracy[0, r1] * ... * accuracy[d-1, rd]`. The expected accepted length is the sum over nodes, and
    since a child is never likelier than its parent, the `budget` likeliest nodes form a tree: taken
    best first from a frontier, they are the optimum (as in the Medusa paper's tree search).

    Args:
        accuracy: `[depth, k]` probability that the rank-r candidate at depth d+1 is the right token
            (measured on held-out data, e.g. by `training/train_medusa.py`).
        budget: nodes in the tree (root not counted).

    Returns:
        The choices, best first.
    """
    depth, k = accuracy.shape
    acc = accuracy.double().tolist()
    frontier = [(-acc[0][r], (r,)) for r in range(k)]
    chosen: list[tuple[int, ...]] = []
    while frontier and len(chosen) < budget:
        frontier.sort()
        neg, choice = frontier.pop(0)
        chosen.append(choice)
        if len(choice) < depth:
            frontier += [(neg * acc[len(choice)][r], (*choice, r)) for r in range(k)]
    return chosen


def expand_topk(
    tree: TokenTree,
    frontier: Sequence[int],
    logprobs: torch.Tensor,
    branching: int,
    budget: int,
    min_score: float = float("-inf"),
) -> tuple[TokenTree, list[int]]:
    """Grow `tree` by one level: the best children of the frontier nodes, by path log-probability.

    Each frontier node offers its `branching` most likely next tokens; of all those candidates, the
    ones with the highest path score (`tree.scores[parent] + logprob`) are added, at most `budget`.
    The most likely child of `frontier[0]` is always added, first: when each frontier starts with the
    previous level's such child, the tree always holds the draft's greedy chain, the path a greedy
    target is most likely to accept, even where path scores would prune it.

    Args:
        tree: the tree so far (`tree.scores` None means all paths score 0).
        frontier: node indices to expand, one per row of `logprobs`.
        logprobs: `[F, V]` next-token log-probabilities of each frontier node.
        branching: most children per frontier node.
        budget: most nodes to add in total.
        min_score: candidates whose path score is below it are not added (a confidence stop).

    Returns:
        The grown tree and the indices of the new nodes (the next frontier), best first.
    """
    scores = tree.scores if tree.scores is not None else torch.zeros(len(tree))
    if budget <= 0 or branching <= 0 or len(frontier) == 0:
        return TokenTree(tree.tokens, tree.parents, scores), []
    top_lp, top_tok = logprobs.float().topk(min(branching, logprobs.shape[-1]), dim=-1)  # [F, b]
    base = scores.tolist()  # the few candidates are ranked in Python: tensor calls cost more on a CPU
    candidates = [  # (path score, parent, token); frontier[0]'s top child first
        (base[parent] + lp, parent, token)
        for parent, lps, tokens in zip(frontier, top_lp.tolist(), top_tok.tolist(), strict=True)
        for lp, token in zip(lps, tokens, strict=True)
    ]
    best = [candidates[0], *sorted(candidates[1:], key=lambda c: -c[0])][:budget]  # stable: ties in order
    best = [c for c in best if c[0] >= min_score]
    n = len(tree)
    grown = TokenTree(
        tokens=torch.cat([tree.tokens, torch.tensor([token for _, _, token in best], dtype=torch.long)]),
        parents=torch.cat([tree.parents, torch.tensor([parent for _, parent, _ in best], dtype=torch.long)]),
        scores=torch.cat([scores, torch.tensor([score for score, _, _ in best], dtype=scores.dtype)]),
    )
    return grown, list(range(n, n + len(best)))


def expand_sampled(
    tree: TokenTree,
    frontier: Sequence[int],
    probs: torch.Tensor,
    counts: Sequence[int],
    generator: torch.Generator,
) -> tuple[TokenTree, list[int]]:
    """Grow `tree` by one level of children drawn at random from the draft's distributions.

    Frontier node `i` draws `counts[i]` distinct tokens from `probs[i]`, without replacement (Gumbel
    top-k; draw order = node order). How many children each node gets is fixed before any is drawn and
    every drawn token is kept: a token's chance of being in the tree must not depend on its own value,
    or it is no longer a sample from `q` and rejection sampling stops being exact.

    Args:
        tree: the tree so far.
        frontier: node indices to expand, one per row of `probs`.
        probs: `[F, V]` draft next-token probabilities of each frontier node (already warped).
        counts: children to draw per frontier node (fewer where `probs` has fewer non-zero tokens).
        generator: the only source of randomness.

    Returns:
        The grown tree (`sampled` True and `draft_probs` rows set for the frontier) and the new nodes, in
        index order (the order in which a forward over them returns their logits).
    """
    n, vocab = len(tree), probs.shape[-1]
    scores = tree.scores if tree.scores is not None else torch.zeros(n)
    sampled = tree.sampled if tree.sampled is not None else torch.zeros(n, dtype=torch.bool)
    draft_probs = tree.draft_probs if tree.draft_probs is not None else torch.zeros(n, vocab)
    draft_probs = draft_probs.clone()
    tokens, parents, new_scores = [], [], []
    for i, (node, count) in enumerate(zip(frontier, counts, strict=True)):
        q = probs[i].float()
        count = min(count, int((q > 0).sum()))
        if count <= 0:
            continue
        draft_probs[node] = q
        uniform = torch.rand(vocab, generator=generator).clamp_(min=torch.finfo(torch.float32).tiny)
        keys = q.log() - (-uniform.log()).log()  # log q + Gumbel noise
        drawn = keys.topk(count).indices  # [count] a sample without replacement, in draw order
        tokens.append(drawn)
        parents.append(torch.full((count,), node, dtype=torch.long))
        new_scores.append(scores[node] + q[drawn].log())
    if not tokens:
        return TokenTree(tree.tokens, tree.parents, scores, sampled, draft_probs), []
    added = torch.cat(tokens)
    grown = TokenTree(
        tokens=torch.cat([tree.tokens, added]),
        parents=torch.cat([tree.parents, *parents]),
        scores=torch.cat([scores, *new_scores]),
        sampled=torch.cat([sampled, torch.ones(len(added), dtype=torch.bool)]),
        draft_probs=torch.cat([draft_probs, draft_probs.new_zeros(len(added), vocab)]),
    )
    return grown, list(range(n, len(grown)))
