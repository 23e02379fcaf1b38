"""Batches (#27): each row of a batched call equals its own prompt's `target.generate`, for every draft source."""

from __future__ import annotations

from functools import partial

import pytest
import torch
from test_sampling import chi_square, exact_two_tokens, random_eagle, tiny_pair
from tiny import ARCHS, PAD, VOCAB, small_draft, tiny_model

import specdec
from heads.eagle import EagleHead
from heads.medusa import MedusaHeads
from specdec import kv, verify
from specdec.control import Controller, Plan
from specdec.drafters import Composite, EagleDrafter, MedusaDrafter, ModelDrafter, NGramDrafter
from specdec.drafters.memory import NGramMemory
from specdec.sampling import Sampling
from specdec.tree import TokenTree

LENGTHS = (9, 3, 6, 1)  # prompt lengths: left padding differs per row; a one-token prompt has no prefill
NEW = 20


def prompts(seed: int = 0, lengths=LENGTHS) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (1, n), generator=gen) for n in lengths]


def left_padded(rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """`[B, L]` input ids (left padding with PAD) and their attention mask."""
    width = max(r.shape[1] for r in rows)
    ids = torch.full((len(rows), width), PAD, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - r.shape[1] :], mask[i, width - r.shape[1] :] = r[0], 1
    return ids, mask


def own_outputs(target, rows: list[torch.Tensor], **kwargs) -> list[torch.Tensor]:
    """Each prompt's new tokens from its own `target.generate` call (batch size 1, no padding)."""
    return [target.generate(r, do_sample=False, pad_token_id=PAD, **kwargs)[0, r.shape[1] :] for r in rows]


def an_eos(target, rows: list[torch.Tensor]) -> int:
    """A token that ends some rows early (at different steps) while another row reaches max_new_tokens."""
    plain = [o.tolist() for o in own_outputs(target, rows, max_new_tokens=NEW, eos_token_id=None)]
    for token in dict.fromkeys(t for out in plain for t in out[2:]):
        firsts = [out.index(token) if token in out else None for out in plain]
        ended = [f for f in firsts if f is not None]
        if None in firsts and len(ended) >= 2 and len(set(ended)) >= 2:
            return token
    for token in dict.fromkeys(t for out in plain for t in out[2:]):  # at least one early end and one full row
        if any(token not in out for out in plain):
            return token
    raise AssertionError("no token ends some rows but not all")


def expected_batch(target, rows: list[torch.Tensor], eos: int) -> torch.Tensor:
    """What a batched call must return: each row's own output, padded with PAD after its EOS."""
    ids, _ = left_padded(rows)
    outs = own_outputs(target, rows, max_new_tokens=NEW, eos_token_id=eos)
    new = torch.full((len(rows), max(len(o) for o in outs)), PAD, dtype=torch.long)
    for i, o in enumerate(outs):
        new[i, : len(o)] = o
    return torch.cat([ids, new], 1)


def run(target, drafter, rows, eos, controller="default", **kwargs):
    ids, mask = left_padded(rows)
    extra = {} if controller == "default" else {"controller": controller}
    return specdec.generate(
        target,
        ids,
        attention_mask=mask,
        drafter=drafter,
        max_new_tokens=NEW,
        eos_token_id=eos,
        pad_token_id=PAD,
        return_dict_in_generate=True,
        **extra,
        **kwargs,
    )


@pytest.fixture(scope="module")
def models():
    return {arch: (tiny_model(arch), small_draft(arch)) for arch in ARCHS}


@pytest.fixture(scope="module")
def cases(models):
    """Per architecture: the prompts, an EOS that ends rows at different steps, and the expected batch."""
    out = {}
    for arch, (target, _) in models.items():
        rows = prompts(ARCHS.index(arch))
        eos = an_eos(target, rows)
        lengths = [len(o) for o in own_outputs(target, rows, max_new_tokens=NEW, eos_token_id=eos)]
        out[arch] = (rows, eos, expected_batch(target, rows, eos), lengths)
    return out


def memory_of(target, rows) -> NGramMemory:
    """A cross-request memory holding the target's answers to the prompts: most of its drafts are hits."""
    memory = NGramMemory(min_ngram=1)
    for r, out in zip(rows, own_outputs(target, rows, max_new_tokens=NEW, eos_token_id=None), strict=True):
        memory.add(r[0].tolist() + out.tolist())
    return memory


DRAFTERS = {
    "draft tree": lambda target, small, rows: ModelDrafter(small, depth=4, branching=3, tree_budget=8),
    "self chain": lambda target, small, rows: ModelDrafter(target, depth=3, branching=1),
    "ngram memory": lambda target, small, rows: NGramDrafter(memory=memory_of(target, rows), remember=False),
}


@pytest.mark.parametrize("controller", ["default", None])
@pytest.mark.parametrize("source", list(DRAFTERS))
@pytest.mark.parametrize("arch", ARCHS)
def test_each_row_equals_its_own_target_generate(models, cases, arch, source, controller):
    target, small = models[arch]
    rows, eos, expected, lengths = cases[arch]
    out = run(target, DRAFTERS[source](target, small, rows), rows, eos, controller=controller)
    assert torch.equal(out.sequences, expected)
    stats = out.spec_stats
    assert [row.new_tokens for row in stats.rows] == lengths and NEW in lengths and min(lengths) < NEW
    assert all(len(row.accept_lengths) == len(row.tree_sizes) for row in stats.rows)
    assert stats.step_rows == sorted(stats.step_rows, reverse=True)
    if controller is None:  # finished rows leave at once (with a controller, perhaps later: see below)
        assert stats.step_rows[-1] < len(rows)
    if source == "self chain" and controller is None:  # the target's own drafts: every full step accepts 3 + 1
        assert all(row.accept_lengths[0] == min(4, row.new_tokens) for row in stats.rows)


class PaddedFallback(Controller):
    """Every step planned plain, each row's tree padded to 2 nodes (as measured costs would have it where a few
    rows of one token cost more than of two)."""

    def plan(self, rows: int = 1) -> Plan:
        self._set_rows(rows)
        return Plan(False, 0, 0, self.threshold)

    def pad_width(self) -> int:
        return 2


@pytest.mark.parametrize("arch", ARCHS)
def test_padded_plain_steps_of_a_batch_stay_identical(models, cases, arch):
    target, small = models[arch]
    rows, eos, expected, lengths = cases[arch]
    out = run(target, ModelDrafter(small), rows, eos, controller=PaddedFallback())
    assert torch.equal(out.sequences, expected)
    assert [row.new_tokens for row in out.spec_stats.rows] == lengths
    assert max(out.spec_stats.step_slots) == 2 * len(rows)  # every row verified its guess


class FixedCosts(PaddedFallback):
    """Plain steps of one token per row, with verify times per token count fixed (`costs.small`), not measured."""

    def __init__(self, small: dict[int, float]):
        super().__init__()
        self.costs.small.update(small)

    def pad_width(self) -> int:
        return 1

    def update_batch(self, *args, **kwargs) -> None:
        pass


class FallbackPaysAnyGain(FixedCosts):
    """Every step planned plain; a free draft pays whenever it promises anything."""

    def pays(self, tree_size: int, expected_gain: float) -> bool:
        return tree_size > 1 and expected_gain > 0


@pytest.mark.parametrize("both_repeat", [True, False])
def test_free_drafts_in_a_batch_are_verified_only_when_every_row_gains(models, both_repeat):
    """In fallback steps, n-gram hits are verified when every running row has one: a hit in one row alone would
    pad every row to its size for tokens that do not shorten the batch."""
    target, _ = models["llama"]
    segment = torch.randperm(VOCAB - 3, generator=torch.Generator().manual_seed(0))[:16] + 3  # no token repeats
    repeating = torch.cat([segment[:6], segment[:6], segment[:3]]).unsqueeze(0)
    rows = [repeating, repeating if both_repeat else segment[6:].unsqueeze(0)]
    out = run(target, NGramDrafter(), rows, eos=None, controller=FallbackPaysAnyGain({}))
    assert torch.equal(out.sequences, expected_batch(target, rows, eos=None))
    assert (out.spec_stats.step_slots[0] > 2) == both_repeat  # the first step: the repeats' hits, or a plain step


@pytest.mark.parametrize("odd_rows_dear", [True, False])
def test_finished_rows_stay_in_the_batch_while_fewer_rows_cost_more(models, cases, odd_rows_dear):
    """Where 3 rows of one token were measured dearer than 4 (MKL on an AMD EPYC), a batch of 4 keeps its finished
    rows until they are more than half of it; where fewer rows cost less, they leave at once. Either way every row
    is exact."""
    target, _ = models["llama"]
    rows, eos, expected, lengths = cases["llama"]
    small = {1: 0.060, 2: 0.050, 3: 0.070, 4: 0.050} if odd_rows_dear else {1: 0.03, 2: 0.04, 3: 0.045, 4: 0.05}
    out = run(target, NGramDrafter(), rows, eos, controller=FixedCosts(small))
    assert torch.equal(out.sequences, expected)
    running = [sum(n >= step for n in lengths) for step in range(1, max(lengths) + 1)]  # one token a step
    assert running[-1] < len(rows) - 1 < running[0]  # rows end at different steps: some step runs 3 rows
    kept = [len(rows) if odd_rows_dear and 2 * r >= len(rows) else r for r in running]
    assert out.spec_stats.step_rows == kept
    assert [row.new_tokens for row in out.spec_stats.rows] == lengths
    assert all(len(row.accept_lengths) == row.new_tokens for row in out.spec_stats.rows)  # no step of a kept row


def eagle(target, small, rows):
    torch.manual_seed(0)
    return EagleDrafter(EagleHead.for_model(target).eval(), depth=3, branching=2, tree_budget=6)


def medusa(target, small, rows, path_inputs=False):
    heads = MedusaHeads.for_model(target, num_heads=3, path_inputs=path_inputs)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in heads.parameters():
            param.add_(0.05 * torch.randn(param.shape, generator=gen))
    return MedusaDrafter(heads.eval(), [(0,), (1,), (0, 0), (0, 1), (0, 0, 0)])


HEADS = {
    "medusa": medusa,
    "medusa, path heads": partial(medusa, path_inputs=True),
    "composite ngram + path medusa": lambda t, s, rows: Composite(
        [NGramDrafter(), medusa(t, s, rows, path_inputs=True)], skip_gain=0.5
    ),
    "eagle": eagle,
    "composite ngram + eagle": lambda t, s, rows: Composite([NGramDrafter(), eagle(t, s, rows)], skip_gain=0.5),
    "composite ngram memory + draft": lambda t, s, rows: Composite(
        [NGramDrafter(memory=memory_of(t, rows[:2]), remember=False), ModelDrafter(s, depth=3, branching=2)]
    ),
}


@pytest.mark.parametrize("controller", ["default", None])
@pytest.mark.parametrize("source", list(HEADS))
@pytest.mark.parametrize("arch", ARCHS)
def test_heads_and_composites_in_a_batch(models, cases, arch, source, controller):
    target, small = models[arch]
    rows, eos, expected, _ = cases[arch]
    out = run(target, HEADS[source](target, small, rows), rows, eos, controller=controller)
    assert torch.equal(out.sequences, expected)


def test_eager_attention_and_the_batched_target_generate():
    target, small = tiny_model("llama", attn="eager"), small_draft("llama")
    rows = prompts(11)
    eos = an_eos(target, rows)
    ids, mask = left_padded(rows)
    expected = expected_batch(target, rows, eos)
    batched = target.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, eos_token_id=eos)
    assert torch.equal(batched, expected)  # what target.generate returns for the batch, too
    for drafter in (ModelDrafter(small, depth=3, branching=2), NGramDrafter()):
        assert torch.equal(run(target, drafter, rows, eos).sequences, expected)
    plain = specdec.generate(target, ids, attention_mask=mask, drafter=NGramDrafter(), max_new_tokens=NEW,
                             eos_token_id=eos, pad_token_id=PAD)  # fmt: skip
    assert torch.equal(plain, expected)  # a tensor without return_dict_in_generate


