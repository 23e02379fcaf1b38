"""Cache compaction: keeping an accepted branch then continuing equals a fresh prefill."""

import pytest
import torch
from tiny import VOCAB, tiny_model

from specdec import kv, verify
from specdec.tree import TokenTree


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gpt2"])
@pytest.mark.parametrize("path_leaf", [0, 3, 5, 6])  # root only, first branch, a later branch, deepest leaf
@torch.inference_mode()
def test_compaction_then_continuation_equals_fresh_prefill(arch, path_leaf):
    model = tiny_model(arch)
    prefix = torch.randint(3, VOCAB, (1, 8), generator=torch.Generator().manual_seed(0))
    tree = TokenTree.trie(11, [[20, 21, 22], [30, 31], [20, 40, 41]])
    path = tree.path_to(path_leaf)
    cache, _ = verify.prefill(model, prefix)
    verify.forward_tree(model, cache, tree)
    kv.keep_path(cache, prefix.shape[1], path)

    accepted = torch.cat([prefix[0], tree.tokens[path]]).unsqueeze(0)
    fresh, _ = verify.prefill(model, accepted)
    assert kv.length(cache) == kv.length(fresh) == accepted.shape[1]
    for kept, ref in zip(cache.layers, fresh.layers, strict=True):
        torch.testing.assert_close(kept.keys, ref.keys, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(kept.values, ref.values, rtol=1e-5, atol=1e-5)

    nxt = torch.tensor([[7, 8]])
    continued = model(nxt, cache=cache, use_cache=True).logits
    reference = model(torch.cat([accepted, nxt], 1)).logits[:, -2:]
    torch.testing.assert_close(continued, reference, rtol=1e-5, atol=1e-5)


def test_crop_refuses_to_grow():
    model = tiny_model("llama")
    cache, _ = verify.prefill(model, torch.tensor([[3, 4, 5]]))
    kv.crop(cache, 2)
    assert kv.length(cache) == 2
    with pytest.raises(ValueError, match="cannot crop"):
        kv.crop(cache, 3)
