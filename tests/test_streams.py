"""Speculative streaming: stream tokens in the verification forward, StreamDrafter's exactness, save/load, training."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf
from test_medusa import PROMPT, greedy, self_distilled_rows
from test_sampling import V, chi_square, tiny_pair
from tiny import ARCHS, VOCAB, tiny_model

import specdec
from heads.streams import CONFIG_FILE, StreamEmbeddings
from specdec import kv, verify
from specdec.control import Plan
from specdec.drafters import Composite, NGramDrafter, StreamDrafter
from specdec.drafters.base import DecodeState
from specdec.drafters.stream import end_probabilities
from specdec.sampling import Sampling
from specdec.tree import Streams, TokenTree
from training import train_streams

TREE = [(0,), (1,), (2,), (0, 0), (0, 1), (1, 0), (0, 0, 0), (0, 0, 1)]


def random_streams(target, k: int = 3, scale: float = 1.0, seed: int = 0, head_layers: int = 0) -> StreamEmbeddings:
    streams = StreamEmbeddings.for_model(target, k, head_layers)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in streams.parameters():
            param.add_(
                scale * torch.randn(param.shape, generator=gen) / (param.shape[-1] ** 0.5 if param.dim() > 1 else 1)
            )
    return streams.eval()


# ---------------------------------------------------------------- the forward


@pytest.mark.parametrize("arch", ARCHS)
def test_streams_leave_the_tree_logits_alone_and_equal_their_path_run_as_a_sequence(arch):
    target = tiny_model(arch)
    streams = random_streams(target)
    prompt = torch.randint(3, VOCAB, (1, 9), generator=torch.Generator().manual_seed(1))
    tree = TokenTree.trie(5, [[7, 8, 9], [7, 10], [11]])
    cache, _ = verify.prefill(target, prompt)
    with torch.no_grad():
        plain = verify.forward_tree(target, cache, tree).logits[0]
        cache, _ = verify.prefill(target, prompt)
        extra = Streams((2, 0, 5), streams.embeds)
        out = verify.forward_tree(target, cache, tree, streams=extra).logits[0]
        assert out.shape[0] == len(tree) + 9 and kv.length(cache) == 9 + len(tree) + 9
        torch.testing.assert_close(out[: len(tree)], plain, rtol=1e-5, atol=1e-5)
        embed = target.get_input_embeddings()
        for node in extra.nodes:  # the node's path then its streams, as one plain sequence
            sequence = embed(torch.cat([prompt[0], tree.tokens[tree.path_to(node)]]))
            alone = target(inputs_embeds=torch.cat([sequence, streams.embeds])[None]).logits[0, -3:]
            torch.testing.assert_close(out[extra.rows(node, len(tree))], alone, rtol=1e-5, atol=1e-5)
    kv.keep_path(cache, 9, [0, 1, 2])  # the streams' entries leave with the rejected nodes
    assert kv.length(cache) == 12


def test_training_forward_is_the_verifiers():
    """What `train_streams` learns from is what the verifier scores at inference."""
    target = tiny_model("llama")
    streams = random_streams(target)
    ids = torch.randint(3, VOCAB, (14,), generator=torch.Generator().manual_seed(2))
    anchors = torch.tensor([5, 9, 11])
    with torch.no_grad():
        context, states = train_streams.stream_forward(target, ids, anchors, streams.embeds)
        predicted = streams.logits(states, target.get_output_embeddings())  # no blocks: the target's own logits
        torch.testing.assert_close(context, target(ids[None]).logits[0], rtol=1e-5, atol=1e-5)
        for i, a in enumerate(anchors.tolist()):
            cache, _ = verify.prefill(target, ids[None, :a])
            tree = TokenTree.chain(int(ids[a]))
            out = verify.forward_tree(target, cache, tree, streams=Streams((0,), streams.embeds)).logits[0]
            torch.testing.assert_close(predicted[i], out[1:], rtol=1e-5, atol=1e-5)


def test_streams_structure_and_bad_input():
    tree = TokenTree.trie(5, [[7, 8], [9]])
    streams = Streams((1, 0), torch.zeros(2, 4))
    assert len(streams) == 4 and streams.rows(1, 4) == slice(4, 6) and streams.rows(2, 4) is None
    assert streams.depth(tree).tolist() == [2, 3, 1, 2]
    seen = streams.ancestor_mask(tree).int().tolist()
    assert seen[1] == [1, 1, 0, 0, 1, 1, 0, 0]  # node 1's second stream: root, node 1, its first stream, itself
    assert seen[2] == [1, 0, 0, 0, 0, 0, 1, 0]
    with pytest.raises(ValueError, match="distinct"):
        Streams((1, 1), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="start=0"):
        verify.forward_tree(tiny_model(), kv.new_cache(tiny_model()), tree, start=1, streams=streams)


# ---------------------------------------------------------------- the drafter


def test_drafter_builds_the_next_tree_from_the_streams_and_splits_the_budget():
    target = tiny_model("llama")
    drafter = StreamDrafter(random_streams(target, k=3), choices=TREE, max_streamed=2)
    drafter.start(target)
    drafter._lm_head = torch.nn.Linear(VOCAB, VOCAB, bias=False)  # states that are their own logits, for the test
    torch.nn.init.eye_(drafter._lm_head.weight)
    logits = torch.full((3, VOCAB), -10.0)
    for stream, first in enumerate((20, 30, 40)):  # stream j's ranked candidates for depth j
        logits[stream, [first, first + 1, first + 2]] = torch.tensor([3.0, 2.0, 1.0])
    tree = drafter.propose(DecodeState(PROMPT, max_depth=3, streams=logits))
    assert tree.tokens.tolist() == [10, 20, 21, 22, 30, 31, 30, 40, 41]
    assert tree.parents.tolist() == [-1, 0, 0, 0, 1, 1, 2, 4, 4]
    assert len(drafter.propose(DecodeState(PROMPT, max_depth=3, budget=4, streams=logits))) == 5
    assert drafter.propose(DecodeState(PROMPT, max_depth=3)).tokens.tolist() == [10]  # no streams came back
    assert drafter.stream_budget(DecodeState(PROMPT, max_depth=0)) == 0  # a plain step streams nothing
    assert drafter.stream_budget(DecodeState(PROMPT, max_depth=3, free_only=True)) == 0
    assert drafter.stream_budget(DecodeState(PROMPT, max_depth=3, budget=4)) == 3  # one group at least
    assert drafter.stream_budget(DecodeState(PROMPT, max_depth=3, budget=12)) == 6  # half the budget, 2 at most
    assert drafter.stream_budget(DecodeState(PROMPT, max_depth=3)) == 6
    # the streamed nodes are those likeliest to end the accepted path
    chain = TokenTree(torch.tensor([1, 2, 3]), torch.tensor([-1, 0, 1]), torch.tensor([0.0, -0.1, -3.0]).log1p())
    ending = end_probabilities(chain)
    streams = drafter.streams(chain, DecodeState(PROMPT, max_depth=3, budget=12))
    assert streams.nodes == tuple(sorted(range(3), key=lambda i: -ending[i])[:2])


@pytest.mark.parametrize(("arch", "shape"), [(a, s) for a in ARCHS for s in ("chain", "tree", "tree, blocks")])
def test_random_streams_greedy_equality(arch, shape):
    target = tiny_model(arch)
    streams = random_streams(target, head_layers=int(shape == "tree, blocks"))
    drafter = StreamDrafter(streams, choices=None if shape == "chain" else TREE)
    tokens, expected, stats = greedy(target, drafter)
    assert tokens == expected
    assert max(stats.tree_sizes) > 1 + 3  # trees were drafted from the streams, not only the root and its streams


@pytest.mark.parametrize("arch", ARCHS)
def test_the_plain_step_before_a_probe_scores_streams_for_the_probe_to_draft_from(arch):
    """A probe after plain steps drafts from streams scored below the root in the plain step before it
    (`Plan.prepare`); without them it would verify the root and new streams only, and teach the controller nothing."""
    target = tiny_model(arch)

    class ProbeEveryThird(specdec.Controller):  # plain, plain before a probe, probe; again
        def plan(self) -> Plan:
            self.calls = getattr(self, "calls", 0) + 1
            if self.calls % 3:
                return Plan(False, 0, 0, 0.0, prepare=self.calls % 3 == 2)
            return Plan(True, 3, 12, 0.0)

    controller = ProbeEveryThird(specdec.ControlConfig(pad_steps=False))
    tokens, expected, stats = greedy(target, StreamDrafter(random_streams(target), TREE), n=30, controller=controller)
    assert tokens == expected
    plain, prepare, probe = stats.tree_sizes[0:9:3], stats.tree_sizes[1:9:3], stats.tree_sizes[2:9:3]
    assert plain == [1, 1, 1] and prepare == [1 + 3] * 3  # the root and its 3 streams
    assert min(probe) > 1 + 3  # a tree drafted from them (and streams below it)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Streams trained on a tiny target's own greedy answers (120 steps; seconds), measured on those answers (a random
    target's continuations of other prompts have nothing to generalise from). Weights of the default scale (0.02)
    give near-uniform logits that one input vector can hardly move: this target's are 5x larger."""
    target = tiny_model("llama", initializer_range=0.1)
    rows = [r | {"source": "tiny"} for r in self_distilled_rows(target, 12, seed=0)]
    cfg = OmegaConf.create(
        {
            "seed": 0,
            "train": {
                "anchors": 16, "step_decay": 0.8, "soft": 0.5, "epochs": 10, "max_steps": None, "lr": 5e-2,
                "warmup_steps": 5, "weight_decay": 0.0, "grad_accum": 1, "checkpoint_every": 10_000, "log_every": 10,
            },
        }
    )  # fmt: skip
    streams, lm_head = StreamEmbeddings.for_model(target, 3), target.get_output_embeddings()
    before = train_streams.heldout_accuracy(streams, target, lm_head, rows, 4, None)
    log = train_streams.train(cfg, streams, target, lm_head, rows, tmp_path_factory.mktemp("streams") / "ckpt")
    after = train_streams.heldout_accuracy(streams, target, lm_head, rows, 4, None)
    return target, streams.eval(), before, after, log


