"""Medusa heads: exactness of MedusaDrafter, save/load, wrong-base errors, tree shapes, training steps."""

from __future__ import annotations

import itertools
import json

import pytest
import torch
from omegaconf import OmegaConf
from tiny import ARCHS, VOCAB, tiny_model

import specdec
from heads.medusa import CONFIG_FILE, MedusaHeads, load_medusa2
from specdec.drafters import Composite, MedusaDrafter, NGramDrafter
from specdec.drafters.base import DecodeState, trim
from specdec.tree import best_choices
from training import common, train_medusa

PROMPT = torch.tensor([[3, 4, 5, 6, 7, 3, 4, 5, 9, 10]])
TREE = [(0,), (1,), (2,), (0, 0), (0, 1), (1, 0), (0, 0, 0), (0, 0, 1), (0, 0, 0, 0)]


def random_heads(target, num_heads: int = 4, scale: float = 0.05, **kwargs) -> MedusaHeads:
    heads = MedusaHeads.for_model(target, num_heads=num_heads, **kwargs)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in heads.parameters():
            param.add_(scale * torch.randn(param.shape, generator=gen))
    return heads.eval()


def greedy(
    target, drafter, n: int = 40, controller=None, prompt: torch.Tensor = PROMPT
) -> tuple[list[int], list[int], specdec.SpecStats]:
    expected = target.generate(prompt, max_new_tokens=n, do_sample=False, eos_token_id=None)[0].tolist()
    gen = specdec.SpeculativeGenerator(target, drafter, controller=controller)
    out = gen.generate(prompt, max_new_tokens=n, eos_token_id=None, return_dict_in_generate=True)
    return out.sequences[0].tolist(), expected, out.spec_stats


# ---------------------------------------------------------------- heads


def test_untrained_heads_start_as_the_base_lm_head():
    target = tiny_model("llama")
    hidden = torch.randn(5, target.config.hidden_size)
    lm_head = target.get_output_embeddings()
    for shared in (True, False):
        heads = MedusaHeads.for_model(target, num_heads=3, num_layers=2, shared_lm_head=shared)
        logits = heads(hidden, lm_head)
        assert logits.shape == (3, 5, VOCAB)
        for k in range(3):
            torch.testing.assert_close(logits[k], lm_head(hidden))


def test_untrained_path_heads_start_as_the_base_lm_head_and_need_the_path():
    target = tiny_model("llama")
    hidden, path = torch.randn(5, 64), torch.randint(0, VOCAB, (5, 3))
    lm_head, embed = target.get_output_embeddings(), target.get_input_embeddings()
    heads = MedusaHeads.for_model(target, num_heads=3, path_inputs=True)
    logits = heads(hidden, lm_head, path, embed)
    for k in range(3):
        torch.testing.assert_close(logits[k], lm_head(hidden))
    with pytest.raises(ValueError, match="path="):
        heads(hidden, lm_head)


def test_path_heads_read_exactly_their_prefix_of_the_path():
    target = tiny_model("llama")
    heads = random_heads(target, num_heads=3, scale=0.5, path_inputs=True)
    lm_head, embed = target.get_output_embeddings(), target.get_input_embeddings()
    hidden, path = torch.randn(4, 64), torch.randint(0, VOCAB, (4, 3))
    base = heads(hidden, lm_head, path, embed)
    for k in range(3):
        changed = path.clone()
        changed[:, k] = (changed[:, k] + 1) % VOCAB  # head j reads tokens 0..j: heads before k must not move
        moved = heads(hidden, lm_head, changed, embed)
        for j in range(3):
            assert torch.equal(moved[j], base[j]) == (j < k), (k, j)


