"""Distil a small draft model from the target by self-distillation (config: conf/distill_draft.yaml).

Stages, each resumable:

1. prompts: instruction, roleplay, tool-use, code and math prompts from ../shared/data (never the dev
   question files or HumanEval), formatted with the target's chat template; a held-out share is set aside.
2. answers: the target's own greedy answers, generated in batches and written as JSONL shards, with
   the target's top-k log-probabilities at every answer position; plus, cheaper, the target's top-k on
   human-written answers from the same files (teacher forcing: one batched forward, no generation).
3. training: a small Llama (embeddings initialised from the target's, projected by SVD) learns the
   target's next-token distribution on those conversations: cross-entropy against the target's top-k
   probabilities, kept while it generated the answers (so training needs no target forward); accelerate
   handles device and precision; checkpoints every N steps.
4. report: top-1 agreement with the target on the held-out answers, per-token cost of draft vs target;
   the draft, its tokenizer, `metrics.json` and a README with this command are written to `output_dir`.

Run: .venv/bin/python -m training.distill_draft  (see the config's header for a smoke run)
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import hydra
import torch
from accelerate import Accelerator
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm
from transformers import LlamaConfig, LlamaForCausalLM, get_cosine_schedule_with_warmup

from specdec.models import load_model
from training.checkpoints import resume, save_checkpoint
from training.data import (
    collate,
    make_batches,
    pad_id,
    reproduce_command,
    resolve_device,
    split_heldout,
    teacher_forced_rows,
)
from training.mix import mix_rows

# ---------------------------------------------------------------- stage 3: training


def build_draft(cfg: DictConfig, target) -> LlamaForCausalLM:
    """The draft to train: `draft.init=target_layers` keeps the target's width, embeddings (tied LM head)
    and final norm plus a few of its layers; `draft.init=scratch` builds a narrower Llama whose
    embeddings are the target's projected by SVD."""
    if cfg.draft.init == "target_layers":
        return _draft_from_target_layers(target, list(cfg.draft.target_layers), cfg.draft.freeze_embeddings)
    return _draft_from_scratch(cfg, target)


def _draft_from_target_layers(target, layers: list[int], freeze_embeddings: bool) -> LlamaForCausalLM:
    settings = {k: v for k, v in target.config.to_dict().items() if k not in ("quantization_config", "dtype")}
    config = LlamaConfig.from_dict({**settings, "num_hidden_layers": len(layers), "tie_word_embeddings": True})
    draft = LlamaForCausalLM(config)
    draft.model.embed_tokens.load_state_dict(target.model.embed_tokens.state_dict())
    draft.model.norm.load_state_dict(target.model.norm.state_dict())
    for mine, theirs in enumerate(layers):
        draft.model.layers[mine].load_state_dict(target.model.layers[theirs].state_dict())
    draft.tie_weights()
    draft.model.embed_tokens.weight.requires_grad_(not freeze_embeddings)
    return draft.float()


def _draft_from_scratch(cfg: DictConfig, target) -> LlamaForCausalLM:
    tc = target.config
    architecture = {k: v for k, v in OmegaConf.to_container(cfg.draft).items() if k in _SCRATCH_FIELDS}
    config = LlamaConfig(
        **architecture,
        vocab_size=tc.vocab_size,
        max_position_embeddings=tc.max_position_embeddings,
        rope_parameters=tc.rope_parameters,
        rms_norm_eps=tc.rms_norm_eps,
        tie_word_embeddings=True,
        bos_token_id=tc.bos_token_id,
        eos_token_id=tc.eos_token_id,
        pad_token_id=tc.pad_token_id,
    )
    torch.manual_seed(cfg.seed)
    draft = LlamaForCausalLM(config)
    embeddings = target.get_input_embeddings().weight.detach().float()  # [V, H_target]
    _, _, vh = torch.linalg.svd(embeddings - embeddings.mean(0), full_matrices=False)
    projected = embeddings @ vh[: config.hidden_size].T  # [V, H_draft]
    with torch.no_grad():
        draft.get_input_embeddings().weight.copy_(projected / projected.std() * config.initializer_range)
    return draft


