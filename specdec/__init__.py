"""specdec: lossless speculative decoding for Hugging Face causal language models."""

from specdec.generate import SpecStats, SpeculativeGenerator, SpeculativeOutput, generate
from specdec.tree import TokenTree

__all__ = ["SpecStats", "SpeculativeGenerator", "SpeculativeOutput", "TokenTree", "generate"]
