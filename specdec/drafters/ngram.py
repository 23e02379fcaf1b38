"""Self-speculative n-gram streaming: continuations found in the prompt and in what was generated so far.

No model and no training: the last `n` tokens are looked up in an index of every earlier n-gram (longest
`n` first), and the tokens that followed earlier occurrences are proposed. Several distinct
continuations are merged into one token tree (a trie), ranked by how likely their first token is (how
often it followed the n-gram, calibrated per kind of match, see below), then by match length, then by how
recently. The index is updated incrementally as tokens are accepted, so a step costs the same whatever
the context length.

With a cross-request `NGramMemory` (earlier generations, optionally seeded with the target's own answers
to other prompts) the tree's remaining branches are filled from it, and every finished generation is
added to it.
"""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

from specdec.drafters.base import DecodeState, Drafter
from specdec.drafters.memory import NGramMemory
from specdec.tree import TokenTree

_MAX_SCORE = 0.999  # a calibrated share is a probability: below 1


class NGramIndex:
    """Maps every n-gram (`min_n <= n <= max_n`) of a growing token list to the positions that follow it.

    A lookup reads only the `recent` newest occurrences of the n-gram, so it costs the same whatever the context
    length; appending a token costs `max_n - min_n + 1` dictionary updates. The positions are plain lists (as
    many entries as the token list, per n-gram length): indexing a 1024-token prompt takes 0.85 ms, against 3.2
    ms with a bounded deque per n-gram, which the step after the prefill pays.
    """

    def __init__(self, min_n: int, max_n: int, recent: int):
        self.min_n, self.max_n, self.recent = min_n, max_n, recent
        self.tokens: list[int] = []
        self._follow: dict[tuple[int, ...], list[int]] = {}

    def extend(self, tokens: list[int]) -> None:
        start = len(self.tokens)
        self.tokens.extend(tokens)
        everything, end = self.tokens, len(self.tokens)
        for n in range(self.min_n, self.max_n + 1):
            first = max(start, n)  # position i follows the n-gram everything[i - n : i]
            if first >= end:
                continue
            grams = zip(*(everything[first - n + k : end - n + k] for k in range(n)), strict=True)
            for i, gram in enumerate(grams, start=first):
                if (positions := self._follow.get(gram)) is None:
                    self._follow[gram] = [i]
                else:
                    positions.append(i)

    def continuations(self, n: int, length: int) -> list[list[int]]:
        """What followed earlier occurrences of the last `n` tokens, newest first (at most `length` each)."""
        if len(self.tokens) < n:
            return []
        positions = self._follow.get(tuple(self.tokens[-n:]), ())
        return [self.tokens[p : p + length] for p in reversed(positions[-self.recent :])]