_SCRATCH_FIELDS = (
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "intermediate_size",
)


def sparse_targets(batch: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    """The target's top-k at every answer position, in `loss_mask` order: ids `[M, k]`, probabilities `[M, k]`."""
    ids = torch.tensor([pos for r in batch for pos in r["topk_ids"]])
    probs = torch.tensor([pos for r in batch for pos in r["topk_logprobs"]]).float().exp()
    return ids, probs / probs.sum(-1, keepdim=True)


def kd_loss(draft_logits: torch.Tensor, mask: torch.Tensor, top_ids: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the draft against the target's renormalised top-k distribution (forward KL up to
    a constant), averaged over the masked positions. Logits `[B, T, V]`, mask `[B, T]`, targets `[M, k]`."""
    log_q = torch.log_softmax(draft_logits[mask].float(), dim=-1)  # [M, V]
    return -(top_p * log_q.gather(-1, top_ids)).sum(-1).mean()


def train(cfg: DictConfig, rows: list[dict], draft, pad: int, ckpt_dir: Path) -> list[dict]:
    """KD training with accelerate; resumes from the newest checkpoint in `ckpt_dir`. Returns the loss log."""
    accelerator = Accelerator(
        mixed_precision=cfg.train.mixed_precision, gradient_accumulation_steps=cfg.train.grad_accum
    )
    epochs = [make_batches(rows, cfg.train.batch_size, cfg.seed + e) for e in range(cfg.train.epochs)]
    steps = sum(map(len, epochs)) // cfg.train.grad_accum
    steps = min(steps, cfg.train.max_steps) if cfg.train.max_steps else steps
    trainable = [p for p in draft.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    scheduler = get_cosine_schedule_with_warmup(optimizer, cfg.train.warmup_steps, steps)
    draft, optimizer, scheduler = accelerator.prepare(draft, optimizer, scheduler)

    done, log = resume(accelerator, ckpt_dir)
    flat = [b for epoch in epochs for b in epoch][: steps * cfg.train.grad_accum]
    progress = tqdm(total=len(flat), initial=done, desc="distilling", unit="batch")
    tokens, tic = 0, time.perf_counter()
    draft.train()
    for index in range(done, len(flat)):
        input_ids, attention_mask, loss_mask = (t.to(accelerator.device) for t in collate(flat[index], pad))
        top_ids, top_p = (t.to(accelerator.device) for t in sparse_targets(flat[index]))
        with accelerator.accumulate(draft):
            logits = draft(input_ids=input_ids, attention_mask=attention_mask).logits
            loss = kd_loss(logits, loss_mask, top_ids, top_p)
            accelerator.backward(loss)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
        tokens += int(attention_mask.sum())
        progress.update(1)
        if (index + 1) % cfg.train.log_every == 0 or index + 1 == len(flat):
            entry = {
                "batch": index + 1,
                "loss": loss.item(),
                "lr": scheduler.get_last_lr()[0],
                "tokens_per_s": tokens / (time.perf_counter() - tic),
            }
            log.append(entry)
            progress.set_postfix(loss=f"{entry['loss']:.3f}", tok_s=f"{entry['tokens_per_s']:.0f}")
        if (index + 1) % cfg.train.checkpoint_every == 0 or index + 1 == len(flat):
            save_checkpoint(accelerator, ckpt_dir, index + 1, log)
    progress.close()
    return log


# ---------------------------------------------------------------- stage 4: report and export


@torch.inference_mode()
def top1_agreement(draft, target, rows: list[dict], pad: int) -> dict:
    """Share of held-out answer positions where the draft's argmax equals the target's (and top-3 hits)."""
    hits = hits3 = total = 0
    draft.eval()
    for batch in make_batches(rows, 8, seed=0):
        input_ids, attention_mask, loss_mask = collate(batch, pad)
        t = target(input_ids=input_ids, attention_mask=attention_mask).logits[loss_mask].argmax(-1)
        d = draft(input_ids=input_ids, attention_mask=attention_mask).logits[loss_mask].float()
        hits += int((d.argmax(-1) == t).sum())
        hits3 += int((d.topk(3, dim=-1).indices == t[:, None]).any(-1).sum())
        total += len(t)
    return {"top1_agreement": hits / total, "top3_contains_target_top1": hits3 / total, "positions": total}


@torch.inference_mode()
def per_token_ms(model, context: int = 256, repeats: int = 15) -> float:
    """Median milliseconds of a one-token forward after a `context`-token cache."""
    cache = model(torch.randint(0, model.config.vocab_size, (1, context)), use_cache=True).cache
    times = []
    for _ in range(repeats):
        tic = time.perf_counter()
        model(torch.randint(0, model.config.vocab_size, (1, 1)), cache=cache, use_cache=True)
        times.append(time.perf_counter() - tic)
        cache.crop(-1)
    return 1000 * sorted(times)[len(times) // 2]


def cost_report(cfg: DictConfig) -> dict:
    """Per-token cost of the exported draft and the target, each loaded fresh in each dtype."""
    report = {}
    for dtype in ("bf16", "fp32"):
        target, _ = load_model(cfg.target, dtype=dtype)
        draft, _ = load_model(cfg.output_dir, dtype=dtype)
        t_ms, d_ms = per_token_ms(target), per_token_ms(draft)
        report[dtype] = {"target_ms": t_ms, "draft_ms": d_ms, "draft_over_target": d_ms / t_ms}
    return report


def export(cfg: DictConfig, draft, tokenizer) -> None:
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    draft.to(torch.bfloat16).save_pretrained(out)
    tokenizer.save_pretrained(out)


def write_report(cfg: DictConfig, metrics: dict) -> None:
    out = Path(cfg.output_dir)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    command = reproduce_command("distill_draft", HydraConfig.get().job.config_name, metrics["command_overrides"])
    (out / "README.md").write_text(
        f"# {out.name}\n\nA draft model for `{cfg.target}` distilled from it by `training/distill_draft.py`.\n\n"
        f"Reproduce: `{command}`\n\n"
        f"Measured at export: see `metrics.json` (top-1 agreement on held-out answers, per-token cost).\n"
    )


@hydra.main(config_path="../conf", config_name="distill_draft", version_base="1.3")
def main(cfg: DictConfig) -> None:
    work = Path(cfg.work_dir)
    target, tokenizer = load_model(cfg.target, dtype=cfg.data.gen_dtype)  # the teacher for both data stages
    target = target.to(resolve_device(cfg.device))
    rows = mix_rows(cfg, target, tokenizer, work)
    rows += teacher_forced_rows(cfg, target, tokenizer, work / "teacher_forced")
    del target
    train_rows, heldout = split_heldout(rows, cfg.data.heldout)
    answer_tokens = sum(len(r["answer_ids"]) for r in train_rows)
    print(f"{len(train_rows)} training conversations ({answer_tokens} answer tokens), {len(heldout)} held out")

    target_fp32, _ = load_model(cfg.target, dtype="fp32")
    pad = pad_id(tokenizer)
    draft = build_draft(cfg, target_fp32)
    log = train(cfg, train_rows, draft, pad, work / "checkpoints")
    draft = draft.float().eval()
    metrics = {
        "target": cfg.target,
        "draft_parameters": sum(p.numel() for p in draft.parameters()),
        "draft_init": cfg.draft.init,
        "train_conversations": len(train_rows),
        "train_answer_tokens": answer_tokens,
        **top1_agreement(draft, target_fp32, heldout, pad),
        "final_loss": log[-1]["loss"] if log else None,
        "train_tokens_per_s": log[-1]["tokens_per_s"] if log else None,
        "command_overrides": list(HydraConfig.get().overrides.task),
    }
    (work / "train_log.json").write_text(json.dumps(log, indent=1))
    export(cfg, draft, tokenizer)
    metrics["cost"] = cost_report(cfg)
    write_report(cfg, metrics)
    print(json.dumps({k: v for k, v in metrics.items() if k != "command_overrides"}, indent=2))
    print(f"draft written to {cfg.output_dir}")


if __name__ == "__main__":
    main()
