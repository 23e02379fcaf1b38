"""Train Medusa heads for the target (config: conf/train_medusa.yaml).

Stages, each resumable:

1. data: prompts from ../shared/data formatted with the chat template, the target's own greedy answers
   (self-distillation; shared with distill_draft through `data_cache`) and human-written answers
   scored by the target; never the dev or held-out evaluation prompts.
2. Medusa-1 (frozen target): the target's final hidden state at every answer position is computed once
   and cached in shards with the labels of every head (token `t + 2 + k` for head `k`), so training
   runs only the heads: the target is never run again.
   Medusa-2 (`medusa.lora=true`): LoRA on the target through peft; joint loss = distillation of the
   LM head towards the original target's top-k (keeps its outputs) + `heads_weight` * the heads' loss.
3. training with accelerate (device, precision, `accelerate launch`), gradient accumulation, progress
   bar, checkpoints and resume; head k's loss is weighted `head_decay ** k`. Under `accelerate launch
   --num_processes N` the main process makes the data and the features (the others then read its shards),
   each process trains on its share of every batch (gradients averaged by DDP, so a step is the same batch as in
   one process), and only the main process writes files; at the end the processes check that their heads agree.
4. report: per-head top-1 / top-k accuracy on held-out self-generated answers, the tree shape with the
   most expected accepted tokens for `tree_budget` nodes (`specdec.tree.best_choices`), tokens/s of
   training; heads (+ adapter), `metrics.json` and a README with the command go to `output_dir`.

Run: .venv/bin/python -m training.train_medusa  (see the config's header for Medusa-2 and a smoke run)
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import hydra
import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import gather_object
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from heads.medusa import ADAPTER_DIR, MedusaHeads
from specdec.models import load_model
from specdec.tree import best_choices
from training.common import draft_vocab, frozen_copy, optimizer_and_schedule, train_loop
from training.data import (
    collate,
    make_batches,
    pad_id,
    reproduce_command,
    resolve_device,
    split_heldout,
    teacher_forced_rows,
)
from training.mix import mix_counts, mix_rows, mix_table

IGNORE = -100

# ---------------------------------------------------------------- labels and features


def head_labels(batch: list[dict], num_heads: int) -> torch.Tensor:
    """`[B, T, K]` head k's label at position t: token `t + 2 + k` of the conversation where that is an answer
    token, else IGNORE (positions are those of `collate(batch)`: T is the longest conversation)."""
    width = max(len(r["prompt_ids"]) + len(r["answer_ids"]) for r in batch)
    labels = torch.full((len(batch), width, num_heads), IGNORE, dtype=torch.long)
    for i, row in enumerate(batch):
        seq, start = row["prompt_ids"] + row["answer_ids"], len(row["prompt_ids"])
        for k in range(num_heads):
            for t in range(max(start - 2 - k, 0), len(seq) - 2 - k):
                labels[i, t, k] = seq[t + 2 + k]
    return labels


def head_paths(batch: list[dict], num_heads: int, pad: int) -> torch.Tensor:
    """`[B, T, K]` tokens `t + 1 .. t + K` of the conversation at position t (`pad` past its end): what
    path-conditioned heads read (head k the first k + 1)."""
    width = max(len(r["prompt_ids"]) + len(r["answer_ids"]) for r in batch)
    paths = torch.full((len(batch), width + num_heads + 1), pad, dtype=torch.long)
    for i, row in enumerate(batch):
        seq = row["prompt_ids"] + row["answer_ids"]
        paths[i, : len(seq)] = torch.tensor(seq)
    return paths.unfold(1, num_heads, 1)[:, 1 : width + 1]


@torch.inference_mode()
def cache_features(target, rows: list[dict], num_heads: int, pad: int, batch_size: int, shard_dir: Path) -> dict:
    """The frozen target's final hidden state `[M, H]`, the heads' labels `[M, K]` and the paths `[M, K]` at
    every position with at least one label, in resumable safetensors shards (one per batch of conversations);
    returns those of `rows`. Shards from before paths were cached are made again.

    Raises:
        ValueError: an existing shard holds other conversations (another config wrote `shard_dir`).
    """
    shard_dir.mkdir(parents=True, exist_ok=True)
    batches = [rows[i : i + batch_size] for i in range(0, len(rows), batch_size)]
    shards = []
    for index, batch in enumerate(tqdm(batches, desc=f"features ({shard_dir.name})", unit="batch")):
        shard = shard_dir / f"{index:05d}.safetensors"
        labels = head_labels(batch, num_heads)  # [B, T, K]
        keep = (labels != IGNORE).any(-1)
        cached = load_file(shard) if shard.exists() else {}
        if "paths" not in cached:
            input_ids, attention_mask, _ = (t.to(target.device) for t in collate(batch, pad))
            out = target(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
            tmp = shard.with_suffix(".tmp")
            hidden = out.hidden_states[-1][keep.to(target.device)].bfloat16().cpu().contiguous()
            paths = head_paths(batch, num_heads, pad)[keep].contiguous()
            cached = {"hidden": hidden, "labels": labels[keep], "paths": paths}
            save_file(cached, tmp)
            tmp.rename(shard)
        shards.append(cached)
        if not torch.equal(shards[-1]["labels"], labels[keep]):
            raise ValueError(f"{shard} was made from other conversations; delete {shard_dir} or change work_dir")
    return {key: torch.cat([s[key] for s in shards]) for key in ("hidden", "labels", "paths")}


# ---------------------------------------------------------------- losses and accuracy


def heads_loss(logits: torch.Tensor, labels: torch.Tensor, decay: float) -> tuple[torch.Tensor, list[float]]:
    """`sum_k decay**k * CE(head k)` for logits `[K, M, V]` and labels `[M, K]`; also each head's CE."""
    losses = [
        torch.nn.functional.cross_entropy(logits[k].float(), labels[:, k], ignore_index=IGNORE)
        for k in range(logits.shape[0])
    ]
    losses = [torch.nan_to_num(loss) for loss in losses]  # a batch without labels for a head adds nothing
    return sum(decay**k * loss for k, loss in enumerate(losses)), [loss.item() for loss in losses]


