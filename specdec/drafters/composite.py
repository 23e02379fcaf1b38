"""Several draft sources as one: the first confident one alone, or all of them merged into one tree."""

from __future__ import annotations

import copy
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace

from specdec import distributed
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


@dataclass
class _Ledger:
    """What one source cost and brought, discounted so that old steps fade."""

    asks: float = 0.0
    accepted: float = 0.0  # draft tokens accepted from this source's tree
    seconds: float = 0.0  # its drafting time
    skipped: int = 0  # steps skipped in a row


class Composite(Drafter):
    """Combine draft sources, cheapest first, e.g. `Composite([NGramDrafter(), ModelDrafter(draft)])`.

    Per step the sources are asked in order. A source whose tree promises at least `skip_gain` accepted
    tokens (by its scores) is used alone and the later, costlier sources are not asked; so an n-gram hit
    on text that repeats the prompt saves the draft model's time, and a miss costs nothing. Otherwise
    the trees of all sources are merged into one (shared prefixes merged, at most `tree_budget` nodes).
    When sampling, a source that draws its tokens at random ends the round: its tree is used alone.

    Each source keeps its own account: once it has been asked `warmup` times, a source whose accepted
    tokens save less time (at `state.step_time` per token, from the controller) than its drafting costs
    is skipped, and asked again after `probe_every` skipped steps. So a draft model that does not pay
    stops costing time while an n-gram source beside it keeps its hits.

    Args:
        drafters: the sources, cheapest first.
        skip_gain: expected accepted tokens that make a source's tree good enough alone.
        tree_budget: most draft nodes of a merged tree.
        warmup: asks before a source's account is trusted.
        probe_every: skipped steps after which a skipped source is asked again.
        discount: per-ask decay of the accounts.
    """

    def __init__(
        self,
        drafters: Sequence[Drafter],
        skip_gain: float = 2.0,
        tree_budget: int = 24,
        warmup: int = 8,
        probe_every: int = 16,
        discount: float = 0.97,
    ):
        if not drafters:
            raise ValueError("Composite needs at least one draft source")
        if len({drafter.hidden_layers for drafter in drafters if drafter.hidden_layers}) > 1:
            raise ValueError("Composite's sources must read the same target layers (hidden_layers), or none")
        if sum(drafter.streaming for drafter in drafters) > 1:
            raise ValueError("Composite takes at most one streaming source (one set of streams per forward)")
        self.drafters = list(drafters)
        self.skip_gain, self.tree_budget = skip_gain, tree_budget
        self.warmup, self.probe_every, self.discount = warmup, probe_every, discount
        self.ledgers = [_Ledger() for _ in self.drafters]
        self._asked: list[tuple[int, TokenTree]] = []

    @property
    def uses_hidden_states(self) -> bool:
        return any(drafter.uses_hidden_states for drafter in self.drafters)

    @property
    def hidden_layers(self) -> tuple[int, ...]:
        return next((drafter.hidden_layers for drafter in self.drafters if drafter.hidden_layers), ())

    @property
    def free(self) -> bool:
        return any(drafter.free for drafter in self.drafters)

    @property
    def streaming(self) -> bool:
        return any(drafter.streaming for drafter in self.drafters)

    def stream_budget(self, state: DecodeState) -> int:
        """The first streaming source's (streams are scored once per forward, whichever source drafts)."""
        return next((d.stream_budget(state) for d in self.drafters if d.streaming), 0)

    def streams(self, tree: TokenTree, state: DecodeState):
        return next((d.streams(tree, state) for d in self.drafters if d.streaming), None)

    @property
    def catchup_time(self) -> float:
        return sum(self.drafters[index].catchup_time for index, _ in self._asked)

    def fork(self) -> Composite:
        """Each source forked; the accounts start from this one's (each row keeps its own from then on)."""
        twin = copy.copy(self)
        twin.drafters = [drafter.fork() for drafter in self.drafters]
        twin.ledgers = [replace(ledger) for ledger in self.ledgers]
        twin._asked = []
        return twin

    def start(self, target) -> None:
        for drafter in self.drafters:
            drafter.start(target)

    def finish(self, new_tokens: list[int]) -> None:
        for drafter in self.drafters:
            drafter.finish(new_tokens)

    def propose(self, state: DecodeState) -> TokenTree:
        return self.propose_rows([self], [state])[0]

    def propose_rows(self, drafters: Sequence[Drafter], states: Sequence[DecodeState]) -> list[TokenTree]:
        """Each row's tree, the sources asked in order as in `propose`, each source once for all the rows that ask
        it (so that batched heads make one call per step); each row keeps its own accounts."""
        rows: list[Composite] = list(drafters)
        trees: list[TokenTree | None] = [None] * len(rows)
        pending = []  # rows whose tree is not chosen yet
        for r, (row, state) in enumerate(zip(rows, states, strict=True)):
            row._asked = []
            if state.max_depth < 1:
                trees[r] = TokenTree.chain(state.root)
            else:
                pending.append(r)
        for index, source in enumerate(self.drafters):
            askers = [
                r
                for r in pending
                if not (states[r].free_only and not source.free) and rows[r]._worth_asking(index, states[r].step_time)
            ]
            if not askers:
                continue
            forks = [rows[r].drafters[index] for r in askers]
            tic = time.perf_counter()
            proposed = forks[0].propose_rows(forks, [states[r] for r in askers])
            # rank 0's time on every rank in lockstep (tensor parallelism), so all skip the same sources
            (drafting,) = distributed.rank_zero(time.perf_counter() - tic - sum(f.catchup_time for f in forks))
            for r, tree in zip(askers, proposed, strict=True):
                ledger = rows[r].ledgers[index]
                ledger.asks = self.discount * ledger.asks + 1
                ledger.seconds = self.discount * ledger.seconds + drafting / len(askers)
                rows[r]._asked.append((index, tree))
                # a tree of random draws is used as drawn: choosing it by its tokens' values would bias them
                if tree.is_sampled or tree.expected_gain >= self.skip_gain:
                    trees[r] = tree
                    pending.remove(r)
        for r in pending:
            drafted = [tree for _, tree in rows[r]._asked if len(tree) > 1]
            trees[r] = merge_trees(drafted, self.tree_budget) if drafted else TokenTree.chain(states[r].root)
        for index, source in enumerate(self.drafters):  # a source not asked still takes the step's target features
            idle = [r for r, row in enumerate(rows) if source.hidden_layers and index not in dict(row._asked)]
            if idle:
                forks = [rows[r].drafters[index] for r in idle]
                forks[0].propose_rows(forks, [replace(states[r], max_depth=0) for r in idle])
        return trees

    def _worth_asking(self, index: int, step_time: float | None) -> bool:
        ledger = self.ledgers[index]
        if step_time is None or ledger.asks < self.warmup or ledger.skipped >= self.probe_every:
            ledger.skipped = 0
            return True
        if ledger.accepted * step_time >= ledger.seconds:
            return True
        ledger.skipped += 1
        return False

    def commit(self, acceptance: Acceptance) -> None:
        for index, tree in self._asked:  # only the sources asked this step, each in its own node indices
            path = follow(tree, acceptance.tokens[: acceptance.num_accepted])
            self.ledgers[index].accepted = self.discount * self.ledgers[index].accepted + len(path) - 1
            self.drafters[index].commit(Acceptance(path=path, tokens=acceptance.tokens[: len(path)]))
