"""The adaptive controller with stubbed costs and acceptance, and its effect on real (tiny) decoding."""

import itertools
import math
from dataclasses import asdict

import pytest
import torch
from tiny import ARCHS, VOCAB, small_draft, tiny_model

import specdec
from specdec.control import ControlConfig, Plan
from specdec.control import Controller as _Controller
from specdec.decode import _pad
from specdec.drafters import ModelDrafter
from specdec.tree import TokenTree


class Controller(_Controller):
    """The controller, with every plan it made kept in `history` (the real one keeps none)."""

    def reset(self) -> None:
        super().reset()
        self.history = []

    def plan(self) -> Plan:
        plan = super().plan()
        self.history.append(asdict(plan))
        return plan


def simulate(
    controller: Controller, steps: int, accept_rate: float, verify, draft_per_level: float, seed=0, overconfidence=1.0
):
    """Drive the controller with a synthetic draft: each draft token is accepted with `accept_rate`; the tree's
    scores promise `overconfidence` times the expected accepted tokens."""
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        plan = controller.plan()
        if not plan.speculate:
            controller.update(plan, 1, 0, 0, 0.0, 0.0, verify(1))
            continue
        depth = plan.depth
        size = 1 + min(plan.budget, depth * 2)
        accepted = 0
        while accepted < depth and torch.rand(1, generator=gen).item() < accept_rate:
            accepted += 1
        promised = overconfidence * sum(accept_rate**d for d in range(1, depth + 1))
        controller.update(plan, size, depth, accepted, promised, draft_per_level * depth, verify(size))
    return controller


def cheap_verify(n: int) -> float:
    return 0.040 + 0.0002 * n  # 40 ms, nearly flat in tree size


def steep_verify(n: int) -> float:
    return 0.040 + 0.010 * n  # every node costs a quarter of a plain step


def test_grows_when_acceptance_is_high_and_verify_is_cheap():
    c = simulate(Controller(), 60, accept_rate=0.9, verify=cheap_verify, draft_per_level=0.002)
    recent = c.history[-4:]  # one in four plans halves the budget, to keep measuring the cost slope
    assert all(p["speculate"] for p in recent) and min(p["depth"] for p in recent) >= 6
    assert max(p["budget"] for p in recent) >= 16


def test_shrinks_when_acceptance_is_low_or_verify_is_dear():
    low = simulate(Controller(), 60, accept_rate=0.3, verify=cheap_verify, draft_per_level=0.002).plan()
    dear = simulate(Controller(), 60, accept_rate=0.9, verify=steep_verify, draft_per_level=0.002).plan()
    high = simulate(Controller(), 60, accept_rate=0.9, verify=cheap_verify, draft_per_level=0.002).plan()
    assert low.depth < high.depth
    assert dear.budget < high.budget
    assert dear.threshold > high.threshold  # dear nodes must be likelier to be worth verifying


def test_falls_back_when_speculation_cannot_pay_and_probes_again_with_backoff():
    config = ControlConfig(probe_after=4, max_probe_after=16)  # a cheap draft: its probes are not rarer (below)
    c = simulate(Controller(config), 200, accept_rate=0.0, verify=cheap_verify, draft_per_level=0.001)
    plans = c.history
    plain = [not p["speculate"] for p in plans]
    assert sum(plain) > 0.8 * len(plans)  # mostly plain steps
    probes = [i for i in range(1, len(plans)) if plain[i - 1] and not plain[i]]
    assert len(probes) >= 3  # it keeps probing ...
    gaps = [b - a for a, b in itertools.pairwise(probes[1:])]  # from the first fallback on
    assert gaps[-1] > gaps[0]  # ... less and less often (back-off)


def generations(c: Controller, count: int, catchup: float, steps: int = 96) -> Controller:
    """`count` generations of a never-accepted draft (4 ms a level, 45 ms trees against 40 ms plain steps) whose first
    speculative step after plain steps re-reads what it missed (`catchup` seconds), as a draft model does."""
    for _ in range(count):
        c.start()
        after_plain = True
        for _ in range(steps):
            plan = c.plan()
            if not plan.speculate:
                c.update(plan, 1, 0, 0, 0.0, 0.0, 0.040)
                after_plain = True
                continue
            depth = min(plan.depth, plan.budget)
            caught_up = catchup if after_plain else 0.0
            c.update(plan, 1 + depth, depth, 0, 0.5, 0.004 * depth, 0.045, caught_up)
            after_plain = False
    return c


