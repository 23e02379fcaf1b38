"""Adaptive speculation: how deep and wide to draft, when to stop a branch, and when not to draft at all.

One controller serves every draft source. It keeps a small explicit model, updated after every step:

- costs: verification time as a function of tree size: the measured time of recent trees of the same
  size class (sizes within a factor of two: 1, 2-3, 4-7, ...), moved along the slope `b` of a line
  `a + b * n` fitted to all recent steps (ridge least squares, pulled towards a flat prior while sizes
  barely vary); a class not measured yet is interpolated between the measured classes around it, or read
  off the line beyond them. Matrix kernels are not linear in the number
  of tokens (on CPUs, fp32 steps jump where a kernel changes), so a line alone misjudges the plain step
  that every speculative step competes with. A tree never costs less than a smaller class was measured to
  cost plus `b` per extra node: classes measured at other times (after a longer or shorter prompt: the
  plain step is not measured again while speculating) or in a noisy step can say otherwise, and a 2-node
  tree of a draft that is never accepted then looks as if it paid. Drafting costs `c` per draft level.
- value: `R[d]`, the measured probability that the accepted path reaches depth `d` when the tree did
  (per depth, discounted counts with a weak prior, so that a few unlucky steps do not end speculation; the
  prior fades with the same discount, so that a source that is never accepted is measured as such, not as the
  prior's floor of a few percent per depth, which made useless drafts look worth a slightly larger tree);
  a step of depth `D` yields `E(D) = 1 + sum(R[1..D])` tokens. `R` is kept twice: after a step whose
  accepted path reached its tree's deepest level (a streak: text being copied, from the prompt or an
  earlier answer, tends to go on being copied) and after any other step, so that copy runs get deep
  drafts without making every other step deep. The calibration below is kept per state too.

From it, each step gets a `Plan`:

- depth `D*` maximising expected tokens per second `E(D) / (c * D + verify(size(D)))`, plus one level
  so that the next depth keeps being measured (the threshold still cuts branches that do not pay);
- a confidence threshold: the path probability at which a node's expected value (probability x time per
  token) no longer pays its marginal verify cost `b` (drafting is paid per level, and the depth already
  weighs it); draft sources stop extending a branch below it, so cheap verification and a well-calibrated
  draft give wider, deeper trees. Node probabilities are scaled by a calibration: accepted draft tokens /
  the tokens the trees' scores promised, both summed over recent steps (discounted, with a prior);
- a node budget: the widest tree whose extra verification cost stays under half the time the expected
  accepted tokens save (every fourth step half of it, so that the cost slope `b` stays measurable);
- fallback: when the best expected rate is below plain decoding's, plain steps are taken, and
  speculation is probed again after `probe_after` steps, doubling (up to `max_probe_after`) while it
  keeps not paying; a new generation probes within `probe_after` steps and keeps half the back-off. Where
  probes are dear (a draft model re-reads the prompt and the tokens it missed: its catch-up), they are spaced
  so that a failed one costs at most `probe_share` of the plain steps before it (`probe_gap`);
- padding (`pad_width`): verify times are also kept per exact size up to 8 tokens, and where a plain step's
  `rows` tokens were measured dearer than `rows` x 2, 4 or 8 (MKL's one-vector kernels on some CPUs), a plain
  step verifies that many guessed tokens per row instead: faster, and now and then a guess is right; a
  speculative tree of one prompt is grown the same way to the cheapest size above it measured cheaper
  (`pad_size`), what the controller learns being the drafted nodes' acceptance, not the guesses'.
"""

from __future__ import annotations

import bisect
import itertools
import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

from specdec import distributed


