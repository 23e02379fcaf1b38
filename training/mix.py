"""The training mix every training app reads: the target's own answers to requests like the ones users send.

Its task types cover the six Spec-Bench categories the project is measured on (the dev split itself is never
used, nor anything equal to one of its turns):

- summarization: `t0/summarization`, CNN/DailyMail train articles under the P3 templates (summary, outline,
  tl;dr, ...);
- rag, qa: `t0/context_qa` (a question over a passage), `t0/open_qa`;
- mt_bench: multi-turn chat, the user turns of task dialogues (`dialogs`) answered by the target turn by turn
  with its own earlier answers in the conversation; requests the target writes itself (`self_prompts`);
  instructions and roleplay;
- translation: round trips, the target translates English sentences into German, then its own German back into
  English, asked in Spec-Bench's words (`Translate German to English: ...`);
- math_reasoning: GSM8K train questions; and code and tool use (GPTeacher).

`mix_rows(cfg, target, tokenizer, shard_dir)` makes (or reads back) every answer in resumable shards under
`shard_dir` (one folder per round: a conversation's turn k needs the target's answer to turn k-1), and
`mix_table(rows)` reports prompts and answer tokens per task type.

Run `.venv/bin/python -m training.mix [overrides]` (config: conf/mix.yaml) to make the answers alone, e.g. in the
background of other work or on a GPU machine, before a training app reads them; `data=long_context` makes only
the long-context tasks' (summarization and question answering over passages, which the shortest-first cap
`data.max_generated_batches` leaves out).
"""

from __future__ import annotations

import functools
import gzip
import json
import math
import random
from pathlib import Path

import hydra
from omegaconf import DictConfig

from specdec.models import load_model
from training.data import collect_prompts, evaluation_prompts, generate_answers, resolve_device

DIALOGS = "dialog_sgd_taskmaster4.jsonl.gz"
TO_GERMAN = "Translate English to German: "
TO_ENGLISH = "Translate German to English: "  # Spec-Bench's translation prompt


def mix_rows(cfg: DictConfig, target, tokenizer, shard_dir: Path) -> list[dict]:
    """Every training row of the mix: single requests, multi-turn dialogues, round-trip translations.

    `data.heldout` conversations are held out in all, spread over the three kinds by their sizes (a held-out
    dialogue is held out in every turn).
    """
    prompts = collect_prompts(cfg, target, tokenizer)
    dialogs = dialog_turns(cfg)
    sentences = english_sentences(cfg, dialogs)
    total = max(len(prompts) + len(dialogs) + len(sentences), 1)
    held_dialogs = math.ceil(cfg.data.heldout * len(dialogs) / total)
    held_sentences = math.ceil(cfg.data.heldout * len(sentences) / total)
    for i, p in enumerate(prompts):
        p["heldout"] = i < cfg.data.heldout - held_dialogs - held_sentences
    rows = generate_answers(cfg, target, tokenizer, prompts, shard_dir / "answers")
    rows += conversations(cfg, target, tokenizer, dialogs, held_dialogs, shard_dir)
    rows += translations(cfg, target, tokenizer, sentences, held_sentences, shard_dir)
    return rows


def dialog_turns(cfg: DictConfig) -> list[list[str]]:
    """`data.dialogs` dialogues' first `data.dialog_turns` user turns (seeded; dialogues with 2 turns or more)."""
    count = cfg.data.get("dialogs") or 0
    if not count:
        return []
    dialogs = _dialogs(cfg)
    random.Random(cfg.seed).shuffle(dialogs)
    evaluation = evaluation_prompts(cfg)
    picked = []
    for d in dialogs:
        turns = [t["text"].strip() for t in d["turns"] if t["speaker"] == "user" and t["text"].strip()]
        turns = turns[: cfg.data.dialog_turns]
        if len(turns) >= 2 and not evaluation.intersection(turns):
            picked.append(turns)
        if len(picked) == count:
            break
    return picked


def english_sentences(cfg: DictConfig, dialogs: list[list[str]]) -> list[str]:
    """`data.translation` English sentences to translate: assistant turns (6 to 40 words) that are none of
    `dialogs`' user turns (`dialog_turns(cfg)`), seeded."""
    count = cfg.data.get("translation") or 0
    if not count:
        return []
    dialogs = _dialogs(cfg)
    random.Random(cfg.seed + 1).shuffle(dialogs)
    used = {turn for turns in dialogs for turn in turns}
    seen, sentences = set(), []
    for d in dialogs:
        for t in d["turns"]:
            text = " ".join(t["text"].replace("\\r", " ").split())
            if t["speaker"] != "user" and 6 <= len(text.split()) <= 40 and text not in used | seen:
                seen.add(text)
                sentences.append(text)
                break
        if len(sentences) == count:
            break
    return sentences


