"""Medusa heads: extra next-next-token predictors on the target's last hidden state.

Given the target's final (normalised) hidden state `h_t` at position `t`, the target's LM head predicts
token `t+1`; Medusa head `k` (0-based) predicts token `t+2+k`. Each head is `num_layers` residual blocks
(`x + SiLU(W x + b)`, zero-initialised, so an untrained head starts as the base LM head) followed by an
LM head: by default the target's own frozen LM head (shared, nothing extra to store or train), or one per
head initialised from it (`shared_lm_head=False`).

Path-conditioned heads (`path_inputs=True`, Hydra's "sequentially dependent" heads) also read the tokens
between `h_t` and their target: head `k` sees the target's input embeddings of tokens `t+1 .. t+1+k`, so in a
tree each node's children depend on the path that leads to it. Their first layer mixes `h_t` with those
embeddings (zero-initialised too: untrained, they are plain Medusa heads). Drafting them costs one batched
head call per tree depth instead of one for all depths.

A draft vocabulary (`restrict_vocab`, saved with the heads) limits the candidates to the tokens the heads
were trained to predict, most frequent first. On a CPU the LM head's weight read dominates a head call
(49152 x 576 for SmolLM2: 2.5 ms in bf16), and 8192 rows of it take 0.35 ms. Verification is unchanged:
a token outside the draft vocabulary is still produced by the target, it just cannot be drafted.

Heads are saved like adapters (`save_pretrained(dir)`: `medusa_config.json` + `medusa_heads.safetensors`)
and record the base model they were trained for: its name, sizes and a weight fingerprint. Loading them
onto another model is an error.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import PreTrainedModel

from specdec.devices import execution_device, is_offloaded, onloaded, vocab_size, whole
from specdec.models import ASSETS, fingerprint, same_fingerprint

CONFIG_FILE, WEIGHTS_FILE, ADAPTER_DIR = "medusa_config.json", "medusa_heads.safetensors", "lora_adapter"
BUILTIN_HEADS = "smollm2-135m-instruct-medusa"


@dataclass(frozen=True)
class MedusaConfig:
    """What a set of heads is and which model it belongs to.

    Attributes:
        num_heads: heads; head `k` predicts the token `k + 2` positions past the hidden state's.
        num_layers: residual blocks per head.
        shared_lm_head: heads end in the target's own LM head (True) or in their own copies.
        hidden_size, vocab_size: the base model's.
        base_model: the base model's name (informational).
        base_fingerprint: `fingerprint(base model)`, checked on load.
        lora: whether the heads were trained jointly with a LoRA adapter on the target (Medusa-2).
        choices: the recommended static tree (Medusa choices), measured on held-out data after training.
        path_inputs: head `k` also reads the input embeddings of tokens `t+1 .. t+1+k` (Hydra heads).
        draft_vocab: how many token ids the heads may propose (`MedusaHeads.vocab`); 0: all of them.
    """

    num_heads: int = 4
    num_layers: int = 1
    shared_lm_head: bool = True
    hidden_size: int = 0
    vocab_size: int = 0
    base_model: str = ""
    base_fingerprint: list[float] = field(default_factory=list)
    lora: bool = False
    choices: list[list[int]] | None = None
    path_inputs: bool = False
    draft_vocab: int = 0


def check_base(
    config, model: PreTrainedModel, what: str = "Medusa heads", app: str = "train_medusa", noun: str = "heads"
) -> None:
    """Raises ValueError unless `model` is the model the heads were trained for. `config` is any head config with
    `hidden_size`, `vocab_size`, `base_model` and `base_fingerprint` (`MedusaConfig`, `StreamConfig`); `what`, `app`
    and `noun` name the heads and their training app in the errors."""
    text = model.config.get_text_config()
    sizes = (text.hidden_size, vocab_size(model))
    if sizes != (config.hidden_size, config.vocab_size):
        raise ValueError(
            f"these {what} were trained for {config.base_model!r} (hidden size {config.hidden_size}, "
            f"vocabulary {config.vocab_size}), not for this model (hidden size {sizes[0]}, vocabulary "
            f"{sizes[1]}); train {noun} for it with training/{app}.py"
        )
    if not same_fingerprint(config.base_fingerprint, fingerprint(model)):
        raise ValueError(
            f"these {what} were trained for {config.base_model!r}, and this model's weights differ from "
            f"it (fingerprint mismatch); train {noun} for this model with training/{app}.py"
        )


class ResBlock(nn.Module):
    """`x + SiLU(W x + b)`, zero-initialised: the identity until trained."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.linear = nn.Linear(hidden_size, hidden_size)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + nn.functional.silu(self.linear(x))


class PathInput(nn.Module):
    """`h + SiLU(W [h; e_1; ...; e_n] + b)`, zero-initialised: mixes the hidden state with `n` token embeddings."""

    def __init__(self, hidden_size: int, num_tokens: int):
        super().__init__()
        self.linear = nn.Linear(hidden_size * (1 + num_tokens), hidden_size)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, hidden: torch.Tensor, embeddings: torch.Tensor) -> torch.Tensor:
        """`[..., H]` and `[..., n, H]` -> `[..., H]`."""
        mixed = torch.cat([hidden, embeddings.flatten(-2)], dim=-1)
        return hidden + nn.functional.silu(self.linear(mixed))


