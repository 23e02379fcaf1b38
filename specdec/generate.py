"""`SpeculativeGenerator` and `generate()`: Hugging Face's `generate` interface over the decoding loops.

`specdec.hf_args` turns the arguments into a checked request; `specdec.decode` runs the loop, for one
prompt or for a left-padded batch; this module puts the pieces together and returns what `target.generate`
returns.
"""

from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass

import torch
from transformers import GenerationConfig, PreTrainedModel
from transformers.generation import GenerateDecoderOnlyOutput, StoppingCriteriaList

from specdec import acceptance, distributed, hf_args, verify
from specdec.control import Controller
from specdec.decode import BatchSpecStats, Parts, SpecStats, decode, decode_batch
from specdec.drafters.base import Drafter
from specdec.sampling import default_generator

__all__ = ["BatchSpecStats", "SpecStats", "SpeculativeGenerator", "SpeculativeOutput", "generate"]

_DEFAULT = object()  # "no argument given", so that None can mean "no controller"


@dataclass
class SpeculativeOutput(GenerateDecoderOnlyOutput):
    """`target.generate(..., return_dict_in_generate=True)`'s output, plus `spec_stats` (`SpecStats` for one
    prompt, `BatchSpecStats`, with one `SpecStats` per row, for a batch)."""

    spec_stats: SpecStats | BatchSpecStats | None = None