def test_probes_whose_catch_up_is_dear_are_rare():
    """A draft model probing after plain steps first re-reads the prompt or the tokens since it last drafted (80 ms
    here, two plain steps). Probing within 8 steps of every generation would cost more than it could find: probes
    are spaced so that a failed one costs at most `probe_share` of the plain steps before it. A source without
    catch-up keeps probing every few dozen steps."""
    cheap, dear = generations(Controller(), 6, catchup=0.0), generations(Controller(), 6, catchup=0.080)
    assert dear.probe_cost > 0.08 and dear.probe_gap() == math.ceil(dear.probe_cost / (0.05 * 0.040)) >= 40
    assert cheap.probe_gap() < 16
    gaps = {}
    for name, c in (("cheap", cheap), ("dear", dear)):
        probes = [i for i, (q, p) in enumerate(itertools.pairwise(c.history)) if p["speculate"] and not q["speculate"]]
        gaps[name] = [b - a for a, b in itertools.pairwise(probes[1:])]  # from the first fallback on
    assert min(gaps["dear"]) >= dear.probe_gap() > min(gaps["cheap"])  # the cheap one probes early in a generation
    assert not any(p["speculate"] for p in dear.history[96 : 96 + 40])  # a new generation does not probe early


def test_a_cheap_source_that_is_never_accepted_is_left_alone_where_verification_is_flat():
    """bf16 on a CPU with AVX-512: a few more tokens cost almost nothing, and drafting is nearly free (n-gram
    lookups). The prior alone must not keep such a source speculating: it fades as the steps are measured."""
    c = simulate(Controller(), 400, accept_rate=0.0, verify=lambda n: 0.100 + 0.0008 * n, draft_per_level=0.0005)
    assert sum(p["speculate"] for p in c.history) < 0.15 * len(c.history)
    assert c.acceptance_curve()[0] < 0.02  # measured as never accepted, not as the prior's floor


def jumpy_verify(n: int) -> float:
    """fp32 on a CPU: 1-3 tokens cost about the same, from 4 on a slower matrix kernel takes over."""
    return 0.037 if n == 1 else 0.040 if n <= 3 else 0.054 + 0.001 * n


def test_cost_model_reads_measured_sizes_and_keeps_trees_in_the_cheap_size_class():
    c = Controller()
    assert not c.plan().speculate  # the first step is plain: its cost is what speculation competes with
    c = simulate(c, 120, accept_rate=0.35, verify=jumpy_verify, draft_per_level=0.0)
    assert abs(c.plain_step_time() - 0.037) < 1e-3
    assert abs(c.costs.verify_time(3, c._line) - 0.040) < 2e-3 and c.costs.verify_time(5, c._line) > 0.055
    # 1.35 tokens for 40 ms beat 1 for 37 ms; trees of 4+ nodes (>= 58 ms for < 1.6 tokens) do not
    recent = [p for p in c.history[40:] if p["speculate"]]
    assert len(recent) > 0.9 * len(c.history[40:])
    assert all(p["budget"] <= 2 for p in recent)


def test_a_tree_never_looks_cheaper_than_a_smaller_one():
    """The plain step was measured after a long prompt (55 ms); the next generation's prompt is short, and there
    a plain step costs 44 ms and 2-3 node trees 45 ms. Read as measured, such a tree of a draft that is never
    accepted beats that stale plain step, speculation goes on, and the plain step is never measured again (on
    main before this test: every one of the 200 steps speculated). A tree costs at least what a smaller one was
    measured to cost, plus the marginal cost of its extra nodes: the draft is soon left alone."""
    c = Controller()
    plan = c.plan()
    assert not plan.speculate
    c.update(plan, 1, 0, 0, 0.0, 0.0, 0.055)
    c.start()
    short_prompt = lambda n: 0.044 if n == 1 else 0.045 if n <= 3 else 0.060 + 0.001 * n  # noqa: E731
    c = simulate(c, 200, accept_rate=0.0, verify=short_prompt, draft_per_level=0.0005)
    line = c._line
    assert c.costs.verify_time(2, line) >= c.costs.verify_time(1, line) + line[1] > c.costs.verify_time(1, line)
    assert sum(p["speculate"] for p in c.history) < 0.3 * len(c.history)
    assert not any(p["speculate"] for p in c.history[-30:])  # fallen back for good, probing rarely


