"""The harness on tiny models: Spec-Bench answer files that Spec-Bench's own speed.py reads, a summary that
recomputes from them, resume."""

import functools
import itertools
import json
import statistics
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from tiny import tiny_model
from transformers import AutoTokenizer, LlamaForCausalLM

import heads.eagle
import heads.streams
from eval import spec_bench
from eval.report import acceptance_by_depth, read_answers, steps_with_at_most, tokens_per_second
from eval.run import in_turns, run, select_questions
from heads.eagle import EagleHead
from heads.medusa import MedusaHeads
from heads.streams import StreamEmbeddings
from specdec.devices import is_offloaded
from specdec.drafters import NGramMemory
from specdec.models import ASSETS, BUILTIN_DRAFT, load_model

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
SPEC_BENCH_KEYS = {"question_id", "category", "answer_id", "model_id", "choices", "tstamp"}  # evaluation/eval.py
CHOICE_KEYS = {"index", "turns", "decoding_steps", "new_tokens", "wall_time", "accept_lengths"}
QUESTIONS = [  # as in the dev split: the task in `category`, MT-bench's own category in `subcategory`
    {"question_id": 0, "category": "mt_bench", "subcategory": "writing", "turns": ["Hello there.", "And then?"]},
    {"question_id": 1, "category": "mt_bench", "subcategory": "coding", "turns": ["def f(x):\n    return x + 1\n"]},
    {"question_id": 2, "category": "mt_bench", "subcategory": "math", "turns": ["Not selected: per_category=2."]},
    {"question_id": 3, "category": "translation", "turns": ["Translate German-to-English: Guten Morgen."]},
    {"question_id": 4, "category": "summarization", "turns": ["Summarize: the cat sat on the mat. It slept."]},
    {"question_id": 5, "category": "qa", "turns": ["Who wrote Hamlet?"]},
    {"question_id": 6, "category": "math_reasoning", "turns": ["Tom has 3 apples and buys 2. How many now?"]},
    {"question_id": 7, "category": "rag", "turns": ["Context: Paris is in France.\nWhere is Paris?"]},
]
SELECTED = [0, 1, 3, 4, 5, 6, 7]  # per_category=2
FEW = [0, 1, 3]
SPEED_PY_TASKS = ["mt_bench", "translation", "summarization", "qa", "math_reasoning", "rag", "overall"]


@functools.cache
def _tokenizer(path: Path):
    return AutoTokenizer.from_pretrained(path)  # speed.py loads it on every call; once is enough here


def spec_bench_speed(jsonl_file, jsonl_file_base, tokenizer, task=None, report=True):
    """Spec-Bench's `evaluation/speed.py` `speed()` (hemingkx/Spec-Bench, commit fd2c1cd), rewritten from what
    it does, independently of `eval.spec_bench`: each file filtered on its own (`overall`: every record;
    `mt_bench`: `category` one of MT-bench's eight; else `category == task`); per record tokens over the
    summed `wall_time`, the method's tokens `sum(new_tokens)`, the baseline's `len(tokenizer(turn).input_ids)
    - 1` per turn of its text; speedup = mean of the method's per-record rates / mean of the baseline's. The
    report takes `np.mean` of the method's `accept_lengths` concatenated over records (what crashed on the
    per-turn layout)."""
    tokenizer = _tokenizer(tokenizer)
    mt_bench = ["writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem", "humanities"]

    def kept(path):
        records = [json.loads(line) for line in Path(path).read_text().splitlines()]
        if task == "overall":
            return records
        if task == "mt_bench":
            return [r for r in records if r["category"] in mt_bench]
        return [r for r in records if r["category"] == task]

    speeds, accept_lengths = [], []
    for record in kept(jsonl_file):
        choice = record["choices"][0]
        accept_lengths.extend(choice["accept_lengths"])
        speeds.append(sum(choice["new_tokens"]) / sum(choice["wall_time"]))
    base_speeds = []
    for record in kept(jsonl_file_base):
        choice = record["choices"][0]
        tokens = sum(len(tokenizer(turn).input_ids) - 1 for turn in choice["turns"])
        base_speeds.append(tokens / sum(choice["wall_time"]))
    rate, base_rate = np.array(speeds).mean(), np.array(base_speeds).mean()
    if report:
        print(f"Task: {task}; mean accepted tokens: {np.mean(accept_lengths)}; {rate} vs {base_rate} tokens/s")
    return rate, base_rate, rate / base_rate, accept_lengths


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
    questions.write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    few = root / "few.jsonl"  # for the tests that need not cover every task: two tasks, one multi-turn question
    few.write_text("".join(json.dumps(QUESTIONS[i]) + "\n" for i in FEW))
    return save_tiny(root / "target", 0, 2), save_tiny(root / "draft", 1, 1), questions, root


