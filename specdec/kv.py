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


class RowCache:
    """A target cache for a batch of rows that advance by different amounts: which cache slot holds which
    row's tokens.

    Slot `j` of row `r` holds one of that row's tokens where `visible[r, j]`; elsewhere it is a hole (left
    padding, or a slot that another row filled in the same step), which attention must not see. Rows are
    kept in one rectangular `[A, H, S, D]` cache, so after a step that accepted `k_r + 1` entries in row `r`
    the cache grows by `max_r (k_r + 1)` slots and row `r` has `max - k_r - 1` holes. `compact` removes the
    holes that every row has and moves each row's entries to the right (the most holes any row then has is
    the difference between the longest and the shortest row); `generate` calls it when holes waste more
    than half of the cache, so the cache never holds more than about twice the longest row's entries.

    Attributes:
        cache: the model's cache, `A` rows.
        visible: `[A, S]` bool, on the CPU: the slots that hold the row's tokens, in order.
    """

    def __init__(self, cache: DynamicCache, visible: torch.Tensor):
        if visible.shape[1] != length(cache):
            raise ValueError(f"{visible.shape[1]} visibility columns for a cache of {length(cache)} slots")
        self.cache, self.visible = cache, visible

    @property
    def slots(self) -> int:
        return self.visible.shape[1]

    @property
    def lengths(self) -> torch.Tensor:
        """`[A]` tokens each row holds: the position of its next token."""
        return self.visible.sum(1)

    def keep_paths(self, paths: Sequence[Sequence[int]]) -> None:
        """After a step that fed `N` tree slots per row after `slots` cache slots, keep row `r`'s entries of
        `paths[r]` (ascending node indices, the root first) in its first `len(paths[r])` new slots; the
        rest of the row's new slots become holes."""
        prefix, longest = self.slots, max(len(p) for p in paths)
        if any(list(p) != list(range(len(p))) for p in paths):  # some row accepted a side branch: gather
            index = torch.zeros(len(paths), longest, dtype=torch.long)  # [A, M]: the padding reads slot 0
            for row, path in enumerate(paths):
                index[row, : len(path)] = torch.as_tensor(path)
            for layer in self.cache.layers:
                if layer.is_initialized and layer.keys.numel() > 0:
                    a, h, _, d = layer.keys.shape
                    at = index.to(layer.keys.device)[:, None, :, None].expand(a, h, longest, d)
                    new_keys = layer.keys[..., prefix:, :].gather(-2, at)
                    new_values = layer.values[..., prefix:, :].gather(-2, at)
                    layer.keys[..., prefix : prefix + longest, :] = new_keys
                    layer.values[..., prefix : prefix + longest, :] = new_values
        crop(self.cache, prefix + longest)
        kept = torch.arange(longest)[None, :] < torch.tensor([len(p) for p in paths])[:, None]  # [A, M]
        self.visible = torch.cat([self.visible, kept], 1)

    def select_rows(self, rows: Sequence[int]) -> None:
        """Keep only `rows` (batch indices, in that order): finished rows leave the batch."""
        index = torch.as_tensor(list(rows), dtype=torch.long)
        for layer in self.cache.layers:
            if layer.is_initialized and layer.keys.numel() > 0:
                at = index.to(layer.keys.device)
                layer.keys, layer.values = layer.keys.index_select(0, at), layer.values.index_select(0, at)
        self.visible = self.visible[index]

    def waste(self) -> float:
        """The share of slots that are holes in the longest row (0: rows as dense as a rectangle allows)."""
        return 1.0 - float(self.lengths.max()) / max(self.slots, 1)

    def compact(self) -> None:
        """Move every row's entries to the end of the cache, in order: `[A, max_r length_r]` slots after."""
        lengths = self.lengths
        longest = int(lengths.max())
        index = torch.zeros(len(lengths), longest, dtype=torch.long)  # [A, S']: holes read slot 0
        visible = torch.zeros(len(lengths), longest, dtype=torch.bool)
        for row in range(len(lengths)):
            slots = self.visible[row].nonzero().flatten()
            index[row, longest - len(slots) :] = slots
            visible[row, longest - len(slots) :] = True
        for layer in self.cache.layers:
            if layer.is_initialized and layer.keys.numel() > 0:
                a, h, _, d = layer.keys.shape
                at = index.to(layer.keys.device)[:, None, :, None].expand(a, h, longest, d)
                layer.keys, layer.values = layer.keys.gather(-2, at), layer.values.gather(-2, at)
        self.visible = visible
