"""The Hugging Face argument layer: `generate()`'s arguments -> a checked `Request`, or a clear error.

Everything here runs before the first forward: configuration priority as `target.generate` applies it, the
options specdec refuses (by the logits processors transformers itself would build), left padding, token ids,
and each row's stopping limits. The decoding loop (`specdec.decode`) never sees a Hugging Face argument.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace

import torch
from transformers import GenerationConfig, PreTrainedModel
from transformers.generation import (
    MaxTimeCriteria,
    MinPLogitsWarper,
    StoppingCriteriaList,
    StopStringCriteria,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from specdec import verify
from specdec.sampling import Sampling

# Search options specdec does not reproduce (not logits processors), with their neutral values.
_UNSUPPORTED_SEARCH = {
    "num_beams": 1,
    "num_return_sequences": 1,
    "num_beam_groups": 1,
    "penalty_alpha": None,
    "dola_layers": None,
    "prompt_lookup_num_tokens": None,
    "output_attentions": False,
    "output_hidden_states": False,
    "use_cache": True,
}
# The logits processors that `Sampling` applies as generate() does; generate() refuses a configuration for
# which transformers would build any other (repetition penalty, min_length, renormalize_logits, typical_p...).
_REPRODUCED_PROCESSORS = (TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper, MinPLogitsWarper)


@dataclass(frozen=True)
class Limits:
    """When one row stops, and how its tokens are chosen."""

    max_length: int  # padding included
    padding_ids: tuple[int, ...]  # the row's left padding, for stopping criteria (they see the padded row)
    eos_token_ids: frozenset[int]
    stopping_criteria: StoppingCriteriaList
    keep_logits: bool
    sampling: Sampling | None  # None: greedy


@dataclass(frozen=True)
class Request:
    """A checked `generate()` call.

    Attributes:
        config: the resolved generation config.
        input_ids: `[B, L]` as given (left padding included).
        prompts: each row without its padding, `[1, L_r]`.
        limits: each row's limits (they differ only in `padding_ids`).
        pad_token_id: what fills a row after its end in a batch (None for a single row).
    """

    config: GenerationConfig
    input_ids: torch.Tensor
    prompts: list[torch.Tensor]
    limits: list[Limits]
    pad_token_id: int | None


def prepare(
    target: PreTrainedModel,
    inputs: torch.Tensor | None,
    generation_config: GenerationConfig | None,
    stopping_criteria: StoppingCriteriaList | None,
    kwargs: dict,
    tokenizer=None,
) -> Request:
    """Hugging Face's arguments -> a `Request`, or a clear error (see `SpeculativeGenerator.generate`)."""
    config, model_kwargs = _resolve_config(target, generation_config, kwargs)
    input_ids = inputs if inputs is not None else model_kwargs.pop("input_ids", None)
    attention_mask = model_kwargs.pop("attention_mask", None)
    if model_kwargs:
        raise TypeError(f"unsupported generate() arguments: {sorted(model_kwargs)}")
    paddings = _left_padding(input_ids, attention_mask)
    prompts = [input_ids[row : row + 1, pad:] for row, pad in enumerate(paddings)]
    for prompt in prompts:
        _check_token_ids(prompt, target)
    _refuse_unreproduced_processing(target, config, input_ids)
    first = _limits(config, input_ids[0, : paddings[0]].tolist(), prompts[0].shape[1], stopping_criteria, tokenizer)
    limits = [replace(first, padding_ids=tuple(input_ids[row, :pad].tolist())) for row, pad in enumerate(paddings)]
    verify.check_window(target.config, first.max_length)
    pad_token_id = None
    if len(prompts) > 1:
        if first.keep_logits:
            raise NotImplementedError(
                "output_scores / output_logits are not supported for batches yet (rows advance by different "
                "amounts, so there is no [B, V] per step); call generate once per prompt for them"
            )
        pad_token_id = _pad_token_id(config)
    return Request(config, input_ids, prompts, limits, pad_token_id)


def _pad_token_id(config: GenerationConfig) -> int | None:
    """What follows a finished row, as `target.generate` chooses it (the first EOS when no pad is set)."""
    if config.pad_token_id is not None:
        return int(config.pad_token_id)
    eos = config.eos_token_id
    if eos is None:
        return None
    return int(eos) if isinstance(eos, int) else int(next(iter(eos)))


def _resolve_config(
    target: PreTrainedModel, generation_config: GenerationConfig | None, kwargs: dict
) -> tuple[GenerationConfig, dict]:
    """Hugging Face's priority: keyword arguments > `generation_config` > `target.generation_config` >
    generate()'s defaults."""
    config = copy.deepcopy(generation_config) if generation_config is not None else GenerationConfig()
    config.update(**target.generation_config.to_dict(), defaults_only=True, allow_custom_entries=True)
    # then generate()'s own defaults (e.g. top_k=50 when sampling), exactly as target.generate() fills them in
    config.update(**target.generation_config._get_default_generation_params(), defaults_only=True)
    model_kwargs = config.update(**kwargs)
    for name, neutral in _UNSUPPORTED_SEARCH.items():
        value = getattr(config, name, None)
        if value is not None and value != neutral:
            raise NotImplementedError(
                f"generation option {name}={value!r} is not supported by specdec's speculative decoding; "
                f"remove it, or use target.generate() for this call"
            )
    return config, model_kwargs