def config(setup, methods="[baseline,ngram]", extra=(), few=False):
    """The eval config on the tiny pair: the questions of every task (`few`: only FEW), 12 new tokens."""
    target, draft, questions, root = setup
    questions = root / "few.jsonl" if few else questions
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


@pytest.fixture(scope="module")
def answered(setup):
    """One run of plain decoding, the n-gram source and a peer without step counts; its summary."""
    return run(config(setup, methods="[baseline,ngram,hf_prompt_lookup]"))


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_select_questions_takes_the_first_n_per_task(setup, tmp_path):
    assert [q["question_id"] for q in select_questions(str(setup[2]), 2)] == SELECTED
    assert [q["question_id"] for q in select_questions(str(setup[2]), 1)] == [0, 3, 4, 5, 6, 7]
    own = tmp_path / "spec_bench_question.jsonl"  # Spec-Bench's own file: MT-bench's categories are one task
    rows = [{"question_id": i, "category": c, "turns": ["?"]} for i, c in enumerate(["writing", "coding", "qa"])]
    own.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert [q["question_id"] for q in select_questions(str(own), 1)] == [0, 2]


def test_questions_are_answered_with_the_tasks_in_turn():
    questions = [{"question_id": i, "category": c, "turns": ["?"]} for i, c in enumerate("aaabbc")]
    assert [q["question_id"] for q in in_turns(questions)] == [0, 3, 5, 1, 4, 2]


def test_categories_as_spec_bench_names_them():
    assert spec_bench.categories({"category": "mt_bench", "subcategory": "coding"}) == ("coding", "mt_bench")
    assert spec_bench.categories({"category": "writing"}) == ("writing", "mt_bench")  # Spec-Bench's own file
    assert spec_bench.categories({"category": "rag"}) == ("rag", "rag")
    assert spec_bench.categories({"category": "vicuna"}) == ("vicuna", "vicuna")  # another question set
    with pytest.raises(ValueError, match="needs 'subcategory'"):
        spec_bench.categories({"question_id": 9, "category": "mt_bench"})


def test_the_default_question_set_is_the_dev_split():
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="eval")
    path = OmegaConf.to_container(cfg)["questions"]
    assert path.endswith("/eval/data/dev_spec_bench_question.jsonl") and cfg.per_category == 3
    questions = select_questions(str(ROOT / "eval" / "data" / "dev_spec_bench_question.jsonl"), None)
    tasks = [spec_bench.categories(q) for q in questions]
    assert {t: [task for _, task in tasks].count(t) for t in spec_bench.TASKS} == dict.fromkeys(spec_bench.TASKS, 40)
    assert {c for c, task in tasks if task == "mt_bench"} == set(spec_bench.MT_BENCH_CATEGORIES)
    chosen = select_questions(str(ROOT / "eval" / "data" / "dev_spec_bench_question.jsonl"), 3)
    assert len(chosen) == 18
    mt_bench = [c for c, task in map(spec_bench.categories, chosen) if task == "mt_bench"]
    assert len(set(mt_bench)) == 3  # MT-bench's categories in turn, not the first three writing questions


