"""EAGLE-3 heads: exactness of EagleDrafter, tree attention in the head, capture of the target's layers, save/load,
the EAGLE-3 layout vLLM and SGLang load (export, and a checkpoint written here by hand), wrong-model errors."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from safetensors.torch import save_file
from test_medusa import random_heads
from tiny import ARCHS, VOCAB, tiny_model
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

import specdec
from heads.eagle import EagleHead, default_layers, export_eagle3, rope_frequencies
from specdec import verify
from specdec.drafters import Composite, EagleDrafter, MedusaDrafter, NGramDrafter
from specdec.drafters.base import DecodeState
from specdec.tree import TokenTree

PROMPT = torch.tensor([[3, 4, 5, 6, 7, 3, 4, 5, 9, 10]])
SHAPES = {"chain": dict(depth=4, branching=1, tree_budget=4), "tree": dict(depth=4, branching=3, tree_budget=10)}


def random_head(target, seed: int = 0, **kwargs) -> EagleHead:
    torch.manual_seed(seed)
    return EagleHead.for_model(target, **kwargs).eval()


def features(target, head: EagleHead, sequence: torch.Tensor) -> torch.Tensor:
    """`[L, 3H]` the target's features of a plain forward over `sequence` (`[1, L]`)."""
    with torch.no_grad(), verify.aux_hidden_states(target, head.config.layers) as aux:
        target(sequence)
    return aux[-1][0]


def started(head: EagleHead, target, **kwargs) -> EagleDrafter:
    drafter = EagleDrafter(head, **kwargs)
    drafter.start(target)
    return drafter


def first_state(target, head: EagleHead, max_depth: int = 4, **kwargs) -> DecodeState:
    """The state of a generation's first step: the prompt's features but its last token's."""
    return DecodeState(PROMPT, max_depth, features=features(target, head, PROMPT[:, :-1]), **kwargs)


def greedy(target, drafter, n: int = 40, controller=None) -> tuple[list[int], list[int], specdec.SpecStats]:
    expected = target.generate(PROMPT, max_new_tokens=n, do_sample=False, eos_token_id=None)[0].tolist()
    gen = specdec.SpeculativeGenerator(target, drafter, controller=controller)
    out = gen.generate(PROMPT, max_new_tokens=n, eos_token_id=None, return_dict_in_generate=True)
    return out.sequences[0].tolist(), expected, out.spec_stats


# ---------------------------------------------------------------- the target's layers


@pytest.mark.parametrize("arch", ARCHS)
def test_aux_hidden_states_are_the_inputs_of_those_layers_and_nothing_else(arch):
    target = tiny_model(arch, **({"n_layer": 3} if arch == "gpt2" else {"num_hidden_layers": 3}))
    x = PROMPT[:, :7]
    with torch.no_grad():
        reference = target(x, output_hidden_states=True).hidden_states  # [0]: embeddings, [i]: output of layer i-1
        with verify.aux_hidden_states(target, (0, 2, 2)) as aux:
            target(x)
            target(x[:, :3])
    assert len(aux) == 2 and aux[0].shape == (1, 7, 3 * 64) and aux[1].shape == (1, 3, 3 * 64)
    torch.testing.assert_close(aux[0], torch.cat([reference[0], reference[2], reference[2]], dim=-1))
    layers = verify.decoder_layers(target)
    assert not target._forward_hooks and not any(layer._forward_pre_hooks for layer in layers)  # removed on exit
    with pytest.raises(ValueError, match="outside"), verify.aux_hidden_states(target, (3,)):
        pass


