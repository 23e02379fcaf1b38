"""Acceptance without timing: replay a token-only draft source against the target's recorded greedy answers.

A source whose trees depend only on the tokens so far (the n-gram source, with or without its memory) can be
scored without running the target: given the target's greedy answer to a prompt (a harness run's
`answers/baseline.jsonl`, which keeps `token_ids` per turn), each step proposes a tree for a fixed plan (depth,
node budget, threshold), accepts the longest path that the answer follows, plus the bonus token, and moves on.
The mean accepted length per task is what the harness would measure with that plan on those questions, in
seconds rather than an hour, and the same on every run (no timing noise), so variants of a source can be
compared before a timed harness run. What it does not measure: the controller's choice of plan, and cost.

Run: .venv/bin/python -m eval.replay --answers outputs/eval/fp32-t0/answers/baseline.jsonl
         [--questions eval/data/dev_spec_bench_question.jsonl] [--plans 4x4,8x8,16x32] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import torch

from eval.report import read_answers
from eval.spec_bench import categories
from specdec.chat import answer_turns, load_questions
from specdec.drafters import DecodeState, Drafter, NGramDrafter, NGramMemory
from specdec.drafters.memory import BUILTIN_MEMORY
from specdec.models import BUILTIN_TARGET, load_model
from specdec.tree import TokenTree

QUESTIONS = Path(__file__).parent / "data" / "dev_spec_bench_question.jsonl"


def accepted_length(tree: TokenTree, answer: list[int]) -> int:
    """Draft tokens of `tree` that greedy verification accepts when the target's next tokens are `answer`: the
    longest root-to-node path that `answer` starts with."""
    tokens, parents = tree.tokens.tolist(), tree.parents.tolist()
    children: dict[int, dict[int, int]] = defaultdict(dict)  # node -> token -> child
    for node in range(1, len(tokens)):
        children[parents[node]].setdefault(tokens[node], node)
    node, length = 0, 0
    while length < len(answer) and answer[length] in children[node]:
        node = children[node][answer[length]]
        length += 1
    return length


def replay_turn(drafter: Drafter, prompt: list[int], answer: list[int], depth: int, budget: int) -> list[int]:
    """Tokens gained per step (accepted drafts + the bonus token) when `drafter` drafts for the target whose
    greedy answer to `prompt` is `answer`, each step planned at `depth` and `budget` (no threshold)."""
    tokens, gained = list(prompt), []
    while len(gained) == 0 or sum(gained) < len(answer):
        done = sum(gained)
        left = len(answer) - done
        state = DecodeState(torch.tensor([tokens]), max_depth=min(depth, left - 1), budget=budget)
        tree = drafter.propose(state)
        step = answer[done : done + accepted_length(tree, answer[done:]) + 1]
        tokens += step
        gained.append(len(step))
    return gained


def replay(
    make_drafter: Callable[[], Drafter], target, tokenizer, questions: list[dict], answers: dict, plan: tuple[int, int]
) -> dict[str, float]:
    """Mean accepted length (tokens per step) per task and overall, one drafter over every question in order (as
    one harness method: its memory and calibrations carry over from answer to answer)."""
    drafter = make_drafter()
    steps: dict[str, list[int]] = defaultdict(list)
    for question in questions:
        recorded = iter(answers[question["question_id"]]["choices"][0]["token_ids"])
        task = categories(question)[1]

        def respond(ids: torch.Tensor, task: str = task, recorded=recorded) -> torch.Tensor:
            answer = next(recorded)
            drafter.start(target)
            if answer:
                steps[task] += replay_turn(drafter, ids[0].tolist(), answer, *plan)
            drafter.finish(answer)
            return torch.tensor(answer, dtype=torch.long)

        answer_turns(tokenizer, question["turns"], respond)
    result = {task: sum(s) / len(s) for task, s in steps.items()}
    result["overall"] = statistics.mean(result.values())
    return result


def variants(memory: NGramMemory) -> dict[str, Callable[[], Drafter]]:
    """The n-gram source as the harness's `ngram` and `ngram_memory` build it (conf/eval.yaml's settings)."""
    settings = {"max_ngram": 4, "min_ngram": 1, "depth": 16, "branches": 8, "tree_budget": 32}
    return {
        "ngram": lambda: NGramDrafter(**settings),
        "ngram_memory": lambda: NGramDrafter(**settings, memory=memory.copy()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--answers", type=Path, required=True, help="a harness run's answers/baseline.jsonl")
    parser.add_argument("--questions", type=Path, default=QUESTIONS)
    parser.add_argument("--plans", default="4x4,8x8,16x32", help="DEPTHxBUDGET, comma-separated")
    parser.add_argument("--out", type=Path, default=Path("outputs/replay.json"))
    args = parser.parse_args()
    answers = read_answers(args.answers)
    questions = [q for q in load_questions(args.questions) if q["question_id"] in answers]
    target, tokenizer = load_model(BUILTIN_TARGET)  # binds the memory (fingerprint check); never run
    memory = NGramMemory.from_pretrained(BUILTIN_MEMORY)
    plans = [tuple(int(x) for x in p.split("x")) for p in args.plans.split(",")]
    results = []
    for name, make in variants(memory).items():
        for plan in plans:
            row = {"source": name, "depth": plan[0], "budget": plan[1]}
            row.update(replay(make, target, tokenizer, questions, answers, plan))
            results.append(row)
            print(json.dumps(row), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"answers": str(args.answers), "results": results}, indent=2) + "\n")
    print(f"written: {args.out}")


if __name__ == "__main__":
    main()
