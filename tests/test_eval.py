"""The harness on tiny models: Spec-Bench answer files, a summary that recomputes from them, resume."""

import json
import statistics
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from hydra import compose, initialize_config_dir
from tiny import tiny_model
from transformers import AutoTokenizer, LlamaForCausalLM

from eval import spec_bench
from eval.report import tokens_per_second
from eval.run import run, select_questions
from heads.medusa import MedusaHeads
from specdec.drafters import NGramMemory
from specdec.models import ASSETS, BUILTIN_DRAFT

CONF = Path(__file__).resolve().parents[1] / "conf"
SPEC_BENCH_KEYS = {"question_id", "category", "model_id", "choices", "tstamp"}
CHOICE_KEYS = {"index", "turns", "new_tokens", "wall_time", "accept_lengths", "decoding_steps"}


def save_tiny(path: Path, seed: int, layers: int) -> Path:
    """A tiny random Llama with the built-in target's tokenizer, saved like a local model directory."""
    tokenizer = AutoTokenizer.from_pretrained(ASSETS / BUILTIN_DRAFT)
    small = dict(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_key_value_heads=1, pad_token_id=2)
    tiny_model("llama", seed=seed, vocab_size=len(tokenizer), num_hidden_layers=layers, **small).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    questions = root / "questions.jsonl"
    rows = [
        {"question_id": 0, "category": "chat", "turns": ["Hello there.", "And then?"]},
        {"question_id": 1, "category": "chat", "turns": ["Name a colour."]},
        {"question_id": 2, "category": "chat", "turns": ["Not selected: per_category=2."]},
        {"question_id": 3, "category": "code", "turns": ["def f(x):\n    return x + 1\n\ndef g(x):"]},
    ]
    questions.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return save_tiny(root / "target", 0, 2), save_tiny(root / "draft", 1, 1), questions, root


def config(setup, methods="[baseline,ngram]", extra=()):
    target, draft, questions, root = setup
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(
            config_name="eval",
            overrides=[
                f"target={target}",
                f"draft={draft}",
                f"questions={questions}",
                "per_category=2",
                "max_new_tokens=12",
                "dtype=fp32",
                f"methods={methods}",
                f"out_dir={root / 'out'}",
                "warmup=0",
                *extra,
            ],
        )


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_select_questions_takes_the_first_n_per_category(setup):
    assert [q["question_id"] for q in select_questions(str(setup[2]), 2)] == [0, 1, 3]


def test_run_writes_spec_bench_answers_and_a_summary_that_recomputes(setup):
    summary = run(config(setup))
    out = setup[3] / "out"
    base, ngram = lines(out / "answers" / "baseline.jsonl"), lines(out / "answers" / "ngram.jsonl")
    assert [r["question_id"] for r in base] == [r["question_id"] for r in ngram] == [0, 1, 3]
    for record in base + ngram:
        assert record.keys() >= SPEC_BENCH_KEYS and record["choices"][0].keys() >= CHOICE_KEYS
        choice = record["choices"][0]
        assert len(choice["turns"]) == len(choice["new_tokens"]) == len(choice["wall_time"])
        assert all(sum(a) == n for a, n in zip(choice["accept_lengths"], choice["new_tokens"], strict=True))
    assert len(base[0]["choices"][0]["turns"]) == 2  # the multi-turn question, answered turn by turn

    s = summary["methods"]["ngram"]
    speeds = {r["question_id"]: tokens_per_second(r) for r in ngram}
    base_speeds = {r["question_id"]: tokens_per_second(r) for r in base}
    expected = statistics.fmean(speeds.values()) / statistics.fmean(base_speeds.values())
    assert s["speedup"]["overall"] == pytest.approx(expected)
    chat = [0, 1]
    expected_chat = statistics.fmean(speeds[q] for q in chat) / statistics.fmean(base_speeds[q] for q in chat)
    assert s["speedup"]["chat"] == pytest.approx(expected_chat)
    all_lengths = [n for r in ngram for turn in r["choices"][0]["accept_lengths"] for n in turn]
    assert s["mean_accepted_length"] == pytest.approx(statistics.fmean(all_lengths))
    assert s["identical_share"] == 1.0 and summary["methods"]["baseline"]["speedup"]["overall"] == pytest.approx(1.0)
    assert json.loads((out / "summary.json").read_text())["methods"]["ngram"] == s
    assert (out / "speedup.png").stat().st_size > 0 and (out / "accept_lengths.png").stat().st_size > 0


def test_rerun_resumes_and_skips_finished_questions(setup):
    out = setup[3] / "out" / "answers"
    run(config(setup))
    before = {p.name: p.read_text() for p in out.glob("*.jsonl")}
    run(config(setup))  # everything answered: nothing is redone
    assert {p.name: p.read_text() for p in out.glob("*.jsonl")} == before
    run(config(setup, methods="[baseline,ngram,draft]"))  # a new method answers every question, others skip
    assert {p.name: p.read_text() for p in out.glob("*.jsonl") if p.name != "draft.jsonl"} == before
    assert [r["question_id"] for r in lines(out / "draft.jsonl")] == [0, 1, 3]