@pytest.mark.parametrize("path_inputs", [False, True])
def test_a_draft_vocabulary_limits_the_candidates_and_is_saved(tmp_path, path_inputs):
    target = tiny_model("llama")
    heads = random_heads(target, scale=0.5, path_inputs=path_inputs)
    vocab = torch.arange(VOCAB - 1, 2, -3)  # any order
    heads.restrict_vocab(vocab)
    drafter = MedusaDrafter(heads, TREE)
    drafter.start(target)
    tree = drafter.propose(DecodeState(PROMPT, max_depth=4, hidden=torch.randn(64)))
    assert len(tree) == len(TREE) + 1 and set(tree.tokens[1:].tolist()) <= set(vocab.tolist())
    heads.save_pretrained(tmp_path)
    loaded = MedusaHeads.from_pretrained(tmp_path, target)
    assert loaded.config.draft_vocab == len(vocab) and torch.equal(loaded.vocab, vocab)
    for bad in ([], [1, 1], [VOCAB]):
        with pytest.raises(ValueError, match="draft vocabulary"):
            heads.restrict_vocab(torch.tensor(bad, dtype=torch.long))


def test_shared_heads_store_no_lm_head_and_need_one():
    target = tiny_model("llama")
    shared = MedusaHeads.for_model(target, num_heads=4)
    own = MedusaHeads.for_model(target, num_heads=4, shared_lm_head=False)
    assert not any("lm_head" in name for name in shared.state_dict())
    size = sum(p.numel() for p in own.parameters()) - sum(p.numel() for p in shared.parameters())
    assert size == 4 * 64 * VOCAB  # one LM head per head
    with pytest.raises(ValueError, match="get_output_embeddings"):
        shared(torch.randn(2, 64))


@pytest.mark.parametrize(("shared", "path_inputs"), [(True, False), (False, False), (True, True)])
def test_save_load_round_trip(tmp_path, shared, path_inputs):
    target = tiny_model("llama")
    heads = random_heads(target, shared_lm_head=shared, path_inputs=path_inputs)
    heads.config = type(heads.config)(**{**heads.config.__dict__, "choices": [[0], [0, 0]]})
    heads.save_pretrained(tmp_path)
    loaded = MedusaHeads.from_pretrained(tmp_path, target)
    assert loaded.config == heads.config and loaded.choices == [(0,), (0, 0)]
    hidden, path = torch.randn(3, 64), torch.randint(0, VOCAB, (3, 4))
    lm_head, embed = target.get_output_embeddings(), target.get_input_embeddings()
    torch.testing.assert_close(loaded(hidden, lm_head, path, embed), heads(hidden, lm_head, path, embed))


def test_loading_onto_another_model_is_a_clear_error(tmp_path):
    target = tiny_model("llama")
    random_heads(target).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="fingerprint"):
        MedusaHeads.from_pretrained(tmp_path, tiny_model("llama", seed=5))  # same shapes, other weights
    with pytest.raises(ValueError, match="hidden size"):
        MedusaHeads.from_pretrained(tmp_path, tiny_model("llama", hidden_size=32, intermediate_size=64))
    with pytest.raises(ValueError, match="fingerprint"):  # the drafter checks too, at start
        MedusaDrafter(random_heads(target)).start(tiny_model("llama", seed=5))
    config = json.loads((tmp_path / CONFIG_FILE).read_text())
    (tmp_path / CONFIG_FILE).write_text(json.dumps({**config, "lora": True}))
    with pytest.raises(ValueError, match="load_medusa2"):
        MedusaHeads.from_pretrained(tmp_path, target)
    with pytest.raises(FileNotFoundError):
        MedusaHeads.from_pretrained(tmp_path / "nothing", target)


def test_training_can_start_from_trained_heads_of_the_same_shape(tmp_path):
    target = tiny_model("llama")
    trained = random_heads(target, path_inputs=True)
    trained.restrict_vocab(torch.tensor([5, 9, 3]))
    trained.save_pretrained(tmp_path)
    heads = train_medusa.initialised_from(MedusaHeads.for_model(target, 4, path_inputs=True), tmp_path, target)
    assert heads.config.draft_vocab == 0 and heads.choices is None  # chosen again at export
    hidden, path = torch.randn(3, 64), torch.randint(0, VOCAB, (3, 4))
    lm_head, embed = target.get_output_embeddings(), target.get_input_embeddings()
    torch.testing.assert_close(heads(hidden, lm_head, path, embed), trained(hidden, lm_head, path, embed))
    with pytest.raises(ValueError, match="path_inputs"):
        train_medusa.initialised_from(MedusaHeads.for_model(target, 4), tmp_path, target)
    with pytest.raises(ValueError, match="fingerprint"):
        train_medusa.initialised_from(MedusaHeads.for_model(target, 4, path_inputs=True), tmp_path, tiny_model(seed=5))


