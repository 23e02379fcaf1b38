"""Lossless sampling: the warping matches Hugging Face, the rejection rule keeps the target's distribution.

Distribution tests compare the empirical joint distribution of the first two emitted tokens, over many
seeded runs, with the target's exact one, by a chi-square test at significance 1e-4 (critical value from
the Wilson-Hilferty approximation; cells with expected count < 5 pooled). Deliberately wrong rules must
fail the same test, so the test is shown to be able to fail.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
from tiny import tiny_model

import specdec
from heads.eagle import EagleHead
from heads.medusa import MedusaHeads
from specdec import acceptance
from specdec.acceptance import Acceptance
from specdec.control import Controller, Plan
from specdec.drafters import EagleDrafter, MedusaDrafter, ModelDrafter, NGramDrafter
from specdec.sampling import Sampling
from specdec.tree import TokenTree, expand_sampled

V = 8  # tiny vocabulary: 64 cells for the first two tokens


# ---------------------------------------------------------------- the statistics


def chi_square(counts: torch.Tensor, probs: torch.Tensor, alpha_z: float = 3.719) -> tuple[float, float]:
    """Pearson's statistic of `counts` against `probs` and its critical value at significance 1e-4 (z=3.719)."""
    n = float(counts.sum())
    expected = probs.flatten().double() * n
    observed = counts.flatten().double()
    small = expected < 5
    if bool(small.any()):  # pool the rare cells into one
        expected = torch.cat([expected[~small], expected[small].sum(0, keepdim=True)])
        observed = torch.cat([observed[~small], observed[small].sum(0, keepdim=True)])
    stat = float(((observed - expected) ** 2 / expected.clamp(min=1e-12)).sum())
    k = len(expected) - 1
    critical = k * (1 - 2 / (9 * k) + alpha_z * math.sqrt(2 / (9 * k))) ** 3
    return stat, critical


def test_chi_square_accepts_the_truth_and_rejects_a_shifted_distribution():
    gen = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(64, generator=gen), 0)
    draws = torch.multinomial(probs, 20_000, replacement=True, generator=gen)
    counts = torch.bincount(draws, minlength=64)
    stat, critical = chi_square(counts, probs)
    assert stat < critical
    shifted = torch.softmax(torch.log(probs) + 0.3 * torch.randn(64, generator=gen), 0)
    stat, critical = chi_square(counts, shifted)
    assert stat > critical


# ---------------------------------------------------------------- warping


def test_warped_scores_match_hugging_face_sampling():
    """The first step's `scores` (warped logits) equal `target.generate(do_sample=True)`'s, defaults included
    (generate() samples with top_k=50 unless told otherwise)."""
    target = tiny_model("llama")
    x = torch.tensor([[3, 4, 5, 6]])
    for kwargs in [{}, dict(temperature=0.7), dict(top_k=5), dict(top_p=0.8, temperature=1.3), dict(min_p=0.05)]:
        common = dict(do_sample=True, max_new_tokens=1, output_scores=True, return_dict_in_generate=True, **kwargs)
        expected = target.generate(x, eos_token_id=None, pad_token_id=0, **common).scores[0]
        scores = specdec.generate(target, x, drafter=NGramDrafter(), **common).scores[0]
        assert torch.equal(scores == -math.inf, expected == -math.inf)  # the same tokens filtered out
        assert 0 < int((scores > -math.inf).sum()) < scores.shape[-1]  # and some were: the warpers acted
        torch.testing.assert_close(scores, expected)


def test_top_p_truncation_by_hand():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    probs = Sampling(top_p=0.75).probs(logits)  # 0.5 + 0.3 reach 0.75: the rest is cut
    torch.testing.assert_close(probs, torch.tensor([[0.625, 0.375, 0.0, 0.0]]))
    probs = Sampling(top_k=1).probs(logits)
    torch.testing.assert_close(probs, torch.tensor([[1.0, 0.0, 0.0, 0.0]]))