class SpeculativeGenerator:
    """Speculative decoding for a Hugging Face causal LM, output identical to `target.generate`.

    Args:
        target: the model whose output is reproduced (eager or sdpa attention, full-attention cache).
        drafter: the draft source, e.g. `ModelDrafter(small_model)`.
        controller: adapts depth, node budget and confidence threshold from measured acceptance and
            costs, and falls back to plain steps when drafting does not pay (`Controller()` by default;
            `None` drafts exactly as the drafter is configured). It keeps learning across calls, in
            bounded memory; each call's decisions are in its output's `spec_stats.plans`.
        lossy_typical_acceptance: LOSSY, opt-in: when sampling, accept draft tokens by Medusa's typical
            acceptance (`acceptance.Typical`) instead of exact rejection sampling; the output then no
            longer follows the target's distribution. Greedy decoding ignores it (and stays exact).

    Raises:
        ValueError: if the target's attention implementation or cache cannot take tree masks.

    One generator serves one call at a time: calls from several threads wait for each other (a lock). The
    drafter and the controller hold per-call state: do not share them between generators used concurrently.

    Example:
        >>> gen = SpeculativeGenerator(target, drafter=ModelDrafter(draft))
        >>> out = gen.generate(input_ids, max_new_tokens=128, return_dict_in_generate=True)
        >>> out.sequences, out.spec_stats.mean_accepted_length
    """

    def __init__(
        self,
        target: PreTrainedModel,
        drafter: Drafter,
        controller: Controller | None = _DEFAULT,
        lossy_typical_acceptance: acceptance.Typical | None = None,
    ):
        verify.check_supported(target.config)
        self.target = target
        self.drafter = drafter
        self.controller = Controller() if controller is _DEFAULT else controller
        self.typical = lossy_typical_acceptance
        self._lock = threading.Lock()

    @torch.no_grad()
    def generate(
        self,
        inputs: torch.Tensor | None = None,
        generation_config: GenerationConfig | None = None,
        stopping_criteria: StoppingCriteriaList | None = None,
        streamer=None,
        generator: torch.Generator | None = None,
        tokenizer=None,
        **kwargs,
    ) -> torch.Tensor | SpeculativeOutput:
        """Generate like `target.generate(...)`; takes the same arguments and returns the same types.

        Greedy decoding gives `target.generate`'s tokens; sampling (`do_sample=True` with temperature,
        top_k, top_p, min_p) gives its distribution, through lossless rejection sampling on the tree.
        A batch (`inputs` `[B, L]`, left-padded, with its `attention_mask`) is decoded in one loop, each row as
        its own prompt would be: rows accept different amounts, a finished row leaves the batch, and its
        output is `pad_token_id` after its end; `spec_stats` is then a `BatchSpecStats` (one `SpecStats` per row).

        Args:
            generator: a CPU `torch.Generator`, the only source of randomness when sampling (default:
                one seeded from torch's global RNG, so `torch.manual_seed` makes runs repeatable).
            tokenizer: the target's tokenizer, needed for `stop_strings` (as for `target.generate`).

        Raises:
            ValueError: empty prompt, token ids outside the vocabulary, a padding pattern other than left
                padding, no room for new tokens, a generation longer than a sliding attention window,
                `stop_strings` without a tokenizer, a streamer with a batch.
            NotImplementedError: options (beam search, repetition penalty, typical_p, ...) that specdec does
                not reproduce yet, and `output_scores` / `output_logits` for batches; use `target.generate`.
        """
        try:
            request = hf_args.prepare(self.target, inputs, generation_config, stopping_criteria, kwargs, tokenizer)
            sampling = request.limits[0].sampling
            if streamer is not None and len(request.prompts) > 1:
                raise ValueError("a streamer takes one prompt (batch size 1), as target.generate's does")
            # a tensor-parallel target's ranks take rank 0's timing-based decisions (specdec.distributed)
            with self._lock, distributed.lockstep(distributed.tensor_parallel_group(self.target)):
                if sampling is not None and generator is None:
                    generator = default_generator()  # in lockstep: rank 0's seed
                if streamer is not None:
                    streamer.put(request.input_ids.cpu())
                if len(request.prompts) > 1:
                    return self._generate_batch(request, generator)
                prompt, limits = request.prompts[0], request.limits[0]
                new_tokens, logits, stats = decode(self._parts, prompt, limits, streamer, generator)
        finally:  # a consumer waiting on the streamer is released whatever happened, bad input included
            if streamer is not None:
                streamer.end()
        input_ids, config = request.input_ids, request.config
        sequences = torch.cat([input_ids, torch.tensor([new_tokens], dtype=input_ids.dtype).to(input_ids.device)], 1)
        if not config.return_dict_in_generate:
            return sequences
        scores = [sampling.warp(x) for x in logits] if sampling is not None else logits
        return SpeculativeOutput(
            sequences=sequences,
            scores=tuple(scores) if config.output_scores else None,
            logits=tuple(logits) if config.output_logits else None,
            spec_stats=stats,
        )

    @property
    def _parts(self) -> Parts:
        return Parts(self.target, self.drafter, self.controller, self.typical)

    def _generate_batch(self, request: hf_args.Request, generator) -> torch.Tensor | SpeculativeOutput:
        """Every row's new tokens, a finished row filled with `pad_token_id` after its end, as `target.generate`."""
        rows, stats = decode_batch(self._parts, request.prompts, request.limits, generator)
        width = max(len(r) for r in rows)
        if request.pad_token_id is None and any(len(r) < width for r in rows):
            raise ValueError("rows of the batch stopped at different lengths: set pad_token_id to fill them")
        new = torch.full((len(rows), width), request.pad_token_id or 0, dtype=request.input_ids.dtype)
        for index, row in enumerate(rows):
            new[index, : len(row)] = torch.tensor(row, dtype=new.dtype)
        sequences = torch.cat([request.input_ids, new.to(request.input_ids.device)], 1)
        if not request.config.return_dict_in_generate:
            return sequences
        return SpeculativeOutput(sequences=sequences, spec_stats=stats)


# The controller the functional form uses for each (drafter, target) pair, so that it keeps learning across calls.
_CONTROLLERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def generate(
    target: PreTrainedModel,
    inputs: torch.Tensor | None = None,
    *,
    drafter: Drafter,
    controller: Controller | None = _DEFAULT,
    **kwargs,
):
    """Functional form: `SpeculativeGenerator(target, drafter, controller).generate(inputs, **kwargs)`.

    Without a `controller` argument, the same controller serves every call with the same drafter and target
    (kept while both exist), so what it measured carries over as it does with one `SpeculativeGenerator`."""
    if controller is _DEFAULT:
        per_target = _CONTROLLERS.setdefault(drafter, weakref.WeakKeyDictionary())
        controller = per_target.setdefault(target, Controller())
    return SpeculativeGenerator(target, drafter, controller).generate(inputs, **kwargs)
