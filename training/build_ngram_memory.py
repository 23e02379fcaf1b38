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
from training.data import collect_prompts, generate_answers, reproduce_command, resolve_device


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
    prompts = collect_prompts(cfg, target, tokenizer)
    rows = generate_answers(cfg, target, tokenizer, prompts, Path(cfg.data_cache) / "answers")
    kept, heldout = [r for r in rows if not r["heldout"]], [r for r in rows if r["heldout"]]

    memory = NGramMemory(**cfg.memory)
    memory.check(target)
    memory.base["model"] = cfg.target
    memory.extend(row["answer_ids"] for row in kept)
    print(f"{len(memory)} tokens from {len(kept)} answers in the memory; replaying {len(heldout)} held-out answers")

    settings = dict(cfg.replay)
    context_only = replay(NGramDrafter(**settings), target, heldout, settings["depth"])
    with_memory = replay(NGramDrafter(**settings, memory=memory, remember=False), target, heldout, settings["depth"])

    out = Path(cfg.output_dir)
    memory.save_pretrained(out)
    overrides = list(HydraConfig.get().overrides.task)
    metrics = {
        "target": cfg.target,
        "answers": len(kept),
        "tokens": len(memory),
        "heldout_answers": len(heldout),
        "heldout_tokens": sum(len(r["answer_ids"]) for r in heldout),
        "replay_settings": settings,
        "replay_tokens_per_step_context_only": round(context_only, 3),
        "replay_tokens_per_step_with_memory": round(with_memory, 3),
        "command_overrides": overrides,
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    (out / "README.md").write_text(
        f"# {out.name}\n\nCross-request n-gram memory for `{cfg.target}`: its own greedy answers to "
        f"{len(kept)} training prompts ({len(memory)} tokens), built by `training/build_ngram_memory.py`.\n\n"
        f"Reproduce: `{reproduce_command('build_ngram_memory', HydraConfig.get().job.config_name, overrides)}`\n\n"
        f'Use: `NGramDrafter(memory="{out.name}")`. Measured at build time (`metrics.json`): replaying '
        f"{len(heldout)} held-out answers, greedy decoding gains {context_only:.2f} tokens per step from "
        f"the context alone and {with_memory:.2f} with this memory.\n"
    )
    print(json.dumps(metrics, indent=2))
    print(f"memory written to {out}")


if __name__ == "__main__":
    main()
