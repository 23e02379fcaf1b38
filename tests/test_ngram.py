"""N-gram streaming source and Composite: index, ranking, and greedy equality with target.generate."""

import itertools
import math
import time

import pytest
import torch
from tiny import ARCHS, VOCAB, small_draft, tiny_model

import specdec
from specdec.acceptance import Acceptance
from specdec.drafters import Composite, DecodeState, ModelDrafter, NGramDrafter, NGramMemory
from specdec.drafters.composite import follow, merge_trees
from specdec.drafters.ngram import NGramIndex
from specdec.tree import TokenTree


def test_index_finds_continuations_newest_first_and_grows_incrementally():
    index = NGramIndex(min_n=1, max_n=3, recent=8)
    index.extend([5, 6, 7, 5, 6, 8, 5, 6])
    assert index.continuations(2, 3) == [[8, 5, 6], [7, 5, 6]]  # after "5 6": newest first
    assert index.continuations(3, 2) == []  # "8 5 6" occurred only now
    index.extend([8])
    assert index.continuations(3, 2) == [[5, 6]]  # "5 6 8" occurred once before, followed by "5 6"
    assert index.continuations(1, 2) == [[5, 6]]  # after "8"


def test_index_forgets_beyond_recent():
    index = NGramIndex(min_n=1, max_n=1, recent=2)
    index.extend([1, 10, 1, 11, 1, 12, 1])
    assert index.continuations(1, 1) == [[12], [11]]


def test_index_built_in_pieces_equals_the_index_built_at_once():
    tokens = torch.randint(0, 5, (300,), generator=torch.Generator().manual_seed(0)).tolist()
    whole = NGramIndex(min_n=2, max_n=4, recent=3)
    whole.extend(tokens)
    pieces, cuts = NGramIndex(min_n=2, max_n=4, recent=3), [0, 1, 2, 3, 7, 20, 21, 150, 300]
    for a, b in itertools.pairwise(cuts):
        pieces.extend(tokens[a:b])
        for n in (2, 3, 4):
            seen = tokens[:b]
            assert pieces.continuations(n, 4) == [seen[p : p + 4] for p in _follows(seen, n)[:3]]
    assert [whole.continuations(n, 4) for n in (2, 3, 4)] == [pieces.continuations(n, 4) for n in (2, 3, 4)]


def _follows(tokens: list[int], n: int) -> list[int]:
    """Positions that followed earlier occurrences of the last `n` tokens, newest first, by brute force."""
    suffix = tokens[-n:]
    return [i for i in range(len(tokens) - 1, n - 1, -1) if tokens[i - n : i] == suffix]


def test_drafter_merges_distinct_continuations_longest_match_first():
    drafter = NGramDrafter(max_ngram=2, min_ngram=1, depth=3, branches=3, tree_budget=16)
    tokens = [9, 1, 2, 3, 4, 7, 1, 2, 3, 5, 8, 2, 6, 1, 2]  # "1 2" -> 3 4 7 | 3 5 8 ; "2" -> 6 1 2 as well
    tree = drafter.propose(DecodeState(tokens=torch.tensor([tokens]), max_depth=10))
    assert tree.tokens[0] == 2
    paths = [tree.tokens[p[1:]].tolist() for p in tree.paths]
    assert paths == [[3, 5, 8], [3, 4, 7], [6, 1, 2]]  # bigram matches (newest first), then the unigram one
    assert torch.allclose(tree.scores[1], torch.log(torch.tensor(2 / 3)))  # "3" follows both of 2 matches
    drafter.start(None)  # a new generation: a context without repeats proposes nothing
    assert drafter.propose(DecodeState(tokens=torch.tensor([[40, 41, 42]]), max_depth=5)).tokens.tolist() == [42]


def test_scores_are_calibrated_per_kind_of_match_and_rank_the_reliable_kind_first():
    # the answer's tokens each appear in the prompt followed by a decoy: the context's unigram match is always
    # wrong; the memory holds the answer from an earlier generation, so its 4-gram match is always right
    answer = list(range(100, 140))
    prompt = [t for a in answer for t in (a, a + 100)]
    memory = NGramMemory(min_ngram=1)
    memory.add(answer)
    drafter = NGramDrafter(depth=1, memory=memory, remember=False)

    def first_two(t: int) -> tuple[list[int], list[float]]:
        tree = drafter.propose(DecodeState(tokens=torch.tensor([prompt + answer[:t]]), max_depth=1))
        return tree.tokens[1:3].tolist(), tree.scores[1:3].tolist()

    tokens, scores = first_two(4)  # nothing measured yet: both shares are 1/2, the context's match first
    assert tokens == [answer[3] + 100, answer[4]] and scores == pytest.approx([math.log(0.5)] * 2)
    for t in range(5, 30):
        first_two(t)
    assert drafter.calibration(("context", 1)) < 0.2 and drafter.calibration(("memory", 4)) > 1.5
    tokens, scores = first_two(30)
    assert tokens == [answer[30], answer[29] + 100]  # the memory's (right) continuation now comes first
    assert scores[0] > math.log(0.75) and scores[1] < math.log(0.1)


