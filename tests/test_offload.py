"""Targets dispatched by accelerate (layers offloaded to disk or the CPU): exact greedy output for every draft
source, weights read where they are offloaded, and a controller that grows trees when verifying is flat."""

from __future__ import annotations

import itertools

import accelerate
import pytest
import torch
from test_control import Controller, simulate
from tiny import VOCAB, small_draft, tiny_model
from transformers import AutoTokenizer

import specdec
from heads.eagle import EagleHead
from heads.medusa import MedusaHeads
from specdec import devices
from specdec.control import ControlConfig
from specdec.drafters import EagleDrafter, MedusaDrafter, ModelDrafter, NGramDrafter, NGramMemory
from specdec.models import ASSETS, BUILTIN_DRAFT, fingerprint

PROMPT = torch.tensor([[3, 4, 5, 6, 7, 3, 4, 5, 9, 10, 3, 4, 5]])
# tiny Llama's modules, as a device map: embeddings and final norm in memory, every layer and the LM head on disk
PARTLY_ON_DISK = {
    "model.embed_tokens": "cpu",
    "model.rotary_emb": "cpu",
    "model.layers.0": "disk",
    "model.layers.1": "disk",
    "model.norm": "cpu",
    "lm_head": "disk",
}


def saved_tiny(directory, **overrides):
    """A tiny random Llama saved with a tokenizer (any: the tests feed token ids), so `load_model` reads it."""
    model = tiny_model("llama", **overrides)
    model.save_pretrained(directory)
    AutoTokenizer.from_pretrained(ASSETS / BUILTIN_DRAFT).save_pretrained(directory)
    return model


def offloaded(how: str, tmp_path, **overrides):
    """(the tiny target in memory, the same weights dispatched by accelerate `how`)."""
    if how in ("disk_offload", "cpu_offload"):
        model = tiny_model("llama", **overrides)
        copy = tiny_model("llama", **overrides)
        if how == "disk_offload":
            return model, accelerate.disk_offload(copy, tmp_path / "offload")
        return model, accelerate.cpu_offload(copy, execution_device=torch.device("cpu"))
    model = saved_tiny(tmp_path / "model", **overrides)
    device_map = {"": "disk"} if how == "all on disk" else PARTLY_ON_DISK
    target, _ = specdec.load_model(
        tmp_path / "model", attn_implementation="sdpa", device_map=device_map, offload_folder=tmp_path / "offload"
    )
    return model, target


def greedy(target, drafter, n: int = 40, controller=None):
    expected = target.generate(PROMPT, max_new_tokens=n, do_sample=False, eos_token_id=None)
    gen = specdec.SpeculativeGenerator(target, drafter, controller=controller)
    out = gen.generate(PROMPT, max_new_tokens=n, eos_token_id=None, return_dict_in_generate=True)
    return out.sequences, expected, out.spec_stats


