"""Train an EAGLE-3 head for the built-in target by self-distillation (config: conf/train_eagle.yaml).

1. data: the target's greedy answers to the training mix (`training/mix.py`, shared with the other apps).
2. training: per batch, one forward of the frozen target gives the states entering the head's three layers and its
   final hidden states (hooks; the LM head runs on the draft vocabulary's rows only), and the head is unrolled over
   `train.steps` draft positions on its own outputs, EAGLE-3's training-time test (Li et al. 2025; SafeAILab/EAGLE
   `eagle/traineagle3/cnets.py`): step `k` at position `j` reads the embedding of token `j+1+k` and the head's own
   step `k-1` output at `j` (step 0: the target's features at `j`), at rotary position `j+k`; it attends to the
   real context up to `j` (step 0's entries) and to its own earlier steps at `j` (the path a drafted node sees at
   depth `k`), and learns the target's distribution over the draft vocabulary for token `j+2+k` (soft
   cross-entropy on answer tokens, weighted `step_decay**k`).
3. report: per draft position, the share of held-out answer tokens that are the head's top-1 given the earlier
   ones right (a chain's acceptance at that depth), overall and per task type; the head (`save_pretrained`),
   `metrics.json` and a README to `output_dir`, and the EAGLE-3 layout vLLM and SGLang load (`export_eagle3`).

Run: .venv/bin/python -m training.train_eagle
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

import hydra
import torch
from accelerate import Accelerator
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig
from tqdm.auto import tqdm

from heads.eagle import EagleHead, HeadCache, export_eagle3
from specdec import verify
from specdec.models import load_model
from training.common import draft_vocab, frozen_copy, optimizer_and_schedule, train_loop
from training.data import collate, make_batches, pad_id, reproduce_command, resolve_device, split_heldout
from training.mix import mix_counts, mix_rows, mix_table, task_of

# ---------------------------------------------------------------- the target's side


@contextmanager
def _final_states(model):
    """The decoder's last hidden states (after its final norm: what the LM head reads) of each forward."""
    captured: list[torch.Tensor] = []
    hook = model.get_decoder().register_forward_hook(lambda _, __, out: captured.append(out[0]))
    try:
        yield captured
    finally:
        hook.remove()


@torch.no_grad()
def target_side(target, batch: list[dict], layers: tuple[int, ...], draft_ids: torch.Tensor, pad: int) -> list[dict]:
    """Per row of `batch`: `features` `[T, k*H]` (the states entering `layers`), `logits` `[T, V']` (the target's
    next-token logits over the draft vocabulary `draft_ids`), `tokens` `[T]` and `answer` `[T]` (position `t`
    predicts an answer token), on the target's device; one forward for the batch."""
    device = verify.input_device(target)
    input_ids, attention_mask, answer = (t.to(device) for t in collate(batch, pad))
    lm_head = target.get_output_embeddings()
    rows = lm_head.weight[draft_ids.to(lm_head.weight.device)]  # [V', H]
    with verify.aux_hidden_states(target, layers) as aux, _final_states(target) as final:
        target(input_ids=input_ids, attention_mask=attention_mask, **verify._last_logits_only(target))
    logits = torch.nn.functional.linear(final[-1], rows)  # [B, T, V']
    if getattr(lm_head, "bias", None) is not None:
        logits = logits + lm_head.bias[draft_ids.to(lm_head.bias.device)]
    out = []
    for i, length in enumerate(attention_mask.sum(-1).tolist()):
        out.append(
            {
                "features": aux[-1][i, :length],
                "logits": logits[i, :length].float(),
                "tokens": input_ids[i, :length],
                "answer": answer[i, :length],
            }
        )
    return out


# ---------------------------------------------------------------- the training-time test