def test_fingerprint_survives_a_dtype_change(tmp_path):
    target = tiny_model("llama")
    random_heads(target).save_pretrained(tmp_path)
    heads = MedusaHeads.from_pretrained(tmp_path, target.to(torch.bfloat16))
    assert next(heads.parameters()).dtype == torch.bfloat16


# ---------------------------------------------------------------- tree shapes


def test_best_choices_is_the_optimal_tree_on_a_small_case():
    accuracy = torch.tensor([[0.6, 0.2, 0.1], [0.5, 0.2, 0.1], [0.4, 0.1, 0.05]])

    def value(choices):
        return sum(torch.prod(torch.tensor([accuracy[d, r] for d, r in enumerate(c)])).item() for c in choices)

    nodes = [c for d in (1, 2, 3) for c in itertools.product(range(3), repeat=d)]
    for budget in (1, 3, 5):
        chosen = best_choices(accuracy, budget)
        assert len(chosen) == budget and all(c[:-1] in chosen or len(c) == 1 for c in chosen)
        best = max(
            value(subset)
            for subset in itertools.combinations(nodes, budget)
            if all(len(c) == 1 or c[:-1] in subset for c in subset)
        )
        assert value(chosen) == pytest.approx(best)


def test_drafter_trims_to_budget_and_threshold_keeping_ancestors():
    target = tiny_model("llama")
    drafter = MedusaDrafter(random_heads(target, scale=0.5), choices=TREE)
    drafter.start(target)
    hidden = torch.randn(64)
    full = drafter.propose(DecodeState(PROMPT, max_depth=4, hidden=hidden))
    assert len(full) == len(TREE) + 1 and full.max_depth == 4
    small = drafter.propose(DecodeState(PROMPT, max_depth=4, budget=3, hidden=hidden))
    assert len(small) == 4 and set(small.scores[1:].tolist()) <= set(full.scores[1:].tolist())
    assert sorted(small.scores[1:].tolist()) == sorted(full.scores[1:].tolist())[-3:]
    strict = drafter.propose(DecodeState(PROMPT, max_depth=4, threshold=0.999, hidden=hidden))
    assert len(strict) == 2  # the root and the top depth-1 candidate are always kept
    assert len(drafter.propose(DecodeState(PROMPT, max_depth=2, hidden=hidden))) == 1 + 3 + 3
    assert len(drafter.propose(DecodeState(PROMPT, max_depth=4, hidden=None))) == 1


def test_path_heads_fill_each_node_with_the_top_candidates_for_its_own_path():
    target = tiny_model("llama")
    heads = random_heads(target, num_heads=3, scale=0.5, path_inputs=True)
    drafter = MedusaDrafter(heads, choices=TREE[:8])
    drafter.start(target)
    hidden = torch.randn(64)
    tree = drafter.propose(DecodeState(PROMPT, max_depth=4, hidden=hidden))
    assert len(tree) == 9
    lm_head, embed = target.get_output_embeddings(), target.get_input_embeddings()
    for node in range(1, len(tree)):
        parent = int(tree.parents[node])
        path = [int(tree.tokens[i]) for i in tree.path_to(parent)]  # root .. parent
        with torch.no_grad():
            logits = heads.head_logits(len(path) - 1, hidden, lm_head, torch.tensor(path), embed)
        logprobs = torch.log_softmax(logits.float(), -1)
        rank = tree.children(parent).index(node)  # siblings in rank order
        assert int(tree.tokens[node]) == int(logprobs.topk(rank + 1).indices[rank])
        expected = float(tree.scores[parent]) + float(logprobs[tree.tokens[node]])
        assert float(tree.scores[node]) == pytest.approx(expected, abs=1e-5)
    small = drafter.propose(DecodeState(PROMPT, max_depth=4, budget=3, hidden=hidden))
    assert len(small) == 4 and small.tokens.tolist() == tree.tokens[:4].tolist()  # the first choices come first
    assert len(drafter.propose(DecodeState(PROMPT, max_depth=4, budget=0, hidden=hidden))) == 1