class MedusaHeads(nn.Module):
    """`num_heads` Medusa heads for one base model.

    Example:
        >>> heads = MedusaHeads.for_model(target, num_heads=4)          # new, untrained
        >>> heads = MedusaHeads.from_pretrained("smollm2-135m-instruct-medusa", target)
        >>> logits = heads(hidden, target.get_output_embeddings())      # [K, ..., V]
        >>> # path-conditioned heads also take tokens t+1 .. t+K and the target's input embeddings:
        >>> logits = heads(hidden, lm_head, path=tokens, embed=target.get_input_embeddings())
    """

    def __init__(self, config: MedusaConfig, lm_head_weight: torch.Tensor | None = None):
        super().__init__()
        self.config = config
        h, v = config.hidden_size, config.vocab_size
        self.blocks = nn.ModuleList(
            nn.Sequential(*(ResBlock(h) for _ in range(config.num_layers))) for _ in range(config.num_heads)
        )
        self.register_buffer("vocab", torch.arange(config.draft_vocab), persistent=config.draft_vocab > 0)
        self.path_inputs = None
        if config.path_inputs:
            self.path_inputs = nn.ModuleList(PathInput(h, k + 1) for k in range(config.num_heads))
        self.lm_heads = None
        if not config.shared_lm_head:
            self.lm_heads = nn.ModuleList(nn.Linear(h, v, bias=False) for _ in range(config.num_heads))
            if lm_head_weight is not None:
                for head in self.lm_heads:
                    head.weight.data.copy_(lm_head_weight)

    @classmethod
    def for_model(
        cls,
        model: PreTrainedModel,
        num_heads: int = 4,
        num_layers: int = 1,
        shared_lm_head: bool = True,
        name: str | None = None,
        path_inputs: bool = False,
    ) -> MedusaHeads:
        """New (untrained) heads for `model`, in its LM head's dtype and on its execution device."""
        config = MedusaConfig(
            num_heads=num_heads,
            num_layers=num_layers,
            shared_lm_head=shared_lm_head,
            hidden_size=model.config.get_text_config().hidden_size,
            vocab_size=vocab_size(model),
            base_model=name or model.config.name_or_path or type(model).__name__,
            base_fingerprint=fingerprint(model),
            path_inputs=path_inputs,
        )
        if shared_lm_head:
            return _placed(cls(config), model)
        with onloaded(model.get_output_embeddings()) as lm_head:
            return _placed(cls(config, whole(lm_head.weight).detach().float()), model)

    @property
    def choices(self) -> list[tuple[int, ...]] | None:
        """The tree shape measured best for these heads, if one was saved with them."""
        return None if self.config.choices is None else [tuple(c) for c in self.config.choices]

    def restrict_vocab(self, token_ids: torch.Tensor) -> None:
        """Let the heads propose only `token_ids` (e.g. the most frequent tokens of their training answers)."""
        token_ids = torch.as_tensor(token_ids, dtype=torch.long).flatten()
        if len(token_ids) == 0 or token_ids.unique().numel() != len(token_ids):
            raise ValueError("the draft vocabulary must be a non-empty list of distinct token ids")
        if int(token_ids.min()) < 0 or int(token_ids.max()) >= self.config.vocab_size:
            raise ValueError(f"draft vocabulary ids must lie in [0, {self.config.vocab_size})")
        self.config = dataclasses.replace(self.config, draft_vocab=len(token_ids))
        self.register_buffer("vocab", token_ids.to(self.vocab.device))

    def lm_weights(self, lm_head: nn.Module | None = None) -> list[torch.Tensor]:
        """Each head's LM-head weight `[V', H]`, restricted to the draft vocabulary when there is one. An
        offloaded shared LM head (accelerate) is read once into a copy on its execution device; a tensor-parallel one is
        gathered whole on every rank (a collective)."""
        heads = range(self.config.num_heads) if self.lm_heads is not None else [0]  # shared: one weight
        modules = [self._lm_head(k, lm_head) for k in heads]
        weights = []
        for module in modules:
            offloaded = is_offloaded(module)
            with onloaded(module):
                weight = whole(module.weight)  # a tensor-parallel LM head's shards gathered
                if self.config.draft_vocab:
                    weight = weight.index_select(0, self.vocab.to(weight.device))
                elif offloaded:
                    weight = weight.detach().clone()  # the onloaded values are dropped after the block
                weights.append(weight)
        return weights * (self.config.num_heads // len(weights))

    def check(self, model: PreTrainedModel) -> None:
        """Raises ValueError unless `model` is the model these heads were trained for."""
        check_base(self.config, model)

    def features(
        self, hidden: torch.Tensor, path: torch.Tensor | None = None, embed: nn.Module | None = None
    ) -> torch.Tensor:
        """`[..., H]` hidden states -> `[K, ..., H]` each head's input to its LM head (see `forward`)."""
        return torch.stack([self.head_features(k, hidden, path, embed) for k in range(self.config.num_heads)])

    def head_features(
        self, k: int, hidden: torch.Tensor, path: torch.Tensor | None = None, embed: nn.Module | None = None
    ) -> torch.Tensor:
        """Head `k`'s input to its LM head: `[..., H]`; path-conditioned heads read `path[..., : k + 1]`."""
        if self.path_inputs is not None:
            if path is None or embed is None:
                raise ValueError(
                    "these heads read the path (path_inputs=True): pass path= (tokens t+1 .. t+K) and "
                    "embed=target.get_input_embeddings()"
                )
            hidden = self.path_inputs[k](hidden, embed(path[..., : k + 1]).to(hidden.dtype))
        return self.blocks[k](hidden)

    def head_logits(
        self,
        k: int,
        hidden: torch.Tensor,
        lm_head: nn.Module | None = None,
        path: torch.Tensor | None = None,
        embed: nn.Module | None = None,
    ) -> torch.Tensor:
        """Head `k`'s logits `[..., V]` (arguments as in `forward`)."""
        return self._lm_head(k, lm_head)(self.head_features(k, hidden, path, embed))

    def forward(
        self,
        hidden: torch.Tensor,
        lm_head: nn.Module | None = None,
        path: torch.Tensor | None = None,
        embed: nn.Module | None = None,
    ) -> torch.Tensor:
        """`[..., H]` final hidden states -> `[K, ..., V]` logits.

        Args:
            hidden: the target's final hidden state at position `t`.
            lm_head: the target's LM head (`get_output_embeddings()`), for heads that share it.
            path: `[..., K]` tokens `t+1 .. t+K`, for path-conditioned heads (head `k` reads the first `k + 1`).
            embed: the target's input embeddings (`get_input_embeddings()`), for path-conditioned heads.
        """
        return torch.stack([self.head_logits(k, hidden, lm_head, path, embed) for k in range(self.config.num_heads)])

    def _lm_head(self, k: int, lm_head: nn.Module | None) -> nn.Module:
        if self.lm_heads is not None:
            return self.lm_heads[k]
        if lm_head is None:
            raise ValueError("these heads share the target's LM head: pass target.get_output_embeddings()")
        return lm_head

    def save_pretrained(self, directory: str | Path) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / CONFIG_FILE).write_text(json.dumps(asdict(self.config), indent=2) + "\n")
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(state, directory / WEIGHTS_FILE)
        return directory

    @classmethod
    def from_pretrained(cls, name_or_dir: str | Path, target: PreTrainedModel) -> MedusaHeads:
        """Heads saved by `save_pretrained` (or the built-in `smollm2-135m-instruct-medusa`) for `target`.

        Raises:
            FileNotFoundError: no heads there.
            ValueError: the heads belong to another model, or need their LoRA adapter (Medusa-2).
        """
        directory = ASSETS / BUILTIN_HEADS if str(name_or_dir) == BUILTIN_HEADS else Path(name_or_dir)
        if not (directory / CONFIG_FILE).is_file():
            raise FileNotFoundError(f"no Medusa heads in {directory} ({CONFIG_FILE} missing)")
        config = MedusaConfig(**json.loads((directory / CONFIG_FILE).read_text()))
        if config.lora:
            raise ValueError(
                f"the heads in {directory} were trained with a LoRA adapter on the target (Medusa-2); load both "
                f"with heads.medusa.load_medusa2(target, {str(directory)!r})"
            )
        check_base(config, target)
        return cls._load(directory, config, target)

    @classmethod
    def _load(cls, directory: Path, config: MedusaConfig, target: PreTrainedModel) -> MedusaHeads:
        heads = cls(config)
        heads.load_state_dict(load_file(directory / WEIGHTS_FILE))
        return _placed(heads, target).eval()


def _placed(heads: MedusaHeads, model: PreTrainedModel) -> MedusaHeads:
    """`heads` where they run: on the device and in the dtype of `model`'s LM head, whose input they read."""
    lm_head = model.get_output_embeddings()
    return heads.to(device=execution_device(lm_head), dtype=lm_head.weight.dtype)  # meta tensors keep their dtype


def load_medusa2(target: PreTrainedModel, directory: str | Path) -> tuple[PreTrainedModel, MedusaHeads]:
    """Medusa-2 heads and the target with their LoRA adapter merged in: a new model; `target` is untouched.

    The fingerprint is checked against the base model, before the adapter changes it; the heads returned
    carry the adapted model's fingerprint, the model they now belong to.
    """
    directory = Path(directory)
    config = MedusaConfig(**json.loads((directory / CONFIG_FILE).read_text()))
    check_base(config, target)
    adapted = PeftModel.from_pretrained(copy.deepcopy(target), directory / ADAPTER_DIR).merge_and_unload().eval()
    config = dataclasses.replace(config, base_fingerprint=fingerprint(adapted))
    return adapted, MedusaHeads._load(directory, config, adapted)