def unroll(
    head: EagleHead, embeds: torch.Tensor, features: torch.Tensor, steps: int, start: int = 0
) -> list[torch.Tensor]:
    """The head's outputs over one sequence, unrolled on its own outputs (EAGLE-3's training-time test).

    Args:
        head: the head.
        embeds: `[T, H]` the target's input embeddings of the sequence's tokens.
        features: `[T, k*H]` the target's features at those positions.
        steps: draft positions to unroll.
        start: the first position `j` whose outputs are wanted: step 0 still reads the whole context (every later
            step attends to it), the later steps run from `start` only (a long prompt before the answer costs one
            step, not `steps`).

    Returns:
        Per step `k`, `[T - 1 - k - start, H]`: at position `j = start + i`, the output after reading token `j+1+k`
        (it predicts token `j+2+k`), exactly what drafting computes for a chain node at depth `k` after the
        context `0..j+1`.
    """
    n = embeds.shape[0] - 1  # positions 0 .. T-2 read tokens 1 .. T-1
    start = min(start, max(n - 1, 0))
    cache, outputs, sizes = HeadCache(), [], []
    hidden = head(
        embeds[1:], head.project(features[:n]), torch.arange(n), cache, torch.ones(n, n, dtype=torch.bool).tril()
    )
    outputs.append(hidden[start:])
    sizes.append(n)
    for k in range(1, min(steps, n - start)):
        m = n - k - start
        blocks = [torch.ones(m, n, dtype=torch.bool).tril(diagonal=start)]  # step 0's entries: the context up to j
        blocks += [torch.eye(m, size, dtype=torch.bool) for size in sizes[1:]]  # its own steps 1 .. k-1 at j
        visible = torch.cat([*blocks, torch.eye(m, dtype=torch.bool)], dim=1)  # and itself
        hidden = head(embeds[start + 1 + k :], outputs[-1][:m], torch.arange(start + k, start + k + m), cache, visible)
        outputs.append(hidden)
        sizes.append(m)
    return outputs


def first_position(answer: torch.Tensor, steps: int) -> int:
    """The first position whose unrolled outputs any step's loss reads: step `k` at `j` is scored on token
    `j+2+k`, so nothing before `first answer position - steps` is (`answer` `[T]`: position `t` predicts an answer
    token)."""
    where = answer.nonzero()
    return max(int(where[0]) - steps, 0) if len(where) else 0


def unrolled_loss(
    head: EagleHead, embed, row: dict, in_vocab: torch.Tensor, steps: int, decay: float
) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """Soft cross-entropy of the unrolled head against the target over the draft vocabulary, on answer tokens,
    step `k` weighted `decay**k`; and per step (top-1 hits, answer tokens): a hit is the head's top-1 draft token
    being the target's own token (answer tokens outside the draft vocabulary count as misses).

    `row`: one of `target_side`'s; `in_vocab`: `[V]` bool, the target ids in the draft vocabulary (`head.t2d`)."""
    device = head.fc.weight.device
    tokens, answer = row["tokens"].to(device), row["answer"].to(device)
    start = first_position(answer, steps)
    outputs = unroll(head, embed(tokens), row["features"].to(device), steps, start)
    loss, stats = torch.zeros((), device=device), []
    for k, hidden in enumerate(outputs):
        nxt = tokens[start + 2 + k :]  # row j predicts token j+2+k; the last row would predict beyond the sequence
        m = len(nxt)
        target_p = torch.softmax(row["logits"][start + 1 + k : start + 1 + k + m].to(device), dim=-1)  # at j+1+k
        mask = answer[start + 1 + k : start + 1 + k + m]  # token j+2+k is an answer token
        log_q = torch.log_softmax(head.logits(hidden[:m]).float(), dim=-1)
        learn = mask & in_vocab[nxt]
        if learn.any():
            loss = loss + decay**k * -(target_p[learn] * log_q[learn]).sum(-1).mean()
        hits = (head.to_target(log_q.argmax(-1)) == nxt) & mask
        stats.append((int(hits.sum()), int(mask.sum())))
    return loss, stats


# ---------------------------------------------------------------- training and report


def train(cfg: DictConfig, head: EagleHead, target, embed, rows: list[dict], pad: int, ckpt_dir: Path) -> list[dict]:
    """The head on `rows`, the frozen target run on each batch; resumes from the newest checkpoint in `ckpt_dir`."""
    accelerator = Accelerator(
        mixed_precision=cfg.train.mixed_precision, gradient_accumulation_steps=cfg.train.grad_accum
    )
    batches = [b for e in range(cfg.train.epochs) for b in make_batches(rows, cfg.train.batch_size, cfg.seed + e)]
    optimizer, scheduler, steps = optimizer_and_schedule(cfg, head.parameters(), len(batches))
    head, optimizer, scheduler = accelerator.prepare(head, optimizer, scheduler)
    embed = embed.to(accelerator.device)
    model = accelerator.unwrap_model(head)
    in_vocab, draft_ids = model.t2d, model.draft_ids

    def step(index: int) -> tuple[torch.Tensor, list[float], int]:
        sides = target_side(target, batches[index], model.config.layers, draft_ids, pad)
        losses, hits = [], [[0, 0] for _ in range(cfg.train.steps)]
        for side in sides:
            loss, stats = unrolled_loss(model, embed, side, in_vocab, cfg.train.steps, cfg.train.step_decay)
            losses.append(loss)
            for k, (h, n) in enumerate(stats):
                hits[k][0] += h
                hits[k][1] += n
        tokens = sum(int(s["answer"].sum()) for s in sides)
        return torch.stack(losses).mean(), [h / max(n, 1) for h, n in hits], tokens

    return train_loop(cfg, accelerator, head, optimizer, scheduler, steps, step, ckpt_dir, "eagle-3")


