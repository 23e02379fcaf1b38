"""Build the target's cross-request n-gram memory from its own answers (config: conf/build_ngram_memory.yaml).

1. data: the target's greedy answers to training prompts from ../shared/data (chat template; never the
   dev or evaluation prompts), generated in resumable shards shared with distill_draft / train_medusa.
2. memory: every answer but the held-out ones goes into an `NGramMemory` bound to the target.
3. report: the held-out answers are replayed through `NGramDrafter` (greedy decoding accepts the longest
   tree path equal to the target's own answer, so no target forward is needed): mean tokens gained per
   step with the context alone and with the memory. Memory, `metrics.json` and a README go to `output_dir`.

No training: the memory is the target's own text, and like every draft source it only proposes.

Run: .venv/bin/python -m training.build_ngram_memory
"""

from __future__ import annotations

import json
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig
from tqdm.auto import tqdm

from specdec.drafters import DecodeState, NGramDrafter, NGramMemory
from specdec.drafters.composite import follow
from specdec.models import load_model
from training.data import reproduce_command, resolve_device
from training.mix import mix_counts, mix_rows, mix_table, task_of


def replay(drafter: NGramDrafter, target, rows: list[dict], depth: int) -> float:
    """Mean tokens per step greedy decoding would gain with `drafter` on these (prompt, answer) rows.

    Each step drafts from the tokens so far and accepts the longest tree path that equals the answer's
    next tokens, plus the target's own next token, as `generate` would with the target that wrote them.
    """
    tokens_gained = steps = 0
    for row in tqdm(rows, desc="replay", unit="answer", leave=False):
        drafter.start(target)
        context, answer, t = list(row["prompt_ids"]), row["answer_ids"], 0
        while t < len(answer):
            tree = drafter.propose(DecodeState(tokens=torch.tensor([context]), max_depth=depth))
            step = min(len(follow(tree, answer[t : t + depth])), len(answer) - t)  # accepted + bonus
            context += answer[t : t + step]
            t, tokens_gained, steps = t + step, tokens_gained + step, steps + 1
    return tokens_gained / max(steps, 1)


@hydra.main(config_path="../conf", config_name="build_ngram_memory", version_base="1.3")
def main(cfg: DictConfig) -> None:
    torch.manual_seed(cfg.seed)
    target, tokenizer = load_model(cfg.target, dtype=cfg.data.gen_dtype)
    target = target.to(resolve_device(cfg.device))
    rows = mix_rows(cfg, target, tokenizer, Path(cfg.data_cache))
    kept, heldout = [r for r in rows if not r["heldout"]], [r for r in rows if r["heldout"]]

    if cfg.get("init_from"):  # a memory built before (e.g. the shipped one) that these answers extend
        memory = NGramMemory.from_pretrained(cfg.init_from)
        initial = len(memory)
    else:
        memory = NGramMemory(**cfg.memory)
        initial = 0
    memory.check(target)
    memory.base["model"] = cfg.target
    memory.extend(row["answer_ids"] for row in kept)
    print(f"{len(memory)} tokens from {len(kept)} answers in the memory; replaying {len(heldout)} held-out answers")

    settings = dict(cfg.replay)

    def tokens_per_step(rows: list[dict]) -> tuple[float, float]:
        """Replayed tokens per step with the context alone, and with the memory."""
        with_memory = NGramDrafter(**settings, memory=memory, remember=False)
        return tuple(replay(d, target, rows, settings["depth"]) for d in (NGramDrafter(**settings), with_memory))

    context_only, with_memory = tokens_per_step(heldout)
    by_task = {}
    for task in mix_counts(heldout):
        pair = tokens_per_step([r for r in heldout if task_of(r) == task])
        by_task[task] = dict(zip(("context_only", "with_memory"), (round(x, 3) for x in pair), strict=True))

    out = Path(cfg.output_dir)
    memory.save_pretrained(out)
    overrides = list(HydraConfig.get().overrides.task)
    metrics = {
        "target": cfg.target,
        "init_from": cfg.get("init_from"),
        "tokens_from_init": initial,
        "answers": len(kept),
        "tokens": len(memory),
        "heldout_answers": len(heldout),
        "heldout_tokens": sum(len(r["answer_ids"]) for r in heldout),
        "replay_settings": settings,
        "replay_tokens_per_step_context_only": round(context_only, 3),
        "replay_tokens_per_step_with_memory": round(with_memory, 3),
        "replay_by_task": by_task,
        "mix": mix_counts(kept),
        "command_overrides": overrides,
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    (out / "README.md").write_text(
        f"# {out.name}\n\nCross-request n-gram memory for `{cfg.target}`: its own greedy answers to "
        f"{len(kept)} training prompts ({len(memory)} tokens), built by `training/build_ngram_memory.py`.\n\n"
        f"Reproduce: `{reproduce_command('build_ngram_memory', HydraConfig.get().job.config_name, overrides)}`\n\n"
        f'Use: `NGramDrafter(memory="{out.name}")`. Measured at build time (`metrics.json`): replaying '
        f"{len(heldout)} held-out answers, greedy decoding gains {context_only:.2f} tokens per step from "
        f"the context alone and {with_memory:.2f} with this memory.\n\n"
        f"The answers added by this build, by task type (the mix, `conf/data/mix.yaml`; held-out ones not "
        f"included):\n\n{mix_table(kept)}\n"
    )
    print(json.dumps(metrics, indent=2))
    print(f"memory written to {out}")


if __name__ == "__main__":
    main()
