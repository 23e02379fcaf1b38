"""The training mix: one for every app, covering the dev categories, conversations built from the target's own
answers, and nothing of the dev split in it."""

import gzip
import json
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf
from transformers import AutoTokenizer

from specdec.models import ASSETS, BUILTIN_DRAFT
from training import data, mix

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
APPS = ["build_ngram_memory", "distill_draft", "train_medusa", "finetune_medusa", "train_eagle"]
MIX_KEYS = ["sources", "t0", "dialogs", "dialog_turns", "translation", "self_prompts", "max_prompt_tokens"]
MIX_KEYS += ["max_new_tokens", "gen_dtype", "topk"]


def app_config(name: str, overrides: list[str] | None = None):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name=name, overrides=overrides or [], return_hydra_config=True)
        HydraConfig.instance().set_config(cfg)  # as in a run, so ${hydra:...} resolves
        app = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
        return OmegaConf.create(OmegaConf.to_container(app, resolve=True))


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(ASSETS / BUILTIN_DRAFT)  # the target's tokenizer and chat template


def test_every_training_app_reads_the_same_mix():
    mixes = {name: {k: app_config(name).data[k] for k in MIX_KEYS} for name in APPS}
    assert all(m == mixes["train_medusa"] for m in mixes.values())
    assert app_config("train_medusa").data_cache == app_config("build_ngram_memory").data_cache  # answers shared


def test_the_mix_covers_every_dev_category():
    cfg = app_config("train_medusa").data
    tasks = {data.SOURCE_TASKS[s] for s in cfg.sources} | set(cfg.t0)
    assert {"summarization", "context_qa", "open_qa", "math", "code"} <= tasks  # summarization, rag, qa, math
    assert cfg.dialogs > 0 and cfg.dialog_turns >= 2 and cfg.translation > 0 and cfg.self_prompts > 0  # mt_bench


@pytest.mark.skipif(not SHARED.exists(), reason="needs ../shared/data")
def test_no_prompt_of_the_mix_holds_a_dev_question():
    cfg = app_config("train_medusa", ["data.self_prompts=0"])
    prompts = [p["text"] for p in data.collect_prompts(cfg)]
    dialogs = mix.dialog_turns(cfg)
    prompts += [t for turns in dialogs for t in turns] + mix.english_sentences(cfg, dialogs)
    assert len(prompts) > 2000
    dev = [t for q in map(json.loads, (SHARED / "dev_spec_bench_question.jsonl").open()) for t in q["turns"]]
    pieces = {" ".join(t.split()[5:25]) for t in dev if len(t.split()) >= 30}  # 20 words from inside long turns
    assert len(pieces) > 100
    text = "\n".join(" ".join(p.split()) for p in prompts)
    assert [p for p in pieces if p in text] == []
    assert not set(prompts) & set(dev)


def test_t0_prompts_take_each_task_seeded(tmp_path):
    rows = [{"prompt": f"{task} {i}", "task": task} for task in ("summarization", "open_qa") for i in range(5)]
    with gzip.open(tmp_path / data.T0_PROMPTS, "wt") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    cfg = OmegaConf.create({"seed": 0, "data_dir": str(tmp_path), "data": {"t0": {"summarization": 2, "open_qa": 9}}})
    prompts = data.t0_prompts(cfg, evaluation={"open_qa 3"})
    assert [p["task"] for p in prompts] == ["summarization"] * 2 + ["open_qa"] * 4  # the dev turn left out
    assert prompts == data.t0_prompts(cfg, evaluation={"open_qa 3"})
    with pytest.raises(ValueError, match="classification"):
        data.t0_prompts(OmegaConf.merge(cfg, {"data": {"t0": {"classification": 1}}}), set())


@pytest.fixture
def fake_answers(monkeypatch, tokenizer):
    """The target answers each prompt with `answer <n>`, n counting its prompts (and records them)."""
    asked = []

    def generate(target, prompts, pad, eos, cfg):
        asked.extend(prompts)
        start = len(asked) - len(prompts)
        return [{"answer_ids": [*tokenizer(f"answer {start + i}").input_ids, eos]} for i in range(len(prompts))]

    monkeypatch.setattr(data, "_generate_batch", generate)
    return asked


def small_cfg(tmp_path, **extra):
    settings = {"max_prompt_tokens": 200, "gen_batch_size": 2, "heldout": 0, "max_generated_batches": None}
    return OmegaConf.create({"seed": 0, "data_dir": str(tmp_path), "data": {**settings, **extra}})


def test_dialogues_are_answered_turn_by_turn_with_the_targets_own_answers(tmp_path, tokenizer, fake_answers):
    dialogs = [["Find me a flight.", "To Boston, please.", "Friday."], ["Play some jazz.", "Louder!"]]
    rows = mix.conversations(small_cfg(tmp_path), None, tokenizer, dialogs, heldout=1, shard_dir=tmp_path)
    assert len(rows) == 5 and len(fake_answers) == 5
    last = next(r for r in rows if r["conversation"] == 0 and "Friday." in tokenizer.decode(r["prompt_ids"]))
    earlier = [tokenizer.decode(r["answer_ids"], skip_special_tokens=True) for r in rows if r["conversation"] == 0]
    expected = [
        {"role": "user", "content": "Find me a flight."},
        {"role": "assistant", "content": earlier[0]},
        {"role": "user", "content": "To Boston, please."},
        {"role": "assistant", "content": earlier[1]},
        {"role": "user", "content": "Friday."},
    ]
    assert last["prompt_ids"] == data.chat_input_ids(tokenizer, expected)[0].tolist()
    assert [r["heldout"] for r in rows if r["conversation"] == 0] == [True] * 3  # held out in every turn
    assert not any(r["heldout"] for r in rows if r["conversation"] == 1)
    assert {r["task"] for r in rows} == {"multi-turn chat"}
    again = mix.conversations(small_cfg(tmp_path), None, tokenizer, dialogs, heldout=1, shard_dir=tmp_path)
    assert again == rows and len(fake_answers) == 5  # resumed from the shards


