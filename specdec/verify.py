"""Tree attention on an unmodified Hugging Face causal LM.

All nodes of a `TokenTree` are scored in one forward pass after a cached prefix: a 4D float additive
mask lets each node see the whole prefix plus its own ancestors, and position ids are
`prefix length + depth`, so every node gets exactly the logits it would get if its root-to-node path
were run as a plain sequence.
"""

from __future__ import annotations

import functools
import inspect
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn
from transformers import DynamicCache, PretrainedConfig, PreTrainedModel

from specdec import kv
from specdec.attention import SDPA_TREE
from specdec.devices import compute_dtype, input_device
from specdec.tree import Streams, TokenTree

SUPPORTED_ATTENTION = ("eager", "sdpa", SDPA_TREE)


def check_supported(config: PretrainedConfig, role: str = "target") -> None:
    """Refuse models (given by their config) whose attention or cache cannot take an arbitrary tree mask.

    Raises:
        ValueError: flash / flex attention (no arbitrary masks), chunked, linear or recurrent cache layers
            (they drop or transform entries, so the tree's entries cannot be kept exactly),
            or a model that is not a decoder-only LM with a KV cache. Sliding-window layers are accepted:
            `check_window` refuses a generation that could outgrow their window.
    """
    name = type(config).__name__.removesuffix("Config") or "model"
    if config.is_encoder_decoder:
        raise ValueError(f"{role} {name} is an encoder-decoder model; specdec supports decoder-only causal LMs")
    attn = getattr(config, "_attn_implementation", None) or "eager"
    if attn not in SUPPORTED_ATTENTION:
        raise ValueError(
            f"{role} {name} uses attn_implementation={attn!r}, which cannot take the custom 4D tree mask. "
            f"Load it with attn_implementation='sdpa_tree' (sdpa without key/value copies under a mask; 'sdpa' "
            f"and 'eager' work too), e.g. AutoModelForCausalLM.from_pretrained(..., attn_implementation='sdpa_tree')."
        )
    if unsupported := kv.unsupported_layers(config):
        raise ValueError(
            f"{role} {name} has cache layers of type {sorted(unsupported)}, which specdec cannot keep exactly: "
            f"it supports full-attention and sliding-window layers. Use target.generate() for this model."
        )


def check_window(config: PretrainedConfig, max_length: int) -> None:
    """Refuse a generation of up to `max_length` tokens (padding included) that a sliding window could cut.

    Within its window, sliding-window attention is full attention, which is what the tree mask gives; beyond
    it, layers would forget entries that the tree's cache keeps.

    Raises:
        ValueError: `max_length` exceeds the model's smallest sliding window.
    """
    window = kv.sliding_window(config)
    if window is not None and max_length > window:
        raise ValueError(
            f"this generation can reach {max_length} tokens, beyond the model's sliding attention window of "
            f"{window}, which specdec does not reproduce; lower max_new_tokens (or max_length) so that prompt + "
            f"new tokens <= {window}, or use target.generate() for this call"
        )


def tree_attention_mask(tree: TokenTree, prefix_len: int, dtype: torch.dtype, start: int = 0) -> torch.Tensor:
    """The additive mask for feeding nodes `start:` of `tree` after a cache of `prefix_len + start` entries.

    The cache holds a plain prefix of `prefix_len` tokens followed by the tree's nodes `0:start` (in index
    order). Every new node sees the whole prefix, and of the tree only its ancestors and itself.

    Returns:
        `[1, 1, N - start, prefix_len + N]` float: 0 where visible, `finfo(dtype).min` where not.
        A float mask is required: a bool mask is silently ignored under eager attention.
    """
    mask = torch.zeros(len(tree) - start, prefix_len + len(tree), dtype=dtype)
    mask[:, prefix_len:].masked_fill_(~tree.ancestor_mask[start:], torch.finfo(dtype).min)
    return mask[None, None]


