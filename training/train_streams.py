"""Train stream embeddings for the built-in target by self-distillation (config: conf/train_streams.yaml).

1. data: the target's greedy answers to the training mix (`training/mix.py`, shared with the other apps).
2. training: per conversation, one forward of the frozen target over its prompt and answer with `train.anchors`
   groups of `k` streams after sampled answer positions, each group masked as at inference (`heads/streams.py`):
   it sees the conversation up to its anchor `a` and its own earlier streams, stream `j` at position `a + j`.
   Stream `j` learns the target's prediction at position `a + j` (the token `a + 1 + j`: cross-entropy against
   its distribution, weight `train.soft`, and against its top-1, the rest; stream `j` weighted `step_decay**(j-1)`),
   the n-gram prediction objective of Speculative Streaming with the model frozen.
   The labels come from the same forward (the conversation's rows do not see the streams), and gradients reach
   only the `k x hidden` stream vectors (and the streams' residual blocks, `streams.head_layers`, between their
   final hidden states and the target's frozen LM head).
3. report: on held-out answers, each stream's rank accuracies, the chain's acceptance per depth (streams `1..j`
   all the target's top-1), the best static tree for `train.tree_budget` nodes (saved as the streams' `choices`);
   the streams (`save_pretrained`), `metrics.json` and a README to `output_dir`.

Run: .venv/bin/python -m training.train_streams
"""

from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path

import hydra
import torch
from accelerate import Accelerator
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig
from tqdm.auto import tqdm

from heads.streams import StreamEmbeddings
from specdec import verify
from specdec.models import load_model
from specdec.tree import best_choices
from training.common import frozen_copy, optimizer_and_schedule, train_loop
from training.data import reproduce_command, resolve_device, split_heldout
from training.mix import mix_counts, mix_rows, mix_table, task_of

# ---------------------------------------------------------------- the forward


def stream_mask(length: int, anchors: torch.Tensor, k: int, dtype: torch.dtype) -> torch.Tensor:
    """`[1, 1, T + P*k, T + P*k]` additive mask: the `T` tokens causal; stream `j` of anchor `a` sees tokens `0..a`
    and its group's streams `1..j`."""
    total = length + len(anchors) * k
    seen = torch.zeros(total, total, dtype=torch.bool)
    seen[:length, :length] = torch.ones(length, length, dtype=torch.bool).tril()
    streams = seen[length:].view(len(anchors), k, total)
    streams[:, :, :length] = (torch.arange(length)[None, :] <= anchors[:, None])[:, None, :]
    own = torch.ones(k, k, dtype=torch.bool).tril()
    for i in range(len(anchors)):
        streams[i, :, length + i * k : length + (i + 1) * k] = own
    mask = torch.zeros(total, total, dtype=dtype).masked_fill_(~seen, torch.finfo(dtype).min)
    return mask[None, None]


def stream_forward(model, input_ids: torch.Tensor, anchors: torch.Tensor, embeds: torch.Tensor):
    """In one forward, the target's logits over a conversation (`input_ids` `[T]`) and its final hidden states (the
    LM head's input) at `k` streams after each of `anchors` (`[P]`): `([T, V], [P, k, H])`. Position ids `a + j` for
    stream `j` of anchor `a`, as the verifier gives them; no cache."""
    device = verify.input_device(model)
    length, k = len(input_ids), embeds.shape[0]
    tokens = model.get_input_embeddings()(input_ids.to(device))  # [T, H]
    extra = embeds.to(device=tokens.device, dtype=tokens.dtype).repeat(len(anchors), 1)  # [P*k, H]
    positions = torch.cat([torch.arange(length), (anchors[:, None] + torch.arange(1, k + 1)).flatten()])
    mask = stream_mask(length, anchors, k, verify.compute_dtype(model))
    with verify.final_hidden_states(model) as hidden:
        logits = model(
            inputs_embeds=torch.cat([tokens, extra])[None],
            attention_mask=mask.to(device),
            position_ids=positions[None].to(device),
            use_cache=False,
        ).logits[0]
    return logits[:length], hidden[-1][0, length:].view(len(anchors), k, -1)


def answer_anchors(row: dict, count: int | None, seed: int) -> torch.Tensor:
    """Positions `a` whose logits predict an answer token and whose first stream does too (`a + 2 < T`), `count` of
    them at random (None: all), sorted."""
    start, length = len(row["prompt_ids"]) - 1, len(row["prompt_ids"]) + len(row["answer_ids"])
    positions = list(range(start, length - 2))
    if count is not None and len(positions) > count:
        positions = sorted(random.Random(seed).sample(positions, count))
    return torch.tensor(positions, dtype=torch.long)