def test_unsupported_warpers_and_bad_temperature_are_clear_errors():
    target = tiny_model("llama")
    drafter = NGramDrafter()
    with pytest.raises(NotImplementedError, match="typical_p"):
        specdec.generate(target, torch.tensor([[5, 6]]), drafter=drafter, do_sample=True, typical_p=0.9)
    with pytest.raises(ValueError, match="temperature"):
        Sampling(temperature=0.0)


# ---------------------------------------------------------------- the rule on hand-written p and q


def _sampled_chain(root: int, q: torch.Tensor, tokens: list[int]) -> TokenTree:
    """A chain whose tokens were (claimed to be) drawn from the rows of `q` (`[len(tokens), V]`)."""
    n = len(tokens) + 1
    probs = torch.zeros(n, q.shape[-1])
    probs[: len(tokens)] = q
    sampled = torch.ones(n, dtype=torch.bool)
    sampled[0] = False
    chain = TokenTree.chain(root, tokens)
    return TokenTree(chain.tokens, chain.parents, sampled=sampled, draft_probs=probs)


def test_p_equal_q_accepts_everything():
    gen = torch.Generator().manual_seed(0)
    p = torch.softmax(torch.randn(4, V, generator=gen), -1)
    for _ in range(50):
        tokens = [int(torch.multinomial(p[i], 1, generator=gen)) for i in range(3)]
        result = acceptance.rejection_sample(_sampled_chain(0, p[:3], tokens), p, gen)
        assert result.path == [0, 1, 2, 3] and result.tokens[:3] == tokens


def test_disjoint_supports_accept_nothing_and_sample_from_p():
    gen = torch.Generator().manual_seed(0)
    q = torch.tensor([[0.5, 0.5] + [0.0] * (V - 2)])
    p = torch.zeros(2, V)
    p[:, 2:4] = 0.5
    for _ in range(50):
        result = acceptance.rejection_sample(_sampled_chain(0, q, [int(torch.multinomial(q[0], 1))]), p, gen)
        assert result.path == [0] and result.tokens[0] in (2, 3)


def test_one_hot_proposal_is_accepted_with_probability_p():
    gen = torch.Generator().manual_seed(0)
    p = torch.tensor([[0.1, 0.6, 0.3] + [0.0] * (V - 3)] * 2)
    tree = TokenTree.chain(0, [1])  # deterministic: q is one-hot on token 1
    results = [acceptance.rejection_sample(tree, p, gen) for _ in range(4000)]
    rate = sum(r.num_accepted for r in results) / len(results)
    assert abs(rate - 0.6) < 4 * math.sqrt(0.6 * 0.4 / 4000)
    assert all(r.tokens[0] in (0, 2) for r in results if r.num_accepted == 0)  # the residual excludes token 1


def test_later_sampled_siblings_exclude_earlier_draws():
    """Two siblings drawn without replacement from q = (0.5, 0.5): the second one's q is one-hot."""
    gen = torch.Generator().manual_seed(0)
    q = torch.zeros(3, V)
    q[0, :2] = 0.5
    tree = TokenTree(
        torch.tensor([5, 0, 1]), torch.tensor([-1, 0, 0]), sampled=torch.tensor([False, True, True]), draft_probs=q
    )
    p = torch.zeros(3, V)
    p[:, 1] = 1.0  # the target always says 1: node 1 (token 0) is rejected, node 2 must be accepted
    assert all(acceptance.rejection_sample(tree, p, gen).path == [0, 2] for _ in range(100))


# ---------------------------------------------------------------- distributions: the rule alone, stub models


class StubLM:
    """Next-token distributions that depend on the whole prefix, fixed by a seed: an exact, cheap `p` or `q`."""

    def __init__(self, seed: int, mix: StubLM | None = None, weight: float = 0.0):
        self.seed, self.mix, self.weight, self._memo = seed, mix, weight, {}

    def __call__(self, prefix: tuple[int, ...]) -> torch.Tensor:
        if prefix not in self._memo:
            gen = torch.Generator().manual_seed(hash((self.seed, prefix)) % 2**31)
            probs = torch.softmax(1.5 * torch.randn(V, generator=gen), 0)
            if self.mix is not None:  # a draft that partly agrees with the target
                probs = self.weight * self.mix(prefix) + (1 - self.weight) * probs
            self._memo[prefix] = probs
        return self._memo[prefix]


