"""The speedup harness: plain decoding and every configured method on the same questions (conf/eval.yaml).

Methods run interleaved per question, so machine noise hits them alike, after a warm-up. Multi-turn
questions are answered turn by turn with the chat template, each method continuing its own conversation.
Per method it writes `answers/<method>.jsonl` in Spec-Bench's answer layout (which Spec-Bench's own
`evaluation/speed.py` reads; plus `task`, and `token_ids` per turn), then `summary.json` (recomputed from
the answer files), `summary.md`, and PNG plots. Re-running the same command resumes: questions already
answered by a method are skipped.

Run: .venv/bin/python -m eval.run [questions=PATH] [per_category=N] [max_new_tokens=N] [dtype=fp32|bf16]
                                 [temperature=T] [seed=N]
                                 [methods=[baseline,draft,...]] [out_dir=PATH]
                                 [controller=true|false] [control.max_budget=N ...]
"""

from __future__ import annotations

import itertools
import json
import time
import uuid
from collections import defaultdict
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from eval.methods import Method, build_methods
from eval.report import environment, load_tokenizer, markdown, plot, read_answers, summarize
from eval.spec_bench import categories
from specdec.chat import answer_turns, chat_input_ids, load_questions
from specdec.cpu import tune_cpu_blas
from specdec.models import load_model


def select_questions(path: str, per_category: int | None) -> list[dict]:
    """The first `per_category` questions of each task (`eval.spec_bench.categories`), in file order; within a
    task of several categories (mt_bench: writing, roleplay, ...) the categories take turns, so that a few
    questions cover several of them rather than the first one only."""
    questions = load_questions(path)
    by_task: dict[str, dict[str, list[int]]] = defaultdict(lambda: defaultdict(list))
    for i, q in enumerate(questions):
        category, task = categories(q)
        by_task[task][category].append(i)
    chosen = []
    for groups in by_task.values():
        in_turn = [i for row in itertools.zip_longest(*groups.values()) for i in row if i is not None]
        chosen += in_turn[:per_category] if per_category is not None else in_turn
    return [questions[i] for i in sorted(chosen)]


def in_turns(questions: list[dict]) -> list[dict]:
    """The questions with the tasks taking turns (first of each task, then second of each...), so that an
    interrupted run has answered every task about equally."""
    rank: dict[str, int] = defaultdict(int)
    keyed = []
    for i, q in enumerate(questions):
        task = categories(q)[1]
        keyed.append((rank[task], i, q))
        rank[task] += 1
    return [q for _, _, q in sorted(keyed, key=lambda k: k[:2])]


def answer(method: Method, tokenizer, question: dict, model_id: str) -> dict:
    """One answer record in Spec-Bench's layout (`evaluation/eval.py`): every turn answered by `method`,
    timed; `accept_lengths` one list over all turns (`decoding_steps` says how many belong to each turn),
    `category` as Spec-Bench names it. The harness's own fields: `task`, `token_ids` per turn, and for specdec's
    methods `profile` per turn (`eval.methods.profile`: where the time went)."""
    turns, new_tokens, wall_time, accept_lengths, steps, token_ids, profiles = [], [], [], [], [], [], []

    def respond(ids: torch.Tensor) -> torch.Tensor:
        result = method(ids)
        turns.append(tokenizer.decode(result.new_ids, skip_special_tokens=True))
        new_tokens.append(len(result.new_ids))
        wall_time.append(result.wall_time)
        accept_lengths.extend(result.accept_lengths)
        steps.append(len(result.accept_lengths))
        token_ids.append(result.new_ids)
        profiles.append(result.profile)
        return torch.tensor(result.new_ids)

    answer_turns(tokenizer, question["turns"], respond)
    category, task = categories(question)
    choice = {
        "index": 0,
        "turns": turns,
        "decoding_steps": steps,
        "new_tokens": new_tokens,
        "wall_time": wall_time,
        "accept_lengths": accept_lengths,
        "token_ids": token_ids,
    }
    if any(p is not None for p in profiles):  # specdec's methods: where the time went, per turn
        choice["profile"] = profiles
    return {
        "question_id": question["question_id"],
        "category": category,
        "answer_id": uuid.uuid4().hex,
        "model_id": model_id,
        "choices": [choice],
        "tstamp": time.time(),
        "task": task,
    }


def warm_up(methods: dict[str, Method], tokenizer, count: int) -> None:
    ids = chat_input_ids(tokenizer, [{"role": "user", "content": "Say hello in five words."}])
    for _ in range(count):
        for method in methods.values():
            method(ids)


def run(cfg: DictConfig) -> dict:
    """Answer, summarize, tabulate and plot; returns the summary (also written to `out_dir`)."""
    out_dir = Path(cfg.out_dir)
    (out_dir / "answers").mkdir(parents=True, exist_ok=True)
    if "baseline" not in cfg.methods:
        raise ValueError("methods must include 'baseline': speedup and identity are measured against it")
    questions = select_questions(cfg.questions, cfg.per_category)
    paths = {m: out_dir / "answers" / f"{m}.jsonl" for m in cfg.methods}
    done = {m: set(read_answers(p)) for m, p in paths.items()}
    todo = in_turns([q for q in questions if any(q["question_id"] not in done[m] for m in cfg.methods)])
    print(f"{len(questions)} questions, {len(questions) - len(todo)} already answered by every method")

    tokenizer = None
    if todo:
        torch.manual_seed(cfg.seed)
        placement = {"attn_implementation": cfg.attn_implementation, "device_map": cfg.get("device_map")}
        offload = {}
        if cfg.get("offload_folder"):  # the target's weights on disk, read at every forward; the draft stays
            if placement["device_map"] is not None:
                raise ValueError("offload_folder puts the whole target on disk: leave device_map null with it")
            offload = {"device_map": {"": "disk"}, "offload_folder": cfg.offload_folder}
        target, tokenizer = load_model(cfg.target, dtype=cfg.dtype, **{**placement, **offload})
        draft, _ = load_model(cfg.draft, dtype=cfg.dtype, **placement)
        methods = build_methods(cfg, target, draft)
        warm_up(methods, tokenizer, cfg.warmup)
        for question in tqdm(todo, desc="questions", unit="q"):
            for name, method in methods.items():  # interleaved: every method on this question, then the next
                if question["question_id"] not in done[name]:
                    record = answer(method, tokenizer, question, name)
                    with paths[name].open("a") as f:
                        f.write(json.dumps(record) + "\n")

    qids = {q["question_id"] for q in questions}
    answers = {m: {q: r for q, r in read_answers(p).items() if q in qids} for m, p in paths.items()}
    summary = {
        "config": OmegaConf.to_container(cfg, resolve=True),
        "environment": environment(),
        "methods": summarize(answers, tokenizer or load_tokenizer(cfg.target), sampled=cfg.temperature > 0),
    }
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    text = markdown(summary["methods"])
    (out_dir / "summary.md").write_text(text + "\n")
    plots = plot(summary["methods"], out_dir)
    print(text)
    print(f"written: {out_dir / 'summary.json'}, {out_dir / 'summary.md'}, {', '.join(map(str, plots))}")
    return summary


main = hydra.main(config_path="../conf", config_name="eval", version_base="1.3")(run)

if __name__ == "__main__":
    tune_cpu_blas()  # before anything multiplies; in the command only, not in `run`, which tests call
    main()