def test_answer_files_have_spec_bench_layout(setup, answered):
    out = setup[3] / "out" / "answers"
    for method in ("baseline", "ngram", "hf_prompt_lookup"):
        records = sorted(lines(out / f"{method}.jsonl"), key=lambda r: r["question_id"])  # answered tasks in turn
        assert [r["question_id"] for r in records] == SELECTED
        assert [r["category"] for r in records[:2]] == ["writing", "coding"]  # MT-bench's own, as Spec-Bench's
        assert [r["category"] for r in records[2:]] == [r["task"] for r in records[2:]] == list(spec_bench.TASKS[1:])
        assert {r["task"] for r in records[:2]} == {"mt_bench"}
        for record in records:
            assert record.keys() >= SPEC_BENCH_KEYS and record["choices"][0].keys() >= CHOICE_KEYS
            choice = record["choices"][0]
            turns = len(choice["turns"])
            assert turns == len(choice["new_tokens"]) == len(choice["wall_time"]) == len(choice["decoding_steps"])
            assert all(type(n) is int for n in choice["accept_lengths"])  # one flat list over the turns
            assert len(choice["accept_lengths"]) == sum(choice["decoding_steps"])
            if method != "hf_prompt_lookup":  # Hugging Face's peers report no steps
                ends = np.cumsum([0, *choice["decoding_steps"]])
                per_turn = [sum(choice["accept_lengths"][a:b]) for a, b in itertools.pairwise(ends)]
                assert per_turn == choice["new_tokens"]
        assert len(records[0]["choices"][0]["turns"]) == 2  # the multi-turn question, answered turn by turn


def test_summary_recomputes_from_the_answer_files(setup, answered):
    out = setup[3] / "out"
    base, ngram = lines(out / "answers" / "baseline.jsonl"), lines(out / "answers" / "ngram.jsonl")
    s = answered["methods"]["ngram"]
    speeds = {r["question_id"]: tokens_per_second(r) for r in ngram}
    base_speeds = {r["question_id"]: tokens_per_second(r) for r in base}
    expected = statistics.fmean(speeds.values()) / statistics.fmean(base_speeds.values())
    assert s["speedup"]["overall"] == pytest.approx(expected)
    mt_bench = [0, 1]
    expected_mt = statistics.fmean(speeds[q] for q in mt_bench) / statistics.fmean(base_speeds[q] for q in mt_bench)
    assert s["speedup"]["mt_bench"] == pytest.approx(expected_mt)
    assert list(s["speedup"]) == list(s["spec_bench_speedup"]) == ["overall", *spec_bench.TASKS]
    all_lengths = [n for r in ngram for n in r["choices"][0]["accept_lengths"]]
    assert s["mean_accepted_length"]["overall"] == pytest.approx(statistics.fmean(all_lengths))
    for task in spec_bench.TASKS:  # acceptance by depth per task
        lengths = [n for r in ngram if r["task"] == task for n in r["choices"][0]["accept_lengths"]]
        assert s["mean_accepted_length"][task] == pytest.approx(statistics.fmean(lengths))
        assert s["acceptance_by_depth"][task] == acceptance_by_depth(lengths)
    assert s["identical_share"] == 1.0 and answered["methods"]["baseline"]["speedup"]["overall"] == pytest.approx(1.0)
    assert json.loads((out / "summary.json").read_text())["methods"]["ngram"] == s
    md = (out / "summary.md").read_text()
    assert "Spec-Bench's evaluation/speed.py" in md
    worst = min(spec_bench.TASKS, key=lambda t: s["speedup"][t])
    assert f"| {worst} {s['speedup'][worst]:.2f}x |" in md.split("\n## ")[0].split("| ngram |")[1].split("\n")[0]
    assert all(f"| ngram | {task} | " in md for task in ["overall", *spec_bench.TASKS])  # acceptance rows
    assert "| baseline | overall | " not in md and "| hf_prompt_lookup | overall | " not in md  # nothing drafted