def test_path_heads_skip_children_below_the_threshold_and_build_the_same_tree(monkeypatch):
    target = tiny_model("llama")
    heads = random_heads(target, num_heads=3, scale=0.5, path_inputs=True)
    drafter = MedusaDrafter(heads, choices=TREE[:8])
    drafter.start(target)
    hidden = torch.randn(64, generator=torch.Generator().manual_seed(0))
    calls = []
    head_features = heads.head_features
    monkeypatch.setattr(heads, "head_features", lambda k, *args: calls.append(k) or head_features(k, *args))
    full = drafter.propose(DecodeState(PROMPT, max_depth=4, budget=7, hidden=hidden))  # no threshold
    assert calls == [0, 1, 2]
    probs = sorted(full.scores[1:].exp().tolist())
    parents = full.parents[1:].unique().tolist()
    head_calls = set()
    between = [(a * b) ** 0.5 for a, b in itertools.pairwise(probs)]  # no threshold ties with a node's score
    for threshold in [probs[0] / 2, *between, min(2 * probs[-1], 0.999)]:
        calls.clear()
        state = DecodeState(PROMPT, max_depth=4, budget=7, threshold=threshold, hidden=hidden)
        tree = drafter.propose(state)
        trimmed = trim(full, state)  # the full tree trimmed afterwards: what pruning must not change
        assert tree.tokens.tolist() == trimmed.tokens.tolist() and tree.parents.tolist() == trimmed.parents.tolist()
        assert torch.allclose(tree.scores, trimmed.scores)
        expanded = sorted({int(full.depth[p]) for p in parents if p == 0 or full.scores[p] >= state.min_score})
        assert calls == expanded  # a head runs only where some parent reaches the threshold
        head_calls.add(len(calls))
    assert head_calls == {1, 2, 3}  # from the root's children only to the full depth


@pytest.mark.parametrize("path_inputs", [False, True])
def test_rows_drafted_together_get_their_own_trees_with_one_head_call_per_depth(monkeypatch, path_inputs):
    target = tiny_model("llama")
    heads = random_heads(target, num_heads=3, scale=0.5, path_inputs=path_inputs)
    drafter = MedusaDrafter(heads, choices=TREE[:8])
    drafter.start(target)
    gen = torch.Generator().manual_seed(1)
    states = [
        DecodeState(PROMPT, max_depth=4, hidden=torch.randn(64, generator=gen)),
        DecodeState(PROMPT[:, :-2], max_depth=4, budget=3, hidden=torch.randn(64, generator=gen)),
        DecodeState(PROMPT, max_depth=4, hidden=None),  # a one-token prompt's first step: nothing to draft from
        DecodeState(PROMPT[:, :-1], max_depth=1, threshold=0.2, hidden=torch.randn(64, generator=gen)),
    ]
    forks = [drafter.fork() for _ in states]
    calls = []
    head_features = heads.head_features
    monkeypatch.setattr(heads, "head_features", lambda k, *args: calls.append(k) or head_features(k, *args))
    together = forks[0].propose_rows(forks, states)
    assert calls == [0, 1, 2]  # each head once for all rows (row by row: once per row)
    alone = [drafter.propose(state) for state in states]
    assert [len(tree) for tree in alone] == [9, 4, 1, 2]
    for a, b in zip(together, alone, strict=True):
        assert a.tokens.tolist() == b.tokens.tolist() and a.parents.tolist() == b.parents.tolist()
        assert (a.scores is None) == (b.scores is None)
        assert a.scores is None or torch.allclose(a.scores, b.scores, atol=1e-5)


