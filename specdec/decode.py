"""The decoding loops: propose, verify, accept, keep the cache, commit; for one prompt and for a batch.

One step: the drafter proposes a token tree rooted at the last token, the target scores every node in
one forward, the acceptance rule keeps the longest matching path plus a bonus token, the target's cache
keeps the accepted path's entries, and the drafter rolls forward. Invariant between steps: the target's
cache holds every token but the last one (the next tree's root).

A batch runs the same step for every row at once: each row drafts its own tree (its own drafter, a
`Drafter.fork`), one target forward scores all trees (a 4D mask and position ids per row), each row accepts
its own path, so rows advance by different amounts (`kv.RowCache` keeps track of which slot holds which
row's tokens), and a row that has finished leaves the batch (at once, or when leaving pays: `_keep_finished`).
The single-prompt loop is kept apart: it needs no holes, no per-row bookkeeping, and no mask for chains, and is
exactly as fast as before batches.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field, replace

import torch
from transformers import PreTrainedModel

from specdec import acceptance, distributed, kv, verify
from specdec.control import SMALL, Controller, Plan
from specdec.drafters.base import DecodeState, Drafter
from specdec.hf_args import Limits
from specdec.sampling import Sampling
from specdec.tree import TokenTree


@dataclass(frozen=True)
class Parts:
    """What a decoding loop runs with (a `SpeculativeGenerator`'s parts)."""

    target: PreTrainedModel
    drafter: Drafter
    controller: Controller | None
    typical: acceptance.Typical | None  # LOSSY typical acceptance when sampling, or None


@dataclass
class SpecStats:
    """What one speculative generation did.

    Attributes:
        accept_lengths: new tokens per target verification forward (accepted draft tokens + the bonus
            token), Spec-Bench's definition; the last step may be cut short by a stop.
        tree_sizes: nodes scored per verification (root included).
        target_forwards: target forwards, prefill included.
        prefill_time, draft_time, verify_time: seconds spent prefilling the target, drafting, and in
            verification forwards.
        catchup_time: the part of `draft_time` a draft source spent re-reading tokens accepted while it
            was not asked (after fallback steps), not drafting.
        plans: the controller's decision for each step (speculate, depth, budget, threshold, streak);
            empty without a controller.
    """

    accept_lengths: list[int] = field(default_factory=list)
    tree_sizes: list[int] = field(default_factory=list)
    target_forwards: int = 0
    prefill_time: float = 0.0
    draft_time: float = 0.0
    verify_time: float = 0.0
    catchup_time: float = 0.0
    plans: list[dict] = field(default_factory=list)

    @property
    def fallback_steps(self) -> int:
        """Plain target steps the controller chose instead of speculating."""
        return sum(not p["speculate"] for p in self.plans)

    @property
    def thresholds(self) -> list[float]:
        """The confidence threshold in force at each step."""
        return [p["threshold"] for p in self.plans]

    @property
    def new_tokens(self) -> int:
        return sum(self.accept_lengths)

    @property
    def mean_accepted_length(self) -> float:
        """Mean new tokens per verification step (1.0 = no speedup from drafting)."""
        return self.new_tokens / max(len(self.accept_lengths), 1)


def decode(
    parts: Parts, prompt: torch.Tensor, limits: Limits, streamer, generator: torch.Generator | None
) -> tuple[list[int], list[torch.Tensor], SpecStats]:
    """The loop: propose, verify, accept, compact, commit, stop checks. `prompt` is `[1, L]`, unpadded."""
    stats = SpecStats()
    tokens = prompt.cpu()[0].tolist()
    ids = torch.empty(1, limits.max_length - len(limits.padding_ids), dtype=torch.long)  # `tokens`, for drafters
    ids[0, : len(tokens)] = prompt[0].cpu()
    new_tokens: list[int] = []
    new_logits: list[torch.Tensor] = []  # [1, V] per new token when asked for
    parts.drafter.start(parts.target)
    if parts.controller is not None:  # a streaming source's speculative steps score streams: they are not grown
        parts.controller.start(grows_trees=not parts.drafter.streaming)

    tic = verify.wall_time(parts.target)
    keep_hidden, layers = parts.drafter.uses_hidden_states, parts.drafter.hidden_layers
    with verify.aux_hidden_states(parts.target, layers) as aux:
        cache, hidden = verify.prefill(parts.target, prompt[:, :-1], output_hidden_states=keep_hidden)
    features = aux[-1][0] if aux else None  # [L-1, k*H]: the prompt's, but its last token's
    stream_states = None  # [k, H]: the target's states at the streams below the node that chose the root, if any
    stats.prefill_time, stats.target_forwards = verify.wall_time(parts.target) - tic, int(prompt.shape[1] > 1)

    while True:
        room = limits.max_length - len(limits.padding_ids) - len(tokens)  # new tokens still allowed
        plan = parts.controller.plan() if parts.controller else None
        step_time = parts.controller.plain_step_time() if parts.controller else None
        state = _state(ids[:, : len(tokens)], room, plan, limits.sampling, generator, hidden, step_time, features)
        if stream_states is not None:
            state = replace(state, streams=stream_states)
        if plan is not None and not plan.speculate and parts.drafter.free:  # opportunistic: free sources only
            depth = min(room - 1, parts.controller.config.max_depth)
            state = replace(state, max_depth=depth, budget=None, free_only=True)
        asked = state  # what the drafter is asked for: the plan less the streams
        if (reserve := parts.drafter.stream_budget(state)) and state.budget is not None:  # streams are tokens too
            asked = replace(state, budget=max(state.budget - reserve, 1))
        tic = verify.wall_time(parts.target)
        tree = parts.drafter.propose(asked).truncate(state.max_depth).limit(asked.budget)  # within the plan
        if state.free_only and not parts.controller.pays(len(tree), tree.expected_gain):
            tree = tree.truncate(0)  # a fallback step: the free draft does not pay, take a plain step
        drafted, drafted_depth = len(tree), tree.max_depth  # what the controller learns from: not the padding
        if plan is not None and not reserve and len(tree) <= SMALL:  # padded where more nodes verify faster
            control = parts.controller
            width = control.pad_size(len(tree)) if plan.speculate else control.pad_width()
            tree = _pad(tree, width, tokens, min(room - 1, control.config.max_depth))
        streams = parts.drafter.streams(tree, state) if reserve else None  # `reserve` tokens of them
        if int(tree.tokens[0]) != state.root:
            raise RuntimeError(f"{type(parts.drafter).__name__} proposed a tree not rooted at the last token")
        distributed.check_same_tree(tree)  # tensor parallelism: every rank verifies the same tree, or an error
        toc = verify.wall_time(parts.target)
        catchup = parts.drafter.catchup_time
        with (
            verify.final_hidden_states(parts.target) if keep_hidden or streams else _no_capture() as final,
            verify.aux_hidden_states(parts.target, layers) as aux,
        ):
            logits = verify.forward_tree(parts.target, cache, tree, streams=streams).logits[0]  # [N (+ S), V]
        verified = verify.wall_time(parts.target)
        size = len(tree) + (len(streams) if streams else 0)  # tokens in the forward
        stats.draft_time += toc - tic
        stats.catchup_time += catchup
        stats.verify_time += verified - toc
        stats.target_forwards += 1
        stats.tree_sizes.append(size)

        accepted = accept(parts.typical, tree, logits[: len(tree)], limits.sampling, generator)
        kv.keep_path(cache, len(tokens) - 1, accepted.path)  # the streams' entries go with the rejected nodes
        rows = streams.rows(accepted.path[-1], len(tree)) if streams else None
        stream_states = final[-1][0, rows] if rows else None
        if keep_hidden:  # the state after the last accepted node: its LM head gave the bonus token
            hidden = final[-1][0, accepted.path[-1]]
        if layers:  # the states of the positions the cache kept: the accepted path
            features = aux[-1][0, accepted.path]  # [len(path), k*H]
        parts.drafter.commit(accepted)
        if plan is not None:  # charged to the step: its forward, acceptance, cache compaction and commit
            stats.plans.append(asdict(plan))
            drafting, checking = toc - tic - catchup, verify.wall_time(parts.target) - toc
            hits = sum(node < drafted for node in accepted.path[1:])  # the drafted nodes accepted, not the guesses
            parts.controller.update(plan, size, drafted_depth, hits, tree.expected_gain, drafting, checking, catchup)

        emitted, done = [], False
        for node, token in zip(accepted.path, accepted.tokens, strict=True):
            tokens.append(token)
            emitted.append(token)
            if limits.keep_logits:
                new_logits.append(logits[node : node + 1].float().clone())
            if done := should_stop(tokens, logits[node : node + 1], limits):
                break
        ids.numpy()[0, len(tokens) - len(emitted) : len(tokens)] = emitted  # numpy: no tensor made for a few ints
        new_tokens += emitted
        stats.accept_lengths.append(len(emitted))
        if streamer is not None:
            streamer.put(torch.tensor(emitted))
        if done:
            parts.drafter.finish(new_tokens)
            return new_tokens, new_logits, stats


def _pad(tree: TokenTree, width: int, tokens: list[int], max_depth: int) -> TokenTree:
    """`tree` grown to `width` nodes (where the controller measured that many cheaper to verify than fewer) by a
    chain of guesses below its last node: what followed that node's token where it last occurred, a unigram
    match (they are verified like any draft, so whatever they are, the output stays exact). Never deeper than
    `max_depth`: the controller's deepest plan, and the tokens left before the bonus token."""
    last = len(tree) - 1
    count = min(width - len(tree), max_depth - int(tree.depth[last]))
    if count <= 0:
        return tree
    token, seen = int(tree.tokens[last]), tokens[:-1]
    try:
        where = len(seen) - 1 - seen[::-1].index(token)
    except ValueError:
        where = len(seen)
    guesses = seen[where + 1 : where + 1 + count]
    return tree.add_chain(last, guesses + [token] * (count - len(guesses)))


def accept(
    typical: acceptance.Typical | None, tree, logits: torch.Tensor, sampling: Sampling | None, generator
) -> acceptance.Acceptance:
    """The acceptance rule: greedy match, exact rejection sampling, or (asked for, lossy) typical."""
    if sampling is None:
        return acceptance.greedy(tree, logits)
    if typical is not None:
        return acceptance.typical(tree, sampling.probs(logits), typical, generator)
    return acceptance.rejection_sample(tree, sampling.probs(logits), generator)


def should_stop(tokens: list[int], scores: torch.Tensor, limits: Limits) -> bool:
    if tokens[-1] in limits.eos_token_ids or len(limits.padding_ids) + len(tokens) >= limits.max_length:
        return True
    if not limits.stopping_criteria:
        return False
    input_ids = torch.tensor([[*limits.padding_ids, *tokens]])  # the sequence as HF's criteria see it
    return bool(distributed.rank_zero(float(limits.stopping_criteria(input_ids, scores).any()))[0])  # max_time


class _no_capture:
    """Stands in for `verify.final_hidden_states` when no hidden state is needed."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc) -> None:
        return None


def _state(
    ids: torch.Tensor,
    room: int,
    plan,
    sampling: Sampling | None,
    generator: torch.Generator | None,
    hidden: torch.Tensor | None,
    step_time: float | None = None,
    features: torch.Tensor | None = None,
) -> DecodeState:
    """What the drafter may propose (`ids`: `[1, L]` every token so far): at most `room - 1` deep (the bonus token
    takes the last slot)."""
    if plan is None:
        return DecodeState(ids, room - 1, sampling=sampling, generator=generator, hidden=hidden, features=features)
    depth = min(room - 1, plan.depth) if plan.speculate else 0
    return DecodeState(
        ids,
        depth,
        plan.budget,
        plan.threshold,
        sampling,
        generator,
        hidden,
        step_time,
        features=features,
        prepare=plan.prepare and room > 1,  # a next step that drafts at all
    )


# ---------------------------------------------------------------- batches


@dataclass
class BatchSpecStats:
    """What one batched speculative generation did: the batch's steps, and each row's own `SpecStats`.

    Attributes:
        rows: per row (in the batch's order): its accept lengths, tree sizes, the target forwards it took part
            in, its drafting time, and the verify time of the steps it took part in.
        step_rows: rows in each verification step (finished rows leave the batch, some after a while: `_leave`).
        step_slots: tokens each verification forward scored: rows x the largest tree (shorter trees are padded).
        target_forwards, prefill_time, draft_time, verify_time, catchup_time: for the whole batch.
        plans: the controller's decision for each step (one plan for all rows); empty without a controller.
    """

    rows: list[SpecStats]
    step_rows: list[int] = field(default_factory=list)
    step_slots: list[int] = field(default_factory=list)
    target_forwards: int = 0
    prefill_time: float = 0.0
    draft_time: float = 0.0
    verify_time: float = 0.0
    catchup_time: float = 0.0
    plans: list[dict] = field(default_factory=list)

    @property
    def new_tokens(self) -> int:
        return sum(row.new_tokens for row in self.rows)

    @property
    def mean_accepted_length(self) -> float:
        """New tokens per row and verification step, over all rows (1.0 = no gain from drafting)."""
        return self.new_tokens / max(sum(len(row.accept_lengths) for row in self.rows), 1)

    @property
    def fallback_steps(self) -> int:
        return sum(not p["speculate"] for p in self.plans)


@dataclass
class _Row:
    """One row of a batch: its tokens, its own drafter and what that drafter reads."""

    index: int  # in the batch
    limits: Limits
    drafter: Drafter
    ids: torch.Tensor  # [1, capacity] the row's tokens (no padding): the first `len(tokens)` are set
    tokens: list[int]
    stats: SpecStats
    new: list[int] = field(default_factory=list)
    hidden: torch.Tensor | None = None  # [H]
    features: torch.Tensor | None = None  # [T, k*H]
    done: bool = False

    @property
    def room(self) -> int:
        return self.limits.max_length - len(self.limits.padding_ids) - len(self.tokens)

    def state(self, plan: Plan | None, generator, step_time: float | None) -> DecodeState:
        view = self.ids[:, : len(self.tokens)]
        return _state(view, self.room, plan, self.limits.sampling, generator, self.hidden, step_time, self.features)

    def emit(self, accepted: acceptance.Acceptance, logits: torch.Tensor) -> None:
        """Append the accepted tokens up to a stop (`logits`: `[N, V]`, the row's)."""
        emitted = []
        for node, token in zip(accepted.path, accepted.tokens, strict=True):
            self.tokens.append(token)
            emitted.append(token)
            self.done = should_stop(self.tokens, logits[node : node + 1], self.limits)
            if self.done:
                break
        self.ids.numpy()[0, len(self.tokens) - len(emitted) : len(self.tokens)] = emitted
        self.new += emitted
        self.stats.accept_lengths.append(len(emitted))


def decode_batch(
    parts: Parts, prompts: list[torch.Tensor], limits: list[Limits], generator: torch.Generator | None
) -> tuple[list[list[int]], BatchSpecStats]:
    """The loop for a batch: each row's new tokens (up to its stop) and the statistics. `prompts`: `[1, L_r]`
    each, unpadded; the batch is left-padded again here (to the longest), as `target.generate` pads it."""
    target, controller = parts.target, parts.controller
    if parts.drafter.streaming:
        raise ValueError(
            f"{type(parts.drafter).__name__} drafts with speculative streams, which specdec scores for one prompt at "
            f"a time: call generate with one prompt per call, or use an n-gram, Medusa, EAGLE or draft-model "
            f"source for a batch"
        )
    rows = [_start_row(parts, i, prompt, limits[i]) for i, prompt in enumerate(prompts)]
    stats = BatchSpecStats(rows=[row.stats for row in rows])
    if controller is not None:
        controller.start()
    cache = _prefill_rows(parts, rows, stats)
    batch = list(rows)  # the rows in the cache: running ones, and for a while finished ones (`_leave`)
    while batch:
        plan = controller.plan(rows=len(batch)) if controller else None
        tic = verify.wall_time(target)
        trees, catchup = _propose_rows(parts, batch, plan, generator)
        toc = verify.wall_time(target)
        with _captures(target, parts.drafter) as (final, aux):
            logits = verify.forward_batch(target, cache, trees).logits  # [A, N, V]
        verified = verify.wall_time(target)
        accepted = _accept_rows(parts.typical, batch, trees, logits, batch[0].limits.sampling, generator)
        cache.keep_paths([a.path for a in accepted])
        for i, (row, tree, a) in enumerate(zip(batch, trees, accepted, strict=True)):
            if not a.path:  # a finished row still in the cache
                continue
            _take_states(row, final, aux, i, a.path)
            row.drafter.commit(a)
            row.emit(a, logits[i])
            row.stats.tree_sizes.append(len(tree))
            row.stats.target_forwards += 1
            row.stats.verify_time += verified - toc
        checking = verify.wall_time(target) - toc  # the forward, acceptance, the cache and the commits
        _record_step(stats, controller, plan, batch, trees, accepted, toc - tic - catchup, catchup, checking)
        batch = _leave(cache, batch, controller)
    for row in rows:
        row.drafter.finish(row.new)
    return [row.new for row in rows], stats


def _start_row(parts: Parts, index: int, prompt: torch.Tensor, limits: Limits) -> _Row:
    """A row with its own fork of the drafter, started for the target."""
    drafter = parts.drafter.fork()
    drafter.start(parts.target)
    ids = torch.empty(1, limits.max_length - len(limits.padding_ids), dtype=torch.long)
    ids[0, : prompt.shape[1]] = prompt[0].cpu()
    return _Row(index, limits, drafter, ids, prompt[0].cpu().tolist(), SpecStats())


def _prefill_rows(parts: Parts, rows: list[_Row], stats: BatchSpecStats) -> kv.RowCache:
    """One left-padded prefill of every row's prompt but its last token; the drafters' target states."""
    width = max(len(row.tokens) for row in rows) - 1
    ids = torch.zeros(len(rows), width, dtype=torch.long)  # [B, L-1]
    visible = torch.zeros(len(rows), width, dtype=torch.bool)
    for r, row in enumerate(rows):
        n = len(row.tokens) - 1
        ids[r, width - n :], visible[r, width - n :] = torch.tensor(row.tokens[:-1], dtype=torch.long), True
    tic = verify.wall_time(parts.target)
    keep_hidden, layers = parts.drafter.uses_hidden_states, parts.drafter.hidden_layers
    with verify.aux_hidden_states(parts.target, layers) as aux:
        cache, hidden = verify.prefill_batch(parts.target, ids, visible, output_hidden_states=keep_hidden)
    elapsed = verify.wall_time(parts.target) - tic
    stats.prefill_time, stats.target_forwards = elapsed, int(width > 0)
    for r, row in enumerate(rows):
        n = len(row.tokens) - 1
        row.stats.prefill_time, row.stats.target_forwards = elapsed, int(width > 0)
        if n > 0:  # a one-token prompt has no state before its root
            row.hidden = hidden[r] if hidden is not None else None
            row.features = aux[-1][r, width - n :] if aux else None  # [n, k*H]
    return cache


def _propose_rows(parts: Parts, batch: list[_Row], plan: Plan | None, generator) -> tuple[list[TokenTree], float]:
    """Each running row's tree under the batch's plan (in a fallback step, free sources' trees when they pay for
    the batch), a finished row's last token (nothing is kept of it), and the drafters' catch-up seconds."""
    controller = parts.controller
    step_time = controller.plain_step_time() if controller else None
    running = [row for row in batch if not row.done]
    states = [row.state(plan, generator, step_time) for row in running]
    free_only = plan is not None and not plan.speculate and parts.drafter.free
    if free_only:  # opportunistic: free sources only, at most `max_budget` nodes over all rows (every row is
        # padded to the largest tree: 8 rows of 11 nodes made an 88-token step on SmolLM2)
        cfg = controller.config
        budget = max(cfg.max_budget // len(batch), cfg.min_budget)
        states = [
            replace(s, max_depth=min(row.room - 1, cfg.max_depth), budget=budget, free_only=True)
            for s, row in zip(states, running, strict=True)
        ]
    drafted, catchup = {}, 0.0
    tic = verify.wall_time(parts.target)  # every row at once: a source with a model call makes one for the batch
    proposed = running[0].drafter.propose_rows([row.drafter for row in running], states)
    share = (verify.wall_time(parts.target) - tic) / len(running)  # each row's part of the drafting time
    for row, state, tree in zip(running, states, proposed, strict=True):
        tree = tree.truncate(state.max_depth).limit(state.budget)  # within the plan
        if int(tree.tokens[0]) != state.root:
            raise RuntimeError(f"{type(row.drafter).__name__} proposed a tree not rooted at the last token")
        row.stats.draft_time += share
        row.stats.catchup_time += row.drafter.catchup_time
        catchup += row.drafter.catchup_time
        drafted[row.index] = tree
    trees = [TokenTree.chain(row.tokens[-1]) if row.done else drafted[row.index] for row in batch]
    if free_only and not controller.pays(max(len(t) for t in trees), _batch_gain(list(drafted.values()))):
        trees = [tree.truncate(0) for tree in trees]  # the free drafts do not pay: a plain step
    if plan is not None and not plan.speculate and max(len(t) for t in trees) <= SMALL:  # padded where that is
        width = controller.pad_width()  # measured cheaper (a few rows x 1 token can cost more than x 2)
        trees = [
            tree if row.done else _pad(tree, width, row.tokens, min(row.room - 1, controller.config.max_depth))
            for tree, row in zip(trees, batch, strict=True)
        ]
    return trees, catchup


def _batch_gain(trees: list[TokenTree]) -> float:
    """What the running rows' free drafts promise the batch: as many tokens per row as the row that gains least. A
    batch lasts as long as its slowest row, so one row's n-gram hit verified in a fallback step (every row padded
    to its size) mostly makes that row wait at the end: on SmolLM2 (2-core AMD EPYC, fp32) such steps of 4 rows x 9
    tokens took 132 ms, plain steps 58, and batches of 4 with n-grams ran at 0.93-0.98x `target.generate`."""
    return len(trees) * min(tree.expected_gain for tree in trees)


@contextmanager
def _captures(target: PreTrainedModel, drafter: Drafter) -> Iterator[tuple[list | None, list]]:
    """The target states `drafter` reads, captured during the forwards inside the block: `(final, aux)`."""
    with ExitStack() as stack:
        final = stack.enter_context(verify.final_hidden_states(target)) if drafter.uses_hidden_states else None
        yield final, stack.enter_context(verify.aux_hidden_states(target, drafter.hidden_layers))


def _accept_rows(
    typical: acceptance.Typical | None,
    batch: list[_Row],
    trees: list[TokenTree],
    logits: torch.Tensor,
    sampling,
    generator,
) -> list[acceptance.Acceptance]:
    """Each running row's accepted path (`logits`: `[A, N, V]`), an empty one for a finished row. A plain step of
    greedy rows is one argmax."""
    if sampling is None and all(len(tree) == 1 for tree in trees):
        tokens = logits[:, 0].argmax(-1).tolist()
        return [
            acceptance.Acceptance([], []) if row.done else acceptance.Acceptance([0], [t])
            for row, t in zip(batch, tokens, strict=True)
        ]
    return [
        acceptance.Acceptance([], [])
        if row.done
        else accept(typical, tree, logits[i, : len(tree)], sampling, generator)
        for i, (row, tree) in enumerate(zip(batch, trees, strict=True))
    ]


def _take_states(row: _Row, final: list | None, aux: list, i: int, path: list[int]) -> None:
    """The target states row `i`'s drafter reads next: after its last accepted node, and along its path."""
    if final is not None:
        row.hidden = final[-1][i, path[-1]]  # [H]
    if aux:
        row.features = aux[-1][i, path]  # [len(path), k*H]


def _record_step(
    stats: BatchSpecStats,
    controller: Controller | None,
    plan: Plan | None,
    batch: list[_Row],
    trees: list[TokenTree],
    accepted: list[acceptance.Acceptance],
    drafting: float,
    catchup: float,
    checking: float,
) -> None:
    """The batch's statistics, and the controller's measurement of the step (what it drafted: the running rows')."""
    slots = len(batch) * max(len(tree) for tree in trees)
    stats.step_rows.append(len(batch))
    stats.step_slots.append(slots)
    stats.target_forwards += 1
    stats.draft_time += drafting + catchup
    stats.catchup_time += catchup
    stats.verify_time += checking
    if plan is not None:
        stats.plans.append(asdict(plan))
        steps = [(t, a, row.index) for t, a, row in zip(trees, accepted, batch, strict=True) if a.path]
        outcomes = [(len(t), t.max_depth, a.num_accepted, t.expected_gain) for t, a, _ in steps]
        row_ids = [index for _, _, index in steps]
        controller.update_batch(plan, slots, outcomes, drafting, checking, catchup, row_ids)


def _leave(cache: kv.RowCache, batch: list[_Row], controller: Controller | None) -> list[_Row]:
    """The rows that stay in the cache (none once every row has finished), and holes squeezed out when they waste
    more than half of it. A finished row leaves at once, or stays as long as `_keep_finished` says so: each
    step then feeds it its last token, and keeps nothing of it."""
    running = sum(not row.done for row in batch)
    if running == 0:
        return []
    if running < len(batch) and not _keep_finished(controller, len(batch), running):
        staying = [i for i, row in enumerate(batch) if not row.done]
        cache.select_rows(staying)
        batch = [batch[i] for i in staying]
    if cache.waste() > 0.5 and cache.slots >= 32:
        cache.compact()
    return batch


def _keep_finished(controller: Controller | None, rows: int, running: int) -> bool:
    """Whether a batch of `rows` rows, `running` of them not finished, keeps its finished rows for now. Leaving
    copies the cache of every row that stays, and a forward of a few more tokens can cost less: on this 2-core AMD
    EPYC (MKL, fp32) 3 rows of one token took 65 ms and 4 rows 52 ms, so a batch of 4 whose first row finished ran
    slower than `target.generate`, which keeps every row to the end. So where the controller pads plain steps
    (`ControlConfig.pad_steps`), a batch of at most `SMALL` rows keeps its finished rows while they are at most
    half of it, unless a forward of the running rows alone was measured cheaper."""
    if controller is None or not controller.config.pad_steps or rows > SMALL or 2 * (rows - running) > rows:
        return False
    small = controller.costs.small
    return running not in small or rows not in small or small[rows] <= small[running]