def test_default_layers_are_eagle3s_or_spread_over_shallow_targets():
    assert default_layers(32) == (2, 16, 29) and default_layers(30) == (2, 15, 27) and default_layers(7) == (2, 3, 4)
    assert default_layers(6) == (0, 3, 5) and default_layers(3) == (0, 1, 2) and default_layers(2) == (0, 1, 1)
    target = tiny_model("llama", num_hidden_layers=8)
    assert EagleHead.for_model(target).config.layers == (2, 4, 5)
    assert EagleHead.for_model(target, layers=(6, 1, 3)).config.layers == (1, 3, 6)  # ascending, as vLLM concatenates
    with pytest.raises(ValueError, match="must lie in"):
        EagleHead.for_model(target, layers=(1, 2, 8))


# ---------------------------------------------------------------- the head


def test_tree_attention_in_the_head_equals_each_path_alone():
    """Nodes fed as a tree after a context (each sees the context and its ancestors) get the outputs they get when
    their root-to-node path is fed as a plain sequence."""
    target = tiny_model("llama")
    head = random_head(target)
    embed = target.get_input_embeddings()
    gen = torch.Generator().manual_seed(0)
    tree = TokenTree.trie(7, [[1, 2, 3], [1, 4], [5, 6, 7], [5, 8]])
    context = features(target, head, PROMPT[:, :-1])  # positions 0..8, with tokens 1..9
    inputs = torch.randn(len(tree), 64, generator=gen)  # each node's feature (drafting: its parent's output)
    with torch.no_grad():
        cache = head.new_cache()
        head(embed(PROMPT[0, 1:]), head.project(context), torch.arange(9), cache)
        nodes = list(range(1, len(tree)))
        visible = torch.cat([torch.ones(len(nodes), 9, dtype=torch.bool), tree.ancestor_mask[1:, 1:]], dim=1)
        tree_out = head(embed(tree.tokens[1:]), inputs[1:], 8 + tree.depth[1:], cache, visible)
        for node in nodes:
            path = tree.path_to(node)[1:]
            alone = head.new_cache()
            head(embed(PROMPT[0, 1:]), head.project(context), torch.arange(9), alone)
            out = head(embed(tree.tokens[path]), inputs[path], 8 + tree.depth[path], alone)  # a plain sequence
            torch.testing.assert_close(tree_out[node - 1], out[-1], atol=1e-5, rtol=1e-5)


def test_drafter_tree_holds_each_nodes_top_children_scored_along_its_own_path():
    """Every node is one of its parent's `branching` most likely tokens, and its score is the sum of the head's
    log-probabilities along its path, both computed again by feeding the path alone, token by token."""
    target = tiny_model("llama")
    head = random_head(target, draft_vocab=torch.arange(VOCAB - 1, 2, -3))
    embed = target.get_input_embeddings()
    tree = started(head, target, depth=4, branching=3, tree_budget=30).propose(first_state(target, head))
    assert len(tree) > 10 and tree.max_depth == 4 and not tree.is_chain
    context = features(target, head, PROMPT[:, :-1])
    with torch.no_grad():
        for node in range(1, len(tree)):
            cache = head.new_cache()
            hidden = head(embed(PROMPT[0, 1:]), head.project(context), torch.arange(9), cache)[-1:]
            score = 0.0
            for child in tree.path_to(node)[1:]:
                top_lp, top_ids = torch.log_softmax(head.logits(hidden)[0].float(), -1).topk(3)
                top = head.to_target(top_ids).tolist()
                assert int(tree.tokens[child]) in top, (node, child)
                score += float(top_lp[top.index(int(tree.tokens[child]))])
                position = torch.tensor([8 + int(tree.depth[child])])
                hidden = head(embed(tree.tokens[child : child + 1]), hidden, position, cache)
            assert float(tree.scores[node]) == pytest.approx(score, abs=1e-4)