def test_a_batch_without_padding_or_eos_and_a_batch_of_one_row(models):
    target, small = models["qwen2"]
    rows = prompts(3, lengths=(5, 5))
    ids = torch.cat(rows)
    out = specdec.generate(target, ids, drafter=ModelDrafter(small), max_new_tokens=NEW, eos_token_id=None)
    expected = torch.cat([r for r in rows])
    expected = torch.cat([expected, torch.stack(own_outputs(target, rows, max_new_tokens=NEW, eos_token_id=None))], 1)
    assert torch.equal(out, expected)


def test_cache_with_holes_then_compaction_continues_like_a_fresh_prefill():
    target = tiny_model("llama")
    rows = prompts(5, lengths=(6, 3))
    ids, mask = left_padded([r[:, :-1] for r in rows])
    with torch.no_grad():
        cache, _ = verify.prefill_batch(target, ids, mask.bool())
        trees = [
            TokenTree(torch.tensor([int(rows[0][0, -1]), 7, 8, 9]), torch.tensor([-1, 0, 0, 2])),
            TokenTree(torch.tensor([int(rows[1][0, -1]), 10]), torch.tensor([-1, 0])),
        ]
        verify.forward_batch(target, cache, trees)
        cache.keep_paths([[0, 2, 3], [0]])  # a side branch in row 0; row 1 keeps its root only: two holes
        assert cache.visible.sum(1).tolist() == [8, 3] and cache.slots == 8
        kept = [[*rows[0][0].tolist(), 8, 9], rows[1][0].tolist()]
        for compact in (False, True):
            if compact:
                cache.compact()
                assert cache.slots == 8 and cache.waste() == 0.0
            nxt = [TokenTree.chain(5, [6]), TokenTree.chain(11, [12])]
            before = kv.length(cache.cache)
            logits = verify.forward_batch(target, cache, nxt).logits
            kv.crop(cache.cache, before)
            for row, tokens in enumerate(kept):
                fresh = target(torch.tensor([tokens + nxt[row].tokens.tolist()])).logits[0, -2:]
                torch.testing.assert_close(logits[row], fresh, rtol=1e-5, atol=1e-5)
        cache.select_rows([1])
        assert cache.visible.shape == (1, 8) and kv.length(cache.cache) == 8


