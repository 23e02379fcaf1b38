"""Prompts in the Spec-Bench / MT-bench question format, formatted with the tokenizer's chat template.

A question is `{"question_id": int, "category": str, "turns": [str, ...]}`. Multi-turn questions are
answered turn by turn: each answer is appended to the conversation before the next turn is asked.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase


def load_questions(path: str | Path) -> list[dict]:
    """Read a question file (one JSON object a line).

    Raises:
        ValueError: a line without `turns` (a non-empty list of strings), with the line number.
    """
    questions = []
    for number, line in enumerate(Path(path).read_text().splitlines(), start=1):
        if not line.strip():
            continue
        question = json.loads(line)
        turns = question.get("turns")
        if not isinstance(turns, list) or not turns or not all(isinstance(t, str) for t in turns):
            raise ValueError(f"{path}:{number}: a question needs 'turns', a non-empty list of strings")
        question.setdefault("question_id", number - 1)
        question.setdefault("category", "")
        questions.append(question)
    return questions


def chat_input_ids(tokenizer: PreTrainedTokenizerBase, messages: list[dict]) -> torch.Tensor:
    """`[1, L]` token ids of `messages` with the generation prompt for the assistant's next turn."""
    if tokenizer.chat_template is None:
        text = "\n".join(m["content"] for m in messages) + "\n"
        return tokenizer(text, return_tensors="pt").input_ids
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    return ids["input_ids"]


def answer_turns(
    tokenizer: PreTrainedTokenizerBase,
    turns: list[str],
    answer: Callable[[torch.Tensor], torch.Tensor],
) -> list[torch.Tensor]:
    """Answer `turns` one after another in one conversation.

    Args:
        tokenizer: formats the conversation with its chat template.
        turns: the user's messages.
        answer: `[1, L]` prompt ids -> `[n]` new token ids (e.g. a wrapper around `generate`).

    Returns:
        The new token ids of each answer.
    """
    messages: list[dict] = []
    answers = []
    for turn in turns:
        messages.append({"role": "user", "content": turn})
        new_ids = answer(chat_input_ids(tokenizer, messages))
        answers.append(new_ids)
        messages.append({"role": "assistant", "content": tokenizer.decode(new_ids, skip_special_tokens=True)})
    return answers