def test_training_lowers_the_loss_and_raises_acceptance(trained):
    _, _, before, after, log = trained
    assert log[-1]["loss"] < 0.97 * log[0]["loss"]  # bounded below by the near-uniform target's entropy
    gained = [a - b for a, b in zip(after["chain"]["overall"], before["chain"]["overall"], strict=True)]
    assert min(gained) >= 0 and sum(gained) > 0.1, (before["chain"], after["chain"])
    assert after["rank_accuracy"].shape == (3, 4)
    assert after["rank_accuracy"][0, 0] >= after["chain"]["overall"][0] - 1e-6  # rank 0 of stream 1 is the chain's


@pytest.mark.parametrize("control", [False, True])
def test_trained_streams_greedy_equality_and_acceptance(trained, control):
    target, streams, *_ = trained
    prompts = [PROMPT, torch.tensor([[7, 3, 9, 12, 40, 41]])]
    for prompt in prompts:
        controller = specdec.Controller() if control else None
        tokens, expected, stats = greedy(
            target, StreamDrafter(streams, TREE), n=48, controller=controller, prompt=prompt
        )
        assert tokens == expected
        if control:  # on a tiny model verification grows with every token: the controller soon falls back
            speculative = [size for plan, size in zip(stats.plans, stats.tree_sizes, strict=True) if plan["speculate"]]
            assert max(speculative) > 1 + 3 and stats.fallback_steps > 0  # streams, not padded plain steps
            for plan, size in zip(stats.plans, stats.tree_sizes, strict=True):  # streams count in the plan's budget
                pad = controller.config.pad_max  # plain steps: padded with guesses where that was measured cheaper
                assert size <= (1 + max(plan["budget"], 1 + 3) if plan["speculate"] else pad)
        else:
            assert max(stats.accept_lengths) > 1  # drafts from the streams were accepted