def conversations(cfg: DictConfig, target, tokenizer, dialogs: list[list[str]], heldout: int, shard_dir: Path):
    """The target's answers to each dialogue's user turns, turn by turn, its own answers in the history."""
    histories = {i: [] for i in range(len(dialogs))}  # dialogue -> messages so far
    rows = []
    for turn in range(max(map(len, dialogs), default=0)):
        prompts = [
            {
                "source": "dialogs",
                "task": "multi-turn chat",
                "conversation": i,
                "heldout": i < heldout,
                "messages": [*histories[i], {"role": "user", "content": turns[turn]}],
            }
            for i, turns in enumerate(dialogs)
            if turn < len(turns) and i in histories
        ]
        made = generate_answers(cfg, target, tokenizer, prompts, shard_dir / f"dialogs_turn{turn + 1}")
        answered = {r["conversation"]: r for r in made}
        for p in prompts:  # a dialogue whose prompt grew too long ends here
            i = p["conversation"]
            if i in answered:
                histories[i] = [*p["messages"], _assistant(tokenizer, answered[i]["answer_ids"])]
            else:
                del histories[i]
        rows += made
    return rows


def translations(cfg: DictConfig, target, tokenizer, sentences: list[str], heldout: int, shard_dir: Path):
    """Round trips: English -> the target's German, then that German -> the target's English (both kept)."""
    to_german = [
        {
            "source": "translation",
            "task": "translation",
            "conversation": i,
            "heldout": i < heldout,
            "text": TO_GERMAN + s,
        }
        for i, s in enumerate(sentences)
    ]
    rows = generate_answers(cfg, target, tokenizer, to_german, shard_dir / "translation_to_german")
    evaluation = evaluation_prompts(cfg)
    back = []
    for r in sorted(rows, key=lambda r: r["conversation"]):
        german = tokenizer.decode(r["answer_ids"], skip_special_tokens=True).strip().split("\n")[0].strip()
        text = TO_ENGLISH + german
        if 3 <= len(german.split()) <= 60 and text not in evaluation:
            back.append({**{k: r[k] for k in ("source", "task", "conversation", "heldout")}, "text": text})
    return rows + generate_answers(cfg, target, tokenizer, back, shard_dir / "translation_to_english")


def task_of(row: dict) -> str:
    """The task type a row is reported under: its `task`, else its source (rows made before the mix)."""
    return row.get("task") or row["source"]


def mix_counts(rows: list[dict]) -> dict[str, dict[str, int]]:
    """Per task type (largest first): answers, answer tokens and held-out answers of `rows`."""
    tasks: dict[str, dict[str, int]] = {}
    for r in rows:
        entry = tasks.setdefault(task_of(r), {"answers": 0, "answer_tokens": 0, "heldout": 0})
        entry["answers"] += 1
        entry["answer_tokens"] += len(r["answer_ids"])
        entry["heldout"] += bool(r["heldout"])
    return dict(sorted(tasks.items(), key=lambda kv: -kv[1]["answer_tokens"]))


def mix_table(rows: list[dict]) -> str:
    """`mix_counts` as a Markdown table, with a total."""
    lines = ["| task type | answers | answer tokens | held out |", "|---|---|---|---|"]
    counts = mix_counts(rows)
    for task, c in [
        *counts.items(),
        ("all", {k: sum(c[k] for c in counts.values()) for k in ("answers", "answer_tokens", "heldout")}),
    ]:
        lines.append(f"| {task} | {c['answers']:,} | {c['answer_tokens']:,} | {c['heldout']} |")
    return "\n".join(lines)


def _dialogs(cfg: DictConfig) -> list[dict]:
    return list(_read_dialogs(str(Path(cfg.data_dir) / DIALOGS)))


@functools.cache
def _read_dialogs(path: str) -> tuple[dict, ...]:
    with gzip.open(path, "rt") as f:
        return tuple(json.loads(line) for line in f)


def _assistant(tokenizer, answer_ids: list[int]) -> dict:
    return {"role": "assistant", "content": tokenizer.decode(answer_ids, skip_special_tokens=True).strip()}


@hydra.main(config_path="../conf", config_name="mix", version_base="1.3")
def main(cfg: DictConfig) -> None:
    target, tokenizer = load_model(cfg.target, dtype=cfg.data.gen_dtype)
    target = target.to(resolve_device(cfg.device)).eval()
    rows = mix_rows(cfg, target, tokenizer, Path(cfg.data_cache))
    table = mix_table(rows)
    (Path(cfg.data_cache) / "mix.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