def test_a_composite_drafts_rows_together_as_each_row_alone():
    target = tiny_model("llama")
    heads = random_heads(target, num_heads=3, scale=0.5, path_inputs=True)
    composite = Composite([NGramDrafter(), MedusaDrafter(heads, choices=TREE[:8])], skip_gain=2.0)
    gen = torch.Generator().manual_seed(2)
    # an n-gram tree good enough alone, no n-gram at all (the heads' tree), and one merged with the heads'
    prompts = [
        torch.tensor([[3, 4, 5, 6, 7, 8] * 2 + [3, 4, 5, 6]]),
        torch.tensor([[11, 12, 13]]),
        torch.tensor([[9, 2, 8, 9]]),
    ]
    together, alone = [composite.fork() for _ in prompts], [composite.fork() for _ in prompts]
    for fork in together + alone:
        fork.start(target)
    for _ in range(3):  # a few steps, so that the accounts move
        states = [DecodeState(p, max_depth=3, hidden=torch.randn(64, generator=gen), step_time=0.01) for p in prompts]
        trees = together[0].propose_rows(together, states)
        assert [[index for index, _ in fork._asked] for fork in together] == [[0], [0, 1], [0, 1]]
        for fork, state, tree in zip(alone, states, trees, strict=True):
            own = fork.propose(state)
            assert own.tokens.tolist() == tree.tokens.tolist() and own.parents.tolist() == tree.parents.tolist()
        for forks in (together, alone):
            for fork, tree in zip(forks, trees, strict=True):
                fork.commit(specdec.acceptance.Acceptance([0, 1], [int(tree.tokens[0]), int(tree.tokens[1])]))
        for a, b in zip(together, alone, strict=True):
            assert [x.asks for x in a.ledgers] == [x.asks for x in b.ledgers]
            assert [x.accepted for x in a.ledgers] == [x.accepted for x in b.ledgers]


# ---------------------------------------------------------------- exactness


@pytest.mark.parametrize(("arch", "shape"), [(a, s) for a in ARCHS for s in ("chain", "tree")])
def test_random_heads_greedy_equality(arch, shape):
    target = tiny_model(arch)
    drafter = MedusaDrafter(random_heads(target), choices=None if shape == "chain" else TREE)
    tokens, expected, stats = greedy(target, drafter)
    assert tokens == expected
    assert max(stats.tree_sizes) == (5 if shape == "chain" else len(TREE) + 1)


@pytest.mark.parametrize(("arch", "shape"), [(a, s) for a in ARCHS for s in ("chain", "tree", "tree, small vocab")])
def test_random_path_heads_greedy_equality(arch, shape):
    target = tiny_model(arch)
    heads = random_heads(target, scale=0.5, path_inputs=True)
    if shape == "tree, small vocab":
        heads.restrict_vocab(torch.arange(3, VOCAB, 2))
    drafter = MedusaDrafter(heads, choices=None if shape == "chain" else TREE)
    tokens, expected, stats = greedy(target, drafter)
    assert tokens == expected
    assert max(stats.tree_sizes) == (5 if shape == "chain" else len(TREE) + 1)


def test_medusa_with_the_controller_and_in_a_composite():
    target = tiny_model("llama")
    for drafter in (
        MedusaDrafter(random_heads(target), TREE),
        MedusaDrafter(random_heads(target, scale=0.5, path_inputs=True), TREE),  # thresholds prune as it builds
        Composite([NGramDrafter(), MedusaDrafter(random_heads(target))]),
    ):
        tokens, expected, stats = greedy(target, drafter, n=60, controller=specdec.Controller())
        assert tokens == expected and len(stats.plans) == len(stats.accept_lengths)


# ---------------------------------------------------------------- training (tiny)


def self_distilled_rows(target, count: int, seed: int) -> list[dict]:
    """Conversations whose answers are the target's own greedy continuations (self-distillation data)."""
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(count):
        prompt = torch.randint(3, VOCAB, (1, 6), generator=gen)
        answer = target.generate(prompt, max_new_tokens=24, do_sample=False, eos_token_id=None)[0, 6:]
        rows.append({"prompt_ids": prompt[0].tolist(), "answer_ids": answer.tolist(), "heldout": False})
        rows[-1] |= {"topk_ids": [[t] for t in answer.tolist()], "topk_logprobs": [[0.0]] * len(answer)}
    return rows