def test_time_shares_say_where_specdecs_time_went(setup, answered):
    records = lines(setup[3] / "out" / "answers" / "ngram.jsonl")
    for record in records:  # one profile per turn, its fallback steps among the turn's steps
        choice = record["choices"][0]
        assert len(choice["profile"]) == len(choice["decoding_steps"])
        for wall, p, steps in zip(choice["wall_time"], choice["profile"], choice["decoding_steps"], strict=True):
            assert 0 <= p["catchup"] <= p["draft"] and p["prefill"] + p["draft"] + p["verify"] <= wall
            assert 0 <= p["fallback_steps"] <= steps
            assert len(p["tree_sizes"]) == steps and min(p["tree_sizes"]) >= 1
    shares = answered["methods"]["ngram"]["time_shares"]
    assert list(shares) == ["overall", *spec_bench.TASKS]
    choices = [r["choices"][0] for r in records]
    profiles = [(w, p) for c in choices for w, p in zip(c["wall_time"], c["profile"], strict=True)]
    wall = sum(w for w, _ in profiles)
    overall = shares["overall"]
    assert overall["verify"] == pytest.approx(sum(p["verify"] for _, p in profiles) / wall)
    assert overall["fallback"] == pytest.approx(
        sum(p["fallback_steps"] for _, p in profiles)
        / len([n for r in records for n in r["choices"][0]["accept_lengths"]])
    )
    trees = [n for _, p in profiles for n in p["tree_sizes"] if n > 1]
    assert overall["nodes"] == pytest.approx(sum(trees) / len(trees)) and overall["nodes"] > 1
    for task_shares in shares.values():
        parts = [task_shares[k] for k in ("prefill", "draft", "catchup", "verify", "other")]
        assert sum(parts) == pytest.approx(1.0) and min(parts) >= 0 and task_shares["verify"] > 0.2
    assert all(answered["methods"][m]["time_shares"]["overall"] is None for m in ("baseline", "hf_prompt_lookup"))
    md = (setup[3] / "out" / "summary.md").read_text().split("## Where the time went")[1]
    assert "| ngram | overall | " in md and "| baseline |" not in md


def test_spec_bench_speed_py_runs_on_every_task_and_matches_the_summary(setup, answered):
    answers, tokenizer = setup[3] / "out" / "answers", setup[0]
    baseline = answered["methods"]["baseline"]  # the two countings differ on these files, so matching one tells
    assert baseline["speedup"]["overall"] == pytest.approx(1.0) != baseline["spec_bench_speedup"]["overall"]
    for method in ("baseline", "ngram", "hf_prompt_lookup"):
        for task in SPEED_PY_TASKS:
            with warnings.catch_warnings():  # the peer reports no accepted lengths: speed.py prints NaN
                warnings.simplefilter("ignore", RuntimeWarning)
                _, _, ratio, _ = spec_bench_speed(
                    answers / f"{method}.jsonl", answers / "baseline.jsonl", tokenizer, task
                )
            assert np.isfinite(ratio)
            assert answered["methods"][method]["spec_bench_speedup"][task] == pytest.approx(ratio), (method, task)


def test_older_per_turn_layout_is_refused_clearly(setup, answered, tmp_path):
    record = lines(setup[3] / "out" / "answers" / "ngram.jsonl")[0]
    record["choices"][0]["accept_lengths"] = [[1, 3], [2]]  # per turn, as the harness used to write it
    del record["task"]
    old = tmp_path / "answers" / "ngram.jsonl"
    old.parent.mkdir()
    old.write_text(json.dumps(record) + "\n")
    with pytest.raises(ValueError, match="inhomogeneous"):  # what speed.py's report did on it
        spec_bench_speed(old, setup[3] / "out" / "answers" / "baseline.jsonl", setup[0], "overall")
    with pytest.raises(ValueError, match=r"ngram.jsonl:1: .* older layout .*move"):
        read_answers(old)


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


def test_acceptance_by_depth_and_cumulative_steps():
    by_depth = acceptance_by_depth([1, 1, 2, 4])  # steps gaining 1, 1, 2 and 4 tokens
    assert by_depth == {"1": 0.5, "2": 0.25, "3": 0.25}
    assert steps_with_at_most(by_depth) == [0.5, 0.75, 0.75, 1.0]
    assert steps_with_at_most(acceptance_by_depth([1, 1])) == [1.0]