def test_streams_in_a_composite_with_ngrams(trained):
    target, streams, *_ = trained
    drafter = Composite([NGramDrafter(), StreamDrafter(streams, TREE)])
    tokens, expected, stats = greedy(target, drafter, n=60, controller=specdec.Controller())
    assert tokens == expected and len(stats.plans) == len(stats.accept_lengths)
    with pytest.raises(ValueError, match="at most one streaming source"):
        Composite([StreamDrafter(streams), StreamDrafter(streams)])


def test_streams_sample_the_target_distribution():
    """Tokens 2 and 3 of a sampled answer: token 2 is drafted from the streams that the first step scored."""
    target, _ = tiny_pair()
    x = torch.tensor([[3, 4, 5, 3, 4, 5, 3, 4]])
    sampling = Sampling(temperature=1.0)
    drafter = StreamDrafter(random_streams(target, k=2), [(0,), (1,), (0, 0)])
    gen = specdec.SpeculativeGenerator(target, drafter, controller=None)
    rng = torch.Generator().manual_seed(0)
    counts = torch.zeros(V, V)
    drafted = 0
    for _ in range(1500):
        out = gen.generate(x, max_new_tokens=3, do_sample=True, eos_token_id=None, generator=rng,
                           return_dict_in_generate=True)  # fmt: skip
        b, c = out.sequences[0, -2:].tolist()
        counts[b, c] += 1
        drafted += max(out.spec_stats.tree_sizes) > 3  # a step verified a drafted tree and its streams
    with torch.no_grad():
        first = sampling.probs(target(x).logits[0, -1:])[0]  # [V]
        two = torch.cat([x.repeat(V, 1), torch.arange(V)[:, None]], 1)
        second = sampling.probs(target(two).logits[:, -1])  # [V(a), V(b)]
        three = torch.cat([two.repeat_interleave(V, 0), torch.arange(V).repeat(V)[:, None]], 1)
        third = sampling.probs(target(three).logits[:, -1]).view(V, V, V)  # [a, b, c]
    exact = (first[:, None, None] * second[:, :, None] * third).sum(0)  # [b, c]
    stat, critical = chi_square(counts, exact)
    assert stat < critical, f"chi-square {stat:.1f} >= {critical:.1f}"
    assert drafted == 1500