@pytest.mark.parametrize("verify", [cheap_verify, steep_verify, jumpy_verify])
@pytest.mark.parametrize("config", [ControlConfig(), ControlConfig(min_budget=3, max_budget=64)])
def test_precomputed_costs_give_the_definitions(verify, config):
    """Plans read verify times tabulated once per update; they must equal the cost model's, as defined."""
    c = simulate(Controller(config), 40, accept_rate=0.6, verify=verify, draft_per_level=0.002)
    sizes = range(1, config.max_budget + 2)
    assert c.costs.verify_times(len(sizes), c._line) == [c.costs.verify_time(n, c._line) for n in sizes]
    plain = c.costs.verify_time(1, c._line)
    for depth in range(1, config.max_depth + 1):
        saved = sum(c.acceptance_curve()[:depth]) * plain
        within = [
            b for b in range(config.max_budget, config.min_budget, -1) if verify_cost(c, 1 + b) - plain <= saved / 2
        ]
        assert c._widest_budget(depth) == (within[0] if within else config.min_budget)
        size = 1 + min(math.ceil(depth * c.width), c._budget(depth))
        seconds = c.costs.draft_per_level * depth + verify_cost(c, size)
        reach = min(depth, size - 1)  # a tree of n draft nodes reaches depth n at most
        assert c.expected_rate(depth) == (1.0 + sum(c.acceptance_curve()[:reach])) / seconds


def verify_cost(c: Controller, size: int) -> float:
    return c.costs.verify_time(size, c._line)


def test_calibration_measures_overconfident_scores_and_steadies_the_threshold():
    """Scores that promise 1.5x what is accepted: the calibration settles near 2/3 and the threshold stays
    where a node pays its verify cost (an average of per-step ratios swung it to its cap on small trees)."""
    slow = ControlConfig(discount=0.995)  # a long memory (~200 steps), so that one reading is not mostly noise
    c = simulate(Controller(slow), 400, accept_rate=0.5, verify=cheap_verify, draft_per_level=0.002, overconfidence=1.5)
    assert abs(c.calibration - 2 / 3) < 0.15
    thresholds = [p["threshold"] for p in c.history[-100:]]
    assert max(thresholds) < 0.05 and min(thresholds) >= c.config.min_threshold
    well = simulate(Controller(slow), 400, accept_rate=0.5, verify=cheap_verify, draft_per_level=0.002)
    assert c.threshold > well.threshold  # overconfident scores: a node must promise more to be drafted


def test_drafting_cost_limits_depth_not_the_width_of_a_level():
    """Drafting is paid per level (one draft call for all of a level's nodes): a dear draft makes trees
    shallower, while the threshold, which prices one more node, depends on the verify slope only."""
    cheap = simulate(Controller(), 100, accept_rate=0.7, verify=cheap_verify, draft_per_level=0.0005)
    dear = simulate(Controller(), 100, accept_rate=0.7, verify=cheap_verify, draft_per_level=0.015)
    assert dear.best_depth() < cheap.best_depth()
    assert dear.threshold < 2 * cheap.threshold + 1e-3