def tiny_cfg(tmp_path, **train) -> OmegaConf:
    return OmegaConf.create(
        {
            "seed": 0,
            "medusa": {"num_heads": 3},
            "train": {
                "epochs": 30, "max_steps": None, "batch_positions": 64, "batch_size": 4, "lr": 1e-2,
                "warmup_steps": 5, "weight_decay": 0.0, "head_decay": 0.8, "heads_weight": 0.2, "grad_accum": 1,
                "mixed_precision": "no", "checkpoint_every": 10_000, "log_every": 10, **train,
            },
        }
    )  # fmt: skip


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Medusa-1 on a tiny target: heads trained on cached features of its own answers."""
    tmp_path = tmp_path_factory.mktemp("medusa")
    target = tiny_model("llama")
    rows, heldout_rows = self_distilled_rows(target, 24, seed=0), self_distilled_rows(target, 6, seed=1)
    features = train_medusa.cache_features(target, rows, 3, 0, 8, tmp_path / "features")
    heldout = train_medusa.cache_features(target, heldout_rows, 3, 0, 8, tmp_path / "heldout")
    heads = MedusaHeads.for_model(target, num_heads=3)
    lm_head = common.frozen_copy(target.get_output_embeddings())
    embed = common.frozen_copy(target.get_input_embeddings())
    before = train_medusa.rank_accuracy(heads, lm_head, embed, heldout, 4)
    log = train_medusa.train_medusa1(tiny_cfg(tmp_path), heads, lm_head, embed, features, tmp_path / "ckpt")
    return target, heads, before, train_medusa.rank_accuracy(heads, lm_head, embed, heldout, 4), log, features


def test_draft_vocab_is_the_most_frequent_answer_tokens():
    rows = [{"answer_ids": [5, 5, 7, 9]}, {"answer_ids": [7, 5, 2]}]
    assert common.draft_vocab(rows, 2).tolist() == [5, 7]
    assert sorted(common.draft_vocab(rows, 10).tolist()) == [2, 5, 7, 9]  # only tokens that occur


def test_head_labels_are_the_tokens_two_plus_k_ahead():
    row = {"prompt_ids": [5, 6, 7], "answer_ids": [8, 9, 10, 11]}
    labels = train_medusa.head_labels([row], 2)[0]  # [T, K]
    # position t: head 0 -> token t+2, head 1 -> t+3, only where that token is an answer token (index >= 3)
    assert labels[:, 0].tolist() == [-100, 8, 9, 10, 11, -100, -100]
    assert labels[:, 1].tolist() == [8, 9, 10, 11, -100, -100, -100]
    short = {"prompt_ids": [5], "answer_ids": [8]}
    paths = train_medusa.head_paths([row, short], 2, pad=0)  # [B, T, K]: tokens t+1, t+2
    assert paths[0].tolist() == [[6, 7], [7, 8], [8, 9], [9, 10], [10, 11], [11, 0], [0, 0]]
    assert paths[1, :2].tolist() == [[8, 0], [0, 0]]


def test_training_lowers_the_loss_and_raises_held_out_accuracy(trained):
    _, _, before, after, log, features = trained
    assert features["hidden"].shape[0] == features["labels"].shape[0] > 0
    assert log[-1]["loss"] < 0.8 * log[0]["loss"]
    # held-out top-1 per head (untrained heads = the base LM head, right where the tiny model's answers cycle)
    assert after[0, 0] > before[0, 0] + 0.2 and after[:, 0].mean() > before[:, 0].mean() + 0.1, (before, after)


def test_trained_heads_greedy_equality_and_acceptance(trained, tmp_path):
    target, heads, _, accuracy, _, _ = trained
    heads.config = type(heads.config)(**{**heads.config.__dict__, "choices": best_choices(accuracy, 10)})
    heads.save_pretrained(tmp_path)
    loaded = MedusaHeads.from_pretrained(tmp_path, target)
    tokens, expected, stats = greedy(target, MedusaDrafter(loaded))
    assert tokens == expected
    _, _, untrained = greedy(target, MedusaDrafter(MedusaHeads.for_model(target, num_heads=3), loaded.choices))
    assert stats.mean_accepted_length > untrained.mean_accepted_length


def test_training_path_heads_raises_accuracy_and_stays_exact(trained, tmp_path):
    target, _, before, _, _, features = trained  # before: untrained heads (= the base LM head), path ones too
    heldout = train_medusa.cache_features(target, self_distilled_rows(target, 6, seed=1), 3, 0, 8, tmp_path / "h")
    heads = MedusaHeads.for_model(target, num_heads=3, path_inputs=True)
    lm_head = common.frozen_copy(target.get_output_embeddings())
    embed = common.frozen_copy(target.get_input_embeddings())
    train_medusa.train_medusa1(tiny_cfg(tmp_path), heads, lm_head, embed, features, tmp_path / "ckpt")
    accuracy = train_medusa.rank_accuracy(heads, lm_head, embed, heldout, 4)
    assert accuracy[0, 0] > before[0, 0] + 0.2 and accuracy[:, 0].mean() > before[:, 0].mean() + 0.1, accuracy
    choices = best_choices(accuracy, 10)
    tokens, expected, stats = greedy(target, MedusaDrafter(heads, choices))
    assert tokens == expected
    untrained = MedusaHeads.for_model(target, num_heads=3, path_inputs=True)
    _, _, untrained_stats = greedy(target, MedusaDrafter(untrained, choices))
    assert stats.mean_accepted_length > untrained_stats.mean_accepted_length


def test_training_resumes_from_a_checkpoint(tmp_path, monkeypatch):
    target = tiny_model("llama")
    features = train_medusa.cache_features(target, self_distilled_rows(target, 8, 0), 3, 0, 8, tmp_path / "f")
    lm_head = common.frozen_copy(target.get_output_embeddings())
    embed = common.frozen_copy(target.get_input_embeddings())
    cfg = tiny_cfg(tmp_path, epochs=2, checkpoint_every=3)
    save = common.save_checkpoint

    def save_then_stop(*args):
        save(*args)
        raise KeyboardInterrupt  # interrupted right after the first checkpoint (batch 3)

    monkeypatch.setattr(common, "save_checkpoint", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        heads = MedusaHeads.for_model(target, num_heads=3)
        train_medusa.train_medusa1(cfg, heads, lm_head, embed, features, tmp_path / "c")
    monkeypatch.setattr(common, "save_checkpoint", save)
    resumed = MedusaHeads.for_model(target, num_heads=3)
    log = train_medusa.train_medusa1(cfg, resumed, lm_head, embed, features, tmp_path / "c")
    straight = MedusaHeads.for_model(target, num_heads=3)
    train_medusa.train_medusa1(cfg, straight, lm_head, embed, features, tmp_path / "s")
    assert log[-1]["batch"] > 3
    for a, b in zip(resumed.state_dict().values(), straight.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b)


def test_medusa2_lora_training_saves_an_adapter_that_loads(tmp_path):
    target = tiny_model("llama")
    rows = self_distilled_rows(target, 8, seed=0)
    heads = MedusaHeads.for_model(target, num_heads=3)
    heads.config = type(heads.config)(**{**heads.config.__dict__, "lora": True})
    peft_target = train_medusa.get_peft_model(
        train_medusa.plain_copy(target), train_medusa.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    )
    cfg = tiny_cfg(tmp_path, epochs=25, log_every=1)
    log = train_medusa.train_medusa2(cfg, heads, peft_target, rows, 0, tmp_path / "c")
    first, last = log[0]["parts"], log[-1]["parts"]  # [LM distillation, head 0, head 1, head 2]
    assert sum(last[1:]) < 0.9 * sum(first[1:])  # the heads learn
    assert last[0] < first[0] + 0.5  # while the adapted target's LM head stays close to the target
    heads.save_pretrained(tmp_path / "out")
    peft_target.save_pretrained(tmp_path / "out" / "lora_adapter")
    adapted, loaded = load_medusa2(target, tmp_path / "out")
    assert any(not torch.equal(a, b) for a, b in zip(adapted.parameters(), target.parameters(), strict=True))
    tokens, expected, _ = greedy(adapted, MedusaDrafter(loaded))
    assert tokens == expected  # lossless with respect to the adapted target