@torch.inference_mode()
def rank_accuracy(heads: MedusaHeads, lm_head, embed, features: dict, topk: int, batch: int = 512) -> torch.Tensor:
    """`[K, topk]` share of held-out positions where head k's rank-r candidate is the right token (for
    path-conditioned heads: given the right path; candidates only from the heads' draft vocabulary).
    Runs where `lm_head` is."""
    device = lm_head.weight.device
    hits = torch.zeros(heads.config.num_heads, topk, device=device)
    counts = torch.zeros(heads.config.num_heads, 1, device=device)
    outside = None  # tokens outside the heads' draft vocabulary, when they have one
    if heads.config.draft_vocab:
        outside = torch.ones(heads.config.vocab_size, dtype=torch.bool, device=device)
        outside[heads.vocab.to(device)] = False
    for i in range(0, len(features["labels"]), batch):
        hidden = features["hidden"][i : i + batch].to(device, lm_head.weight.dtype)
        labels = features["labels"][i : i + batch].T.to(device)  # [K, M]
        logits = heads(hidden, lm_head, features["paths"][i : i + batch].to(device), embed)  # [K, M, V]
        if outside is not None:
            logits[..., outside] = float("-inf")
        top = logits.topk(topk, dim=-1).indices  # [K, M, topk]
        valid = labels != IGNORE
        hits += ((top == labels.unsqueeze(-1)) & valid.unsqueeze(-1)).sum(1).float()
        counts += valid.sum(1, keepdim=True).float()
    return (hits / counts.clamp(min=1)).cpu()


# ---------------------------------------------------------------- training


def train_medusa1(cfg: DictConfig, heads: MedusaHeads, lm_head, embed, features: dict, ckpt_dir: Path) -> list[dict]:
    """Heads only, on cached features; resumes from the newest checkpoint in `ckpt_dir`."""
    accelerator = Accelerator(
        mixed_precision=cfg.train.mixed_precision, gradient_accumulation_steps=cfg.train.grad_accum
    )
    size, n = cfg.train.batch_positions, len(features["labels"])
    order = [torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed + e)) for e in range(cfg.train.epochs)]
    batches = [_share(perm[i : i + size], accelerator) for perm in order for i in range(0, n, size)]
    optimizer, scheduler, steps = optimizer_and_schedule(cfg, heads.parameters(), len(batches))
    heads, optimizer, scheduler = accelerator.prepare(heads, optimizer, scheduler)
    lm_head, embed = lm_head.to(accelerator.device), embed.to(accelerator.device)

    def step(index: int) -> tuple[torch.Tensor, list[float], int]:
        hidden = features["hidden"][batches[index]].to(accelerator.device, torch.float32)
        labels = features["labels"][batches[index]].to(accelerator.device)
        paths = features["paths"][batches[index]].to(accelerator.device)
        loss, per_head = heads_loss(heads(hidden, lm_head, paths, embed), labels, cfg.train.head_decay)
        return loss, per_head, len(labels)

    return train_loop(cfg, accelerator, heads, optimizer, scheduler, steps, step, ckpt_dir, "medusa-1")