def forward_tree(
    model: PreTrainedModel,
    cache: DynamicCache,
    tree: TokenTree,
    start: int = 0,
    last_logits_only: bool = False,
    streams: Streams | None = None,
):
    """Run nodes `start:` of `tree` through `model`, appending their keys and values to `cache`.

    `cache` must hold a plain prefix followed by the tree's nodes `0:start`; the prefix length is read
    from the cache. With `start=0` this scores the whole tree after a cached prefix (verification), and
    `streams` (only then) are scored after it in the same forward.

    Returns:
        The model output; `logits` is `[1, N - start, V]`, row `j` predicting the child of node `start + j`
        (with `last_logits_only`, where the model supports it, only the last row: `[1, 1, V]`); with `streams`,
        `[1, N + S, V]`: the tree's rows, then the streams' (`Streams.rows`). Their cache entries follow the
        tree's: `kv.keep_path` drops them with the rejected nodes.
    """
    device = input_device(model)
    prefix_len = kv.length(cache) - start
    if streams is not None:
        if start or last_logits_only:
            raise ValueError("streams are scored with a whole tree (start=0), every row's logits kept")
        return _forward_streamed(model, cache, tree, streams, prefix_len, device)
    # a chain needs no tree mask: each new token sees every cached entry and the tokens before it (causal)
    mask = None if tree.is_chain else tree_attention_mask(tree, prefix_len, compute_dtype(model), start).to(device)
    positions = (prefix_len + tree.depth[start:]).unsqueeze(0).to(device)  # [1, N - start]
    return model(
        input_ids=tree.tokens[start:].unsqueeze(0).to(device),
        attention_mask=mask,
        position_ids=positions,
        cache=cache,
        use_cache=True,
        **(_last_logits_only(model) if last_logits_only else {}),
    )


def _forward_streamed(model, cache: DynamicCache, tree: TokenTree, streams: Streams, prefix_len: int, device):
    """`forward_tree` of a tree and its streams: token embeddings then the stream vectors as `inputs_embeds` (the
    model computes exactly what it would from the token ids), one mask over both."""
    dtype = compute_dtype(model)
    n, total = len(tree), len(tree) + len(streams)
    seen = torch.zeros(total, total, dtype=torch.bool)
    seen[:n, :n] = tree.ancestor_mask
    seen[n:] = streams.ancestor_mask(tree)
    mask = torch.zeros(total, prefix_len + total, dtype=dtype)
    mask[:, prefix_len:].masked_fill_(~seen, torch.finfo(dtype).min)
    positions = prefix_len + torch.cat([tree.depth, streams.depth(tree)])
    embedding = model.get_input_embeddings()
    tokens = embedding(tree.tokens.unsqueeze(0).to(device))  # [1, N, H]
    extra = streams.embeds.to(device=tokens.device, dtype=tokens.dtype).repeat(len(streams.nodes), 1)  # [S, H]
    return model(
        inputs_embeds=torch.cat([tokens, extra.unsqueeze(0)], dim=1),
        attention_mask=mask[None, None].to(device),
        position_ids=positions.unsqueeze(0).to(device),
        cache=cache,
        use_cache=True,
    )


@contextmanager
def final_hidden_states(model: PreTrainedModel) -> Iterator[list[torch.Tensor]]:
    """Within the block, the input of each call of `model`'s LM head is appended to the yielded list: the final
    hidden states `[1, T, H]` its logits come from (only the rows whose logits are computed), whatever the
    architecture, without asking the model for every layer's states.

    Example:
        >>> with final_hidden_states(target) as hidden:
        ...     out = forward_tree(target, cache, tree)
        >>> hidden[-1][0, node]  # [H]: the state whose LM head gave `out.logits[0, node]`
    """
    captured: list[torch.Tensor] = []
    hook = model.get_output_embeddings().register_forward_pre_hook(lambda _, args: captured.append(args[0]))
    try:
        yield captured
    finally:
        hook.remove()