def test_drafter_keeps_the_best_nodes_within_budget_depth_and_threshold():
    target = tiny_model("llama")
    head = random_head(target)
    drafter = started(head, target, depth=5, branching=3, tree_budget=40)
    full = drafter.propose(first_state(target, head))
    for budget in (1, 3, 7):
        small = started(head, target, depth=5, branching=3, tree_budget=40).propose(
            first_state(target, head, budget=budget)
        )
        assert len(small) == budget + 1
        assert sorted(small.scores[1:].tolist()) == pytest.approx(sorted(full.scores[1:].tolist())[-budget:])
    shallow = started(head, target, depth=5, branching=3).propose(first_state(target, head, max_depth=2))
    assert shallow.max_depth == 2
    strict = started(head, target, depth=5, branching=3).propose(first_state(target, head, threshold=0.999))
    assert len(strict) == 2  # the root and the best first-level node, so that acceptance keeps being measured
    assert len(started(head, target).propose(first_state(target, head, max_depth=0))) == 1
    one_token = started(head, target).propose(DecodeState(PROMPT[:, :1], 4))  # no features yet: nothing to draft
    assert len(one_token) == 1


# ---------------------------------------------------------------- exactness


@pytest.mark.parametrize("control", ["fixed", "controller"])
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("arch", ARCHS)
def test_random_head_greedy_equality(arch, shape, control):
    target = tiny_model(arch)
    drafter = EagleDrafter(random_head(target), **SHAPES[shape])
    tokens, expected, stats = greedy(
        target, drafter, controller=specdec.Controller() if control == "controller" else None
    )
    assert tokens == expected
    if control == "fixed":
        assert max(stats.tree_sizes) == SHAPES[shape]["tree_budget"] + 1