@torch.no_grad()
def acceptance(head: EagleHead, target, embed, rows: list[dict], steps: int, pad: int, batch_size: int) -> dict:
    """Held-out top-1 acceptance per draft position, overall and per task type: `{"overall": [...], task: [...]}`."""
    head.eval()
    in_vocab = head.t2d
    counts: dict[str, list[list[int]]] = {}
    for start in tqdm(range(0, len(rows), batch_size), desc="held-out acceptance", unit="batch", leave=False):
        batch = rows[start : start + batch_size]
        for row, side in zip(batch, target_side(target, batch, head.config.layers, head.draft_ids, pad), strict=True):
            _, stats = unrolled_loss(head, embed, side, in_vocab, steps, 1.0)
            for key in ("overall", task_of(row)):
                entry = counts.setdefault(key, [[0, 0] for _ in range(steps)])
                for k, (h, n) in enumerate(stats):
                    entry[k][0] += h
                    entry[k][1] += n
    return {key: [round(h / n, 4) if n else None for h, n in entry] for key, entry in counts.items()}


@hydra.main(config_path="../conf", config_name="train_eagle", version_base="1.3")
def main(cfg: DictConfig) -> None:
    torch.manual_seed(cfg.seed)
    work = Path(cfg.work_dir)
    target, tokenizer = load_model(cfg.target, dtype=cfg.data.gen_dtype)
    target = target.to(resolve_device(cfg.device)).eval()
    rows = mix_rows(cfg, target, tokenizer, Path(cfg.data_cache))
    train_rows, heldout_rows = split_heldout(rows, cfg.data.heldout)
    print(f"{len(train_rows)} training conversations, {len(heldout_rows)} held out")
    pad = pad_id(tokenizer)
    layers = tuple(cfg.eagle.layers) if cfg.eagle.layers else None
    vocab = draft_vocab(train_rows, cfg.eagle.draft_vocab) if cfg.eagle.draft_vocab else None
    head = EagleHead.for_model(target, draft_vocab=vocab, layers=layers, name=cfg.target).float()
    embed = frozen_copy(target.get_input_embeddings())
    before = acceptance(head, target, embed, heldout_rows, cfg.train.steps, pad, cfg.train.batch_size)
    log = train(cfg, head, target, embed, train_rows, pad, work / "checkpoints")
    after = acceptance(head, target, embed, heldout_rows, cfg.train.steps, pad, cfg.train.batch_size)

    out = Path(cfg.output_dir)
    head.to(torch.bfloat16).save_pretrained(out)  # bf16 on disk (half the size); loads in the target's dtype
    if cfg.export_eagle3:
        export_eagle3(head, out / "eagle3")
    overrides = list(HydraConfig.get().overrides.task)
    command = reproduce_command("train_eagle", HydraConfig.get().job.config_name, overrides)
    metrics = {
        "target": cfg.target,
        "layers": list(head.config.layers),
        "draft_vocab": head.config.draft_vocab_size,
        "parameters": sum(p.numel() for p in head.parameters()),
        "heldout_answers": len(heldout_rows),
        "heldout_acceptance_per_position": after,
        "heldout_acceptance_per_position_untrained": before["overall"],
        "train_tokens_per_s": log[-1]["tokens_per_s"] if log else None,
        "final_loss": log[-1]["loss"] if log else None,
        "mix": mix_counts(train_rows),
        "command_overrides": overrides,
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    (work / "train_log.json").write_text(json.dumps(log, indent=1))
    (out / "README.md").write_text(
        f"# {out.name}\n\nAn EAGLE-3 head for `{cfg.target}` trained by `training/train_eagle.py`"
        + ("; `eagle3/` holds it in the layout vLLM and SGLang load" if cfg.export_eagle3 else "")
        + f".\n\nReproduce: `{command}`\n\n"
        f"Held-out top-1 acceptance per draft position ({len(heldout_rows)} answers; `metrics.json` has it per task "
        f"type): {after['overall']}.\n\n"
        f"Training conversations by task type (the mix, `conf/data/mix.yaml`):\n\n{mix_table(train_rows)}\n"
    )
    print(json.dumps({k: v for k, v in metrics.items() if k not in ("command_overrides", "mix")}, indent=2))
    print(f"head written to {out}")


if __name__ == "__main__":
    main()
