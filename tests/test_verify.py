"""Tree attention: every node gets the logits of its root-to-node path run as a plain sequence."""

import pytest
import torch
from tiny import ARCHS, VOCAB, tiny_model
from transformers import LlamaConfig

from specdec import attention, kv, verify
from specdec.tree import TokenTree


def sample_tree() -> TokenTree:
    gen = torch.Generator().manual_seed(0)
    seqs = [torch.randint(3, VOCAB, (d,), generator=gen).tolist() for d in (4, 2, 3, 1)]
    seqs += [[*seqs[0][:2], 5, 6], [*seqs[2][:1], 7]]  # branches off shared prefixes
    return TokenTree.trie(9, seqs)


def path_logits(model, prefix: torch.Tensor, tree: TokenTree, path: list[int]) -> torch.Tensor:
    sequence = torch.cat([prefix[0], tree.tokens[path]]).unsqueeze(0)
    return model(sequence).logits[0, prefix.shape[1] :]  # [len(path), V]


@pytest.mark.parametrize("attn", ["eager", "sdpa", "sdpa_tree"])
@pytest.mark.parametrize("arch", ARCHS)
@torch.inference_mode()
def test_tree_logits_equal_path_logits(arch, attn):
    model = tiny_model(arch, attn)
    prefix = torch.randint(3, VOCAB, (1, 11), generator=torch.Generator().manual_seed(1))
    tree = sample_tree()
    cache, _ = verify.prefill(model, prefix)
    logits = verify.forward_tree(model, cache, tree).logits[0]  # [N, V]
    assert kv.length(cache) == prefix.shape[1] + len(tree)
    for path in tree.paths:
        torch.testing.assert_close(logits[path], path_logits(model, prefix, tree, path), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@torch.inference_mode()
def test_feeding_a_tree_in_parts_equals_one_pass(arch):
    """Drafters feed a tree level by level (`start > 0`); the logits must not change."""
    model = tiny_model(arch)
    prefix = torch.randint(3, VOCAB, (1, 6), generator=torch.Generator().manual_seed(2))
    tree = sample_tree()
    whole = verify.forward_tree(model, verify.prefill(model, prefix)[0], tree).logits[0]
    cache, _ = verify.prefill(model, prefix)
    parts = [verify.forward_tree(model, cache, tree.select(torch.arange(len(tree)) < 4)).logits[0]]
    parts.append(verify.forward_tree(model, cache, tree, start=4).logits[0])
    torch.testing.assert_close(torch.cat(parts), whole, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("attn", ["eager", "sdpa", "sdpa_tree"])
@torch.inference_mode()
def test_feeding_a_tree_node_by_node_equals_one_pass(attn):
    """One new node at a time: a node that sees every cached entry runs unmasked (a plain step), a node with
    cached non-ancestors (an earlier branch) still gets the tree mask."""
    model = tiny_model("llama", attn)
    prefix = torch.randint(3, VOCAB, (1, 6), generator=torch.Generator().manual_seed(3))
    tree = sample_tree()
    whole = verify.forward_tree(model, verify.prefill(model, prefix)[0], tree).logits[0]
    cache, _ = verify.prefill(model, prefix)
    parts = [verify.forward_tree(model, cache, tree.select(torch.arange(len(tree)) < 1)).logits[0]]
    parts += [
        verify.forward_tree(model, cache, tree.select(torch.arange(len(tree)) <= k), start=k).logits[0]
        for k in range(1, len(tree))
    ]
    torch.testing.assert_close(torch.cat(parts), whole, rtol=1e-5, atol=1e-5)


def test_mask_is_float_additive_with_prefix_visible():
    tree = TokenTree.trie(0, [[1, 2], [3]])
    mask = verify.tree_attention_mask(tree, prefix_len=2, dtype=torch.float32)
    assert mask.shape == (1, 1, 4, 6) and mask.dtype == torch.float32
    visible = mask[0, 0] == 0
    assert visible[:, :2].all()
    assert torch.equal(visible[:, 2:], tree.ancestor_mask)
    assert (mask[0, 0][~visible] == torch.finfo(torch.float32).min).all()


def test_flash_attention_is_refused():
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=1, num_attention_heads=4)
    config._attn_implementation = "flash_attention_2"  # cannot be instantiated on CPU; the check reads the config
    with pytest.raises(ValueError, match="attn_implementation='sdpa_tree'"):
        verify.check_supported(config)


def test_flex_attention_model_is_refused():
    model = tiny_model("llama", attn="flex_attention")
    with pytest.raises(ValueError, match="flex_attention"):
        verify.check_supported(model.config)


def test_linear_attention_cache_layers_are_refused():
    config = LlamaConfig(vocab_size=VOCAB, num_hidden_layers=2, layer_types=["linear_attention", "full_attention"])
    with pytest.raises(ValueError, match="linear_attention"):
        verify.check_supported(config)


@torch.inference_mode()
def test_last_logits_only_is_the_last_row_of_the_full_logits():
    model = tiny_model("llama")
    prefix = torch.randint(3, VOCAB, (1, 6), generator=torch.Generator().manual_seed(4))
    tree = TokenTree.chain(9, [4, 5, 6])
    full = verify.forward_tree(model, verify.prefill(model, prefix)[0], tree).logits[0]
    last = verify.forward_tree(model, verify.prefill(model, prefix)[0], tree, last_logits_only=True).logits[0]
    assert last.shape == (1, full.shape[-1])
    torch.testing.assert_close(last, full[-1:], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gpt2"])
@torch.inference_mode()
def test_sdpa_tree_gives_sdpa_logits_without_copying_grouped_keys(arch, monkeypatch):
    """A masked tree step of a grouped-query model reaches torch's kernel with the uncopied key/value heads and
    `enable_gqa`; single-token steps, and models without grouped-query attention (gpt2), go to transformers'
    sdpa. Logits are sdpa's either way."""
    sdpa, tree_model = tiny_model(arch, "sdpa"), tiny_model(arch, "sdpa_tree")
    assert tree_model.config._attn_implementation == "sdpa_tree"
    verify.check_supported(tree_model.config)
    kernel_calls, fallback_calls = [], []
    kernel, fallback = torch.nn.functional.scaled_dot_product_attention, attention.sdpa_attention_forward

    def record_kernel(query, key, *args, **kwargs):
        kernel_calls.append((query.shape[1], key.shape[1], kwargs.get("enable_gqa", False)))
        return kernel(query, key, *args, **kwargs)

    def record_fallback(*args, **kwargs):
        fallback_calls.append(args[1].shape[2])  # query [B, H, q, D]
        return fallback(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", record_kernel)
    monkeypatch.setattr(attention, "sdpa_attention_forward", record_fallback)
    prefix = torch.randint(3, VOCAB, (1, 7), generator=torch.Generator().manual_seed(5))
    tree = sample_tree()
    expected = verify.forward_tree(sdpa, verify.prefill(sdpa, prefix)[0], tree).logits[0]
    cache, _ = verify.prefill(tree_model, prefix)
    kernel_calls.clear()
    fallback_calls.clear()
    logits = verify.forward_tree(tree_model, cache, tree).logits[0]
    torch.testing.assert_close(logits, expected, rtol=1e-6, atol=1e-6)
    layers, heads = tree_model.config.num_hidden_layers, tree_model.config.num_attention_heads
    if arch == "gpt2":  # one key/value head per query head: nothing to save, transformers' sdpa runs
        assert fallback_calls == [len(tree)] * layers
    else:
        assert fallback_calls == [] and kernel_calls == [(heads, tree_model.config.num_key_value_heads, True)] * layers
        fallback_calls.clear()
        step = TokenTree.chain(int(tree.tokens[0]))  # one token that sees every cached entry: a plain step
        verify.forward_tree(tree_model, verify.prefill(tree_model, prefix)[0], step)
        assert fallback_calls[-layers:] == [1] * layers