@dataclass(frozen=True)
class ControlConfig:
    """Controller defaults; mirrored by the Hydra group `conf/control/`."""

    max_depth: int = 16  # deepest plan
    min_budget: int = 1  # draft nodes
    max_budget: int = 32
    initial_threshold: float = 0.05  # path probability, before anything is measured
    min_threshold: float = 0.002
    max_threshold: float = 0.5
    prior_acceptance: float = 0.6  # conditional acceptance per depth assumed before measuring it
    prior_weight: float = 2.0  # pseudo-steps behind that prior (and behind a calibration of 1)
    discount: float = 0.95  # acceptance counts fade by this per step (an effective window of ~20 steps)
    ema: float = 0.2  # weight of the newest cost and width measurement
    min_speedup: float = 1.0  # speculate only when the expected rate beats plain decoding by this factor
    warmup_steps: int = 4  # speculative steps measured before the first fallback decision
    probe_after: int = 8  # plain steps before speculation is probed again
    max_probe_after: int = 128
    probe_share: float = 0.05  # a failed probe's extra cost stays under this share of the plain steps before it
    cost_window: int = 64  # recent (tree size, verify time) pairs used for the cost fit
    pad_steps: bool = True  # verify at least `pad_width()` nodes where a few nodes were measured cheaper than one
    pad_max: int = 8  # widest padding tried (2, 4, ... up to it, each once against a plain step; at most 8)
    pad_margin: float = 0.05  # pad only where the width is measured at least this much cheaper than one node
    pad_recheck: int = 16  # every this many steps one goes unpadded, so that the plain step stays measured
    pad_trees: bool = True  # with `pad_steps`: grow a speculative tree to a size measured cheaper (`pad_size`)
    pad_remeasure: bool = True  # with `pad_steps`: measure a width again now and then; older exact-size times fade
    pad_fallback: bool = True  # with `pad_steps`: speculation and fallback read at the cost of their padded steps
    prepare_probes: bool = True  # the plain step before a probe asks a streaming source for streams (`Plan.prepare`)


@dataclass(frozen=True)
class Plan:
    """What the next step may draft. `speculate=False` means a plain target step; `streak`: the plan was made
    after a step that accepted its tree's deepest level; `prepare`: a plain step whose next step probes speculation
    again (a source that drafts from this step's forward, speculative streaming, asks for its streams in it:
    otherwise its probe would have nothing to draft from, and would teach the controller nothing)."""

    speculate: bool
    depth: int
    budget: int
    threshold: float
    streak: bool = False
    prepare: bool = False


ROW_PRIOR = 4  # pseudo-steps at the batch's mean behind each row's own mean acceptance (`Controller.spread`)
SMALL = 8  # tree sizes measured one by one (`CostModel.small`): where padding a step can pay


