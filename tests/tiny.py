"""Tiny random causal LMs built from config classes: CPU, fp32, no downloads."""

from __future__ import annotations

import torch
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    Phi3Config,
    PreTrainedModel,
    Qwen2Config,
    Qwen3Config,
)

import specdec  # noqa: F401  (registers attn_implementation="sdpa_tree")

VOCAB = 128
BOS, EOS, PAD = 1, 2, 0

_COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    bos_token_id=BOS,
    eos_token_id=EOS,
    pad_token_id=PAD,
)

# architecture -> (config class, keyword arguments)
CONFIGS = {
    "llama": (LlamaConfig, _COMMON),
    "mistral": (MistralConfig, {**_COMMON, "sliding_window": None}),
    "qwen2": (Qwen2Config, _COMMON),
    "qwen3": (Qwen3Config, {**_COMMON, "head_dim": 16}),
    "phi3": (Phi3Config, _COMMON),
    "gpt2": (
        GPT2Config,
        dict(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=512, bos_token_id=BOS, eos_token_id=EOS),
    ),
}
ARCHS = list(CONFIGS)


def tiny_model(arch: str = "llama", attn: str = "sdpa", seed: int = 0, **overrides) -> PreTrainedModel:
    """A random `arch` model in eval mode, fp32; `overrides` change config fields (e.g. a smaller draft)."""
    config_class, kwargs = CONFIGS[arch]
    config = config_class(**{**kwargs, **overrides})
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, attn_implementation=attn, dtype=torch.float32).eval()


def small_draft(arch: str = "llama", seed: int = 1) -> PreTrainedModel:
    """A smaller random model with the same vocabulary: most of its drafts get rejected."""
    layers = {"gpt2": {"n_layer": 1}}.get(arch, {"num_hidden_layers": 1})
    return tiny_model(arch, seed=seed, **layers)
