"""Shared training data: resumable shards that refuse to be mixed with another config's."""

from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf
from tiny import VOCAB, tiny_model
from transformers import AutoTokenizer

from specdec.models import ASSETS, BUILTIN_DRAFT
from training import data
from training.data import collate, run_sharded


def test_run_sharded_resumes_and_returns_only_its_batches(tmp_path):
    calls = []

    def make(batch):
        calls.append(len(batch))
        return [{"answer_ids": [sum(r["prompt_ids"])]} for r in batch]

    batches = [[{"prompt_ids": [1, 2]}, {"prompt_ids": [3]}], [{"prompt_ids": [4]}]]
    rows = run_sharded(batches, tmp_path, "test", make)
    assert [r["answer_ids"] for r in rows] == [[3], [3], [4]] and calls == [2, 1]
    assert run_sharded(batches, tmp_path, "test", make) == rows and calls == [2, 1]  # nothing redone
    assert run_sharded(batches[:1], tmp_path, "test", make) == rows[:2]  # not the other batch's shard


def test_run_sharded_refuses_shards_made_from_other_prompts(tmp_path):
    run_sharded([[{"prompt_ids": [1]}]], tmp_path, "test", lambda b: [{"answer_ids": [0]}])
    with pytest.raises(ValueError, match="other prompts"):
        run_sharded([[{"prompt_ids": [2]}]], tmp_path, "test", lambda b: [{"answer_ids": [0]}])


def test_collate_masks_the_positions_that_predict_answer_tokens():
    input_ids, attention_mask, loss_mask = collate(
        [{"prompt_ids": [5, 6], "answer_ids": [7, 8]}, {"prompt_ids": [5], "answer_ids": [9]}], pad=0
    )
    assert input_ids.tolist() == [[5, 6, 7, 8], [5, 9, 0, 0]]
    assert attention_mask.tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert loss_mask.tolist() == [[False, True, True, False], [True, False, False, False]]


def test_generate_answers_reuses_answers_made_for_the_same_prompts(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "chat_input_ids", lambda tokenizer, chat: torch.tensor([[ord(chat[0]["content"])]]))
    monkeypatch.setattr(data, "pad_id", lambda tokenizer: 0)
    generated = []

    def fake_generate(target, prompts, pad, eos, cfg):
        generated.extend(prompts)
        return [{"answer_ids": [p[0] + 1000], "topk_ids": [], "topk_logprobs": []} for p in prompts]

    monkeypatch.setattr(data, "_generate_batch", fake_generate)
    settings = {"max_prompt_tokens": 8, "gen_batch_size": 2, "max_generated_batches": 10, "heldout": 0}
    tokenizer = SimpleNamespace(eos_token_id=0)
    prompts = [{"source": "s", "text": t} for t in "ab"]
    first = OmegaConf.create({"data": settings})
    data.generate_answers(first, None, tokenizer, prompts, tmp_path / "first")
    assert generated == [[97], [98]]

    generated.clear()
    second = OmegaConf.create({"data": {**settings, "reuse_answers": [str(tmp_path / "first")]}})
    rows = data.generate_answers(second, None, tokenizer, [*prompts, {"source": "s", "text": "c"}], tmp_path / "2")
    assert generated == [[99]]  # only the new prompt
    assert [r["answer_ids"] for r in rows] == [[1097], [1098], [1099]]


def test_generated_answers_are_greedy_with_their_top_k():
    target = tiny_model("llama")
    prompts = [[5, 6, 7, 8, 9], [11, 12]]  # different lengths: the shorter one is left-padded
    cfg = OmegaConf.create({"data": {"max_new_tokens": 6, "topk": 3}})
    rows = data._generate_batch(target, prompts, pad=0, eos=VOCAB + 1, cfg=cfg)  # an EOS that never comes
    for prompt, row in zip(prompts, rows, strict=True):
        expected = target.generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False, min_new_tokens=6)
        assert row["answer_ids"] == expected[0, len(prompt) :].tolist()
        assert [ids[0] for ids in row["topk_ids"]] == row["answer_ids"]  # the greedy token ranks first
        assert all(len(lp) == 3 and lp == sorted(lp, reverse=True) for lp in row["topk_logprobs"])