def train_medusa2(
    cfg: DictConfig, heads: MedusaHeads, target, rows: list[dict], pad: int, ckpt_dir: Path
) -> list[dict]:
    """LoRA on the target and the heads, jointly: LM-head distillation + heads_weight * heads' loss."""
    accelerator = Accelerator(
        mixed_precision=cfg.train.mixed_precision, gradient_accumulation_steps=cfg.train.grad_accum
    )
    epochs = range(cfg.train.epochs)
    batches = [_share(b, accelerator) for e in epochs for b in make_batches(rows, cfg.train.batch_size, cfg.seed + e)]
    model = torch.nn.ModuleDict({"target": target, "heads": heads})
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer, scheduler, steps = optimizer_and_schedule(cfg, trainable, len(batches))
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)

    def step(index: int) -> tuple[torch.Tensor, list[float], int]:
        batch = batches[index]
        input_ids, attention_mask, answer_mask = (t.to(accelerator.device) for t in collate(batch, pad))
        out = model["target"](input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
        labels = head_labels(batch, cfg.medusa.num_heads).to(accelerator.device)  # [B, T, K]
        keep = (labels != IGNORE).any(-1)
        lm_head, embed = model["target"].get_output_embeddings(), model["target"].get_input_embeddings()
        paths = head_paths(batch, cfg.medusa.num_heads, pad).to(accelerator.device)[keep]
        logits = model["heads"](out.hidden_states[-1][keep], lm_head, paths, embed)  # [K, M, V]
        h_loss, per_head = heads_loss(logits, labels[keep], cfg.train.head_decay)
        top_ids = torch.tensor([p for r in batch for p in r["topk_ids"]], device=accelerator.device)
        top_p = torch.tensor([p for r in batch for p in r["topk_logprobs"]], device=accelerator.device).float().exp()
        log_q = torch.log_softmax(out.logits[answer_mask].float(), dim=-1)
        lm_loss = -((top_p / top_p.sum(-1, keepdim=True)) * log_q.gather(-1, top_ids)).sum(-1).mean()
        return lm_loss + cfg.train.heads_weight * h_loss, [lm_loss.item(), *per_head], int(attention_mask.sum())

    return train_loop(cfg, accelerator, model, optimizer, scheduler, steps, step, ckpt_dir, "medusa-2")


def _share(batch, accelerator: Accelerator):
    """This process's part of a batch (every `num_processes`-th item): together the processes train on the whole
    batch, and DDP averages their gradients."""
    return batch[accelerator.process_index :: accelerator.num_processes]


# ---------------------------------------------------------------- main


def load_rows(cfg: DictConfig, target, tokenizer) -> list[dict]:
    cache = Path(cfg.data_cache)
    rows = []
    if cfg.data.self_distill:
        rows += mix_rows(cfg, target, tokenizer, cache)
    rows += teacher_forced_rows(cfg, target, tokenizer, cache / "teacher_forced")
    return rows


def finish(
    cfg: DictConfig, heads: MedusaHeads, target, heldout: dict, log: list[dict], extra: dict, rows: list[dict]
) -> dict:
    """Held-out accuracies, the best tree shape for them, export and report (`target`: its LM head and input
    embeddings are read; `rows`: the training conversations, whose answers give the draft vocabulary)."""
    lm_head, embed = target.get_output_embeddings(), target.get_input_embeddings()
    heads = heads.to(lm_head.weight.device, lm_head.weight.dtype)
    if cfg.medusa.draft_vocab:
        full_vocab = rank_accuracy(heads, lm_head, embed, heldout, 1)[:, 0].tolist()
        heads.restrict_vocab(draft_vocab(rows, cfg.medusa.draft_vocab))
        extra = {"top1_accuracy_full_vocab": full_vocab, **extra}
    accuracy = rank_accuracy(heads, lm_head, embed, heldout, cfg.medusa.tree_topk)
    choices = best_choices(accuracy, cfg.medusa.tree_budget)
    heads.config = dataclasses.replace(heads.config, choices=[list(c) for c in choices])
    out = heads.save_pretrained(cfg.output_dir)
    metrics = {
        "target": cfg.target,
        "heads": {key: v for key, v in dataclasses.asdict(heads.config).items() if key != "base_fingerprint"},
        "heldout_positions": len(heldout["labels"]),
        "top1_accuracy": accuracy[:, 0].tolist(),
        f"top{cfg.medusa.tree_topk}_accuracy": accuracy.cumsum(-1)[:, -1].tolist(),
        "rank_accuracy": accuracy.tolist(),
        "draft_vocab": heads.config.draft_vocab,
        "expected_accepted_length": 1 + _expected_accepted(accuracy, choices),
        "train_tokens_per_s": log[-1]["tokens_per_s"] if log else None,
        "final_loss": log[-1]["loss"] if log else None,
        "mix": mix_counts(rows),
        "config_name": HydraConfig.get().job.config_name,
        "init_from": cfg.get("init_from"),
        "command_overrides": list(HydraConfig.get().overrides.task),
        **extra,
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    command = reproduce_command("train_medusa", metrics["config_name"], metrics["command_overrides"])
    (out / "README.md").write_text(
        f"# {out.name}\n\nMedusa heads for `{cfg.target}` trained by `training/train_medusa.py`.\n\n"
        f"Reproduce: `{command}`\n\n"
        f"Measured at export: `metrics.json` (per-head accuracy on held-out self-generated answers, the tree "
        f"shape chosen from it, training speed).\n\n"
        f"Training conversations by task type (the mix, `conf/data/mix.yaml`; held-out ones not included):\n\n"
        f"{mix_table(rows)}\n"
    )
    return metrics


def _expected_accepted(accuracy: torch.Tensor, choices: list[tuple[int, ...]]) -> float:
    """Expected accepted draft tokens of the tree `choices` under independent rank accuracies."""
    total = 0.0
    for choice in choices:
        p = 1.0
        for depth, rank in enumerate(choice):
            p *= float(accuracy[depth, rank])
        total += p
    return total


@hydra.main(config_path="../conf", config_name="train_medusa", version_base="1.3")
def main(cfg: DictConfig) -> None:
    work = Path(cfg.work_dir)
    torch.manual_seed(cfg.seed)
    device = resolve_device(cfg.device)
    # under `accelerate launch` (or torchrun): this process's rank and device; on CPUs, gloo (accelerate detects
    # several CPU processes only when told that they are on CPUs)
    state = PartialState(cpu=device.type == "cpu")
    target, tokenizer = load_model(cfg.target, dtype=cfg.data.gen_dtype)
    target = target.to(state.device if state.num_processes > 1 else device)
    with state.main_process_first():  # the main process makes the answers, the others then read its shards
        rows = load_rows(cfg, target, tokenizer)
    pad = pad_id(tokenizer)
    train_rows, heldout_rows = split_heldout(rows, cfg.data.heldout)
    state.print(f"{len(train_rows)} training conversations, {len(heldout_rows)} held out")
    k = cfg.medusa.num_heads
    heads = MedusaHeads.for_model(
        target, k, cfg.medusa.num_layers, cfg.medusa.shared_lm_head, name=cfg.target, path_inputs=cfg.medusa.path_inputs
    )
    if cfg.get("init_from"):
        heads = initialised_from(heads, cfg.init_from, target)
    heads = heads.float()
    extra = {"num_processes": state.num_processes}
    if not cfg.medusa.lora:  # Medusa-1: the frozen target runs once, to cache its hidden states
        batch = cfg.data.feature_batch_size
        with state.main_process_first():
            heldout = cache_features(target, heldout_rows, k, pad, batch, work / "features_heldout")
            features = cache_features(target, train_rows, k, pad, batch, work / "features")
        state.print(f"{len(features['labels'])} training positions cached")
        frozen = FrozenParts(frozen_copy(target.get_output_embeddings()), frozen_copy(target.get_input_embeddings()))
        del target
        log = train_medusa1(cfg, heads, frozen.lm_head, frozen.embed, features, work / "checkpoints")
        check_processes_agree(heads, state)
        if state.is_main_process:
            extra["train_positions"] = len(features["labels"])
            metrics = finish(cfg, heads, frozen, heldout, log, extra, train_rows)
    else:  # Medusa-2: LoRA on a trainable fp32 copy of the target, trained with the heads
        del target
        target, _ = load_model(cfg.target, dtype="fp32")  # accelerate moves the trainable copy
        lora = LoraConfig(
            r=cfg.medusa.lora_rank, lora_alpha=cfg.medusa.lora_alpha, target_modules=list(cfg.medusa.lora_targets)
        )
        peft_target = get_peft_model(plain_copy(target), lora)
        heads.config = dataclasses.replace(heads.config, lora=True)
        log = train_medusa2(cfg, heads, peft_target, train_rows, pad, work / "checkpoints-lora")
        check_processes_agree(heads, state)
        if state.is_main_process:
            peft_target.save_pretrained(Path(cfg.output_dir) / ADAPTER_DIR)
            merged = peft_target.merge_and_unload().eval()
            batch = cfg.data.feature_batch_size
            heldout = cache_features(merged, heldout_rows, k, pad, batch, work / "features_heldout_lora")
            metrics = finish(cfg, heads, merged, heldout, log, {"medusa": 2, **extra}, train_rows)
    if not state.is_main_process:  # only the main process writes files
        return
    (work / "train_log.json").write_text(json.dumps(log, indent=1))
    print(json.dumps({key: v for key, v in metrics.items() if key not in ("command_overrides", "heads")}, indent=2))
    print(f"heads written to {cfg.output_dir}")


def check_processes_agree(heads: MedusaHeads, state: PartialState) -> None:
    """Under `accelerate launch`: each process prints a digest of its trained heads, and all must be equal (DDP keeps
    them so); one process alone does nothing.

    Raises:
        RuntimeError: the processes ended with different heads.
    """
    if state.num_processes <= 1:
        return
    digest = hashlib.sha256()
    for name, tensor in sorted(heads.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    print(f"process {state.process_index} of {state.num_processes}: heads sha256 {digest.hexdigest()}", flush=True)
    digests = gather_object([digest.hexdigest()])
    if len(set(digests)) > 1:
        raise RuntimeError(f"the training processes ended with different heads: {digests}")


def initialised_from(heads: MedusaHeads, name_or_dir: str, target) -> MedusaHeads:
    """`heads` (new, of this config's shape) with the weights of trained heads for `target`: training then
    fine-tunes them, e.g. on new data. Their draft vocabulary and tree shape are not kept: both are chosen
    again from this run's data at export.

    Raises:
        ValueError: the trained heads belong to another model or have another shape than this config's.
    """
    trained = MedusaHeads.from_pretrained(name_or_dir, target)
    shape = ("num_heads", "num_layers", "shared_lm_head", "path_inputs")
    theirs, ours = ([getattr(h.config, key) for key in shape] for h in (trained, heads))
    if theirs != ours:
        raise ValueError(
            f"init_from={name_or_dir!r} has {dict(zip(shape, theirs, strict=True))}, this config "
            f"{dict(zip(shape, ours, strict=True))}: set the medusa.* keys to the trained heads' values"
        )
    state = {key: value for key, value in trained.state_dict().items() if key != "vocab"}
    heads.load_state_dict(state)  # new heads have no draft vocabulary: the shapes above fix every other key
    return heads


def plain_copy(model):
    """A plain (trainable) model of the same class from `model`'s config and weights: transformers marks a
    GGUF-loaded model as not trainable."""
    plain = type(model)(model.config)
    plain.load_state_dict(model.state_dict())
    return plain


@dataclasses.dataclass
class FrozenParts:
    """The frozen target's parts the heads read once the target is gone (Medusa-1)."""

    lm_head: torch.nn.Module
    embed: torch.nn.Module

    def get_output_embeddings(self) -> torch.nn.Module:
        return self.lm_head

    def get_input_embeddings(self) -> torch.nn.Module:
        return self.embed


if __name__ == "__main__":
    main()