class NGramDrafter(Drafter):
    """Drafts by matching the context's suffix against the prompt and the output so far.

    Args:
        max_ngram, min_ngram: suffix lengths tried, longest first.
        depth: most draft tokens on a path.
        branches: most distinct continuations merged into the tree.
        tree_budget: most draft nodes (root not counted).
        recent: newest occurrences remembered per n-gram.
        memory: a cross-request `NGramMemory`, or the name / directory of a saved one (e.g. the built-in
            `"smollm2-135m-instruct-ngram"`); None: the current context only. Continuations from the
            context come first; the memory fills the remaining branches.
        remember: add each finished generation's new tokens to `memory`.

    Tree scores are calibrated log relative frequencies: for a node at depth k, the share of the matched
    n-gram's occurrences (plus one pseudo-occurrence) whose continuation starts with the node's path,
    times the calibration of that kind of match (context or memory, n-gram length n): how often the first
    tokens it proposed were the next token, over the shares they were given (discounted by `discount` per
    proposal, with `prior_weight` pseudo-proposals at calibration 1; kept across generations). A single
    earlier occurrence of a 4-gram predicts much better than a single occurrence of one token, and both
    would otherwise score 1/2. Scores play the role a draft model's path probability plays, for ranking
    and confidence stops; verification ignores them.
    """

    free = True  # an index lookup: asked even in fallback steps

    def __init__(
        self,
        max_ngram: int = 4,
        min_ngram: int = 1,
        depth: int = 16,
        branches: int = 8,
        tree_budget: int = 32,
        recent: int = 8,
        memory: NGramMemory | str | Path | None = None,
        remember: bool = True,
        discount: float = 0.995,
        prior_weight: float = 2.0,
    ):
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError(f"need 1 <= min_ngram <= max_ngram, got {min_ngram}, {max_ngram}")
        if min(depth, branches, tree_budget, recent) < 1:
            raise ValueError("depth, branches, tree_budget and recent must be >= 1")
        self.max_ngram, self.min_ngram, self.recent = max_ngram, min_ngram, recent
        self.depth, self.branches, self.tree_budget = depth, branches, tree_budget
        self.index = NGramIndex(min_ngram, max_ngram, recent)
        self.memory = NGramMemory.from_pretrained(memory) if isinstance(memory, (str, Path)) else memory
        self.remember = remember
        self.discount, self.prior_weight = discount, prior_weight
        # kind of match ("context" | "memory", n) -> [first tokens that were the next token, shares promised]
        self.match_stats: dict[tuple[str, int], list[float]] = {}
        self._asked: tuple[int, list[tuple[tuple[str, int], int, float]]] | None = None  # the last proposal

    def start(self, target) -> None:
        if self.memory is not None:
            self.memory.check(target)
        self.index = NGramIndex(self.min_ngram, self.max_ngram, self.recent)
        self._asked = None

    def finish(self, new_tokens: list[int]) -> None:
        if self.memory is not None and self.remember:
            self.memory.add(new_tokens)

    def calibration(self, kind: tuple[str, int]) -> float:
        """Measured first-token hits per promised share of one kind of match, e.g. `("context", 4)`."""
        hits, promised = self.match_stats.get(kind, (0.0, 0.0))
        return (hits + self.prior_weight) / (promised + self.prior_weight)

    def propose(self, state: DecodeState) -> TokenTree:
        self._measure(state.tokens[0])
        self.index.extend(state.tokens[0, len(self.index.tokens) :].tolist())
        depth = min(self.depth, state.max_depth)
        if depth < 1:
            return TokenTree.chain(state.root)
        sequences, scores = self.candidates(depth)
        # confidence stop: cut each continuation where its relative frequency drops below the threshold
        # (the best continuation keeps its first token, so acceptance is measured even below the threshold)
        cuts = [sum(1 for s in seq_scores if s >= state.min_score) for seq_scores in scores]
        cuts[:1] = [max(cuts[0], 1)] if cuts else []
        sequences = [seq[:k] for seq, k in zip(sequences, cuts, strict=True)]
        scores = [seq_scores[:k] for seq_scores, k in zip(scores, cuts, strict=True)]
        budget = min(self.tree_budget, state.budget or self.tree_budget)
        return TokenTree.trie(state.root, sequences, scores, budget=budget)

    def candidates(self, depth: int) -> tuple[list[list[int]], list[list[float]]]:
        """Up to `branches` distinct continuations, best first, with the calibrated log frequency of each
        prefix: from the context, longest n-gram first, then (if branches are left) from the memory."""
        found: list[tuple[list[int], list[float], tuple[str, int]]] = []  # continuation, shares, kind
        for n in range(self.max_ngram, self.min_ngram - 1, -1):
            if self._take(self.index.continuations(n, depth), ("context", n), found):
                break
        else:
            if self.memory is not None:
                n, continuations = self.memory.match(self.index.tokens, depth)
                self._take(continuations, ("memory", n), found)
        self._asked = (len(self.index.tokens), [(kind, cont[0], shares[0]) for cont, shares, kind in found])
        scored = []
        for cont, shares, kind in found:
            factor = self.calibration(kind)
            scored.append((cont, [math.log(min(p * factor, _MAX_SCORE)) for p in shares]))
        scored.sort(key=lambda item: -item[1][0])  # stable: equally likely ones stay in match order
        return [cont for cont, _ in scored], [scores for _, scores in scored]

    def _take(self, found: list[list[int]], kind: tuple[str, int], chosen: list[tuple]) -> bool:
        """Add the continuations of one n-gram (`found`, newest first) that are new, most frequent first
        token first, with the relative frequency of each prefix; True once `branches` are chosen."""
        prefix_counts = Counter(tuple(c[:k]) for c in found for k in range(1, len(c) + 1))
        # the sort is stable, so ties stay newest first
        for cont in sorted(found, key=lambda c: -prefix_counts[tuple(c[:1])]):
            if any(c[: len(cont)] == cont for c, _, _ in chosen):
                continue  # nothing new: equal to, or a prefix of, a continuation already chosen
            # +1: a pseudo-occurrence that continued otherwise, so a single match is not certainty
            shares = [prefix_counts[tuple(cont[:k])] / (len(found) + 1) for k in range(1, len(cont) + 1)]
            chosen.append((cont, shares, kind))
            if len(chosen) == self.branches:
                return True
        return False

    def _measure(self, tokens) -> None:
        """Score the last proposal's first tokens against the token that followed its root."""
        if self._asked is None or self._asked[0] >= len(tokens):
            return
        position, asked = self._asked
        actual = int(tokens[position])
        self._asked = None
        for kind, first, share in asked:
            hits, promised = self.match_stats.get(kind, (0.0, 0.0))
            self.match_stats[kind] = [self.discount * hits + (first == actual), self.discount * promised + share]