def _refuse_unreproduced_processing(target: PreTrainedModel, config: GenerationConfig, input_ids: torch.Tensor):
    """Ask transformers which logits processors `target.generate` would apply for `config`, and refuse any that
    specdec does not reproduce (everything but the sampling warpers of `Sampling`).

    Raises:
        NotImplementedError: naming the processors and the options that differ from the defaults.
    """
    probe = copy.deepcopy(config)
    target._prepare_special_tokens(probe, True, device=input_ids.device)  # what generate() prepares first
    processors = target._get_logits_processor(
        probe, input_ids_seq_length=input_ids.shape[1], encoder_input_ids=input_ids, device=input_ids.device
    )
    unsupported = sorted({type(p).__name__ for p in processors if not isinstance(p, _REPRODUCED_PROCESSORS)})
    if unsupported:
        options = sorted(k for k in config.to_diff_dict() if not k.startswith("_"))
        raise NotImplementedError(
            f"with these generation options target.generate() applies {', '.join(unsupported)}, which specdec's "
            f"speculative decoding does not reproduce; remove the option that adds it (options set: {options}), "
            f"or use target.generate() for this call"
        )


def _check_token_ids(prompt: torch.Tensor, target: PreTrainedModel) -> None:
    """Raises ValueError for a prompt that is not integer ids inside the target's vocabulary."""
    if prompt.dtype.is_floating_point or prompt.dtype == torch.bool:
        raise ValueError(f"input_ids must be integer token ids, got dtype {prompt.dtype}")
    vocab = target.get_input_embeddings().num_embeddings
    bad = prompt[(prompt < 0) | (prompt >= vocab)].unique()
    if len(bad):
        raise ValueError(
            f"input_ids hold token ids outside the target's vocabulary of {vocab} tokens: {bad[:10].tolist()}; "
            f"encode the prompt with the target's tokenizer"
        )


def _left_padding(input_ids: torch.Tensor | None, attention_mask: torch.Tensor | None) -> list[int]:
    """The number of left-padding tokens of each row of `input_ids` (`[B, L]`).

    Raises:
        ValueError: an empty prompt, a mask of another shape, or a mask that is not left padding (zeros, then
            at least one one) in some row, e.g. a right-padded batch.
    """
    if input_ids is None or input_ids.dim() != 2 or input_ids.shape[0] == 0 or input_ids.shape[1] == 0:
        shape = None if input_ids is None else tuple(input_ids.shape)
        raise ValueError(f"an empty prompt cannot be continued: pass input_ids of shape [B, L>=1], got {shape}")
    if attention_mask is not None and attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"attention_mask has shape {tuple(attention_mask.shape)}, input_ids {tuple(input_ids.shape)}: "
            f"they must match"
        )
    if attention_mask is None or bool(attention_mask.all()):
        return [0] * input_ids.shape[0]
    mask = attention_mask.cpu().long()
    paddings = (mask == 0).sum(1).tolist()
    for row, padding in enumerate(paddings):
        if padding == mask.shape[1] or bool(mask[row, :padding].any()) or not bool(mask[row, padding:].all()):
            ones = mask[row].nonzero().flatten().tolist()
            right = bool(ones) and ones == list(range(len(ones)))
            hint = " (it is right-padded: tokenize with padding_side='left')" if right else ""
            raise ValueError(
                f"attention_mask must be left padding: zeros, then ones, with at least one unpadded token; "
                f"row {row} is {mask[row].tolist()[:32]}{hint}"
            )
    return paddings


def _limits(
    config: GenerationConfig,
    padding_ids: list[int],
    prompt_length: int,
    stopping_criteria: StoppingCriteriaList | None,
    tokenizer=None,
) -> Limits:
    input_length = len(padding_ids) + prompt_length
    if config.max_new_tokens is not None:
        max_length = input_length + config.max_new_tokens
    else:
        max_length = config.max_length if config.max_length is not None else 20
    if max_length <= input_length:
        raise ValueError(
            f"no room for new tokens: max_length={max_length} with a prompt of {input_length} tokens; "
            f"set max_new_tokens >= 1"
        )
    eos = config.eos_token_id
    eos_ids = frozenset() if eos is None else frozenset([eos] if isinstance(eos, int) else [int(e) for e in eos])
    criteria = StoppingCriteriaList(stopping_criteria or [])
    if config.max_time is not None:
        criteria.append(MaxTimeCriteria(config.max_time))
    if config.stop_strings is not None:
        if tokenizer is None:
            raise ValueError("stop_strings need the target's tokenizer: pass tokenizer=... to generate()")
        criteria.append(StopStringCriteria(tokenizer=tokenizer, stop_strings=config.stop_strings))
    keep_logits = bool(config.return_dict_in_generate and (config.output_scores or config.output_logits))
    sampling = Sampling.from_generation_config(config)
    return Limits(max_length, tuple(padding_ids), eos_ids, criteria, keep_logits, sampling)