def noisy(heads: MedusaHeads, scale: float = 0.5) -> MedusaHeads:
    """Untrained heads propose the LM head's own top tokens; noise makes some of them wrong."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in heads.parameters():
            param.add_(scale * torch.randn(param.shape, generator=gen))
    return heads.eval()


HOW = ["partly on disk", "all on disk", "disk_offload", "cpu_offload"]


@pytest.mark.parametrize("how", HOW)
def test_weights_are_offloaded_and_read_where_they_are(how, tmp_path):
    model, target = offloaded(how, tmp_path, tie_word_embeddings=True)
    assert devices.is_offloaded(target)  # some weights on `meta`: `model.device` may say so
    assert devices.input_device(target) == torch.device("cpu")
    assert devices.compute_dtype(target) == torch.float32
    assert devices.vocab_size(target) == VOCAB
    assert fingerprint(target) == fingerprint(model)
    head = target.get_output_embeddings()
    was_offloaded = devices.is_offloaded(head)  # not where it is tied to embeddings kept in memory
    with devices.onloaded(head):
        assert torch.equal(head.weight, model.get_output_embeddings().weight)
    assert devices.is_offloaded(head) == was_offloaded  # offloaded again after the block


@pytest.mark.parametrize("how", HOW)
def test_ngram_greedy_equality(how, tmp_path):
    _, target = offloaded(how, tmp_path)
    tokens, expected, stats = greedy(target, NGramDrafter(memory=NGramMemory()))
    assert torch.equal(tokens, expected) and max(stats.tree_sizes) > 1
    tokens, expected, _ = greedy(target, NGramDrafter(), controller=specdec.Controller())
    assert torch.equal(tokens, expected)


@pytest.mark.parametrize("how", ["partly on disk", "disk_offload"])
def test_draft_model_greedy_equality(how, tmp_path):
    _, target = offloaded(how, tmp_path)
    for drafter in (ModelDrafter(small_draft()), ModelDrafter(small_draft(), branching=1, depth=4)):
        tokens, expected, stats = greedy(target, drafter)
        assert torch.equal(tokens, expected) and max(stats.tree_sizes) > 2
    # the draft offloaded too
    draft = accelerate.disk_offload(small_draft(), tmp_path / "draft")
    tokens, expected, _ = greedy(target, ModelDrafter(draft), controller=specdec.Controller())
    assert torch.equal(tokens, expected)


@pytest.mark.parametrize("how", HOW)
@pytest.mark.parametrize("kind", ["shared", "own LM heads", "path, small vocab"])
def test_medusa_greedy_equality(how, kind, tmp_path):
    model, target = offloaded(how, tmp_path)
    kwargs = {"own LM heads": {"shared_lm_head": False}, "path, small vocab": {"path_inputs": True}}.get(kind, {})
    heads = MedusaHeads.for_model(target, num_heads=2, **kwargs)
    assert all(p.device.type == "cpu" for p in heads.parameters())  # where the target computes, not on `meta`
    heads = noisy(heads)
    if kind == "path, small vocab":
        heads.restrict_vocab(torch.arange(3, VOCAB, 2))
    heads.check(model)  # the same weights as the model in memory
    drafter = MedusaDrafter(heads, choices=[(0,), (1,), (2,), (0, 0), (0, 1), (1, 0)])
    tokens, expected, stats = greedy(target, drafter)
    assert torch.equal(tokens, expected) and max(stats.tree_sizes) == 7
    tokens, expected, _ = greedy(target, drafter, controller=specdec.Controller())
    assert torch.equal(tokens, expected)


@pytest.mark.parametrize("how", HOW)
@pytest.mark.parametrize("source", ["medusa", "eagle"])
def test_heads_embed_draft_tokens_without_reading_offloaded_embeddings_again(how, source, tmp_path):
    """Path-conditioned Medusa heads and EAGLE embed draft tokens at every level of every step: where accelerate
    offloaded the target's embeddings, from a copy read once at the start (each call of the offloaded module reads
    its weight again), so only the target's own forwards call it; the output stays the target's."""
    _, target = offloaded(how, tmp_path)
    if source == "medusa":
        heads = noisy(MedusaHeads.for_model(target, num_heads=2, path_inputs=True))
        drafter = MedusaDrafter(heads, choices=[(0,), (1,), (0, 0), (0, 1), (1, 0)])
    else:
        torch.manual_seed(0)
        drafter = EagleDrafter(EagleHead.for_model(target).eval(), depth=4, branching=2, tree_budget=6)
        assert all(p.device.type == "cpu" for p in drafter.head.parameters())  # not on `meta`
    expected = target.generate(PROMPT, max_new_tokens=24, do_sample=False, eos_token_id=None)
    embedding = target.get_input_embeddings()
    calls = []
    embedding.register_forward_hook(lambda *_: calls.append(1))
    out = specdec.SpeculativeGenerator(target, drafter, controller=None).generate(
        PROMPT, max_new_tokens=24, eos_token_id=None, return_dict_in_generate=True
    )
    assert torch.equal(out.sequences, expected) and max(out.spec_stats.tree_sizes) > 2
    if devices.is_offloaded(embedding):
        assert len(calls) == out.spec_stats.target_forwards
    else:  # in memory ("partly on disk" keeps them so): the drafter calls the module itself
        assert len(calls) > out.spec_stats.target_forwards


def test_saved_heads_load_onto_the_offloaded_target(tmp_path):
    model, target = offloaded("all on disk", tmp_path)
    noisy(MedusaHeads.for_model(model, num_heads=2)).save_pretrained(tmp_path / "heads")
    heads = MedusaHeads.from_pretrained(tmp_path / "heads", target)
    tokens, expected, _ = greedy(target, MedusaDrafter(heads))
    assert torch.equal(tokens, expected)


def test_sampling_on_an_offloaded_target_is_seeded(tmp_path):
    _, target = offloaded("partly on disk", tmp_path)
    gen = specdec.SpeculativeGenerator(target, NGramDrafter(), controller=None)
    runs = [
        gen.generate(PROMPT, max_new_tokens=24, do_sample=True, generator=torch.Generator().manual_seed(3))
        for _ in range(2)
    ]
    assert torch.equal(runs[0], runs[1]) and runs[0].shape[1] == PROMPT.shape[1] + 24


# ---------------------------------------------------------------- the controller on flat verification


def offloaded_verify(n: int) -> float:
    """SmolLM2 bf16 with every weight on disk (GUIDE.md §5): 147 ms for 1 token, 200 for 16, 284 for 64."""
    return 0.147 + 0.053 * (n - 1) / 15 if n <= 16 else 0.200 + 0.084 * (n - 16) / 48


def in_memory_verify(n: int) -> float:
    """The same target in memory (fp32 on this CPU): 80 ms for 1 token, 108 for 8, 133 for 16, 164 for 32."""
    points = [(1, 0.080), (4, 0.101), (8, 0.108), (16, 0.133), (32, 0.164), (64, 0.240)]
    for (n0, t0), (n1, t1) in itertools.pairwise(points):
        if n <= n1:
            return t0 + (t1 - t0) * (n - n0) / (n1 - n0)
    return points[-1][1]


@pytest.mark.parametrize(("accept_rate", "max_budget"), [(0.3, 32), (0.5, 32), (0.7, 64)])
def test_flat_verification_grows_the_trees(accept_rate, max_budget):
    """The same draft quality: where a tree verifies at about a step's cost, the controller plans larger budgets
    (up to its `max_budget`: at 0.7 both reach the default 32)."""
    budgets = {}
    for name, verify in (("offloaded", offloaded_verify), ("in memory", in_memory_verify)):
        controller = Controller(ControlConfig(max_budget=max_budget))
        simulate(controller, 100, accept_rate=accept_rate, verify=verify, draft_per_level=0.0005)
        budgets[name] = [p["budget"] for p in controller.history[-50:] if p["speculate"]]
    assert len(budgets["offloaded"]) == 50  # always speculating
    assert sum(budgets["offloaded"]) > 1.5 * sum(budgets["in memory"])