def test_unknown_method_is_a_clear_error(setup):
    with pytest.raises(ValueError, match="unknown method 'medusa2'"):
        run(config(setup, methods="[baseline,medusa2]"))


def test_sampling_run_reports_speed_and_acceptance_but_no_identity(setup):
    heads = MedusaHeads.for_model(LlamaForCausalLM.from_pretrained(setup[0]), num_heads=2)
    heads.save_pretrained(setup[3] / "heads")
    extra = ("temperature=0.8", f"out_dir={setup[3] / 'sampled'}", f"medusa_heads={setup[3] / 'heads'}")
    summary = run(config(setup, methods="[baseline,draft,medusa]", extra=extra))["methods"]
    assert summary["draft"]["identical_share"] is None and summary["draft"]["mean_accepted_length"] >= 1.0
    assert summary["medusa"]["questions"] == 3
    for record in lines(setup[3] / "sampled" / "answers" / "draft.jsonl"):
        choice = record["choices"][0]
        assert all(sum(a) == n for a, n in zip(choice["accept_lengths"], choice["new_tokens"], strict=True))


def test_ngram_memory_method_stays_identical_and_refuses_another_models_memory(setup):
    target = LlamaForCausalLM.from_pretrained(setup[0])
    memory = NGramMemory()
    memory.check(target)
    memory.add(target.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=20, do_sample=False)[0].tolist())
    memory.save_pretrained(setup[3] / "memory")
    extra = (f"out_dir={setup[3] / 'memory-run'}", f"ngram_memory={setup[3] / 'memory'}")
    summary = run(config(setup, methods="[baseline,ngram_memory]", extra=extra))["methods"]
    assert summary["ngram_memory"]["identical_share"] == 1.0 and summary["ngram_memory"]["questions"] == 3
    with pytest.raises(ValueError, match="fingerprint"):  # the built-in memory holds the real target's outputs
        run(config(setup, methods="[baseline,ngram_memory]", extra=(f"out_dir={setup[3] / 'builtin-memory'}",)))


def test_control_group_sets_the_controller(setup):
    def longest(out: str, extra=()) -> int:
        """The longest accepted run when the target drafts for itself, with no confidence threshold."""
        no_threshold = ("control.initial_threshold=1e-12", "control.min_threshold=1e-12")
        extra = (f"draft={setup[0]}", f"out_dir={setup[3] / out}", *no_threshold, *extra)
        run(config(setup, methods="[baseline,draft]", extra=extra))
        records = lines(setup[3] / out / "answers" / "draft.jsonl")
        return max(n for r in records for turn in r["choices"][0]["accept_lengths"] for n in turn)

    assert longest("control-default") > 2  # every draft token is accepted
    assert longest("control-depth1", extra=("control.max_depth=1",)) == 2  # one draft token + the bonus token


def test_categories_as_spec_bench_names_them():
    assert spec_bench.categories({"category": "mt_bench", "subcategory": "coding"}) == ("coding", "mt_bench")
    assert spec_bench.categories({"category": "writing"}) == ("writing", "mt_bench")  # Spec-Bench's own file
    assert spec_bench.categories({"category": "rag"}) == ("rag", "rag")
    assert spec_bench.categories({"category": "vicuna"}) == ("vicuna", "vicuna")  # another question set
    with pytest.raises(ValueError, match="needs 'subcategory'"):
        spec_bench.categories({"question_id": 9, "category": "mt_bench"})


def test_spec_bench_speed_on_hand_computed_records():
    def record(category: str, turns: list[str], new_tokens: list[int], wall_time: list[float]) -> dict:
        return {"category": category, "choices": [{"turns": turns, "new_tokens": new_tokens, "wall_time": wall_time}]}

    def words_plus_bos(text: str) -> SimpleNamespace:  # a tokenizer: one token a word, plus a BOS token
        return SimpleNamespace(input_ids=[1] + [7] * len(text.split()))

    method = [record("writing", ["x"], [10, 20], [1.0, 2.0]), record("rag", ["x"], [8], [2.0])]
    base = [record("writing", ["a b c", "d e f g h"], [9, 9], [1.0, 1.0]), record("rag", ["a b"], [9], [1.0])]
    mt_bench = spec_bench.speed(method, base, words_plus_bos, "mt_bench")  # 30 / 3 = 10 tok/s vs 8 / 2
    assert (mt_bench.tokens_per_s, mt_bench.baseline_tokens_per_s, mt_bench.speedup) == (10.0, 4.0, 2.5)
    assert spec_bench.speed(method, base, words_plus_bos, "rag").speedup == 4.0 / 2.0
    assert spec_bench.speed(method, base, words_plus_bos, "overall").speedup == pytest.approx((10 + 4) / (4 + 2))
    assert spec_bench.speed(method, base, words_plus_bos, "writing").speedup == 2.5  # category == task, as speed.py
    assert spec_bench.speed(method, base, words_plus_bos, "qa") is None  # nothing kept