def decoder_layers(model: PreTrainedModel) -> nn.ModuleList:
    """`model`'s decoder layers in order (`layers` of Llama-like models, `h` of GPT-2).

    Raises:
        ValueError: when the decoder has no single list of `num_hidden_layers` modules.
    """
    count = model.config.get_text_config().num_hidden_layers
    found = [m for m in model.get_decoder().children() if isinstance(m, nn.ModuleList) and len(m) == count]
    if len(found) != 1:
        raise ValueError(f"cannot find the {count} decoder layers of {type(model).__name__}")
    return found[0]


@contextmanager
def aux_hidden_states(model: PreTrainedModel, layers: Sequence[int]) -> Iterator[list[torch.Tensor]]:
    """Within the block, each forward of `model` appends `[1, T, len(layers) * H]` to the yielded list: the hidden
    states entering decoder layers `layers` (layer `i`'s input is layer `i-1`'s output, layer 0's the embeddings:
    transformers' `output_hidden_states[i]`), concatenated in that order. EAGLE-3 numbers its "auxiliary hidden
    state layers" so (SafeAILab/EAGLE, vLLM). Forward pre-hooks on those layers, removed on exit; other layers'
    states are not kept. With no `layers`, nothing is captured.

    Raises:
        ValueError: a layer index outside the model's decoder layers.
    """
    captured: list[torch.Tensor] = []
    if not layers:
        yield captured
        return
    modules = decoder_layers(model)
    if not all(0 <= i < len(modules) for i in layers):
        raise ValueError(f"layers {list(layers)} outside the model's {len(modules)} decoder layers")
    inputs: dict[int, torch.Tensor] = {}

    def keep(index: int):
        def hook(_, args, kwargs):
            inputs[index] = args[0] if args else kwargs["hidden_states"]

        return hook

    def collect(*_) -> None:  # layers may sit on several devices (device_map="auto"): the last one's holds them
        device = inputs[layers[-1]].device
        captured.append(torch.cat([inputs[i].to(device) for i in layers], dim=-1))
        inputs.clear()

    hooks = [modules[i].register_forward_pre_hook(keep(i), with_kwargs=True) for i in sorted(set(layers))]
    hooks.append(model.register_forward_hook(collect))
    try:
        yield captured
    finally:
        for hook in hooks:
            hook.remove()


def wall_time(model: PreTrainedModel) -> float:
    """`time.perf_counter()` after the model's device has finished its queued work."""
    if _has_cuda() and (device := input_device(model)).type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


@functools.cache
def _has_cuda() -> bool:
    """`torch.cuda.is_available()`, asked once: the loop reads the clock several times a step."""
    return torch.cuda.is_available()


def _last_logits_only(model: PreTrainedModel) -> dict:
    """`logits_to_keep=1` where the model's forward takes it: the LM head runs on the last position only."""
    return {"logits_to_keep": 1} if _takes_logits_to_keep(type(model)) else {}


@functools.cache
def _takes_logits_to_keep(model_class: type) -> bool:
    """Inspected once per class: the draft model's catch-up asks every step."""
    return "logits_to_keep" in inspect.signature(model_class.forward).parameters


def prefill(
    model: PreTrainedModel, input_ids: torch.Tensor, output_hidden_states: bool = False
) -> tuple[DynamicCache, torch.Tensor | None]:
    """A new cache holding `input_ids` (`[1, L]`, may be empty), and, when asked for, the final hidden state
    `[H]` at the last position (what the LM head turns into the next token's logits; None otherwise). Only that
    state is computed and kept, not every layer's states of the whole prompt."""
    cache = kv.new_cache(model)
    if input_ids.shape[-1] == 0:
        return cache, None
    with final_hidden_states(model) as hidden:
        model(
            input_ids=input_ids.to(input_device(model)),
            cache=cache,
            use_cache=True,
            **_last_logits_only(model),  # the prompt's logits are not needed
        )
    return cache, hidden[-1][0, -1] if output_hidden_states else None