def test_copy_runs_get_deep_drafts_and_other_steps_stay_shallow():
    """Text being copied (from the prompt or an earlier answer) tends to go on being copied: after a step
    that accepted its whole tree the controller plans from the acceptance measured after such steps."""
    c, gen = Controller(), torch.Generator().manual_seed(0)
    verify = lambda n: 0.040 + 0.002 * n  # noqa: E731 - a node costs 5% of a plain step
    copying = False
    for _ in range(400):
        if torch.rand(1, generator=gen).item() < 0.1:  # runs of ~10 steps of each kind
            copying = not copying
        plan = c.plan()
        if not plan.speculate:
            c.update(plan, 1, 0, 0, 0.0, 0.0, verify(1))
            continue
        rate = 1.0 if copying else 0.3
        depth = min(plan.depth, plan.budget)  # a chain within the plan's node budget
        accepted = 0
        while accepted < depth and torch.rand(1, generator=gen).item() < rate:
            accepted += 1
        promised = depth if copying else 3 * sum(rate**d for d in range(1, depth + 1))  # overconfident
        c.update(plan, 1 + depth, depth, accepted, promised, 0.0002 * depth, verify(1 + depth))
    after_streak = [p["depth"] for p in c.history[100:] if p["speculate"] and p["streak"]]
    otherwise = [p["depth"] for p in c.history[100:] if p["speculate"] and not p["streak"]]
    assert len(after_streak) > 50 and len(otherwise) > 50
    # the first step of each copy run is measured in the other state, so its deep levels pay a little too
    assert min(after_streak) >= 12 and sum(otherwise) / len(otherwise) < 8
    # scores are trusted per state: right after streaks, three times too hopeful otherwise
    calibration = [a / p for a, p in zip(c.accepted_sum, c.promised_sum, strict=True)]
    assert calibration[1] > 0.9 and calibration[0] < 0.6


def test_recovers_when_the_draft_becomes_good():
    c = simulate(Controller(ControlConfig(probe_after=2, max_probe_after=8)), 60, 0.0, cheap_verify, 0.010)
    simulate(c, 100, accept_rate=0.95, verify=cheap_verify, draft_per_level=0.002, seed=1)
    recent = c.history[-20:]
    assert sum(p["speculate"] for p in recent) >= 18


def test_decisions_are_visible_and_output_stays_identical():
    target, draft = tiny_model("llama"), small_draft("llama")
    x = torch.randint(3, VOCAB, (1, 10), generator=torch.Generator().manual_seed(0))
    expected = target.generate(x, max_new_tokens=60, do_sample=False, eos_token_id=None)
    controller = Controller(ControlConfig(warmup_steps=2, probe_after=2))
    out = specdec.generate(
        target,
        x,
        drafter=ModelDrafter(draft),
        controller=controller,
        max_new_tokens=60,
        eos_token_id=None,
        return_dict_in_generate=True,
    )
    assert torch.equal(out.sequences, expected)
    stats = out.spec_stats
    assert len(stats.plans) == len(stats.accept_lengths) and len(stats.thresholds) == len(stats.plans)
    assert stats.fallback_steps > 0  # a random draft is hopeless: the controller decodes plainly most steps


def test_pays_weighs_promised_tokens_against_extra_verify_cost():
    c = Controller()
    assert not c.pays(5, 3.0)  # nothing measured yet
    for size, seconds in [(1, 0.040), (9, 0.048), (17, 0.056)] * 3:  # a = 40 ms, b = 1 ms per node
        c.costs.add_verify(size, seconds)
    c._line = c.costs.verify_line()
    assert c.pays(9, 0.5)  # 0.5 tokens x ~41 ms saved > 8 nodes x ~1 ms
    assert not c.pays(9, 0.1) and not c.pays(1, 5.0)