# ---------------------------------------------------------------- save, load, refusals


def test_untrained_blocks_are_the_lm_head_and_blocks_learn(tmp_path):
    target = tiny_model("llama", initializer_range=0.1)
    rows = [r | {"source": "tiny"} for r in self_distilled_rows(target, 6, seed=0)]
    plain, blocks = random_streams(target), StreamEmbeddings.for_model(target, 3, head_layers=1)
    with torch.no_grad():
        blocks.embeds.copy_(plain.embeds)
        hidden = torch.randn(5, 3, 64)
        lm_head = target.get_output_embeddings()
        torch.testing.assert_close(blocks.logits(hidden, lm_head), plain.logits(hidden, lm_head))
    cfg = OmegaConf.create(
        {
            "seed": 0,
            "train": {
                "anchors": 16, "step_decay": 0.8, "soft": 0.5, "epochs": 4, "max_steps": None, "lr": 5e-2,
                "head_lr": 1e-2, "warmup_steps": 2, "weight_decay": 0.0, "grad_accum": 1, "checkpoint_every": 10_000,
                "log_every": 4,
            },
        }
    )  # fmt: skip
    before = train_streams.heldout_accuracy(blocks, target, lm_head, rows, 4, None)["chain"]["overall"]
    train_streams.train(cfg, blocks, target, lm_head, rows, tmp_path / "ckpt")
    after = train_streams.heldout_accuracy(blocks, target, lm_head, rows, 4, None)["chain"]["overall"]
    assert after[0] > before[0] + 0.1, (before, after)
    assert any(p.abs().sum() > 0 for p in blocks.heads.parameters())  # the blocks were trained, not only the vectors


def test_save_load_round_trip_and_wrong_model_errors(tmp_path):
    target = tiny_model("llama")
    streams = random_streams(target, head_layers=1)
    streams.save_pretrained(tmp_path / "s")
    loaded = StreamEmbeddings.from_pretrained(tmp_path / "s", target)
    assert loaded.config == streams.config
    for (name, value), (_, expected) in zip(loaded.state_dict().items(), streams.state_dict().items(), strict=True):
        torch.testing.assert_close(value, expected, msg=name)
    with pytest.raises(ValueError, match="fingerprint mismatch"):
        StreamEmbeddings.from_pretrained(tmp_path / "s", tiny_model("llama", seed=5))
    with pytest.raises(ValueError, match="hidden size"):
        StreamDrafter(loaded).start(tiny_model("llama", hidden_size=32))
    with pytest.raises(FileNotFoundError, match=CONFIG_FILE):
        StreamEmbeddings.from_pretrained(tmp_path / "nothing", target)
    with pytest.raises(ValueError, match="at most 3 deep"):
        StreamDrafter(streams, choices=[(0, 0, 0, 0)])


def test_a_batch_with_streams_is_a_clear_error():
    target = tiny_model("llama")
    gen = specdec.SpeculativeGenerator(target, StreamDrafter(random_streams(target)))
    batch = torch.tensor([[3, 4, 5, 6], [0, 7, 8, 9]])
    with pytest.raises(ValueError, match="one prompt per call"):
        gen.generate(batch, attention_mask=(batch != 0).long(), max_new_tokens=4, pad_token_id=0)
