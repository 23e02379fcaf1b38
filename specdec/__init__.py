"""specdec: lossless speculative decoding for Hugging Face causal language models."""

from specdec import attention  # noqa: F401  (registers attn_implementation="sdpa_tree" with transformers)
from specdec.control import ControlConfig, Controller
from specdec.generate import SpecStats, SpeculativeGenerator, SpeculativeOutput, generate
from specdec.models import load_model
from specdec.tree import TokenTree

__all__ = [
    "ControlConfig",
    "Controller",
    "SpecStats",
    "SpeculativeGenerator",
    "SpeculativeOutput",
    "TokenTree",
    "generate",
    "load_model",
]