@pytest.mark.parametrize("control", ["fixed", "controller"])
def test_accepted_drafts_keep_the_heads_context_equal_to_a_fresh_feed(control):
    """With a draft vocabulary of the target's own answer's tokens a random head gets drafts accepted; after the
    generation the head's cache holds exactly what feeding the whole sequence at once gives."""
    target = tiny_model("llama", num_hidden_layers=4)
    expected = target.generate(PROMPT, max_new_tokens=40, do_sample=False, eos_token_id=None)
    head = random_head(target, draft_vocab=expected[0, 10:].unique())
    drafter = EagleDrafter(head, **SHAPES["tree"])
    tokens, expected, stats = greedy(
        target, drafter, controller=specdec.Controller() if control == "controller" else None
    )
    assert tokens == expected and max(stats.accept_lengths) > 2  # (the controller's plans depend on timings)
    assert control == "controller" or stats.mean_accepted_length > 3
    fed = drafter._context  # the positions fed at the last step that drafted: at least the prompt's and a step's
    assert fed >= len(PROMPT[0])
    sequence = torch.tensor([tokens])
    embeds, context = target.get_input_embeddings()(sequence[0, 1 : fed + 1]), features(target, head, sequence)[:fed]
    fresh = head.new_cache()
    with torch.no_grad():
        head(embeds, head.project(context), torch.arange(fed), fresh)
    torch.testing.assert_close(drafter._cache.keys[..., :fed, :], fresh.keys, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(drafter._cache.values[..., :fed, :], fresh.values, atol=1e-5, rtol=1e-5)


def test_eagle_in_a_composite_keeps_its_context_when_not_asked():
    target = tiny_model("llama")
    expected = target.generate(PROMPT, max_new_tokens=60, do_sample=False, eos_token_id=None)
    eagle = EagleDrafter(random_head(target, draft_vocab=expected[0, 10:].unique()))
    composite = Composite([NGramDrafter(), eagle], skip_gain=0.5)  # the n-gram source often ends the round alone
    depths, propose = [], eagle.propose
    eagle.propose = lambda state: depths.append(state.max_depth) or propose(state)
    tokens, expected, stats = greedy(target, composite, n=60)
    assert tokens == expected and composite.hidden_layers == eagle.hidden_layers
    assert 0 in depths and max(depths) > 0  # asked to draft, and only handed the features
    assert eagle._received == len(tokens) - stats.accept_lengths[-1] - 1  # every position's, up to the last step
    other = EagleDrafter(random_head(tiny_model("llama", num_hidden_layers=4)))
    with pytest.raises(ValueError, match="same target layers"):
        Composite([eagle, other])


@pytest.mark.parametrize("arch", ARCHS)
def test_eagle_medusa_and_ngram_merged_into_one_tree_stay_exact(arch):
    """`eval.methods`' `medusa_eagle_ngram`: every source drafts (skip_gain too high to end a round early) and their
    trees are merged; both hidden-state readers get their states (the final one, and EAGLE's three layers)."""
    target = tiny_model(arch)
    eagle = EagleDrafter(random_head(target), depth=3, branching=2, tree_budget=6)
    medusa = MedusaDrafter(random_heads(target, num_heads=3))
    asked = {"eagle": 0, "medusa": 0}
    for name, drafter in (("eagle", eagle), ("medusa", medusa)):  # a composite asks its sources for rows
        propose = drafter.propose_rows
        drafter.propose_rows = lambda forks, states, p=propose, n=name: (
            asked.__setitem__(n, asked[n] + 1) or p(forks, states)
        )
    composite = Composite([NGramDrafter(), medusa, eagle], skip_gain=100.0)
    tokens, expected, stats = greedy(target, composite, n=40)
    assert tokens == expected
    assert asked["eagle"] > 0 and asked["medusa"] > 0 and max(stats.tree_sizes) > 1


# ---------------------------------------------------------------- saving, loading, wrong models


def drafts(head: EagleHead, target) -> TokenTree:
    return started(head, target, depth=4, branching=3, tree_budget=12).propose(first_state(target, head))


def same_tree(a: TokenTree, b: TokenTree) -> bool:
    return a.tokens.tolist() == b.tokens.tolist() and a.parents.tolist() == b.parents.tolist()


def test_save_load_round_trip_gives_identical_drafts(tmp_path):
    target = tiny_model("llama")
    head = random_head(target, draft_vocab=[9, 3, 40, 41, 100])
    head.save_pretrained(tmp_path)
    loaded = EagleHead.from_pretrained(tmp_path, target)
    assert loaded.config == head.config and loaded.draft_ids.tolist() == [3, 9, 40, 41, 100]
    assert not any("embed" in name for name in loaded.state_dict())  # the target's embeddings are not stored
    assert same_tree(drafts(loaded, target), drafts(head, target))
    bf16 = EagleHead.from_pretrained(tmp_path, target.to(torch.bfloat16))  # the fingerprint survives a dtype change
    assert bf16.fc.weight.dtype == torch.bfloat16


def test_loading_onto_another_model_is_a_clear_error(tmp_path):
    target = tiny_model("llama")
    random_head(target).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="fingerprint"):
        EagleHead.from_pretrained(tmp_path, tiny_model("llama", seed=5))  # same shapes, other weights
    with pytest.raises(ValueError, match="hidden size"):
        EagleHead.from_pretrained(tmp_path, tiny_model("llama", hidden_size=32, intermediate_size=64))
    with pytest.raises(ValueError, match="3 layers"):
        EagleHead.from_pretrained(tmp_path, tiny_model("llama", num_hidden_layers=3))
    with pytest.raises(ValueError, match="fingerprint"):  # the drafter checks too, at start
        EagleDrafter(random_head(target)).start(tiny_model("llama", seed=5))
    with pytest.raises(FileNotFoundError):
        EagleHead.from_pretrained(tmp_path / "nothing", target)
    with pytest.raises(ValueError, match="draft vocabulary"):
        EagleHead.for_model(target, draft_vocab=[1, 1])


# ---------------------------------------------------------------- the EAGLE-3 layout (vLLM, SGLang)