def test_free_sources_still_draft_while_the_controller_falls_back():
    """Opportunistic drafting: in fallback steps an n-gram hit is verified where it pays; output unchanged."""
    target, draft = tiny_model("llama"), small_draft("llama")
    gen = torch.Generator().manual_seed(0)
    segment = torch.randint(3, VOCAB, (12,), generator=gen)
    x = torch.cat([segment, segment, segment, segment[:4]]).unsqueeze(0)
    expected = target.generate(x, max_new_tokens=40, do_sample=False, eos_token_id=None)

    class StuckInFallback(Controller):
        def plan(self) -> Plan:
            return Plan(False, 0, 0, self.threshold)  # every step is planned plain

    controller = StuckInFallback(ControlConfig(pad_steps=False))  # the hits are the n-gram's, not guesses
    drafter = specdec.drafters.Composite([specdec.drafters.NGramDrafter(), ModelDrafter(draft)])
    out = specdec.generate(
        target, x, drafter=drafter, controller=controller, max_new_tokens=40, eos_token_id=None,
        return_dict_in_generate=True,
    )  # fmt: skip
    assert torch.equal(out.sequences, expected)
    stats = out.spec_stats
    assert stats.fallback_steps == len(stats.plans)
    assert stats.mean_accepted_length > 1.0 and max(stats.tree_sizes) > 1  # hits taken all the same


def test_a_draft_that_ignores_its_budget_and_is_never_accepted_is_soon_left_alone():
    """Like eval/stress.py's Useless: 4-token chains whatever the plan's budget, never accepted, and verification
    that is dear beyond one token (one CPU thread); the 2-3 node size class is never measured."""
    c = Controller()
    for _ in range(300):
        plan = c.plan()
        if plan.speculate:
            c.update(plan, 5, 4, 0, 0.9 + 0.81 + 0.73 + 0.66, 0.001, 0.300)
        else:
            c.update(plan, 1, 0, 0, 0.0, 0.0, 0.060)
    speculative = [p["speculate"] for p in c.history]
    assert sum(speculative[50:]) <= 4  # probes only, backing off
    assert all(c.expected_rate(d) < c.expected_rate(0) for d in range(1, c.config.max_depth + 1))


class _Budget1(_Controller):
    """Always plans a deep tree of at most one draft node."""

    def plan(self) -> Plan:
        return Plan(True, 4, 1, 1e-9)


def test_the_loop_keeps_any_drafters_tree_within_the_plans_budget():
    from eval.stress import Useless  # a source that drafts 4-token chains whatever the budget

    target = tiny_model("llama")
    x = torch.tensor([[5, 6, 7, 8]])
    expected = target.generate(x, max_new_tokens=12, do_sample=False, eos_token_id=None)
    out = specdec.SpeculativeGenerator(target, Useless(VOCAB), _Budget1()).generate(
        x, max_new_tokens=12, eos_token_id=None, return_dict_in_generate=True
    )
    assert out.sequences.tolist() == expected.tolist()
    assert max(out.spec_stats.tree_sizes) == 2


def test_plain_steps_are_padded_only_where_a_few_nodes_were_measured_cheaper_than_one():
    c = Controller(ControlConfig(pad_recheck=1000))
    assert c.pad_width() == 1  # the plain step is not measured yet
    c.costs.add_verify(1, 0.0614)  # SmolLM2 fp32 on this AMD EPYC, 300 cached tokens: 1 .. 8 tokens
    assert c.pad_width() == 2  # each width is tried once
    c.costs.add_verify(2, 0.0539)
    assert c.pad_width() == 4
    c.costs.add_verify(4, 0.0522)
    assert c.pad_width() == 8
    c.costs.add_verify(8, 0.0608)
    assert c.pad_width() == 4  # the cheapest, 15% below a plain step
    for size, seconds in [(3, 0.0649), (6, 0.0588)]:
        c.costs.add_verify(size, seconds)
    c._set_rows(2)
    assert c.pad_width() == 1  # 2 x 2 tokens cost 3% less than 2 x 1: under the margin
    c._set_rows(3)
    assert c.pad_width() == 2  # 3 x 2 tokens cost 9% less than 3 x 1
    c._set_rows(5)
    assert c.pad_width() == 1  # 10 tokens: not measured one by one

    dear = Controller()
    for size, seconds in [(1, 0.040), (2, 0.041), (4, 0.043), (8, 0.047)]:  # a GPU: one token is the cheapest
        dear.costs.add_verify(size, seconds)
    assert dear.pad_width() == 1
    assert Controller(ControlConfig(pad_steps=False)).pad_width() == 1