def test_resolve_device():
    assert data.resolve_device("cpu") == torch.device("cpu")
    assert data.resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")


def test_exported_outputs_name_the_config_that_reproduces_them():
    assert data.reproduce_command("train_medusa", "train_medusa", []) == ".venv/bin/python -m training.train_medusa"
    assert data.reproduce_command("train_medusa", "finetune_medusa", ["train.lr=1e-4"]) == (
        ".venv/bin/python -m training.train_medusa --config-name finetune_medusa train.lr=1e-4"
    )
    assert data.reproduce_command("distill_draft", "distill_draft", ["seed=1"]) == (
        ".venv/bin/python -m training.distill_draft seed=1"
    )


def test_training_refuses_a_data_set_that_is_all_held_out():
    rows = [{"prompt_ids": [i], "heldout": i < 2} for i in range(3)]
    train, heldout = data.split_heldout(rows, 2)
    assert [r["prompt_ids"] for r in train] == [[2]] and [r["prompt_ids"] for r in heldout] == [[0], [1]]
    with pytest.raises(ValueError, match=r"data\.heldout=96"):
        data.split_heldout([{"prompt_ids": [1], "heldout": True}], 96)


def test_self_prompts_are_the_targets_finished_user_turns_once_each(tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(ASSETS / BUILTIN_DRAFT)  # the target's tokenizer and chat template
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    texts = [
        "Write a short poem about the sea.",  # kept
        "Write a short poem about the sea.",  # the same text again: dropped
        "Hi there",  # under 3 words: dropped
        "Explain how a bicycle stays upright when it rolls fast",  # no end of turn before the limit: dropped
    ]
    calls = []

    def generate(input_ids, attention_mask, **settings):
        calls.append((input_ids, settings))
        rows = [[*tokenizer(t, add_special_tokens=False).input_ids, end] for t in texts]
        rows[3] = rows[3][:-1]  # cut at the token limit: the longest row, the others end and are padded
        width = len(rows[3])
        new = torch.tensor([r + [end] * (width - len(r)) for r in rows])
        return torch.cat([input_ids, new[: len(input_ids)]], dim=1)

    target = SimpleNamespace(device=torch.device("cpu"), generate=generate)
    cfg = OmegaConf.create({"seed": 0, "data": {"gen_batch_size": 4, "self_prompt_tokens": 16}})
    kept = data.self_prompts(cfg, target, tokenizer, 4, tmp_path)
    assert kept == ["Write a short poem about the sea."]
    input_ids, settings = calls[0]
    assert tokenizer.decode(input_ids[0]).endswith("<|im_end|>\n<|im_start|>user\n")  # the user turn starts
    assert settings["do_sample"] and settings["eos_token_id"] == end and settings["max_new_tokens"] == 16
    assert data.self_prompts(cfg, target, tokenizer, 4, tmp_path) == kept and len(calls) == 1  # resumed


def test_self_prompts_need_the_target_and_a_chat_template(tmp_path):
    cfg = OmegaConf.create(
        {"seed": 0, "data_dir": str(tmp_path), "data_cache": str(tmp_path), "data": {"sources": {}, "self_prompts": 8}}
    )
    with pytest.raises(ValueError, match="needs the target"):
        data.collect_prompts(cfg)
    tokenizer = SimpleNamespace(chat_template=None)
    with pytest.raises(ValueError, match="chat template"):
        data.self_prompts(cfg, tiny_model("llama"), tokenizer, 8, tmp_path)


def test_known_answers_read_shards_kept_without_top_k(tmp_path):
    (tmp_path / "00000.jsonl").write_text('{"prompt_ids": [1, 2], "answer_ids": [3, 4]}\n')
    assert data.known_answers([tmp_path]) == {(1, 2): {"answer_ids": [3, 4]}}