def test_export_import_round_trip_gives_identical_drafts(tmp_path):
    target = tiny_model("llama", num_hidden_layers=4)
    head = random_head(target, draft_vocab=torch.arange(5, VOCAB, 2))
    export_eagle3(head, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLMEagle3"] and config["num_hidden_layers"] == 1
    assert config["draft_vocab_size"] == len(range(5, VOCAB, 2)) and config["vocab_size"] == VOCAB
    assert config["eagle_aux_hidden_state_layer_ids"] == [0, 2, 3]  # vLLM: the state entering layer i
    assert config["eagle_config"]["eagle_aux_hidden_state_layer_ids"] == [-1, 1, 2]  # SGLang: output of layer i
    assert config["tie_word_embeddings"] is False and config["rope_theta"] == 10000.0
    loaded = EagleHead.from_pretrained(tmp_path, target)
    assert loaded.config.layers == head.config.layers and torch.equal(loaded.d2t, head.d2t)
    assert same_tree(drafts(loaded, target), drafts(head, target))
    with pytest.raises(ValueError, match="fingerprint"):  # the exporter's own record of the base model is checked
        EagleHead.from_pretrained(tmp_path, tiny_model("llama", num_hidden_layers=4, seed=5))
    with pytest.raises(ValueError, match="distinct layers"):
        export_eagle3(random_head(tiny_model("llama")), tmp_path / "two-layer")  # (0, 1, 1)


def write_checkpoint(directory, target, config_changes=None, drop=(), **tensors) -> dict[str, torch.Tensor]:
    """An EAGLE-3 checkpoint as trainers publish them (SafeAILab/EAGLE, SpecForge), written directly: a Llama
    config.json and one safetensors file, aux layer ids in SGLang's `eagle_config`, a copy of the embeddings."""
    gen = torch.Generator().manual_seed(1)
    h, kv, inter, draft = 64, 2, 96, 16
    vocab_ids = torch.arange(3, 3 + 4 * draft, 4)  # target ids of the draft vocabulary
    weights = {
        "fc.weight": torch.randn(h, 3 * h, generator=gen) * 0.05,
        "midlayer.input_layernorm.weight": 1 + 0.1 * torch.randn(h, generator=gen),
        "midlayer.hidden_norm.weight": 1 + 0.1 * torch.randn(h, generator=gen),
        "midlayer.post_attention_layernorm.weight": 1 + 0.1 * torch.randn(h, generator=gen),
        "midlayer.self_attn.q_proj.weight": torch.randn(4 * 16, 2 * h, generator=gen) * 0.05,
        "midlayer.self_attn.k_proj.weight": torch.randn(kv * 16, 2 * h, generator=gen) * 0.05,
        "midlayer.self_attn.v_proj.weight": torch.randn(kv * 16, 2 * h, generator=gen) * 0.05,
        "midlayer.self_attn.o_proj.weight": torch.randn(h, 4 * 16, generator=gen) * 0.05,
        "midlayer.mlp.gate_proj.weight": torch.randn(inter, h, generator=gen) * 0.05,
        "midlayer.mlp.up_proj.weight": torch.randn(inter, h, generator=gen) * 0.05,
        "midlayer.mlp.down_proj.weight": torch.randn(h, inter, generator=gen) * 0.05,
        "norm.weight": 1 + 0.1 * torch.randn(h, generator=gen),
        "lm_head.weight": torch.randn(draft, h, generator=gen),
        "d2t": vocab_ids - torch.arange(draft),
        "t2d": torch.isin(torch.arange(VOCAB), vocab_ids),
        "embed_tokens.weight": target.get_input_embeddings().weight.detach().clone(),
        **tensors,
    }
    weights = {k: v for k, v in weights.items() if k not in drop}
    config = {
        "architectures": ["LlamaForCausalLMEagle3"],
        "model_type": "llama",
        "hidden_size": h,
        "intermediate_size": inter,
        "num_attention_heads": 4,
        "num_key_value_heads": kv,
        "num_hidden_layers": 1,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0,
        "max_position_embeddings": 2048,
        "vocab_size": VOCAB,
        "draft_vocab_size": draft,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "eagle_config": {"eagle_aux_hidden_state_layer_ids": [0, 1, 2]},  # SGLang: outputs of layers 0, 1, 2
        **(config_changes or {}),
    }
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config))
    save_file(weights, directory / "model.safetensors")
    return weights