def test_the_plain_step_is_measured_again_every_pad_recheck_calls():
    c = Controller(ControlConfig(pad_recheck=4))
    for size, seconds in [(1, 0.061), (2, 0.054), (4, 0.052), (8, 0.060)]:
        c.costs.add_verify(size, seconds)
    # calls 2 and 6: widths 2 and 4 measured again, in turn; calls 4 and 8: the plain step
    assert [c.pad_width() for _ in range(8)] == [4, 2, 4, 1, 4, 4, 4, 1]


def test_a_width_measured_dear_once_is_measured_again():
    c = Controller(ControlConfig(pad_recheck=16))
    for size, seconds in [(1, 0.061), (2, 0.066), (4, 0.068), (8, 0.090)]:  # one noisy moment: no width pays
        c.costs.add_verify(size, seconds)
    widths = []
    for _ in range(48):
        widths.append(w := c.pad_width())
        c.costs.add_verify(w, {1: 0.061, 2: 0.054, 4: 0.052, 8: 0.090}[w])  # what they cost now
    # call 8: width 2 measured again, its old time still weighs (60.1 ms, not 5% below a plain step); call 24: width 4,
    # whose old time weighs little after 20 steps, is chosen from then on; call 40: width 8, 48% dearer than a plain
    # step, is not tried again; calls 16, 32, 48: the plain step
    assert "".join(map(str, widths)) == "111111121111111111111114444444414444444444444441"
    assert c.costs.small[4] < 0.055


def test_remeasuring_widths_and_fading_old_times_can_be_switched_off():
    c = Controller(ControlConfig(pad_recheck=4, pad_remeasure=False))
    for size, seconds in [(1, 0.061), (2, 0.054), (4, 0.052), (8, 0.060)]:
        c.costs.add_verify(size, seconds)
    assert [c.pad_width() for _ in range(8)] == [4, 4, 4, 1, 4, 4, 4, 1]  # the earlier behaviour: no width again
    for size, seconds in [(1, 0.061), (2, 0.054), (4, 0.060)]:
        c.costs.add_verify(size, seconds)
    # width 4's time of 7 verifications ago still weighs 1 - ema: nothing fades (with fading, 0.95 ** 6 of that)
    assert c.costs.small[4] == pytest.approx(0.8 * 0.052 + 0.2 * 0.060)


def mkl_verify(n: int) -> float:
    """SmolLM2 fp32 on this AMD EPYC, 300 cached tokens: 1 .. 4 tokens measured, beyond them a line."""
    return {1: 0.0614, 2: 0.0539, 3: 0.0649, 4: 0.0522}.get(n, 0.050 + 0.0015 * n)


def test_speculation_is_judged_against_the_plain_step_as_padded():
    c = Controller(ControlConfig(pad_recheck=1000, pad_fallback=True))
    for size in (1, 2, 4, 8):
        c.costs.add_verify(size, mkl_verify(size))
    c._line = c.costs.verify_line()
    assert c.fallback_rate() == pytest.approx(1 / mkl_verify(4))  # the cheapest width, one token counted
    assert c.fallback_rate() > c.expected_rate(0)
    off = Controller(ControlConfig(pad_fallback=False, pad_recheck=1000))
    for size in (1, 2, 4, 8):
        off.costs.add_verify(size, mkl_verify(size))
    assert off.fallback_rate() == off.expected_rate(0)  # the unpadded plain step, as before
    # and a tree that `pad_size` grows (3 nodes -> 4) is read at the grown size's time, not at its own size class's
    rates = {}
    for pad_fallback in (False, True):
        c = Controller(ControlConfig(pad_recheck=1000, pad_fallback=pad_fallback))
        for size in (1, 2, 3, 4, 8):
            c.costs.add_verify(size, mkl_verify(size))
        c._line, c.width = c.costs.verify_line(), 2.0
        assert c.pad_size(3) == 4
        rates[pad_fallback] = c.expected_rate(1)
        if pad_fallback:  # a generation whose trees are not grown (a streaming source's) reads them as they are
            c.start(grows_trees=False)
            assert c.pad_size(3) == 3 and c.expected_rate(1) == pytest.approx(rates[False])
            c.start()
            assert c.pad_size(3) == 4 and c.expected_rate(1) == pytest.approx(rates[True])
    assert rates[True] * mkl_verify(4) == pytest.approx(1.6)  # 1 + the prior's 0.6 at depth 1, over 52.2 ms
    assert rates[False] < rates[True]  # the same tokens over size 3's class (sizes 2 and 3: 54-65 ms)


