"""The decoding methods the harness compares, each `[1, L] prompt ids -> Result`.

- `baseline`: plain `target.generate` (the reference for speedup and identity), greedy, or sampling at
  `temperature` when that is > 0 (as every method then does).
- `draft`, `draft_chain`: specdec with the draft model (tree / chain); `ngram`: specdec's n-gram source
  (the current context only); `ngram_memory`: the n-gram source with the cross-request memory
  `ngram_memory` (the target's own answers to training prompts, and every answer of this run as it
  goes); `medusa`: specdec with Medusa heads; `composite`: n-gram (with the memory) then draft model
  (`Composite`); `medusa_ngram`: n-gram (with the memory) then Medusa heads; `eagle`, `eagle_ngram`: the
  same with an EAGLE-3 head (`eagle_head`, EAGLE-2 dynamic trees); `medusa_eagle_ngram`: all three, their
  trees merged where the n-gram source is not confident alone (for targets whose forward costs the same for
  many tokens, e.g. offloaded ones); `streams`, `streams_ngram`: speculative
  streaming (`stream_embeddings`: the target drafts at stream tokens in its verification forward); `useless`
  (random tokens) and `collapsing` (`ngram_memory` for the first half of each answer, random tokens after):
  sources made to fail (eval/stress.py), which the controller must survive.
- `hf_assisted`: Hugging Face assisted generation with the same draft (`assistant_model=`).
- `hf_prompt_lookup`: Hugging Face prompt lookup decoding (`prompt_lookup_num_tokens=`).

`variants` (conf/eval.yaml) adds methods of one's own naming: a method above with some settings changed,
e.g. other Medusa heads or another n-gram memory next to the shipped ones, in the same run.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from eval.stress import Collapsing, Useless
from heads.eagle import EagleHead
from heads.medusa import MedusaHeads
from heads.streams import StreamEmbeddings
from specdec.control import Controller
from specdec.devices import input_device
from specdec.drafters import (
    Composite,
    Drafter,
    EagleDrafter,
    MedusaDrafter,
    ModelDrafter,
    NGramDrafter,
    NGramMemory,
    StreamDrafter,
)
from specdec.drafters.model import vocab_size
from specdec.generate import SpeculativeGenerator

PEERS = ("hf_assisted", "hf_prompt_lookup")


@dataclass(frozen=True)
class Result:
    new_ids: list[int]
    wall_time: float
    accept_lengths: list[int]  # empty where the method does not report them (Hugging Face's)
    profile: dict | None = None  # specdec's: where the time went (`profile`); None for Hugging Face's methods


Method = Callable[[torch.Tensor], Result]


def build_methods(cfg: DictConfig, target, draft) -> dict[str, Method]:
    """The configured methods, by name. Raises ValueError on an unknown name."""

    load_memory = functools.cache(lambda: NGramMemory.from_pretrained(cfg.ngram_memory))  # read once

    def ngram_memory() -> NGramDrafter:
        # each method learns from its own answers only: a copy of its own, sharing the loaded index
        return NGramDrafter(**cfg.ngram_settings, memory=load_memory().copy())

    def medusa() -> MedusaDrafter:
        return MedusaDrafter(MedusaHeads.from_pretrained(cfg.medusa_heads, target))

    def eagle() -> EagleDrafter:
        return EagleDrafter(EagleHead.from_pretrained(cfg.eagle_head, target), **cfg.eagle_settings)

    def streams() -> StreamDrafter:
        return StreamDrafter(StreamEmbeddings.from_pretrained(cfg.stream_embeddings, target), **cfg.stream_settings)

    drafters: dict[str, Callable[[], Drafter]] = {
        "draft": lambda: ModelDrafter(draft, **cfg.draft_settings),
        "draft_chain": lambda: ModelDrafter(draft, **{**cfg.draft_settings, "branching": 1}),
        "ngram": lambda: NGramDrafter(**cfg.ngram_settings),
        "ngram_memory": ngram_memory,
        "composite": lambda: Composite([ngram_memory(), ModelDrafter(draft, **cfg.draft_settings)]),
        "medusa": medusa,
        "medusa_ngram": lambda: Composite([ngram_memory(), medusa()]),
        "eagle": eagle,
        "eagle_ngram": lambda: Composite([ngram_memory(), eagle()]),
        "medusa_eagle_ngram": lambda: Composite([ngram_memory(), medusa(), eagle()]),
        "streams": streams,
        "streams_ngram": lambda: Composite([ngram_memory(), streams()]),
        "useless": lambda: Useless(vocab_size(target)),  # eval/stress.py: the controller must lose ~nothing
        "collapsing": lambda: Collapsing(ngram_memory(), vocab_size(target), after=cfg.max_new_tokens // 2),
    }
    settings = dict(max_new_tokens=cfg.max_new_tokens, do_sample=False)
    if cfg.temperature > 0:  # sampling: the same warping for every method; identity is then meaningless
        settings = dict(max_new_tokens=cfg.max_new_tokens, do_sample=True, temperature=cfg.temperature)
    methods: dict[str, Method] = {}
    for name in cfg.methods:
        if name in (cfg.get("variants") or {}):
            methods[name] = _variant(cfg, name, target, draft)
        elif name == "baseline":
            methods[name] = _hf(target, settings, one_token_steps=True)
        elif name == "hf_assisted":
            methods[name] = _hf(target, {**settings, "assistant_model": draft})
        elif name == "hf_prompt_lookup":
            methods[name] = _hf(target, {**settings, "prompt_lookup_num_tokens": cfg.prompt_lookup_num_tokens})
        elif name in drafters:
            controller = Controller(instantiate(cfg.control)) if cfg.controller else None
            generator = SpeculativeGenerator(target, drafters[name](), controller)
            methods[name] = _specdec(generator, settings)
        else:
            raise ValueError(
                f"unknown method {name!r}: choose from baseline, {', '.join(drafters)}, {', '.join(PEERS)}"
            )
    return methods


def _variant(cfg: DictConfig, name: str, target, draft) -> Method:
    """`variants.<name>`: a method (`method:`) built with some settings changed, e.g. other heads or memory.

    Raises:
        ValueError: the variant names no method, or one that is a variant itself.
    """
    settings = OmegaConf.to_container(cfg.variants[name])
    base = settings.pop("method", None)
    if base is None or base in cfg.variants:
        raise ValueError(f"variants.{name} needs `method:` naming a method that is not a variant, e.g. medusa")
    changed = OmegaConf.merge(cfg, settings, {"methods": [base], "variants": {}})
    return build_methods(changed, target, draft)[base]


def _hf(target, settings: dict, one_token_steps: bool = False) -> Method:
    """`target.generate`; plain decoding gains one token per step, peers do not report their steps."""

    device = input_device(target)

    def run(ids: torch.Tensor) -> Result:
        ids = ids.to(device)  # specdec moves the prompt itself; target.generate wants it on the model's device
        tic = time.perf_counter()
        out = target.generate(ids, attention_mask=torch.ones_like(ids), **settings)
        seconds = time.perf_counter() - tic
        new = out[0, ids.shape[1] :].tolist()
        return Result(new, seconds, [1] * len(new) if one_token_steps else [])

    return run


def _specdec(generator: SpeculativeGenerator, settings: dict) -> Method:
    def run(ids: torch.Tensor) -> Result:
        tic = time.perf_counter()
        out = generator.generate(ids, return_dict_in_generate=True, **settings)
        seconds = time.perf_counter() - tic
        stats = out.spec_stats
        return Result(out.sequences[0, ids.shape[1] :].tolist(), seconds, stats.accept_lengths, profile(stats))

    return run


def profile(stats) -> dict:
    """Where one generation's time went (`SpecStats`): seconds prefilling, drafting (`catchup` of it re-reading
    tokens accepted while the source was not asked), in verification steps (forward, acceptance, cache, commit),
    `fallback_steps`: plain steps the controller chose (its steps are the record's `decoding_steps`), and
    `tree_sizes`: the nodes each step verified, root included (1: a plain step)."""
    return {
        "prefill": stats.prefill_time,
        "draft": stats.draft_time,
        "catchup": stats.catchup_time,
        "verify": stats.verify_time,
        "fallback_steps": stats.fallback_steps,
        "tree_sizes": stats.tree_sizes,
    }