TreeBuilder = Callable[[tuple[int, ...], StubLM, torch.Generator], TokenTree]


def sampled_tree(shape: list[list[int]]) -> TreeBuilder:
    """Draft a tree level by level: `shape[d][i]` children drawn from q for the i-th node of level d."""

    def build(prefix: tuple[int, ...], q: StubLM, gen: torch.Generator) -> TokenTree:
        tree, frontier = TokenTree.chain(prefix[-1]), [0]
        for counts in shape:
            contexts = [prefix + tuple(tree.tokens[tree.path_to(n)[1:]].tolist()) for n in frontier[: len(counts)]]
            probs = torch.stack([q(c) for c in contexts])
            tree, frontier = expand_sampled(tree, frontier[: len(counts)], probs, counts, gen)
        return tree

    return build


def deterministic_tree(prefix: tuple[int, ...], q: StubLM, gen: torch.Generator) -> TokenTree:
    """An n-gram-like tree: the draft's 3 likeliest tokens, the first one extended by its likeliest."""
    top = q(prefix).topk(3).indices.tolist()
    nxt = int(q((*prefix, top[0])).argmax())
    return TokenTree.trie(prefix[-1], [[top[0], nxt], [top[1]], [top[2]]])


def mixed_tree(prefix: tuple[int, ...], q: StubLM, gen: torch.Generator) -> TokenTree:
    """A deterministic child first, then two children drawn from q (possibly repeating its token)."""
    first = TokenTree.chain(prefix[-1], [int(q(prefix).argmin())])
    tree, _ = expand_sampled(first, [0], q(prefix).unsqueeze(0), [2], gen)
    return tree


def decode_two(prefix, p: StubLM, q: StubLM, build: TreeBuilder, rule, gen) -> tuple[int, int]:
    """The first two tokens of speculative sampling with stub models: draft, score every node, accept."""
    out: list[int] = []
    while len(out) < 2:
        context = prefix + tuple(out)
        tree = build(context, q, gen)
        target = torch.stack([p(context + tuple(tree.tokens[tree.path_to(n)[1:]].tolist())) for n in range(len(tree))])
        out += rule(tree, target, gen).tokens
    return out[0], out[1]


def exact_two(prefix, p: StubLM) -> torch.Tensor:
    """`[V, V]` the target's exact joint distribution of the first two tokens."""
    first = p(prefix)
    return torch.stack([first[a] * p((*prefix, a)) for a in range(V)])


def run_stub(build: TreeBuilder, rule, n: int = 4000, seed: int = 0) -> tuple[float, float]:
    p = StubLM(seed=1)
    q = StubLM(seed=2, mix=p, weight=0.6)
    prefix = (3, 1, 4)
    gen = torch.Generator().manual_seed(seed)
    counts = torch.zeros(V, V)
    for _ in range(n):
        a, b = decode_two(prefix, p, q, build, rule, gen)
        counts[a, b] += 1
    return chi_square(counts, exact_two(prefix, p))


SHAPES = {
    "chain": sampled_tree([[1], [1], [1]]),
    "two branches": sampled_tree([[2], [1, 1]]),
    "three branches": sampled_tree([[3], [2, 1, 1]]),
    "deterministic": deterministic_tree,
    "mixed": mixed_tree,
}


@pytest.mark.parametrize("shape", list(SHAPES))
def test_rejection_sampling_keeps_the_target_distribution(shape):
    stat, critical = run_stub(SHAPES[shape], acceptance.rejection_sample)
    assert stat < critical, f"chi-square {stat:.1f} >= {critical:.1f}"


