"""Several draft sources as one: the first confident one alone, or all of them merged into one tree."""

from __future__ import annotations

from collections.abc import Sequence

from specdec.acceptance import Acceptance
from specdec.drafters.base import DecodeState, Drafter
from specdec.tree import TokenTree


def merge_trees(trees: Sequence[TokenTree], budget: int) -> TokenTree:
    """One trie holding every root-to-leaf path of `trees` (in order), at most `budget` draft nodes."""
    sequences, scores = [], []
    for tree in trees:
        tree_scores = tree.scores if tree.scores is not None else tree.depth.new_zeros(len(tree)).float()
        for path in tree.paths:
            sequences.append(tree.tokens[path[1:]].tolist())
            scores.append(tree_scores[path[1:]].tolist())
    return TokenTree.trie(int(trees[0].tokens[0]), sequences, scores, budget=budget)


def follow(tree: TokenTree, tokens: Sequence[int]) -> list[int]:
    """The nodes of `tree` along `tokens` from the root, as far as they exist (root included)."""
    path = [0]
    for token in tokens:
        nxt = [c for c in tree.children(path[-1]) if int(tree.tokens[c]) == token]
        if not nxt:
            break
        path.append(nxt[0])
    return path


class Composite(Drafter):
    """Combine draft sources, cheapest first, e.g. `Composite([NGramDrafter(), ModelDrafter(draft)])`.

    Per step the sources are asked in order. A source whose tree promises at least `skip_gain` accepted
    tokens (by its scores) is used alone and the later, costlier sources are not asked; so an n-gram hit
    on text that repeats the prompt saves the draft model's time, and a miss costs nothing. Otherwise
    the trees of all sources are merged into one (shared prefixes merged, at most `tree_budget` nodes).
    When sampling, a source that draws its tokens at random ends the round: its tree is used alone.

    Args:
        drafters: the sources, cheapest first.
        skip_gain: expected accepted tokens that make a source's tree good enough alone.
        tree_budget: most draft nodes of a merged tree.
    """

    def __init__(self, drafters: Sequence[Drafter], skip_gain: float = 2.0, tree_budget: int = 24):
        if not drafters:
            raise ValueError("Composite needs at least one draft source")
        self.drafters = list(drafters)
        self.skip_gain, self.tree_budget = skip_gain, tree_budget
        self._asked: list[tuple[Drafter, TokenTree]] = []

    @property
    def uses_hidden_states(self) -> bool:
        return any(drafter.uses_hidden_states for drafter in self.drafters)

    def start(self, target) -> None:
        for drafter in self.drafters:
            drafter.start(target)

    def propose(self, state: DecodeState) -> TokenTree:
        self._asked = []
        for drafter in self.drafters:
            tree = drafter.propose(state)
            self._asked.append((drafter, tree))
            # a tree of random draws is used as drawn: choosing it by its tokens' values would bias them
            if tree.is_sampled or tree.expected_gain >= self.skip_gain:
                return tree
        trees = [tree for _, tree in self._asked if len(tree) > 1]
        return merge_trees(trees, self.tree_budget) if trees else TokenTree.chain(state.root)

    def commit(self, acceptance: Acceptance) -> None:
        for drafter, tree in self._asked:  # only the sources asked this step, each in its own node indices
            path = follow(tree, acceptance.tokens[: acceptance.num_accepted])
            drafter.commit(Acceptance(path=path, tokens=acceptance.tokens[: len(path)]))