def test_a_dialogue_ends_when_its_prompt_grows_too_long(tmp_path, tokenizer, fake_answers):
    dialogs = [["Hi, book a table for two. " * 3, "And a taxi after it. " * 3]]
    first = len(data.chat_input_ids(tokenizer, [{"role": "user", "content": dialogs[0][0]}])[0])
    rows = mix.conversations(small_cfg(tmp_path, max_prompt_tokens=first), None, tokenizer, dialogs, 0, tmp_path)
    assert len(rows) == 1 and len(fake_answers) == 1


def test_translations_send_the_targets_german_back_in_spec_bench_words(tmp_path, tokenizer, monkeypatch):
    german = {"The weather is fine today.": "Das Wetter ist heute gut.\nNote: ...", "Yes.": "Ja."}

    def generate(target, prompts, pad, eos, cfg):
        out = []
        for ids in prompts:
            text = tokenizer.decode(ids)
            source = next((s for s in german if mix.TO_GERMAN + s in text), None)
            out.append({"answer_ids": tokenizer(german[source] if source else "The weather is good today.").input_ids})
        return out

    monkeypatch.setattr(data, "_generate_batch", generate)
    rows = mix.translations(small_cfg(tmp_path), None, tokenizer, list(german), heldout=0, shard_dir=tmp_path)
    back = [tokenizer.decode(r["prompt_ids"]) for r in rows if mix.TO_ENGLISH in tokenizer.decode(r["prompt_ids"])]
    assert len(rows) == 3 and len(back) == 1  # "Ja." is too short to send back
    assert "Translate German to English: Das Wetter ist heute gut.<|im_end|>" in back[0]  # its first line only


def test_mix_table_counts_answers_and_tokens_per_task():
    rows = [
        {"task": "translation", "source": "translation", "answer_ids": [1, 2], "heldout": True},
        {"task": "translation", "source": "translation", "answer_ids": [3], "heldout": False},
        {"source": "old.jsonl", "answer_ids": [4, 5, 6], "heldout": False},
    ]
    assert mix.mix_table(rows).splitlines()[2:] == [
        "| translation | 2 | 3 | 1 |",
        "| old.jsonl | 1 | 3 | 0 |",
        "| all | 3 | 6 | 1 |",
    ]


@pytest.mark.skipif(not SHARED.exists(), reason="needs ../shared/data")
def test_mix_rows_hold_every_kind_and_hold_out_across_them(tmp_path, tokenizer, fake_answers):
    cfg = OmegaConf.create(
        {
            "seed": 0,
            "data_dir": str(SHARED),
            "data_cache": str(tmp_path),
            "data": {
                "sources": {"gsm8k_train.jsonl": 4},
                "t0": {"summarization": 2, "context_qa": 2},
                "dialogs": 3,
                "dialog_turns": 2,
                "translation": 3,
                "self_prompts": 0,
                "heldout": 4,
                "max_prompt_tokens": 1024,
                "max_new_tokens": 8,
                "gen_batch_size": 4,
                "max_generated_batches": None,
                "limit": None,
            },
        }
    )
    rows = mix.mix_rows(cfg, None, tokenizer, tmp_path)
    tasks = [r["task"] for r in rows]
    assert {t: tasks.count(t) for t in set(tasks)} == {
        "math": 4,
        "summarization": 2,
        "context_qa": 2,
        "multi-turn chat": 6,
        "translation": 3,
    }  # fmt: skip  (the fake German, "answer N", is too short to be sent back)
    held = [r for r in rows if r["heldout"]]
    assert {r["task"] for r in held} >= {"multi-turn chat", "translation"} and 4 <= len(held) <= 8
    assert mix.mix_rows(cfg, None, tokenizer, tmp_path) == rows  # read back from the shards


@pytest.mark.skipif(not SHARED.exists(), reason="needs ../shared/data")
def test_the_lite_mix_is_part_of_the_mix_and_covers_the_same_tasks():
    """conf/data/mix_lite.yaml (the shipped Medusa heads' fine-tuning): the same seeded draws as the whole mix, fewer
    of them, so that the whole mix's answers serve it; every task type kept; only the answers' dtype differs."""
    whole = app_config("train_medusa", ["data.self_prompts=0"])
    lite = app_config("train_medusa", ["data=mix_lite", "data.self_prompts=0"])

    def prompts(cfg) -> tuple[set[str], list[list[str]], list[str]]:
        dialogs = mix.dialog_turns(cfg)
        return {p["text"] for p in data.collect_prompts(cfg)}, dialogs, mix.english_sentences(cfg, dialogs)

    (singles, dialogs, sentences), (lite_singles, lite_dialogs, lite_sentences) = prompts(whole), prompts(lite)
    assert lite_singles < singles and len(lite_singles) < len(singles) / 2
    assert lite_dialogs == dialogs[: len(lite_dialogs)] and set(lite_sentences) <= set(sentences)
    assert set(lite.data.sources) == set(whole.data.sources) and set(lite.data.t0) == set(whole.data.t0)
    assert (
        app_config("train_medusa", ["data=mix_lite"]).data.self_prompts == app_config("train_medusa").data.self_prompts
    )
    settings = ("max_prompt_tokens", "max_new_tokens", "gen_batch_size", "topk", "dialog_turns")
    assert [lite.data[k] for k in settings] == [whole.data[k] for k in settings]