def test_a_checkpoint_written_by_another_tool_loads_and_drafts(tmp_path):
    target = tiny_model("llama", num_hidden_layers=4)
    weights = write_checkpoint(tmp_path, target)
    head = EagleHead.from_pretrained(tmp_path, target)
    assert head.config.layers == (1, 2, 3)  # SGLang's ids are layer outputs: the states entering layers 1, 2, 3
    assert head.config.head_dim == 16 and head.config.intermediate_size == 96
    assert head.config.rope_parameters == {"rope_type": "default", "rope_theta": 500000.0}
    state = head.state_dict()
    for name, tensor in weights.items():
        if name not in ("t2d", "embed_tokens.weight"):
            assert torch.equal(state[name], tensor), name
    assert head.draft_ids.tolist() == torch.arange(3, 3 + 64, 4).tolist()
    tree = drafts(head, target)
    assert len(tree) == 13 and set(tree.tokens[1:].tolist()) <= set(head.draft_ids.tolist())
    tokens, expected, _ = greedy(target, EagleDrafter(head, **SHAPES["tree"]))
    assert tokens == expected
    vllm_style = tmp_path / "vllm"  # vLLM's top-level ids are the states entering those layers
    write_checkpoint(vllm_style, target, {"eagle_aux_hidden_state_layer_ids": [0, 2, 3], "eagle_config": None})
    assert EagleHead.from_pretrained(vllm_style, target).config.layers == (0, 2, 3)


@pytest.mark.parametrize(
    ("config_changes", "tensors", "error", "match"),
    [
        ({"vocab_size": 2 * VOCAB}, {}, ValueError, "vocabulary 256"),
        ({"hidden_size": 32}, {}, ValueError, "hidden size 32"),
        ({"eagle_config": {"eagle_aux_hidden_state_layer_ids": [0, 1, 4]}}, {}, ValueError, "must lie in"),
        ({}, {"embed_tokens.weight": torch.zeros(VOCAB, 64)}, ValueError, "embeddings that differ"),
        ({}, {"d2t": torch.full((16,), VOCAB)}, ValueError, "outside the target's vocabulary"),
        ({"num_hidden_layers": 2}, {}, NotImplementedError, "num_hidden_layers"),
        ({"architectures": ["LlamaForCausalLM"]}, {}, ValueError, "no EAGLE-3 head"),
        ({"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, {}, NotImplementedError, "dynamic"),
    ],
)
def test_a_checkpoint_for_another_model_is_a_clear_error(tmp_path, config_changes, tensors, error, match):
    target = tiny_model("llama", num_hidden_layers=4)
    write_checkpoint(tmp_path, target, config_changes, **tensors)
    with pytest.raises(error, match=match):
        EagleHead.from_pretrained(tmp_path, target)


def test_a_checkpoint_without_ids_reads_eagle3s_default_layers(tmp_path):
    target = tiny_model("llama", num_hidden_layers=8)
    write_checkpoint(tmp_path, target, {"eagle_config": None}, drop=("embed_tokens.weight",))
    assert EagleHead.from_pretrained(tmp_path, target).config.layers == (2, 4, 5)


def test_rotary_scaling_frequencies_are_transformers():
    scaling = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 256}  # fmt: skip
    config = EagleHead.for_model(tiny_model("llama")).config
    inv_freq, attention_scaling = rope_frequencies(
        dataclasses.replace(config, rope_parameters=scaling, max_position_embeddings=2048)
    )
    reference = LlamaRotaryEmbedding(
        LlamaConfig(hidden_size=64, num_attention_heads=4, max_position_embeddings=2048, rope_parameters=scaling)
    )
    torch.testing.assert_close(inv_freq, reference.inv_freq)
    assert attention_scaling == reference.attention_scaling
