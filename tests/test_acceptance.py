"""Greedy acceptance on token trees, against a brute-force reading of its contract."""

import random

import pytest
import torch

from specdec import acceptance
from specdec.acceptance import Typical, greedy, rejection_sample, typical
from specdec.tree import TokenTree


def brute_force(tree: TokenTree, logits: torch.Tensor) -> tuple[list[int], list[int]]:
    """Every node whose whole root path matches the target's argmax; the deepest, lowest index first."""
    pred = logits.argmax(dim=-1).tolist()
    tokens, parents = tree.tokens.tolist(), tree.parents.tolist()
    best, best_depth = 0, 0
    for node in range(1, len(tokens)):
        path = tree.path_to(node)
        if all(tokens[c] == pred[parents[c]] for c in path[1:]) and len(path) - 1 > best_depth:
            best, best_depth = node, len(path) - 1
    path = tree.path_to(best)
    return path, [tokens[n] for n in path[1:]] + [pred[best]]


def test_accepts_the_matching_branch_and_the_bonus_token():
    tree = TokenTree.trie(5, [[1, 2], [3, 4, 6]])  # nodes: 5 | 1 2 | 3 4 6
    logits = torch.zeros(len(tree), 8)
    for node, choice in enumerate([3, 2, 7, 4, 0, 1]):  # target's argmax after each node
        logits[node, choice] = 1.0
    result = greedy(tree, logits)
    assert result.path == [0, 3, 4]  # 5 -> 3 -> 4, then 6 is rejected (the target wants 0)
    assert result.tokens == [3, 4, 0]


@pytest.mark.parametrize("one_argmax", [0, 1 << 30], ids=["level_by_level", "all_rows_at_once"])
def test_matches_brute_force_on_random_trees_with_repeated_tokens(one_argmax, monkeypatch):
    monkeypatch.setattr(acceptance, "_ONE_ARGMAX", one_argmax)  # small CPU logits take one argmax, large ones not
    rng = random.Random(0)
    for _ in range(300):
        n, vocab = rng.randint(1, 24), rng.randint(2, 4)  # a small vocabulary: many matches and ties
        parents = [-1] + [rng.randrange(i) for i in range(1, n)]
        tree = TokenTree(torch.tensor([rng.randrange(vocab) for _ in range(n)]), torch.tensor(parents))
        logits = torch.randn(n, vocab, generator=torch.Generator().manual_seed(rng.randrange(10**6)))
        result = greedy(tree, logits)
        path, tokens = brute_force(tree, logits)
        assert (result.path, result.tokens) == (path, tokens)


def test_scores_of_another_size_than_the_tree_are_refused():
    tree = TokenTree.trie(5, [[1, 2], [3]])
    gen = torch.Generator().manual_seed(0)
    for rule in (greedy, lambda t, s: rejection_sample(t, s, gen), lambda t, s: typical(t, s, Typical(), gen)):
        with pytest.raises(ValueError, match=r"\[4, V\] scores for a tree of 4 nodes"):
            rule(tree, torch.full((3, 8), 1 / 8))