def test_speculative_trees_grow_only_to_a_size_measured_cheaper():
    c = Controller(ControlConfig(pad_recheck=1000))
    assert c.pad_size(3) == 3  # nothing measured
    for size, seconds in [(1, 0.0614), (2, 0.0539), (3, 0.0649), (4, 0.0522), (8, 0.0608)]:  # this AMD EPYC, fp32
        c.costs.add_verify(size, seconds)
    assert [c.pad_size(n) for n in (1, 2, 3, 4, 8)] == [4, 2, 4, 4, 8]  # 2 -> 4: 3% cheaper, under the margin
    assert c.pad_size(5) == 5 and c.pad_size(9) == 9  # 5 not measured; 9 beyond the sizes measured one by one
    c.costs.add_verify(5, 0.0700)
    c.costs.add_verify(6, 0.0588)
    assert c.pad_size(5) == 6  # the cheapest measured size above it
    c._set_rows(2)
    assert c.pad_size(3) == 3  # a batch: rows x size tokens, left to `pad_width`
    for config in (ControlConfig(pad_steps=False), ControlConfig(pad_trees=False)):
        off = Controller(config)
        for size, seconds in [(3, 0.0649), (4, 0.0522)]:
            off.costs.add_verify(size, seconds)
        assert off.pad_size(3) == 3


class PaddedSpeculation(_Controller):
    """Every step speculative with at most 2 draft nodes, each tree grown to 6 nodes (not a streaming source's: its
    generations do not grow trees, `start`); what `update` is told is kept."""

    def __init__(self):
        super().__init__()
        self.told = []

    def plan(self, rows: int = 1) -> Plan:
        return Plan(True, 2, 2, 0.0)

    def pad_size(self, size: int) -> int:
        return 6 if self._grows else size

    def update(self, plan, tree_size, tree_depth, accepted, *args, **kwargs) -> None:
        self.told.append((tree_size, tree_depth, accepted))
        super().update(plan, tree_size, tree_depth, accepted, *args, **kwargs)


@pytest.mark.parametrize("arch", ARCHS)
def test_padded_speculative_trees_stay_identical_and_teach_only_what_was_drafted(arch):
    target = tiny_model(arch)
    x = torch.randint(3, VOCAB, (1, 9), generator=torch.Generator().manual_seed(4))
    x = torch.cat([x, x[:, :6]], 1)  # repeats: some guesses are right (with this seed, in every architecture)
    expected = target.generate(x, max_new_tokens=30, do_sample=False, eos_token_id=None)
    controller = PaddedSpeculation()
    out = specdec.generate(
        target, x, drafter=ModelDrafter(target, depth=2, branching=1), controller=controller,
        max_new_tokens=30, eos_token_id=None, return_dict_in_generate=True,
    )  # fmt: skip
    assert torch.equal(out.sequences, expected)
    sizes = [size for size, _, _ in controller.told]
    assert sizes.count(6) >= len(sizes) - 2 and max(sizes) == 6  # the last steps have no room for all of them
    assert [(depth, accepted) for _, depth, accepted in controller.told[:-2]] == [(2, 2)] * (len(sizes) - 2)
    assert max(out.spec_stats.accept_lengths) > 3  # guesses were accepted, and not counted as drafted tokens above


class PaddedFallback(Controller):
    """Every step planned plain, and padded to `width` nodes (as measured costs would have it on some CPUs)."""

    def __init__(self, width: int):
        super().__init__()
        self.width = width

    def plan(self) -> Plan:
        return Plan(False, 0, 0, self.threshold)

    def pad_width(self) -> int:
        return self.width