@pytest.mark.parametrize(
    ("name", "drafter", "sampling"),
    [
        ("draft tree", lambda t, d: ModelDrafter(d, depth=3, branching=2, tree_budget=5), dict(temperature=1.0)),
        ("ngram", lambda t, d: NGramDrafter(min_ngram=1), dict(temperature=1.0, top_p=0.9)),
        ("eagle", lambda t, d: EagleDrafter(random_eagle(t), depth=2, branching=2, tree_budget=5), dict(top_k=6)),
    ],
)
def test_sampling_follows_the_target_in_every_row(name, drafter, sampling):
    target, draft = tiny_pair()
    rows = [torch.tensor([[3, 4, 5, 3, 4, 5, 3, 4]]), torch.tensor([[5, 6, 7, 5, 6]])]
    ids, mask = left_padded(rows)
    gen = specdec.SpeculativeGenerator(target, drafter(target, draft), controller=None)
    generator = torch.Generator().manual_seed(0)
    counts = torch.zeros(2, 8, 8)
    for _ in range(1500):
        out = gen.generate(ids, attention_mask=mask, max_new_tokens=2, do_sample=True, eos_token_id=None,
                           generator=generator, **sampling)  # fmt: skip
        for r in range(2):
            a, b = out[r, -2:].tolist()
            counts[r, a, b] += 1
    for r, x in enumerate(rows):
        stat, critical = chi_square(counts[r], exact_two_tokens(target, x, Sampling(**sampling)))
        assert stat < critical, f"{name}, row {r}: chi-square {stat:.1f} >= {critical:.1f}"


