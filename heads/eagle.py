"""EAGLE-3 draft heads: one decoder layer on the target's low, middle and high hidden states.

The design of EAGLE-3 (Li et al. 2025, arXiv:2503.01840), as SafeAILab/EAGLE (`eagle/model/cnets.py`,
`eagle/traineagle3/cnets.py`), vLLM (`vllm/model_executor/models/llama_eagle3.py`) and SGLang
(`python/sglang/srt/models/llama_eagle3.py`) build it; the code here is written from torch modules:

- **features**: the target's hidden states entering three of its decoder layers (`layers`, default
  `(2, L // 2, L - 3)` for a target of `L` layers). In the anchors' numbering, layer `i` is the state *entering*
  decoder layer `i`, i.e. the output of layer `i - 1` (transformers' `output_hidden_states[i]`; 0 is the embedding
  output). They are concatenated in ascending layer order (`[T, 3H]`) and projected by `fc` (`3H -> H`, no bias).
- **one decoder layer** (`midlayer`, Llama style: RMSNorm, rotary positions, grouped-query attention with its own
  KV cache, SwiGLU MLP) whose attention input is `[input_layernorm(embedding of the next token);
  hidden_norm(feature)]` (`2H`: q/k/v take `2H`); the residual stream is the feature itself.
- **final norm and an LM head over a draft vocabulary**: the most frequent tokens; draft id `d` is target id
  `d + d2t[d]` (`d2t` offsets, as the anchors store them).
- **the target's input embeddings**, frozen and shared: never stored with the head.

Head position `j` reads the target's feature at position `j` and the embedding of token `j + 1`, and predicts token
`j + 2`. Drafting further, a node's feature is the head's own output (before the final norm) at its parent.

Two on-disk formats:

- `save_pretrained(dir)`: `eagle_config.json` (sizes, layers, the base model's name and weight fingerprint) and
  `eagle_head.safetensors`; loading onto another model is an error.
- `export_eagle3(head, dir)`: the layout vLLM and SGLang load for EAGLE-3 heads (`config.json` with
  `architectures: ["LlamaForCausalLMEagle3"]` and `model.safetensors` with `midlayer.*`, `fc.weight`, `norm.weight`,
  `lm_head.weight`, `d2t`, `t2d`). `EagleHead.from_pretrained` reads that layout too, checking sizes, vocabulary
  and layers against the target (and the embeddings, when the checkpoint carries a copy).

The two loaders number explicit aux layer ids differently. vLLM reads `eagle_aux_hidden_state_layer_ids` (top
level first) as the state entering layer `i` (`vllm/model_executor/models/llama.py`: `aux_hidden_states.append(
hidden_states + residual)` before layer `idx`); SGLang reads only `eagle_config.eagle_aux_hidden_state_layer_ids`
and captures before layer `id + 1` (`python/sglang/srt/models/llama.py`, `set_eagle3_layers_to_capture`: "for the
ith layer, it takes the output of the (i-1)th layer"). Without ids both capture before `(2, L // 2, L - 3)`.
`export_eagle3` writes both, each in its reader's numbering, so that both capture the states the head was made for.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import LlamaConfig, PreTrainedModel
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from specdec.devices import execution_device, onloaded
from specdec.models import ASSETS, fingerprint, same_fingerprint
from specdec.verify import decoder_layers

CONFIG_FILE, WEIGHTS_FILE = "eagle_config.json", "eagle_head.safetensors"
BUILTIN_EAGLE = "smollm2-135m-instruct-eagle"  # specdec/assets/: the built-in target's head (training/train_eagle.py)
EAGLE3_CONFIG, EAGLE3_WEIGHTS = "config.json", "model.safetensors"
EAGLE3_ARCHITECTURES = ("LlamaForCausalLMEagle3", "Eagle3LlamaForCausalLM")  # SGLang's name, vLLM's class name
STATIC_ROPE = ("default", "linear", "llama3", "yarn")  # rotary frequencies that do not depend on sequence length


@dataclass(frozen=True)
class EagleConfig:
    """What an EAGLE-3 head is and which model it belongs to.

    Attributes:
        hidden_size: the target's (the head shares its embeddings).
        intermediate_size, num_attention_heads, num_key_value_heads, head_dim, rms_norm_eps: the decoder layer's.
        rope_parameters: transformers' form, e.g. `{"rope_type": "default", "rope_theta": 10000.0}`.
        max_position_embeddings: informational (rotary scaling types read it).
        vocab_size: the target's vocabulary (rows of its input embeddings).
        draft_vocab_size: tokens the head can propose (rows of `lm_head`).
        layers: the target's layers read, ascending (the states entering those decoder layers).
        target_num_layers: the target's decoder layers.
        base_model, base_fingerprint: the base model's name and `fingerprint`; empty for imported checkpoints.
    """

    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    draft_vocab_size: int
    layers: tuple[int, ...]
    target_num_layers: int
    rms_norm_eps: float = 1e-6
    rope_parameters: dict = field(default_factory=lambda: {"rope_type": "default", "rope_theta": 10000.0})
    max_position_embeddings: int = 4096
    base_model: str = ""
    base_fingerprint: list[float] = field(default_factory=list)

    @staticmethod
    def from_json(text: str) -> EagleConfig:
        values = json.loads(text)
        return EagleConfig(**{**values, "layers": tuple(values["layers"])})


def default_layers(num_layers: int) -> tuple[int, ...]:
    """EAGLE-3's layers for a target of `num_layers` decoder layers: `(2, L // 2, L - 3)` (SafeAILab/EAGLE
    `modeling_llama_kv.py`, vLLM's and SGLang's `get_eagle3_aux_hidden_state_layers`). Targets too shallow for three
    distinct such layers (L < 7) take `(0, L // 2, L - 1)`, repeating a layer when L < 3."""
    anchors = (2, num_layers // 2, num_layers - 3)
    if len(set(anchors)) == 3 and all(0 <= i < num_layers for i in anchors):
        return tuple(sorted(anchors))
    return tuple(sorted((0, num_layers // 2, num_layers - 1)))


def rope_frequencies(config: EagleConfig) -> tuple[torch.Tensor, float]:
    """`[head_dim / 2]` rotary inverse frequencies and the attention scaling, as transformers computes them.

    Raises:
        NotImplementedError: rotary types whose frequencies change with the sequence length (dynamic, longrope).
    """
    params = config.rope_parameters
    kind = params.get("rope_type", "default")
    if kind not in STATIC_ROPE:
        raise NotImplementedError(f"rope_type {kind!r} is not supported by EagleHead; supported: {STATIC_ROPE}")
    if kind == "default":
        exponents = torch.arange(0, config.head_dim, 2, dtype=torch.float32) / config.head_dim
        return 1.0 / params["rope_theta"] ** exponents, 1.0
    llama = LlamaConfig(
        hidden_size=config.hidden_size,
        num_attention_heads=config.num_attention_heads,
        head_dim=config.head_dim,
        max_position_embeddings=config.max_position_embeddings,
        rope_parameters=params,
    )
    return ROPE_INIT_FUNCTIONS[kind](llama)


class HeadCache:
    """The head's own keys and values, `[1, KV, S, D]` each: one decoder layer, one sequence."""

    def __init__(self) -> None:
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None

    def __len__(self) -> int:
        return 0 if self.keys is None else self.keys.shape[-2]

    def append(self, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Add `[1, KV, T, D]` entries; returns every entry."""
        if self.keys is not None:
            keys, values = torch.cat([self.keys, keys], dim=-2), torch.cat([self.values, values], dim=-2)
        self.keys, self.values = keys, values
        return keys, values

    def crop(self, length: int) -> None:
        """Keep the first `length` entries."""
        if self.keys is not None:
            self.keys, self.values = self.keys[..., :length, :], self.values[..., :length, :]


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        return self.weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


def rotate(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, scaling: float) -> torch.Tensor:
    """Rotary position embedding of `[1, heads, T, D]` at `positions` `[T]` (the half-split form of Llama)."""
    angles = positions.float()[:, None] * inv_freq.to(positions.device)[None]  # [T, D/2]
    angles = torch.cat([angles, angles], dim=-1)
    cos, sin = (angles.cos() * scaling).to(x.dtype), (angles.sin() * scaling).to(x.dtype)
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


class Attention(nn.Module):
    """Grouped-query attention whose q/k/v read `2H` inputs (embedding and feature side by side)."""

    def __init__(self, config: EagleConfig):
        super().__init__()
        h, d = config.hidden_size, config.head_dim
        self.heads, self.kv_heads, self.head_dim = config.num_attention_heads, config.num_key_value_heads, d
        self.q_proj = nn.Linear(2 * h, self.heads * d, bias=False)
        self.k_proj = nn.Linear(2 * h, self.kv_heads * d, bias=False)
        self.v_proj = nn.Linear(2 * h, self.kv_heads * d, bias=False)
        self.o_proj = nn.Linear(self.heads * d, h, bias=False)

    def forward(
        self, x: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor, cache: HeadCache, rope: tuple
    ) -> torch.Tensor:
        """`[T, 2H]` -> `[T, H]`; `mask` `[T, S]` additive over the cached entries and these `T`."""
        t = x.shape[0]
        q = self.q_proj(x).view(t, self.heads, self.head_dim).transpose(0, 1)[None]  # [1, heads, T, D]
        k = self.k_proj(x).view(t, self.kv_heads, self.head_dim).transpose(0, 1)[None]
        v = self.v_proj(x).view(t, self.kv_heads, self.head_dim).transpose(0, 1)[None]
        k, v = cache.append(rotate(k, positions, *rope), v)
        out = nn.functional.scaled_dot_product_attention(
            rotate(q, positions, *rope), k, v, attn_mask=mask[None, None], enable_gqa=self.kv_heads != self.heads
        )
        return self.o_proj(out[0].transpose(0, 1).reshape(t, self.heads * self.head_dim))


class MLP(nn.Module):
    """SwiGLU: `down(silu(gate(x)) * up(x))`."""

    def __init__(self, config: EagleConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    """EAGLE-3's layer: attention over `[input_layernorm(embeds); hidden_norm(hidden)]`, residual stream `hidden`."""

    def __init__(self, config: EagleConfig):
        super().__init__()
        h, eps = config.hidden_size, config.rms_norm_eps
        self.input_layernorm, self.hidden_norm, self.post_attention_layernorm = (RMSNorm(h, eps) for _ in range(3))
        self.self_attn = Attention(config)
        self.mlp = MLP(config)

    def forward(
        self,
        embeds: torch.Tensor,
        hidden: torch.Tensor,
        positions: torch.Tensor,
        mask: torch.Tensor,
        cache: HeadCache,
        rope: tuple,
    ) -> torch.Tensor:
        x = torch.cat([self.input_layernorm(embeds), self.hidden_norm(hidden)], dim=-1)  # [T, 2H]
        hidden = hidden + self.self_attn(x, positions, mask, cache, rope)
        return hidden + self.mlp(self.post_attention_layernorm(hidden))


class EagleHead(nn.Module):
    """An EAGLE-3 head for one target model. Its parameter names are the EAGLE-3 layout's.

    Example:
        >>> head = EagleHead.for_model(target)                          # new, untrained
        >>> head = EagleHead.from_pretrained("my-eagle-head", target)   # saved, or an EAGLE-3 checkpoint
        >>> cache = head.new_cache()
        >>> hidden = head(embed(tokens[1:]), head.project(features[:-1]), positions, cache)  # [T, H]
        >>> head.to_target(head.logits(hidden).argmax(-1))              # target token ids
    """

    def __init__(self, config: EagleConfig):
        super().__init__()
        if config.num_attention_heads % config.num_key_value_heads:
            raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")
        if list(config.layers) != sorted(config.layers) or not config.layers:
            raise ValueError(f"layers must be a non-empty ascending tuple, got {config.layers}")
        self.config = config
        h = config.hidden_size
        self.fc = nn.Linear(len(config.layers) * h, h, bias=False)
        self.midlayer = DecoderLayer(config)
        self.norm = RMSNorm(h, config.rms_norm_eps)
        self.lm_head = nn.Linear(h, config.draft_vocab_size, bias=False)
        self.register_buffer("d2t", torch.zeros(config.draft_vocab_size, dtype=torch.long))
        self._rope = rope_frequencies(config)  # not a buffer: stays float32 whatever the head's dtype

    @classmethod
    def for_model(
        cls,
        model: PreTrainedModel,
        draft_vocab: torch.Tensor | list[int] | None = None,
        layers: tuple[int, ...] | None = None,
        name: str | None = None,
    ) -> EagleHead:
        """A new head for `model`, in its dtype and on its device: untrained (torch's default initialisation, from its
        global RNG).

        Args:
            model: the target.
            draft_vocab: the target token ids the head may propose (e.g. the most frequent tokens of the target's
                answers); default: the whole vocabulary.
            layers: the target's layers to read (the states entering those decoder layers); default
                `default_layers(num_hidden_layers)`.
            name: the base model's name to record (default: its `name_or_path`).
        """
        text = model.config.get_text_config()
        embed = model.get_input_embeddings().weight
        vocab, hidden = embed.shape
        heads = text.num_attention_heads
        num_layers = len(decoder_layers(model))
        draft_ids = torch.arange(vocab) if draft_vocab is None else _draft_ids(draft_vocab, vocab)
        theta = (getattr(text, "rope_parameters", None) or {}).get("rope_theta", 10000.0)
        config = EagleConfig(
            hidden_size=hidden,
            intermediate_size=getattr(text, "intermediate_size", None) or 4 * hidden,
            num_attention_heads=heads,
            num_key_value_heads=getattr(text, "num_key_value_heads", None) or heads,
            head_dim=getattr(text, "head_dim", None) or hidden // heads,
            vocab_size=vocab,
            draft_vocab_size=len(draft_ids),
            layers=tuple(sorted(layers)) if layers is not None else default_layers(num_layers),
            target_num_layers=num_layers,
            rms_norm_eps=getattr(text, "rms_norm_eps", None) or 1e-6,
            rope_parameters={"rope_type": "default", "rope_theta": float(theta)},
            max_position_embeddings=getattr(text, "max_position_embeddings", None) or 4096,
            base_model=name or model.config.name_or_path or type(model).__name__,
            base_fingerprint=fingerprint(model),
        )
        _check_layers(config.layers, num_layers)
        head = cls(config)
        head.d2t.copy_(draft_ids - torch.arange(len(draft_ids)))
        return _placed(head, model)

    @staticmethod
    def new_cache() -> HeadCache:
        """An empty KV cache for the head's decoder layer."""
        return HeadCache()

    @property
    def draft_ids(self) -> torch.Tensor:
        """`[V']` the target id of each draft id."""
        return torch.arange(len(self.d2t), device=self.d2t.device) + self.d2t

    @property
    def t2d(self) -> torch.Tensor:
        """`[V]` bool: the target ids the head can propose (the EAGLE-3 layout's `t2d`)."""
        mask = torch.zeros(self.config.vocab_size, dtype=torch.bool, device=self.d2t.device)
        mask[self.draft_ids] = True
        return mask

    def to_target(self, draft_ids: torch.Tensor) -> torch.Tensor:
        """Draft ids -> target ids (`d + d2t[d]`)."""
        return draft_ids + self.d2t[draft_ids]

    def project(self, features: torch.Tensor) -> torch.Tensor:
        """`[T, k*H]` target features (the concatenated layer states) -> `[T, H]`."""
        return self.fc(features.to(self.fc.weight.device, self.fc.weight.dtype))  # the target may be on other devices

    def forward(
        self,
        embeds: torch.Tensor,
        hidden: torch.Tensor,
        positions: torch.Tensor,
        cache: HeadCache,
        visible: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Run `T` positions through the decoder layer, appending their keys and values to `cache`.

        Args:
            embeds: `[T, H]` the target's input embeddings of the tokens.
            hidden: `[T, H]` each position's feature: `project(target features)`, or the head's own output at the
                parent position when drafting further.
            positions: `[T]` rotary positions.
            cache: the head's cache; the `T` entries are appended after its `S0` entries.
            visible: `[T, S0 + T]` bool, which entries each position attends to (default: all cached entries and the
                positions up to itself, a plain sequence). A tree passes each node's ancestors.

        Returns:
            `[T, H]` the outputs before the final norm (the next features; `logits` turns them into predictions).
        """
        if visible is None:
            s0, t = len(cache), embeds.shape[0]
            visible = torch.ones(t, s0 + t, dtype=torch.bool).tril(s0)
        mask = torch.zeros(visible.shape, dtype=hidden.dtype, device=hidden.device)
        mask.masked_fill_(~visible.to(hidden.device), torch.finfo(hidden.dtype).min)
        embeds = embeds.to(hidden.dtype)
        return self.midlayer(embeds, hidden, positions.to(hidden.device), mask, cache, self._rope)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """`[T, H]` outputs -> `[T, V']` logits over the draft vocabulary."""
        return self.lm_head(self.norm(hidden))

    def check(self, model: PreTrainedModel) -> None:
        """Raises ValueError unless `model` is the model this head belongs to."""
        _check_sizes(self.config, model, "this EAGLE head")
        if self.config.base_fingerprint and not same_fingerprint(self.config.base_fingerprint, fingerprint(model)):
            raise ValueError(
                f"this EAGLE head was made for {self.config.base_model!r}, and this model's weights differ from it "
                f"(fingerprint mismatch); use a head trained for this model"
            )

    def save_pretrained(self, directory: str | Path) -> Path:
        """`eagle_config.json` + `eagle_head.safetensors` (the head's own weights; not the shared embeddings)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / CONFIG_FILE).write_text(json.dumps(asdict(self.config), indent=2) + "\n")
        save_file(_state(self), directory / WEIGHTS_FILE)
        return directory

    @classmethod
    def from_pretrained(cls, name_or_dir: str | Path, target: PreTrainedModel) -> EagleHead:
        """A head saved by `save_pretrained`, or an EAGLE-3 checkpoint in the layout vLLM and SGLang load, for
        `target`, in its dtype and on its device; `BUILTIN_EAGLE` names the built-in target's, in specdec/assets/.

        Raises:
            FileNotFoundError: no head there.
            ValueError: the head belongs to another model (fingerprint, sizes, vocabulary, layers, embeddings).
            NotImplementedError: an EAGLE-3 checkpoint with features this head does not have (several layers,
                biases, a rotary type whose frequencies depend on the length...).
        """
        directory = ASSETS / BUILTIN_EAGLE if str(name_or_dir) == BUILTIN_EAGLE else Path(name_or_dir)
        if str(name_or_dir) == BUILTIN_EAGLE and not (directory / CONFIG_FILE).is_file():
            raise FileNotFoundError(
                f"{BUILTIN_EAGLE} has not been trained yet (no {CONFIG_FILE} in {directory}): train it with "
                f"`.venv/bin/python -m training.train_eagle`, or pass the directory of a head for this target"
            )
        if (directory / CONFIG_FILE).is_file():
            config = EagleConfig.from_json((directory / CONFIG_FILE).read_text())
            state = load_file(directory / WEIGHTS_FILE)
        elif (directory / EAGLE3_CONFIG).is_file():
            config, state = _read_eagle3(directory, target)
        else:
            raise FileNotFoundError(f"no EAGLE head in {directory} ({CONFIG_FILE} or {EAGLE3_CONFIG} missing)")
        head = cls(config)
        head.check(target)
        head.load_state_dict(state)
        return _placed(head, target).eval()


def _placed(head: EagleHead, target: PreTrainedModel) -> EagleHead:
    """`head` where it runs: on the execution device of the target's input embeddings (also where accelerate offloaded
    them), in their dtype (meta tensors keep theirs)."""
    embed = target.get_input_embeddings()
    return head.to(device=execution_device(embed), dtype=embed.weight.dtype)


def export_eagle3(head: EagleHead, directory: str | Path) -> Path:
    """Write `head` in the EAGLE-3 layout that vLLM (`Eagle3LlamaForCausalLM`) and SGLang (`LlamaForCausalLMEagle3`)
    load: `config.json` and `model.safetensors` (`midlayer.*`, `fc.weight`, `norm.weight`, `lm_head.weight`, `d2t`,
    and `t2d`, which SafeAILab/EAGLE's own loader registers and vLLM and SGLang skip). The embeddings are left out:
    both take the target's.

    Raises:
        ValueError: a head reading a layer twice (vLLM and SGLang capture each layer once).
    """
    config = head.config
    if len(set(config.layers)) != len(config.layers):
        raise ValueError(
            f"layers {config.layers} repeat a layer; vLLM and SGLang capture each layer once, so an exported head "
            f"needs distinct layers (make it with EagleHead.for_model(target, layers=...))"
        )
    rope = dict(config.rope_parameters)
    theta = rope.pop("rope_theta")
    layers = list(config.layers)
    values = {
        "architectures": [EAGLE3_ARCHITECTURES[0]],
        "model_type": "llama",
        "hidden_size": config.hidden_size,
        "target_hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_key_value_heads,
        "head_dim": config.head_dim,
        "num_hidden_layers": 1,
        "hidden_act": "silu",
        "rms_norm_eps": config.rms_norm_eps,
        "rope_theta": theta,
        "rope_scaling": None if rope.get("rope_type", "default") == "default" else rope,
        "max_position_embeddings": config.max_position_embeddings,
        "vocab_size": config.vocab_size,
        "draft_vocab_size": config.draft_vocab_size,
        "tie_word_embeddings": False,  # SGLang would use the embeddings as the LM head
        "attention_bias": False,
        "mlp_bias": False,
        "torch_dtype": str(head.fc.weight.dtype).removeprefix("torch."),
        "eagle_aux_hidden_state_layer_ids": layers,  # vLLM: the state entering decoder layer i
        "eagle_config": {
            "eagle_aux_hidden_state_layer_ids": [i - 1 for i in layers],  # SGLang: the output of decoder layer i
            "use_aux_hidden_state": True,
        },
        "specdec": {"base_model": config.base_model, "base_fingerprint": config.base_fingerprint},
    }
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / EAGLE3_CONFIG).write_text(json.dumps(values, indent=2) + "\n")
    save_file({**_state(head), "t2d": head.t2d.cpu()}, directory / EAGLE3_WEIGHTS)
    return directory


def _state(head: EagleHead) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().cpu() for k, v in head.state_dict().items()}


def _draft_ids(draft_vocab: torch.Tensor | list[int], vocab: int) -> torch.Tensor:
    """Distinct target ids, ascending (as SafeAILab/EAGLE orders them, so that `d2t` offsets are >= 0)."""
    ids = torch.as_tensor(draft_vocab, dtype=torch.long).flatten()
    if len(ids) == 0 or ids.unique().numel() != len(ids) or int(ids.min()) < 0 or int(ids.max()) >= vocab:
        raise ValueError(f"the draft vocabulary must be distinct token ids in [0, {vocab})")
    return ids.sort().values


def _check_layers(layers: tuple[int, ...], num_layers: int) -> None:
    if not layers or not all(0 <= i < num_layers for i in layers):
        raise ValueError(f"layers {list(layers)} must lie in [0, {num_layers}) (the target's decoder layers)")


def _check_sizes(config: EagleConfig, model: PreTrainedModel, what: str) -> None:
    """Raises ValueError unless `model`'s hidden size, vocabulary and layers fit `config`."""
    vocab, hidden = model.get_input_embeddings().weight.shape
    num_layers = len(decoder_layers(model))
    mine = (config.hidden_size, config.vocab_size, config.target_num_layers)
    if mine != (hidden, vocab, num_layers):
        raise ValueError(
            f"{what} was made for a model with hidden size {mine[0]}, vocabulary {mine[1]} and {mine[2]} layers "
            f"({config.base_model or 'an EAGLE-3 checkpoint'}), not for this model (hidden size {hidden}, vocabulary "
            f"{vocab}, {num_layers} layers); use a head trained for this model"
        )
    _check_layers(config.layers, num_layers)


def _read_eagle3(directory: Path, target: PreTrainedModel) -> tuple[EagleConfig, dict[str, torch.Tensor]]:
    """An EAGLE-3 checkpoint (config.json + safetensors, as vLLM and SGLang load it) as an `EagleConfig` and the
    head's state dict, checked against `target`."""
    values = json.loads((directory / EAGLE3_CONFIG).read_text())
    if not set(values.get("architectures") or []) & set(EAGLE3_ARCHITECTURES):
        raise ValueError(f"{directory} holds no EAGLE-3 head (architectures {values.get('architectures')})")
    unsupported = {
        "num_hidden_layers": values.get("num_hidden_layers", 1) != 1,
        "attention_bias": bool(values.get("attention_bias")),
        "mlp_bias": bool(values.get("mlp_bias")),
        "hidden_act": values.get("hidden_act", "silu") != "silu",
        "norm_before_residual": bool(values.get("norm_before_residual")),
    }
    if any(unsupported.values()):
        raise NotImplementedError(
            f"EAGLE-3 checkpoint {directory}: {[k for k, v in unsupported.items() if v]} differ from the single "
            f"bias-free SwiGLU layer EagleHead implements"
        )
    llama = LlamaConfig(**{k: v for k, v in values.items() if k not in ("architectures", "eagle_config")})
    num_layers = len(decoder_layers(target))
    config = EagleConfig(
        hidden_size=llama.hidden_size,
        intermediate_size=llama.intermediate_size,
        num_attention_heads=llama.num_attention_heads,
        num_key_value_heads=llama.num_key_value_heads,
        head_dim=getattr(llama, "head_dim", None) or llama.hidden_size // llama.num_attention_heads,
        vocab_size=llama.vocab_size,
        draft_vocab_size=values.get("draft_vocab_size") or llama.vocab_size,
        layers=_eagle3_layers(values, num_layers),
        target_num_layers=num_layers,
        rms_norm_eps=llama.rms_norm_eps,
        rope_parameters=dict(llama.rope_parameters),
        max_position_embeddings=llama.max_position_embeddings,
        base_model=(values.get("specdec") or {}).get("base_model", ""),
        base_fingerprint=(values.get("specdec") or {}).get("base_fingerprint", []),
    )
    target_hidden = values.get("target_hidden_size", config.hidden_size)
    if target_hidden != config.hidden_size:
        raise NotImplementedError(f"a head narrower than its target ({config.hidden_size} < {target_hidden})")
    _check_sizes(config, target, f"the EAGLE-3 head in {directory}")
    state = {}
    for file in sorted(directory.glob("*.safetensors")):
        state.update(load_file(file))
    embeddings = state.pop("embed_tokens.weight", None)
    with onloaded(target.get_input_embeddings()) as embed:  # where accelerate offloaded them too
        same = embeddings is None or _same(embeddings, embed.weight)
    if not same:
        raise ValueError(
            f"the EAGLE-3 head in {directory} carries input embeddings that differ from this model's: it was "
            f"trained for another model"
        )
    state.pop("t2d", None)  # derived from d2t, as vLLM and SGLang do
    if "d2t" not in state:  # a head over the whole vocabulary
        state["d2t"] = torch.zeros(config.draft_vocab_size, dtype=torch.long)
    state["d2t"] = state["d2t"].long()
    targets = torch.arange(config.draft_vocab_size) + state["d2t"]
    if len(targets) != config.draft_vocab_size or int(targets.min()) < 0 or int(targets.max()) >= config.vocab_size:
        raise ValueError(f"d2t in {directory} maps draft ids outside the target's vocabulary of {config.vocab_size}")
    return config, state


def _eagle3_layers(values: dict, num_layers: int) -> tuple[int, ...]:
    """The layers an EAGLE-3 config names, in this module's numbering (the state entering layer i): vLLM's top-level
    ids as they are, SGLang's `eagle_config` ids + 1, else the anchors' default."""
    if values.get("eagle_aux_hidden_state_layer_ids"):
        return tuple(sorted(values["eagle_aux_hidden_state_layer_ids"]))
    nested = (values.get("eagle_config") or {}).get("eagle_aux_hidden_state_layer_ids")
    if nested:
        return tuple(sorted(i + 1 for i in nested))
    return tuple(sorted((2, num_layers // 2, num_layers - 3)))


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two embedding matrices hold the same weights (tolerant to a dtype change)."""
    return a.shape == b.shape and torch.allclose(a.float(), b.detach().float().cpu(), rtol=1e-2, atol=1e-6)