def accept_all_draft_tokens(tree: TokenTree, p: torch.Tensor, gen: torch.Generator) -> Acceptance:
    """WRONG: greedy acceptance of the draft's first path while sampling; the bonus token from p."""
    path = tree.paths[0]
    bonus = int(torch.multinomial(p[path[-1]], 1, generator=gen))
    return Acceptance(path=path, tokens=[*tree.tokens[path[1:]].tolist(), bonus])


def resample_from_p(tree: TokenTree, p: torch.Tensor, gen: torch.Generator) -> Acceptance:
    """WRONG: the right acceptance test, but after a rejection the token comes from p, not the residual."""
    path, node = [0], 0
    while True:
        for child in tree.children(node):
            x = int(tree.tokens[child])
            q = tree.draft_probs[node]
            if float(torch.rand((), generator=gen)) < min(1.0, float(p[node, x] / q[x])):
                path.append(child)
                node = child
                break
        else:
            bonus = int(torch.multinomial(p[node], 1, generator=gen))
            return Acceptance(path=path, tokens=[*tree.tokens[path[1:]].tolist(), bonus])


@pytest.mark.parametrize("rule", [accept_all_draft_tokens, resample_from_p])
def test_a_wrong_rule_fails_the_same_test(rule):
    stat, critical = run_stub(SHAPES["chain"], rule)
    assert stat > critical, f"chi-square {stat:.1f} <= {critical:.1f}: the test cannot tell this rule is wrong"


# ---------------------------------------------------------------- distributions: the whole loop, tiny models


def tiny_pair() -> tuple[torch.nn.Module, torch.nn.Module]:
    small = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=1)
    target = tiny_model("llama", seed=0, **small)
    draft = tiny_model("llama", seed=0, **small)
    with torch.no_grad():  # a draft that partly agrees with the target
        for param in draft.parameters():
            param.add_(0.5 * torch.randn_like(param))
    return target, draft


def noisy_heads(target, path_inputs: bool = False) -> MedusaHeads:
    heads = MedusaHeads.for_model(target, num_heads=2, path_inputs=path_inputs)
    with torch.no_grad():
        for param in heads.parameters():
            param.add_(0.3 * torch.randn_like(param))
    if path_inputs:  # and a draft vocabulary of half the tokens: the others can only come from the target
        heads.restrict_vocab(torch.arange(0, V, 2))
    return heads


def random_eagle(target) -> EagleHead:
    """A random EAGLE-3 head with a draft vocabulary of half the tokens (the others only come from the target)."""
    torch.manual_seed(0)
    return EagleHead.for_model(target, draft_vocab=torch.arange(1, V, 2)).eval()


def exact_two_tokens(target, x: torch.Tensor, sampling: Sampling) -> torch.Tensor:
    with torch.no_grad():
        first = sampling.probs(target(x).logits[0, -1:])[0]  # [V]
        both = torch.cat([x.repeat(V, 1), torch.arange(V).unsqueeze(1)], 1)
        second = sampling.probs(target(both).logits[:, -1])  # [V, V]
    return first.unsqueeze(1) * second