@dataclass
class CostModel:
    """Verify time per tree size from measured (n, seconds) pairs, and the draft cost per level `c`."""

    window: int
    ema: float
    samples: deque = field(default_factory=deque)
    draft_per_level: float | None = None
    classes: dict[int, tuple[float, float]] = field(default_factory=dict)  # size class -> (mean size, seconds)
    small: dict[int, float] = field(default_factory=dict)  # exact sizes up to `SMALL` nodes -> seconds (EMA)
    small_at: dict[int, int] = field(default_factory=dict)  # exact size -> `measured` when it was last measured
    measured: int = 0  # verifications recorded
    age_discount: float = 0.95  # an exact size's old time weighs this much less per verification since (`discount`)

    def add_verify(self, size: int, seconds: float) -> None:
        self.samples.append((size, seconds))
        self.measured += 1
        if size <= SMALL:  # an old time weighs less the older it is: the context, and the machine, moved on since
            old_small, age = self.small.get(size), self.measured - self.small_at.get(size, self.measured) - 1
            keep = 0.0 if old_small is None else (1 - self.ema) * self.age_discount**age
            self.small[size] = keep * (old_small or 0.0) + (1 - keep) * seconds
            self.small_at[size] = self.measured
        while len(self.samples) > self.window:
            self.samples.popleft()
        key, old = size.bit_length(), self.classes.get(size.bit_length())
        if old is None:
            self.classes[key] = (float(size), seconds)
        else:  # recent steps weigh more: the context, and with it attention's cost, grows
            keep, new = 1 - self.ema, self.ema
            self.classes[key] = (keep * old[0] + new * size, keep * old[1] + new * seconds)

    def verify_time(self, size: int, line: tuple[float, float]) -> float:
        """Expected seconds to verify a tree of `size` nodes: its size class's measured time, moved along the
        line's slope to `size`. Where the class was not measured: between two measured classes, interpolated
        between their mean sizes and times (verification cost grows about linearly between kernel changes, and the
        line, fitted mostly to plain steps, can miss a steep slope); beyond them, the line. Never less than a
        smaller class was measured to cost, plus the line's marginal cost of the extra nodes (bigger trees do not
        verify faster), whether its own class was measured or not."""
        return self._time(size, line)

    def verify_times(self, max_size: int, line: tuple[float, float]) -> list[float]:
        """`[verify_time(n, line) for n in 1 .. max_size]`, the measured classes around each size read once."""
        neighbours = {key: self._neighbours(key) for key in range(1, max_size.bit_length() + 1)}
        return [self._time(size, line, neighbours[size.bit_length()]) for size in range(1, max_size + 1)]

    def _time(self, size: int, line: tuple[float, float], neighbours: tuple | None = None) -> float:
        """`verify_time`; `neighbours`: `_neighbours` of the size's class, when the caller has read them."""
        neighbours = neighbours or self._neighbours(size.bit_length())
        measured = self.classes.get(size.bit_length())
        if measured is None:
            return self._unmeasured(size, line, neighbours)
        mean_size, seconds = measured
        # classes measured at other times (another context length, a noisy step) can say a tree costs less than a
        # smaller one: it does not, and a useless draft must not look as if it paid
        return max(seconds + line[1] * (size - mean_size), _above(neighbours[2], size, line), 1e-9)

    def _neighbours(self, key: int) -> tuple[tuple | None, tuple | None, tuple | None]:
        """The nearest measured classes below and above size class `key`, and the dearest measured class below it
        (each as (mean size, seconds))."""
        lower = [k for k in self.classes if k < key]
        upper = [k for k in self.classes if k > key]
        dearest = max((self.classes[k] for k in lower), key=lambda c: c[1], default=None)
        return (self.classes[max(lower)] if lower else None, self.classes[min(upper)] if upper else None, dearest)

    @staticmethod
    def _unmeasured(size: int, line: tuple[float, float], neighbours: tuple) -> float:
        below, above, dearest = neighbours
        if below is not None and above is not None and above[0] > below[0]:
            (s0, t0), (s1, t1) = below, above
            estimate = t0 + (t1 - t0) * (size - s0) / (s1 - s0)
        else:
            estimate = line[0] + line[1] * size
        return max(estimate, _above(dearest, size, line))

    def add_draft(self, levels: int, seconds: float) -> None:
        if levels > 0:
            per_level = seconds / levels
            old = self.draft_per_level
            self.draft_per_level = per_level if old is None else (1 - self.ema) * old + self.ema * per_level

    def verify_line(self) -> tuple[float, float]:
        """(a, b): ridge fit pulling the slope towards a flat prior `b0 = a / 64` (batching is nearly free)."""
        n = len(self.samples)
        if n == 0:
            return 0.0, 0.0
        xs, ys = [s for s, _ in self.samples], [t for _, t in self.samples]
        mx, my = sum(xs) / n, sum(ys) / n
        b0 = max(my, 1e-9) / 64
        lam = n * 4.0  # prior weight in units of squared tree size
        sxx = sum((x - mx) ** 2 for x in xs)
        sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True))
        b = max((sxy + lam * b0) / (sxx + lam), 0.0)
        a = max(my - b * mx, 1e-9)
        return a, b