def test_plots_are_written(setup, answered):
    out = setup[3] / "out"
    for name in ("speedup.png", "acceptance_by_depth.png", "tokens_per_step.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (out / "accept_lengths.png").exists()


def test_rerun_resumes_and_skips_finished_questions(setup):
    extra = (f"out_dir={setup[3] / 'resume'}",)
    out = setup[3] / "resume" / "answers"
    run(config(setup, few=True, extra=extra))
    before = {p.name: p.read_text() for p in out.glob("*.jsonl")}
    run(config(setup, few=True, extra=extra))  # everything answered: nothing is redone
    assert {p.name: p.read_text() for p in out.glob("*.jsonl")} == before
    run(config(setup, few=True, methods="[baseline,ngram,draft]", extra=extra))  # a new method answers them all
    assert {p.name: p.read_text() for p in out.glob("*.jsonl") if p.name != "draft.jsonl"} == before
    assert sorted(r["question_id"] for r in lines(out / "draft.jsonl")) == FEW


def test_a_disk_offloaded_target_answers_as_the_one_in_memory(setup, answered, monkeypatch):
    """`offload_folder`: the target's weights on disk, read at every forward (the draft stays in memory); plain
    decoding and the n-gram source give the tokens they give with the target in memory."""
    loaded = []

    def load_and_keep(*args, **kwargs):
        loaded.append(load_model(*args, **kwargs))
        return loaded[-1]

    monkeypatch.setattr("eval.run.load_model", load_and_keep)
    extra = (f"out_dir={setup[3] / 'offloaded'}", f"offload_folder={setup[3] / 'offload'}")
    summary = run(config(setup, few=True, methods="[baseline,ngram]", extra=extra))["methods"]
    assert [is_offloaded(model) for model, _ in loaded] == [True, False]  # the target, the draft
    assert summary["ngram"]["identical_share"] == 1.0
    in_memory = {r["question_id"]: r for r in lines(setup[3] / "out" / "answers" / "baseline.jsonl")}
    for record in lines(setup[3] / "offloaded" / "answers" / "baseline.jsonl"):
        assert record["choices"][0]["token_ids"] == in_memory[record["question_id"]]["choices"][0]["token_ids"]
    with pytest.raises(ValueError, match="leave device_map null"):
        run(config(setup, few=True, extra=(f"out_dir={setup[3] / 'both'}", extra[1], "device_map=auto")))


def test_unknown_method_is_a_clear_error(setup):
    with pytest.raises(ValueError, match="unknown method 'medusa2'"):
        run(config(setup, methods="[baseline,medusa2]"))


def test_sampling_run_reports_speed_and_acceptance_but_no_identity(setup):
    heads = MedusaHeads.for_model(LlamaForCausalLM.from_pretrained(setup[0]), num_heads=2)
    heads.save_pretrained(setup[3] / "heads")
    extra = ("temperature=0.8", f"out_dir={setup[3] / 'sampled'}", f"medusa_heads={setup[3] / 'heads'}")
    summary = run(config(setup, few=True, methods="[baseline,draft,medusa]", extra=extra))["methods"]
    assert summary["draft"]["identical_share"] is None
    assert summary["medusa"]["questions"] == len(FEW)
    tokens = steps = 0
    for record in lines(setup[3] / "sampled" / "answers" / "draft.jsonl"):
        choice = record["choices"][0]
        assert sum(choice["accept_lengths"]) == sum(choice["new_tokens"])  # every token counted in one step
        assert len(choice["accept_lengths"]) == sum(choice["decoding_steps"])
        tokens, steps = tokens + sum(choice["new_tokens"]), steps + len(choice["accept_lengths"])
    assert summary["draft"]["mean_accepted_length"]["overall"] == pytest.approx(tokens / steps)


def test_ngram_memory_method_stays_identical_and_refuses_another_models_memory(setup):
    target = LlamaForCausalLM.from_pretrained(setup[0])
    memory = NGramMemory()
    memory.check(target)
    memory.add(target.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=20, do_sample=False)[0].tolist())
    memory.save_pretrained(setup[3] / "memory")
    extra = (f"out_dir={setup[3] / 'memory-run'}", f"ngram_memory={setup[3] / 'memory'}")
    summary = run(config(setup, few=True, methods="[baseline,ngram_memory]", extra=extra))["methods"]
    assert summary["ngram_memory"]["identical_share"] == 1.0 and summary["ngram_memory"]["questions"] == len(FEW)
    builtin = (f"out_dir={setup[3] / 'builtin-memory'}",)
    with pytest.raises(ValueError, match="fingerprint"):  # the built-in memory holds the real target's outputs
        run(config(setup, few=True, methods="[baseline,ngram_memory]", extra=builtin))