@pytest.mark.parametrize("arch", ARCHS)
def test_padded_plain_steps_stay_identical_to_plain_decoding(arch):
    target = tiny_model(arch)
    x = torch.randint(3, VOCAB, (1, 9), generator=torch.Generator().manual_seed(1))
    x = torch.cat([x, x[:, :5]], 1)  # repeats: some guesses are right
    expected = target.generate(x, max_new_tokens=30, do_sample=False, eos_token_id=None)
    out = specdec.generate(
        target, x, drafter=ModelDrafter(small_draft(arch)), controller=PaddedFallback(4), max_new_tokens=30,
        eos_token_id=None, return_dict_in_generate=True,
    )  # fmt: skip
    assert torch.equal(out.sequences, expected)
    sizes = out.spec_stats.tree_sizes
    assert sizes.count(4) >= len(sizes) - 3 and max(sizes) == 4  # the last steps have no room for all of them


def test_padding_guesses_what_followed_the_last_token_and_keeps_within_the_room():
    root_only = TokenTree.chain(5)
    tokens = [5, 6, 7, 5, 9, 5]  # 5 last occurred (before now) followed by 9, then 5
    assert _pad(root_only, 4, tokens, max_depth=9).tokens.tolist() == [5, 9, 5, 5]
    assert _pad(root_only, 4, tokens, max_depth=1).tokens.tolist() == [5, 9]  # e.g. one token left before the bonus
    assert _pad(TokenTree.chain(3), 4, [1, 2, 3], max_depth=9).tokens.tolist() == [3, 3, 3, 3]  # never seen: repeated
    tree = TokenTree.trie(5, [[9, 5], [6]])  # 5 | 9 5 | 6: the chain goes below the last node
    padded = _pad(tree, 6, tokens, max_depth=9)
    assert padded.parents.tolist() == [-1, 0, 1, 0, 3, 4] and padded.tokens.tolist()[4:] == [7, 5]
    assert _pad(tree, 3, tokens, max_depth=9) is tree and _pad(tree, 6, tokens, max_depth=1) is tree


def test_the_plain_step_before_a_probe_is_marked_to_prepare_it_unless_switched_off():
    for prepare_probes in (True, False):
        c = _Controller(ControlConfig(prepare_probes=prepare_probes))
        c.plain_left = 2
        assert [c.plan().prepare for _ in range(2)] == [False, prepare_probes]


def _learned(source: str, target):
    from test_eagle import random_head
    from test_medusa import TREE, random_heads
    from test_streams import random_streams

    from specdec.drafters import EagleDrafter, MedusaDrafter, StreamDrafter

    if source == "medusa":
        return MedusaDrafter(random_heads(target, scale=0.5), choices=TREE[:8])
    if source == "eagle":
        return EagleDrafter(random_head(target), depth=2, branching=2, tree_budget=4)
    return StreamDrafter(random_streams(target), TREE[:8])


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("source", ["medusa", "eagle", "streams"])
@pytest.mark.parametrize("padded", ["trees", "plain"])
def test_padding_keeps_learned_sources_identical(source, padded, arch):
    """Medusa heads, an EAGLE head (its own cache follows the accepted guesses) and speculative streaming, with every
    speculative tree grown by guesses (streams: not grown), or every step plain and padded to 4 nodes."""
    target = tiny_model(arch)
    x = torch.randint(3, VOCAB, (1, 9), generator=torch.Generator().manual_seed(4))
    x = torch.cat([x, x[:, :6]], 1)  # repeats: some guesses are right
    expected = target.generate(x, max_new_tokens=30, do_sample=False, eos_token_id=None)
    controller = PaddedSpeculation() if padded == "trees" else PaddedFallback(4)
    out = specdec.generate(
        target, x, drafter=_learned(source, target), controller=controller, max_new_tokens=30, eos_token_id=None,
        return_dict_in_generate=True,
    )  # fmt: skip
    assert torch.equal(out.sequences, expected)
    sizes = out.spec_stats.tree_sizes
    if source == "streams" and padded == "trees":  # a step that scores streams is not padded: they are its extra tokens
        assert 6 not in sizes
    else:
        assert sizes.count(6 if padded == "trees" else 4) >= len(sizes) // 2  # padded: a step is grown to that size