def stream_loss(model, streams: StreamEmbeddings, lm_head, row: dict, anchors: torch.Tensor, decay: float, soft: float):
    """Each stream's cross-entropy against the target's distribution it stands for (weight `soft`) and against its
    top-1, the token greedy verification accepts (weight `1 - soft`), and per stream the top-1 hits `(hits, count)`;
    positions past the conversation's end are left out."""
    input_ids = torch.tensor(row["prompt_ids"] + row["answer_ids"])
    context, states = stream_forward(model, input_ids, anchors, streams.embeds)
    predicted = streams.logits(states, lm_head)  # [P, k, V]
    length = len(input_ids)
    loss, stats = torch.zeros((), device=predicted.device), []
    for j in range(1, streams.config.num_streams + 1):
        rows = anchors + j  # the target's row that stream j stands for: it predicts token a + 1 + j
        valid = rows <= length - 2
        if not valid.any():
            stats.append((0, 0))
            continue
        target_p = torch.softmax(context[rows[valid]].float().detach(), dim=-1)
        log_q = torch.log_softmax(predicted[valid, j - 1].float(), dim=-1)
        top = target_p.argmax(-1)
        hard = -log_q.gather(-1, top[:, None]).mean()
        loss = loss + decay ** (j - 1) * (soft * -(target_p * log_q).sum(-1).mean() + (1 - soft) * hard)
        hits = log_q.argmax(-1) == top
        stats.append((int(hits.sum()), int(valid.sum())))
    return loss, stats


def extra_rows(directories: list[str]) -> list[dict]:
    """The answer rows (with their `heldout` flags) in the shards under `directories`: other runs of the mix, e.g.
    one that made only its long-context tasks' answers."""
    return [
        json.loads(line) for d in directories for shard in sorted(Path(d).rglob("*.jsonl")) for line in shard.open()
    ]


# ---------------------------------------------------------------- training and report


def train(cfg: DictConfig, streams: StreamEmbeddings, target, lm_head, rows: list[dict], ckpt_dir: Path) -> list[dict]:
    """The streams on `rows` (one conversation per forward, `grad_accum` per update); resumes from `ckpt_dir`."""
    accelerator = Accelerator(gradient_accumulation_steps=cfg.train.grad_accum)
    order = [r for e in range(cfg.train.epochs) for r in random.Random(cfg.seed + e).sample(rows, len(rows))]
    groups = [{"params": [streams.embeds]}]  # the vectors at train.lr, the blocks (if any) at train.head_lr
    if streams.heads is not None:
        groups.append({"params": list(streams.heads.parameters()), "lr": cfg.train.head_lr})
    optimizer, scheduler, steps = optimizer_and_schedule(cfg, groups, len(order))
    streams, optimizer, scheduler = accelerator.prepare(streams, optimizer, scheduler)
    model = accelerator.unwrap_model(streams)

    def step(index: int) -> tuple[torch.Tensor, list[float], int]:
        anchors = answer_anchors(order[index], cfg.train.anchors, cfg.seed + index)
        loss, stats = stream_loss(target, model, lm_head, order[index], anchors, cfg.train.step_decay, cfg.train.soft)
        return loss, [h / max(n, 1) for h, n in stats], len(anchors)

    return train_loop(cfg, accelerator, streams, optimizer, scheduler, steps, step, ckpt_dir, "streams")


@torch.no_grad()
def heldout_accuracy(
    streams: StreamEmbeddings, target, lm_head, rows: list[dict], topk: int, anchors: int | None
) -> dict:
    """On held-out answers: `rank_accuracy` `[k, topk]` (stream `j`'s rank-`r` candidate is the target's top-1) and
    the chain's acceptance per depth, overall and per task type (`chain`: `{"overall": [...], task: [...]}`)."""
    k = streams.config.num_streams
    hits, count = torch.zeros(k, topk), torch.zeros(k, 1)
    chains: dict[str, list[list[int]]] = {}
    for i, row in enumerate(tqdm(rows, desc="held-out accuracy", unit="answer", leave=False)):
        points = answer_anchors(row, anchors, i)
        if not len(points):
            continue
        input_ids = torch.tensor(row["prompt_ids"] + row["answer_ids"])
        context, states = stream_forward(target, input_ids, points, streams.embeds)
        predicted = streams.logits(states, lm_head)  # [P, k, V]
        labels = context.argmax(-1).cpu()  # [T]: the target's next token at each row
        top = predicted.topk(topk, dim=-1).indices.cpu()  # [P, k, topk]
        chain = torch.ones(len(points), dtype=torch.bool)
        for j in range(1, k + 1):
            rows_j = points + j
            valid = rows_j <= len(input_ids) - 2
            right = top[:, j - 1] == labels[rows_j.clamp(max=len(input_ids) - 1)][:, None]  # [P, topk]
            hits[j - 1] += (right & valid[:, None]).sum(0).float()
            count[j - 1] += valid.sum()
            chain &= right[:, 0] | ~valid
            for key in ("overall", task_of(row)):
                entry = chains.setdefault(key, [[0, 0] for _ in range(k)])
                entry[j - 1][0] += int((chain & valid).sum())
                entry[j - 1][1] += int(valid.sum())
    chain = {key: [round(h / n, 4) if n else None for h, n in entry] for key, entry in chains.items()}
    return {"rank_accuracy": hits / count.clamp(min=1), "chain": chain}


