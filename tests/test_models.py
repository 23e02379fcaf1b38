"""Loading: dtype parsing, clear errors, question files and chat formatting (no real model needed)."""

import json

import pytest
import torch

from specdec.chat import load_questions
from specdec.models import load_model, parse_dtype


def test_parse_dtype():
    assert parse_dtype("bf16") is torch.bfloat16 and parse_dtype("fp32") is torch.float32
    assert parse_dtype(torch.float16) is torch.float16
    with pytest.raises(ValueError, match="unknown dtype"):
        parse_dtype("int3")


def test_missing_local_model_is_an_error(tmp_path):
    with pytest.raises(OSError):
        load_model(tmp_path / "nothing-here")


def test_question_files_are_validated(tmp_path):
    good = tmp_path / "q.jsonl"
    good.write_text(json.dumps({"question_id": 7, "category": "math", "turns": ["a", "b"]}) + "\n\n")
    assert load_questions(good) == [{"question_id": 7, "category": "math", "turns": ["a", "b"]}]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question_id": 1, "turns": []}) + "\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl:1"):
        load_questions(bad)


def test_multi_turn_answers_are_appended_to_the_conversation():
    from transformers import AutoTokenizer

    from specdec.chat import answer_turns, chat_input_ids
    from specdec.models import ASSETS, BUILTIN_DRAFT

    tokenizer = AutoTokenizer.from_pretrained(ASSETS / BUILTIN_DRAFT)  # the shipped copy of the target's tokenizer
    seen = []

    def answer(ids):
        seen.append(ids)
        return tokenizer(f" answer {len(seen)}", add_special_tokens=False, return_tensors="pt").input_ids[0]

    answers = answer_turns(tokenizer, ["first question", "second question"], answer)
    assert [tokenizer.decode(a).strip() for a in answers] == ["answer 1", "answer 2"]
    second_prompt = tokenizer.decode(seen[1][0])
    assert "first question" in second_prompt and "answer 1" in second_prompt and "second question" in second_prompt
    assert torch.equal(seen[0], chat_input_ids(tokenizer, [{"role": "user", "content": "first question"}]))