@pytest.mark.parametrize(
    ("mask", "message"),
    [
        (torch.tensor([[1, 1, 1], [1, 1, 0]]), "right-padded: tokenize with padding_side='left'"),
        (torch.tensor([[1, 1, 1], [1, 0, 1]]), "must be left padding"),
        (torch.tensor([[1, 1, 1], [0, 0, 0]]), "at least one unpadded token"),
        (torch.tensor([[1, 1, 1]]), "attention_mask has shape"),
    ],
)
def test_bad_masks_are_clear_errors(models, mask, message):
    target, small = models["llama"]
    with pytest.raises(ValueError, match=message):
        specdec.generate(target, torch.randint(3, VOCAB, (2, 3)), attention_mask=mask, drafter=ModelDrafter(small))


def test_a_streamer_takes_one_row(models):
    target, small = models["llama"]

    class Streamer:
        ended = False

        def put(self, value):
            pass

        def end(self):
            self.ended = True

    streamer = Streamer()
    with pytest.raises(ValueError, match="streamer takes one prompt"):
        specdec.generate(target, torch.randint(3, VOCAB, (2, 3)), drafter=ModelDrafter(small), streamer=streamer)
    assert streamer.ended


def simulate_batch(rows: int, steps: int = 80, accept_rate: float = 0.8, seed: int = 0) -> list[Plan]:
    """A controller planning for `rows` rows whose verification costs what a CPU's does: flat up to 8 tokens,
    then linear in the tokens of the step (rows x tree size)."""
    controller, gen, plans = Controller(), torch.Generator().manual_seed(seed), []
    for _ in range(steps):
        plan = controller.plan(rows=rows)
        plans.append(plan)
        size = 1 + min(plan.budget, 2 * plan.depth) if plan.speculate else 1
        outcomes = []
        for _ in range(rows):
            accepted = 0
            while plan.speculate and accepted < plan.depth and float(torch.rand((), generator=gen)) < accept_rate:
                accepted += 1
            depth = plan.depth if plan.speculate else 0
            outcomes.append((size, depth, accepted, sum(accept_rate**d for d in range(1, depth + 1))))
        verify_seconds = 0.040 + 0.004 * max(0, rows * size - 8)
        controller.update_batch(plan, rows * size, outcomes, 0.001 * plan.depth * rows, verify_seconds)
    return plans