@hydra.main(config_path="../conf", config_name="train_streams", version_base="1.3")
def main(cfg: DictConfig) -> None:
    torch.manual_seed(cfg.seed)
    work = Path(cfg.work_dir)
    target, tokenizer = load_model(cfg.target, dtype=cfg.data.gen_dtype)
    target = target.to(resolve_device(cfg.device)).eval()
    target.requires_grad_(False)
    rows = mix_rows(cfg, target, tokenizer, Path(cfg.data_cache)) + extra_rows(cfg.data.get("extra_answers") or [])
    train_rows, heldout_rows = split_heldout(rows, cfg.data.heldout)
    print(f"{len(train_rows)} training conversations, {len(heldout_rows)} held out")
    streams = StreamEmbeddings.for_model(target, cfg.streams.num_streams, cfg.streams.head_layers, cfg.target).float()
    lm_head = frozen_copy(target.get_output_embeddings()).to(verify.input_device(target))
    topk = cfg.train.topk
    before = heldout_accuracy(streams, target, lm_head, heldout_rows, topk, cfg.train.heldout_anchors)
    log = train(cfg, streams, target, lm_head, train_rows, work / "checkpoints")
    after = heldout_accuracy(streams, target, lm_head, heldout_rows, topk, cfg.train.heldout_anchors)
    choices = best_choices(after["rank_accuracy"], cfg.train.tree_budget)
    streams.config = dataclasses.replace(streams.config, choices=[list(c) for c in choices])

    out = Path(cfg.output_dir)
    streams.save_pretrained(out)
    overrides = list(HydraConfig.get().overrides.task)
    command = reproduce_command("train_streams", HydraConfig.get().job.config_name, overrides)
    metrics = {
        "target": cfg.target,
        "num_streams": streams.config.num_streams,
        "parameters": sum(p.numel() for p in streams.parameters()),
        "heldout_answers": len(heldout_rows),
        "heldout_chain_acceptance": after["chain"],
        "heldout_chain_acceptance_untrained": before["chain"]["overall"],
        "heldout_rank_accuracy": after["rank_accuracy"].round(decimals=4).tolist(),
        "choices": streams.config.choices,
        "train_anchors_per_s": log[-1]["tokens_per_s"] if log else None,
        "final_loss": log[-1]["loss"] if log else None,
        "mix": mix_counts(train_rows),
        "command_overrides": overrides,
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    (work / "train_log.json").write_text(json.dumps(log, indent=1))
    (out / "README.md").write_text(
        f"# {out.name}\n\n{streams.config.num_streams} stream embeddings"
        + (f" with {streams.config.head_layers} residual block(s) each" if streams.config.head_layers else "")
        + f" ({metrics['parameters']:,} parameters) for "
        f"`{cfg.target}`, trained by `training/train_streams.py` with the target frozen: speculative streaming "
        f"through `specdec.drafters.StreamDrafter`, lossless.\n\nReproduce: `{command}`\n\n"
        f"Held-out chain acceptance per depth ({len(heldout_rows)} answers; streams 1..j all the target's top-1; "
        f"`metrics.json` has it per task type): {after['chain']['overall']} (untrained: "
        f"{before['chain']['overall']}).\n\n"
        f"Training conversations by task type (the mix, `conf/data/mix.yaml`):\n\n{mix_table(train_rows)}\n"
    )
    print(json.dumps({k: v for k, v in metrics.items() if k not in ("command_overrides", "mix")}, indent=2))
    print(f"streams written to {out}")


if __name__ == "__main__":
    main()