def batch_prefill_mask(visible: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The additive mask of a batched prefill: each slot sees the row's tokens up to itself (and a padding
    slot itself, so that no attention row is empty).

    Args:
        visible: `[B, L]` bool, the slots that hold tokens (False: left padding).

    Returns:
        `[B, 1, L, L]` float: 0 where visible, `finfo(dtype).min` where not.
    """
    length = visible.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    seen = (causal[None] & visible[:, None, :]) | torch.eye(length, dtype=torch.bool)[None]  # [B, L, L]
    mask = torch.zeros(seen.shape, dtype=dtype).masked_fill_(~seen, torch.finfo(dtype).min)
    return mask[:, None]


def batch_tree_mask(trees: Sequence[TokenTree], visible: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The additive mask for one tree per row, padded to `N = max len(tree)` nodes, after a `RowCache`.

    Row `r`'s node sees the row's cached tokens (`visible[r]`) and, of its tree, its ancestors and itself;
    padding nodes see only themselves, and nothing sees them.

    Args:
        trees: `A` trees; visible: `[A, S]` bool.

    Returns:
        `[A, 1, N, S + N]` float: 0 where visible, `finfo(dtype).min` where not.
    """
    rows, slots = visible.shape
    if len(trees) != rows:
        raise ValueError(f"{len(trees)} trees for a batch of {rows} rows")
    width = max(len(t) for t in trees)
    seen = torch.zeros(rows, width, slots + width, dtype=torch.bool)
    seen[:, :, :slots] = visible[:, None, :]
    seen[:, :, slots:] = torch.eye(width, dtype=torch.bool)
    for row, tree in enumerate(trees):
        seen[row, : len(tree), slots : slots + len(tree)] = tree.ancestor_mask
    mask = torch.zeros(seen.shape, dtype=dtype).masked_fill_(~seen, torch.finfo(dtype).min)
    return mask[:, None]


def prefill_batch(
    model: PreTrainedModel, input_ids: torch.Tensor, visible: torch.Tensor, output_hidden_states: bool = False
) -> tuple[kv.RowCache, torch.Tensor | None]:
    """A `RowCache` holding the left-padded `input_ids` (`[B, L]`, `visible` `[B, L]` False on padding), and
    when asked for, the final hidden states `[B, H]` at the last slot (what the LM head turns into each row's
    next token; rows whose last slot is padding get a meaningless state). Position ids count each row's own
    tokens from 0, as `target.generate` numbers a left-padded batch."""
    cache = kv.new_cache(model)
    if input_ids.shape[-1] == 0:
        return kv.RowCache(cache, visible), None
    device = input_device(model)
    positions = (visible.long().cumsum(1) - 1).clamp(min=0)  # [B, L]
    with final_hidden_states(model) as hidden:
        model(
            input_ids=input_ids.to(device),
            attention_mask=batch_prefill_mask(visible, compute_dtype(model)).to(device),
            position_ids=positions.to(device),
            cache=cache,
            use_cache=True,
            **_last_logits_only(model),
        )
    return kv.RowCache(cache, visible), hidden[-1][:, -1] if output_hidden_states else None


def forward_batch(model: PreTrainedModel, rows: kv.RowCache, trees: Sequence[TokenTree]):
    """Score one tree per row in one forward, appending `N = max len(tree)` slots per row to `rows.cache`.

    Row `r`'s nodes get position ids `rows.lengths[r] + depth`; shorter trees are padded with copies of
    their root, which nothing sees.

    Returns:
        The model output; `logits` is `[A, N, V]`, `logits[r, i]` predicting the child of node `i` of
        `trees[r]` (rows `i >= len(trees[r])` are padding).
    """
    device = input_device(model)
    width = max(len(t) for t in trees)
    tokens = torch.stack([t.tokens[:1].expand(width).clone() for t in trees])  # [A, N]
    depths = torch.zeros(len(trees), width, dtype=torch.long)  # [A, N]
    for row, tree in enumerate(trees):
        tokens[row, : len(tree)] = tree.tokens
        depths[row, : len(tree)] = tree.depth
    positions = rows.lengths[:, None] + depths  # [A, N]
    return model(
        input_ids=tokens.to(device),
        attention_mask=batch_tree_mask(trees, rows.visible, compute_dtype(model)).to(device),
        position_ids=positions.to(device),
        cache=rows.cache,
        use_cache=True,
    )
