"""Sampling parameters and the one function that turns logits into probabilities for target and draft.

Speculative sampling is exact only if the target's `p` and the draft's `q` are warped the same way as
`target.generate(do_sample=True)` warps its logits. `Sampling.probs` applies Hugging Face's own warper
classes, in Hugging Face's order (temperature, top-k, top-p, min-p), in float32, then a softmax.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import GenerationConfig
from transformers.generation import (
    LogitsProcessorList,
    MinPLogitsWarper,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from specdec import distributed


@dataclass(frozen=True)
class Sampling:
    """How the next token is sampled, as in `GenerationConfig` (None: that warper is off).

    Example:
        >>> sampling = Sampling(temperature=0.7, top_p=0.9)
        >>> p = sampling.probs(logits)  # [N, V] -> [N, V], rows sum to 1
    """

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None

    def __post_init__(self) -> None:
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0 when sampling, got {self.temperature}; use greedy decoding")

    @staticmethod
    def from_generation_config(config: GenerationConfig) -> Sampling | None:
        """The sampling parameters of `config`, or None when it decodes greedily (other warpers, such as
        typical_p, are ignored here: `generate()` refuses them)."""
        if not config.do_sample:
            return None
        temperature = 1.0 if config.temperature is None else float(config.temperature)
        return Sampling(temperature, config.top_k or None, config.top_p, config.min_p)

    def warpers(self) -> LogitsProcessorList:
        """Hugging Face's warpers for these parameters, in the order `generate()` applies them."""
        warpers = LogitsProcessorList()
        if self.temperature != 1.0:
            warpers.append(TemperatureLogitsWarper(self.temperature))
        if self.top_k:
            warpers.append(TopKLogitsWarper(top_k=self.top_k))
        if self.top_p is not None and self.top_p < 1.0:
            warpers.append(TopPLogitsWarper(top_p=self.top_p))
        if self.min_p is not None:
            warpers.append(MinPLogitsWarper(min_p=self.min_p))
        return warpers

    def warp(self, logits: torch.Tensor) -> torch.Tensor:
        """`[N, V]` logits -> `[N, V]` float32 warped logits (filtered tokens at -inf), HF's `scores`."""
        scores = logits.float().clone()
        for warper in self.warpers():
            scores = warper(None, scores)
        return scores

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        """`[N, V]` logits -> `[N, V]` float32 probabilities: the distribution `generate()` samples from."""
        return torch.softmax(self.warp(logits), dim=-1)


def default_generator(device: torch.device | str = "cpu") -> torch.Generator:
    """A generator seeded from torch's global RNG, so `torch.manual_seed(s)` still fixes the output (rank 0's seed
    within `specdec.distributed.lockstep`)."""
    seed = distributed.rank_zero_int(int(torch.randint(0, 2**62, (1,))))
    return torch.Generator(device=device).manual_seed(seed)
