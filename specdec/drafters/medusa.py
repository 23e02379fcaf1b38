"""Medusa heads as the draft source: candidates from the target's own last hidden state."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from transformers import PreTrainedModel

from specdec.devices import resident
from specdec.drafters.base import DecodeState, Drafter, trim
from specdec.tree import TokenTree

if TYPE_CHECKING:
    from heads.medusa import MedusaHeads


class MedusaDrafter(Drafter):
    """Drafts with Medusa heads on the hidden state the verifier already computed: no extra target forward.

    Per step the heads read the target's final hidden state at the last accepted node (the one whose LM
    head chose the root), head `k` gives its top candidates for depth `k + 1`, and a static tree shape
    (`choices`) picks which ranks to combine. Path-conditioned heads (`path_inputs=True`) also read the
    tokens from the root to the node they extend, so the tree is filled one depth at a time, with one
    batched head call per depth for all the nodes that get children. Each node's score is the sum of its
    heads' log-probabilities along the path; a controller's plan trims the tree to its best `budget` nodes
    and drops nodes below its threshold. Candidates are deterministic proposals, so sampling stays exact too.

    Args:
        heads: `MedusaHeads` trained for the target (checked at `start`).
        choices: the static tree shape (Medusa's format: tuples of candidate ranks per depth); default:
            the heads' own `choices` (measured best tree, saved with trained heads), else the chain of
            each head's top candidate.

    Example:
        >>> heads = MedusaHeads.from_pretrained("smollm2-135m-instruct-medusa", target)
        >>> SpeculativeGenerator(target, MedusaDrafter(heads)).generate(input_ids, max_new_tokens=128)
    """

    uses_hidden_states = True

    def __init__(self, heads: MedusaHeads, choices: Sequence[Sequence[int]] | None = None):
        num_heads = heads.config.num_heads
        if choices is None:
            choices = heads.choices or [(0,) * d for d in range(1, num_heads + 1)]
        self.choices = [tuple(c) for c in choices]
        if not self.choices or max(len(c) for c in self.choices) > num_heads:
            raise ValueError(f"choices must be non-empty and at most {num_heads} deep (one depth per head)")
        self.heads = heads
        self.topk = max(max(c) for c in self.choices) + 1
        self._weights = self._embed = self._vocab = None
        self._shapes: dict[tuple[int, int | None], list[list[tuple[int, ...]]]] = {}  # `_levels`' answers

    def start(self, target: PreTrainedModel) -> None:
        self.heads.check(target)
        self._weights = self.heads.lm_weights(target.get_output_embeddings())  # [V', H] per head
        self._embed = resident(target.get_input_embeddings())  # path-conditioned heads embed at every step
        self._vocab = self.heads.vocab.tolist() if self.heads.config.draft_vocab else None

    def _logits(self, weight: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """The heads' LM head: `[P, H]` features -> `[P, V']` logits over the draft vocabulary."""
        return torch.nn.functional.linear(features, weight)

    def _top(self, weight: torch.Tensor, features: torch.Tensor) -> tuple[list[list[float]], list[list[int]]]:
        """Top candidates for `[P, H]` features under LM-head `weight`: log-probabilities (over the draft
        vocabulary) and token ids, `P` lists of `topk` each."""
        top_lp, top = torch.log_softmax(self._logits(weight, features).float(), dim=-1).topk(self.topk, dim=-1)
        top_lp, top = top_lp.tolist(), top.tolist()
        if self._vocab is not None:  # draft vocabulary rows -> token ids
            top = [[self._vocab[t] for t in row] for row in top]
        return top_lp, top

    def propose(self, state: DecodeState) -> TokenTree:
        return self.propose_rows([self], [state])[0]

    @torch.no_grad()
    def propose_rows(self, drafters: Sequence[Drafter], states: Sequence[DecodeState]) -> list[TokenTree]:
        """Every row's tree with one head call per depth for all rows (the heads and their weights are shared by
        the forks, and a head call's cost is mostly reading its weights: on a 2-core CPU, rows one by one made
        Medusa's drafting 4 times dearer in a batch of 4)."""
        if self._weights is None:
            raise RuntimeError("MedusaDrafter.start(target) must be called before propose()")
        trees: list[TokenTree | None] = [None] * len(states)
        asked = {}  # row -> its choices, by depth
        for r, state in enumerate(states):
            levels = self._levels(state.max_depth, state.budget) if state.hidden is not None else []
            if levels:
                asked[r] = levels
            else:
                trees[r] = TokenTree.chain(state.root)
        if not asked:
            return trees
        rows = list(asked)
        if self.heads.config.path_inputs:
            built = self._path_trees([states[r] for r in rows], [asked[r] for r in rows])
        else:
            built = self._static_trees(
                [states[r] for r in rows], [[c for level in asked[r] for c in level] for r in rows]
            )
        for r, tree in zip(rows, built, strict=True):
            trees[r] = trim(tree, states[r])
        return trees

    def _levels(self, max_depth: int, budget: int | None) -> list[list[tuple[int, ...]]]:
        """The choices a plan of `max_depth` and `budget` asks for, per depth (sorted), none deeper than it has:
        for path-conditioned heads only the first `budget` (each depth costs a head call: build only what the
        budget keeps), for the others all of them (`trim` keeps the best). The same few plans come back step after
        step, so they are kept."""
        key = (max_depth, budget if self.heads.config.path_inputs else None)
        if key not in self._shapes:
            choices = [c for c in self.choices if len(c) <= max_depth]
            if self.heads.config.path_inputs:
                choices = _first(choices, budget)
            deepest = max((len(c) for c in choices), default=0)
            self._shapes[key] = [sorted(c for c in choices if len(c) == d) for d in range(1, deepest + 1)]
        return self._shapes[key]

    def _static_trees(self, states: list[DecodeState], choices: list[list[tuple[int, ...]]]) -> list[TokenTree]:
        """The `choices` trees for heads that read the hidden state only: every head on every row at once."""
        hidden = torch.stack([state.hidden for state in states])  # [R, H]
        features = self.heads.features(hidden)  # [K, R, H]
        num_heads, rows = features.shape[:2]
        if self.heads.lm_heads is None:  # shared LM head: one matmul for all heads
            top_lp, top_tok = self._top(self._weights[0], features.flatten(0, 1))  # [K*R, k], head-major
        else:
            tops = [self._top(w, f) for w, f in zip(self._weights, features, strict=True)]
            top_lp, top_tok = [row for lp, _ in tops for row in lp], [row for _, tok in tops for row in tok]
        trees = []
        for r, (state, row_choices) in enumerate(zip(states, choices, strict=True)):
            picks = [r + k * rows for k in range(num_heads)]  # row r's candidates at each depth
            tokens, lps = torch.tensor([top_tok[i] for i in picks]), torch.tensor([top_lp[i] for i in picks])
            trees.append(TokenTree.from_choices(state.root, row_choices, tokens, lps))
        return trees

    def _path_trees(self, states: list[DecodeState], shapes: list[list[list[tuple[int, ...]]]]) -> list[TokenTree]:
        """The trees of `shapes` (each row's choices by depth, `_levels`) for path-conditioned heads: depth by depth,
        head `d` runs once on the paths of all rows' depth-`d` nodes that have children (path = root + the node's
        tokens). A node below the plan's threshold gets no children: theirs would score lower still, and `trim` would
        drop them (so each depth that nothing reaches saves a head call)."""
        built = [_Building(state) for state in states]
        hiddens = torch.stack([state.hidden for state in states])  # [R, H]
        for depth in range(1, max(map(len, shapes)) + 1):
            levels = [shape[depth - 1] if depth <= len(shape) else [] for shape in shapes]
            expanding = [b.expanding(level) for b, level in zip(built, levels, strict=True)]
            if not any(expanding):
                break
            path = [b.paths[p] for b, ps in zip(built, expanding, strict=True) for p in ps]
            owners = [r for r, ps in enumerate(expanding) for _ in ps]  # the row of each path
            hidden = hiddens.expand(len(owners), -1) if len(states) == 1 else hiddens[owners]
            path = torch.tensor(path, device=hiddens.device)
            features = self.heads.head_features(depth - 1, hidden, path, self._embed)  # [P, H] over all rows
            top_lp, top_tok = self._top(self._weights[depth - 1], features)
            start = 0
            for b, level, ps in zip(built, levels, expanding, strict=True):
                b.grow(level, ps, top_lp[start : start + len(ps)], top_tok[start : start + len(ps)])
                start += len(ps)
        return [b.tree() for b in built]


class _Building:
    """One row's path-conditioned tree while `_path_trees` fills it depth by depth."""

    def __init__(self, state: DecodeState):
        self.state = state
        self.paths: dict[tuple[int, ...], list[int]] = {(): [state.root]}  # each node's tokens from the root
        self.node: dict[tuple[int, ...], int] = {(): 0}  # each choice's node, numbered depth by depth in choice order
        self.tokens, self.parents, self.scores = [state.root], [-1], [0.0]

    def expanding(self, level: list[tuple[int, ...]]) -> list[tuple[int, ...]]:
        """The parents of `level`'s choices that get children (the head's rows for this tree): built ones, the root
        always, other nodes when they reach the plan's threshold."""
        parents = {c[:-1] for c in level}
        return sorted(
            p for p in parents if p in self.node and (not p or self.scores[self.node[p]] >= self.state.min_score)
        )

    def grow(self, level: list[tuple[int, ...]], expanding: list[tuple[int, ...]], top_lp, top_tok) -> None:
        """Add `level`'s choices below the `expanding` parents, from the head's top candidates for them."""
        rows = {parent: row for row, parent in enumerate(expanding)}
        for choice in level:
            parent, rank = choice[:-1], choice[-1]
            if parent in rows:  # siblings are distinct top-k picks: no two share a token
                token = top_tok[rows[parent]][rank]
                self.node[choice], self.paths[choice] = len(self.tokens), [*self.paths[parent], token]
                self.tokens.append(token)
                self.parents.append(self.node[parent])
                self.scores.append(self.scores[self.node[parent]] + top_lp[rows[parent]][rank])

    def tree(self) -> TokenTree:
        return TokenTree(torch.tensor(self.tokens), torch.tensor(self.parents), torch.tensor(self.scores))


def _first(choices: list[tuple[int, ...]], budget: int | None) -> list[tuple[int, ...]]:
    """The first `budget` choices whose parents are kept (saved choices come best first, so for them this is
    the best tree of that size)."""
    kept: set[tuple[int, ...]] = set()
    for choice in choices:
        if budget is not None and len(kept) >= budget:
            break
        if len(choice) == 1 or choice[:-1] in kept:
            kept.add(choice)
    return [c for c in choices if c in kept]
