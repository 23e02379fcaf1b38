"""TokenTree builders and derived structure, including property tests on random trees."""

import itertools

import pytest
import torch

from specdec.tree import TokenTree, expand_topk


def random_tree(gen: torch.Generator, n: int) -> TokenTree:
    parents = [-1] + [int(torch.randint(0, i, (1,), generator=gen)) for i in range(1, n)]
    tokens = torch.randint(0, 50, (n,), generator=gen)
    return TokenTree(tokens, torch.tensor(parents))


def walk_to_root(tree: TokenTree, node: int) -> list[int]:
    path = [node]
    while path[-1] != 0:
        path.append(int(tree.parents[path[-1]]))
    return path[::-1]


def test_chain_is_a_tree_with_parents_i_minus_1():
    tree = TokenTree.chain(7, [1, 2, 3])
    assert tree.tokens.tolist() == [7, 1, 2, 3]
    assert tree.parents.tolist() == [-1, 0, 1, 2]
    assert tree.depth.tolist() == [0, 1, 2, 3]
    assert torch.equal(tree.ancestor_mask, torch.ones(4, 4, dtype=torch.bool).tril())
    assert tree.paths == [[0, 1, 2, 3]]
    assert TokenTree.chain(7).paths == [[0]]


def test_trie_merges_shared_prefixes():
    tree = TokenTree.trie(5, [[1, 2], [1, 3], [4], [1, 2, 9], [4]])
    assert tree.tokens.tolist() == [5, 1, 2, 3, 4, 9]
    assert tree.parents.tolist() == [-1, 0, 1, 1, 0, 2]
    assert tree.paths == [[0, 1, 3], [0, 4], [0, 1, 2, 5]]


def test_from_choices_builds_medusa_shapes():
    candidates = torch.tensor([[10, 11, 12], [20, 21, 22]])  # [depth, k]
    tree = TokenTree.from_choices(0, [(1,), (0,), (0, 0), (0, 2), (1, 0)], candidates)
    assert tree.tokens.tolist() == [0, 10, 11, 20, 22, 20]
    assert tree.parents.tolist() == [-1, 0, 0, 1, 1, 2]
    with pytest.raises(ValueError, match="no parent"):
        TokenTree.from_choices(0, [(0, 1)], candidates)
    with pytest.raises(ValueError, match="outside candidates"):
        TokenTree.from_choices(0, [(3,)], candidates)


def test_invalid_trees_are_refused():
    with pytest.raises(ValueError, match="earlier node"):
        TokenTree(torch.tensor([1, 2, 3]), torch.tensor([-1, 2, 0]))
    with pytest.raises(ValueError, match="earlier node"):
        TokenTree(torch.tensor([1, 2]), torch.tensor([0, 0]))
    with pytest.raises(ValueError, match="one length"):
        TokenTree(torch.tensor([1, 2]), torch.tensor([-1]))


def test_expand_topk_ranks_by_path_score_and_keeps_the_greedy_chain():
    tree = TokenTree(torch.tensor([0, 1, 2]), torch.tensor([-1, 0, 0]), scores=torch.tensor([0.0, -0.1, -3.0]))
    logprobs = torch.full((2, 6), -20.0)
    logprobs[0, 3], logprobs[0, 4] = -5.0, -6.0  # node 1's children: path scores -5.1, -6.1
    logprobs[1, 5], logprobs[1, 4] = -0.5, -0.6  # node 2's children: path scores -3.5, -3.6
    grown, new = expand_topk(tree, [1, 2], logprobs, branching=2, budget=3)
    # node 1's top child (token 3) is kept although two of node 2's children score higher
    assert grown.tokens[new].tolist() == [3, 5, 4]
    assert grown.parents[new].tolist() == [1, 2, 2]
    assert torch.allclose(grown.scores[new], torch.tensor([-5.1, -3.5, -3.6]))
    assert expand_topk(tree, [1, 2], logprobs, branching=2, budget=0)[1] == []


def test_truncate_drops_deep_nodes():
    tree = TokenTree.trie(0, [[1, 2, 3], [4, 5]])
    short = tree.truncate(1)
    assert short.tokens.tolist() == [0, 1, 4]
    assert short.parents.tolist() == [-1, 0, 0]
    assert tree.truncate(0).tokens.tolist() == [0]
    assert tree.truncate(5) is tree


@pytest.mark.parametrize("seed", range(20))
def test_random_tree_properties(seed):
    gen = torch.Generator().manual_seed(seed)
    tree = random_tree(gen, int(torch.randint(1, 40, (1,), generator=gen)))
    n = len(tree)
    for i in range(n):
        ancestors = walk_to_root(tree, i)
        # mask = ancestors or self
        assert torch.nonzero(tree.ancestor_mask[i]).flatten().tolist() == ancestors
        assert int(tree.depth[i]) == len(ancestors) - 1
        assert tree.path_to(i) == ancestors
    # paths: one per leaf, each from the root along parent links, covering every node
    assert [p[-1] for p in tree.paths] == tree.leaves
    assert all(p[0] == 0 and all(int(tree.parents[b]) == a for a, b in itertools.pairwise(p)) for p in tree.paths)
    assert set().union(*map(set, tree.paths)) == set(range(n))
    # select keeps structure: a random depth cut keeps exactly the shallow nodes, parents remapped
    cut = int(torch.randint(0, tree.max_depth + 1, (1,), generator=gen))
    sub = tree.truncate(cut)
    assert len(sub) == int((tree.depth <= cut).sum())
    assert sub.depth.tolist() == tree.depth[tree.depth <= cut].tolist()


def test_limit_keeps_the_best_scored_nodes_with_their_parents():
    # root, a (-0.1), a's child (-0.3), b (-0.2), b's child (-0.25), a's second child (-2.0)
    tree = TokenTree(
        torch.tensor([0, 1, 2, 3, 4, 5]),
        torch.tensor([-1, 0, 1, 0, 3, 1]),
        scores=torch.tensor([0.0, -0.1, -0.3, -0.2, -0.25, -2.0]),
    )
    assert tree.limit(None) is tree and tree.limit(5) is tree
    assert tree.limit(3).tokens.tolist() == [0, 1, 3, 4]
    assert tree.limit(1).tokens.tolist() == [0, 1]
    assert tree.limit(0).tokens.tolist() == [0]


def test_limit_keeps_a_prefix_of_sampled_or_unscored_trees():
    unscored = TokenTree(torch.tensor([0, 1, 2, 3]), torch.tensor([-1, 0, 0, 1]))
    assert unscored.limit(2).tokens.tolist() == [0, 1, 2]
    sampled = TokenTree(
        torch.tensor([0, 1, 2, 3]),
        torch.tensor([-1, 0, 0, 0]),
        scores=torch.tensor([0.0, -3.0, -0.1, -0.2]),  # later siblings score higher: drawn without replacement
        sampled=torch.tensor([False, True, True, True]),
        draft_probs=torch.full((4, 8), 1 / 8),
    )
    assert sampled.limit(2).tokens.tolist() == [0, 1, 2]
