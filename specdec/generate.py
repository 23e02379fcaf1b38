"""The speculative decoding loop and its Hugging Face compatible `generate()`.

One step: the drafter proposes a token tree rooted at the last token, the target scores every node in
one forward, the acceptance rule keeps the longest matching path plus a bonus token, the target's cache
keeps the accepted path's entries, and the drafter rolls forward. Invariant between steps: the target's
cache holds every token but the last one (the next tree's root).
"""

from __future__ import annotations

import copy
import threading
import weakref
from dataclasses import asdict, dataclass, field, replace

import torch
from transformers import GenerationConfig, PreTrainedModel
from transformers.generation import (
    GenerateDecoderOnlyOutput,
    MaxTimeCriteria,
    MinPLogitsWarper,
    StoppingCriteriaList,
    StopStringCriteria,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from specdec import acceptance, distributed, kv, verify
from specdec.control import Controller
from specdec.drafters.base import DecodeState, Drafter
from specdec.sampling import Sampling, default_generator

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


_DEFAULT = object()  # "no argument given", so that None can mean "no controller"


@dataclass
class SpecStats:
    """What one speculative generation did.

    Attributes:
        accept_lengths: new tokens per target verification forward (accepted draft tokens + the bonus
            token), Spec-Bench's definition; the last step may be cut short by a stop.
        tree_sizes: nodes scored per verification (root included).
        target_forwards: target forwards, prefill included.
        prefill_time, draft_time, verify_time: seconds spent prefilling the target, drafting, and in
            verification forwards.
        catchup_time: the part of `draft_time` a draft source spent re-reading tokens accepted while it
            was not asked (after fallback steps), not drafting.
        plans: the controller's decision for each step (speculate, depth, budget, threshold, streak);
            empty without a controller.
    """

    accept_lengths: list[int] = field(default_factory=list)
    tree_sizes: list[int] = field(default_factory=list)
    target_forwards: int = 0
    prefill_time: float = 0.0
    draft_time: float = 0.0
    verify_time: float = 0.0
    catchup_time: float = 0.0
    plans: list[dict] = field(default_factory=list)

    @property
    def fallback_steps(self) -> int:
        """Plain target steps the controller chose instead of speculating."""
        return sum(not p["speculate"] for p in self.plans)

    @property
    def thresholds(self) -> list[float]:
        """The confidence threshold in force at each step."""
        return [p["threshold"] for p in self.plans]

    @property
    def new_tokens(self) -> int:
        return sum(self.accept_lengths)

    @property
    def mean_accepted_length(self) -> float:
        """Mean new tokens per verification step (1.0 = no speedup from drafting)."""
        return self.new_tokens / max(len(self.accept_lengths), 1)


@dataclass
class SpeculativeOutput(GenerateDecoderOnlyOutput):
    """`target.generate(..., return_dict_in_generate=True)`'s output, plus `spec_stats`."""

    spec_stats: SpecStats | None = None


@dataclass(frozen=True)
class _Limits:
    max_length: int  # padding included
    padding_ids: tuple[int, ...]  # left padding removed from the prompt, for stopping criteria
    eos_token_ids: frozenset[int]
    stopping_criteria: StoppingCriteriaList
    keep_logits: bool
    sampling: Sampling | None  # None: greedy


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

        Args:
            generator: a CPU `torch.Generator`, the only source of randomness when sampling (default:
                one seeded from torch's global RNG, so `torch.manual_seed` makes runs repeatable).
            tokenizer: the target's tokenizer, needed for `stop_strings` (as for `target.generate`).

        Raises:
            ValueError: empty prompt, token ids outside the vocabulary, a padding pattern other than left
                padding, no room for new tokens, a generation longer than a sliding attention window,
                `stop_strings` without a tokenizer.
            NotImplementedError: batch size > 1, and options (beam search, repetition penalty, typical_p,
                ...) that specdec does not reproduce yet; use `target.generate` for those.
        """
        try:
            config, limits, input_ids, prompt = self._prepare(
                inputs, generation_config, stopping_criteria, kwargs, tokenizer
            )
            # a tensor-parallel target's ranks take rank 0's timing-based decisions (specdec.distributed)
            with self._lock, distributed.lockstep(distributed.tensor_parallel_group(self.target)):
                if limits.sampling is not None and generator is None:
                    generator = default_generator()
                if streamer is not None:
                    streamer.put(input_ids.cpu())
                new_tokens, logits, stats = self._decode(prompt, limits, streamer, generator)
        finally:  # a consumer waiting on the streamer is released whatever happened, bad input included
            if streamer is not None:
                streamer.end()
        sequences = torch.cat([input_ids, torch.tensor([new_tokens], dtype=input_ids.dtype).to(input_ids.device)], 1)
        if not config.return_dict_in_generate:
            return sequences
        scores = [limits.sampling.warp(x) for x in logits] if limits.sampling is not None else logits
        return SpeculativeOutput(
            sequences=sequences,
            scores=tuple(scores) if config.output_scores else None,
            logits=tuple(logits) if config.output_logits else None,
            spec_stats=stats,
        )

    def _prepare(
        self, inputs, generation_config, stopping_criteria, kwargs: dict, tokenizer=None
    ) -> tuple[GenerationConfig, _Limits, torch.Tensor, torch.Tensor]:
        """Hugging Face's arguments -> (config, limits, input_ids `[1, L]`, unpadded prompt), or a clear error."""
        config, model_kwargs = _resolve_config(self.target, generation_config, kwargs)
        input_ids = inputs if inputs is not None else model_kwargs.pop("input_ids", None)
        attention_mask = model_kwargs.pop("attention_mask", None)
        if model_kwargs:
            raise TypeError(f"unsupported generate() arguments: {sorted(model_kwargs)}")
        prompt, padding = _unpad(input_ids, attention_mask)
        _check_token_ids(prompt, self.target)
        _refuse_unreproduced_processing(self.target, config, input_ids)
        limits = _limits(config, input_ids[0, :padding].tolist(), prompt.shape[1], stopping_criteria, tokenizer)
        verify.check_window(self.target.config, limits.max_length)
        return config, limits, input_ids, prompt

    def _decode(
        self, prompt: torch.Tensor, limits: _Limits, streamer, generator: torch.Generator | None
    ) -> tuple[list[int], list[torch.Tensor], SpecStats]:
        """The loop: propose, verify, accept, compact, commit, stop checks. `prompt` is `[1, L]`, unpadded."""
        stats = SpecStats()
        tokens = prompt.cpu()[0].tolist()
        ids = torch.empty(1, limits.max_length - len(limits.padding_ids), dtype=torch.long)  # `tokens`, for drafters
        ids[0, : len(tokens)] = prompt[0].cpu()
        new_tokens: list[int] = []
        new_logits: list[torch.Tensor] = []  # [1, V] per new token when asked for
        self.drafter.start(self.target)
        if self.controller is not None:
            self.controller.start()

        tic = verify.wall_time(self.target)
        keep_hidden, layers = self.drafter.uses_hidden_states, self.drafter.hidden_layers
        with verify.aux_hidden_states(self.target, layers) as aux:
            cache, hidden = verify.prefill(self.target, prompt[:, :-1], output_hidden_states=keep_hidden)
        features = aux[-1][0] if aux else None  # [L-1, k*H]: the prompt's, but its last token's
        stats.prefill_time, stats.target_forwards = verify.wall_time(self.target) - tic, int(prompt.shape[1] > 1)

        while True:
            room = limits.max_length - len(limits.padding_ids) - len(tokens)  # new tokens still allowed
            plan = self.controller.plan() if self.controller else None
            step_time = self.controller.plain_step_time() if self.controller else None
            state = _state(ids[:, : len(tokens)], room, plan, limits.sampling, generator, hidden, step_time, features)
            if plan is not None and not plan.speculate and self.drafter.free:  # opportunistic: free sources only
                depth = min(room - 1, self.controller.config.max_depth)
                state = replace(state, max_depth=depth, budget=None, free_only=True)
            tic = verify.wall_time(self.target)
            tree = self.drafter.propose(state).truncate(state.max_depth)
            if state.free_only and not self.controller.pays(len(tree), tree.expected_gain):
                tree = tree.truncate(0)  # a fallback step: the free draft does not pay, take a plain step
            if int(tree.tokens[0]) != state.root:
                raise RuntimeError(f"{type(self.drafter).__name__} proposed a tree not rooted at the last token")
            distributed.check_same_tree(tree)  # tensor parallelism: every rank verifies the same tree, or an error
            toc = verify.wall_time(self.target)
            catchup = self.drafter.catchup_time
            with (
                verify.final_hidden_states(self.target) if keep_hidden else _no_capture() as final,
                verify.aux_hidden_states(self.target, layers) as aux,
            ):
                logits = verify.forward_tree(self.target, cache, tree).logits[0]  # [N, V]
            verified = verify.wall_time(self.target)
            stats.draft_time += toc - tic
            stats.catchup_time += catchup
            stats.verify_time += verified - toc
            stats.target_forwards += 1
            stats.tree_sizes.append(len(tree))

            accepted = self._accept(tree, logits, limits.sampling, generator)
            kv.keep_path(cache, len(tokens) - 1, accepted.path)
            if keep_hidden:  # the state after the last accepted node: its LM head gave the bonus token
                hidden = final[-1][0, accepted.path[-1]]
            if layers:  # the states of the positions the cache kept: the accepted path
                features = aux[-1][0, accepted.path]  # [len(path), k*H]
            self.drafter.commit(accepted)
            if plan is not None:  # charged to the step: its forward, acceptance, cache compaction and commit
                stats.plans.append(asdict(plan))
                drafting, checking = toc - tic - catchup, verify.wall_time(self.target) - toc
                self.controller.update(
                    plan, len(tree), tree.max_depth, accepted.num_accepted, tree.expected_gain, drafting, checking
                )

            emitted, done = [], False
            for node, token in zip(accepted.path, accepted.tokens, strict=True):
                tokens.append(token)
                emitted.append(token)
                if limits.keep_logits:
                    new_logits.append(logits[node : node + 1].float().clone())
                if done := self._should_stop(tokens, logits[node : node + 1], limits):
                    break
            ids[0, len(tokens) - len(emitted) : len(tokens)] = torch.tensor(emitted)
            new_tokens += emitted
            stats.accept_lengths.append(len(emitted))
            if streamer is not None:
                streamer.put(torch.tensor(emitted))
            if done:
                self.drafter.finish(new_tokens)
                return new_tokens, new_logits, stats

    def _accept(
        self, tree, logits: torch.Tensor, sampling: Sampling | None, generator: torch.Generator | None
    ) -> acceptance.Acceptance:
        """The acceptance rule: greedy match, exact rejection sampling, or (asked for, lossy) typical."""
        if sampling is None:
            return acceptance.greedy(tree, logits)
        if self.typical is not None:
            return acceptance.typical(tree, sampling.probs(logits), self.typical, generator)
        return acceptance.rejection_sample(tree, sampling.probs(logits), generator)

    @staticmethod
    def _should_stop(tokens: list[int], scores: torch.Tensor, limits: _Limits) -> bool:
        if tokens[-1] in limits.eos_token_ids or len(limits.padding_ids) + len(tokens) >= limits.max_length:
            return True
        if not limits.stopping_criteria:
            return False
        input_ids = torch.tensor([[*limits.padding_ids, *tokens]])  # the sequence as HF's criteria see it
        return bool(distributed.rank_zero(float(limits.stopping_criteria(input_ids, scores).any()))[0])  # max_time


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


class _no_capture:
    """Stands in for `verify.final_hidden_states` when no hidden state is needed."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc) -> None:
        return None


def _state(
    ids: torch.Tensor,
    room: int,
    plan,
    sampling: Sampling | None,
    generator: torch.Generator | None,
    hidden: torch.Tensor | None,
    step_time: float | None = None,
    features: torch.Tensor | None = None,
) -> DecodeState:
    """What the drafter may propose (`ids`: `[1, L]` every token so far): at most `room - 1` deep (the bonus token
    takes the last slot)."""
    if plan is None:
        return DecodeState(ids, room - 1, sampling=sampling, generator=generator, hidden=hidden, features=features)
    depth = min(room - 1, plan.depth) if plan.speculate else 0
    return DecodeState(
        ids, depth, plan.budget, plan.threshold, sampling, generator, hidden, step_time, features=features
    )


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


def _unpad(input_ids: torch.Tensor | None, attention_mask: torch.Tensor | None) -> tuple[torch.Tensor, int]:
    """The prompt without left padding (`[1, L]`) and the number of padding tokens removed."""
    if input_ids is None or input_ids.dim() != 2 or input_ids.shape[1] == 0:
        shape = None if input_ids is None else tuple(input_ids.shape)
        raise ValueError(f"an empty prompt cannot be continued: pass input_ids of shape [1, L>=1], got {shape}")
    if input_ids.shape[0] != 1:
        raise NotImplementedError(
            f"batch size {input_ids.shape[0]} is not supported yet: call generate once per prompt (batch size 1)"
        )
    if attention_mask is None or bool(attention_mask.all()):
        return input_ids, 0
    padding = int((attention_mask[0] == 0).sum())
    if bool(attention_mask[0, :padding].any()) or padding == input_ids.shape[1]:
        raise ValueError("attention_mask must be ones after left padding, with at least one unpadded token")
    return input_ids[:, padding:], padding


def _limits(
    config: GenerationConfig,
    padding_ids: list[int],
    prompt_length: int,
    stopping_criteria: StoppingCriteriaList | None,
    tokenizer=None,
) -> _Limits:
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
    return _Limits(max_length, tuple(padding_ids), eos_ids, criteria, keep_logits, sampling)
