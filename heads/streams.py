"""Stream embeddings: the target drafts its own next tokens inside the verification forward (speculative streaming).

After a token at position `p`, `k` learned input vectors (*streams*) are fed at positions `p+1 .. p+k`, in place
of tokens that are not known yet; stream `j` (1-based) sees the context up to `p` and the streams before it, and
the target's own LM head at it predicts token `p+1+j`. So the tree nodes that end the accepted path in one
verification forward bring the next tree's candidates with them: no draft model and no draft pass. The target
stays frozen and unmodified (the streams enter through `inputs_embeds`, a 4D mask and position ids); only the
`k x hidden` vectors are trained, so the output is exactly the target's. This is the frozen-model variant of
Speculative Streaming (Bhendawade et al. 2024, arXiv 2402.11131, which also fine-tunes the model), as PaSS's
look-ahead embeddings (Monea et al. 2023, arXiv 2311.13581).

Optionally (`head_layers > 0`) each stream's final hidden state passes through its own residual blocks before the
target's LM head, as a Medusa head does (zero-initialised: untrained, they are the LM head itself): the target's
computation at the stream position, plus a little of our own. Drafting only: verification never sees them.

Saved like the Medusa heads: `stream_config.json` + `stream_embeddings.safetensors`, with the base model's name,
sizes and weight fingerprint, checked on load.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import PreTrainedModel

from heads.medusa import ResBlock, check_base
from specdec.devices import execution_device, vocab_size
from specdec.models import ASSETS, fingerprint

CONFIG_FILE = "stream_config.json"
WEIGHTS_FILE = "stream_embeddings.safetensors"
BUILTIN_STREAMS = "smollm2-135m-instruct-streams"


@dataclass(frozen=True)
class StreamConfig:
    """What a set of stream embeddings is and which model it belongs to.

    Attributes:
        num_streams: `k`; stream `j` (1-based) predicts the token `j + 1` positions past its node.
        hidden_size, vocab_size: the base model's.
        base_model: the base model's name (informational); base_fingerprint: `fingerprint(base model)`.
        choices: the recommended static tree shape (Medusa's format: candidate ranks per depth), measured on
            held-out answers after training; None: each stream's top candidate.
        head_layers: residual blocks per stream between its final hidden state and the LM head (0: none).
    """

    num_streams: int = 4
    hidden_size: int = 0
    vocab_size: int = 0
    base_model: str = ""
    base_fingerprint: list[float] = field(default_factory=list)
    choices: list[list[int]] | None = None
    head_layers: int = 0


class StreamEmbeddings(nn.Module):
    """`num_streams x hidden` input vectors for the target (the only trained parameters of speculative streaming).

    Example:
        >>> streams = StreamEmbeddings.for_model(target, num_streams=4)
        >>> streams.save_pretrained("my-streams")
        >>> StreamEmbeddings.from_pretrained("my-streams", target)
    """

    def __init__(self, config: StreamConfig):
        super().__init__()
        self.config = config
        self.embeds = nn.Parameter(torch.zeros(config.num_streams, config.hidden_size))
        blocks = [
            nn.Sequential(*(ResBlock(config.hidden_size) for _ in range(config.head_layers))) for _ in self.embeds
        ]
        self.heads = nn.ModuleList(blocks) if config.head_layers else None

    def logits(self, hidden: torch.Tensor, lm_head: nn.Module) -> torch.Tensor:
        """`[..., k, V]` each stream's next-token logits from the target's final hidden states at the streams
        (`[..., k, H]`): through the stream's residual blocks, if any, then `lm_head` (the target's)."""
        if self.heads is not None:
            hidden = hidden.to(self.embeds.dtype)
            hidden = torch.stack([head(hidden[..., j, :]) for j, head in enumerate(self.heads)], dim=-2)
        return lm_head(hidden.to(lm_head.weight.dtype))

    @classmethod
    def for_model(
        cls, model: PreTrainedModel, num_streams: int = 4, head_layers: int = 0, name: str = ""
    ) -> StreamEmbeddings:
        """Untrained streams for `model`, each starting as its mean input embedding (a token-like input)."""
        text = model.config.get_text_config()
        config = StreamConfig(
            num_streams=num_streams,
            head_layers=head_layers,
            hidden_size=text.hidden_size,
            vocab_size=vocab_size(model),
            base_model=name or getattr(model.config, "name_or_path", "") or type(model).__name__,
            base_fingerprint=fingerprint(model),
        )
        streams = cls(config)
        embedding = model.get_input_embeddings().weight
        with torch.no_grad():
            streams.embeds.copy_(embedding.float().mean(0).cpu().expand_as(streams.embeds))
        return _placed(streams, model)

    @property
    def choices(self) -> list[tuple[int, ...]] | None:
        return None if self.config.choices is None else [tuple(c) for c in self.config.choices]

    def check(self, model: PreTrainedModel) -> None:
        """Raises ValueError unless `model` is the model the streams were trained for."""
        check_base(self.config, model, "stream embeddings", "train_streams", "streams")

    def save_pretrained(self, directory: str | Path) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / CONFIG_FILE).write_text(json.dumps(asdict(self.config), indent=2) + "\n")
        save_file(
            {k: v.detach().float().contiguous().cpu() for k, v in self.state_dict().items()}, directory / WEIGHTS_FILE
        )
        return directory

    @classmethod
    def from_pretrained(cls, name_or_dir: str | Path, target: PreTrainedModel) -> StreamEmbeddings:
        """Streams saved by `save_pretrained` (or the built-in `smollm2-135m-instruct-streams`) for `target`.

        Raises:
            FileNotFoundError: no streams there.
            ValueError: the streams belong to another model.
        """
        directory = ASSETS / BUILTIN_STREAMS if str(name_or_dir) == BUILTIN_STREAMS else Path(name_or_dir)
        if str(name_or_dir) == BUILTIN_STREAMS and not (directory / CONFIG_FILE).is_file():
            raise FileNotFoundError(
                f"{BUILTIN_STREAMS} has not been trained yet (no {CONFIG_FILE} in {directory}): train it with "
                f"`.venv/bin/python -m training.train_streams`, or pass the directory of streams for this target"
            )
        if not (directory / CONFIG_FILE).is_file():
            raise FileNotFoundError(f"no stream embeddings in {directory} ({CONFIG_FILE} missing)")
        streams = cls(StreamConfig(**json.loads((directory / CONFIG_FILE).read_text())))
        streams.check(target)
        streams.load_state_dict(load_file(directory / WEIGHTS_FILE))
        return _placed(streams, target).eval()


def _placed(streams: StreamEmbeddings, model: PreTrainedModel) -> StreamEmbeddings:
    """`streams` where they are read: on the device and in the dtype of `model`'s input embeddings."""
    embedding = model.get_input_embeddings()
    return streams.to(device=execution_device(embedding), dtype=embedding.weight.dtype)
