"""What the head trainers share (train_medusa, train_eagle): the optimizer and its schedule, the resumable training
loop, the draft vocabulary, and frozen fp32 copies of the target's embeddings."""

from __future__ import annotations

import time
from pathlib import Path

import torch
from omegaconf import DictConfig
from tqdm.auto import tqdm
from transformers import get_cosine_schedule_with_warmup

from training.checkpoints import resume, save_checkpoint


def optimizer_and_schedule(cfg: DictConfig, params, batches: int):
    steps = batches // cfg.train.grad_accum
    steps = min(steps, cfg.train.max_steps) if cfg.train.max_steps else steps
    optimizer = torch.optim.AdamW(list(params), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    return optimizer, get_cosine_schedule_with_warmup(optimizer, cfg.train.warmup_steps, steps), steps


def train_loop(
    cfg, accelerator, model, optimizer, scheduler, steps: int, step, ckpt_dir: Path, desc: str
) -> list[dict]:
    """The shared loop: `step(index) -> (loss, per-part losses, tokens)`; logs, checkpoints, resumes."""
    total = steps * cfg.train.grad_accum
    done, log = resume(accelerator, ckpt_dir)
    progress = tqdm(total=total, initial=done, desc=desc, unit="batch", disable=not accelerator.is_main_process)
    tokens, tic = 0, time.perf_counter()
    model.train()
    for index in range(done, total):
        with accelerator.accumulate(model):
            loss, parts, count = step(index)
            accelerator.backward(loss)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
        tokens += count
        progress.update(1)
        if (index + 1) % cfg.train.log_every == 0 or index + 1 == total:
            seconds = time.perf_counter() - tic
            # over all processes: mean losses, tokens summed (the same log on every process)
            losses = accelerator.reduce(torch.tensor([loss.item(), *parts], device=accelerator.device), "mean")
            loss_value, parts = losses[0].item(), losses[1:].tolist()
            all_tokens = int(accelerator.reduce(torch.tensor(tokens, device=accelerator.device), "sum"))
            log.append({"batch": index + 1, "loss": loss_value, "parts": parts, "tokens_per_s": all_tokens / seconds})
            progress.set_postfix(loss=f"{loss_value:.3f}", tok_s=f"{all_tokens / seconds:.0f}")
        if (index + 1) % cfg.train.checkpoint_every == 0 or index + 1 == total:
            save_checkpoint(accelerator, ckpt_dir, index + 1, log)
    progress.close()
    model.eval()
    return log


def draft_vocab(rows: list[dict], size: int) -> torch.Tensor:
    """The `size` most frequent answer tokens of `rows` (fewer if fewer occur), most frequent first."""
    counts = torch.bincount(torch.tensor([t for r in rows for t in r["answer_ids"]], dtype=torch.long))
    order = counts.argsort(descending=True, stable=True)
    return order[: min(size, int((counts > 0).sum()))]


def frozen_copy(module: torch.nn.Module) -> torch.nn.Module:
    """An fp32 copy of an LM head (`nn.Linear`) or input embedding (`nn.Embedding`) that takes no gradient."""
    weight = torch.nn.Parameter(module.weight.detach().float().clone(), requires_grad=False)
    if isinstance(module, torch.nn.Embedding):
        return torch.nn.Embedding.from_pretrained(weight, freeze=True)
    copy = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    copy.weight = weight
    return copy