def test_control_group_sets_the_controller(setup):
    def longest(out: str, extra=()) -> int:
        """The longest accepted run when the target drafts for itself, with no confidence threshold."""
        no_threshold = ("control.initial_threshold=1e-12", "control.min_threshold=1e-12")
        extra = (f"draft={setup[0]}", f"out_dir={setup[3] / out}", *no_threshold, *extra)
        run(config(setup, few=True, methods="[baseline,draft]", extra=extra))
        records = lines(setup[3] / out / "answers" / "draft.jsonl")
        return max(n for r in records for n in r["choices"][0]["accept_lengths"])

    assert longest("control-default") > 2  # every draft token is accepted
    assert longest("control-depth1", extra=("control.max_depth=1",)) == 2  # one draft token + the bonus token


def test_variants_run_a_method_with_other_settings_beside_it(setup):
    chain = "{method: draft, draft_settings: {depth: 2, branching: 1, tree_budget: 2}}"
    extra = (f"draft={setup[0]}", f"out_dir={setup[3] / 'variants'}", f"+variants={{draft_chain2: {chain}}}")
    extra += ("controller=false",)  # the target drafts for itself: every draft token is accepted
    summary = run(config(setup, few=True, methods="[baseline,draft,draft_chain2]", extra=extra))["methods"]
    assert summary["draft_chain2"]["identical_share"] == 1.0 and summary["draft"]["identical_share"] == 1.0
    steps = {
        m: [
            n
            for r in lines(setup[3] / "variants" / "answers" / f"{m}.jsonl")
            for n in r["choices"][0]["accept_lengths"]
        ]
        for m in ("draft", "draft_chain2")
    }
    assert max(steps["draft_chain2"]) <= 3 < max(steps["draft"])  # depth 2: two draft tokens + the bonus at most
    with pytest.raises(ValueError, match="needs `method:`"):
        run(config(setup, few=True, methods="[baseline,odd]", extra=("+variants={odd: {depth: 2}}",)))


def test_eagle_methods_run_a_head_and_say_when_the_built_in_one_is_missing(setup, monkeypatch, tmp_path):
    target = LlamaForCausalLM.from_pretrained(setup[0])
    torch.manual_seed(0)
    EagleHead.for_model(target, layers=(0, 1)).save_pretrained(setup[3] / "eagle")
    extra = (f"out_dir={setup[3] / 'eagle-run'}", f"eagle_head={setup[3] / 'eagle'}")
    summary = run(config(setup, few=True, methods="[baseline,eagle]", extra=extra))["methods"]
    assert summary["eagle"]["identical_share"] == 1.0 and summary["eagle"]["questions"] == len(FEW)
    monkeypatch.setattr(heads.eagle, "ASSETS", tmp_path)  # as before the built-in head is trained
    with pytest.raises(FileNotFoundError, match=r"training\.train_eagle"):
        run(config(setup, few=True, methods="[baseline,eagle]", extra=(f"out_dir={setup[3] / 'no-eagle'}",)))


def test_stream_methods_run_streams_and_say_when_the_built_in_ones_are_missing(setup, monkeypatch, tmp_path):
    target = LlamaForCausalLM.from_pretrained(setup[0])
    StreamEmbeddings.for_model(target, 3).save_pretrained(setup[3] / "streams")
    memory = NGramMemory()
    memory.check(target)
    memory.save_pretrained(setup[3] / "streams-memory")
    extra = (
        f"out_dir={setup[3] / 'streams-run'}",
        f"stream_embeddings={setup[3] / 'streams'}",
        f"ngram_memory={setup[3] / 'streams-memory'}",
    )
    summary = run(config(setup, few=True, methods="[baseline,streams,streams_ngram]", extra=extra))["methods"]
    for method in ("streams", "streams_ngram"):
        assert summary[method]["identical_share"] == 1.0 and summary[method]["questions"] == len(FEW)
    monkeypatch.setattr(heads.streams, "ASSETS", tmp_path)  # as before the built-in streams are trained
    with pytest.raises(FileNotFoundError, match=r"training\.train_streams"):
        run(config(setup, few=True, methods="[baseline,streams]", extra=(f"out_dir={setup[3] / 'no-streams'}",)))