class Controller:
    """Adaptive depth, node budget and confidence threshold, with fallback to plain decoding.

    Use: `controller.start()` before each generation, `plan = controller.plan()` before drafting,
    `controller.update(...)` after verification. What it learns (costs, acceptance, calibration) carries across
    generations; what belongs to one text (the streak, the fallback countdown) starts afresh with each. Its
    memory is bounded: counts per depth and a window of recent costs, nothing per step.
    """

    def __init__(self, config: ControlConfig | None = None):
        self.config = config or ControlConfig()
        self.reset()

    def reset(self) -> None:
        cfg = self.config
        fade = cfg.discount if cfg.pad_remeasure else 1.0
        self.costs = CostModel(window=cfg.cost_window, ema=cfg.ema, age_discount=fade)
        # per streak state (0: the last step was rejected inside its tree or was plain; 1: it accepted its
        # tree's deepest level), discounted counts: accepted path reached depth d out of steps whose tree did
        self.hits = [[0.0] * (cfg.max_depth + 1) for _ in range(2)]  # index 0 unused
        self.trials = [[0.0] * (cfg.max_depth + 1) for _ in range(2)]
        self.prior = [cfg.prior_weight, cfg.prior_weight]  # pseudo-steps behind prior_acceptance, fading
        self.streak = 0
        self.width = 1.0  # draft nodes per level of recent trees
        self.accepted_sum = [0.0, 0.0]  # per streak state, discounted, over steps with scored trees
        self.promised_sum = [0.0, 0.0]
        self.threshold = cfg.initial_threshold
        self._line = (0.0, 0.0)  # verify_line() and acceptance_curve() as of the last update
        self._curves = [self._acceptance_curve(s) for s in range(2)]
        self._gains = [_prefix_sums(curve) for curve in self._curves]  # [d]: sum(curve[:d])
        self._verify: list[float] | None = None  # verify time of 1 .. max_budget + 1 nodes, as of the last update
        self._floor: list[float] = []  # [b]: least extra verify time of any budget >= b, as of the last update
        self._budgets: dict[int, int] = {}  # _budget(depth) as of the last update
        self._best: int | None = None  # best_depth() as of the last update
        self.speculative_steps = 0
        self.plain_left = 0  # plain steps before the next probe
        self.backoff = cfg.probe_after
        self.probe_cost = 0.0  # seconds a probe adds to a plain step: catch-up, drafting, the tree's extra verify
        self._planned_plain = True  # the last step was plain: the next speculative one is a probe
        self.rows = 1  # rows of the batch being planned for
        self._pad_calls = 0
        self._grows = True  # speculative trees may be grown (`pad_size`): `start`'s `grows_trees`
        self._row_accepted: dict[int, list[float]] = {}  # per row of this generation's batch: [accepted, steps]
        self.spread = 1.0  # the batch's least-accepting running row's gain over the mean row's (`update_batch`)

    def start(self, grows_trees: bool = True) -> None:
        """A new generation: no streak, and speculation probed again within `probe_after` plain steps (a new
        text may draft better than the last one did), or within `probe_gap()` where probes are dear; costs and
        acceptance stay learnt, and so does half the back-off: where the probe fails again, the probes after it
        stay rare (each costs a tree's verification). `grows_trees=False`: this generation's speculative trees are
        not grown by `pad_size` (a streaming source's steps score streams after the tree, and are verified as they
        are), so the plan must not read them at a grown size's time."""
        if grows_trees != self._grows:  # the plan's tables read trees at their grown sizes, or not
            self._grows, self._budgets, self._best = grows_trees, {}, None
        self.streak = 0
        self._row_accepted, self.spread = {}, 1.0
        self.plain_left = min(self.plain_left, max(self.config.probe_after, self.probe_gap()))
        self.backoff = max(self.config.probe_after, self.backoff // 2)

    def probe_gap(self) -> int:
        """Plain steps that a failed probe needs before it, so that its extra cost stays under `probe_share` of their
        time (at most `max_probe_after`). A draft model re-reads the prompt and every token since its last draft
        (its catch-up) and drafts its levels: where that costs two plain steps, it probes after 40 plain steps
        rather than 8 (the shipped draft on SmolLM2, fp32 on a 2-core CPU: 23-33 ms, half a step, so 9-14); an
        n-gram source's probe costs little more than its tree."""
        plain = self.plain_step_time()
        if not plain or self.probe_cost <= 0:
            return 0
        gap = self.probe_cost / (self.config.probe_share * plain * self.rows)
        return min(math.ceil(gap), self.config.max_probe_after)

    # ---------------------------------------------------------------- the model

    @property
    def calibration(self) -> float:
        """Accepted draft tokens per token the trees' scores promised, over recent steps in the current streak
        state (1 before any)."""
        prior = self.config.prior_weight
        return (self.accepted_sum[self.streak] + prior) / (self.promised_sum[self.streak] + prior)

    def acceptance_curve(self) -> list[float]:
        """`R[1..max_depth]` in the current streak state."""
        return self._curves[self.streak]

    def _acceptance_curve(self, streak: int) -> list[float]:
        """`R[d]` for d = 1..max_depth: discounted hit counts with a weak prior where depth d was drafted;
        beyond the deepest drafted depth, continued at the mean (geometric) per-level rate."""
        cfg = self.config
        hits, trials, weight = self.hits[streak], self.trials[streak], self.prior[streak]
        curve: list[float] = []
        rate = cfg.prior_acceptance
        for d in range(1, cfg.max_depth + 1):
            if trials[d] > 0:
                prior = cfg.prior_acceptance**d
                value = (hits[d] + weight * prior) / (trials[d] + weight)
                rate = max(value, 1e-9) ** (1 / d)
            else:
                value = (curve[-1] if curve else 1.0) * rate
            curve.append(min(value, curve[-1] if curve else 1.0))  # reaching d implies reaching d - 1
        return curve

    def expected_rate(self, depth: int) -> float:
        """Expected tokens per second of a step drafting `depth` levels (depth 0: plain decoding), for the
        batch of `rows` rows being planned for: every row drafts (one after the other) and gains tokens. A tree of
        `n` draft nodes reaches depth `n` at most: when the node budget is below `depth`, only the depths the
        budget can reach count. With `pad_fallback` a tree that `pad_size` grows is read at the grown size's measured
        time, as `fallback_rate` reads the plain step at its padded width's."""
        size = 1 + min(math.ceil(depth * self.width), self._budget(depth)) if depth else 1
        spread = self.spread if self.rows > 1 else 1.0  # a batch runs until its slowest row is done
        tokens = self.rows * (1.0 + spread * self._gains[self.streak][min(depth, size - 1)])
        verify = self._verify_times()[size - 1]
        if depth and self.config.pad_fallback and (grown := self.pad_size(size)) != size:
            verify = self.costs.small[grown]  # `pad_size` grows the tree to a size measured cheaper: what it costs
        seconds = (self.costs.draft_per_level or 0.0) * depth * self.rows + verify
        return tokens / max(seconds, 1e-9)

    def _verify_times(self) -> list[float]:
        """`costs.verify_time(rows * n)` for n = 1 .. max_budget + 1 (every tree size a plan can ask for: a step
        scores `rows` trees of that size), computed once per update: each plan weighs every depth, and each depth
        every budget."""
        if self._verify is None:
            rows = self.rows
            times = self.costs.verify_times(rows * (self.config.max_budget + 1), self._line)
            self._verify = times[rows - 1 :: rows]
            plain = self._verify[0]
            self._floor = list(itertools.accumulate((t - plain for t in reversed(self._verify)), min))[::-1]
        return self._verify

    def plain_step_time(self) -> float | None:
        """Seconds of one plain target step by the cost model, per row of the batch planned for (None before any
        measurement): what one row's accepted draft token saves."""
        if not self.costs.samples:
            return None
        return self.costs.verify_time(self.rows, self._line) / self.rows

    def pad_width(self) -> int:
        """Nodes each row's tree should have at least in a plain step (1 without `pad_steps`): a width `w` of 2, 4
        or 8 whose step (`rows * w` tokens, at most 8) was measured at least `pad_margin` cheaper to verify than
        the plain step's `rows` tokens, the cheapest such. On some CPUs a forward of one token is dearer than of a
        few (MKL on this AMD EPYC: SmolLM2's LM head, a matrix times one vector, takes 10.6 ms for one token, 17.8
        for three and 8.1 for four), so a plain step is better spent verifying a few guessed tokens. Each width is
        tried once after the plain step was measured, and every `pad_recheck`-th call answers 1, so that the plain
        step goes on being measured. Halfway between those calls a width is measured again, each in turn, unless it
        was measured 25% dearer than a plain step or more: a width measured once in a noisy step, or at another context
        length, would otherwise never be chosen again while the plain step's time moves on (seen on Spec-Bench's
        rag questions: a whole run of long prompts without padding after one dear measurement)."""
        cfg, rows, small = self.config, self.rows, self.costs.small
        if not cfg.pad_steps or rows * 2 > SMALL:
            return 1
        self._pad_calls += 1
        if rows not in small or self._pad_calls % cfg.pad_recheck == 0:
            return 1
        widths = self._pad_widths()
        untried = [w for w in widths if rows * w not in small]
        if untried:
            return untried[0]
        again_now = cfg.pad_remeasure and self._pad_calls % cfg.pad_recheck == cfg.pad_recheck // 2
        if widths and again_now:  # one width again, in turn
            again = widths[(self._pad_calls // cfg.pad_recheck) % len(widths)]
            if small[rows * again] < 1.25 * small[rows]:  # not clearly dearer than a plain step: worth a look
                return again
        return self._cheapest_width(widths)

    def _pad_widths(self) -> list[int]:
        """Padding widths a plain step may take: 2, 4 and 8 nodes per row, up to `pad_max` and `SMALL` tokens in all."""
        return [w for w in (2, 4, 8) if w <= self.config.pad_max and self.rows * w <= SMALL]

    def _cheapest_width(self, widths: list[int]) -> int:
        """Of measured padding `widths`, the cheapest for `rows` rows if measured at least `pad_margin` below the plain
        step (measured too); else 1."""
        rows, small = self.rows, self.costs.small
        best = min(widths, key=lambda w: (small[rows * w], w), default=1)
        return best if best > 1 and small[rows * best] <= (1 - self.config.pad_margin) * small[rows] else 1

    def pad_size(self, size: int) -> int:
        """Nodes a speculative tree of `size` nodes (one row) should be grown to: the cheapest size above it, up to
        `pad_max`, measured at least `pad_margin` cheaper to verify than `size` itself (on this AMD EPYC in fp32 a
        tree of 3 nodes takes 65 ms and one of 4 takes 52); `size` where none was, or `size` was not measured, or
        in a batch, or in a generation whose trees are not grown (`start`). Only measured sizes count: a tree is
        never grown to explore, and the size it is grown to goes on being measured."""
        cfg, small = self.config, self.costs.small
        if not (cfg.pad_steps and cfg.pad_trees and self._grows) or self.rows != 1 or size not in small:
            return size
        best = min(
            (m for m in range(size + 1, cfg.pad_max + 1) if m in small), key=lambda m: (small[m], m), default=size
        )
        return best if small[best] <= (1 - cfg.pad_margin) * small[size] else size

    def fallback_rate(self) -> float:
        """Tokens per second of the plain steps that a fallback would run: `expected_rate(0)`, or with `pad_fallback`
        one token per row at the cheapest measured padding width (`pad_width`'s choice without its rechecks), its
        guessed tokens not counted. Where a padded step is cheaper than one of a single token (this AMD EPYC), a plain
        step is what speculation competes with: judged against the dearer unpadded step, a draft source that gains
        fewer tokens than its tree costs over a padded step (EAGLE, the draft model on Spec-Bench's rag) went on
        speculating and lost to a source that drafts nothing."""
        cfg, rows, small = self.config, self.rows, self.costs.small
        plain = self.expected_rate(0)
        if not (cfg.pad_steps and cfg.pad_fallback) or rows * 2 > SMALL or rows not in small:
            return plain
        width = self._cheapest_width([w for w in self._pad_widths() if rows * w in small])
        return max(plain, rows / small[rows * width]) if width > 1 else plain

    def pays(self, tree_size: int, expected_gain: float) -> bool:
        """Whether verifying trees of `tree_size` nodes (root included; in a batch, the largest tree, to which
        every row is padded) instead of a plain step is expected to gain time: the tokens they promise
        (`expected_gain`, all rows together, scaled by the measured calibration) save more plain steps than
        their extra nodes cost."""
        plain = self.plain_step_time()
        if tree_size <= 1 or plain is None:
            return False
        extra = self.costs.verify_time(self.rows * tree_size, self._line) - plain * self.rows
        return expected_gain * self.calibration * plain > extra

    def best_depth(self) -> int:
        if self._best is None:
            self._best = max(range(1, self.config.max_depth + 1), key=self.expected_rate)
        return self._best

    # ---------------------------------------------------------------- decisions

    def plan(self, rows: int = 1) -> Plan:
        """The next step's plan, for a batch of `rows` rows: one verification scores `rows` trees (each padded
        to the largest), so its cost is read at `rows` times the tree size, and trees shrink as the batch grows.
        """
        cfg = self.config
        self._set_rows(rows)
        streak = bool(self.streak)
        if self.plain_left > 0:
            self.plain_left -= 1
            return Plan(False, 0, 0, self.threshold, streak, prepare=cfg.prepare_probes and self.plain_left == 0)
        if rows.bit_length() not in self.costs.classes:  # a plain step first: what speculation competes with
            return Plan(False, 0, 0, self.threshold, streak)
        if len(self.costs.classes) < 2:  # no tree measured yet: the drafter's own settings, capped (in a batch, so
            # that all rows together draft at most `max_budget` nodes: a first probe of rows x 33 tokens is dear)
            return Plan(True, cfg.max_depth, max(cfg.max_budget // rows, cfg.min_budget), self.threshold, streak)
        depth = self.best_depth()
        budget = self._budget(depth)
        if self.speculative_steps % 4 == 3:  # cost probing: a smaller tree now and then, so the slope b is measurable
            budget = max(min(budget, math.ceil(depth * self.width)) // 2, 1)
        # one level beyond the optimum keeps the next depth measured; the threshold still cuts weak branches
        return Plan(True, min(depth + 1, cfg.max_depth), budget, self.threshold, streak)

    def _set_rows(self, rows: int) -> None:
        if rows < 1:
            raise ValueError(f"a plan is for at least one row, got {rows}")
        if rows != self.rows:  # the tables below are for a batch of `self.rows`
            self.rows, self._budgets, self._best, self._verify = rows, {}, None, None
            self._verify_times()

    def _budget(self, depth: int) -> int:
        """Widest tree whose extra verify cost stays under half the time its expected tokens save."""
        if depth not in self._budgets:
            self._budgets[depth] = self._widest_budget(depth)
        return self._budgets[depth]

    def _widest_budget(self, depth: int) -> int:
        plain = self._verify_times()[0]
        saved = self._gains[self.streak][depth] * plain  # each accepted token saves about a plain step
        # the largest budget whose extra verify time is at most half of it: `_floor` is non-decreasing, and its
        # last entry within that limit is the last budget within it
        widest = bisect.bisect_right(self._floor, 0.5 * saved) - 1
        return max(widest, self.config.min_budget)

    def _update_threshold(self) -> None:
        """The path probability below which a node's expected value does not pay its marginal cost."""
        cfg = self.config
        seconds_per_token = 1.0 / max(self.expected_rate(self.best_depth()), 1e-9)
        threshold = self._line[1] / (seconds_per_token * max(self.calibration, 1e-3))
        self.threshold = min(max(threshold, cfg.min_threshold), cfg.max_threshold)

    def update(
        self,
        plan: Plan,
        tree_size: int,
        tree_depth: int,
        accepted: int,
        promised: float,
        draft_seconds: float,
        verify_seconds: float,
        catchup_seconds: float = 0.0,
    ) -> None:
        """Record one verification step of a single row.

        Args:
            plan: the plan the step followed.
            tree_size: nodes verified (root included); tree_depth: its depth.
            accepted: draft tokens accepted (bonus token not counted).
            promised: the tree's own expected accepted tokens (sum of node probabilities), 0 if unscored.
            draft_seconds: drafting time; verify_seconds: the rest of the step (the verification forward, acceptance,
                cache compaction, the drafter's commit), which grows with the tree as the forward does.
                Within `specdec.distributed.lockstep` both are rank 0's, so that every rank plans the same.
            catchup_seconds: the drafter's catch-up in this step (not in `draft_seconds`): re-reading the tokens
                accepted since it last drafted; charged to probes, after which it is large.
        """
        row = [(tree_size, tree_depth, accepted, promised)]
        self.update_batch(plan, tree_size, row, draft_seconds, verify_seconds, catchup_seconds)

    def update_batch(
        self,
        plan: Plan,
        slots: int,
        rows: list[tuple[int, int, int, float]],
        draft_seconds: float,
        verify_seconds: float,
        catchup_seconds: float = 0.0,
        row_ids: Sequence[int] | None = None,
    ) -> None:
        """Record one verification step of a batch (`update` is the one-row case).

        Args:
            plan: the plan the step followed.
            slots: tokens the verification forward scored (rows x the largest tree, root included).
            rows: per row, `(tree_size, tree_depth, accepted, promised)` as in `update`.
            draft_seconds: every row's drafting time together; verify_seconds: the rest of the step;
                catchup_seconds: every row's catch-up, as in `update`.
            row_ids: each of `rows`' place in the batch, to follow each row's acceptance through the generation:
                a batch lasts as long as its slowest row, so `expected_rate` counts the gains of a batch step at
                what its least-accepting running row gains (`spread` x the mean row's gain). On SmolLM2 (2-core
                AMD EPYC, fp32) the rows of a batch of 4 accepted 1.20-1.41 tokens a step on average, and with
                speculation judged by the mean row, batches of 4 and 16 ran at 0.93-0.97x `target.generate`.
        """
        draft_seconds, verify_seconds, catchup_seconds = distributed.rank_zero(
            draft_seconds, verify_seconds, catchup_seconds
        )
        cfg, ema = self.config, self.config.ema
        self._budgets, self._best, self._verify = {}, None, None  # the measurements below change them
        self.costs.add_verify(slots, verify_seconds)
        self._line = self.costs.verify_line()
        self._verify_times()  # now rather than at the next plan: the controller's size stays the same between steps
        scored = [(accepted, promised) for _, _, accepted, promised in rows if promised > 0]
        if scored:  # speculative and opportunistic steps alike: how far the trees' scores can be trusted
            s = self.streak
            self.accepted_sum[s] = cfg.discount * self.accepted_sum[s] + sum(a for a, _ in scored)
            self.promised_sum[s] = cfg.discount * self.promised_sum[s] + sum(p for _, p in scored)
        probe, self._planned_plain = self._planned_plain and plan.speculate, not plan.speculate
        if probe:  # what it added to a plain step: the catch-up after the plain steps, drafting, a larger forward
            extra = catchup_seconds + draft_seconds + max(verify_seconds - self._verify_times()[0], 0.0)
            self.probe_cost = extra if self.probe_cost == 0 else (1 - ema) * self.probe_cost + ema * extra
        if not plan.speculate:  # a plain step: what speculation learnt before it fades (a probe after a long
            # fallback is judged on what it finds, not outweighed by the steps that led to the fallback)
            self.streak = 0
            self._fade(0)
            self._refresh(0)
            return
        if row_ids is not None:
            self._follow_rows(row_ids, [accepted for _, _, accepted, _ in rows])
        self.costs.add_draft(max(depth for _, depth, _, _ in rows), draft_seconds / len(rows))
        self.speculative_steps += 1
        self._fade(self.streak)  # the state the plan was made in
        hits, trials = self.hits[self.streak], self.trials[self.streak]
        for d in range(1, cfg.max_depth + 1):
            for _, tree_depth, accepted, _ in rows:
                if d <= tree_depth:
                    hits[d] += accepted >= d
                    trials[d] += 1
        self._refresh(self.streak)
        full = sum(tree_depth > 0 and accepted >= tree_depth for _, tree_depth, accepted, _ in rows)
        self.streak = int(2 * full > len(rows))  # most rows accepted their tree's deepest level
        drafted = [(size - 1) / depth for size, depth, _, _ in rows if depth > 0]
        if drafted:
            self.width = (1 - ema) * self.width + ema * sum(drafted) / len(drafted)
        self._update_threshold()
        self._decide_fallback()

    def _follow_rows(self, row_ids: Sequence[int], accepted: list[int]) -> None:
        """Each running row's mean accepted draft tokens per speculative step so far, and `spread`: the least of
        them over their average (1 while no row has accepted anything). A row's mean starts from `ROW_PRIOR` steps
        at the batch's mean, so that one unlucky first step does not make a row look hopeless."""
        for row, count in zip(row_ids, accepted, strict=True):
            tally = self._row_accepted.setdefault(row, [0.0, 0.0])
            tally[0] += count
            tally[1] += 1
        tallies = [self._row_accepted[row] for row in row_ids]
        batch = sum(a for a, _ in tallies) / sum(n for _, n in tallies)
        means = [(a + ROW_PRIOR * batch) / (n + ROW_PRIOR) for a, n in tallies]
        self.spread = min(means) / batch if batch > 0 else 1.0

    def _fade(self, streak: int) -> None:
        """One step older: streak state `streak`'s acceptance counts and its prior weigh `discount` times less."""
        discount = self.config.discount
        self.hits[streak] = [h * discount for h in self.hits[streak]]
        self.trials[streak] = [t * discount for t in self.trials[streak]]
        self.prior[streak] *= discount

    def _refresh(self, streak: int) -> None:
        """Streak state `streak`'s acceptance curve and its prefix sums, after its counts changed."""
        self._curves[streak] = self._acceptance_curve(streak)
        self._gains[streak] = _prefix_sums(self._curves[streak])

    def _decide_fallback(self) -> None:
        cfg = self.config
        if self.speculative_steps < cfg.warmup_steps:
            return
        if self.expected_rate(self.best_depth()) < cfg.min_speedup * self.fallback_rate():
            self.plain_left = max(self.backoff, self.probe_gap())  # dear probes stay rare from the first fallback
            self.backoff = min(self.backoff * 2, cfg.max_probe_after)
        else:
            self.backoff = cfg.probe_after


def _above(smaller: tuple[float, float] | None, size: int, line: tuple[float, float]) -> float:
    """The least a tree of `size` nodes can cost, given a measured class of smaller trees (mean size, seconds): its
    time and the line's marginal cost of the extra nodes (0 without such a class)."""
    return 0.0 if smaller is None else smaller[1] + line[1] * max(size - smaller[0], 0.0)


def _prefix_sums(values: list[float]) -> list[float]:
    """`[sum(values[:d]) for d in range(len(values) + 1)]`, summed in the same order."""
    return list(itertools.accumulate(values, initial=0.0))