def test_the_controller_shrinks_trees_as_the_batch_grows_and_falls_back():
    one, four, many = (simulate_batch(rows)[-8:] for rows in (1, 4, 32))
    budget = {name: max(p.budget for p in plans if p.speculate) for name, plans in (("1", one), ("4", four))}
    assert all(p.speculate for p in one) and budget["4"] < budget["1"]
    assert not any(p.speculate for p in many)  # 32 rows: every extra token costs a tenth of a step: plain steps
    with pytest.raises(ValueError, match="at least one row"):
        Controller().plan(rows=0)


def test_compaction_in_every_step_keeps_every_row_exact(models, monkeypatch):
    """The loop compacts when holes waste half the cache; forced at every step, the output must not change."""
    target, small = models["llama"]
    rows = prompts(8, lengths=(34, 5, 20))
    eos = an_eos(target, rows)
    expected = expected_batch(target, rows, eos)
    calls = []
    compact = kv.RowCache.compact
    monkeypatch.setattr(kv.RowCache, "waste", lambda self: 1.0)
    monkeypatch.setattr(kv.RowCache, "compact", lambda self: calls.append(self.slots) or compact(self))
    for drafter in (ModelDrafter(small, depth=3, branching=2), NGramDrafter()):
        assert torch.equal(run(target, drafter, rows, eos, controller=None).sequences, expected)
    assert len(calls) > 4


def steady_batch(rates: list[float], steps: int = 60) -> Controller:
    """A controller after `steps` speculative steps of a batch whose row `r` accepts `rates[r]` draft tokens a step
    on average (of a 2-node chain: a whole number of them, or half-way between two, alternating)."""
    controller = Controller()
    for step in range(steps):
        accepted = [int(rate) + (step % 2 == 0 and rate % 1 > 0) for rate in rates]
        size = 3 * len(rates)
        outcomes = [(3, 2, a, 1.0) for a in accepted]
        controller.update_batch(Plan(True, 2, 2, 0.0), size, outcomes, 0.001, 0.040 + 0.002 * size, row_ids=range(4))
    return controller


def test_a_batch_is_judged_by_its_least_accepting_row():
    """The gains of a batch step count at its slowest row's (`Controller.spread`): rows that accept 2 and 1 tokens a
    step promise the batch less than rows that all accept 1.5, though their mean is the same."""
    even, uneven = steady_batch([1.5] * 4), steady_batch([2, 2, 1, 1])
    assert even.spread == pytest.approx(1.0)
    assert uneven.spread == pytest.approx((1 * 60 + 4 * 1.5) / 64 / 1.5)  # the slowest row, from 4 steps at the mean
    for controller in (even, uneven):
        controller._set_rows(4)
    assert uneven.expected_rate(2) < even.expected_rate(2)
    assert uneven.expected_rate(0) == pytest.approx(even.expected_rate(0))  # plain steps: no draft, no spread
    uneven.start()  # a new batch: its rows are new
    assert uneven.spread == 1.0