def test_tree_budget_and_depth_are_respected():
    drafter = NGramDrafter(depth=4, branches=5, tree_budget=6)
    tokens = torch.randint(3, 20, (1, 300), generator=torch.Generator().manual_seed(0))
    tree = drafter.propose(DecodeState(tokens=tokens, max_depth=3))
    assert 1 < len(tree) <= 7 and tree.max_depth <= 3


def test_merge_and_follow():
    a = TokenTree.trie(0, [[1, 2], [3]], scores=[[-0.1, -0.2], [-1.0]])
    b = TokenTree.trie(0, [[1, 4]], scores=[[-0.5, -0.6]])
    merged = merge_trees([a, b], budget=10)
    assert sorted(merged.tokens[p[1:]].tolist() for p in merged.paths) == [[1, 2], [1, 4], [3]]
    assert len(merged) == 5  # the shared "1" is one node
    assert follow(b, [1, 2]) == [0, 1] and follow(a, [1, 2]) == [0, 1, 2]


def repeating_prompt(seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    segment = torch.randint(3, VOCAB, (12,), generator=gen)
    filler = torch.randint(3, VOCAB, (5,), generator=gen)
    return torch.cat([segment, filler, segment, filler, segment[:6]]).unsqueeze(0)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize(
    "make",
    [
        lambda t, d: NGramDrafter(branches=1, depth=6),  # chain
        lambda t, d: NGramDrafter(branches=3, depth=6),  # tree
        lambda t, d: NGramDrafter(),  # the defaults: up to 16 levels once a step accepted its whole tree
        lambda t, d: Composite([NGramDrafter(), ModelDrafter(d, branching=1)]),
        lambda t, d: Composite([NGramDrafter(), ModelDrafter(d, depth=3, branching=2)], skip_gain=100.0),  # merge
        lambda t, d: Composite([NGramDrafter(), ModelDrafter(t, depth=4, branching=1)]),
        # the demo's default shape: n-gram with a cross-request memory (learning from the first prompt), then a draft
        lambda t, d: Composite([NGramDrafter(memory=NGramMemory(min_ngram=1)), ModelDrafter(d, depth=3, branching=2)]),
    ],
    ids=[
        "ngram-chain",
        "ngram-tree",
        "ngram-default",
        "composite",
        "composite-merged",
        "composite-self",
        "composite-memory",
    ],
)
def test_greedy_equals_target_generate(arch, make):
    target, draft = tiny_model(arch), small_draft(arch)
    drafter = make(target, draft)
    gained = []
    for seed in range(2):
        x = repeating_prompt(seed)
        expected = target.generate(x, max_new_tokens=40, do_sample=False, eos_token_id=None)
        out = specdec.generate(
            target, x, drafter=drafter, max_new_tokens=40, eos_token_id=None, return_dict_in_generate=True
        )
        assert torch.equal(out.sequences, expected)
        gained.append(out.spec_stats.mean_accepted_length)
    assert max(gained) > 1.0  # matches really happened and were accepted


class StubSource(specdec.drafters.Drafter):
    """Proposes a fixed continuation after spending `seconds`; counts its asks."""

    def __init__(self, tokens: list[int], seconds: float = 0.0):
        self.tokens, self.seconds, self.asks = tokens, seconds, 0

    def propose(self, state):
        self.asks += 1
        end = time.perf_counter() + self.seconds
        while time.perf_counter() < end:
            pass
        return TokenTree.chain(state.root, self.tokens[: state.max_depth])


def test_composite_skips_a_source_that_does_not_pay_and_probes_it_again():
    cheap, costly = StubSource([7, 8]), StubSource([9, 9], seconds=0.002)
    composite = Composite([cheap, costly], skip_gain=100.0, warmup=4, probe_every=5)
    state = DecodeState(tokens=torch.tensor([[1, 2]]), max_depth=3, step_time=0.001)
    for _ in range(40):  # the cheap source's tokens are always accepted, the costly one's never
        tree = composite.propose(state)
        composite.commit(Acceptance(path=follow(tree, [7, 8]), tokens=[7, 8, 5]))
    assert cheap.asks == 40
    assert 4 + 35 // 6 <= costly.asks <= 4 + 36 // 6 + 1  # the warm-up, then one probe after every 5 skips
    useful = StubSource([7, 8], seconds=0.0002)  # not free, but it pays: 2 tokens x 1 ms saved per 0.2 ms spent
    composite = Composite([StubSource([3]), useful], skip_gain=100.0, warmup=4, probe_every=5)
    for _ in range(20):
        tree = composite.propose(state)
        composite.commit(Acceptance(path=follow(tree, [7, 8]), tokens=[7, 8, 5]))
    assert useful.asks == 20
    no_controller = Composite([cheap, costly], warmup=0)
    before = costly.asks
    no_controller.propose(DecodeState(tokens=torch.tensor([[1, 2]]), max_depth=3))  # no step_time: ask everyone
    assert costly.asks == before + 1