def sample_counts(generate, x: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    counts = torch.zeros(V, V)
    for _ in range(n):
        a, b = generate(x, generator=gen)[0, -2:].tolist()
        counts[a, b] += 1
    return counts


@pytest.mark.parametrize(
    ("name", "drafter", "sampling"),
    [
        ("draft tree", lambda t, d: ModelDrafter(d, depth=3, branching=2, tree_budget=5), dict(temperature=1.0)),
        ("draft chain", lambda t, d: ModelDrafter(d, depth=3, branching=1), dict(temperature=0.7, top_k=6)),
        ("ngram", lambda t, d: NGramDrafter(min_ngram=1), dict(temperature=1.0, top_p=0.9)),
        ("medusa", lambda t, d: MedusaDrafter(noisy_heads(t), [(0,), (1,), (0, 0)]), dict(temperature=1.0)),
        (
            "medusa path heads, draft vocabulary",
            lambda t, d: MedusaDrafter(noisy_heads(t, path_inputs=True), [(0,), (1,), (0, 0), (1, 0)]),
            dict(temperature=0.8, top_k=8),
        ),
        (
            "eagle tree, draft vocabulary",
            lambda t, d: EagleDrafter(random_eagle(t), depth=2, branching=2, tree_budget=5),
            dict(temperature=0.9, top_p=0.95),
        ),
    ],
)
def test_generate_samples_the_target_distribution(name, drafter, sampling):
    target, draft = tiny_pair()
    x = torch.tensor([[3, 4, 5, 3, 4, 5, 3, 4]])
    gen = specdec.SpeculativeGenerator(target, drafter(target, draft), controller=None)

    def run(x, generator):
        return gen.generate(x, max_new_tokens=2, do_sample=True, eos_token_id=None, generator=generator, **sampling)

    counts = sample_counts(run, x, n=1500, seed=0)
    stat, critical = chi_square(counts, exact_two_tokens(target, x, Sampling(**sampling)))
    assert stat < critical, f"{name}: chi-square {stat:.1f} >= {critical:.1f}"


def test_padded_plain_steps_sample_the_target_distribution():
    """Plain steps padded with guessed tokens (as the controller does where a few nodes verify faster than one)."""

    class PaddedFallback(Controller):
        def plan(self, rows: int = 1) -> Plan:
            return Plan(False, 0, 0, self.threshold)

        def pad_width(self) -> int:
            return 4

    target, draft = tiny_pair()
    x = torch.tensor([[3, 4, 5, 3, 4, 5, 3, 4]])  # the guess after 4 is 5: often right
    gen = specdec.SpeculativeGenerator(target, ModelDrafter(draft), controller=PaddedFallback())

    def run(x, generator):
        return gen.generate(x, max_new_tokens=2, do_sample=True, eos_token_id=None, generator=generator)

    counts = sample_counts(run, x, n=1500, seed=0)
    stat, critical = chi_square(counts, exact_two_tokens(target, x, Sampling()))
    assert stat < critical, f"chi-square {stat:.1f} >= {critical:.1f}"


def test_padded_speculative_trees_sample_the_target_distribution():
    """A sampled draft token with guessed tokens below it (as the controller grows a tree to a size measured cheaper
    to verify): the first two of four new tokens follow the target's joint distribution."""

    class PaddedSpeculation(Controller):
        def plan(self, rows: int = 1) -> Plan:
            return Plan(True, 1, 1, 0.0)

        def pad_size(self, size: int) -> int:
            return 4

    target, draft = tiny_pair()
    x = torch.tensor([[3, 4, 5, 3, 4, 5, 3, 4]])
    gen = specdec.SpeculativeGenerator(
        target, ModelDrafter(draft, depth=1, branching=1), controller=PaddedSpeculation()
    )

    def run(x, generator):
        out = gen.generate(x, max_new_tokens=4, do_sample=True, eos_token_id=None, generator=generator)
        return out[:, : x.shape[1] + 2]

    counts = sample_counts(run, x, n=1500, seed=1)
    stat, critical = chi_square(counts, exact_two_tokens(target, x, Sampling()))
    assert stat < critical, f"chi-square {stat:.1f} >= {critical:.1f}"


def test_generate_with_a_wrong_rule_fails(monkeypatch):
    target, draft = tiny_pair()
    x = torch.tensor([[3, 4, 5, 3, 4, 5, 3, 4]])
    monkeypatch.setattr(acceptance, "rejection_sample", accept_all_draft_tokens)
    gen = specdec.SpeculativeGenerator(target, ModelDrafter(draft, depth=3, branching=1), controller=None)

    def run(x, generator):
        return gen.generate(x, max_new_tokens=2, do_sample=True, eos_token_id=None, generator=generator)

    counts = sample_counts(run, x, n=1500, seed=0)
    stat, critical = chi_square(counts, exact_two_tokens(target, x, Sampling()))
    assert stat > critical


def test_sampling_is_reproducible_with_a_seed():
    """Same seed, same trees: the same sample. (With the adaptive controller the trees depend on measured
    timings, so a seed fixes the distribution but not the sample; hence controller=None here.)"""
    target, draft = tiny_pair()
    x = torch.tensor([[3, 4, 5, 3, 4, 5, 3, 4]])
    gen = specdec.SpeculativeGenerator(target, ModelDrafter(draft), controller=None)
    common = dict(max_new_tokens=40, do_sample=True, eos_token_id=None)
    runs = [gen.generate(x, generator=torch.Generator().manual_seed(s), **common).tolist() for s in (7, 7, 8)]
    assert runs[0] == runs[1] != runs[2]
    torch.manual_seed(3)  # no generator: one seeded from torch's global RNG
    first = gen.generate(x, **common).tolist()
    torch.manual_seed(3)
    assert gen.generate(x, **common).tolist() == first


def test_sampling_with_the_controller_and_stats():
    target, draft = tiny_pair()
    x = torch.tensor([[3, 4, 5, 3, 4, 5, 3, 4]])
    gen = specdec.SpeculativeGenerator(target, specdec.drafters.Composite([NGramDrafter(), ModelDrafter(draft)]))
    out = gen.generate(
        x, max_new_tokens=60, do_sample=True, eos_token_id=None, return_dict_in_generate=True, output_scores=True,
        generator=torch.Generator().manual_seed(0),
    )  # fmt: skip
    stats = out.spec_stats
    assert out.sequences.shape[1] == x.shape[1] + 60 == x.shape[1] + stats.new_tokens
    assert len(stats.plans) == len(stats.accept_lengths) and len(out.scores) == 60
    assert stats.mean_accepted_length > 1.0  # the partly agreeing draft gets tokens accepted


# ---------------------------------------------------------------- typical acceptance (lossy, opt-in)


def test_typical_acceptance_thresholds_by_hand():
    gen = torch.Generator().manual_seed(0)
    p = torch.zeros(3, V)
    p[0, :2] = torch.tensor([0.7, 0.3])  # entropy 0.61: threshold min(0.09, 0.3 * e^-0.61) = 0.09
    p[1, :4] = 0.25  # entropy 1.39: threshold 0.3 * 0.25 = 0.075
    p[2, 5] = 1.0
    tree = TokenTree.chain(0, [1, 3])  # p(1 | root) = 0.3 > 0.09, p(3 | node 1) = 0.25 > 0.075: both pass
    result = acceptance.typical(tree, p, acceptance.Typical(), gen)
    assert result.path == [0, 1, 2] and result.tokens == [1, 3, 5]
    strict = acceptance.typical(tree, p, acceptance.Typical(epsilon=0.5, delta=1.0), gen)
    assert strict.path == [0]  # 0.3 < min(0.5, e^-0.61 = 0.54)


def test_typical_acceptance_is_lossy_and_only_used_when_asked():
    def rule(tree, p, gen):
        return acceptance.typical(tree, p, acceptance.Typical(), gen)

    stat, critical = run_stub(SHAPES["chain"], rule)
    assert stat > critical  # it does not keep the target's distribution: that is why it is opt-in
    target, draft = tiny_pair()
    x = torch.tensor([[3, 4, 5, 3, 4, 5, 3, 4]])
    common = dict(max_new_tokens=30, do_sample=True, eos_token_id=None, return_dict_in_generate=True)
    runs = {}
    for name, typical in [("exact", None), ("typical", acceptance.Typical(epsilon=0.3, delta=0.6))]:
        gen = specdec.SpeculativeGenerator(target, ModelDrafter(draft), None, lossy_typical_acceptance=typical)
        runs[name] = gen.generate(x, generator=torch.Generator().manual_seed(0), **common)
    assert runs["exact"].sequences.tolist() != runs["typical"].sequences.tolist()
    greedy = specdec.SpeculativeGenerator(target, ModelDrafter(draft), None, acceptance.Typical())
    expected = target.generate(x, max_new_tokens=30, do_sample=False, eos_token_id=None)
    assert greedy.generate(x, max_new_tokens=30, eos_token_id=None).tolist() == expected.tolist()
