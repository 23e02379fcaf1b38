"""The only module that touches KV-cache internals.

After verification the cache holds the prefix followed by every tree node that was fed; only the
accepted path is kept, moved to sit right after the prefix. The accepted path may be any branch, so this
is a gather, not just a crop. When transformers changes its cache API, this is the file that changes.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import DynamicCache, PretrainedConfig, PreTrainedModel
from transformers.cache_utils import get_layer_types_and_kwargs

_FULL, _SLIDING = "full_attention", "sliding_attention"


def new_cache(model: PreTrainedModel) -> DynamicCache:
    """A growing cache of plain layers. A sliding-window layer is a plain layer as long as the sequence fits in
    its window (`sliding_window(config)`; `generate` checks that before it starts)."""
    return DynamicCache()


def unsupported_layers(config: PretrainedConfig) -> set[str]:
    """The layer types of `config`'s cache other than full attention and sliding-window attention (chunked,
    linear or recurrent layers...), whose entries specdec cannot keep exactly; empty when all are supported."""
    layer_types, _ = get_layer_types_and_kwargs(config.get_text_config(decoder=True))
    return set(layer_types) - {_FULL, _SLIDING}


def sliding_window(config: PretrainedConfig) -> int | None:
    """The smallest attention window among `config`'s sliding-window layers (None: every layer sees everything).

    While a sequence holds at most this many tokens, sliding-window attention is full attention."""
    layer_types, kwargs = get_layer_types_and_kwargs(config.get_text_config(decoder=True))
    windows = [k["sliding_window"] for t, k in zip(layer_types, kwargs, strict=True) if t == _SLIDING]
    return min(windows) if windows else None


def length(cache: DynamicCache) -> int:
    return cache.get_seq_length()


def crop(cache: DynamicCache, new_length: int) -> None:
    """Keep the first `new_length` entries."""
    remove = length(cache) - new_length
    if remove < 0:
        raise ValueError(f"cannot crop a cache of {length(cache)} entries to {new_length}")
    if remove > 0:
        cache.crop(-remove)


def keep_path(cache: DynamicCache, prefix_len: int, nodes: Sequence[int]) -> None:
    """Keep the prefix and the entries of `nodes`, dropping every other tree entry.

    The cache holds `prefix_len` prefix entries followed by tree nodes in index order. Afterwards it
    holds the prefix followed by the entries of `nodes` (ascending node indices, e.g. an accepted
    root-to-node path), in that order.
    """
    nodes = list(nodes)
    if nodes == list(range(len(nodes))):  # the path is the first nodes already: a crop is enough
        crop(cache, prefix_len + len(nodes))
        return
    index = prefix_len + torch.as_tensor(nodes, dtype=torch.long)
    end = prefix_len + len(nodes)
    for layer in cache.layers:
        if layer.is_initialized and layer.keys.numel() > 0:
            index = index.to(layer.keys.device)
            # index_select copies before the write, so overlapping source and target slots are safe
            layer.keys[..., prefix_len:end, :] = layer.keys.index_select(-2, index)
            layer.values[..., prefix_len:end, :] = layer.values.index_select(-2, index)
    crop(cache, end)
