"""Where a model computes, also when accelerate dispatched or offloaded it.

A model loaded with a `device_map` that puts layers on `"cpu"` or `"disk"`, or wrapped by
`accelerate.disk_offload` / `cpu_offload`, keeps its offloaded parameters on the `meta` device (shape and
dtype, no data) and loads them for each forward through hooks (`module._hf_hook`). So `model.device`
(the first parameter's device) says `meta`, and a parameter's values cannot be read directly. These helpers
answer from the hooks first, then from the parameters:

- `input_device(model)`: where its input ids go (the input embedding's execution device);
- `execution_device(module)`: where a module computes (e.g. the LM head, for heads that reuse its output);
- `compute_dtype(model)`: the dtype of its hidden states (attention masks are built in it);
- `onloaded(module)`: a block within which the module's parameters hold their values;
- `vocab_size(model)`: the width of its logits;
- `whole(tensor)`: a tensor-parallel parameter's full value (its shards gathered).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

import torch
from torch import nn
from transformers import PreTrainedModel


def _hooks(module: nn.Module) -> list:
    """accelerate's hooks on `module` (a `SequentialHook` unpacked), none when it has no hook."""
    hook = vars(module).get("_hf_hook")  # a plain attribute; nn.Module's lookup of a missing one is slow
    return [] if hook is None else list(getattr(hook, "hooks", [hook]))


def _hook_device(module: nn.Module) -> torch.device | None:
    for hook in _hooks(module):
        device = getattr(hook, "execution_device", None)
        if device is not None:
            return torch.device(device) if not isinstance(device, int) else torch.device("cuda", device)
    return None


def _stored_device(module: nn.Module) -> torch.device | None:
    """The device of the first of the module's parameters or buffers that holds data (not on `meta`)."""
    weight = getattr(module, "weight", None)  # an embedding or a linear layer: no walk over the parameters
    if isinstance(weight, torch.Tensor) and weight.device.type != "meta":
        return weight.device
    for tensor in (*module.parameters(), *module.buffers()):
        if tensor.device.type != "meta":
            return tensor.device
    return None


def execution_device(module: nn.Module) -> torch.device:
    """The device `module` computes on: accelerate's execution device when it put a hook on the module, else the
    device its parameters are stored on (`cpu` when none holds data)."""
    return _hook_device(module) or _stored_device(module) or torch.device("cpu")


def input_device(model: PreTrainedModel) -> torch.device:
    """The device a model's input ids go to: the input embedding's execution device; for a model offloaded as a
    whole (`cpu_offload_with_hook`: one hook on the model), the model's. Never `meta`."""
    embed = model.get_input_embeddings()
    return _hook_device(embed) or _hook_device(model) or _stored_device(embed) or execution_device(model)


def compute_dtype(model: PreTrainedModel) -> torch.dtype:
    """The dtype of the model's hidden states, in which transformers builds its own attention masks: the input
    embedding's (its compute dtype where accelerate casts layer by layer)."""
    embed = model.get_input_embeddings()
    for hook in _hooks(embed):
        if getattr(hook, "compute_dtype", None) is not None:
            return hook.compute_dtype
    weight = getattr(embed, "weight", None)
    if weight is not None and weight.is_floating_point():
        return weight.dtype  # meta tensors keep their dtype
    return model.dtype


def is_offloaded(module: nn.Module) -> bool:
    """Whether some of the module's parameters are offloaded (on `meta`, loaded by a hook for each forward)."""
    return any(p.device.type == "meta" for p in module.parameters())


@contextmanager
def onloaded(module: nn.Module) -> Iterator[nn.Module]:
    """Within the block, the parameters of `module` and its submodules hold their values on their execution
    devices, also where accelerate offloaded them; afterwards they are offloaded again. A no-op for a model in
    memory. Tensors read inside the block may be freed or reused after it: copy what must outlive it.

    Raises:
        RuntimeError: a parameter stays on `meta` (offloaded by a hook on a module above `module`).
    """
    from accelerate.utils import align_module_device, has_offloaded_params  # only offloaded models need it

    with ExitStack() as stack:
        if is_offloaded(module):
            for sub in module.modules():
                if has_offloaded_params(sub):
                    stack.enter_context(align_module_device(sub))
            if is_offloaded(module):
                raise RuntimeError(
                    f"the weights of {type(module).__name__} are offloaded by a hook on a module above it; "
                    f"read them through that module"
                )
        yield module


def resident(embedding: nn.Module) -> nn.Module:
    """The target's input embeddings as a drafter calls them at every step: the module itself, or where accelerate
    offloaded a plain `nn.Embedding`, a frozen copy on its execution device, read once (each call of an offloaded
    module reads its weight from disk or CPU memory again: 113 MB for SmolLM2 in fp32). Other offloaded embedding
    types (scaled ones) are returned as they are: exact, read at each call."""
    if type(embedding) is not nn.Embedding or not is_offloaded(embedding):
        return embedding
    with onloaded(embedding) as module:
        weight = module.weight.detach().clone()  # the onloaded values are dropped after the block
    return nn.Embedding.from_pretrained(weight, freeze=True, padding_idx=embedding.padding_idx)


def vocab_size(model: PreTrainedModel) -> int:
    """The width of the model's logits (its LM head's output features; the config's when it has none)."""
    head = model.get_output_embeddings()
    if head is None:
        return model.config.get_text_config().vocab_size
    return getattr(head, "out_features", None) or head.weight.shape[0]


def whole(tensor: torch.Tensor) -> torch.Tensor:
    """The full value of a tensor-parallel parameter (a `DTensor`, as `tp_plan="auto"` leaves them: its shards
    gathered, a collective that every rank of its mesh must run); any other tensor unchanged."""
    full = getattr(tensor, "full_tensor", None)
    return full() if full is not None else tensor
